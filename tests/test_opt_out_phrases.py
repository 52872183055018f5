"""The offline model hears a callee opting out: the phrases, in any case and punctuation, and nothing else."""

from __future__ import annotations

import pytest

from pipelines.conversation.opt_out import opt_out_phrase
from pipelines.llm.base import ConversationTurn, OptOut, TextDelta
from pipelines.llm.conversation_path import ConversationPathLLM
from storage.demo import DEMO_PATH_EDGES, DEMO_PATH_NODES


@pytest.mark.parametrize(
    ("heard", "phrase"),
    [
        ("Please stop calling me.", "stop calling me"),
        ("Don't call me again!", "dont call me again"),
        ("do NOT call me again", "do not call me again"),
        ("Could you take me off your list", "take me off your list"),
        ("remove me from your list please", "remove me from your list"),
        ("Unsubscribe.", "unsubscribe"),
        ("I said do not call", "do not call"),
        ("I want you to stop calling", "stop calling"),
    ],
)
def test_the_usual_phrases_are_heard(heard: str, phrase: str) -> None:
    assert opt_out_phrase(heard) == phrase


@pytest.mark.parametrize(
    "heard", ["", "I would like to book an appointment", "call me back tomorrow", "calling me is fine", "take me"]
)
def test_other_words_are_not_an_opt_out(heard: str) -> None:
    assert opt_out_phrase(heard) is None


async def test_the_path_runner_opts_out_wherever_the_path_is_and_otherwise_follows_the_path() -> None:
    path = ConversationPathLLM(DEMO_PATH_NODES, DEMO_PATH_EDGES)
    events = [e async for e in path.respond([ConversationTurn("caller", "I would like to book an appointment")])]
    assert events and all(isinstance(e, TextDelta) for e in events)
    node = path.current_node_id
    events = [e async for e in path.respond([ConversationTurn("caller", "Please take me off your list.")])]
    assert events == [OptOut("the callee said 'take me off your list'", phrase="take me off your list")]
    assert path.current_node_id == node
