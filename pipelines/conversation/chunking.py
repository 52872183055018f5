"""Cuts a streamed reply into sentences to speak, so speech starts before the model has finished."""

from __future__ import annotations

import re

# Words whose trailing period does not end a sentence.
ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "mt",
        "ft",
        "vs",
        "etc",
        "e.g",
        "i.e",
        "approx",
        "dept",
        "est",
        "inc",
        "ltd",
        "co",
        "corp",
        "no",
        "nos",
        "vol",
        "fig",
        "am",
        "pm",
        "a.m",
        "p.m",
    ]
)
_BOUNDARY = re.compile(r"[.!?…]+[\"')\]]*(?=\s)|\n+")
_CLAUSE = re.compile("[,;:\u2014\u2013](?=\\s)")  # comma, semicolon, colon, em and en dashes


class SentenceChunker:
    """Feed text deltas with `push`; get whole sentences back as soon as they are complete.

    A period ends a sentence only when whitespace follows it and the word before it is not an abbreviation
    ("Dr.") or an initial ("J."); "3.5" never splits, since no space follows its period. A sentence still
    open after `long_clause_chars` characters is cut at its last clause mark (comma, semicolon, colon,
    dash), so a long first sentence starts playing early.
    """

    def __init__(self, *, long_clause_chars: int = 120) -> None:
        """Create a chunker; `long_clause_chars` bounds how much text waits for a sentence end."""
        self._buffer = ""
        self._long = long_clause_chars

    def push(self, delta: str) -> list[str]:
        """Add text; return the sentences (or long clauses) it completed, trimmed, in order."""
        self._buffer += delta
        ready: list[str] = []
        start = 0
        for match in _BOUNDARY.finditer(self._buffer):
            end = match.end()
            if match.group().startswith(".") and self._is_abbreviation(self._buffer[start : match.start()]):
                continue
            sentence = self._buffer[start:end].strip()
            if sentence:
                ready.append(sentence)
            start = end
        self._buffer = self._buffer[start:]
        if len(self._buffer) > self._long:
            clauses = list(_CLAUSE.finditer(self._buffer))
            if clauses:
                cut = clauses[-1].end()
                ready.append(self._buffer[:cut].strip())
                self._buffer = self._buffer[cut:]
        return ready

    def flush(self) -> str | None:
        """The text still held (the reply's last sentence), or None."""
        rest, self._buffer = self._buffer.strip(), ""
        return rest or None

    @staticmethod
    def _is_abbreviation(text: str) -> bool:
        words = text.split()
        if not words:
            return False
        last = words[-1].lower().lstrip("(\"'")
        return last in ABBREVIATIONS or (len(last) == 1 and last.isalpha())
