"""Rows the dashboard shares with the engine, left by another writer in shapes the API never saves: Prisma's `Json`
columns take any JSON value. Calls and the API read them and answer with a reason, never a 500 or a lost CallLog.

Real server on loopback, the simulator as Twilio, the offline providers, real PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.simulator import Say
from engine.twilio.webhooks import MISCONFIGURED
from storage import agents, tools
from tests.engine_server import running_engine
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_calls_e2e import TOKEN, call, call_log, make_line, turns

OPENING = "Thanks for calling. How can I help?"


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    """The engine on loopback, checking Twilio signatures with TOKEN."""
    async with running_engine(db_url, twilio_auth_token=TOKEN) as base:
        yield base


@pytest.fixture(scope="module")
async def acme(pool: asyncpg.Pool) -> Tenant:
    """The organization of every line and key here."""
    return await make_tenant(pool, "Shapes", credits=100)


async def store_graph(pool: asyncpg.Pool, agent_id: str, nodes: Any) -> str:
    """Write `nodes` (JSON; None is JSON null) into the agent's path as another writer would; the path's id."""
    path_id: str = await pool.fetchval(
        'UPDATE "ConversationPath" p SET "nodes" = $1::text::jsonb FROM "AgentConversationPath" link '
        'WHERE link."conversationPathId" = p."id" AND link."agentId" = $2 RETURNING p."id"',
        json.dumps(nodes),
        agent_id,
    )
    return path_id


async def store_configuration(pool: asyncpg.Pool, agent_id: str, configuration: Any) -> None:
    """Write the agent's configuration as another writer would, bypassing the API."""
    await pool.execute(
        'UPDATE "Agent" SET "configuration" = $1::text::jsonb WHERE "id" = $2', json.dumps(configuration), agent_id
    )


@pytest.mark.parametrize("nodes", [{"start": {"type": "speak"}}, None, "start"], ids=["object", "null", "string"])
async def test_a_call_on_a_path_whose_nodes_are_not_an_array_fails_naming_them_and_keeps_its_call_log(
    engine: str, pool: asyncpg.Pool, acme: Tenant, nodes: Any
) -> None:
    number, agent_id = await make_line(pool, acme.organization_id)
    await store_graph(pool, agent_id, nodes)

    result = await call(engine, number, Say("hello"), timeout_s=30)

    assert result.webhook_status == 200 and result.stream_url is not None
    log = await call_log(pool, result)
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "pipeline_unavailable")
    assert "nodes: must be a JSON array" in log["metadata"]["endDetail"]


async def test_a_path_whose_nodes_are_not_an_array_is_listed_shown_and_fixed_through_the_api(
    engine: str, pool: asyncpg.Pool, acme: Tenant
) -> None:
    _, agent_id = await make_line(pool, acme.organization_id)
    path_id = await store_graph(pool, agent_id, {"start": {"type": "speak"}})
    fixed = [{"id": "start", "type": "speak", "data": {"isStart": True, "text": OPENING}}]
    async with aiohttp.ClientSession() as session:
        api = Api(session, engine)
        listed_status, listed = await api.call("GET", "/conversation-paths?limit=100", acme.owner_key)
        shown_status, shown = await api.call("GET", f"/conversation-paths/{path_id}", acme.owner_key)
        half_status, half = await api.call(
            "PATCH", f"/conversation-paths/{path_id}", acme.owner_key, json={"edges": []}
        )
        fixed_status, saved = await api.call(
            "PATCH", f"/conversation-paths/{path_id}", acme.owner_key, json={"nodes": fixed, "edges": []}
        )

    assert listed_status == 200 and path_id in [path["id"] for path in listed["data"]], listed
    assert shown_status == 200 and shown["nodes"] == {"start": {"type": "speak"}}, shown
    assert half_status == 422 and half["error"]["field"] == "nodes", half
    assert fixed_status == 200 and saved["nodes"] == fixed, saved


async def test_an_agent_whose_stored_configuration_is_null_answers_on_the_defaults(
    engine: str, pool: asyncpg.Pool, acme: Tenant
) -> None:
    number, agent_id = await make_line(pool, acme.organization_id, firstSentence=OPENING)
    await store_configuration(pool, agent_id, None)

    result = await call(engine, number, Say("hello"), timeout_s=30)

    log = await call_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    assert any(row["speaker"] == "agent" for row in await turns(pool, log["id"]))


async def test_an_agent_whose_stored_configuration_is_not_an_object_has_its_caller_told_the_line_is_not_set_up(
    engine: str, pool: asyncpg.Pool, acme: Tenant
) -> None:
    number, agent_id = await make_line(pool, acme.organization_id)
    await store_configuration(pool, agent_id, ["sphinx", "espeak"])

    result = await call(engine, number, Say("hello"), timeout_s=30)

    assert result.webhook_status == 200 and result.refusal == MISCONFIGURED
    assert (await agents.get_agent(pool, organization_id=acme.organization_id, agent_id=agent_id)).configuration == [
        "sphinx",
        "espeak",
    ]


async def linked_tool(pool: asyncpg.Pool, organization_id: str, agent_id: str, configuration: Any) -> str:
    """A connected Tool linked to the agent whose stored configuration is `configuration` (JSON), as another writer
    left it."""
    tool = await tools.create_tool(pool, organization_id=organization_id, name="CRM", is_connected=True)
    await agents.link_tool(pool, organization_id=organization_id, agent_id=agent_id, tool_id=tool.id)
    await pool.execute(
        'UPDATE "Tool" SET "configuration" = $1::text::jsonb WHERE "id" = $2', json.dumps(configuration), tool.id
    )
    return tool.id


async def test_an_agent_linked_to_a_tool_whose_stored_configuration_is_null_answers_its_calls(
    engine: str, pool: asyncpg.Pool, acme: Tenant
) -> None:
    number, agent_id = await make_line(pool, acme.organization_id, firstSentence=OPENING)
    tool_id = await linked_tool(pool, acme.organization_id, agent_id, None)

    result = await call(engine, number, Say("hello"), timeout_s=30)
    async with aiohttp.ClientSession() as session:
        shown_status, shown = await Api(session, engine).call("GET", f"/tools/{tool_id}", acme.owner_key)

    log = await call_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    assert shown_status == 200 and shown["configurationKeys"] == [], shown


async def test_a_call_whose_agents_tool_configuration_is_not_an_object_fails_naming_the_tool(
    engine: str, pool: asyncpg.Pool, acme: Tenant
) -> None:
    number, agent_id = await make_line(pool, acme.organization_id)
    tool_id = await linked_tool(pool, acme.organization_id, agent_id, "function")

    result = await call(engine, number, Say("hello"), timeout_s=30)

    log = await call_log(pool, result)
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "pipeline_unavailable")
    assert f"({tool_id}): its configuration is not a JSON object" in log["metadata"]["endDetail"]
