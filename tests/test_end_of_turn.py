"""The semantic end-of-turn rule, and the pause counter the driver speculates on."""

from __future__ import annotations

import pytest

from engine.call.caller_words import CallerWords
from engine.call.speculation import RESUME_MS, CallerPause
from pipelines.conversation.end_of_turn import looks_finished, same_words, without_taken


@pytest.mark.parametrize(
    "text",
    ["I would like to book a table for two.", "Can you call me back?", "Yes!", "Hello.", 'See you then."', "Well…"],
)
def test_a_punctuated_sentence_with_its_end_mark_is_finished(text: str) -> None:
    assert looks_finished(text, punctuated=True)


@pytest.mark.parametrize("text", ["I would like to", "My name is John", "Yes", "", "   "])
def test_without_an_end_mark_a_punctuating_recognizer_s_words_are_unfinished(text: str) -> None:
    assert not looks_finished(text, punctuated=True)


@pytest.mark.parametrize(
    "text", ["I would like to", "a table for", "tomorrow and", "book it for the", "my number is um", "I'd like the."]
)
def test_a_conjunction_preposition_article_or_filler_at_the_end_is_unfinished_even_unpunctuated(text: str) -> None:
    assert not looks_finished(text, punctuated=False)
    assert not looks_finished(text, punctuated=True)


@pytest.mark.parametrize("text", ["yes", "book a table for two", "i need to reschedule", "no thanks"])
def test_unpunctuated_words_that_end_well_are_finished(text: str) -> None:
    assert looks_finished(text, punctuated=False)


def test_same_words_ignores_case_and_punctuation_but_not_words() -> None:
    assert same_words("I want a table.", "i want a table")
    assert same_words("Okay, thanks!", "okay thanks")
    assert not same_words("I want a table.", "I want a table for four.")
    assert not same_words("I want a table.", "[DTMF 5]")


def test_the_pause_counts_silence_and_says_when_the_caller_speaks_on() -> None:
    pause = CallerPause()
    assert [pause.frame(voiced=True) for _ in range(5)] == [False, False, True, False, False]
    for _ in range(8):
        assert not pause.frame(voiced=False)
    assert pause.quiet_ms == 160
    resumed = [pause.frame(voiced=True) for _ in range(RESUME_MS // 20)]
    assert resumed[-1] and not any(resumed[:-1])
    assert pause.quiet_ms == 0
    pause.frame(voiced=True)
    pause.frame(voiced=False)
    assert pause.frame(voiced=True) is False  # a 20 ms sound after a pause is not yet speaking on


def test_words_a_turn_already_took_are_cut_from_the_recognizer_s_later_end_of_turn() -> None:
    assert without_taken("I want a table. For four.", ["i", "want", "a", "table"]) == "For four."
    assert without_taken("I want a table.", ["i", "want", "a", "table"]) == ""
    assert without_taken("I want a chair.", ["i", "want", "a", "table"]) == "I want a chair."
    assert without_taken("Hello there.", []) == "Hello there."


def test_held_unfinished_words_lead_the_next_turn() -> None:
    words = CallerWords()
    words.final("I would like to")
    words.recognizer_ended("I would like to")
    assert not words.finished(punctuated=True)
    words.hold(1200)
    assert words.held_end_ms == 1200
    words.final("book a table.")
    words.recognizer_ended("book a table.")
    assert words.finished(punctuated=True)
    assert words.take(by_recognizer=True) == "I would like to book a table."
    assert not words.waiting and words.held_end_ms is None


def test_words_held_on_the_silence_are_not_doubled_by_the_recognizer_s_end_of_turn_that_repeats_them() -> None:
    words = CallerWords()
    words.final("I would like to")  # asked for early: the recognizer has not ended its turn
    words.hold(1200)  # the silence found them unfinished
    words.final("book a table.")  # the caller goes on, and the recognizer ends its turn on all of it
    words.recognizer_ended("I would like to book a table.")
    assert words.take(by_recognizer=True) == "I would like to book a table."


def test_held_words_the_recognizer_ends_its_turn_on_alone_make_one_turn_at_the_longer_silence() -> None:
    words = CallerWords()
    words.final("i would like to")
    words.hold(1200)
    words.recognizer_ended("i would like to")
    words.hold(1200)  # still unfinished
    assert words.take(by_recognizer=False) == "i would like to"


def test_a_recognizer_taking_over_says_again_the_words_of_the_turn_in_progress_in_place_of_the_failed_one() -> None:
    words = CallerWords()
    words.final("First question.")
    assert words.take(by_recognizer=False) == "First question."  # the failed one never ended that turn
    words.final("I would like")  # the failed one's words of the next turn, held on the silence
    words.hold(3000)
    words.recognizer_switched()  # the new one hears the turn in progress replayed
    assert not words.waiting and words.held_end_ms is None
    words.final("i would like to book")
    words.recognizer_ended("i would like to book")
    assert words.take(by_recognizer=True) == "i would like to book"


def test_a_turn_the_silence_took_is_not_repeated_by_the_recognizer_s_late_end_of_turn() -> None:
    words = CallerWords()
    words.final("I want a table.")
    assert words.take(by_recognizer=False) == "I want a table."
    words.recognizer_ended("I want a table.")
    assert not words.waiting  # nothing new: no second turn
    words.final("For four.")
    words.recognizer_ended("For four.")
    assert words.take(by_recognizer=True) == "For four."
