"""POST /v1/calls through the real server: an outbound call placed on a fake Twilio, which answers by opening the
engine's media stream; and every refusal answered in the API's error shape, with nothing dialed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from engine.simulator import Say
from storage import phone_numbers
from storage.enums import CallerType, PhoneNumberStatus
from tests.engine_server import running_engine
from tests.fakes.twilio import Answer, FakeTwilio, Refuse
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_outbound_calls import callee, finished_log, make_agent


@pytest.fixture(scope="module")
async def engine(db_url: str, twilio: FakeTwilio) -> AsyncIterator[str]:
    async with running_engine(
        db_url,
        twilio_auth_token=twilio.auth_token,
        twilio_account_sid=twilio.account_sid,
        twilio_api_base=twilio.api_base,
    ) as base:
        yield base


@pytest.fixture(scope="module")
async def tenant(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Dialer")


@pytest.fixture(scope="module")
async def caller_id(pool: asyncpg.Pool, tenant: Tenant) -> str:
    number = await phone_numbers.create_phone_number(
        pool, organization_id=tenant.organization_id, phone_number="+15550188001"
    )
    return number.phone_number


@pytest.fixture
async def api(engine: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine)


async def test_a_call_placed_through_the_api_runs_and_ends_completed(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio, tenant: Tenant, caller_id: str
) -> None:
    agent_id = await make_agent(pool, tenant.organization_id, firstSentence="Hello, this is the clinic.")
    to = callee()
    twilio.behave(to, Answer(greeting="Hello?", script=[Say("I would like to book an appointment")]))
    status, body = await api.call(
        "POST",
        "/calls",
        tenant.owner_key,
        json={"agentId": agent_id, "fromNumber": caller_id, "to": to, "variables": {"name": "Ada"}},
    )
    assert status == 201, body
    assert body["status"] == "IN_PROGRESS" and body["callSid"].startswith("CA")
    log = await finished_log(pool, body["callLogId"])
    assert log["callType"] == "OUTBOUND" and log["status"] == "COMPLETED"
    assert log["customer"] == "Ada" and log["phoneNumber"] == to and log["callId"] == body["callSid"]
    assert twilio.creates[to] == 1
    status, entry = await api.call("GET", f"/call-logs/{body['callLogId']}", tenant.owner_key)
    assert status == 200 and entry["status"] == "COMPLETED"


async def test_refusals_name_the_field_and_dial_nothing(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio, tenant: Tenant, caller_id: str
) -> None:
    outbound = await make_agent(pool, tenant.organization_id)
    inbound = await make_agent(pool, tenant.organization_id, caller_type=CallerType.INBOUND)
    disabled = await phone_numbers.create_phone_number(
        pool, organization_id=tenant.organization_id, phone_number="+15550188002"
    )
    await phone_numbers.update_phone_number(
        pool,
        organization_id=tenant.organization_id,
        phone_number_id=disabled.id,
        changes={"outbound_status": PhoneNumberStatus.DISABLED},
    )
    rival = await make_tenant(pool, "Caller id thief")
    theirs = await phone_numbers.create_phone_number(
        pool, organization_id=rival.organization_id, phone_number="+15550188005"
    )
    to = callee()
    cases = [
        ({"agentId": outbound, "fromNumber": theirs.phone_number, "to": to}, 422, "fromNumber"),
        ({"agentId": outbound, "fromNumber": caller_id, "to": "12345"}, 422, "to"),
        ({"agentId": outbound, "fromNumber": "+1555", "to": to}, 422, "fromNumber"),
        ({"agentId": inbound, "fromNumber": caller_id, "to": to}, 422, "agentId"),
        ({"agentId": "nope", "fromNumber": caller_id, "to": to}, 422, "agentId"),
        ({"agentId": outbound, "fromNumber": disabled.phone_number, "to": to}, 422, "fromNumber"),
        ({"agentId": outbound, "fromNumber": "+15550188999", "to": to}, 422, "fromNumber"),
        ({"agentId": outbound, "fromNumber": caller_id, "to": to, "variables": {"bad name": "x"}}, 422, None),
        ({"agentId": outbound, "fromNumber": caller_id}, 422, "to"),
    ]
    for payload, expected, field in cases:
        status, body = await api.call("POST", "/calls", tenant.owner_key, json=payload)
        assert status == expected, (payload, body)
        if field is not None:
            assert body["error"]["field"] == field, (payload, body)
            assert "from_number" not in body["error"]["message"], body  # the API's names, not the code's
    status, body = await api.call(
        "POST", "/calls", tenant.viewer_key, json={"agentId": outbound, "fromNumber": caller_id, "to": to}
    )
    assert status == 403
    assert to not in twilio.creates


@pytest.mark.parametrize("name", ["today", "customer", "customer.name", "call.direction", "now"])
async def test_a_variable_named_like_a_built_in_prompt_variable_is_refused_naming_it_and_dials_nothing(  # noqa: PLR0917
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio, tenant: Tenant, caller_id: str, name: str
) -> None:
    # It would replace the built-in in the call's prompt and first sentence ("Today is whenever."), or lose the
    # user's value: either way the user meant data by it, and renaming it is theirs to do.
    agent_id = await make_agent(pool, tenant.organization_id)
    to = callee()
    payload = {"agentId": agent_id, "fromNumber": caller_id, "to": to, "variables": {"plan": "gold", name: "x"}}
    status, body = await api.call("POST", "/calls", tenant.owner_key, json=payload)
    assert (status, body["error"]["field"]) == (422, "variables"), body
    assert f"a variable named {name!r} would hide the built-in prompt variable {{{{" in body["error"]["message"]
    assert body["error"]["message"].endswith("; rename it")
    assert to not in twilio.creates


async def test_no_credits_is_402_and_twilio_refusing_is_502_with_the_call_log_failed(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio, caller_id: str
) -> None:
    broke = await make_tenant(pool, "Broke", credits=0)
    number = await phone_numbers.create_phone_number(
        pool, organization_id=broke.organization_id, phone_number="+15550188003"
    )
    agent_id = await make_agent(pool, broke.organization_id)
    status, body = await api.call(
        "POST", "/calls", broke.owner_key, json={"agentId": agent_id, "fromNumber": number.phone_number, "to": callee()}
    )
    assert status == 402 and body["error"]["code"] == "no_credits"

    rich = await make_tenant(pool, "Refused")
    number = await phone_numbers.create_phone_number(
        pool, organization_id=rich.organization_id, phone_number="+15550188004"
    )
    agent_id = await make_agent(pool, rich.organization_id)
    to = callee()
    twilio.behave(to, Refuse(code=21215, message="Geo permission not enabled"))
    status, body = await api.call(
        "POST", "/calls", rich.owner_key, json={"agentId": agent_id, "fromNumber": number.phone_number, "to": to}
    )
    assert status == 502 and "21215" in body["error"]["message"]
    rows = await pool.fetch('SELECT "status", "metadata" FROM "CallLog" WHERE "phoneNumber" = $1', to)
    assert [row["status"] for row in rows] == ["FAILED"]
