"""When the caller's speech makes the agent stop talking: barge-in by overlap and by words, and backchannels.

Fed one verdict per caller frame (voiced or not) while the agent speaks, and the recognizer's interim words. The
agent yields when the caller has spoken over it for `threshold_ms` (pauses shorter than `OVERLAP_RESET_MS` do not
restart the count), or when the recognizer heard at least `min_words` words that are not all backchannels
("uh-huh", "yeah"): acknowledgements said while listening are not interruptions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

OVERLAP_RESET_MS = 240
"""A pause this long between the caller's sounds starts a new count toward barge-in."""

_PUNCTUATION = ".,!?;:\"'"


def words_of(text: str) -> list[str]:
    """The words of `text`, lower-cased, without the punctuation recognizers attach to them."""
    return [word for word in (raw.strip(_PUNCTUATION).lower() for raw in text.split()) if word]


@dataclass(slots=True)
class BargeInPolicy:
    """Decides when the caller has taken the floor from the agent. One per call; holds the overlap count."""

    enabled: bool = True
    threshold_ms: int = 300
    min_words: int = 1
    backchannel_words: frozenset[str] = field(default_factory=frozenset)
    _overlap_ms: int = 0
    _overlap_silence_ms: int = 0

    @classmethod
    def of(cls, *, enabled: bool, threshold_ms: int, min_words: int, backchannel_words: Iterable[str]) -> BargeInPolicy:
        """A policy from an agent's interruption settings."""
        return cls(enabled, threshold_ms, min_words, frozenset(word.lower() for word in backchannel_words))

    def reset(self) -> None:
        """Forget the overlap counted so far (the agent stopped talking, or yielded)."""
        self._overlap_ms = self._overlap_silence_ms = 0

    def frame(self, *, voiced: bool, caller_speaking: bool, agent_speaking: bool, frame_ms: int = 20) -> bool:
        """Count one caller frame; True when the caller's speech over the agent has reached the threshold.

        `voiced` is this frame's verdict; `caller_speaking` the VAD's state (speech started and not yet stopped), so
        the tail of the caller's own turn, heard before the agent started talking, does not count.
        """
        if not agent_speaking:
            self._overlap_ms = self._overlap_silence_ms = 0
            return False
        if voiced:
            self._overlap_ms += frame_ms
            self._overlap_silence_ms = 0
        else:
            self._overlap_silence_ms += frame_ms
            if self._overlap_silence_ms >= OVERLAP_RESET_MS:
                self._overlap_ms = 0
        return self.enabled and caller_speaking and self._overlap_ms >= self.threshold_ms

    @property
    def overlap_ms(self) -> int:
        """Caller speech counted over the agent so far."""
        return self._overlap_ms

    def words_interrupt(self, text: str) -> bool:
        """Whether interim words heard while the agent talks take the floor (enough words, not only backchannels)."""
        if not self.enabled:
            return False
        meaningful = [word for word in words_of(text) if word not in self.backchannel_words]
        return len(meaningful) >= self.min_words

    def is_backchannel(self, text: str) -> bool:
        """Whether a whole caller turn only acknowledged the agent ("uh-huh", "okay") and is not a turn to answer."""
        words = words_of(text)
        return bool(words) and all(word in self.backchannel_words for word in words)
