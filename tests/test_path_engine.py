"""The path engine, pure: a path with every node type walked by the offline model, move by move."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from pipelines.llm.base import ConversationTurn, EndCall, LLMEvent, SendDtmf, TextDelta, TransferCall
from pipelines.llm.conversation_path import REPROMPT_PREFIX, ConversationPathLLM
from pipelines.paths.engine import MAX_KEY_REPROMPTS, PathEngine, PathStep, UnknownWay
from pipelines.paths.graph import PathInvalid, read_path
from pipelines.paths.prompts import node_instructions
from storage.demo import DEMO_PATH_EDGES, DEMO_PATH_NODES
from tests.paths import (
    ANSWER_FALLBACK,
    ASK_ACCOUNT,
    BILLING,
    EVERY_TYPE_EDGES,
    EVERY_TYPE_NODES,
    GOODBYE,
    GREETING,
    HUMAN,
    KEY_TIMEOUT_S,
    ORDER,
    PASSING_LOOP_EDGES,
    PASSING_LOOP_NODES,
    TRANSFER_TO,
)

GREETING_DEMO = "Would you like to book an appointment, or hear our opening hours?"


class Accounts:
    """A ToolCaller keeping what it was asked: the account service a webhook node calls."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.calls: list[tuple[str, dict[str, object]]] = []

    async def run(self, name: str, arguments: Mapping[str, object]) -> str:
        """Answer like the agent's Tool would."""
        self.calls.append((name, dict(arguments)))
        return self.reply


class Shelf:
    """A KnowledgeLookup over a few passages: those sharing a word with the query."""

    def __init__(self, passages: list[str]) -> None:
        self.passages = passages
        self.queries: list[str] = []

    async def search(self, query: str) -> list[str]:
        """Passages with a word of the query."""
        self.queries.append(query)
        words = set(query.lower().split())
        return [passage for passage in self.passages if words & set(passage.lower().split())]


class Walk:
    """The offline model on the every-type path, turn by turn."""

    def __init__(self, **kwargs: object) -> None:
        self.model = ConversationPathLLM(EVERY_TYPE_NODES, EVERY_TYPE_EDGES, **kwargs)  # type: ignore[arg-type]
        self.turns: list[ConversationTurn] = []

    async def start(self) -> list[LLMEvent]:
        """The opening."""
        return [event async for event in self.model.respond([])]

    async def says(self, text: str) -> list[LLMEvent]:
        """The caller's turn and the model's answer."""
        self.turns.append(ConversationTurn("caller", text))
        return [event async for event in self.model.respond(list(self.turns))]

    @property
    def at(self) -> str:
        """The node the call is at."""
        return self.model.current_node_id

    async def after_key_timeout(self) -> list[LLMEvent]:
        """The call's timer ran out at a gather node: the model's next reply (no new caller turn)."""
        self.model.engine.time_out_keys()
        return [event async for event in self.model.respond(list(self.turns))]


async def test_gather_then_webhook_success_then_prompt_then_end() -> None:
    accounts = Accounts('{"balance": "$12"}')
    walk = Walk(tools=accounts)
    assert await walk.start() == [TextDelta(GREETING)]
    assert await walk.says("it's about billing") == [TextDelta(ASK_ACCOUNT)]
    assert walk.at == "account"
    for key in "123":
        assert await walk.says(f"[DTMF {key}]") == []  # more digits awaited, nothing said
    assert await walk.says("[DTMF 4]") == [TextDelta(BILLING)]  # 4 digits: the webhook passed, to billing
    assert walk.at == "billing"
    assert accounts.calls == [("lookup_account", {"account": "1234"})]
    assert walk.model.engine.variables == {"account": "1234", "balance": '{"balance": "$12"}'}
    assert await walk.says("thanks, bye") == [TextDelta(GOODBYE), EndCall("path_end")]
    assert [(step.node_id, step.edge_id) for step in walk.model.engine.steps] == [
        ("greet", None),
        ("account", "to-billing"),
        ("lookup", "got-account"),
        ("billing", "found"),
        ("goodbye", "billing-done"),
    ]


async def test_a_terminator_ends_the_gather_and_a_failing_webhook_takes_the_failure_edge() -> None:
    walk = Walk(tools=Accounts("error: the lookup_account service answered HTTP 500: boom"))
    await walk.start()
    await walk.says("billing")
    assert await walk.says("[DTMF 9]") == []
    events = await walk.says("[DTMF #]")
    assert events == [TextDelta("Sorry, our system is down. " + GOODBYE), EndCall("path_end")]
    assert walk.model.engine.variables["account"] == "9"
    assert walk.model.engine.last_edge == "not-found"


async def test_a_gather_node_times_its_keys_only_while_the_call_is_there() -> None:
    walk = Walk(tools=Accounts("{}"))
    assert walk.model.engine.key_timeout is None  # not started
    await walk.start()
    assert walk.model.engine.key_timeout is None  # a speak node waits for no key
    await walk.says("billing")
    assert walk.model.engine.key_timeout == KEY_TIMEOUT_S
    await walk.says("[DTMF 1]")
    assert walk.model.engine.key_timeout == KEY_TIMEOUT_S  # and again for the next key


async def test_when_the_wait_for_a_key_runs_out_the_digits_so_far_complete_the_gather_node() -> None:
    accounts = Accounts('{"balance": "$12"}')
    walk = Walk(tools=accounts)
    await walk.start()
    await walk.says("billing")
    assert await walk.says("[DTMF 7]") == []
    assert await walk.says("[DTMF 3]") == []
    assert await walk.after_key_timeout() == [TextDelta(BILLING)]  # two of four digits, then no more: they count
    assert accounts.calls == [("lookup_account", {"account": "73"})]
    assert walk.model.engine.last_edge == "found"


async def test_with_no_key_at_all_the_gather_node_asks_again_then_waits_without_a_timer() -> None:
    walk = Walk()
    await walk.start()
    await walk.says("billing")
    for _ in range(MAX_KEY_REPROMPTS):
        assert await walk.after_key_timeout() == [TextDelta(ASK_ACCOUNT)]
        assert walk.at == "account"
    assert walk.model.engine.key_timeout is None  # asked enough: the call's silence time-out takes over
    walk.model.engine.time_out_keys()
    assert not walk.model.engine.keys_timed_out
    assert await walk.says("[DTMF 5]") == []  # a key still counts, and the timer is back for the next one
    assert walk.model.engine.key_timeout == KEY_TIMEOUT_S


async def test_a_key_pressed_as_the_wait_ran_out_is_taken_as_a_key() -> None:
    walk = Walk()
    await walk.start()
    await walk.says("billing")
    walk.model.engine.time_out_keys()
    assert await walk.says("[DTMF 5]") == []  # one digit of four: no re-prompt, no completion
    assert walk.model.engine.variables == {} and walk.at == "account"


async def test_a_webhook_node_without_tools_routes_as_a_failure() -> None:
    walk = Walk()
    await walk.start()
    await walk.says("billing")
    assert EndCall("path_end") in await walk.says("1 2 3 4")  # spoken digits count as keys too
    assert walk.at == "lookup-failed"


async def test_wait_and_knowledge_answer_from_the_lookup_then_press_digits() -> None:
    shelf = Shelf(["Orders ship within two days."])
    walk = Walk(knowledge=shelf)
    await walk.start()
    assert await walk.says("I have a question about an order") == [TextDelta(ORDER)]
    assert await walk.says("the order number is 5") == []  # the wait node says nothing
    assert walk.at == "listen"
    assert await walk.says("when do orders ship") == [TextDelta("Orders ship within two days.")]
    assert walk.at == "kb" and shelf.queries == ["when do orders ship"]
    events = await walk.says("take me to the menu")
    assert events == [SendDtmf("1w2"), TextDelta(GOODBYE), EndCall("path_end")]


async def test_without_knowledge_bases_the_knowledge_node_says_its_fallback() -> None:
    walk = Walk()
    await walk.start()
    await walk.says("order")
    await walk.says("it is order 7")
    assert await walk.says("when will it arrive") == [TextDelta(ANSWER_FALLBACK)]
    assert walk.at == "kb"


async def test_a_global_node_is_reachable_from_anywhere_and_transfers() -> None:
    walk = Walk()
    await walk.start()
    await walk.says("billing")
    events = await walk.says("can I speak to a person")
    assert events == [TextDelta(HUMAN), TransferCall(TRANSFER_TO, "conversation path node transfer")]
    assert walk.model.engine.steps[-2:] == [PathStep("human", "global:human"), PathStep("transfer", "to-person")]
    assert await walk.says("hello?") == [EndCall("path_end")]


async def test_a_transfer_not_made_puts_the_call_back_at_the_node_it_came_from_and_the_path_goes_on() -> None:
    walk = Walk()
    await walk.start()
    await walk.says("billing")  # at the gather node
    await walk.says("can I speak to a person")
    assert walk.at == "transfer"
    assert walk.model.engine.transfer_not_made() is True
    assert walk.at == "account" and walk.model.engine.steps[-1] == PathStep("account", None)
    await walk.says("1 2 3 4")
    assert walk.model.engine.variables["account"] == "1234"  # the node came from takes the caller's answer


async def test_a_path_that_began_with_its_transfer_is_over_when_the_transfer_is_not_made() -> None:
    nodes = [
        {"id": "menu", "type": "press_digits", "data": {"isStart": True, "digits": "1"}},
        {"id": "desk", "type": "transfer", "data": {"number": TRANSFER_TO}},
    ]
    engine = PathEngine(read_path(nodes, [{"id": "to-desk", "source": "menu", "target": "desk"}]))
    assert await engine.begin() == [SendDtmf("1"), TransferCall(TRANSFER_TO, "conversation path node desk")]
    assert engine.transfer_not_made() is False
    assert engine.node.id == "desk" and engine.ended


async def test_a_failed_transfer_away_from_a_transfer_node_leaves_the_path_where_it_is() -> None:
    walk = Walk()
    await walk.start()
    steps = list(walk.model.engine.steps)
    assert walk.model.engine.transfer_not_made() is True  # a model's own transfer_call failed at the greeting
    assert walk.at == "greet" and walk.model.engine.steps == steps


async def test_a_way_that_does_not_leave_the_node_is_refused_with_the_ways_that_do() -> None:
    engine = PathEngine(read_path(EVERY_TYPE_NODES, EVERY_TYPE_EDGES))
    await engine.begin()
    with pytest.raises(UnknownWay) as refused:
        await engine.move("found")
    assert refused.value.ways == ["to-billing", "to-order", "global:human"]
    assert engine.node.id == "greet"
    await engine.move("to-order", variables={"order_number": "7"})  # greet asks for nothing: not kept
    assert engine.node.id == "order" and engine.variables == {}
    await engine.move("order-named", variables={"order_number": " 42 ", "account": "9999", "empty": ""})
    assert engine.node.id == "listen" and engine.variables == {"order_number": "42"}


async def test_what_a_stored_path_gathers_under_a_built_ins_name_never_hides_the_built_in() -> None:
    # Saving such a path is refused (test_path_validation); one stored before runs, the built-in filling its
    # placeholder: {{customer.number}} is the caller's line, not empty.
    instructions = "Confirm the line {{customer.number}} and the {{plan}} plan."
    node = {
        "id": "ask",
        "type": "prompt",
        "data": {
            "isStart": True,
            "instructions": instructions,
            "extractVariables": [{"name": "customer"}, {"name": "plan"}],
        },
    }
    engine = PathEngine(read_path([node], [], strict=False), call_variables={"customer": {"number": "+15550100"}})
    await engine.begin()
    engine.remember({"customer": "VIP", "plan": "gold"})
    assert engine.variables == {"customer": "VIP", "plan": "gold"}  # kept, and shown to the model as gathered
    assert node_instructions(engine) == "Confirm the line +15550100 and the gold plan."


async def test_a_nodes_words_are_filled_once_so_a_callers_words_holding_braces_are_said_as_they_are() -> None:
    nodes = [
        {
            "id": "ask",
            "type": "speak",
            "data": {"isStart": True, "text": "Your name, {{customer.name}}?", "extractVariables": [{"name": "nick"}]},
        },
        {"id": "desk", "type": "transfer", "data": {"number": TRANSFER_TO, "text": "One moment, {{nick}}{{gone}}."}},
    ]
    edges = [{"id": "named", "source": "ask", "target": "desk"}]
    engine = PathEngine(read_path(nodes, edges), call_variables={"customer": {"name": "Ann"}, "plan": "gold"})

    assert await engine.begin() == [TextDelta("Your name, Ann?")]
    assert await engine.move("named", variables={"nick": "{{plan}}"}) == [
        TextDelta("One moment, {{plan}}."),  # the caller's words, not the plan; a name nothing answers says nothing
        TransferCall(TRANSFER_TO, "conversation path node desk"),
    ]


async def test_a_line_whose_every_word_is_a_variable_without_a_value_says_nothing() -> None:
    nodes = [{"id": "hello", "type": "end", "data": {"isStart": True, "text": "{{greeting}}"}}]
    engine = PathEngine(read_path(nodes, []))
    assert await engine.begin() == [EndCall("path_end")]


async def test_the_offline_model_fills_its_reprompt_and_a_knowledge_nodes_fallback_but_not_the_passages() -> None:
    nodes = [
        {"id": "ask", "type": "speak", "data": {"isStart": True, "text": "Question, {{customer.name}}?"}},
        {"id": "kb", "type": "knowledge", "data": {"fallback": "Nothing on that, {{customer.name}}."}},
    ]
    edges = [{"id": "asked", "source": "ask", "target": "kb", "data": {"keywords": ["question"]}}]
    shelf = Shelf(["Refunds take {{days}} days."])
    engine = PathEngine(read_path(nodes, edges), knowledge=shelf, call_variables={"customer": {"name": "Ann"}})
    model = ConversationPathLLM.on_engine(engine)

    assert [event async for event in model.respond([])] == [TextDelta("Question, Ann?")]
    missed = [event async for event in model.respond([ConversationTurn("caller", "hm")])]
    assert missed == [TextDelta(f"{REPROMPT_PREFIX}Question, Ann?")]
    asking = engine.checkpoint()
    assert await engine.move("asked", heard="a question about parcels") == [TextDelta("Nothing on that, Ann.")]
    engine.rewind(asking)
    await engine.move("asked", heard="a question about refunds")
    assert node_instructions(engine).endswith("Passages:\n- Refunds take {{days}} days.")  # told as found


async def test_a_loop_passed_through_without_the_caller_ends_the_call_instead_of_spinning() -> None:
    queue = Accounts("error: the lookup_account service answered HTTP 503")
    engine = PathEngine(read_path(PASSING_LOOP_NODES, PASSING_LOOP_EDGES, strict=False), tools=queue)
    await engine.begin()
    events = await engine.move("to-tones")
    [ending] = [event for event in events if isinstance(event, EndCall)]
    assert events[-1] == ending and "round a loop at node" in ending.reason
    assert 0 < len(queue.calls) <= 20


def test_validation_lists_every_problem() -> None:
    broken = [dict(node) for node in EVERY_TYPE_NODES]
    broken[0] = {"id": "greet", "type": "speak", "data": {"isStart": True}}
    broken[4] = {"id": "lookup-failed", "type": "nope"}
    with pytest.raises(PathInvalid) as invalid:
        read_path(broken, EVERY_TYPE_EDGES)
    fields = [problem.field for problem in invalid.value.problems]
    assert fields[:2] == ["nodes[0].data.text", "nodes[4].type"]
    assert "and" in str(invalid.value) and "more problem" in str(invalid.value)


def test_a_call_runs_a_path_saved_with_a_dangling_edge() -> None:
    path = read_path(
        EVERY_TYPE_NODES, [*EVERY_TYPE_EDGES, {"id": "x", "source": "greet", "target": "gone"}], strict=False
    )
    assert [edge.id for edge in path.outgoing("greet")] == ["to-billing", "to-order"]


async def test_the_demo_path_gathers_a_booking_number_then_waits_for_any_answer() -> None:
    model = ConversationPathLLM(DEMO_PATH_NODES, DEMO_PATH_EDGES)
    turns: list[ConversationTurn] = []

    async def says(text: str) -> list[LLMEvent]:
        turns.append(ConversationTurn("caller", text))
        return [event async for event in model.respond(list(turns))]

    assert [event async for event in model.respond([])] == [TextDelta(GREETING_DEMO)]
    assert await says("[DTMF 9]") == [
        TextDelta("Please enter your four digit booking number, or finish with the pound key.")
    ]
    assert await says("[DTMF 4]") == []
    assert await says("[DTMF 2]") == []
    assert await says("[DTMF #]") == [TextDelta("Thank you. Is there anything you would like us to know?")]
    assert model.engine.variables == {"booking_number": "42"}
    assert await says("please call me after five") == [
        TextDelta("Noted, we will be in touch. Goodbye!"),
        EndCall("path_end"),
    ]
    read_path(DEMO_PATH_NODES, DEMO_PATH_EDGES)  # the demo passes the API's checks
