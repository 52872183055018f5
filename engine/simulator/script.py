"""The caller's script: what a simulated caller does, step by step (`Say`, `PlayWav`, `Dtmf`, `Pause`, `HangUp`).

`DropAudio` is Twilio's doing rather than the caller's: a stretch of inbound audio that never arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DropAudio", "Dtmf", "HangUp", "Pause", "PlayWav", "Say", "Step"]


@dataclass(frozen=True, slots=True)
class Say:
    """The caller speaks `text` (eSpeak NG); waits for the agent to finish, or barges in `barge_in_after_ms`."""

    text: str
    barge_in_after_ms: int | None = None
    voice: str = "en-us"


@dataclass(frozen=True, slots=True)
class PlayWav:
    """The caller plays a mono 16-bit WAV file; waits for the agent like `Say`."""

    path: Path | str
    barge_in_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Dtmf:
    """The caller presses keys, one `dtmf` event per digit; waits for the agent to finish first."""

    digits: str


@dataclass(frozen=True, slots=True)
class Pause:
    """The caller stays silent for `ms` milliseconds."""

    ms: int


@dataclass(frozen=True, slots=True)
class DropAudio:
    """Twilio loses `ms` of the caller's audio (its warning 31930): the next frame's chunk and timestamp skip ahead."""

    ms: int


@dataclass(frozen=True, slots=True)
class HangUp:
    """The caller hangs up at once: `stop`, then the socket closes with 1000."""


Step = Say | PlayWav | Dtmf | Pause | DropAudio | HangUp
