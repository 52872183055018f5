"""The conversation logic between the providers, as pure code: no sockets, no database, the clock injected.

- `turn_taking`: when the caller's speech makes the agent yield (threshold, reset gap, minimum words,
  backchannel words);
- `heard`: what the caller heard of an agent utterance cut short, from the playback clock's marks and the
  synthesizer's alignment (or the transcript's share of the audio, for speech-to-speech models);
- `chunking`: where the model's streamed text is cut into sentences to speak.

The call engine (`engine.call`) feeds these from the media stream and the providers; tests drive them directly.
"""
