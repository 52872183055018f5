"""A whole call through the real engine reports itself to webhook subscribers: started, each turn, ended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from config.agent import parse_agent_configuration
from engine.simulator import Say, simulate_call
from storage import agents, conversation_paths, organizations, phone_numbers
from storage.demo import DEMO_PATH_EDGES, DEMO_PATH_NODES
from storage.enums import AgentStatus, CallerType
from storage.events import create_event
from tests.engine_server import running_engine
from tests.webhook_receiver import Received, WebhookReceiver, webhook_receiver

TOKEN = "test-auth-token-0123456789abcdef"
CALLER = "+15005550006"
LINE = "+15555550999"
WAIT_S = 60.0  # a ceiling for slow machines, never a measure of speed


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[WebhookReceiver]:
    """The subscriber's server on loopback."""
    async with webhook_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    """The engine on loopback, delivering webhooks to loopback receivers."""
    async with running_engine(
        db_url, twilio_auth_token=TOKEN, allow_private_webhook_urls=True, webhook_poll_interval=0.5
    ) as base:
        yield base


async def open_line(pool: asyncpg.Pool, organization_id: str) -> str:
    """The demo line: a number answered by an offline agent walking the demo path; returns the agent's id."""
    number = await phone_numbers.create_phone_number(pool, organization_id=organization_id, phone_number=LINE)
    config = {"stt": {"provider": "sphinx"}, "llm": {"provider": "conversation_path"}, "tts": {"provider": "espeak"}}
    agent = await agents.create_agent(
        pool,
        organization_id=organization_id,
        name="Webhook line",
        status=AgentStatus.ACTIVE,
        caller_type=CallerType.INBOUND,
        phone_number_id=number.id,
        configuration=parse_agent_configuration({**config, "firstSentence": "Hello from the hooks line."}).to_json(),
    )
    path = await conversation_paths.create_conversation_path(
        pool, organization_id=organization_id, name="path", nodes=DEMO_PATH_NODES, edges=DEMO_PATH_EDGES
    )
    await agents.link_conversation_path(
        pool, organization_id=organization_id, agent_id=agent.id, conversation_path_id=path.id
    )
    return agent.id


async def wait_for(receiver: WebhookReceiver, predicate: Any, what: str) -> None:
    """Wait until `predicate(receiver)` holds; fail naming `what` if it never does."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not predicate(receiver):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {WAIT_S:g} s")
        await asyncio.sleep(0.05)


def of(receiver: WebhookReceiver, path: str) -> list[dict[str, Any]]:
    """The bodies accepted at /<path>, in arrival order."""
    received: list[Received] = receiver.accepted(path)
    return [r.json for r in received]


async def test_a_call_reports_its_start_each_turn_and_its_end(
    engine: str, pool: asyncpg.Pool, receiver: WebhookReceiver
) -> None:
    org = (await organizations.create_organization(pool, name="Hooks", slug="hooks-calls", credits=100)).id
    agent_id = await open_line(pool, org)
    for name, path in (("call.started", "started"), ("transcript.updated", "turns"), ("call.ended", "ended")):
        await create_event(pool, organization_id=org, name=name, webhook_url=receiver.url(path), agent_id=agent_id)

    result = await simulate_call(
        engine, to=LINE, from_=CALLER, script=[Say("I would like to book an appointment")], auth_token=TOKEN
    )
    await wait_for(receiver, lambda r: len(r.accepted("ended")) == 1, "call.ended")
    log = await pool.fetchrow('SELECT * FROM "CallLog" WHERE "callId" = $1', result.call_sid)
    assert log is not None
    turns = await pool.fetch('SELECT * FROM "CallTurn" WHERE "callLogId" = $1 ORDER BY "index"', log["id"])
    await wait_for(receiver, lambda r: len(r.accepted("turns")) == len(turns), "a transcript.updated per turn")

    [started] = of(receiver, "started")
    assert started["type"] == "call.started"
    assert started["data"]["callLogId"] == log["id"]
    assert (started["data"]["from"], started["data"]["to"]) == (CALLER, LINE)
    assert (started["data"]["callType"], started["data"]["agentId"]) == ("INBOUND", agent_id)

    assert len(turns) >= 3  # the greeting, the caller, the reply
    updates = sorted(of(receiver, "turns"), key=lambda body: body["data"]["turn"]["index"])
    assert [(u["data"]["turn"]["speaker"], u["data"]["turn"]["text"]) for u in updates] == [
        (t["speaker"], t["text"]) for t in turns
    ]
    assert {u["data"]["callLogId"] for u in updates} == {log["id"]}

    [ended] = of(receiver, "ended")
    data = ended["data"]
    assert (data["callLogId"], data["status"], data["endReason"]) == (
        log["id"],
        log["status"],
        log["metadata"]["endReason"],
    )
    assert (data["duration"], data["transcript"]) == (log["duration"], log["transcript"])
    assert data["recordingUrl"] == log["recordingUrl"]
    assert (data["from"], data["to"], data["agentId"]) == (CALLER, LINE, agent_id)

    queued = await pool.fetch(
        'SELECT "event" FROM "WebhookDelivery" WHERE "organizationId" = $1 ORDER BY "createdAt", "id"', org
    )
    events = [row["event"] for row in queued]
    assert events[0] == "call.started" and events[-1] == "call.ended"
    assert events.count("call.started") == events.count("call.ended") == 1
