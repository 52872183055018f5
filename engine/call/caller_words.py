"""The caller's words of the turn in progress, as the recognizer finalizes them, and when they make a turn.

Final words gather until an end of turn: the recognizer's (its whole turn's words replace those gathered) or the
VAD's silence. Words that are clearly unfinished (pipelines.conversation.end_of_turn) are held instead, until the
agent's longer "incomplete sentence" silence or the caller's next words; a held turn's words lead the next one.
When the silence takes a turn before the recognizer ends it, the recognizer's later end of turn repeats those
words: they are cut from it, so a turn is never answered twice. A fallback recognizer taking over mid-call hears the
caller's audio since the last turn taken again: its words replace the failed one's for that audio.
"""

from __future__ import annotations

from pipelines.conversation.end_of_turn import looks_finished, without_taken
from pipelines.conversation.turn_taking import words_of

__all__ = ["CallerWords"]


class CallerWords:
    """One call's caller words awaiting an end of turn (sans I/O: the pipeline driver feeds it and asks it)."""

    def __init__(self) -> None:
        """Nothing heard yet."""
        self._pending: list[str] = []
        # Unfinished words awaiting silence, their end, and how many of them (the last) the recognizer has not ended
        # its turn on yet: its end of turn will say those again.
        self._held: tuple[list[str], int, int] | None = None
        self._unended: list[str] = []  # final words since the recognizer's last end of turn
        self._taken_early: list[str] = []  # words of those a turn took on silence, before the recognizer ended it

    @property
    def waiting(self) -> bool:
        """Whether final words wait for an end of turn."""
        return bool(self._pending)

    @property
    def held_end_ms(self) -> int | None:
        """Where the held unfinished words ended on the stream, if words are held."""
        return self._held[1] if self._held is not None else None

    def final(self, text: str) -> None:
        """The recognizer's final words (they will not change)."""
        if text.strip():
            self._pending.append(text.strip())
            self._unended.append(text.strip())

    def recognizer_ended(self, text: str) -> None:
        """The recognizer's end of turn, with its whole turn's words (which replace the finals gathered)."""
        self._unended.clear()
        text, self._taken_early = without_taken(text, self._taken_early).strip(), []
        if text:
            self._pending = [*self._held_ended(), text]
            if self._held is not None:
                self._held = (list(self._pending), self._held[1], 0)

    def recognizer_switched(self) -> None:
        """Another recognizer took over mid-call, hearing again the caller's audio since the last turn taken: the
        words the failed one finalized since then will come again from the new one (its own words), and the words
        taken early it will never repeat in an end of turn."""
        unended = len(self._unended)
        if unended:
            del self._pending[-unended:]
        self._unended.clear()
        self._taken_early = []
        if self._held is not None:
            held = self._held_ended()
            self._held = (held, self._held[1], 0) if held else None

    def _held_ended(self) -> list[str]:
        """The held words the recognizer's end of turn will not say again (it ended its turn on them)."""
        if self._held is None:
            return []
        words, _, unended = self._held
        return words[: len(words) - unended]

    def so_far(self, provisional: str = "") -> str:
        """The turn's words so far, with `provisional` ones the recognizer will say again."""
        return " ".join([*self._pending, provisional.strip()]).strip()

    def finished(self, *, punctuated: bool) -> bool:
        """Whether the words so far read as a finished turn (see pipelines.conversation.end_of_turn)."""
        text = self.so_far()
        return not text or looks_finished(text, punctuated=punctuated)

    def hold(self, end_ms: int) -> None:
        """The words so far are unfinished: keep them for the longer silence or the caller's next words."""
        self._held = (list(self._pending), end_ms, len(self._unended))

    def take(self, *, by_recognizer: bool) -> str:
        """The turn's words, now a turn; `by_recognizer` false when the silence ended it before the recognizer."""
        if not by_recognizer:  # the recognizer will end its turn later, repeating these words: they are taken
            self._taken_early += words_of(" ".join(self._unended))
            self._unended.clear()
        text = self.so_far()
        self._pending.clear()
        self._held = None
        return text
