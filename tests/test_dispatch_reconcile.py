"""A dialer that dies between writing its CallLog and storing Twilio's CallSid loses nothing.

The end-to-end test SIGKILLs a real `dialtone serve` while the fake Twilio holds its two create requests (the
worst instant: the CallLogs are committed, no CallSid is known). One request is then dropped, as if it had never
left the process; the other is created, as Twilio would once it had arrived, with its early status callbacks lost
(no engine is up). A second engine must find out which is which from Twilio's Calls list: close the first CallLog
as not placed and dial that recipient again without counting the lost attempt, and adopt the second call.
The in-process tests cover the lookup's decisions and Twilio being unreachable (nothing decided, asked again).
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from engine.campaigns.dispatcher import CampaignDispatcher, DialResult, DispatchTiming
from engine.twilio.placement_lookup import PlacementLookup
from engine.twilio.rest import TwilioCalls
from storage import call_logs, campaigns
from storage.agents import create_agent
from storage.campaign_dispatch import RECIPIENT_METADATA_KEY, Claim
from storage.campaign_placements import NEVER_PLACED_REASON
from storage.campaigns import CampaignRetryPolicy, DialingRules, NewRecipient
from storage.enums import CallerType, CallType, CampaignStatus
from storage.events import create_event
from storage.phone_numbers import create_phone_number
from tests.fakes.engine_processes import free_port, load_balancer, start_engine, wait_healthy
from tests.fakes.twilio import FakeTwilio, NoAnswer
from tests.test_dispatch_claims import Clock, recipient_state, running_campaign
from tests.test_repo_agents import insert_organization

REPO = Path(__file__).resolve().parent.parent
CALLER_ID = "+12125550000"
DROPPED = "+12125553001"  # the engine dies before this request reaches Twilio
CREATED = "+12125553002"  # the engine dies after Twilio created this call, before the CallSid was stored
HOOK_URL = "http://127.0.0.1:9/hooks"  # never delivered (a private address): the outbox rows are what is checked


@pytest.fixture(autouse=True)
async def only_this_tests_campaigns(pool: asyncpg.Pool) -> None:
    """The engines see only this test's campaign: earlier tests' campaigns are stopped."""
    await pool.execute("""UPDATE "Campaign" SET "status" = 'STOPPED' WHERE "status" IN ('PLANNED', 'CONTINUING')""")


# ----------------------------------------------------------------------------------------------- in process


@dataclass
class DyingDialer:
    """Writes the CallLog exactly as the engine's dialer does (placeholder callId), then dies before Twilio."""

    pool: asyncpg.Pool
    caller_id: str

    async def dial(self, claim: Claim) -> DialResult:
        await call_logs.create_call_log(
            self.pool,
            organization_id=claim.organization_id,
            call_type=CallType.OUTBOUND,
            call_id=call_logs.pending_call_id(),
            agent_id=claim.agent_id,
            campaign_id=claim.campaign_id,
            phone_number=claim.phone_number,
            metadata={"direction": "outbound", "from": self.caller_id, RECIPIENT_METADATA_KEY: claim.recipient_id},
        )
        raise RuntimeError("the process died here")


async def lost_dial(
    pool: asyncpg.Pool, number: str, *, lease: timedelta = timedelta(seconds=30)
) -> tuple[campaigns.Campaign, Claim, Clock, str]:
    """A campaign of one recipient whose only dial left a CallLog without a CallSid; (campaign, claim, clock, from)."""
    campaign = await running_campaign(pool, [number], rules=DialingRules(max_concurrent_calls=1, calls_per_second=10))
    caller_id = await pool.fetchval(
        'SELECT "phoneNumber" FROM "PhoneNumber" WHERE "organizationId" = $1', campaign.organization_id
    )
    clock = Clock(datetime.now(UTC))
    dying = CampaignDispatcher(
        pool,
        DyingDialer(pool, caller_id),
        node_id="dead-node",
        timing=DispatchTiming(lease=lease),
        clock=clock,
    )
    [claim] = await dying.tick()
    await dying.drain()
    clock.now += lease + timedelta(seconds=1)
    return campaign, claim, clock, caller_id


async def call_log_of(pool: asyncpg.Pool, claim: Claim) -> asyncpg.Record:
    row = await pool.fetchrow(
        """SELECT * FROM "CallLog" WHERE "metadata"->>'campaignRecipientId' = $1 ORDER BY "createdAt" LIMIT 1""",
        claim.recipient_id,
    )
    assert row is not None
    return row


async def test_twilio_unreachable_decides_nothing_and_the_lookup_is_asked_again(pool: asyncpg.Pool) -> None:
    number = "+12125553101"
    campaign, claim, clock, caller_id = await lost_dial(pool, number)
    unreachable = TwilioCalls("AC" + "0" * 32, "token", api_base=f"http://127.0.0.1:{free_port()}")
    try:
        lookup = PlacementLookup(pool, unreachable, hold_for=timedelta(seconds=30))
        assert await lookup.settle(now=clock.now, owner="survivor") == (0, 0)
    finally:
        await unreachable.close()
    state = await recipient_state(pool, campaign.id, number)
    assert (state["state"], state["attempts"], state["leaseOwner"]) == ("DIALING", 1, "survivor")
    assert (await call_log_of(pool, claim))["status"] == "IN_PROGRESS", "nothing is guessed"

    async with FakeTwilio() as twilio:
        reachable = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
        try:
            lookup = PlacementLookup(pool, reachable)
            assert await lookup.settle(now=clock.now, owner="other") == (0, 0), "the survivor's lookup lease holds"
            clock.now += timedelta(seconds=31)
            assert await lookup.settle(now=clock.now, owner="other") == (0, 1)
        finally:
            await reachable.close()
        assert twilio.lookups == [{"To": number, "From": caller_id, "PageSize": "50"}]
    log = await call_log_of(pool, claim)
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "not_placed")
    state = await recipient_state(pool, campaign.id, number)
    assert (state["state"], state["attempts"], state["lastReason"]) == ("QUEUED", 0, NEVER_PLACED_REASON)
    attempt = await pool.fetchval('SELECT "state" FROM "CampaignAttempt" WHERE "id" = $1', claim.attempt_id)
    assert attempt == "ABANDONED"


async def test_a_request_that_may_still_be_on_its_way_is_not_judged(pool: asyncpg.Pool) -> None:
    number = "+12125553103"
    campaign, claim, clock, _ = await lost_dial(pool, number, lease=timedelta(seconds=5))
    async with FakeTwilio() as twilio:
        client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
        try:
            lookup = PlacementLookup(pool, client)
            assert await lookup.settle(now=clock.now, owner="survivor") == (0, 0)
            assert twilio.lookups == [], "a dialer's request may still reach Twilio: not asked yet"
            state = await recipient_state(pool, campaign.id, number)
            assert (state["state"], state["leaseOwner"]) == ("DIALING", "dead-node")
            clock.now += timedelta(seconds=14)
            assert await lookup.settle(now=clock.now, owner="survivor") == (0, 1)
        finally:
            await client.close()
    assert (await call_log_of(pool, claim))["metadata"]["endReason"] == "not_placed"


async def test_a_call_twilio_created_is_adopted_and_an_older_known_call_is_not(pool: asyncpg.Pool) -> None:
    number = "+12125553102"
    async with FakeTwilio() as twilio:
        twilio.behave(number, NoAnswer(until=asyncio.Event()))
        client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
        try:
            campaign, claim, clock, caller_id = await lost_dial(pool, number)
            # An earlier call between the same numbers that a CallLog already holds is not this attempt's.
            known = await client.place_call(
                to=number,
                from_=caller_id,
                twiml="<Response/>",
                status_callback="",
                status_events=(),
                ring_timeout_seconds=5,
            )
            await call_logs.create_call_log(
                pool, organization_id=campaign.organization_id, call_type=CallType.OUTBOUND, call_id=known
            )
            sid = await client.place_call(
                to=number,
                from_=caller_id,
                twiml="<Response/>",
                status_callback="",
                status_events=(),
                ring_timeout_seconds=5,
            )
            assert await PlacementLookup(pool, client).settle(now=clock.now, owner="survivor") == (1, 0)
        finally:
            await client.close()
    log = await call_log_of(pool, claim)
    assert (log["status"], log["callId"]) == ("IN_PROGRESS", sid)
    attempt = await pool.fetchrow('SELECT * FROM "CampaignAttempt" WHERE "id" = $1', claim.attempt_id)
    assert attempt is not None
    assert (attempt["state"], attempt["callSid"], attempt["callLogId"]) == ("PLACED", sid, log["id"])
    state = await recipient_state(pool, campaign.id, number)
    assert (state["state"], state["attempts"], state["leaseOwner"]) == ("IN_CALL", 1, None)


# ----------------------------------------------------------------------------------------------- two processes


async def campaign_of_two(pool: asyncpg.Pool) -> campaigns.Campaign:
    """One attempt each (a lost attempt that counted would leave no second chance), recipient.failed subscribed."""
    org = await insert_organization(pool)
    await pool.execute('UPDATE "Organization" SET "credits" = 1000 WHERE "id" = $1', org)
    await create_phone_number(pool, organization_id=org, phone_number=CALLER_ID)
    await create_event(pool, organization_id=org, name="recipient.failed", webhook_url=HOOK_URL)
    agent = await create_agent(pool, organization_id=org, name="Caller", caller_type=CallerType.OUTBOUND)
    rules = DialingRules(
        max_concurrent_calls=2,
        calls_per_second=10,
        retry=CampaignRetryPolicy(max_attempts=1, retry_on=frozenset(), delays_seconds=(0,)),
    )
    campaign = await campaigns.create_campaign(
        pool, organization_id=org, batch_name="Kill", agent_id=agent.id, rules=rules
    )
    await campaigns.import_recipients(
        pool,
        organization_id=org,
        campaign_id=campaign.id,
        recipients=[NewRecipient(phone_number=DROPPED), NewRecipient(phone_number=CREATED)],
    )
    return await campaigns.start_campaign(pool, organization_id=org, campaign_id=campaign.id)


async def wait_until(pool: asyncpg.Pool, query: str, *args: object, timeout: float = 60) -> None:
    for _ in range(int(timeout * 20)):
        if await pool.fetchval(query, *args):
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"not true within {timeout} s: {query}")


async def test_an_engine_killed_mid_dial_loses_nothing(pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    ringing = asyncio.Event()
    async with FakeTwilio() as twilio:
        twilio.behave(DROPPED, NoAnswer(ring_ms=50))
        twilio.behave(CREATED, NoAnswer(until=ringing))
        holds = {number: twilio.hold_create(number) for number in (DROPPED, CREATED)}
        port = free_port()
        async with load_balancer([f"http://127.0.0.1:{port}"]) as public_url:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_"))}
            env.update(
                PYTHONPATH=str(REPO),
                DATABASE_URL=db_url,
                DIALTONE_PUBLIC_URL=public_url,
                DIALTONE_DISPATCH_INTERVAL="0.2",
                DIALTONE_DISPATCH_LEASE="5",
                DIALTONE_LOG_LEVEL="WARNING",
                TWILIO_ACCOUNT_SID=twilio.account_sid,
                TWILIO_AUTH_TOKEN=twilio.auth_token,
                TWILIO_API_BASE=twilio.api_base,
            )
            victim = await start_engine(port, dict(env, DIALTONE_STATE_DIR=str(tmp_path / "victim")), tmp_path)
            survivor = None
            try:
                await wait_healthy(f"http://127.0.0.1:{port}", victim)
                campaign = await campaign_of_two(pool)
                await asyncio.wait_for(asyncio.gather(*(hold.arrived.wait() for hold in holds.values())), 60)
                victim.send_signal(signal.SIGKILL)  # both CallLogs are committed; neither CallSid is stored
                await victim.wait()
                holds[DROPPED].release(create=False)
                holds[CREATED].release(create=True)
                await asyncio.wait_for(asyncio.gather(*(hold.settled.wait() for hold in holds.values())), 10)
                [created] = twilio.calls_to(CREATED)
                survivor = await start_engine(port, dict(env, DIALTONE_STATE_DIR=str(tmp_path / "survivor")), tmp_path)
                await wait_healthy(f"http://127.0.0.1:{port}", survivor)
                await wait_until(pool, 'SELECT EXISTS (SELECT 1 FROM "CallLog" WHERE "callId" = $1)', created.sid)
                ringing.set()  # adopted: now the call ends, and its status callback reaches the survivor
                await wait_until(
                    pool, 'SELECT "status" = $2 FROM "Campaign" WHERE "id" = $1', campaign.id, CampaignStatus.COMPLETED
                )
            finally:
                for engine in (victim, survivor):
                    if engine is not None and engine.returncode is None:
                        engine.send_signal(signal.SIGTERM)
                outputs = [await asyncio.wait_for(e.communicate(), 30) for e in (victim, survivor) if e is not None]
                stderr = outputs[-1][1].decode()

    assert {number: twilio.creates[number] for number in (DROPPED, CREATED)} == {DROPPED: 1, CREATED: 1}
    assert "Traceback" not in stderr, stderr[-3000:]
    logs = await pool.fetch(
        """
        SELECT "phoneNumber", "status", "callId", "metadata"->>'endReason' AS "reason" FROM "CallLog"
        WHERE "campaignId" = $1 ORDER BY "createdAt"
        """,
        campaign.id,
    )
    by_number = {n: [(r["status"], r["reason"]) for r in logs if r["phoneNumber"] == n] for n in (DROPPED, CREATED)}
    assert by_number == {
        DROPPED: [("FAILED", "not_placed"), ("MISSED", "no-answer")],
        CREATED: [("MISSED", "no-answer")],
    }
    attempts = await pool.fetch(
        """
        SELECT r."phoneNumber", a."state", a."outcome", a."reason" FROM "CampaignAttempt" a
        JOIN "CampaignRecipient" r ON r."id" = a."recipientId" WHERE a."campaignId" = $1 ORDER BY a."startedAt"
        """,
        campaign.id,
    )
    assert [(a["phoneNumber"], a["state"], a["outcome"]) for a in attempts if a["phoneNumber"] == DROPPED] == [
        (DROPPED, "ABANDONED", None),
        (DROPPED, "ENDED", "no-answer"),
    ]
    assert [(a["state"], a["outcome"]) for a in attempts if a["phoneNumber"] == CREATED] == [("ENDED", "no-answer")]
    states = await pool.fetch(
        'SELECT "state", "attempts" FROM "CampaignRecipientDispatch" WHERE "campaignId" = $1', campaign.id
    )
    assert sorted((s["state"], s["attempts"]) for s in states) == [("FAILED", 1), ("FAILED", 1)]
    failed = await pool.fetch(
        """SELECT "payload" FROM "WebhookDelivery" WHERE "organizationId" = $1 AND "event" = 'recipient.failed'""",
        campaign.organization_id,
    )
    assert len(failed) == 2, "one recipient.failed per recipient, none for the attempt that never reached Twilio"
    assert all(row["payload"]["data"]["attempts"] == 1 for row in failed)
