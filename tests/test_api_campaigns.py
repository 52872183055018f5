"""/v1/campaigns through the real server: create with dialing rules, add recipients (a list or a CSV file's text,
bad numbers kept as ERROR, duplicates merged), the lifecycle (start, pause, resume, stop) and its refusals, and
another organization's key seeing nothing. The engine's dispatcher is off: dialing is tests/test_dispatch_*'s."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from storage import campaigns, phone_numbers
from storage.enums import AgentStatus, CallerType, CampaignStatus, PhoneNumberStatus
from tests.engine_server import running_engine
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_credit_reservations import blocked_on_a_lock
from tests.test_outbound_calls import make_agent


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    async with running_engine(db_url, dispatch_enabled=False) as base:
        yield base


@pytest.fixture
async def api(engine: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine)


@pytest.fixture(scope="module")
async def tenant(pool: asyncpg.Pool) -> Tenant:
    """An organization with a US number: by default it dials the US, where these tests' recipients are."""
    tenant = await make_tenant(pool, "Campaigner")
    await phone_numbers.create_phone_number(pool, organization_id=tenant.organization_id, phone_number="+15550177000")
    return tenant


async def new_campaign(api: Api, pool: asyncpg.Pool, tenant: Tenant, **fields: Any) -> dict[str, Any]:
    agent_id = await make_agent(pool, tenant.organization_id)
    status, campaign = await api.call(
        "POST", "/campaigns", tenant.owner_key, json={"batchName": "Check-ups", "agentId": agent_id, **fields}
    )
    assert status == 201, campaign
    created: dict[str, Any] = campaign
    return created


async def test_a_campaign_is_created_with_its_rules_and_filled_with_recipients(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    campaign = await new_campaign(
        api,
        pool,
        tenant,
        taskPrompt="Book a check-up for {{name}}.",
        callStartTime="09:00",
        callEndTime="17:30",
        timezone="America/New_York",
        daysOfWeek=[1, 2, 3, 4, 5],
        maxConcurrentCalls=5,
        callsPerSecond=2,
        retry={"maxAttempts": 3, "retryOn": ["busy", "voicemail"], "delaysSeconds": [600, 3600]},
    )
    assert campaign["status"] == "DRAFT" and campaign["totalCalls"] == 0 and campaign["paused"] is False
    assert campaign["rules"]["timezone"] == "America/New_York"
    assert sorted(campaign["rules"]["daysOfWeek"]) == [1, 2, 3, 4, 5]
    assert campaign["rules"]["retry"]["maxAttempts"] == 3
    path = f"/campaigns/{campaign['id']}/recipients"

    status, summary = await api.call(
        "POST",
        path,
        tenant.owner_key,
        json={
            "recipients": [
                {"phoneNumber": "+1 212 555 0101", "name": "Ann", "variables": {"doctor": "Dr Lee"}},
                {"phoneNumber": "(212) 555-0102", "name": "Bob"},
                {"phoneNumber": "12"},
            ],
            "defaultRegion": "US",
        },
    )
    assert status == 200, summary
    assert summary == {"rows": 3, "imported": 2, "merged": 0, "errors": 1}
    csv = '\ufeffName;Phone;Notes;plan\nCy;+12125550103;"likes mornings; early";gold\nAnn again;+12125550101;;\n'
    status, summary = await api.call("POST", path, tenant.owner_key, json={"csv": csv})
    assert status == 200, summary
    assert summary == {"rows": 2, "imported": 1, "merged": 1, "errors": 0}

    _, page = await api.call("GET", f"{path}?limit=2", tenant.viewer_key)
    _, rest = await api.call("GET", f"{path}?limit=2&cursor={page['nextCursor']}", tenant.viewer_key)
    recipients = page["data"] + rest["data"]
    assert rest["nextCursor"] is None
    assert sorted(r["phoneNumber"] for r in recipients if r["status"] != "ERROR") == [
        "+12125550101",
        "+12125550102",
        "+12125550103",
    ]
    _, errors = await api.call("GET", f"{path}?status=ERROR", tenant.owner_key)
    assert [r["phoneNumber"] for r in errors["data"]] == ["12"]
    _, fetched = await api.call("GET", f"/campaigns/{campaign['id']}", tenant.owner_key)
    assert fetched["totalCalls"] == 3

    status, body = await api.call("POST", path, tenant.owner_key, json={"csv": "name,notes\nAnn,hi\n"})
    assert (status, body["error"]["field"]) == (422, "csv")


async def test_a_csv_field_past_the_csv_modules_limit_is_a_422_naming_its_line(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    campaign = await new_campaign(api, pool, tenant)
    path = f"/campaigns/{campaign['id']}/recipients"
    csv = f"phone,plan\n+12125550187,gold\n+12125550188,{'z' * 140_000}\n"
    status, body = await api.call("POST", path, tenant.owner_key, json={"csv": csv})
    assert (status, body["error"]["field"]) == (422, "csv"), body
    assert body["error"]["message"].startswith("line 3: not readable as CSV (field larger than field limit")
    _, page = await api.call("GET", path, tenant.owner_key)
    assert page["data"] == []  # nothing imported


async def test_the_lifecycle_and_its_refusals(api: Api, pool: asyncpg.Pool, tenant: Tenant) -> None:
    campaign = await new_campaign(api, pool, tenant)
    base = f"/campaigns/{campaign['id']}"
    status, body = await api.call("POST", f"{base}/start", tenant.owner_key)
    assert status == 422, body  # nobody to call yet
    await api.call(
        "POST", f"{base}/recipients", tenant.owner_key, json={"recipients": [{"phoneNumber": "+12125550111"}]}
    )
    status, started = await api.call("POST", f"{base}/start", tenant.owner_key)
    assert status == 200 and started["status"] == "PLANNED"
    status, _ = await api.call("POST", f"{base}/start", tenant.owner_key)
    assert status == 409
    status, paused = await api.call("POST", f"{base}/pause", tenant.owner_key, json={"reason": "holiday"})
    assert status == 200 and (paused["paused"], paused["pausedReason"]) == (True, "holiday")
    status, resumed = await api.call("POST", f"{base}/resume", tenant.owner_key)
    assert status == 200 and resumed["paused"] is False
    status, stopped = await api.call("POST", f"{base}/stop", tenant.owner_key)
    assert status == 200 and stopped["status"] == "STOPPED" and stopped["finishedAt"] is not None
    _, recipients = await api.call("GET", f"{base}/recipients", tenant.owner_key)
    assert [r["status"] for r in recipients["data"]] != []
    for action in ("stop", "pause", "resume", "start"):
        status, _ = await api.call("POST", f"{base}/{action}", tenant.owner_key, json={} if action == "pause" else None)
        assert status == 409, action
    status, _ = await api.call("POST", f"{base}/stop", tenant.viewer_key)
    assert status == 403


@pytest.mark.parametrize(
    ("agent", "reason"),
    [
        ({"caller_type": CallerType.INBOUND}, "only OUTBOUND agents place calls"),
        ({"status": AgentStatus.INACTIVE}, "activate it first"),
    ],
    ids=["inbound", "inactive"],
)
async def test_a_campaign_whose_agent_may_not_call_out_does_not_start_as_a_call_would_not_be_placed(
    api: Api, pool: asyncpg.Pool, tenant: Tenant, agent: dict[str, Any], reason: str
) -> None:
    agent_id = await make_agent(pool, tenant.organization_id, **agent)
    status, campaign = await api.call(
        "POST", "/campaigns", tenant.owner_key, json={"batchName": "Too early", "agentId": agent_id}
    )
    assert status == 201  # a DRAFT may wait for its agent to be made ready
    base = f"/campaigns/{campaign['id']}"
    await api.call(
        "POST", f"{base}/recipients", tenant.owner_key, json={"recipients": [{"phoneNumber": "+12125550112"}]}
    )

    status, refused = await api.call("POST", f"{base}/start", tenant.owner_key)

    assert (status, refused["error"]["field"]) == (422, "agentId")
    # POST /v1/calls' own words for this agent (engine.twilio.outbound_calls.usable_agent, the one rule).
    assert refused["error"]["message"].startswith(f"Agent {agent_id} cannot place calls: ")
    assert reason in refused["error"]["message"]
    _, draft = await api.call("GET", base, tenant.owner_key)
    assert (draft["status"], draft["startedAt"]) == ("DRAFT", None)


async def test_invalid_rules_are_422_naming_the_field(api: Api, pool: asyncpg.Pool, tenant: Tenant) -> None:
    agent_id = await make_agent(pool, tenant.organization_id)
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"timezone": "Mars/Olympus"}, None),
        ({"callStartTime": "09:00"}, None),
        ({"callStartTime": "25:00", "callEndTime": "17:00"}, "callStartTime"),
        ({"daysOfWeek": [0]}, "daysOfWeek[0]"),
        ({"retry": {"retryOn": ["hung-up"]}}, "retry.retryOn[0]"),
        ({"agentId": "nobody"}, "agentId"),
    ]
    for fields, field in cases:
        status, body = await api.call(
            "POST", "/campaigns", tenant.owner_key, json={"batchName": "Bad", "agentId": agent_id, **fields}
        )
        assert status == 422, (fields, body)
        if field is not None:
            assert body["error"]["field"] == field, (fields, body)


async def test_the_caller_id_must_be_an_outbound_number_of_the_campaigns_own_organization(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    agent_id = await make_agent(pool, tenant.organization_id)
    own = await phone_numbers.create_phone_number(
        pool, organization_id=tenant.organization_id, phone_number="+15550177001"
    )
    disabled = await phone_numbers.create_phone_number(
        pool,
        organization_id=tenant.organization_id,
        phone_number="+15550177002",
        outbound_status=PhoneNumberStatus.DISABLED,
    )
    rival = await make_tenant(pool, "Number thief")
    theirs = await phone_numbers.create_phone_number(
        pool, organization_id=rival.organization_id, phone_number="+15550177003"
    )
    # The same 422 as POST /v1/calls gives for these numbers (tests/test_api_calls.py): one rule for both.
    for refused in (theirs.phone_number, disabled.phone_number, "+15550177999", "not a number"):
        fields = {"batchName": "Spoof", "agentId": agent_id, "fromNumber": refused}
        status, body = await api.call("POST", "/campaigns", tenant.owner_key, json=fields)
        assert (status, body["error"]["code"], body["error"]["field"]) == (422, "invalid_value", "fromNumber"), refused
    campaign = await new_campaign(api, pool, tenant, fromNumber="+1 555 017 7001")
    assert campaign["rules"]["fromNumber"] == own.phone_number


async def test_another_organization_sees_none_of_it(api: Api, pool: asyncpg.Pool, tenant: Tenant) -> None:
    campaign = await new_campaign(api, pool, tenant)
    other = await make_tenant(pool, "Rival")
    for method, suffix in (("GET", ""), ("GET", "/recipients"), ("POST", "/start"), ("POST", "/stop")):
        status, _ = await api.call(method, f"/campaigns/{campaign['id']}{suffix}", other.owner_key)
        assert status == 404, (method, suffix)
    _, page = await api.call("GET", "/campaigns", other.owner_key)
    assert page["data"] == []


async def test_a_delete_racing_a_stop_waits_for_it_and_deadlocks_nothing(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    campaign = await new_campaign(api, pool, tenant)
    organization_id, campaign_id = tenant.organization_id, campaign["id"]
    async with pool.acquire() as conn, conn.transaction():
        # A stop (or the dispatcher's claim) has taken its first lock, the campaign's dispatch row...
        await conn.execute('SELECT 1 FROM "CampaignDispatch" WHERE "campaignId" = $1 FOR UPDATE', campaign_id)
        deletion = asyncio.create_task(api.call("DELETE", f"/campaigns/{campaign_id}", tenant.owner_key))
        await blocked_on_a_lock(pool)
        # ...and goes on to the campaign's row, while the DELETE waits.
        stopped = await campaigns.stop_campaign(conn, organization_id=organization_id, campaign_id=campaign_id)
    assert stopped.status is CampaignStatus.STOPPED
    assert (await deletion)[0] == 204
    assert (await api.call("GET", f"/campaigns/{campaign_id}", tenant.owner_key))[0] == 404


async def refused_import(api: Api, pool: asyncpg.Pool, tenant: Tenant, request: dict[str, Any]) -> dict[str, Any]:
    """POST `request` to a new campaign's recipients, which must be a 422 importing nothing; its error."""
    campaign = await new_campaign(api, pool, tenant)
    path = f"/campaigns/{campaign['id']}/recipients"
    status, body = await api.call("POST", path, tenant.owner_key, json=request)
    assert status == 422, body
    _, page = await api.call("GET", path, tenant.owner_key)
    assert page["data"] == []  # nothing imported
    error: dict[str, Any] = body["error"]
    return error


async def test_two_csv_columns_that_would_share_a_variable_are_a_422_naming_both(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    # Both headers become {{plan_type}}; neither column's values may be dropped without a word.
    csv = "phone,plan type,plan-type\n+12125550191,gold,silver\n"
    error = await refused_import(api, pool, tenant, {"csv": csv})
    assert (error["field"], error["message"]) == (
        "csv",
        "columns 2 ('plan type') and 3 ('plan-type') would both be the variable {{plan_type}}; "
        "rename one (nothing was imported)",
    )


async def test_deleting_an_agent_a_campaign_uses_is_a_409_naming_the_campaign(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    campaign = await new_campaign(api, pool, tenant)
    agent_id = campaign["agentId"]
    status, body = await api.call("DELETE", f"/agents/{agent_id}", tenant.owner_key)
    # A campaign's agent cannot be changed: the way out is the campaign's deletion, and the answer says which one.
    assert (status, body["error"]["message"]) == (
        409,
        f"Agent {agent_id} is used by campaign 'Check-ups' ({campaign['id']}, DRAFT), whose agent cannot be "
        "changed; delete that campaign first (its calls stay in the call logs)",
    ), body
    await api.call("DELETE", f"/campaigns/{campaign['id']}", tenant.owner_key)
    assert (await api.call("DELETE", f"/agents/{agent_id}", tenant.owner_key))[0] == 204


async def test_an_agent_many_campaigns_use_is_refused_naming_three_and_counting_the_rest(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    first = await new_campaign(api, pool, tenant)
    agent_id = first["agentId"]
    for name in ("Renewals", "Surveys", "Reminders"):
        status, _ = await api.call(
            "POST", "/campaigns", tenant.owner_key, json={"batchName": name, "agentId": agent_id}
        )
        assert status == 201
    await api.call("POST", f"/campaigns/{first['id']}/stop", tenant.owner_key)  # finished ones count too
    status, body = await api.call("DELETE", f"/agents/{agent_id}", tenant.owner_key)
    message = body["error"]["message"]
    assert status == 409 and message.startswith(f"Agent {agent_id} is used by 4 campaigns: 'Check-ups' ("), body
    assert f"({first['id']}, STOPPED)" in message and "'Surveys'" in message and "'Reminders'" not in message
    assert message.endswith(
        " and 1 more, whose agent cannot be changed; delete those campaigns first (their calls stay in the call logs)"
    )


async def test_a_default_region_no_number_is_read_in_is_a_422_and_adds_no_recipient(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    # "UK" reads like the United Kingdom's code, which is GB: every row would be kept as an ERROR no request removes.
    csv = "phone,name\n020 7183 8750,Ann\n07700 900123,Bob\n"
    error = await refused_import(api, pool, tenant, {"csv": csv, "defaultRegion": "UK"})
    assert error["field"] == "defaultRegion"
    assert error["message"].endswith(
        "'UK' is not a region numbers are read in: give its ISO 3166 code, e.g. US, GB (the United Kingdom) or DE"
    ), error
