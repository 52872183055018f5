"""A Tool's `function` and `webhook` are checked when the API saves them, as a call would read them: a configuration
the call could not use is a 422 naming its field, never a Tool that makes every call of its agents fail.

Real server on loopback, the simulator as Twilio, the offline providers, real PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.simulator import Say
from storage import agents
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_calls_e2e import call, call_log, engine, make_line  # noqa: F401 (engine: a fixture)

GOOD = {
    "function": {"name": "check_availability", "parameters": {"type": "object", "properties": {}}},
    "webhook": {"url": "https://crm.example.com/availability", "timeoutSeconds": 5},
}


@pytest.fixture(scope="module")
async def acme(pool: asyncpg.Pool) -> Tenant:
    """The organization of every line and key here."""
    return await make_tenant(pool, "ToolShapes", credits=100)


BAD = [
    ({**GOOD, "function": {"name": "check availability"}}, "configuration.function.name"),
    ({**GOOD, "function": {"name": "end_call"}}, "configuration.function.name"),
    ({**GOOD, "function": "check_availability"}, "configuration.function"),
    ({"function": GOOD["function"]}, "configuration.webhook"),
    ({**GOOD, "webhook": {"url": "ftp://crm.example.com/x"}}, "configuration.webhook.url"),
    (
        {**GOOD, "webhook": {"url": "https://crm.example.com", "timeoutSeconds": 600}},
        "configuration.webhook.timeoutSeconds",
    ),
    ({**GOOD, "webhook": {"url": "https://crm.example.com", "retries": 3}}, "configuration.webhook.retries"),
    # OpenAI refuses a function whose parameters are not a JSON Schema of an object, and with it every request.
    (
        {**GOOD, "function": {"name": "book", "parameters": {"type": "array", "items": {}}}},
        "configuration.function.parameters",
    ),
    (
        {**GOOD, "function": {"name": "book", "parameters": {"type": "object", "properties": {"day": {"type": 7}}}}},
        "configuration.function.parameters",
    ),
]


@pytest.mark.parametrize(("configuration", "field"), BAD, ids=[field for _, field in BAD])
async def test_a_tool_configuration_a_call_could_not_use_is_refused_naming_its_field_and_calls_go_on(
    engine: str,  # noqa: F811
    pool: asyncpg.Pool,
    acme: Tenant,
    configuration: dict[str, Any],
    field: str,
) -> None:
    number, agent_id = await make_line(pool, acme.organization_id, firstSentence="Hello.")
    async with aiohttp.ClientSession() as session:
        api = Api(session, engine)
        made_status, made = await api.call(
            "POST", "/tools", acme.owner_key, json={"name": "CRM", "isConnected": True, "configuration": GOOD}
        )
        await agents.link_tool(pool, organization_id=acme.organization_id, agent_id=agent_id, tool_id=made["id"])
        created_status, created = await api.call(
            "POST", "/tools", acme.owner_key, json={"name": "CRM 2", "configuration": configuration}
        )
        changed_status, changed = await api.call(
            "PATCH", f"/tools/{made['id']}", acme.owner_key, json={"configuration": configuration}
        )

    result = await call(engine, number, Say("hello"), timeout_s=30)

    assert made_status == 201, made
    assert created_status == 422 and created["error"]["field"] == field, created
    assert changed_status == 422 and changed["error"]["field"] == field, changed
    assert created["error"]["message"].startswith(f"body {field}: "), created
    log = await call_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]


async def test_a_tool_that_only_holds_credentials_or_has_a_usable_function_is_saved(
    engine: str,  # noqa: F811
    acme: Tenant,
) -> None:
    async with aiohttp.ClientSession() as session:
        api = Api(session, engine)
        keys_status, _ = await api.call(
            "POST", "/tools", acme.owner_key, json={"configuration": {"apiKey": "sk"}, "name": "Keys"}
        )
        function_status, saved = await api.call(
            "POST", "/tools", acme.owner_key, json={"name": "CRM", "configuration": {**GOOD, "apiKey": "sk"}}
        )

    assert keys_status == 201
    assert function_status == 201 and saved["configurationKeys"] == ["apiKey", "function", "webhook"], saved
