"""Concurrent calls per organization by plan: the slot is taken atomically in PostgreSQL, whatever the number of
engine processes; inbound calls over the limit hear a refusal, POST /v1/calls waits then answers 429, campaign
recipients stay queued until a slot frees, and calls of a dead engine give their slots back through recovery."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from config.settings import load_settings
from engine.campaigns.dispatcher import CampaignDispatcher, DispatchTiming, PlaceCallDialer
from engine.twilio.outbound_calls import OutboundDeps
from engine.twilio.rest import TwilioCalls
from engine.twilio.webhooks import ALL_LINES_BUSY
from storage import call_logs, campaigns, engine_nodes, organizations, phone_numbers
from storage.call_slots import ConcurrentCallLimitReached
from storage.campaigns import DialingRules, NewRecipient
from storage.enums import CallStatus, CallType, Plan
from storage.records import new_id
from tests.databases import TestDatabases
from tests.engine_server import running_engine
from tests.fakes.twilio import FakeTwilio, NoAnswer
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_outbound_calls import callee, make_agent
from tests.test_twilio_webhooks import TOKEN, _line, _post, _ring

_caller_ids = itertools.count(1)
"""Numbers of the organizations' own lines, unique in a module's database (random ones collided a few times a hundred
runs: one module makes dozens)."""

LIMITS = {"free": 2, "pro": 3, "enterprise": 0}
RATES = {"free": 1, "pro": 1, "enterprise": 1}
SETTINGS: dict[str, Any] = {
    "max_concurrent_calls_free": 2,
    "max_concurrent_calls_pro": 3,
    "max_concurrent_calls_enterprise": 0,
}


@pytest.fixture(scope="module")
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(auth_token=TOKEN) as fake:
        yield fake


@pytest.fixture(scope="module")
async def engine(db_url: str, twilio: FakeTwilio) -> AsyncIterator[str]:
    """The engine on loopback with the plan limits above, a short wait for a slot, and the fake Twilio."""
    async with running_engine(
        db_url,
        dispatch_enabled=False,
        call_slot_wait=0.5,
        twilio_auth_token=TOKEN,
        twilio_account_sid=twilio.account_sid,
        twilio_api_base=twilio.api_base,
        **SETTINGS,
    ) as base:
        yield base


@pytest.fixture
async def api(engine: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine)


async def organization(pool: asyncpg.Pool, plan: Plan = Plan.FREE, credits: int = 100) -> str:
    slug = f"limits-{secrets.token_hex(4)}"
    org = await organizations.create_organization(pool, name="Limits", slug=slug, plan=plan, credits=credits)
    return org.id


async def open_call(db: asyncpg.Pool, organization_id: str, limits: dict[str, int] | None = LIMITS) -> str:
    """An inbound call starting now, taking a slot under `limits`; its CallLog id."""
    log = await call_logs.create_call_log(
        db,
        organization_id=organization_id,
        call_type=CallType.INBOUND,
        call_id="CA" + secrets.token_hex(16),
        credit_rates=RATES,
        call_limits=limits,
    )
    return log.id


async def end_call(pool: asyncpg.Pool, organization_id: str, call_log_id: str) -> None:
    await call_logs.finalize_call_log(
        pool, organization_id=organization_id, call_log_id=call_log_id, status=CallStatus.COMPLETED, duration=1
    )


async def in_progress(pool: asyncpg.Pool, organization_id: str) -> int:
    count: int = await pool.fetchval(
        """SELECT count(*) FROM "CallLog" WHERE "organizationId" = $1 AND "status" = 'IN_PROGRESS'""", organization_id
    )
    return count


# -- The slot itself, in PostgreSQL ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("plan", "limit"), [(Plan.FREE, 2), (Plan.PRO, 3)])
async def test_calls_racing_for_the_last_slots_from_two_processes_get_exactly_the_plans_limit(
    databases: TestDatabases, db_url: str, pool: asyncpg.Pool, plan: Plan, limit: int
) -> None:
    org = await organization(pool, plan)
    other_process = await databases.pool(db_url)  # a second engine's pool: its own connections
    try:
        outcomes = await asyncio.gather(
            *(open_call(pool if n % 2 else other_process, org) for n in range(12)), return_exceptions=True
        )
    finally:
        await other_process.close()
    refused = [outcome for outcome in outcomes if isinstance(outcome, ConcurrentCallLimitReached)]
    opened = [outcome for outcome in outcomes if isinstance(outcome, str)]
    assert (len(opened), len(refused)) == (limit, 12 - limit)
    assert await in_progress(pool, org) == limit
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org) == 100 - limit
    assert refused[0].limit == limit and str(limit) in str(refused[0]) and plan.value in str(refused[0])


async def test_an_ended_call_gives_its_slot_back(pool: asyncpg.Pool) -> None:
    org = await organization(pool)
    first, _ = await open_call(pool, org), await open_call(pool, org)
    with pytest.raises(ConcurrentCallLimitReached):
        await open_call(pool, org)
    await end_call(pool, org, first)
    assert await open_call(pool, org)


async def test_an_unlimited_plan_takes_as_many_calls_as_come(pool: asyncpg.Pool) -> None:
    org = await organization(pool, Plan.ENTERPRISE)
    opened = await asyncio.gather(*(open_call(pool, org) for _ in range(8)))
    assert len(set(opened)) == 8


async def test_the_calls_of_an_engine_that_died_free_their_slots_through_recovery(pool: asyncpg.Pool) -> None:
    org = await organization(pool)
    now = datetime.now(UTC)
    dead = new_id()
    await engine_nodes.register_node(pool, node_id=dead, hostname="gone", pid=1, now=now - timedelta(minutes=10))
    for _ in range(2):
        call_log_id = await open_call(pool, org)
        await call_logs.merge_metadata(
            pool, organization_id=org, call_log_id=call_log_id, metadata={"engineNode": dead}
        )
    with pytest.raises(ConcurrentCallLimitReached):
        await open_call(pool, org)

    await engine_nodes.close_orphaned_calls(
        pool, now=now, node_timeout=timedelta(seconds=30), stream_timeout=timedelta(minutes=5)
    )

    assert await in_progress(pool, org) == 0
    assert await open_call(pool, org)


async def test_the_limits_must_name_every_plan(pool: asyncpg.Pool) -> None:
    org = await organization(pool)
    with pytest.raises(ValueError, match="every plan"):
        await open_call(pool, org, limits={"free": 1})
    assert await in_progress(pool, org) == 0


# -- Inbound calls over the limit ------------------------------------------------------------------------------------


async def test_an_inbound_call_over_the_limit_hears_a_polite_refusal_and_is_logged_missed_without_charge(
    engine: str, pool: asyncpg.Pool
) -> None:
    number = await _line(pool, credits=50)
    org = await pool.fetchval('SELECT "organizationId" FROM "PhoneNumber" WHERE "phoneNumber" = $1', number)
    rings = [_ring(number) for _ in range(6)]

    answers = await asyncio.gather(*(_post(engine, "/twilio/voice", form) for form in rings))

    streamed = [twiml for _, twiml in answers if "<Connect><Stream" in twiml]
    refused = [form for form, (_, twiml) in zip(rings, answers, strict=True) if ALL_LINES_BUSY in twiml]
    assert (len(streamed), len(refused)) == (2, 4)
    for _, twiml in answers:
        if ALL_LINES_BUSY in twiml:
            assert "<Stream" not in twiml and twiml.rstrip().endswith("<Hangup /></Response>")
    rows = await pool.fetch(
        'SELECT * FROM "CallLog" WHERE "callId" = ANY($1::text[])', [form["CallSid"] for form in refused]
    )
    assert len(rows) == 4
    for row in rows:
        assert (row["status"], row["duration"], row["callType"]) == ("MISSED", 0, "INBOUND")
        assert row["metadata"]["endReason"] == "concurrent_call_limit"
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org) == 48  # two minutes held
    ended = await pool.fetchval(
        """SELECT count(*) FROM "CallLog" WHERE "organizationId" = $1 AND "metadata"->>'endReason' = $2""",
        org,
        "concurrent_call_limit",
    )
    assert ended == 4


async def test_a_retried_webhook_of_a_refused_call_is_refused_again_and_logged_once(
    engine: str, pool: asyncpg.Pool
) -> None:
    number = await _line(pool)
    org = await pool.fetchval('SELECT "organizationId" FROM "PhoneNumber" WHERE "phoneNumber" = $1', number)
    for _ in range(2):
        await open_call(pool, org)
    form = _ring(number)
    first = await _post(engine, "/twilio/voice", form)
    again = await _post(engine, "/twilio/voice", form)
    assert ALL_LINES_BUSY in first[1] and ALL_LINES_BUSY in again[1]
    assert await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "callId" = $1', form["CallSid"]) == 1


async def test_a_retried_webhook_of_a_call_holding_the_last_slot_answers_again_with_its_stream(
    engine: str, pool: asyncpg.Pool
) -> None:
    number = await _line(pool)
    org = await pool.fetchval('SELECT "organizationId" FROM "PhoneNumber" WHERE "phoneNumber" = $1', number)
    await open_call(pool, org)
    form = _ring(number)
    first = await _post(engine, "/twilio/voice", form)  # takes the plan's second, last slot
    again = await _post(engine, "/twilio/voice", form)

    assert "<Connect><Stream" in first[1]
    assert again == first
    row = await pool.fetchrow('SELECT "status", "metadata" FROM "CallLog" WHERE "callId" = $1', form["CallSid"])
    assert row is not None and row["status"] == "IN_PROGRESS" and "endReason" not in row["metadata"]


# -- POST /v1/calls over the limit -----------------------------------------------------------------------------------


async def outbound_tenant(pool: asyncpg.Pool) -> tuple[Tenant, str, str]:
    """An organization on the free plan with an outbound agent and caller id: (tenant, agent id, caller id)."""
    tenant = await make_tenant(pool, "Dialer")
    agent_id = await make_agent(pool, tenant.organization_id)
    number = f"+1555019{next(_caller_ids):04d}"
    await phone_numbers.create_phone_number(pool, organization_id=tenant.organization_id, phone_number=number)
    return tenant, agent_id, number


async def test_a_call_over_the_limit_waits_then_gets_429_with_retry_after_and_dials_nothing(
    api: Api, engine: str, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant, agent_id, caller_id = await outbound_tenant(pool)
    for _ in range(2):
        await open_call(pool, tenant.organization_id)
    to = callee()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{engine}/v1/calls",
            json={"agentId": agent_id, "fromNumber": caller_id, "to": to},
            headers={"Authorization": f"Bearer {tenant.owner_key}"},
        ) as response,
    ):
        body = await response.json()
        assert response.status == 429, body
        assert int(response.headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "concurrent_call_limit" and "2 calls in progress" in body["error"]["message"]
    assert twilio.creates[to] == 0
    assert await in_progress(pool, tenant.organization_id) == 2
    assert await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "phoneNumber" = $1', to) == 0


async def test_a_call_waiting_for_a_slot_is_placed_when_one_frees_within_the_wait(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant, agent_id, caller_id = await outbound_tenant(pool)
    held = [await open_call(pool, tenant.organization_id) for _ in range(2)]
    to = callee()
    twilio.behave(to, NoAnswer(ring_ms=50))
    request = asyncio.create_task(
        api.call("POST", "/calls", tenant.owner_key, json={"agentId": agent_id, "fromNumber": caller_id, "to": to})
    )
    await asyncio.sleep(0.1)
    assert not request.done()
    await end_call(pool, tenant.organization_id, held[0])

    status, body = await request
    assert status == 201, body
    assert twilio.creates[to] == 1


# -- Campaign dials --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def deps(db_url: str, pool: asyncpg.Pool, engine: str, twilio: FakeTwilio) -> AsyncIterator[OutboundDeps]:
    """What a dispatcher of this test dials with: the engine's limits, the fake Twilio, the engine's webhooks."""
    client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
    try:
        settings = load_settings(
            database_url=db_url,
            twilio_auth_token=TOKEN,
            twilio_account_sid=twilio.account_sid,
            twilio_api_base=twilio.api_base,
            **SETTINGS,
        )
        yield OutboundDeps(pool=pool, settings=settings, twilio=client, public_url=engine)
    finally:
        await client.close()


async def busy_campaign(pool: asyncpg.Pool, numbers: list[str]) -> tuple[campaigns.Campaign, list[str]]:
    """A started campaign of a free-plan organization whose two slots are taken by calls already in progress."""
    org = await organization(pool)
    await phone_numbers.create_phone_number(pool, organization_id=org, phone_number=f"+1212555{next(_caller_ids):04d}")
    agent_id = await make_agent(pool, org)
    campaign = await campaigns.create_campaign(
        pool,
        organization_id=org,
        batch_name="Reminders",
        agent_id=agent_id,
        rules=DialingRules(max_concurrent_calls=5, calls_per_second=50),
    )
    await campaigns.import_recipients(
        pool, organization_id=org, campaign_id=campaign.id, recipients=[NewRecipient(phone_number=n) for n in numbers]
    )
    held = [await open_call(pool, org) for _ in range(2)]
    return await campaigns.start_campaign(pool, organization_id=org, campaign_id=campaign.id), held


async def recipients(pool: asyncpg.Pool, campaign_id: str) -> list[tuple[str, int]]:
    rows = await pool.fetch(
        'SELECT "state", "attempts" FROM "CampaignRecipientDispatch" WHERE "campaignId" = $1', campaign_id
    )
    return sorted((row["state"], row["attempts"]) for row in rows)


async def test_a_campaign_of_an_organization_at_its_limit_claims_nobody_until_a_slot_frees(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    numbers = [callee() for _ in range(3)]
    for number in numbers:
        twilio.behave(number, NoAnswer(ring_ms=50))
    campaign, held = await busy_campaign(pool, numbers)
    dispatcher = CampaignDispatcher(
        pool,
        PlaceCallDialer(deps),
        call_limits=deps.settings.concurrent_call_limits,
        timing=DispatchTiming(interval=timedelta(seconds=0.1)),
    )

    assert [claim for claim in await dispatcher.tick() if claim.campaign_id == campaign.id] == []
    await dispatcher.drain()
    assert await recipients(pool, campaign.id) == [("QUEUED", 0)] * 3
    assert sum(twilio.creates[number] for number in numbers) == 0

    await end_call(pool, campaign.organization_id, held[0])
    await pool.execute('UPDATE "CampaignDispatch" SET "nextDialAt" = now() WHERE "campaignId" = $1', campaign.id)
    claims = [claim for claim in await dispatcher.tick() if claim.campaign_id == campaign.id]
    await dispatcher.drain()
    assert len(claims) == 1
    assert sum(twilio.creates[number] for number in numbers) == 1


async def test_a_dial_that_finds_no_slot_gives_its_claim_back_without_counting_an_attempt(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    # A dispatcher that does not look at the plan claims anyway: the slot check at dial time is what holds.
    numbers = [callee() for _ in range(2)]
    campaign, _ = await busy_campaign(pool, numbers)
    dispatcher = CampaignDispatcher(pool, PlaceCallDialer(deps), timing=DispatchTiming(interval=timedelta(seconds=0.1)))

    claims = [claim for claim in await dispatcher.tick() if claim.campaign_id == campaign.id]
    await dispatcher.drain()

    assert len(claims) == 2
    assert await recipients(pool, campaign.id) == [("QUEUED", 0)] * 2
    assert sum(twilio.creates[number] for number in numbers) == 0
    abandoned = await pool.fetch('SELECT "state", "reason" FROM "CampaignAttempt" WHERE "campaignId" = $1', campaign.id)
    assert [row["state"] for row in abandoned] == ["ABANDONED"] * 2
    assert all("calls in progress" in row["reason"] for row in abandoned)
