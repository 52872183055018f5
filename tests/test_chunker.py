"""The sentence chunker: speak whole sentences early, never split abbreviations or decimals."""

from __future__ import annotations

from pipelines.conversation.chunking import SentenceChunker


def _chunk(deltas: list[str]) -> list[str]:
    chunker = SentenceChunker()
    out = [s for d in deltas for s in chunker.push(d)]
    tail = chunker.flush()
    return [*out, tail] if tail else out


def test_sentences_come_out_as_soon_as_the_next_one_starts() -> None:
    chunker = SentenceChunker()
    assert chunker.push("Hello there. How") == ["Hello there."]
    assert chunker.push(" are you? I") == ["How are you?"]
    assert chunker.flush() == "I"


def test_token_by_token_streaming_gives_the_same_sentences_as_one_piece() -> None:
    text = "Your appointment is on Tuesday at 3.5 p.m. sharp. Dr. Smith will see you! Anything else?"
    assert _chunk(list(text)) == _chunk([text])


def test_abbreviations_initials_and_decimals_do_not_end_a_sentence() -> None:
    assert _chunk(["Dr. Smith and J. R. Jones paid 3.5 dollars. Thanks."]) == [
        "Dr. Smith and J. R. Jones paid 3.5 dollars.",
        "Thanks.",
    ]


def test_a_long_sentence_is_cut_at_its_last_clause_mark() -> None:
    chunker = SentenceChunker(long_clause_chars=40)
    out = chunker.push("We have openings on Monday, Tuesday and Wednesday mornings, and also")
    assert out == ["We have openings on Monday, Tuesday and Wednesday mornings,"]


def test_newlines_end_sentences_and_empty_text_gives_nothing() -> None:
    assert _chunk(["First line\nSecond line"]) == ["First line", "Second line"]
    assert _chunk(["", "   "]) == []
