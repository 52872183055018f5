"""Outbound calls and the seed's fields: the default caller id (POST /v1/calls and campaigns without a number of their
own: the agent's number, Agent.phoneNumberId, if it may call out, else the organization's first number that may), and
a campaign recipient's notes and extra CSV columns in the model's prompt.

The real server and PostgreSQL, the dispatcher's real dialer, the fake Twilio answering, the fake OpenAI behind
the OpenAI SDK."""

from __future__ import annotations

import asyncio
import io
import itertools
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from config.agent import parse_agent_configuration
from config.settings import load_settings
from engine.campaigns.dispatcher import CampaignDispatcher, DispatchTiming, PlaceCallDialer
from engine.campaigns.recipients_csv import read_recipients
from engine.twilio.outbound_calls import OutboundDeps
from engine.twilio.rest import TwilioCalls
from storage import agents, campaigns, dial_policies, phone_numbers
from storage.campaigns import DialingRules, NewRecipient
from storage.enums import CallerType, CampaignStatus, PhoneNumberStatus
from tests.engine_server import running_engine
from tests.fakes.openai_chat import FakeOpenAI
from tests.fakes.twilio import Answer, Busy, FakeTwilio
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_outbound_calls import callee, finished_log

OPENAI_KEY = "sk-outbound-fields"
MODEL_AGENT = {
    "stt": {"provider": "sphinx"},
    "llm": {"provider": "openai"},
    "tts": {"provider": "espeak"},
    "modelGreets": True,
    "endpointing": {"waitForGreeting": False},
}


@pytest.fixture(scope="module")
async def openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_KEY) as fake:
        fake.default_reply = "Hello, this is the clinic."
        yield fake


@pytest.fixture(scope="module")
async def deps(
    db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, openai: FakeOpenAI
) -> AsyncIterator[tuple[str, OutboundDeps]]:
    """The engine (its own dispatcher off) and what the test's dispatcher dials with."""
    settings: dict[str, Any] = {
        "twilio_auth_token": twilio.auth_token,
        "twilio_account_sid": twilio.account_sid,
        "twilio_api_base": twilio.api_base,
        "openai_api_key": OPENAI_KEY,
        "openai_base_url": openai.base_url,
    }
    async with running_engine(db_url, dispatch_enabled=False, **settings) as engine:
        client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
        try:
            loaded = load_settings(database_url=db_url, **settings)
            yield engine, OutboundDeps(pool=pool, settings=loaded, twilio=client, public_url=engine)
        finally:
            await client.close()


@pytest.fixture
async def api(deps: tuple[str, OutboundDeps]) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, deps[0])


@pytest.fixture(scope="module")
async def tenant(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Outbound", credits=500)


_numbers = (f"+1555017{n:04d}" for n in itertools.count(7100))


def new_number() -> str:
    """A number no organization of this module's database has (fictional +1 555 range)."""
    return next(_numbers)


async def number(
    pool: asyncpg.Pool, organization_id: str, phone: str, *, outbound: bool = True, days_old: int = 0
) -> str:
    """A new number of the organization, added `days_old` days ago; its id."""
    created = await phone_numbers.create_phone_number(pool, organization_id=organization_id, phone_number=phone)
    if not outbound:
        await phone_numbers.update_phone_number(
            pool,
            organization_id=organization_id,
            phone_number_id=created.id,
            changes={"outbound_status": PhoneNumberStatus.DISABLED},
        )
    if days_old:
        await pool.execute(
            'UPDATE "PhoneNumber" SET "createdAt" = "createdAt" - make_interval(days => $2) WHERE "id" = $1',
            created.id,
            days_old,
        )
    return created.id


async def outbound_agent(pool: asyncpg.Pool, organization_id: str, phone_number_id: str | None) -> str:
    agent = await agents.create_agent(
        pool,
        organization_id=organization_id,
        name="Caller",
        caller_type=CallerType.OUTBOUND,
        phone_number_id=phone_number_id,
        configuration=parse_agent_configuration(MODEL_AGENT).to_json(),
    )
    return agent.id


async def placed_from(api: Api, pool: asyncpg.Pool, twilio: FakeTwilio, tenant: Tenant, agent_id: str) -> str:
    """The number POST /v1/calls without a fromNumber dials from for the agent (the callee's line is busy)."""
    to = callee()
    twilio.behave(to, Busy())
    status, body = await api.call("POST", "/calls", tenant.owner_key, json={"agentId": agent_id, "to": to})
    assert status == 201, body
    log = await finished_log(pool, body["callLogId"])
    [placed] = twilio.calls_to(to)
    assert log["metadata"]["from"] == placed.from_
    return placed.from_


async def test_a_call_without_a_from_number_is_placed_from_the_agents_number(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant = await make_tenant(pool, "Own")
    org = tenant.organization_id
    await number(pool, org, new_number(), days_old=2)  # the organization's first, and it may call out: not used
    own = new_number()
    agent_id = await outbound_agent(pool, org, await number(pool, org, own))
    assert await placed_from(api, pool, twilio, tenant, agent_id) == own


async def test_a_call_for_an_agent_without_a_number_is_placed_from_the_organizations_first_outbound_number(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant = await make_tenant(pool, "Numberless")
    org = tenant.organization_id
    await number(pool, org, new_number(), outbound=False, days_old=3)  # the oldest, but it may not call out
    first = new_number()
    await number(pool, org, first, days_old=2)
    await number(pool, org, new_number(), days_old=1)
    await number(pool, org, new_number())
    agent_id = await outbound_agent(pool, org, None)
    assert await placed_from(api, pool, twilio, tenant, agent_id) == first


async def test_a_call_for_an_agent_whose_number_may_not_call_out_is_placed_from_the_organizations_first(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant = await make_tenant(pool, "InboundOnly")
    org = tenant.organization_id
    inbound_only = await number(pool, org, new_number(), outbound=False, days_old=3)
    first = new_number()
    await number(pool, org, first, days_old=2)
    await number(pool, org, new_number(), days_old=1)
    agent_id = await outbound_agent(pool, org, inbound_only)
    assert await placed_from(api, pool, twilio, tenant, agent_id) == first


async def test_another_organizations_number_is_never_the_default_caller_id(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    other = await make_tenant(pool, "Neighbour")
    await number(pool, other.organization_id, new_number(), days_old=30)  # older than any of the caller's
    tenant = await make_tenant(pool, "Tenant")
    own = new_number()
    await number(pool, tenant.organization_id, own)
    agent_id = await outbound_agent(pool, tenant.organization_id, None)
    assert await placed_from(api, pool, twilio, tenant, agent_id) == own


async def test_a_call_without_a_from_number_is_refused_when_no_number_may_call_out(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    other = await make_tenant(pool, "Neighbour")
    await number(pool, other.organization_id, new_number(), days_old=30)  # may call out, but not the caller's
    tenant = await make_tenant(pool, "Silent")
    org = tenant.organization_id
    inbound_only = await number(pool, org, new_number(), outbound=False)
    await number(pool, org, new_number(), outbound=False)
    agent_id = await outbound_agent(pool, org, inbound_only)
    to = callee()
    status, body = await api.call("POST", "/calls", tenant.owner_key, json={"agentId": agent_id, "to": to})
    assert status == 422, body
    assert body["error"]["field"] == "fromNumber"
    message = body["error"]["message"]
    assert f"neither agent {agent_id} nor its organization has a number with outbound calls ENABLED" in message
    assert "set fromNumber, or enable outbound calls on the agent's number or another" in message
    assert to not in twilio.creates
    assert await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "organizationId" = $1', org) == 0


async def run_campaign(deps: tuple[str, OutboundDeps], pool: asyncpg.Pool, campaign_id: str) -> None:
    """Dispatch the started campaign with the real dialer until it is COMPLETED."""
    dispatcher = CampaignDispatcher(
        pool, PlaceCallDialer(deps[1]), timing=DispatchTiming(interval=timedelta(seconds=0.2))
    )
    dispatcher.start()
    try:
        for _ in range(600):
            status = await pool.fetchval('SELECT "status" FROM "Campaign" WHERE "id" = $1', campaign_id)
            if status == CampaignStatus.COMPLETED:
                break
            await asyncio.sleep(0.1)
    finally:
        await dispatcher.close()
    assert status == CampaignStatus.COMPLETED


async def test_a_campaign_and_a_call_without_a_from_number_call_from_the_same_number(
    deps: tuple[str, OutboundDeps], api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    other = await make_tenant(pool, "Neighbour")
    await number(pool, other.organization_id, new_number(), days_old=30)
    tenant = await make_tenant(pool, "Both")
    org = tenant.organization_id
    inbound_only = await number(pool, org, new_number(), outbound=False, days_old=3)
    first = new_number()
    await number(pool, org, first, days_old=2)
    await number(pool, org, new_number(), days_old=1)
    agent_id = await outbound_agent(pool, org, inbound_only)
    campaign = await campaigns.create_campaign(
        pool, organization_id=org, batch_name="Same number", agent_id=agent_id, rules=DialingRules(calls_per_second=5)
    )
    to = callee()
    twilio.behave(to, Busy())
    await campaigns.import_recipients(
        pool, organization_id=org, campaign_id=campaign.id, recipients=[NewRecipient(phone_number=to)]
    )
    await campaigns.start_campaign(pool, organization_id=org, campaign_id=campaign.id)
    await run_campaign(deps, pool, campaign.id)
    [campaign_call] = twilio.calls_to(to)
    assert campaign_call.from_ == await placed_from(api, pool, twilio, tenant, agent_id) == first


async def test_a_campaign_call_speaks_from_the_agents_number_with_the_recipients_notes_and_columns(
    deps: tuple[str, OutboundDeps], pool: asyncpg.Pool, twilio: FakeTwilio, openai: FakeOpenAI, tenant: Tenant
) -> None:
    org = tenant.organization_id
    await number(pool, org, "+15550177010")
    own = await number(pool, org, "+15550177011")
    agent_id = await outbound_agent(pool, org, own)
    campaign = await campaigns.create_campaign(
        pool,
        organization_id=org,
        batch_name="Renewals",
        agent_id=agent_id,
        task_prompt="Call {{name}} about the {{plan}} plan. Notes: {{notes}}",
        rules=DialingRules(max_concurrent_calls=1, calls_per_second=5),
    )
    to = callee()
    twilio.behave(to, Answer(greeting="Hello?"))
    csv = f'name,phone,notes,plan\nAnn,{to},"prefers mornings, call after 9",gold\n'
    await campaigns.import_recipients(
        pool,
        organization_id=org,
        campaign_id=campaign.id,
        recipients=[
            row.recipient
            for row in read_recipients(
                io.StringIO(csv), policy=await dial_policies.get_policy(pool, organization_id=org)
            )
        ],
    )
    await campaigns.start_campaign(pool, organization_id=org, campaign_id=campaign.id)
    await run_campaign(deps, pool, campaign.id)
    assert [call.from_ for call in twilio.calls_to(to)] == ["+15550177011"]
    prompts = [request["messages"][0]["content"] for request in openai.requests]
    assert "Call Ann about the gold plan. Notes: prefers mornings, call after 9" in prompts
