"""A simulated phone call: Twilio's part played against a running engine, from the signed webhook to the hang-up.

`simulate_call` posts the inbound voice webhook as Twilio does, follows the `<Connect><Stream>` TwiML onto the
media WebSocket and then behaves like Twilio's media server: 20 ms inbound frames in real time, the engine's
audio played from a FIFO at 8 bytes per ms, marks echoed when playback reaches them, `clear` honoured. A caller
script (`Say`, `PlayWav`, `Dtmf`, `Pause`, `HangUp`) decides what the caller does; `CallResult` keeps what was heard.

How it is used:

- Tests and benchmarks place a call with `simulate_call(base_url, to=..., from_=..., script=[Say("hello")])` and
  assert on the `CallResult` (what was heard, marks, clears) and on the rows the engine wrote.
- A fake Twilio that answers outbound calls reuses the pieces: `parse_twiml` reads the engine's TwiML,
  `request_signature` (engine.twilio.signature) signs the stream URL, and `StreamPeer` with `run_stream` plays the
  stream; `PlaybackQueue` alone is Twilio's playback buffer for peers of their own.
- The CLI's `dialtone call` is `add_call_command` and `run_call_command` (engine.simulator.command).

Modules: `script` (the caller's steps), `results`, `audio` (speech and WAV to μ-law), `twiml`, `peer` (the stream),
`call` (the webhook and the whole call), `command` (the CLI).
"""

from engine.simulator.audio import read_wav, synthesize_speech
from engine.simulator.call import simulate_call
from engine.simulator.command import add_call_command, run_call_command
from engine.simulator.peer import AGENT_DONE_SILENCE_MS, PROTOCOL_ERROR, PlaybackQueue, StreamPeer, run_stream
from engine.simulator.results import AgentUtterance, CallEnding, CallResult, MarkEcho, SimEvent, SimulationError
from engine.simulator.script import DropAudio, Dtmf, HangUp, Pause, PlayWav, Say, Step
from engine.simulator.twiml import Twiml, parse_twiml, resolve_stream_url

__all__ = [
    "AGENT_DONE_SILENCE_MS",
    "PROTOCOL_ERROR",
    "AgentUtterance",
    "CallEnding",
    "CallResult",
    "DropAudio",
    "Dtmf",
    "HangUp",
    "MarkEcho",
    "Pause",
    "PlayWav",
    "PlaybackQueue",
    "Say",
    "SimEvent",
    "SimulationError",
    "Step",
    "StreamPeer",
    "Twiml",
    "add_call_command",
    "parse_twiml",
    "read_wav",
    "resolve_stream_url",
    "run_call_command",
    "run_stream",
    "simulate_call",
    "synthesize_speech",
]
