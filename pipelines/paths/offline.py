"""The offline way of choosing an edge: the caller's words against each edge's keywords (or its DTMF digit).

Matching is deliberately forgiving of speech recognition: words are lowercased, stemmed, number words become
digits, and long words match near-misses ("appoint meant"). An edge without keywords is matched on the content
words of its label or condition ("Book / reschedule").
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pipelines.paths.graph import Edge

__all__ = ["KeywordChooser", "edge_keywords", "normalize_words"]

_NUMBER_WORDS: Final = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
}
# Spoken yes/no variants recognisers return; mapped on both sides, so a keyword "yeah" still matches "yeah".
_SYNONYMS: Final = {
    "yeah": "yes",
    "yep": "yes",
    "yup": "yes",
    "yea": "yes",
    "sure": "yes",
    "ok": "yes",
    "okay": "yes",
    "nope": "no",
    "nah": "no",
}
_STOPWORDS: Final = frozenset(
    {
        *("a", "an", "the", "to", "of", "and", "or", "for", "in", "on", "at", "is", "are", "be", "it", "this"),
        *("i", "me", "my", "you", "your", "we", "our", "that", "with", "please", "want", "wants", "would", "like"),
        *("caller", "says", "say", "asks", "ask"),
    }
)
_SYMBOLS: Final = {"#": " pound ", "*": " star "}
_NOT_WORD = re.compile(r"[^a-z0-9]+")
_LABEL_SEPARATORS = re.compile(r"[,;/|]|\bor\b")
_FUZZY_MIN_LENGTH: Final = 5
_FUZZY_RATIO: Final = 0.85
_MAX_JOINED_TOKENS: Final = 3


def _stem(word: str) -> str:
    # Just enough to make "appointments", "booking" and "opened" meet their keywords; both sides get the same.
    if len(word) <= 3 or word.isdigit():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("sses"):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if word.endswith("ing") and len(word) > 5:
        return word[:-3]
    if word.endswith("ed") and len(word) > 4:
        return word[:-2]
    return word


def normalize_words(text: str) -> list[str]:
    """Lowercase, drop punctuation, turn number words into digits and stem: the words the matcher compares."""
    lowered = text.lower().replace("'", "").replace("\u2019", "")
    for symbol, word in _SYMBOLS.items():
        lowered = lowered.replace(symbol, word)
    words = _NOT_WORD.sub(" ", lowered).split()
    return [_stem(_SYNONYMS.get(word, _NUMBER_WORDS.get(word, word))) for word in words]


def _similar(keyword: str, heard: str) -> bool:
    if keyword == heard:
        return True
    if len(keyword) < _FUZZY_MIN_LENGTH or len(heard) < _FUZZY_MIN_LENGTH:
        return False
    return difflib.SequenceMatcher(None, keyword, heard, autojunk=False).ratio() >= _FUZZY_RATIO


def _phrase_heard(keyword: Sequence[str], heard: Sequence[str]) -> bool:
    """Whether the keyword's words occur in order in what was heard, allowing a long word to be split by ASR."""
    size = len(keyword)
    for start in range(len(heard) - size + 1):
        if all(_similar(word, heard[start + offset]) for offset, word in enumerate(keyword)):
            return True
    joined = "".join(keyword)
    if len(joined) < _FUZZY_MIN_LENGTH:
        return False
    for start in range(len(heard)):
        for count in range(2, _MAX_JOINED_TOKENS + 1):
            if start + count <= len(heard) and _similar(joined, "".join(heard[start : start + count])):
                return True
    return False


def edge_keywords(edge: Edge) -> tuple[str, ...]:
    """The edge's keywords; without any, the content words of its label (or condition), one keyword each."""
    if edge.keywords:
        return edge.keywords
    return label_keywords(edge.label or edge.condition)


def label_keywords(label: str) -> tuple[str, ...]:
    """The content words of a label ("Billing question / invoice" -> billing, question, invoice)."""
    words: list[str] = []
    for phrase in _LABEL_SEPARATORS.split(label.lower()):
        for word in _NOT_WORD.sub(" ", phrase).split():
            if word not in _STOPWORDS and word not in words:
                words.append(word)
    return tuple(words)


@dataclass(frozen=True, slots=True)
class _Choice:
    key: str
    phrases: tuple[tuple[str, ...], ...]


class KeywordChooser:
    """Picks, among ways out (by key), the one whose keywords the caller's words hit most."""

    def __init__(self, choices: Sequence[tuple[str, Sequence[str], str | None]]) -> None:
        """`choices`: (key, keywords, DTMF digit or None) in order; on a tie the first wins."""
        compiled: list[_Choice] = []
        for key, keywords, digit in choices:
            phrases = [tuple(normalize_words(keyword)) for keyword in keywords]
            if digit is not None:
                phrases.append(tuple(normalize_words(digit)))
            compiled.append(_Choice(key, tuple(phrase for phrase in phrases if phrase)))
        self._choices = compiled

    def choose(self, heard: str) -> str | None:
        """The key of the best-matching way out, or None when the words hit none."""
        words = normalize_words(heard)
        best: str | None = None
        best_score = (0, 0)
        for choice in self._choices:
            hits = [phrase for phrase in choice.phrases if _phrase_heard(phrase, words)]
            score = (len(hits), sum(len("".join(phrase)) for phrase in hits))
            if score > best_score:  # strictly better: on a tie the first keeps it
                best, best_score = choice.key, score
        return best
