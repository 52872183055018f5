"""The text-to-speech seam: text in, μ-law 8 kHz audio out, streamed so playback starts early."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pipelines.errors import TTSError

__all__ = ["Alignment", "TTSError", "TextToSpeech", "VoiceIdentity"]


@dataclass(frozen=True, slots=True)
class Alignment:
    """When characters of the text start in the audio, so a barge-in can cut the transcript at the word heard.

    `chars` is a run of the text being spoken (consecutive alignments concatenate to the text as the vendor
    normalised it); `start_ms[i]` is when `chars[i]` starts, in milliseconds from the start of the audio of
    this `synthesize` call (not of the vendor's chunk).
    """

    chars: str
    start_ms: tuple[int, ...]


class TextToSpeech(Protocol):
    """A call's synthesizer."""

    def synthesize(self, text: str) -> AsyncIterator[bytes | Alignment]:
        """Speak one text (a sentence or clause) as μ-law 8 kHz chunks of any size; cancelling stops it.

        Synthesizers that know their timing also yield an `Alignment`, before or after the audio it describes.
        A cancelled synthesis never leaks its audio into a later one.
        """
        ...

    async def close(self) -> None:
        """Release what the synthesizer holds; idempotent."""
        ...


@runtime_checkable
class VoiceIdentity(Protocol):
    """A synthesizer that can name its voice: the same name, the same sound for the same text (see PhraseCache)."""

    @property
    def voice_key(self) -> str | None:
        """Vendor, account, voice, model, format and voice settings in one string; None while it has none."""
        ...
