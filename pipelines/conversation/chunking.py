"""Cuts a streamed reply into sentences to speak, so speech starts before the model has finished; the first piece
may be a clause, so that speech starts before the first sentence has finished too."""

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
CLAUSE_MARKS = ",;:\u2014\u2013"
"""Comma, semicolon, colon, em and en dashes: where a clause ends when whitespace follows."""
_CLAUSE = re.compile(f"[{CLAUSE_MARKS}](?=\\s)")


class SentenceChunker:
    """Feed text deltas with `push`; get whole sentences back as soon as they are complete.

    A period ends a sentence only when whitespace follows it and the word before it is not an abbreviation
    ("Dr.") or an initial ("J."); "3.5" never splits, since no space follows its period. A sentence still
    open after `long_clause_chars` characters is cut at its last clause mark (comma, semicolon, colon,
    dash), so a long first sentence starts playing early.

    With `first_clause_min_words`, the reply's first piece is its first clause instead: the text up to the first
    clause mark (one of `clause_marks`, followed by whitespace) that has at least that many words before it, if
    one comes before the first sentence ends. Later pieces are whole sentences again.
    """

    def __init__(
        self,
        *,
        long_clause_chars: int = 120,
        first_clause_min_words: int | None = None,
        clause_marks: str = CLAUSE_MARKS,
    ) -> None:
        """Create a chunker; `long_clause_chars` bounds how much text waits for a sentence end;
        `first_clause_min_words` (None: off) lets the first piece be a clause of at least that many words."""
        self._buffer = ""
        self._long = long_clause_chars
        self._first_clause_min_words = first_clause_min_words
        self._first_clause = re.compile(f"[{re.escape(clause_marks)}](?=\\s)") if first_clause_min_words else None
        self._started = False

    def push(self, delta: str) -> list[str]:
        """Add text; return the sentences (or long clauses, or the first clause) it completed, trimmed, in order."""
        self._buffer += delta
        ready: list[str] = []
        if not self._started:
            first = self._take_first_clause()
            if first:
                ready.append(first)
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
        self._started = self._started or bool(ready)
        return ready

    def _take_first_clause(self) -> str | None:
        """The reply's first clause, cut from the buffer, if it is complete before the first sentence is."""
        if self._first_clause is None or self._first_clause_min_words is None:
            return None
        sentence_end = next(
            (
                match.start()
                for match in _BOUNDARY.finditer(self._buffer)
                if not (match.group().startswith(".") and self._is_abbreviation(self._buffer[: match.start()]))
            ),
            len(self._buffer),
        )
        for match in self._first_clause.finditer(self._buffer, 0, sentence_end):
            clause = self._buffer[: match.end()]
            if len(clause.split()) >= self._first_clause_min_words:
                self._buffer = self._buffer[match.end() :]
                return clause.strip()
        return None

    def flush(self) -> str | None:
        """The text still held (the reply's last sentence), or None."""
        rest, self._buffer = self._buffer.strip(), ""
        self._started = self._started or bool(rest)
        return rest or None

    @staticmethod
    def _is_abbreviation(text: str) -> bool:
        words = text.split()
        if not words:
            return False
        last = words[-1].lower().lstrip("(\"'")
        return last in ABBREVIATIONS or (len(last) == 1 and last.isalpha())
