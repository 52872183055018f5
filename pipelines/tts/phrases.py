"""The agent's scripted phrases, synthesized once per voice and replayed from memory on every later call.

An agent's scripted text (its first sentence, its goodbyes, a path's fixed lines) is said the same on every call:
synthesizing it each time costs the vendor's characters, the vendor's first-byte wait at the moment the caller
picks up, and the engine's work of receiving it again. `PhraseCache` keeps the finished audio of such phrases, with
their character timings, per organization and voice (`VoiceIdentity`), so the organization's next call says them at
once. The model's replies are never cached: they are the caller's conversation, seldom said twice.

A phrase is stored only once its synthesis has ended normally, with its character timings: one cut short (barge-in,
hang-up) or failing midway is not, nor one said without timings (ElevenLabs' HTTP fallback gives none, and a
barge-in on a phrase said from memory must cut its transcript where the caller stopped hearing it). Calls that ask
for a phrase before its first synthesis has finished synthesize it themselves.
The cache is bounded by bytes, least recently used first out; each engine has one (`ProviderClients.phrases`),
used from its event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence

from pipelines.streams import closing_stream
from pipelines.tts.base import Alignment, TextToSpeech, VoiceIdentity

__all__ = ["PhraseCache"]

MAX_BYTES = 16 * 1024 * 1024
"""Audio the cache holds at most: about 35 minutes of μ-law 8 kHz."""
MAX_PHRASE_BYTES = 480_000
"""The longest phrase kept (one minute): scripted text longer than that is a monologue, not a phrase."""

Chunk = bytes | Alignment


class PhraseCache:
    """Finished audio of scripted phrases by (voice, text), least recently used evicted first."""

    def __init__(self, max_bytes: int = MAX_BYTES, max_phrase_bytes: int = MAX_PHRASE_BYTES) -> None:
        """Hold at most `max_bytes` of audio, none of it in phrases longer than `max_phrase_bytes`."""
        self.max_bytes = max_bytes
        self.max_phrase_bytes = min(max_phrase_bytes, max_bytes)
        self._phrases: OrderedDict[tuple[str, str, str], tuple[Chunk, ...]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """Phrases held."""
        return len(self._phrases)

    @property
    def bytes(self) -> int:
        """Audio held, in bytes."""
        return self._bytes

    async def synthesize(self, tts: TextToSpeech, text: str, *, owner: str) -> AsyncIterator[Chunk]:
        """`tts.synthesize(text)`, from memory when this voice has said `text` for `owner` (an organization) before;
        kept for next time when its synthesis ends normally here. Owners never share a phrase."""
        voice = _voice(tts)
        if voice is None:
            async with closing_stream(tts.synthesize(text)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        key = (owner, voice, text)
        held = self._phrases.get(key)
        if held is not None:
            self.hits += 1
            self._phrases.move_to_end(key)
            for chunk in held:
                yield chunk
            return
        self.misses += 1
        said: list[Chunk] = []
        size = 0
        timed = False
        async with closing_stream(tts.synthesize(text)) as chunks:
            async for chunk in chunks:
                if isinstance(chunk, bytes):
                    size += len(chunk)
                else:
                    timed = True
                if size <= self.max_phrase_bytes:
                    said.append(chunk)
                yield chunk
        # Reached only when the synthesis ended normally; kept under the voice that said it (a synthesizer that
        # fell over to another voice meanwhile names the other one now).
        if timed and 0 < size <= self.max_phrase_bytes and _voice(tts) == voice:
            self._keep(key, said, size)

    def _keep(self, key: tuple[str, str, str], chunks: Sequence[Chunk], size: int) -> None:
        if key in self._phrases:  # another call finished the same phrase first
            return
        self._phrases[key] = tuple(chunks)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._phrases.popitem(last=False)
            self._bytes -= sum(len(chunk) for chunk in evicted if isinstance(chunk, bytes))


def _voice(tts: TextToSpeech) -> str | None:
    return tts.voice_key if isinstance(tts, VoiceIdentity) else None
