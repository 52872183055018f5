"""A reply's first piece is its first clause (after a minimum of words), the rest whole sentences."""

from __future__ import annotations

from pipelines.conversation.chunking import SentenceChunker
from tests.fakes.openai_chat import token_deltas


def pieces(text: str, chunker: SentenceChunker) -> list[str]:
    out: list[str] = []
    for delta in token_deltas(text):
        out += chunker.push(delta)
    tail = chunker.flush()
    return out + ([tail] if tail else [])


def test_the_first_clause_goes_out_alone_once_it_has_enough_words() -> None:
    text = "Sure, I can book that for you, and then we are done. Anything else, my friend?"
    assert pieces(text, SentenceChunker(first_clause_min_words=4)) == [
        "Sure, I can book that for you,",
        "and then we are done.",
        "Anything else, my friend?",
    ]


def test_the_first_clause_is_cut_as_soon_as_its_boundary_streams_in() -> None:
    chunker = SentenceChunker(first_clause_min_words=3)
    assert chunker.push("Of course, we have a table") == []
    assert chunker.push(",") == []  # the mark counts once whitespace follows it
    assert chunker.push(" at seven") == ["Of course, we have a table,"]
    assert chunker.push(" tonight. ") == ["at seven tonight."]


def test_a_first_sentence_that_ends_before_any_long_enough_clause_is_spoken_whole() -> None:
    assert pieces("Yes, we can. Tuesday, at ten, works.", SentenceChunker(first_clause_min_words=4)) == [
        "Yes, we can.",
        "Tuesday, at ten, works.",
    ]


def test_an_abbreviation_does_not_end_the_sentence_the_clause_is_looked_for_in() -> None:
    assert pieces("Dr. Smith, who you asked for, is in.", SentenceChunker(first_clause_min_words=3)) == [
        "Dr. Smith, who you asked for,",
        "is in.",
    ]


def test_only_the_configured_marks_end_a_clause() -> None:
    chunker = SentenceChunker(first_clause_min_words=2, clause_marks=";")
    assert pieces("Well, the ten o'clock is gone; the eleven is free.", chunker) == [
        "Well, the ten o'clock is gone;",
        "the eleven is free.",
    ]


def test_without_first_clause_the_first_piece_is_the_first_sentence() -> None:
    assert pieces("Sure, I can book that for you. Bye.", SentenceChunker()) == [
        "Sure, I can book that for you.",
        "Bye.",
    ]
