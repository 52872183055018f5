"""The text-to-speech seam: text in, μ-law 8 kHz audio out, streamed so playback starts early."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class TTSError(Exception):
    """The synthesizer failed to speak a text."""


class TextToSpeech(Protocol):
    """A call's synthesizer."""

    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """Speak one text (a sentence or clause) as μ-law 8 kHz chunks of any size; cancelling stops it."""
        ...

    async def close(self) -> None:
        """Release what the synthesizer holds; idempotent."""
        ...
