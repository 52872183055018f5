"""A campaign dial that stalls never calls anyone twice: the real dispatcher and dialer (place_call), the engine's
webhooks on loopback, the fake Twilio.

- A dial that stalls past its lease before writing its CallLog (the lease expired and the recipient went back to the
  queue, for another engine to dial) writes nothing and dials nobody.
- A create request Twilio never answers (a time-out: it may have arrived) leaves the CallLog waiting for Twilio's
  word rather than FAILED and the recipient retried: when Twilio did create the call, it is adopted and followed.
- That CallLog deleted before Twilio's word (the dashboard deletes rows in SQL), or while Twilio is asked for it,
  does not make the recipient look never dialed: it ends FAILED `call_deleted`, not dialed again.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from config.settings import load_settings
from engine.campaigns.dispatcher import CampaignDispatcher, DialResult, DispatchTiming, PlaceCallDialer
from engine.twilio.outbound_calls import OutboundDeps
from engine.twilio.placement_lookup import LOOKUP_LEASE, REQUEST_SETTLED, PlacementLookup
from engine.twilio.rest import TwilioCall, TwilioCalls
from storage import campaign_dispatch, campaigns, organizations
from storage.campaign_dispatch import Claim
from storage.campaigns import DialingRules
from storage.enums import CampaignStatus
from tests.engine_server import running_engine
from tests.fakes.engine_processes import free_port
from tests.fakes.twilio import FakeTwilio, HeldCreate, NoAnswer
from tests.test_dispatch_claims import Clock, recipient_state
from tests.test_dispatch_do_not_call import outbound_deps, started_campaign, twilio_settings

LEASE = timedelta(seconds=60)
_names = itertools.count(1)


@pytest.fixture(scope="module")
async def engine(db_url: str, twilio: FakeTwilio) -> AsyncIterator[str]:
    async with running_engine(db_url, dispatch_enabled=False, **twilio_settings(twilio)) as base:
        yield base


async def organization(pool: asyncpg.Pool) -> str:
    n = next(_names)
    org = await organizations.create_organization(pool, name=f"Stalls {n}", slug=f"stalls-{n}", credits=1000)
    return org.id


async def campaign_logs(pool: asyncpg.Pool, campaign_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        'SELECT "status", "callId", "metadata" FROM "CallLog" WHERE "campaignId" = $1 ORDER BY "createdAt"',
        campaign_id,
    )


@dataclass
class StallingDialer:
    """The engine's dialer, after a stall longer than the lease during which another engine expired it."""

    pool: asyncpg.Pool
    inner: PlaceCallDialer
    clock: Clock

    async def dial(self, claim: Claim) -> DialResult:
        self.clock.now += LEASE + timedelta(seconds=1)
        assert await campaign_dispatch.expire_leases(self.pool, now=self.clock.now) == (1, 0)  # back in the queue
        return await self.inner.dial(claim)


async def test_a_dial_that_stalls_past_its_lease_writes_nothing_and_dials_nobody(
    db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, engine: str
) -> None:
    number = "+12125557101"
    campaign = await started_campaign(pool, await organization(pool), [number])
    clock = Clock(datetime.now(UTC))
    async with outbound_deps(db_url, pool, twilio, engine) as deps:
        dispatcher = CampaignDispatcher(
            pool,
            StallingDialer(pool, PlaceCallDialer(deps), clock),
            node_id="stalled",
            timing=DispatchTiming(lease=LEASE),
            clock=clock,
        )
        [claim] = await dispatcher.tick()
        await dispatcher.drain()

    assert twilio.creates[number] == 0
    assert await campaign_logs(pool, campaign.id) == []
    state = await recipient_state(pool, campaign.id, number)
    assert (state["state"], state["attempts"], state["leaseOwner"]) == ("QUEUED", 0, None)
    attempt = await pool.fetchval('SELECT "state" FROM "CampaignAttempt" WHERE "id" = $1', claim.attempt_id)
    assert attempt == "ABANDONED"


@dataclass
class UnansweredDial:
    """A campaign's one dial whose create request Twilio held past the client's patience: it waits for Twilio's word."""

    campaign: campaigns.Campaign
    dispatcher: CampaignDispatcher
    clock: Clock
    held: HeldCreate


@asynccontextmanager
async def unanswered_dial(
    db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, engine: str, number: str
) -> AsyncIterator[UnansweredDial]:
    """A started campaign calling `number`, its dial made and given up on while Twilio holds the request; the call
    Twilio may make rings until the end of the block. Twilio's callbacks reach `engine` (a dead port: none do)."""
    ringing = asyncio.Event()
    twilio.behave(number, NoAnswer(until=ringing))
    held = twilio.hold_create(number)
    campaign = await started_campaign(
        pool, await organization(pool), [number], rules=DialingRules(max_concurrent_calls=1, calls_per_second=5)
    )
    clock = Clock(datetime.now(UTC))
    impatient = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base, timeout=0.5)
    settings = load_settings(database_url=db_url, **twilio_settings(twilio))
    deps = OutboundDeps(pool=pool, settings=settings, twilio=impatient, public_url=engine)
    try:
        dispatcher = CampaignDispatcher(
            pool, PlaceCallDialer(deps), node_id="impatient", timing=DispatchTiming(lease=LEASE), clock=clock
        )
        await dispatcher.tick()
        await asyncio.wait_for(held.arrived.wait(), 10)
        await dispatcher.drain()  # the client gave up on Twilio's answer
        yield UnansweredDial(campaign, dispatcher, clock, held)
    finally:
        ringing.set()
        await impatient.close()


async def test_a_create_twilio_never_answered_is_followed_not_failed_and_not_dialed_again(
    db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, engine: str
) -> None:
    number = "+12125557102"
    async with unanswered_dial(db_url, pool, twilio, engine, number) as dial:
        campaign, dispatcher, clock, held = dial.campaign, dial.dispatcher, dial.clock, dial.held
        [waiting] = await campaign_logs(pool, campaign.id)
        assert waiting["status"] == "IN_PROGRESS", waiting["metadata"]  # not FAILED: Twilio may have the call
        state = await recipient_state(pool, campaign.id, number)
        assert (state["state"], state["attempts"]) == ("DIALING", 1)

        held.release(create=True)  # it had arrived: Twilio creates the call, and its status callbacks name the log
        await asyncio.wait_for(held.settled.wait(), 10)
        [created] = twilio.calls_to(number)
        for _ in range(200):
            if (await campaign_logs(pool, campaign.id))[0]["callId"] == created.sid:
                break
            await asyncio.sleep(0.05)
        clock.now += LEASE + timedelta(seconds=1)
        await dispatcher.tick()  # the lease expires: the attempt follows its CallLog
        await dispatcher.drain()
        state = await recipient_state(pool, campaign.id, number)
        attempt = await pool.fetchrow(
            'SELECT "state", "callLogId" FROM "CampaignAttempt" WHERE "recipientId" = $1', state["recipientId"]
        )

    assert twilio.creates[number] == 1
    [log] = await campaign_logs(pool, campaign.id)
    assert (log["status"], log["callId"]) == ("IN_PROGRESS", created.sid)
    assert (state["state"], state["attempts"]) == ("IN_CALL", 1)
    assert attempt is not None and attempt["state"] == "PLACED"


async def test_a_call_deleted_before_twilio_confirmed_it_is_not_dialed_again(
    db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, engine: str
) -> None:
    # Twilio did not answer the create; the CallLog waiting for its word is deleted (the dashboard deletes rows in
    # SQL); Twilio had the request and made the call. The lease's expiry finds no CallLog, but the attempt tells it
    # was written: the recipient ends FAILED as one whose call was deleted, and is not dialed a second time.
    number = "+12125557103"
    async with unanswered_dial(db_url, pool, twilio, engine, number) as dial:
        await pool.execute('DELETE FROM "CallLog" WHERE "campaignId" = $1', dial.campaign.id)
        dial.held.release(create=True)  # it had arrived: Twilio makes the call
        await asyncio.wait_for(dial.held.settled.wait(), 10)
        for _ in range(3):  # the lease expires; later ticks would dial a recipient queued again
            dial.clock.now += LEASE + timedelta(seconds=1)
            await dial.dispatcher.tick()
            await dial.dispatcher.drain()
        state = await recipient_state(pool, dial.campaign.id, number)
        campaign = await campaigns.get_campaign(
            pool, organization_id=dial.campaign.organization_id, campaign_id=dial.campaign.id
        )

    assert twilio.creates[number] == 1
    assert (state["state"], state["attempts"], state["lastOutcome"], state["lastReason"]) == (
        "FAILED",
        1,
        "failed",
        "call_deleted",
    )
    assert (campaign.status, campaign.completed_calls) == (CampaignStatus.COMPLETED, 1)


@dataclass
class DeletingWhileAsked:
    """Twilio's Calls list, asked as the dashboard deletes the campaign's CallLogs (in SQL) under the lookup."""

    pool: asyncpg.Pool
    twilio: TwilioCalls
    campaign_id: str

    async def calls_between(self, *, to: str, from_: str, limit: int = 50) -> list[TwilioCall]:
        await self.pool.execute('DELETE FROM "CallLog" WHERE "campaignId" = $1', self.campaign_id)
        return await self.twilio.calls_between(to=to, from_=from_, limit=limit)


async def test_a_call_deleted_while_twilio_is_asked_whether_it_exists_is_not_dialed_again(
    db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    # Twilio made the call but its callbacks were lost, so the lookup finds it; the CallLog is deleted under the
    # lookup. The lookup leaves it (nothing to adopt), and its lease's expiry ends the recipient FAILED as one whose
    # call was deleted: not dialed a second time.
    number = "+12125557104"
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with unanswered_dial(db_url, pool, twilio, nowhere, number) as dial:
        dial.held.release(create=True)  # it had arrived: Twilio makes the call, and tells nobody
        await asyncio.wait_for(dial.held.settled.wait(), 10)
        client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
        try:
            lookup = PlacementLookup(pool, DeletingWhileAsked(pool, client, dial.campaign.id))
            dial.clock.now += LEASE + REQUEST_SETTLED
            assert await lookup.settle(now=dial.clock.now, owner="looker") == (0, 0)
        finally:
            await client.close()
        for _ in range(3):  # the lookup's lease expires; later ticks would dial a recipient queued again
            dial.clock.now += LOOKUP_LEASE + timedelta(seconds=1)
            await dial.dispatcher.tick()
            await dial.dispatcher.drain()
        state = await recipient_state(pool, dial.campaign.id, number)

    assert twilio.creates[number] == 1
    assert (state["state"], state["attempts"], state["lastReason"]) == ("FAILED", 1, "call_deleted")
