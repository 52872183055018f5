"""The offline way of choosing an edge: the caller's words against each edge's keywords (or its DTMF digit).

Matching is deliberately forgiving of speech recognition: words are lowercased, stemmed, number words become
digits, and long words match near-misses ("appoint meant"). Numbers never do: a keyword holding a digit ("desk
731", "option 2") is heard only with those very digits, so a caller asking for extension 731 is not routed to 131.
An edge without keywords is matched on the content words of its label or condition ("Book / reschedule").

A branch may have thousands of keywords (a path may have 5,000 edges, each with its own), and the choice runs on the
event loop that carries every call's audio: the near-misses are found by rapidfuzz over the branch's vocabulary at
once (in C++), never word pair by word pair in Python, so a large branch costs milliseconds, not seconds, of every
other call's time. Its `ratio` is difflib's 2·M/T with M the longest common subsequence (difflib's matching blocks may
find fewer), so every near-miss difflib would accept is one here too.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from rapidfuzz import fuzz, process

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
    """Lowercase, drop punctuation, turn number words into digits and stem: the words the matcher compares.

    Numbers said digit by digit are one number ("seven three one", "73 1" -> "731"), as a recogniser writes an
    extension or an option either way."""
    lowered = text.lower().replace("'", "").replace("\u2019", "")
    for symbol, word in _SYMBOLS.items():
        lowered = lowered.replace(symbol, word)
    words: list[str] = []
    for raw in _NOT_WORD.sub(" ", lowered).split():
        word = _stem(_SYNONYMS.get(raw, _NUMBER_WORDS.get(raw, raw)))
        if word.isdigit() and words and words[-1].isdigit():
            words[-1] += word
        else:
            words.append(word)
    return words


@functools.lru_cache(maxsize=65_536)
def _keyword_phrase(keyword: str) -> tuple[str, ...]:
    """`normalize_words` of a keyword, kept: every call on a path normalizes the same keywords at each node."""
    return tuple(normalize_words(keyword))


def _fuzzy(word: str) -> bool:
    """Whether `word` may match a near-miss: long enough, and no digit in it."""
    return len(word) >= _FUZZY_MIN_LENGTH and not any(character.isdigit() for character in word)


def _near_misses(heard: Sequence[str], vocabulary: Sequence[str]) -> Iterable[tuple[int, str]]:
    """(index in `heard`, word of `vocabulary`) for each pair alike enough to count as one (both `_fuzzy`, and a
    ratio of at least `_FUZZY_RATIO`); `vocabulary` holds only `_fuzzy` words."""
    long_heard = [index for index, word in enumerate(heard) if _fuzzy(word)]
    if not long_heard or not vocabulary:
        return
    scores = process.cdist(
        [heard[index] for index in long_heard],
        vocabulary,
        scorer=fuzz.ratio,
        score_cutoff=_FUZZY_RATIO * 100 - 1e-6,  # as a float ratio of exactly 0.85 is kept
        dtype=np.float32,
        workers=1,
    )
    for row, column in zip(*np.nonzero(scores), strict=True):
        yield long_heard[row], vocabulary[column]


def _join_runs(words: Sequence[str]) -> list[str]:
    """Every run of 2 to `_MAX_JOINED_TOKENS` words joined (what a long word split by ASR looks like)."""
    return [
        "".join(words[start : start + count])
        for count in range(2, _MAX_JOINED_TOKENS + 1)
        for start in range(len(words) - count + 1)
    ]


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
    """Picks, among ways out (by key), the one whose keywords the caller's words hit most.

    A keyword phrase is heard when its words occur in order in what was heard, each the same word or, both being
    at least `_FUZZY_MIN_LENGTH` long with no digit, a near-miss; or when the phrase's words run together are the
    same as two or three heard words run together, or (at least that long, with no digit) a near-miss of them
    ("appoint meant").
    """

    def __init__(self, choices: Sequence[tuple[str, Sequence[str], str | None]]) -> None:
        """`choices`: (key, keywords, DTMF digit or None) in order; on a tie the first wins."""
        compiled: list[_Choice] = []
        for key, keywords, digit in choices:
            phrases = [_keyword_phrase(keyword) for keyword in keywords]
            if digit is not None:
                phrases.append(_keyword_phrase(digit))
            compiled.append(_Choice(key, tuple(phrase for phrase in phrases if phrase)))
        self._choices = compiled
        every = {phrase for choice in compiled for phrase in choice.phrases}
        self._vocabulary = sorted({word for phrase in every for word in phrase if _fuzzy(word)})
        self._joined = sorted({joined for phrase in every if _fuzzy(joined := "".join(phrase))})

    def choose(self, heard: str) -> str | None:
        """The key of the best-matching way out, or None when the words hit none."""
        words = normalize_words(heard)
        at: defaultdict[str, set[int]] = defaultdict(set)
        for index, word in enumerate(words):
            at[word].add(index)
        for index, word in _near_misses(words, self._vocabulary):
            at[word].add(index)
        runs = _join_runs(words)
        joined_heard = {*runs, *(joined for _, joined in _near_misses(runs, self._joined))}
        best: str | None = None
        best_score = (0, 0)
        for choice in self._choices:
            hits = [phrase for phrase in choice.phrases if _phrase_heard(phrase, at, joined_heard)]
            score = (len(hits), sum(len("".join(phrase)) for phrase in hits))
            if score > best_score:  # strictly better: on a tie the first keeps it
                best, best_score = choice.key, score
        return best


def _phrase_heard(phrase: Sequence[str], at: Mapping[str, set[int]], joined_heard: set[str]) -> bool:
    """Whether the phrase's words occur in order (`at`: where each word, or a near-miss of it, was heard), or its
    words run together are among `joined_heard` (heard words run together, and the near-misses of those)."""
    first, rest = phrase[0], phrase[1:]
    for start in at.get(first, ()):
        if all(start + offset in at.get(word, ()) for offset, word in enumerate(rest, 1)):
            return True
    return "".join(phrase) in joined_heard
