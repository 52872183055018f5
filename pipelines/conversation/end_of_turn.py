"""Whether the caller's words so far read as a finished turn: the semantic end-of-turn rule.

A pause is not an end of turn when the words before it are clearly unfinished. A recognizer that punctuates
(Deepgram with `punctuate` or `smart_format`) ends a finished sentence with `.`, `?` or `!` (or an ellipsis, which
reads as trailing off); without one, the words are unfinished. With or without punctuation, words ending in a
conjunction, a preposition, an article, a possessive or a filler ("and", "to", "the", "my", "um") are unfinished:
nobody ends a turn on them. Such turns are confirmed only after the agent's longer "incomplete sentence" silence
(`endpointing.incomplete_silence_ms`); finished ones at the recognizer's own end of turn.

Pure functions, no state: the driver asks on each end of turn and on its silence timer.
"""

from __future__ import annotations

from typing import Final

from pipelines.conversation.turn_taking import words_of

__all__ = ["UNFINISHED_ENDINGS", "looks_finished", "same_words", "without_taken"]

_CONJUNCTIONS = "and or but nor because although though unless whereas than"
_PREPOSITIONS = "to of for with from at into onto between through during without toward towards via per"
_DETERMINERS = "a an the my your our their every"
_FILLERS = "um uh er erm uhm hmm i'm i'd i'll we're you're they're it's"

UNFINISHED_ENDINGS: Final = frozenset(" ".join((_CONJUNCTIONS, _PREPOSITIONS, _DETERMINERS, _FILLERS)).split())
"""Last words after which a sentence cannot be over."""

_TERMINAL = (".", "?", "!", "…")
_TRAILING = "\"')]"


def looks_finished(text: str, *, punctuated: bool) -> bool:
    """Whether `text` (the caller's turn so far) reads as finished.

    `punctuated`: the recognizer adds sentence punctuation, so a finished sentence ends with one of `.?!…`.
    """
    words = words_of(text)
    if not words:
        return False
    if words[-1] in UNFINISHED_ENDINGS:
        return False
    if punctuated:
        return text.rstrip().rstrip(_TRAILING).endswith(_TERMINAL)
    return True


def same_words(first: str, second: str) -> bool:
    """Whether two transcripts say the same words (case and punctuation aside): a reply to one answers the other."""
    return words_of(first) == words_of(second)


def without_taken(text: str, taken: list[str]) -> str:
    """`text` (a recognizer's end of turn) without its first words when they are `taken` (words, as `words_of`
    gives them, that an earlier turn already took: the silence ended that turn before the recognizer did)."""
    if not taken:
        return text
    tokens = text.split()
    for cut in range(len(tokens) + 1):
        said = words_of(" ".join(tokens[:cut]))
        if said == taken:
            return " ".join(tokens[cut:])
        if len(said) > len(taken):
            break
    return text
