"""What a simulated call reports: how it ended, what the caller heard, every mark and clear, a log of events."""

from __future__ import annotations

import enum
import wave
from dataclasses import dataclass, field
from pathlib import Path

from media.g711 import BYTES_PER_MS, SAMPLE_RATE, ulaw_to_pcm16

__all__ = ["AgentUtterance", "CallEnding", "CallResult", "MarkEcho", "SimEvent", "SimulationError"]


class SimulationError(Exception):
    """The simulated call could not be placed (engine unreachable, unusable TwiML, unreadable audio)."""


class CallEnding(enum.Enum):
    """How the simulated call ended."""

    CALLER_HUNG_UP = "caller hung up"
    ENGINE_CLOSED = "engine closed the stream"
    TIMEOUT = "timed out"
    REFUSED = "refused by the webhook"
    PROTOCOL_ERROR = "protocol error"


@dataclass(frozen=True, slots=True)
class SimEvent:
    """One line of the call's log: seconds since the webhook, who, and what."""

    at: float
    who: str
    text: str

    def __str__(self) -> str:
        """The log line, e.g. `[00:01.20] caller: hello`."""
        minutes, seconds = divmod(self.at, 60)
        return f"[{int(minutes):02d}:{seconds:05.2f}] {self.who}: {self.text}"


@dataclass(slots=True)
class AgentUtterance:
    """A run of agent audio the caller heard, between silences; `cleared` when a `clear` cut it."""

    started_at: float
    ended_at: float
    audio: bytearray = field(default_factory=bytearray)
    cleared: bool = False

    @property
    def duration_s(self) -> float:
        """Seconds of agent audio played."""
        return len(self.audio) / (BYTES_PER_MS * 1000)


@dataclass(frozen=True, slots=True)
class MarkEcho:
    """A mark sent back to the engine: `flushed` when a `clear` released it rather than playback."""

    name: str
    at: float
    flushed: bool


@dataclass(slots=True)
class CallResult:
    """Everything the simulated caller saw of the call."""

    call_sid: str
    account_sid: str
    stream_sid: str
    webhook_status: int = 0
    twiml: str = ""
    stream_url: str | None = None
    custom_parameters: dict[str, str] = field(default_factory=dict)
    refusal: str | None = None
    ending: CallEnding | None = None
    close_code: int | None = None
    utterances: list[AgentUtterance] = field(default_factory=list)
    marks: list[MarkEcho] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    dtmf_sent: list[str] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)
    events: list[SimEvent] = field(default_factory=list)
    heard: bytearray = field(default_factory=bytearray)
    media_frames_sent: int = 0

    @property
    def call_log_id(self) -> str | None:
        """The engine's CallLog id, from the stream's `callLogId` Parameter."""
        return self.custom_parameters.get("callLogId")

    @property
    def marks_played(self) -> list[str]:
        """Names of marks echoed because playback reached them."""
        return [mark.name for mark in self.marks if not mark.flushed]

    @property
    def marks_flushed(self) -> list[str]:
        """Names of marks echoed at once because a `clear` dropped the audio before them."""
        return [mark.name for mark in self.marks if mark.flushed]

    def save_heard(self, path: Path | str) -> None:
        """Write what the caller heard (agent audio and the silences between) as a 16-bit 8 kHz mono WAV."""
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(ulaw_to_pcm16(bytes(self.heard)).tobytes())
