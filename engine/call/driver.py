"""The seam between a call's lifecycle and its conversation: what a driver does, and what the call offers it.

`CallSession` owns what every call has (the stream, playback, recording, turns, timers, controls, the ending);
a `ConversationDriver` owns who listens, thinks and speaks: the pipeline driver (speech-to-text → language model
→ text-to-speech) or the speech-to-speech driver (OpenAI Realtime). The session calls the driver with the
caller's audio, keys and marks; the driver calls back through `CallHost` to play audio, write turns, and end or
transfer the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from config.agent import AgentConfiguration
from engine.call.live_events import CallEvents
from engine.call.outbound_audio import OutboundAudio, StreamTimeline
from engine.call.phases import CallPhase, PhaseEvent
from engine.call.turns import TurnLog
from media.twilio_stream import MarkFlushed, MarkPlayed, PlaybackClock
from pipelines.llm.base import EndCall, MessageRole, OptOut
from pipelines.paths.engine import PathEngine
from storage.do_not_call import DoNotCallSource
from storage.end_reasons import EndReason

DEFAULT_GOODBYE = "Thank you for calling. Goodbye."
TRANSFER_FAILED = "I'm sorry, I couldn't transfer your call right now."
TRANSFER_UNCONFIRMED = "I'm sorry, your transfer hasn't gone through yet. If it does, you'll be connected."
"""What the caller hears when Twilio did not confirm a transfer it may still make."""
DEFAULT_APOLOGY = "Sorry, I had a problem on my end. Could you say that again?"
"""What the caller hears when a provider fails in the middle of a reply and the next one takes over."""
HANGUP_GRACE_SECONDS = 5.0
"""How long the last words may take beyond their length, and how long Twilio has to confirm a hang-up."""


@dataclass(frozen=True, slots=True)
class TransferNotMade:
    """What a call does after a transfer that was not made: the words the caller hears, and whether it then ends."""

    words: str
    ends_call: bool = False


def transfer_not_made(
    config: AgentConfiguration, path: PathEngine | None, *, unconfirmed: bool = False
) -> TransferNotMade:
    """After a transfer that was not made (the agent's rules refused the number, Twilio did not redirect the call,
    or the credits could not pay for the leg), in every driver: the caller is told (TRANSFER_FAILED, or, when Twilio
    did not confirm a transfer it may still make, TRANSFER_UNCONFIRMED) and the call goes on. The path, if the
    transfer was its transfer node's, goes back to the node the call came from; a path that began with its transfer
    has nowhere to go on, and the call ends (PATH_END) after the agent's goodbye."""
    words = TRANSFER_UNCONFIRMED if unconfirmed else TRANSFER_FAILED
    if path is None or path.transfer_not_made():
        return TransferNotMade(words)
    return TransferNotMade(f"{words} {config.goodbye_sentence or DEFAULT_GOODBYE}", ends_call=True)


def end_call_reason(event: EndCall) -> tuple[EndReason, str | None]:
    """How a model's or a path's end of the call is recorded, in every driver: the path's end, or the agent's
    hang-up with the words it ended with (the model's, or why the path gave up) as the detail."""
    if event.reason == EndReason.PATH_END:
        return EndReason.PATH_END, None
    return EndReason.AGENT_HANGUP, event.reason or None


@dataclass(frozen=True, slots=True)
class CallContext:
    """What the session needs to know about its call."""

    call_log_id: str
    organization_id: str
    agent_id: str
    call_sid: str
    outbound: bool = False


def opt_out_source(event: OptOut) -> DoNotCallSource:
    """Where an opt-out came from, as the do-not-call list records it: the model's function, or a phrase heard."""
    return DoNotCallSource.OPT_OUT_MODEL if event.phrase is None else DoNotCallSource.OPT_OUT_PHRASE


class ConversationUnavailable(Exception):
    """A conversation driver cannot run this call; `reason` is the end reason, the message says why."""

    def __init__(self, reason: EndReason, detail: str) -> None:
        """`detail` says what failed (never quoting a key)."""
        super().__init__(detail)
        self.reason = reason


class ControlRefused(Exception):
    """A live control (a line to say, a message, a transfer) the call cannot carry out now; the message says why."""


class CallHost(Protocol):
    """What the call offers its conversation driver."""

    context: CallContext
    config: AgentConfiguration
    clock: Callable[[], float]
    audio: OutboundAudio
    timeline: StreamTimeline
    turns: TurnLog
    opened: asyncio.Event
    """Set once the conversation has opened (the agent's opening is under way, or the caller has the floor)."""
    live: CallEvents

    @property
    def playback(self) -> PlaybackClock:
        """Twilio's marks: what the caller has heard of each utterance."""
        ...

    @property
    def phase(self) -> CallPhase:
        """Where the call is."""
        ...

    def move(self, event: PhaseEvent) -> None:
        """Move the call's phase (InvalidSessionTransition if the move is illegal)."""
        ...

    def next_utterance_id(self) -> int:
        """A new id for an agent utterance (its marks carry it)."""
        ...

    def activity(self) -> None:
        """Someone spoke or was heard: the silence time-out starts over."""
        ...

    def caller_turn_ended(self) -> bool:
        """The caller finished a turn; True when it was the callee's greeting that opened the conversation (the
        driver then does not answer it: the opening is said instead)."""
        ...

    def spawn(self, work: Coroutine[Any, Any, None], role: str) -> asyncio.Task[None]:
        """Run part of the call as a task whose unexpected failure ends this call, never the engine."""
        ...

    async def hang_up(self, reason: EndReason, detail: str | None = None) -> None:
        """End the call from our side now (the driver has let the last words play)."""
        ...

    async def transfer(
        self, to: str, detail: str | None = None, *, asked: Mapping[str, Any] | None = None
    ) -> bool | None:
        """Hand the caller to `to`; False when that failed and the call goes on, None when Twilio did not confirm it
        (it may still make it; the call goes on meanwhile). `asked`: the arguments of the model's `transfer_call` that
        asked for it, whose tool.call event then tells what it came to too."""
        ...

    def fail(self, reason: EndReason, detail: str) -> None:
        """End the call FAILED: the conversation cannot go on."""
        ...

    async def hand_over(self, reason: EndReason, detail: str) -> None:
        """The driver is lost for good: its fallback takes the call over, or the call fails with `reason`."""
        ...

    async def record_opt_out(self, source: DoNotCallSource, reason: str) -> None:
        """Put the other party of the call on the organization's do-not-call list, naming this call (errors logged)."""
        ...


class ConversationDriver(Protocol):
    """Who listens, thinks and speaks in a call."""

    async def start(self) -> None:
        """Open the providers; raise a provider error (STTError, RealtimeUnavailable...) if the call cannot start."""
        ...

    def open(self) -> None:
        """The conversation opens: say the first sentence (or let the model greet, if the agent asks for that)."""
        ...

    def on_caller_audio(self, payload: bytes, at_ms: int) -> None:
        """One caller frame, stamped `at_ms` by Twilio: the audio path, cheap work only."""
        ...

    def on_caller_key(self, digit: str) -> None:
        """The caller pressed a key."""
        ...

    def on_mark(self, event: MarkPlayed | MarkFlushed) -> None:
        """Twilio played (or flushed) audio up to one of our marks."""
        ...

    @property
    def caller_speaking(self) -> bool:
        """Whether the caller is talking now (the silence time-out waits)."""
        ...

    @property
    def listening_closely(self) -> bool:
        """Whether something is decided on the caller's next frames, so each must be read as it lands; otherwise
        the call's socket is read a few frames at a time (engine.call.caller_reads). Asked after every frame."""
        ...

    async def interrupt(self, why: str) -> None:
        """Stop speaking now, keeping in the transcript what the caller heard; no reply follows."""
        ...

    async def say(self, text: str) -> None:
        """Speak `text` as it is and return once it was heard (or could not be, bounded)."""
        ...

    async def say_line(self, text: str, *, interrupt: bool) -> bool:
        """Speak `text` as an agent turn of its own: at once, cutting what the agent is saying (True when something
        was cut), or after its reply in progress (queued). Returns once the cut is made; the line plays on."""
        ...

    async def add_message(self, content: str, role: MessageRole) -> None:
        """Add a message to the model's context for its next reply (ControlRefused if the model takes none)."""
        ...

    async def close(self) -> None:
        """Close the providers (errors are logged, never raised)."""
        ...


DriverFactory = Callable[[CallHost], ConversationDriver]
"""Makes a call's conversation driver, given the call it runs in."""
