"""Campaigns never dial a number on the organization's do-not-call list: the real dispatcher and dialer (place_call),
the engine's webhooks and media on loopback, the fake Twilio answering; a listed recipient ends DO_NOT_CALL with the
list's reason, whether it was listed before the campaign started or while it ran."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from config.settings import load_settings
from engine.campaigns.dispatcher import CampaignDispatcher, DialResult, DispatchTiming, PlaceCallDialer
from engine.simulator import Say
from engine.twilio.outbound_calls import OutboundDeps
from engine.twilio.rest import TwilioCalls
from storage import campaigns, do_not_call, organizations, phone_numbers
from storage.campaign_dispatch import Claim
from storage.campaigns import DialingRules, NewRecipient
from storage.do_not_call import DoNotCallSource
from storage.enums import CampaignStatus
from tests.engine_server import running_engine
from tests.fakes.twilio import Answer, FakeTwilio
from tests.test_api_auth import Api, make_tenant
from tests.test_outbound_calls import make_agent

_orgs = itertools.count(1)


@pytest.fixture(scope="module")
async def engine(db_url: str, twilio: FakeTwilio) -> AsyncIterator[str]:
    async with running_engine(db_url, dispatch_enabled=False, **twilio_settings(twilio)) as base:
        yield base


@pytest.fixture(scope="module")
async def deps(db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, engine: str) -> AsyncIterator[OutboundDeps]:
    """What the test's dispatcher dials with: the fake Twilio, calling back the running engine."""
    async with outbound_deps(db_url, pool, twilio, engine) as made:
        yield made


def twilio_settings(twilio: FakeTwilio) -> dict[str, Any]:
    """The engine settings that point it at the fake Twilio."""
    return {
        "twilio_auth_token": twilio.auth_token,
        "twilio_account_sid": twilio.account_sid,
        "twilio_api_base": twilio.api_base,
    }


@asynccontextmanager
async def outbound_deps(
    db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, engine: str
) -> AsyncIterator[OutboundDeps]:
    """OutboundDeps on the fake Twilio for a dispatcher of the test's own, its client closed on exit."""
    client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
    try:
        settings = load_settings(database_url=db_url, **twilio_settings(twilio))
        yield OutboundDeps(pool=pool, settings=settings, twilio=client, public_url=engine)
    finally:
        await client.close()


async def started_campaign(
    pool: asyncpg.Pool, organization_id: str, numbers: Sequence[str], *, rules: DialingRules | None = None
) -> campaigns.Campaign:
    """A started campaign of an offline OUTBOUND agent calling `numbers` from a new number of the organization."""
    await phone_numbers.create_phone_number(
        pool, organization_id=organization_id, phone_number=f"+1212555{next(_orgs) + 8000:04d}"
    )
    agent_id = await make_agent(pool, organization_id)
    campaign = await campaigns.create_campaign(
        pool,
        organization_id=organization_id,
        batch_name="Reminders",
        agent_id=agent_id,
        rules=rules or DialingRules(max_concurrent_calls=3, calls_per_second=5),
    )
    await campaigns.import_recipients(
        pool,
        organization_id=organization_id,
        campaign_id=campaign.id,
        recipients=[NewRecipient(phone_number=number) for number in numbers],
    )
    return await campaigns.start_campaign(pool, organization_id=organization_id, campaign_id=campaign.id)


async def run_to_completion(pool: asyncpg.Pool, campaign_id: str, *, timeout_s: float = 60) -> None:
    """Let the running dispatcher work until the campaign is COMPLETED."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await pool.fetchval('SELECT "status" FROM "Campaign" WHERE "id" = $1', campaign_id) != "COMPLETED":
        assert loop.time() < deadline, "the campaign never completed"
        await asyncio.sleep(0.1)


async def dispatch_states(pool: asyncpg.Pool, campaign_id: str) -> dict[str, tuple[str, str | None]]:
    """Each recipient's (state, lastReason), by number."""
    rows = await pool.fetch(
        """
        SELECT r."phoneNumber", d."state", d."lastReason" FROM "CampaignRecipient" r
        JOIN "CampaignRecipientDispatch" d ON d."recipientId" = r."id" WHERE r."campaignId" = $1
        """,
        campaign_id,
    )
    return {row["phoneNumber"]: (row["state"], row["lastReason"]) for row in rows}


def dispatcher_for(pool: asyncpg.Pool, deps: OutboundDeps) -> CampaignDispatcher:
    """The engine's dispatcher with its real dialer, ticking fast."""
    return CampaignDispatcher(pool, PlaceCallDialer(deps), timing=DispatchTiming(interval=timedelta(seconds=0.1)))


class HeldDialer:
    """The engine's dialer, each dial held until `until` is set."""

    def __init__(self, dialer: PlaceCallDialer, *, until: asyncio.Event) -> None:
        self._dialer = dialer
        self._until = until

    async def dial(self, claim: Claim) -> DialResult:
        await self._until.wait()
        return await self._dialer.dial(claim)


async def new_organization(pool: asyncpg.Pool) -> str:
    n = next(_orgs)
    return (await organizations.create_organization(pool, name=f"Dnc {n}", slug=f"dnc-{n}", credits=500)).id


async def test_a_listed_recipient_is_never_dialed_and_shows_do_not_call_with_the_reason(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    reached, listed = "+12125550301", "+12125550302"
    twilio.behave(reached, Answer(greeting="Hello?", script=[Say("I would like to book an appointment")]))
    org = await new_organization(pool)
    await do_not_call.add_entry(
        pool, organization_id=org, phone_number=listed, source=DoNotCallSource.API, reason="asked by letter"
    )
    campaign = await started_campaign(pool, org, [reached, listed])
    dispatcher = dispatcher_for(pool, deps)
    dispatcher.start()
    try:
        await run_to_completion(pool, campaign.id)
    finally:
        await dispatcher.close()

    states = await dispatch_states(pool, campaign.id)
    assert states[listed] == ("DO_NOT_CALL", "do not call: asked by letter")
    assert states[reached][0] == "DONE"
    assert (twilio.creates[listed], twilio.creates[reached]) == (0, 1)
    done = await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)
    assert (done.completed_calls, done.total_calls, done.progress) == (2, 2, 100)


async def test_a_number_listed_while_the_campaign_runs_is_not_dialed(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    numbers = ("+12125550311", "+12125550312")
    for number in numbers:
        twilio.behave(number, Answer(greeting="Hello?", script=[Say("I would like to book an appointment")]))
    org = await new_organization(pool)
    # One call at a time: whoever is dialed second waits for the first call to end.
    campaign = await started_campaign(pool, org, numbers, rules=DialingRules(max_concurrent_calls=1))
    dispatcher = dispatcher_for(pool, deps)
    dispatcher.start()
    try:
        for _ in range(300):
            if any(twilio.creates[number] for number in numbers):
                break
            await asyncio.sleep(0.05)
        [first] = [number for number in numbers if twilio.creates[number]]
        [second] = [number for number in numbers if number != first]
        await do_not_call.add_entry(pool, organization_id=org, phone_number=second, source=DoNotCallSource.CLI)
        await run_to_completion(pool, campaign.id)
    finally:
        await dispatcher.close()

    states = await dispatch_states(pool, campaign.id)
    assert states[second] == ("DO_NOT_CALL", "do not call: cli")
    assert states[first][0] == "DONE"
    assert (twilio.creates[first], twilio.creates[second]) == (1, 0)


async def test_a_recipient_listed_after_its_claim_is_not_dialed_and_ends_do_not_call(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    number = "+12125550321"
    org = await new_organization(pool)
    campaign = await started_campaign(pool, org, [number])
    listed = asyncio.Event()
    dispatcher = CampaignDispatcher(
        pool, HeldDialer(PlaceCallDialer(deps), until=listed), timing=DispatchTiming(interval=timedelta(seconds=0.1))
    )
    # The claim leases the recipient; the number is listed before the call is placed (the dial waits for it: a dial
    # that had already passed the list's check when the number was listed is placed, rightly, and proves nothing).
    claims = await dispatcher.tick()
    assert [claim.phone_number for claim in claims] == [number]
    await do_not_call.add_entry(
        pool, organization_id=org, phone_number=number, source=DoNotCallSource.API, reason="just asked"
    )
    listed.set()
    await dispatcher.drain()
    dispatcher.start()  # nobody is left to call: the campaign completes
    try:
        await run_to_completion(pool, campaign.id)
    finally:
        await dispatcher.close()

    assert (await dispatch_states(pool, campaign.id))[number] == ("DO_NOT_CALL", "do not call: just asked")
    assert twilio.creates[number] == 0
    attempts = await pool.fetch('SELECT "state" FROM "CampaignAttempt" WHERE "campaignId" = $1', campaign.id)
    assert [a["state"] for a in attempts] == ["ABANDONED"]
    done = await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)
    assert done.status == CampaignStatus.COMPLETED and done.completed_calls == 1


async def test_the_api_shows_a_campaigns_recipients_skipped_as_do_not_call(
    deps: OutboundDeps, engine: str, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Skipper")
    listed = "+12125550331"
    await do_not_call.add_entry(
        pool, organization_id=tenant.organization_id, phone_number=listed, source=DoNotCallSource.API, reason="lawyer"
    )
    campaign = await started_campaign(pool, tenant.organization_id, [listed])
    assert await dispatcher_for(pool, deps).tick() == []
    async with aiohttp.ClientSession() as session:
        api = Api(session, engine)
        status, page = await api.call("GET", f"/campaigns/{campaign.id}/do-not-call", tenant.owner_key)
        assert status == 200, page
        assert [(r["phoneNumber"], r["reason"]) for r in page["data"]] == [(listed, "do not call: lawyer")]
        other = await make_tenant(pool, "Nosy")
        status, _ = await api.call("GET", f"/campaigns/{campaign.id}/do-not-call", other.owner_key)
        assert status == 404
