"""The speech-to-text seam: one streaming recognizer per call, μ-law 8 kHz in, transcript events out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pipelines.errors import STTError

__all__ = [
    "MAX_REPLAY_MS",
    "EndOfTurn",
    "FinalizesEarly",
    "STTError",
    "STTEvent",
    "SpeechStarted",
    "SpeechToText",
    "TranscriptUpdate",
]

MAX_REPLAY_MS = 30_000
"""The most of a caller's unconfirmed speech a recognizer hears again in one piece (240 KB of μ-law): a Deepgram
socket replacing a dropped one, a fallback recognizer taking over a turn in progress. Of a longer stretch, the last
this much; every recognizer takes this much at once."""


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The recognizer heard the caller start speaking (feeds barge-in)."""

    at_ms: int


@dataclass(frozen=True, slots=True)
class TranscriptUpdate:
    """Words recognized so far in the caller's current turn; `is_final` once they will not change.

    `finalized` marks the answer to `FinalizesEarly.finalize_now()`: the words of the speech up to now, possibly
    empty (nothing new was said). When `is_final` is false as well, they are provisional: the recognizer will say
    them again in its end of turn.
    """

    text: str
    is_final: bool
    at_ms: int
    finalized: bool = False


@dataclass(frozen=True, slots=True)
class EndOfTurn:
    """The recognizer judges the caller's turn over; `text` is the turn's whole final transcript."""

    text: str
    at_ms: int


STTEvent = SpeechStarted | TranscriptUpdate | EndOfTurn


class SpeechToText(Protocol):
    """A call's streaming recognizer. Times (`at_ms`) are milliseconds of caller audio since the stream began."""

    async def start(self) -> None:
        """Open the recognizer (connect, take a decoder); raise STTError if it cannot."""
        ...

    def send_audio(self, ulaw: bytes, *, voiced: bool = True) -> None:
        """Queue one chunk of caller audio (μ-law 8 kHz); never blocks, called on every 20 ms frame.

        `voiced` is the engine's VAD's verdict on the chunk. A recognizer may hold voiced audio and silence far
        from speech back to send it in larger batches (no end of turn waits on it), never the silence that
        follows speech: a silent chunk sends whatever voiced audio was held back with it.
        """
        ...

    def events(self) -> AsyncIterator[STTEvent]:
        """The recognizer's events, in order, until it is closed."""
        ...

    async def close(self) -> None:
        """Flush and release everything; idempotent."""
        ...


@runtime_checkable
class FinalizesEarly(Protocol):
    """A recognizer that can be asked for the final words of the speech so far, before its own end of turn."""

    @property
    def punctuates(self) -> bool:
        """Whether its final transcripts carry sentence punctuation (a finished sentence ends with `.?!`)."""
        ...

    def finalize_now(self) -> None:
        """Ask for the final words of the speech so far; they come as one `TranscriptUpdate` with `finalized`.

        The recognizer's own end of turn still comes later, as an `EndOfTurn`, unless the caller speaks on.
        """
        ...


@runtime_checkable
class PromptSilence(Protocol):
    """A recognizer that wants part of the silence after the caller's speech frame by frame (its end of turn is
    decided on it)."""

    @property
    def prompt_silence_ms(self) -> tuple[int, int]:
        """From when to when after the caller's last voiced frame (ms) the recognizer wants each frame as it comes."""
        ...
