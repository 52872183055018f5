"""Specifications of the offline language models: the conversation-path runner and the simple responder."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from config.agent import ConversationPathLLMConfig
from pipelines.llm.base import ConversationTurn, EndCall, LLMEvent, TextDelta
from pipelines.llm.conversation_path import (
    MAX_RECOGNIZER_KEYWORDS,
    NO_MATCH_GOODBYE,
    REPROMPT_PREFIX,
    ConversationPathLLM,
    InvalidConversationPath,
)
from pipelines.llm.simple import SimpleResponder
from storage.demo import DEMO_PATH_EDGES, DEMO_PATH_NODES

GREETING = "Would you like to book an appointment, or hear our opening hours?"
BOOK = "Sure. Which day would suit you, Monday to Friday?"
HOURS = "We are open nine to five, Monday to Friday. Would you like to book an appointment?"
CONFIRM = "Great, you are booked in. Thank you for calling. Goodbye!"
GOODBYE = "Thank you for calling. Goodbye!"


@dataclass
class Call:
    """A conversation with a model, turn by turn, as the engine would hold it."""

    model: ConversationPathLLM | SimpleResponder
    turns: list[ConversationTurn] = field(default_factory=list)

    async def caller_says(self, text: str) -> list[LLMEvent]:
        """Add the caller's turn, collect the model's reply and remember what the agent said."""
        self.turns.append(ConversationTurn("caller", text))
        events = [event async for event in self.model.respond(list(self.turns))]
        said = "".join(event.text for event in events if isinstance(event, TextDelta))
        if said:
            self.turns.append(ConversationTurn("agent", said))
        return events


def demo_path(**kwargs: Any) -> ConversationPathLLM:
    """The runner on the demo seed's front-desk path."""
    return ConversationPathLLM(DEMO_PATH_NODES, DEMO_PATH_EDGES, **kwargs)


def text_of(events: Sequence[LLMEvent]) -> str:
    """What the agent would say."""
    return "".join(event.text for event in events if isinstance(event, TextDelta))


def end_reasons(events: Sequence[LLMEvent]) -> list[str]:
    """The reasons of any EndCall events."""
    return [event.reason for event in events if isinstance(event, EndCall)]


# --------------------------------------------------------------------------------------------------- the walk


def test_opening_is_the_start_nodes_text() -> None:
    model = demo_path()
    assert model.opening() == GREETING
    assert model.current_node_id == "greeting"


async def test_asking_for_an_appointment_moves_to_the_book_node() -> None:
    call = Call(demo_path())
    events = await call.caller_says("I'd like to book an appointment.")
    assert events == [TextDelta(BOOK)]
    assert call.model.current_node_id == "book"  # type: ignore[union-attr]


async def test_naming_a_day_confirms_and_then_ends_the_call() -> None:
    call = Call(demo_path())
    await call.caller_says("I'd like to book an appointment")
    events = await call.caller_says("tuesday please")
    assert events == [TextDelta(CONFIRM), EndCall(reason="path_end")]


async def test_the_hours_branch_leads_back_to_booking_on_yes() -> None:
    call = Call(demo_path())
    assert text_of(await call.caller_says("What are your opening hours?")) == HOURS
    assert text_of(await call.caller_says("Yeah, sure")) == BOOK


async def test_the_hours_branch_says_goodbye_on_no_thanks() -> None:
    call = Call(demo_path())
    await call.caller_says("when are you open")
    events = await call.caller_says("No thanks")
    assert events == [TextDelta(GOODBYE), EndCall(reason="path_end")]


async def test_the_edge_with_most_keyword_hits_wins() -> None:
    call = Call(demo_path())
    # "book" hits the book edge once; "opening" and "hours" hit the hours edge twice.
    assert text_of(await call.caller_says("before I book, what are your opening hours")) == HOURS


async def test_a_tie_goes_to_the_first_edge() -> None:
    call = Call(demo_path())
    assert text_of(await call.caller_says("book hours")) == BOOK


# --------------------------------------------------------------------------------------------------- misses


async def test_a_miss_repeats_the_question() -> None:
    call = Call(demo_path())
    events = await call.caller_says("the weather is lovely")
    assert events == [TextDelta(REPROMPT_PREFIX + GREETING)]
    assert call.model.current_node_id == "greeting"  # type: ignore[union-attr]


async def test_three_misses_without_a_fallback_reply_end_the_call_politely() -> None:
    call = Call(demo_path())
    await call.caller_says("purple")
    await call.caller_says("elephant")
    events = await call.caller_says("banana")
    assert events == [TextDelta(NO_MATCH_GOODBYE), EndCall(reason="no_match")]


async def test_three_misses_say_the_configured_fallback_reply() -> None:
    config = ConversationPathLLMConfig(fallback_reply="Let me put it another way: booking, or hours?")
    call = Call(ConversationPathLLM.from_path(_Path(DEMO_PATH_NODES, DEMO_PATH_EDGES), config))
    await call.caller_says("purple")
    await call.caller_says("elephant")
    assert text_of(await call.caller_says("banana")) == "Let me put it another way: booking, or hours?"


async def test_a_match_resets_the_miss_count() -> None:
    call = Call(demo_path())
    await call.caller_says("purple")
    await call.caller_says("elephant")
    await call.caller_says("book please")
    await call.caller_says("hmm")
    events = await call.caller_says("errr")
    assert events == [TextDelta(REPROMPT_PREFIX + BOOK)]


async def test_a_reply_with_no_caller_turn_restates_the_current_node() -> None:
    model = demo_path()
    assert [event async for event in model.respond([])] == [TextDelta(GREETING)]


# --------------------------------------------------------------------------------------------------- ASR slips


@pytest.mark.parametrize(
    "heard",
    [
        "appointments",
        "i want to make an appoint meant",
        "BOOKING!",
        "can i get an apointment",
    ],
)
async def test_recognition_slips_still_route_to_booking(heard: str) -> None:
    call = Call(demo_path())
    assert text_of(await call.caller_says(heard)) == BOOK


def large_branch(ways: int, phrases_each: int) -> ConversationPathLLM:
    """A start node with `ways` ways out: way i's keywords "desk i", "extension i", then made-up words, but for the
    ways `_NAMED` gives names of their own."""
    rng = random.Random(5)  # noqa: S311 - reproducible made-up keywords, not a secret
    nodes: list[dict[str, Any]] = [{"id": "start", "type": "speak", "data": {"text": "Who for?", "isStart": True}}]
    edges: list[dict[str, Any]] = []
    for way in range(ways):
        nodes.append({"id": f"end{way}", "type": "end", "data": {"text": f"Connecting you to team {way}."}})
        made_up = (" ".join(_made_up_word(rng) for _ in range(rng.randint(1, 3))) for _ in range(phrases_each))
        keywords = [f"desk {way}", f"extension {way}", *_NAMED.get(way, ()), *made_up][:phrases_each]
        edges.append({"id": f"e{way}", "source": "start", "target": f"end{way}", "data": {"keywords": keywords}})
    return ConversationPathLLM(nodes, edges)


_NAMED = {412: ["warranty claims"], 88: ["appointment"]}


def _made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(6, 9)))


@pytest.mark.parametrize(
    ("heard", "team"),
    [
        ("the extension 731 please", 731),  # exact words
        ("desk 131", 131),
        ("put me through to warrenty claim", 412),  # a near-miss of a long word
        ("i need an appoint meant", 88),  # a long word the recogniser split in two
    ],
)
async def test_a_branch_of_thousands_of_keywords_still_routes(heard: str, team: int) -> None:
    # 1,000 ways out of one node with 10 keyword phrases each: as many as a large path may put before a caller.
    call = Call(large_branch(1000, 10))
    assert text_of(await call.caller_says(heard)) == f"Connecting you to team {team}."


async def test_numbers_in_keywords_are_never_near_misses() -> None:
    # "desk 731" is not heard as "desk 131" (nor as "desk 7310"), run together or not; desk 131's caller reaches it.
    call = Call(large_branch(1000, 4))
    assert text_of(await call.caller_says("desk seven three one")) == "Connecting you to team 731."
    call = Call(large_branch(1000, 4))
    assert text_of(await call.caller_says("desk 73 1")) == "Connecting you to team 731."


async def test_a_day_split_in_two_by_the_recogniser_still_routes() -> None:
    call = Call(demo_path())
    await call.caller_says("book")
    assert text_of(await call.caller_says("tues day")) == CONFIRM


async def test_short_keywords_do_not_match_inside_other_words() -> None:
    call = Call(demo_path())
    await call.caller_says("hours")
    # "no" must not be found inside "know".
    assert text_of(await call.caller_says("I know")) == REPROMPT_PREFIX + HOURS


async def test_multi_word_keywords_match_as_phrases() -> None:
    nodes = [
        {"id": "ask", "data": {"isStart": True, "text": "How can I help?"}},
        {"id": "human", "data": {"text": "Connecting you to a person.", "endCall": True}},
    ]
    edges = [{"id": "e", "source": "ask", "target": "human", "data": {"keywords": "real person, operator"}}]
    call = Call(ConversationPathLLM(nodes, edges))
    assert text_of(await call.caller_says("a person who is real")) == REPROMPT_PREFIX + "How can I help?"
    assert text_of(await call.caller_says("can I talk to a real person")) == "Connecting you to a person."


# --------------------------------------------------------------------------------------------------- DTMF

MENU_NODES = [
    {"id": "menu", "type": "input", "data": {"label": "Press one for sales or two for support."}},
    {"id": "sales", "type": "output", "data": {"prompt": "Sales here."}},
    {"id": "support", "type": "output", "data": {"prompt": "Support here."}},
]
MENU_EDGES = [
    {"id": "to-sales", "source": "menu", "target": "sales", "data": {"digit": 1, "keywords": ["sales"]}},
    {"id": "to-support", "source": "menu", "target": "support", "data": {"keywords": ["two", "support"]}},
]


@pytest.mark.parametrize("turn", ["digit 1", "1", "one"])
async def test_a_pressed_digit_follows_the_edge_with_that_digit(turn: str) -> None:
    call = Call(ConversationPathLLM(MENU_NODES, MENU_EDGES))
    assert await call.caller_says(turn) == [TextDelta("Sales here."), EndCall(reason="path_end")]


async def test_a_pressed_digit_matches_a_number_word_keyword() -> None:
    call = Call(ConversationPathLLM(MENU_NODES, MENU_EDGES))
    assert text_of(await call.caller_says("digit 2")) == "Support here."


# --------------------------------------------------------------------------------------------------- reading the JSON


def test_without_is_start_the_input_node_starts() -> None:
    model = ConversationPathLLM(MENU_NODES, MENU_EDGES)
    assert model.current_node_id == "menu"
    assert model.opening() == "Press one for sales or two for support."


def test_without_is_start_or_input_the_node_with_no_incoming_edge_starts() -> None:
    nodes = [{"id": "b", "data": {"text": "B"}}, {"id": "a", "data": {"text": "A"}}]
    edges = [{"source": "a", "target": "b", "data": {"keywords": ["next"]}}]
    assert ConversationPathLLM(nodes, edges).current_node_id == "a"


async def test_edge_labels_stand_in_for_missing_keywords() -> None:
    nodes = [{"id": "a", "data": {"text": "Billing or orders?"}}, {"id": "b", "data": {"text": "Billing."}}]
    edges = [{"source": "a", "target": "b", "label": "Billing question / invoice"}]
    call = Call(ConversationPathLLM(nodes, edges))
    assert text_of(await call.caller_says("it's about my invoices")) == "Billing."


def test_keywords_lists_every_keyword_of_the_path_once() -> None:
    assert demo_path().keywords() == [
        "book",
        "appointment",
        "hours",
        "open",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "tomorrow",
        "yes",
        "no",
        "bye",
        "thanks",
    ]


def test_the_recogniser_is_told_the_first_keywords_of_a_path_with_too_many_to_build_in_time() -> None:
    # 20,000 keywords fit in a path the API takes; PocketSphinx needs about 8 s to build a vocabulary of them, and
    # 50,000 run past an offline worker's 30 s deadline (its pool is then killed, other calls' jobs with it).
    nodes = [{"id": "menu", "type": "wait", "data": {"isStart": True}}, {"id": "done", "type": "end", "data": {}}]
    edges = [
        {"id": f"e{n}", "source": "menu", "target": "done", "data": {"keywords": [f"w{n} k{i}" for i in range(200)]}}
        for n in range(100)
    ]
    runner = ConversationPathLLM(nodes, edges)

    heard = runner.keywords()

    assert heard == [f"w{n} k{i}" for n in range(5) for i in range(200)][:MAX_RECOGNIZER_KEYWORDS]


def test_a_path_without_nodes_is_refused_with_a_clear_error() -> None:
    with pytest.raises(InvalidConversationPath, match="no nodes"):
        ConversationPathLLM([], [])


# --------------------------------------------------------------------------------------------------- simple responder


async def test_simple_responder_ends_the_call_on_goodbye() -> None:
    call = Call(SimpleResponder())
    events = await call.caller_says("OK, goodbye then")
    assert end_reasons(events) == ["caller_goodbye"]
    assert "Goodbye" in text_of(events)


async def test_simple_responder_answers_thanks_with_you_are_welcome() -> None:
    call = Call(SimpleResponder())
    assert text_of(await call.caller_says("thanks a lot")).startswith("You're welcome")


async def test_simple_responder_greets_back() -> None:
    call = Call(SimpleResponder())
    assert text_of(await call.caller_says("Hi there")) == "Hello! How can I help you today?"


async def test_simple_responder_admits_it_cannot_answer_questions() -> None:
    call = Call(SimpleResponder())
    events = await call.caller_says("What time do you close?")
    assert "not able to answer" in text_of(events)
    assert end_reasons(events) == []


async def test_simple_responder_falls_back_to_offering_more_help() -> None:
    call = Call(SimpleResponder())
    assert text_of(await call.caller_says("my car is blue")) == "I see. Is there anything else I can help you with?"


@dataclass(frozen=True)
class _Path:
    """A stand-in for a stored ConversationPath record."""

    nodes: list[Any]
    edges: list[Any]
