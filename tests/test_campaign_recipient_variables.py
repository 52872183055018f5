"""A recipient's variables (its extra CSV columns, name and notes) within what a call may carry: an import keeps a row
over the limits as ERROR with its line and why, instead of queueing a recipient every dial would refuse; one queued
before that check is not dialed and not retried. Through the real server and dispatcher, on the fake Twilio."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import timedelta

import aiohttp
import asyncpg
import pytest

from engine.campaigns.dispatcher import CampaignDispatcher, DispatchTiming, PlaceCallDialer
from engine.campaigns.recipients_csv import read_recipients
from engine.twilio.outbound_calls import MAX_VARIABLE_CHARS, MAX_VARIABLES, OutboundDeps
from storage import campaigns, phone_numbers
from storage.campaigns import NewRecipient
from storage.enums import RecipientStatus
from tests.fakes.twilio import FakeTwilio
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_dial_policy import at_home
from tests.test_dispatch_do_not_call import deps, engine, new_organization  # noqa: F401 (fixtures)
from tests.test_outbound_calls import make_agent


@pytest.fixture
async def api(engine: str) -> AsyncIterator[Api]:  # noqa: F811
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine)


@pytest.fixture(scope="module")
async def tenant(pool: asyncpg.Pool) -> Tenant:
    """An organization with a US number: by default it dials the US, where these tests' numbers are."""
    tenant = await make_tenant(pool, "Variables")
    await phone_numbers.create_phone_number(pool, organization_id=tenant.organization_id, phone_number="+12125550178")
    return tenant


async def recipients_path(api: Api, pool: asyncpg.Pool, tenant: Tenant) -> str:
    """The recipients of a new campaign of the tenant, as an API path."""
    agent_id = await make_agent(pool, tenant.organization_id)
    _, campaign = await api.call("POST", "/campaigns", tenant.owner_key, json={"batchName": "V", "agentId": agent_id})
    return f"/campaigns/{campaign['id']}/recipients"


def parse(text: str) -> list[NewRecipient]:
    return [row.recipient for row in read_recipients(io.StringIO(text), policy=at_home("US"))]


def test_a_column_longer_than_a_call_carries_makes_its_row_an_error_naming_it() -> None:
    long = "x" * (MAX_VARIABLE_CHARS + 1)
    ok, too_long = parse(f"phone,plan\n+12125550181,gold\n+12125550182,{long}\n")
    assert ok.status == RecipientStatus.READY
    assert (too_long.status, too_long.phone_number) == (RecipientStatus.ERROR, "+12125550182")
    assert too_long.error_reason == f"line 3: variables.plan: at most {MAX_VARIABLE_CHARS} characters, got 2,001"


def test_long_notes_and_too_many_columns_are_errors_too() -> None:
    notes = "n" * (MAX_VARIABLE_CHARS + 1)
    header = ",".join(f"c{n}" for n in range(MAX_VARIABLES))
    [long_notes] = parse(f"phone,notes\n+12125550183,{notes}\n")
    [wide] = parse(f"phone,name,{header}\n+12125550184,Ann,{','.join('v' * MAX_VARIABLES)}\n")
    assert long_notes.error_reason == f"line 2: variables.notes: at most {MAX_VARIABLE_CHARS} characters, got 2,001"
    assert wide.error_reason == f"line 2: variables: at most {MAX_VARIABLES} per call, got {MAX_VARIABLES + 1}"


async def test_the_api_import_keeps_such_a_row_as_error_and_never_queues_it(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    path = await recipients_path(api, pool, tenant)
    csv = f"phone,plan\n+12125550185,gold\n+12125550186,{'y' * 5000}\n"
    status, summary = await api.call("POST", path, tenant.owner_key, json={"csv": csv})
    assert (status, summary) == (200, {"rows": 2, "imported": 1, "merged": 0, "errors": 1})
    _, page = await api.call("GET", f"{path}?state=error", tenant.owner_key)
    [error] = page["data"]
    assert error["phoneNumber"] == "+12125550186"
    assert error["error"] == {
        "at": "line 3",
        "line": 3,
        "reason": f"variables.plan: at most {MAX_VARIABLE_CHARS} characters, got 5,000",
    }


async def test_a_recipient_queued_with_variables_no_call_carries_fails_once_without_a_dial(
    pool: asyncpg.Pool,
    twilio: FakeTwilio,
    deps: OutboundDeps,  # noqa: F811
) -> None:
    organization_id = await new_organization(pool)
    number = "+12125550189"
    await phone_numbers.create_phone_number(pool, organization_id=organization_id, phone_number="+12125550190")
    agent_id = await make_agent(pool, organization_id)
    campaign = await campaigns.create_campaign(
        pool, organization_id=organization_id, batch_name="Legacy", agent_id=agent_id
    )
    # As an import before the check queued it: straight into storage.
    await campaigns.import_recipients(
        pool,
        organization_id=organization_id,
        campaign_id=campaign.id,
        recipients=[NewRecipient(phone_number=number, variables={"plan": "p" * (MAX_VARIABLE_CHARS + 1)})],
    )
    await campaigns.start_campaign(pool, organization_id=organization_id, campaign_id=campaign.id)
    dispatcher = CampaignDispatcher(
        pool, PlaceCallDialer(deps), timing=DispatchTiming(interval=timedelta(0), idle_recheck=timedelta(0))
    )
    for _ in range(20):
        await dispatcher.tick()
        await dispatcher.drain()
        if await pool.fetchval('SELECT "status" FROM "Campaign" WHERE "id" = $1', campaign.id) == "COMPLETED":
            break
    row = await pool.fetchrow(
        """
        SELECT d."state", d."attempts", d."lastReason", r."status" FROM "CampaignRecipientDispatch" d
        JOIN "CampaignRecipient" r ON r."id" = d."recipientId" WHERE r."campaignId" = $1
        """,
        campaign.id,
    )
    assert row is not None
    assert (row["state"], row["attempts"]) == ("FAILED", 0)
    assert row["lastReason"] == f"not dialed: variables.plan: at most {MAX_VARIABLE_CHARS} characters, got 2,001"
    assert await pool.fetchval('SELECT "status" FROM "Campaign" WHERE "id" = $1', campaign.id) == "COMPLETED"
    assert twilio.creates[number] == 0


async def test_a_csv_column_named_like_a_built_in_prompt_variable_refuses_the_import_naming_it(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    # {{today}} would read the column's text on every call of the campaign: the user renames the column instead.
    path = await recipients_path(api, pool, tenant)

    status, body = await api.call(
        "POST", path, tenant.owner_key, json={"csv": "name,phone,today\nAnn,+12125550191,x\n"}
    )
    _, page = await api.call("GET", path, tenant.owner_key)

    assert (status, body["error"]["field"]) == (422, "csv"), body
    assert body["error"]["message"] == (
        "column 3 ('today'): a variable named 'today' would hide the built-in prompt variable {{today}} (the date of "
        "the call), which every call fills in; rename the column (nothing was imported)"
    )
    assert page["data"] == []


@pytest.mark.parametrize("name", ["customer", "customer.name", "call"])
async def test_api_variables_named_like_a_built_in_prompt_variable_refuse_the_import_naming_them(
    api: Api, pool: asyncpg.Pool, tenant: Tenant, name: str
) -> None:
    path = await recipients_path(api, pool, tenant)
    recipients = [{"phoneNumber": "+12125550192"}, {"phoneNumber": "+12125550193", "variables": {name: "VIP"}}]

    status, body = await api.call("POST", path, tenant.owner_key, json={"recipients": recipients})
    _, page = await api.call("GET", path, tenant.owner_key)

    assert (status, body["error"]["field"]) == (422, "recipients[1].variables"), body
    assert f"a variable named {name!r} would hide the built-in prompt variable {{{{" in body["error"]["message"]
    assert page["data"] == []
