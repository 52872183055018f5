"""What the caller heard of an utterance cut short: by alignment, by an even spread, and by the call's speaking rate."""

from __future__ import annotations

from pipelines.conversation.heard import (
    DEFAULT_MS_PER_CHAR,
    SpeakingRate,
    SpokenSpan,
    heard_of_spans,
    share_of_words,
)


def span(text: str, start_ms: int, end_ms: int, *, complete: bool = True) -> SpokenSpan:
    return SpokenSpan(text, start_ms, end_ms, complete=complete)


def test_sentences_played_through_are_heard_whole_and_the_cut_one_in_proportion() -> None:
    spans = [span("Hello there.", 0, 1000), span("We open at nine on weekdays.", 1000, 3000)]

    assert heard_of_spans(spans, 2000) == "Hello there. We open at"


def test_nothing_is_heard_before_the_first_sentence_starts_playing() -> None:
    assert heard_of_spans([span("Hello there.", 0, 1000)], 0) == ""


def test_alignment_cuts_between_whole_words_dropping_the_word_cut_in_half() -> None:
    text = "We open at nine"
    aligned = span(text, 1000, 2000)
    aligned.aligned_chars = list(text)
    aligned.aligned_ms = [i * 50 for i in range(len(text))]  # 50 ms per character

    # 520 ms into the span: characters 0..10 started ("We open at "), the "n" of nine not yet.
    assert heard_of_spans([aligned], 1520) == "We open at"
    # 560 ms: "We open at n" started; "nine" was cut in half and is not counted.
    assert heard_of_spans([aligned], 1560) == "We open at"


def test_a_sentence_still_synthesizing_is_given_the_calls_speaking_rate() -> None:
    # Only 200 ms of its audio has been sent so far; at 40 ms a character its 20 characters last 800 ms.
    growing = span("one two three fourr.", 0, 200, complete=False)

    assert heard_of_spans([growing], 400, ms_per_char=40) == "one two"


def test_a_share_of_the_audio_is_the_same_share_of_the_words() -> None:
    assert share_of_words("a b c d e f g h i j", 300, 1000) == "a b c"
    assert share_of_words("a b c", 5000, 1000) == "a b c"
    assert share_of_words("a b c", 100, 0) == ""


def test_the_speaking_rate_is_learned_from_completed_sentences() -> None:
    rate = SpeakingRate()
    assert rate.ms_per_char == DEFAULT_MS_PER_CHAR

    rate.add("1234567890", 500)
    rate.add("12345", 400)

    assert rate.ms_per_char == 60
