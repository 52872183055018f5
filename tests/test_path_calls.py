"""Conversation paths in real calls through the real server: Twilio's side played by the simulator over HTTP and
the media WebSocket, the vendors' fakes (Deepgram, OpenAI chat, ElevenLabs, OpenAI Realtime), the agent's webhook
Tool on loopback, Twilio's REST API recording hang-ups and transfers, and the path, agent, campaign, turns and
CallLog in the database, read while the call runs.

Every node type is driven here: by a fake OpenAI model calling `follow_path`, by the offline model (keywords), and
by the Realtime fake; a gather node's keys are pressed by the simulator, and its wait for a key is timed by the call.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from config.settings import load_settings
from engine.call.driver import TRANSFER_FAILED, TRANSFER_UNCONFIRMED
from engine.simulator import CallResult, Dtmf, Pause, Say, Step, simulate_call
from engine.twilio.outbound_calls import OutboundDeps, place_call
from engine.twilio.rest import TwilioCalls
from pipelines.llm.conversation_path import REPROMPT_PREFIX
from pipelines.realtime.openai_realtime import say_exactly
from pipelines.tools import transfer_failed, transfer_unconfirmed
from storage import agents, campaigns, conversation_paths, organizations, phone_numbers, tools
from storage.demo import DEMO_PATH_NAME, seed_demo
from storage.enums import AgentStatus, CallerType, Plan
from tests.engine_server import running_engine
from tests.fakes.openai_chat import ToolCall
from tests.fakes.openai_realtime import FakeRealtime
from tests.fakes.server import serve
from tests.fakes.twilio import Answer, FakeTwilio, call_updates, dialed_number
from tests.paths import (
    ASK_ACCOUNT,
    BILLING,
    EVERY_TYPE_EDGES,
    EVERY_TYPE_NODES,
    GOODBYE,
    GREETING,
    HUMAN,
    ORDER,
    PASSING_LOOP_EDGES,
    PASSING_LOOP_NODES,
    TRANSFER_TO,
    VARIABLES_PATH_EDGES,
    VARIABLES_PATH_NODES,
)
from tests.test_calls_e2e import call_log as finished_log
from tests.test_calls_e2e import finished_call_log, turns
from tests.test_cloud_calls_e2e import CALLER, OPENAI_KEY, TOKEN, Fakes, fake_twilio_rest, fakes, make_line
from tests.test_knowledge_calls import give_knowledge
from tests.test_live_events_transfers import NOT_IN_PROGRESS

__all__ = ["fake_twilio_rest", "fakes"]  # that module's fixtures: the vendors' fakes, Twilio's REST API

BALANCE = "Your balance is twelve dollars."
DELIVERY = "Every order will arrive within three working days of its dispatch."
ACCOUNT_SID = "AC" + "2" * 32
REPLY_TIMEOUT_S = 4.0
"""How long a caller's step waits for the agent to start replying (a wait node says nothing)."""
REALTIME = {"provider": "openai", "silence_duration_ms": 300, "transcription_model": "whisper-1"}
REPO = str(Path(__file__).resolve().parent.parent)
OTHER_DESK = {"destinations": [{"number": "+14155550199", "label": "Billing desk"}]}
"""Transfer rules that do not allow the number of the path's transfer node (TRANSFER_TO)."""
_numbers = itertools.count(1)


@dataclass
class AccountService:
    """The agent's account-lookup webhook: answers every POST with `reply` (or `status`), keeps what it was sent."""

    reply: dict[str, Any] = field(default_factory=lambda: {"balance": "$12"})
    status: int = 200
    received: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    raw: bytes | None = None
    """A body to answer with instead of `reply`, sent as it is (declared JSON)."""

    async def handle(self, request: web.Request) -> web.Response:
        """One call of the lookup_account function."""
        self.received.append(await request.json())
        if self.raw is not None:
            return web.Response(body=self.raw, status=self.status, content_type="application/json")
        return web.json_response(self.reply, status=self.status)


@dataclass(frozen=True)
class PathLine:
    """A number answered by an agent whose default path has a node of every type (and a decoy path it also has)."""

    number: str
    agent_id: str
    path_id: str


@dataclass
class PathRig:
    """What a path call test works with: the database, the vendors' fakes, Twilio's REST API (each call update's
    form: hang-ups and transfers) and the agent's account service."""

    db_url: str
    pool: asyncpg.Pool
    organization_id: str
    fakes: Fakes
    twilio_api: str
    twilio_updates: list[dict[str, str]]
    accounts: AccountService

    @asynccontextmanager
    async def engine(self, **settings: Any) -> AsyncIterator[str]:
        """The engine on loopback on the fakes (`settings` override theirs), with Twilio's REST API."""
        twilio = {"twilio_auth_token": TOKEN, "twilio_account_sid": ACCOUNT_SID, "twilio_api_base": self.twilio_api}
        async with running_engine(self.db_url, **{**twilio, **self.fakes.settings(), **settings}) as base:
            yield base

    async def line(self, **configuration: Any) -> PathLine:
        """A new line whose agent (the cloud stages, overridden by `configuration`) follows the every-type path by
        default, may transfer to TRANSFER_TO, and has the lookup_account Tool."""
        return await path_line(self.pool, self.organization_id, self.accounts.url, **configuration)

    def call(self, engine: str, line: PathLine, *steps: Step) -> LiveCall:
        """Call `line` with the caller's `steps`; the call runs while the test reads the database."""
        return LiveCall(self.pool, engine, line, list(steps))


@pytest.fixture(scope="module")
async def organization_id(pool: asyncpg.Pool) -> str:
    """The organization of every line of this module."""
    org = await organizations.create_organization(
        pool, name="Paths", slug="paths-e2e", plan=Plan.ENTERPRISE, credits=500
    )
    return org.id


@pytest.fixture
async def rig(
    db_url: str, pool: asyncpg.Pool, organization_id: str, fakes: Fakes, fake_twilio_rest: Any
) -> AsyncIterator[PathRig]:
    """A test's rig, with its own account service on loopback. What a test scripted and its calls did not use
    (one that failed midway) is dropped after it, so that the next test hears only its own script."""
    service = AccountService()
    app = web.Application()
    app.router.add_post("/lookup", service.handle)
    async with serve(app) as base:
        service.url = base + "/lookup"
        api, updates = fake_twilio_rest
        try:
            yield PathRig(db_url, pool, organization_id, fakes, api, updates, service)
        finally:
            fakes.deepgram.transcripts.clear()
            fakes.openai.replies.clear()


async def path_line(pool: asyncpg.Pool, organization_id: str, tool_url: str, **configuration: Any) -> PathLine:
    """A new line whose agent (the cloud stages, overridden by `configuration`) follows the every-type path by
    default (a decoy path is linked too), may transfer to TRANSFER_TO, and has the lookup_account Tool."""
    configuration = {"transfer": {"destinations": [{"number": TRANSFER_TO, "label": "A person"}]}, **configuration}
    number, agent_id = await make_line(pool, organization_id, prompt="You are Acme's front desk.", **configuration)
    path = await conversation_paths.create_conversation_path(
        pool,
        organization_id=organization_id,
        name=f"Every node {next(_numbers)}",
        agent_speech="Warm and brief.",
        nodes=EVERY_TYPE_NODES,
        edges=EVERY_TYPE_EDGES,
    )
    await link_decoy(pool, organization_id, agent_id)
    await agents.link_conversation_path(
        pool, organization_id=organization_id, agent_id=agent_id, conversation_path_id=path.id
    )
    await agents.set_default_conversation_path(
        pool, organization_id=organization_id, agent_id=agent_id, conversation_path_id=path.id
    )
    tool = await tools.create_tool(
        pool,
        organization_id=organization_id,
        name="Accounts",
        is_connected=True,
        configuration={
            "function": {"name": "lookup_account", "description": "Look an account up"},
            "webhook": {"url": tool_url},
        },
    )
    await agents.link_tool(pool, organization_id=organization_id, agent_id=agent_id, tool_id=tool.id)
    return PathLine(number, agent_id, path.id)


async def link_decoy(pool: asyncpg.Pool, organization_id: str, agent_id: str) -> None:
    """Give the agent a path that ends the call at once: said, it shows the call followed the wrong path."""
    decoy = await conversation_paths.create_conversation_path(
        pool,
        organization_id=organization_id,
        name="Decoy",
        nodes=[{"id": "decoy", "type": "end", "data": {"isStart": True, "text": "Wrong path."}}],
    )
    await agents.link_conversation_path(
        pool, organization_id=organization_id, agent_id=agent_id, conversation_path_id=decoy.id
    )


class LiveCall:
    """A simulated call running on the engine while the test reads what the engine has written so far."""

    def __init__(self, pool: asyncpg.Pool, engine: str, line: PathLine, steps: list[Step]) -> None:
        self.pool = pool
        self.agent_id = line.agent_id
        self.task = asyncio.create_task(
            simulate_call(
                engine,
                to=line.number,
                from_=CALLER,
                script=steps,
                auth_token=TOKEN,
                timeout_s=60,
                reply_timeout_s=REPLY_TIMEOUT_S,
            )
        )

    async def trace_when(self, count: int, timeout: float = 20.0) -> tuple[list[tuple[Any, ...]], asyncpg.Record]:
        """Once `count` turns are stored while the call runs: each turn's speaker, text, node and edge, and the
        CallLog as it was read with them (still IN_PROGRESS)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        query = 'SELECT * FROM "CallLog" WHERE "agentId" = $1'
        while True:
            log = await self.pool.fetchrow(query, self.agent_id)
            rows = await turns(self.pool, log["id"]) if log is not None else []
            if len(rows) >= count:
                # Read again after the turns: the write that stored the last of them has its metadata with it.
                log = await self.pool.fetchrow(query, self.agent_id)
                assert log is not None and log["status"] == "IN_PROGRESS", "the call ended before it was read"
                return trace(rows), log
            assert not self.task.done(), f"the call ended with {len(rows)} of {count} turns: {trace(rows)}"
            assert loop.time() < deadline, f"only {len(rows)} of {count} turns were stored: {trace(rows)}"
            await asyncio.sleep(0.05)

    async def finished(self) -> tuple[CallResult, asyncpg.Record, list[tuple[Any, ...]]]:
        """The call once over: what the caller's side saw, the finished CallLog and the trace of its turns."""
        result = await asyncio.wait_for(self.task, 60)
        log = await finished_log(self.pool, result)
        return result, log, trace(await turns(self.pool, log["id"]))


def trace(rows: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
    """Each turn's speaker, text, node and edge."""
    return [(row["speaker"], row["text"], row["pathNodeId"], row["pathEdgeId"]) for row in rows]


async def path_metrics(engine: str, path_id: str) -> tuple[dict[str, float], dict[str, float]]:
    """The engine's /metrics for `path_id`: calls per node, calls per edge."""
    async with aiohttp.ClientSession() as http, http.get(f"{engine}/metrics") as response:
        text = await response.text()
    counts: dict[str, dict[str, float]] = {"node": {}, "edge": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("path") == path_id:
                kind = "node" if "node" in sample.labels else "edge"
                counts[kind][sample.labels[kind]] = sample.value
    return counts["node"], counts["edge"]


def follow(way: str, **variables: str) -> ToolCall:
    """The model calls follow_path."""
    arguments: dict[str, Any] = {"way": way}
    if variables:
        arguments["variables"] = variables
    return ToolCall("follow_path", arguments)


def tool_results(fakes: Fakes, since: int) -> list[str]:
    """What the model was told its function calls gave, in the requests since the `since`-th."""
    return [
        message["content"]
        for request in fakes.openai.requests[since:]
        for message in request["messages"]
        if message["role"] == "tool"
    ]


# --------------------------------------------------------------------------------------------------- OpenAI


async def test_openai_walks_speak_gather_webhook_prompt_and_end_with_the_trace_stored_while_the_call_runs(
    rig: PathRig,
) -> None:
    before = len(rig.fakes.openai.requests)
    rig.fakes.deepgram.transcripts.extend(["It's about my bill.", "Thanks, bye."])
    rig.fakes.openai.replies.extend(
        [[follow("to-billing")], BALANCE, ["Glad to help.", follow("billing-done")]]
    )  # the prompt node: the model speaks from its instructions
    async with rig.engine() as engine:
        line = await rig.line()
        call = rig.call(engine, line, Say("it is about my bill"), Dtmf("1234"), Say("thanks bye"))
        live, log = await call.trace_when(8)
        assert live[:8] == [
            ("agent", GREETING, "greet", None),  # said verbatim, no completion asked
            ("caller", "It's about my bill.", "greet", None),
            ("agent", ASK_ACCOUNT, "account", "to-billing"),
            ("caller", "[DTMF 1]", "account", None),
            ("caller", "[DTMF 2]", "account", None),
            ("caller", "[DTMF 3]", "account", None),
            ("caller", "[DTMF 4]", "account", None),
            ("agent", BALANCE, "billing", "found"),
        ]
        assert log["metadata"]["conversationPath"]["id"] == line.path_id
        assert log["metadata"]["conversationPath"]["node"] == "billing"
        nodes, edges = await path_metrics(engine, line.path_id)
        assert nodes == {"greet": 1, "account": 1, "lookup": 1, "billing": 1}
        assert edges == {"to-billing": 1, "got-account": 1, "found": 1}
        result, log, ended = await call.finished()
        nodes, edges = await path_metrics(engine, line.path_id)

    assert nodes["goodbye"] == 1 and edges["billing-done"] == 1
    assert ended[-1] == ("agent", f"Glad to help. {GOODBYE}", "goodbye", "billing-done")
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "path_end")
    assert log["metadata"]["conversationPath"] == {
        "id": line.path_id,
        "node": "goodbye",
        "variables": {"account": "1234", "balance": '{"balance": "$12"}'},
    }
    assert rig.twilio_updates == [{"sid": result.call_sid, "Status": "completed"}]  # hung up through Twilio
    assert rig.accounts.received[0]["function"] == "lookup_account"
    assert rig.accounts.received[0]["arguments"] == {"account": "1234"}
    requests = rig.fakes.openai.requests[before:]
    assert len(requests) == 3  # no completion for the greeting nor for the keys: the gather node collected them
    system = requests[0]["messages"][0]["content"]
    assert "You are Acme's front desk." in system and "Warm and brief." in system and "'greet'" in system
    (offered,) = [tool for tool in requests[0]["tools"] if tool["function"]["name"] == "follow_path"]
    assert offered["function"]["parameters"]["properties"]["way"]["enum"] == ["to-billing", "to-order", "global:human"]
    system = requests[1]["messages"][0]["content"]
    assert "Tell the caller their balance" in system and '{"balance": "$12"}' in system
    assert f"for the line {CALLER}." in system, "the call's own variables fill a node's placeholders too"


async def test_a_failing_webhook_routes_on_failure_and_ends_the_call(rig: PathRig) -> None:
    rig.accounts.status = 500
    rig.fakes.deepgram.transcripts.append("Billing.")
    rig.fakes.openai.replies.append([follow("to-billing")])
    async with rig.engine() as engine:
        line = await rig.line()
        _, log, ended = await rig.call(engine, line, Say("billing"), Dtmf("42#")).finished()
    assert ended[-1] == ("agent", "Sorry, our system is down. " + GOODBYE, "lookup-failed", "not-found")
    assert log["metadata"]["endReason"] == "path_end"
    assert log["metadata"]["conversationPath"]["variables"]["account"] == "42"  # the terminator ended the digits


async def test_a_webhook_answering_bytes_that_are_not_utf8_still_routes_the_call_on(rig: PathRig) -> None:
    rig.accounts.raw = b'{"balance": "\xff\xfe12"}'
    rig.fakes.deepgram.transcripts.extend(["Billing.", "Thanks, bye."])
    rig.fakes.openai.replies.extend([[follow("to-billing")], BALANCE, [follow("billing-done")]])
    async with rig.engine() as engine:
        line = await rig.line()
        _, log, ended = await rig.call(engine, line, Say("billing"), Dtmf("42#"), Say("thanks bye")).finished()
    assert ("agent", BALANCE, "billing", "found") in ended
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "path_end")
    assert log["metadata"]["conversationPath"]["variables"]["balance"] == '{"balance": "\ufffd\ufffd12"}'


async def test_a_wrong_or_missing_way_is_explained_to_the_model_and_the_call_walks_on_to_knowledge_and_keys(
    rig: PathRig,
) -> None:
    before = len(rig.fakes.openai.requests)
    rig.fakes.deepgram.transcripts.extend(
        ["Something else.", "An order.", "It is order A 42.", "When will it arrive?", "Take me to the menu."]
    )
    rig.fakes.openai.replies.extend(
        [
            [follow("to-nowhere")],  # a wrong way
            "Sorry, was that billing or an order?",
            [follow("to-order")],
            "Which order is it?",  # the prompt node: the model speaks
            [ToolCall("follow_path", {})],  # no way at all: told so, the model tries again at once
            ["Noted.", follow("order-named", order_number="A-42")],  # moves and extracts
            [follow("heard")],  # the wait node: the caller's question moves the call on
            "Within three working days.",  # the knowledge node: the model answers from the passage found
            [follow("answered")],
        ]
    )
    async with rig.engine(kb_ingest_poll_interval=0.05) as engine:
        line = await rig.line()
        await give_knowledge(rig.pool, rig.organization_id, line.agent_id, DELIVERY, embedded=False)
        steps: list[Step] = [
            Say("something else"),
            Say("an order"),
            Say("it is order a forty two"),
            Say("when will it arrive"),
            Say("take me to the menu"),
        ]
        result, log, ended = await rig.call(engine, line, *steps).finished()
        nodes, _ = await path_metrics(engine, line.path_id)

    assert ended[1:] == [
        ("caller", "Something else.", "greet", None),
        ("agent", "Sorry, was that billing or an order?", "greet", None),  # the call went on where it was
        ("caller", "An order.", "greet", None),
        ("agent", "Which order is it?", "order", "to-order"),
        ("caller", "It is order A 42.", "order", None),
        ("agent", "Noted.", "listen", "order-named"),  # the wait node says nothing more
        ("caller", "When will it arrive?", "listen", None),
        ("agent", "Within three working days.", "kb", "heard"),
        ("caller", "Take me to the menu.", "kb", None),
        ("agent", f"[DTMF 1w2] {GOODBYE}", "goodbye", "menu-done"),  # the tones, then goodbye
    ]
    told = tool_results(rig.fakes, before)
    assert told[0].startswith("error: there is no way 'to-nowhere'") and "to-billing, to-order, global:human" in told[0]
    assert (
        "error: there is no way '' from here; choose one of: order-named, global:human;"
        " stay at this step and keep talking, or call follow_path again"
    ) in told  # each request carries the conversation so far: the same result is in every one after it
    requests = rig.fakes.openai.requests[before:]
    (offered,) = [t for t in requests[4]["tools"] if t["function"]["name"] == "follow_path"]
    asked = offered["function"]["parameters"]["properties"]["variables"]["properties"]
    assert asked == {"order_number": {"type": "string", "description": "The order's number"}}
    assert DELIVERY in requests[-2]["messages"][0]["content"]  # the passage the knowledge node found, for the model
    assert nodes["menu"] == 1  # the press-digits node was passed through
    assert len(result.utterances[-1].audio) > 8 * 700  # two tones, a half-second pause, the goodbye
    assert (log["metadata"]["endReason"], log["status"]) == ("path_end", "COMPLETED")
    assert log["metadata"]["conversationPath"] == {
        "id": line.path_id,
        "node": "goodbye",
        "variables": {"order_number": "A-42"},
    }


async def test_a_global_node_reached_by_the_model_transfers_through_twilio_to_the_allowed_number(rig: PathRig) -> None:
    rig.fakes.deepgram.transcripts.append("Can I talk to a human?")
    rig.fakes.openai.replies.append([follow("global:human")])
    async with rig.engine() as engine:
        line = await rig.line()
        result, log, ended = await rig.call(engine, line, Say("can i talk to a human")).finished()
        _, edges = await path_metrics(engine, line.path_id)
    assert ended[-1] == ("agent", HUMAN, "transfer", "to-person")
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred")
    [update] = rig.twilio_updates
    assert update["sid"] == result.call_sid and dialed_number(update["Twiml"]) == TRANSFER_TO
    assert edges["global:human"] == 1 and edges["to-person"] == 1


# --------------------------------------------------------------------------------------------------- no transfer


@asynccontextmanager
async def transfer_not_made(rig: PathRig, cause: str, **settings: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The engine, and the configuration of an agent whose path's transfer will not be made: `rules` (its transfer
    rules do not allow the node's number) or `twilio` (Twilio's REST API refuses to redirect the call)."""
    if cause == "rules":
        async with rig.engine(**settings) as engine:
            yield engine, {"transfer": OTHER_DESK}
        return
    async with call_updates(refuse=NOT_IN_PROGRESS) as (api, updates), rig.engine(twilio_api_base=api, **settings) as e:
        yield e, {}
    assert dialed_number(updates[0]["Twiml"]) == TRANSFER_TO  # Twilio was asked, and refused


WENT_ON = [
    ("agent", GREETING, "greet", None),
    ("caller", "Can I talk to a person?", "greet", None),
    ("agent", HUMAN, "transfer", "to-person"),
    ("agent", TRANSFER_FAILED, "greet", None),  # told, and back at the node the call came from
    ("caller", "It is about an order.", "greet", None),
    ("agent", ORDER, "order", "to-order"),  # the conversation goes on from there
]
"""The trace of a call whose path's transfer was not made, and whose caller went on to ask about an order."""


@pytest.mark.parametrize(
    ("llm", "cause"), [("openai", "rules"), ("conversation_path", "rules"), ("conversation_path", "twilio")]
)
async def test_a_path_transfer_not_made_is_told_to_the_caller_and_the_path_goes_back_to_where_the_call_came_from(
    rig: PathRig, llm: str, cause: str
) -> None:
    rig.fakes.deepgram.transcripts.extend(["Can I talk to a person?", "It is about an order."])
    if llm == "openai":
        rig.fakes.openai.replies.extend([[follow("global:human")], [follow("to-order")], ORDER])
    async with transfer_not_made(rig, cause) as (engine, configuration):
        offline = {"llm": {"provider": llm}} if llm == "conversation_path" else {}
        line = await rig.line(**offline, **configuration)
        steps: list[Step] = [Say("can i talk to a person"), Say("it is about an order")]
        _, log, ended = await rig.call(engine, line, *steps).finished()
    assert ended == WENT_ON
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "caller_hangup")
    assert log["metadata"]["conversationPath"]["node"] == "order"
    if cause == "rules":
        assert not any("Twiml" in update for update in rig.twilio_updates)  # nothing was dialed


@pytest.mark.parametrize("driver", ["offline", "realtime"])
async def test_a_path_that_begins_with_a_transfer_not_made_ends_the_call_with_the_agents_goodbye(
    rig: PathRig, driver: str
) -> None:
    stages = {"llm": {"provider": "conversation_path"}} if driver == "offline" else {"realtime": REALTIME}
    async with FakeRealtime(api_key=OPENAI_KEY) as fake, rig.engine(openai_base_url=fake.base_url) as engine:
        fake.reply(HUMAN)
        fake.reply(f"{TRANSFER_FAILED} {GOODBYE}")  # what the Realtime model is asked to say exactly
        line = await rig.line(**stages, transfer=OTHER_DESK, goodbyeSentence=GOODBYE)
        nodes = [{"id": "desk", "type": "transfer", "data": {"isStart": True, "number": TRANSFER_TO, "text": HUMAN}}]
        await rig.pool.execute(
            'UPDATE "ConversationPath" SET "nodes" = $1, "edges" = $2 WHERE "id" = $3', nodes, [], line.path_id
        )
        _, log, ended = await rig.call(engine, line, Pause(6000)).finished()
    assert [row[:3] for row in ended] == [
        ("agent", HUMAN, "desk"),
        ("agent", f"{TRANSFER_FAILED} {GOODBYE}", "desk"),  # nowhere to go back to: the path is over
    ]
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "path_end")


# --------------------------------------------------------------------------------------------------- variables


async def variables_line(rig: PathRig, **configuration: Any) -> PathLine:
    """A line whose agent (`plan` gold among its variables) follows the variables path."""
    line = await rig.line(variables={"plan": "gold"}, **configuration)
    await rig.pool.execute(
        'UPDATE "ConversationPath" SET "nodes" = $1, "edges" = $2 WHERE "id" = $3',
        VARIABLES_PATH_NODES,
        VARIABLES_PATH_EDGES,
        line.path_id,
    )
    return line


async def test_a_paths_lines_are_said_with_the_calls_and_the_paths_variables_filled_in_an_openai_call(
    rig: PathRig,
) -> None:
    before = len(rig.fakes.openai.requests)
    rig.fakes.deepgram.transcripts.append("It is order A 42.")
    rig.fakes.openai.replies.append([follow("named", order_number="A-42")])
    async with rig.engine() as engine:
        line = await variables_line(rig)
        _, log, ended = await rig.call(engine, line, Say("it is order a forty two"), Dtmf("57")).finished()

    greeting = f"Hi {CALLER}, this is Acme about your gold plan. Which order is it about?"
    assert [row for row in ended if row[0] == "agent"] == [
        ("agent", greeting, "greet", None),
        ("agent", "Order A-42: enter your two digit code.", "code", "named"),
        ("agent", f"Code 57 is noted, {CALLER}. Goodbye!", "bye", "got-code"),  # a name nothing answers says nothing
    ]
    spoken = " ".join(said.text.strip() for said in rig.fakes.elevenlabs.texts)  # what the voice was given
    assert greeting in spoken and "{" not in spoken
    system = rig.fakes.openai.requests[before]["messages"][0]["content"]
    assert f"You just said, word for word: {greeting!r}" in system  # and what the model is told was said
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "path_end")
    assert log["metadata"]["conversationPath"]["variables"] == {"order_number": "A-42", "code": "57"}


async def test_a_paths_lines_are_said_with_the_calls_and_the_paths_variables_filled_in_an_offline_call(
    rig: PathRig,
) -> None:
    offline = {"stt": {"provider": "sphinx"}, "llm": {"provider": "conversation_path"}, "tts": {"provider": "espeak"}}
    async with rig.engine() as engine:
        line = await variables_line(rig, **offline)
        _, log, ended = await rig.call(engine, line, Dtmf("1"), Dtmf("57")).finished()

    assert [row for row in ended if row[0] == "agent"] == [
        ("agent", f"Hi {CALLER}, this is Acme about your gold plan. Which order is it about?", "greet", None),
        ("agent", "Order : enter your two digit code.", "code", "named"),  # the offline model extracts nothing
        ("agent", f"Code 57 is noted, {CALLER}. Goodbye!", "bye", "got-code"),
    ]
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "path_end")
    assert log["metadata"]["conversationPath"]["variables"] == {"code": "57"}


async def test_a_realtime_model_is_asked_to_say_a_paths_lines_with_their_variables_filled(rig: PathRig) -> None:
    greeting = f"Hi {CALLER}, this is Acme about your gold plan. Which order is it about?"
    ask_code = "Order A-42: enter your two digit code."
    goodbye = f"Code 57 is noted, {CALLER}. Goodbye!"
    async with FakeRealtime(api_key=OPENAI_KEY) as fake:
        fake.reply(greeting)
        fake.reply_tool("follow_path", {"way": "named", "variables": {"order_number": "A-42"}})
        fake.reply(ask_code)
        fake.caller_says("It is order A 42.")
        fake.reply(goodbye)
        async with rig.engine(openai_base_url=fake.base_url) as engine:
            line = await variables_line(rig, realtime=REALTIME)
            _, log, _ = await rig.call(engine, line, Say("it is order a forty two"), Dtmf("57")).finished()
        asked = [event["response"].get("instructions", "") for event in fake.of_type("response.create")]

    said = [text for text in asked if text.startswith("Say exactly")]
    assert said == [say_exactly(greeting), say_exactly(ask_code), say_exactly(goodbye)]
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "path_end")


# --------------------------------------------------------------------------------------------------- loops


@pytest.mark.parametrize("driver", ["offline", "openai", "realtime"])
async def test_a_loop_passed_through_without_the_caller_ends_the_call_naming_it(rig: PathRig, driver: str) -> None:
    rig.accounts.status = 500  # the webhook keeps failing
    rig.fakes.deepgram.transcripts.extend(["Agent.", "Hello?"])
    rig.fakes.openai.replies.extend([[follow("to-tones")], [follow("to-tones")]])
    stages: dict[str, Any] = {"llm": {"provider": "conversation_path"}} if driver == "offline" else {}
    async with FakeRealtime(api_key=OPENAI_KEY) as fake:
        realtime = {"openai_base_url": fake.base_url} if driver == "realtime" else {}  # else the chat model's fake
        if realtime:
            stages["realtime"] = REALTIME
        async with rig.engine(**realtime) as engine:
            fake.reply(GREETING)
            fake.reply_tool("follow_path", {"way": "to-tones"})
            fake.caller_says("Agent.")
            line = await rig.line(**stages)
            await rig.pool.execute(
                'UPDATE "ConversationPath" SET "nodes" = $1, "edges" = $2 WHERE "id" = $3',
                PASSING_LOOP_NODES,
                PASSING_LOOP_EDGES,
                line.path_id,
            )
            _, log, _ = await rig.call(engine, line, Say("agent"), Say("hello")).finished()
    assert log["status"] == "COMPLETED"
    assert log["metadata"]["endReason"] == "agent_hangup"
    assert "without stopping for the caller, round a loop" in log["metadata"]["endDetail"]
    assert 0 < len(rig.accounts.received) <= 20  # the webhook was called a bounded number of times, once a call


# --------------------------------------------------------------------------------------------------- gather timeout


async def test_keys_stopped_short_of_the_count_complete_the_gather_node_when_its_wait_runs_out(rig: PathRig) -> None:
    rig.fakes.deepgram.transcripts.append("Billing.")
    rig.fakes.openai.replies.extend([[follow("to-billing")], BALANCE])
    async with rig.engine() as engine:
        line = await rig.line()
        call = rig.call(engine, line, Say("billing"), Dtmf("73"), Pause(6000))
        live, _ = await call.trace_when(6)
        call.task.cancel()  # the caller hangs up: what was needed is seen
    assert live[3:6] == [
        ("caller", "[DTMF 7]", "account", None),
        ("caller", "[DTMF 3]", "account", None),
        ("agent", BALANCE, "billing", "found"),  # two keys of four, then none for timeoutSeconds: they count
    ]
    assert rig.accounts.received[0]["arguments"] == {"account": "73"}


async def test_a_gather_node_with_no_key_pressed_asks_again_when_its_wait_runs_out(rig: PathRig) -> None:
    rig.fakes.deepgram.transcripts.append("Billing.")
    rig.fakes.openai.replies.extend([[follow("to-billing")], BALANCE])
    async with rig.engine() as engine:
        line = await rig.line()
        # The prompt (1.8 s of ElevenLabs' fake audio) is heard by about 2.5 s and said again 2 s later; the keys come
        # once that is heard, well before the second wait runs out.
        steps: list[Step] = [Say("billing"), Pause(7000), Dtmf("1234")]
        call = rig.call(engine, line, *steps)
        live, _ = await call.trace_when(9)
        call.task.cancel()
    assert live[2:5] == [
        ("agent", ASK_ACCOUNT, "account", "to-billing"),
        ("agent", ASK_ACCOUNT, "account", None),  # asked again, no key pressed; the node stays
        ("caller", "[DTMF 1]", "account", None),
    ]
    assert live[8] == ("agent", BALANCE, "billing", "found")


# --------------------------------------------------------------------------------------------------- offline


async def test_the_offline_model_walks_prompt_wait_knowledge_press_digits_and_end(rig: PathRig) -> None:
    before = len(rig.fakes.openai.requests)
    rig.fakes.deepgram.transcripts.extend(
        ["I am calling about an order.", "It is order seven.", "When will it arrive?", "Take me to the menu."]
    )
    async with rig.engine(kb_ingest_poll_interval=0.05) as engine:
        line = await rig.line(llm={"provider": "conversation_path"})
        await give_knowledge(rig.pool, rig.organization_id, line.agent_id, DELIVERY, embedded=False)
        steps: list[Step] = [
            Say("i am calling about an order"),
            Say("it is order seven"),  # the wait node: nothing is said, the caller goes on
            Say("when will it arrive"),
            Say("take me to the menu"),
        ]
        result, log, ended = await rig.call(engine, line, *steps).finished()
        nodes, _ = await path_metrics(engine, line.path_id)

    assert ended == [
        ("agent", GREETING, "greet", None),
        ("caller", "I am calling about an order.", "greet", None),
        ("agent", ORDER, "order", "to-order"),
        ("caller", "It is order seven.", "order", None),
        ("caller", "When will it arrive?", "listen", None),
        ("agent", DELIVERY, "kb", "heard"),  # the knowledge node: the passage found in the agent's knowledge base
        ("caller", "Take me to the menu.", "kb", None),
        ("agent", f"[DTMF 1w2] {GOODBYE}", "goodbye", "menu-done"),  # the tones, then goodbye
    ]
    assert log["metadata"]["endReason"] == "path_end"
    assert nodes["menu"] == 1  # the press-digits node was passed through
    assert len(result.utterances[-1].audio) > 8 * 700  # two tones, a half-second pause, the goodbye
    assert rig.fakes.openai.requests[before:] == []


async def test_the_offline_model_walks_speak_gather_webhook_prompt_and_a_global_node_that_transfers(
    rig: PathRig,
) -> None:
    before = len(rig.fakes.openai.requests)
    rig.fakes.deepgram.transcripts.extend(["It is about billing.", "Can I talk to a person?"])
    async with rig.engine() as engine:
        line = await rig.line(llm={"provider": "conversation_path"})
        steps: list[Step] = [Say("it is about billing"), Dtmf("1234"), Say("can i talk to a person")]
        result, log, ended = await rig.call(engine, line, *steps).finished()
        _, edges = await path_metrics(engine, line.path_id)

    assert ended == [
        ("agent", GREETING, "greet", None),
        ("caller", "It is about billing.", "greet", None),
        ("agent", ASK_ACCOUNT, "account", "to-billing"),
        ("caller", "[DTMF 1]", "account", None),
        ("caller", "[DTMF 2]", "account", None),
        ("caller", "[DTMF 3]", "account", None),
        ("caller", "[DTMF 4]", "account", None),
        ("agent", BILLING, "billing", "found"),  # the prompt node's line, said by the offline model
        ("caller", "Can I talk to a person?", "billing", None),
        ("agent", HUMAN, "transfer", "to-person"),  # the global node's keyword, from anywhere
    ]
    assert rig.accounts.received[0]["arguments"] == {"account": "1234"}
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred")
    [update] = rig.twilio_updates
    assert update["sid"] == result.call_sid and dialed_number(update["Twiml"]) == TRANSFER_TO
    assert edges["global:human"] == 1
    assert rig.fakes.openai.requests[before:] == []


async def test_the_offline_model_asks_again_for_keys_when_the_caller_speaks_at_a_gather_node_before_any(
    rig: PathRig,
) -> None:
    rig.fakes.deepgram.transcripts.extend(["It is about billing.", "I do not have it here."])
    async with rig.engine() as engine:
        line = await rig.line(llm={"provider": "conversation_path"})
        steps: list[Step] = [Say("it is about billing"), Say("i do not have it here"), Dtmf("1234")]
        call = rig.call(engine, line, *steps)
        live, _ = await call.trace_when(10)
        call.task.cancel()

    assert live[2:5] == [
        ("agent", ASK_ACCOUNT, "account", "to-billing"),
        ("caller", "I do not have it here.", "account", None),
        ("agent", f"{REPROMPT_PREFIX}{ASK_ACCOUNT}", "account", None),  # words are no keys: the node stays
    ]
    assert live[9] == ("agent", BILLING, "billing", "found")
    assert [request["arguments"] for request in rig.accounts.received] == [{"account": "1234"}]


async def test_a_campaigns_path_overrides_the_agents_default(rig: PathRig) -> None:
    pool, organization_id = rig.pool, rig.organization_id
    number = await phone_numbers.create_phone_number(
        pool, organization_id=organization_id, phone_number=f"+1555017{next(_numbers):04d}"
    )
    agent = await agents.create_agent(
        pool,
        organization_id=organization_id,
        name="renewals",
        status=AgentStatus.ACTIVE,
        caller_type=CallerType.OUTBOUND,
        configuration={"stt": {"provider": "sphinx"}, "llm": {"provider": "conversation_path"}},
    )
    await link_decoy(pool, organization_id, agent.id)  # the agent's only (so default) path
    path = await conversation_paths.create_conversation_path(
        pool, organization_id=organization_id, name="Renewals", nodes=EVERY_TYPE_NODES, edges=EVERY_TYPE_EDGES
    )
    campaign = await campaigns.create_campaign(
        pool, organization_id=organization_id, batch_name="Renewals", agent_id=agent.id, conversation_path_id=path.id
    )
    callee = f"+1212555{next(_numbers):04d}"
    async with FakeTwilio() as twilio:
        twilio.behave(callee, Answer(greeting="Hello?", script=[Pause(300)]))
        settings: dict[str, Any] = {
            "twilio_auth_token": twilio.auth_token,
            "twilio_account_sid": twilio.account_sid,
            "twilio_api_base": twilio.api_base,
        }
        client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
        async with running_engine(rig.db_url, **settings) as engine:
            deps = OutboundDeps(
                pool=pool, settings=load_settings(database_url=rig.db_url, **settings), twilio=client, public_url=engine
            )
            try:  # as the campaign dispatcher places a recipient's call
                placed = await place_call(
                    deps,
                    organization_id=organization_id,
                    agent_id=agent.id,
                    from_number=number.phone_number,
                    to=callee,
                    campaign_id=campaign.id,
                )
                await twilio.finished(placed.call_sid)
            finally:
                await client.close()
    log = await finished_call_log(pool, placed.call_log_id)
    spoken = [row for row in trace(await turns(pool, placed.call_log_id)) if row[0] == "agent"]
    assert spoken[0] == ("agent", GREETING, "greet", None)  # the campaign's path, not the agent's default
    assert log["metadata"]["conversationPath"]["id"] == path.id


# --------------------------------------------------------------------------------------------------- Realtime


async def test_the_realtime_model_follows_the_path_through_session_updates_to_a_global_transfer(
    rig: PathRig,
) -> None:
    async with FakeRealtime(api_key=OPENAI_KEY) as fake:
        fake.reply(GREETING)  # the start node's words, said exactly
        fake.reply_tool("follow_path", {"way": "to-billing"})
        fake.reply(ASK_ACCOUNT)  # the gather node's words, said exactly
        fake.caller_says("It's about billing.")
        fake.reply(BALANCE)  # the prompt node: the model speaks from the new instructions
        fake.reply_tool("follow_path", {"way": "global:human"})
        fake.reply(HUMAN)  # the transfer node's words, said exactly
        fake.caller_says("Can I talk to a person?")
        async with rig.engine(openai_base_url=fake.base_url) as engine:
            line = await rig.line(realtime=REALTIME)
            steps: list[Step] = [Say("it is about billing"), Dtmf("1234"), Say("can i talk to a person")]
            call = rig.call(engine, line, *steps)
            live, log = await call.trace_when(8)
            updates = [update["session"] for update in fake.of_type("session.update")]
            instructions = [update["instructions"] for update in updates]
            result, log, ended = await call.finished()
        items = fake.of_type("conversation.item.create")

    assert live[0] == ("agent", GREETING, "greet", None)
    assert [row[1:3] for row in live[2:8]] == [
        (ASK_ACCOUNT, "account"),
        ("[DTMF 1]", "account"),
        ("[DTMF 2]", "account"),
        ("[DTMF 3]", "account"),
        ("[DTMF 4]", "account"),
        (BALANCE, "billing"),
    ]
    assert "'greet'" in instructions[0] and "Warm and brief." in instructions[0]
    assert "follow_path" in {tool["name"] for tool in updates[0]["tools"]}
    assert any("'account'" in text for text in instructions)
    assert "Tell the caller their balance" in instructions[-1]
    assert f"for the line {CALLER}." in instructions[-1], "the call's own variables, in a realtime call too"
    assert rig.accounts.received[0]["arguments"] == {"account": "1234"}
    assert not any("pressed" in str(item) for item in items)  # the gather node took the keys, not the model
    assert ended[-1][1:4] == (HUMAN, "transfer", "to-person")  # the global node passed through to its transfer
    assert fake.sent_of_type("error") == []  # every update applied: none named the voice once the model had spoken
    assert [update["audio"]["output"].get("voice") for update in updates[1:]] == [None] * (len(updates) - 1)
    assert (log["metadata"]["endReason"], log["metadata"]["conversationPath"]["node"]) == ("transferred", "transfer")
    [update] = rig.twilio_updates
    assert update["sid"] == result.call_sid and dialed_number(update["Twiml"]) == TRANSFER_TO


async def test_the_realtime_model_walks_wait_knowledge_press_digits_and_end(rig: PathRig) -> None:
    async with FakeRealtime(api_key=OPENAI_KEY) as fake:
        fake.reply(GREETING)
        fake.caller_says("It's about an order.")
        fake.reply_tool("follow_path", {"way": "to-order"})
        fake.reply(ORDER)  # the prompt node: the model speaks
        fake.caller_says("It is order A 42.")
        fake.reply_tool("follow_path", {"way": "order-named", "variables": {"order_number": "A-42"}})
        fake.caller_says("When will it arrive?")  # the wait node: the model is not asked to speak, the caller goes on
        fake.reply_tool("follow_path", {"way": "heard"})
        fake.reply("Within three working days.")  # the knowledge node: the model answers from the passage found
        fake.caller_says("Take me to the menu.")
        fake.reply_tool("follow_path", {"way": "answered"})
        fake.reply(GOODBYE)  # after the press-digits node's tones
        async with rig.engine(openai_base_url=fake.base_url, kb_ingest_poll_interval=0.05) as engine:
            line = await rig.line(realtime=REALTIME)
            await give_knowledge(rig.pool, rig.organization_id, line.agent_id, DELIVERY, embedded=False)
            steps: list[Step] = [
                Say("it is about an order"),
                Say("it is order a forty two"),
                Say("when will it arrive"),
                Say("take me to the menu"),
            ]
            result, log, ended = await rig.call(engine, line, *steps).finished()
            nodes, _ = await path_metrics(engine, line.path_id)
        instructions = [update["session"]["instructions"] for update in fake.of_type("session.update")]

    assert [row[1:4] for row in ended if row[0] == "agent"] == [
        (GREETING, "greet", None),
        (ORDER, "order", "to-order"),
        ("Within three working days.", "kb", "heard"),
        ("[DTMF 1w2]", "goodbye", "menu-done"),  # the press-digits node's tones, then its edge's end node
        (GOODBYE, "goodbye", None),
    ]
    assert nodes["listen"] == 1 and nodes["menu"] == 1
    # The caller's question, transcribed after the model had moved, was waited for and found the passage.
    assert any("'kb'" in text and DELIVERY in text for text in instructions)
    assert (log["metadata"]["endReason"], log["status"]) == ("path_end", "COMPLETED")
    assert log["metadata"]["conversationPath"] == {
        "id": line.path_id,
        "node": "goodbye",
        "variables": {"order_number": "A-42"},
    }
    assert rig.twilio_updates == [{"sid": result.call_sid, "Status": "completed"}]


@pytest.mark.parametrize("cause", ["rules", "twilio"])
async def test_a_realtime_path_transfer_not_made_is_told_to_the_caller_and_the_path_goes_back(
    rig: PathRig, cause: str
) -> None:
    async with FakeRealtime(api_key=OPENAI_KEY) as fake:
        fake.reply(GREETING)
        fake.caller_says("Can I talk to a person?")
        fake.reply_tool("follow_path", {"way": "global:human"})
        fake.reply(HUMAN)  # the transfer node's words, said exactly
        fake.reply(TRANSFER_FAILED)  # the transfer was not made: said exactly too
        fake.caller_says("It is about an order.")
        fake.reply_tool("follow_path", {"way": "to-order"})
        fake.reply(ORDER)
        async with transfer_not_made(rig, cause, openai_base_url=fake.base_url) as (engine, configuration):
            line = await rig.line(realtime=REALTIME, **configuration)
            steps: list[Step] = [Say("can i talk to a person"), Say("it is about an order")]
            _, log, ended = await rig.call(engine, line, *steps).finished()
        outputs = [event["item"].get("output") or "" for event in fake.of_type("conversation.item.create")]

    assert [row for row in ended if row[0] == "agent"] == [row for row in WENT_ON if row[0] == "agent"]
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "caller_hangup")
    told = f"{transfer_failed(TRANSFER_TO)}; the caller was told, and the call is back at step 'greet'"
    assert told in outputs  # the model hears where the call is


async def test_a_realtime_path_transfer_twilio_leaves_unconfirmed_is_told_as_unconfirmed_not_failed(
    rig: PathRig,
) -> None:
    """Twilio neither answers the transfer node's request in time nor shows a dialed call in its record: the model's
    `follow_path` result says the transfer is unconfirmed (it may still go through), as the caller hears, not that
    it did not go through."""
    held = asyncio.Event()
    async with FakeRealtime(api_key=OPENAI_KEY) as fake:
        fake.reply(GREETING)
        fake.caller_says("Can I talk to a person?")
        fake.reply_tool("follow_path", {"way": "global:human"})
        fake.reply(HUMAN)
        fake.reply(TRANSFER_UNCONFIRMED)
        try:
            async with (
                call_updates(unanswered=held) as (api, updates),
                rig.engine(twilio_api_base=api, openai_base_url=fake.base_url) as engine,
            ):
                line = await rig.line(realtime=REALTIME)
                # The request times out (10 s), then Twilio's record is asked for 5 s more.
                steps: list[Step] = [Say("can i talk to a person"), Pause(20_000)]
                _, log, ended = await rig.call(engine, line, *steps).finished()
        finally:
            held.set()
        outputs = [event["item"].get("output") or "" for event in fake.of_type("conversation.item.create")]

    assert [row[1] for row in ended if row[0] == "agent"] == [GREETING, HUMAN, TRANSFER_UNCONFIRMED]
    assert dialed_number(updates[0]["Twiml"]) == TRANSFER_TO
    told = f"{transfer_unconfirmed(TRANSFER_TO)}; the caller was told, and the call is back at step 'greet'"
    assert told in outputs, outputs
    assert log["metadata"]["endReason"] == "caller_hangup"


async def test_a_realtime_calls_gather_node_asks_again_then_takes_the_keys_so_far_when_its_wait_runs_out(
    rig: PathRig,
) -> None:
    async with FakeRealtime(api_key=OPENAI_KEY) as fake:
        fake.reply(GREETING)
        fake.caller_says("It's about billing.")
        fake.reply_tool("follow_path", {"way": "to-billing"})
        fake.reply(ASK_ACCOUNT)
        fake.reply(ASK_ACCOUNT)  # said again when no key came
        fake.reply(BALANCE)
        async with rig.engine(openai_base_url=fake.base_url) as engine:
            line = await rig.line(realtime=REALTIME)
            # The prompt (1.1 s of the fake's audio) is heard by about 2 s, said again 2 s later; the keys come after
            # that, well before the second wait runs out.
            call = rig.call(engine, line, Say("it is about billing"), Pause(5000), Dtmf("73"), Pause(6000))
            live, _ = await call.trace_when(7)
            call.task.cancel()
    assert [row[1:4] for row in live[2:7]] == [
        (ASK_ACCOUNT, "account", "to-billing"),
        (ASK_ACCOUNT, "account", None),
        ("[DTMF 7]", "account", None),
        ("[DTMF 3]", "account", None),
        (BALANCE, "billing", "found"),
    ]
    assert rig.accounts.received[0]["arguments"] == {"account": "73"}


# --------------------------------------------------------------------------------------------------- the demo


async def test_dialtone_call_walks_the_demo_path_with_keypad_digits(db_url: str, pool: asyncpg.Pool) -> None:
    seed = await seed_demo(pool)
    bundle = await agents.load_agent_bundle(pool, organization_id=seed.organization_id, agent_id=seed.agent_id)
    assert [path.name for path in bundle.conversation_paths] == [DEMO_PATH_NAME]
    async with running_engine(db_url, twilio_auth_token=TOKEN) as engine:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_"))}
        env |= {"PYTHONPATH": REPO, "TWILIO_AUTH_TOKEN": TOKEN}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.server.cli", "call", "--url", engine, "--to", seed.phone_number,
            "--dtmf", "9", "--dtmf", "42#", "--say", "please call me after five",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(process.communicate(), 90)
    printed = output.decode()
    assert process.returncode == 0, printed
    assert "caller: presses 9" in printed and "caller: presses #" in printed
    call_log_id = await pool.fetchval(
        'SELECT "id" FROM "CallLog" WHERE "agentId" = $1 ORDER BY "createdAt" DESC LIMIT 1', seed.agent_id
    )
    log = await finished_call_log(pool, call_log_id)
    rows = await turns(pool, call_log_id)
    assert [(r["speaker"], r["pathNodeId"]) for r in rows] == [
        ("agent", "greeting"),
        ("caller", "greeting"),
        ("agent", "booking-number"),
        ("caller", "booking-number"),
        ("caller", "booking-number"),
        ("caller", "booking-number"),
        ("agent", "anything-else"),
        ("caller", "anything-else"),
        ("agent", "noted"),
    ]
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "path_end")
    assert log["metadata"]["conversationPath"]["variables"] == {"booking_number": "42"}
