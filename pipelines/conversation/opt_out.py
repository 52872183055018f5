"""Hearing a callee ask not to be called again ("stop calling me", "take me off your list"), for the offline model.

Pure text matching: the words of an opt-out phrase, in order and next to each other, anywhere in what was heard.
The phrases are also vocabulary for the offline speech recogniser, so it can hear them at all.
"""

from __future__ import annotations

import re
from typing import Final

OPT_OUT_PHRASES: Final = (
    "stop calling me",
    "stop calling",
    "dont call me again",
    "do not call me again",
    "dont call me",
    "do not call",
    "take me off your list",
    "take me off the list",
    "remove me from your list",
    "remove me from the list",
    "unsubscribe",
)
"""What a callee says to opt out, in the words `heard_words` gives (lower case, no apostrophes)."""

RECOGNIZER_PHRASES: Final = ("stop calling me", "unsubscribe")
"""The opt-out phrases added to an offline recognizer's vocabulary: only the two most distinctive. More words in a
path's small vocabulary pull other speech towards them: with "do not call" "tuesday" was heard as "do the you",
with "remove me from your list" as "two remove" (the other phrases are still matched when the words are heard)."""

_NOT_WORD: Final = re.compile(r"[^a-z0-9]+")
_PHRASE_WORDS: Final = tuple((phrase, tuple(phrase.split())) for phrase in OPT_OUT_PHRASES)


def heard_words(text: str) -> list[str]:
    """Lower-case words without punctuation; "don't" becomes "dont"."""
    return _NOT_WORD.sub(" ", text.lower().replace("'", "").replace("\u2019", "")).split()


def opt_out_phrase(text: str | None) -> str | None:
    """The opt-out phrase `text` contains (the first of OPT_OUT_PHRASES that matches), or None."""
    if not text:
        return None
    words = heard_words(text)
    for phrase, wanted in _PHRASE_WORDS:
        size = len(wanted)
        if any(tuple(words[start : start + size]) == wanted for start in range(len(words) - size + 1)):
            return phrase
    return None
