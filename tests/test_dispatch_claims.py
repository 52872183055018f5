"""The dispatcher against a real database with a recording dialer: cap, pace, windows, retries, credits, stop."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from engine.campaigns.dispatcher import CampaignBlocked, CampaignDispatcher, DialRefused, DialResult, DispatchTiming
from storage import call_logs, campaign_dispatch, campaigns
from storage.agents import create_agent
from storage.campaign_dispatch import RECIPIENT_METADATA_KEY, Claim
from storage.campaigns import Campaign, CampaignRetryPolicy, DialingRules, NewRecipient
from storage.enums import CallerType, CallStatus, CallType, CampaignStatus
from storage.errors import ConstraintViolation
from storage.events import create_event
from storage.phone_numbers import create_phone_number
from storage.records import new_id
from storage.tenancy import tenant_transaction
from tests.test_repo_agents import insert_organization

CALLER_ID = "+12125550000"


@dataclass
class RecordingDialer:
    """Opens a CallLog per dial, as the engine's dialer does, and remembers every dial in order."""

    pool: asyncpg.Pool
    dials: list[Claim] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)

    async def dial(self, claim: Claim) -> DialResult:
        self.dials.append(claim)
        if claim.phone_number in self.refuse:
            raise DialRefused(f"{claim.phone_number} refused")
        log = await call_logs.create_call_log(
            self.pool,
            organization_id=claim.organization_id,
            call_type=CallType.OUTBOUND,
            call_id=new_id(),
            agent_id=claim.agent_id,
            campaign_id=claim.campaign_id,
            phone_number=claim.phone_number,
            metadata={RECIPIENT_METADATA_KEY: claim.recipient_id},
        )
        return DialResult(call_log_id=log.id, call_sid=log.call_id)

    def numbers(self) -> list[str]:
        return [claim.phone_number for claim in self.dials]


class Clock:
    """A clock the test moves."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def running_campaign(
    pool: asyncpg.Pool,
    numbers: Iterable[str],
    *,
    rules: DialingRules | None = None,
    credits: int = 100,
    window: tuple[str, str] | None = None,
) -> Campaign:
    """A started campaign (PLANNED, due at once) of a new organization with credits and a caller id."""
    org = await insert_organization(pool)
    await pool.execute('UPDATE "Organization" SET "credits" = $2 WHERE "id" = $1', org, credits)
    await create_phone_number(pool, organization_id=org, phone_number=f"+1212555{new_id_digits()}")
    agent = await create_agent(pool, organization_id=org, name="Caller", caller_type=CallerType.OUTBOUND)
    campaign = await campaigns.create_campaign(
        pool,
        organization_id=org,
        batch_name="Test",
        agent_id=agent.id,
        call_start_time=window[0] if window else None,
        call_end_time=window[1] if window else None,
        rules=rules or DialingRules(max_concurrent_calls=10, calls_per_second=100),
    )
    await campaigns.import_recipients(
        pool,
        organization_id=org,
        campaign_id=campaign.id,
        recipients=[NewRecipient(phone_number=n, timezone=zone_of(n)) for n in numbers],
    )
    return await campaigns.start_campaign(pool, organization_id=org, campaign_id=campaign.id)


_digits = iter(range(1000, 10000))


def new_id_digits() -> str:
    return str(next(_digits))


def zone_of(number: str) -> str | None:
    from engine.campaigns.windows import recipient_timezone

    return recipient_timezone(number)


class SteppedDispatcher(CampaignDispatcher):
    """A dispatcher on a test clock; `tick()` through the module's helper also lets a pace slot go by."""

    def __init__(self, pool: asyncpg.Pool, dialer: RecordingDialer, clock: Clock) -> None:
        super().__init__(
            pool,
            dialer,
            node_id="test-node",
            timing=DispatchTiming(interval=timedelta(seconds=1), lease=timedelta(seconds=30)),
            clock=clock,
        )
        self.clock = clock


def dispatcher(pool: asyncpg.Pool, dialer: RecordingDialer, clock: Clock | None = None) -> SteppedDispatcher:
    return SteppedDispatcher(pool, dialer, clock or Clock(datetime.now(UTC)))


async def end_call(pool: asyncpg.Pool, claim: Claim, status: CallStatus, reason: str) -> None:
    """End the claim's CallLog as Twilio's status callback or the media session would."""
    log_id = await pool.fetchval('SELECT "callLogId" FROM "CampaignAttempt" WHERE "id" = $1', claim.attempt_id)
    await call_logs.finalize_call_log(
        pool,
        organization_id=claim.organization_id,
        call_log_id=log_id,
        status=status,
        duration=0,
        metadata={"endReason": reason},
    )


async def recipient_state(pool: asyncpg.Pool, campaign_id: str, number: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        """
        SELECT d.* FROM "CampaignRecipientDispatch" d JOIN "CampaignRecipient" r ON r."id" = d."recipientId"
        WHERE d."campaignId" = $1 AND r."phoneNumber" = $2
        """,
        campaign_id,
        number,
    )
    assert row is not None
    return row


async def tick(dispatch: SteppedDispatcher) -> list[Claim]:
    """One tick, its dials finished, then a little over a second later on the dispatcher's clock."""
    claims = await dispatch.tick()
    await dispatch.drain()
    dispatch.clock.now += PACE_SLOT
    return claims


async def get(pool: asyncpg.Pool, campaign: Campaign) -> Campaign:
    return await campaigns.get_campaign(pool, organization_id=campaign.organization_id, campaign_id=campaign.id)


NUMBERS = [f"+1212555{n:04d}" for n in range(100, 110)]
# A second and a bit: past the pace slot a tick uses (timestamps are stored to the millisecond).
PACE_SLOT = timedelta(seconds=1.01)


@pytest.fixture(autouse=True)
async def only_this_tests_campaigns(pool: asyncpg.Pool) -> None:
    """Each test's dispatcher sees only its own campaign: earlier tests' campaigns are stopped."""
    await pool.execute("""UPDATE "Campaign" SET "status" = 'STOPPED' WHERE "status" IN ('PLANNED', 'CONTINUING')""")


async def test_the_first_tick_starts_the_campaign_and_dials_up_to_the_cap(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(
        pool, NUMBERS[:5], rules=DialingRules(max_concurrent_calls=2, calls_per_second=50)
    )
    dialer = RecordingDialer(pool)
    dispatch = dispatcher(pool, dialer)
    await tick(dispatch)
    assert len(dialer.dials) == 2
    assert (await get(pool, campaign)).status == CampaignStatus.CONTINUING
    await tick(dispatch)
    assert len(dialer.dials) == 2, "two calls in flight: the cap holds"

    await end_call(pool, dialer.dials[0], CallStatus.COMPLETED, "path_end")
    await tick(dispatch)
    assert len(dialer.dials) == 3
    assert len(set(dialer.numbers())) == 3


async def test_the_pace_spreads_dials_and_is_shared_through_the_database(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(pool, NUMBERS, rules=DialingRules(max_concurrent_calls=10, calls_per_second=2))
    clock = Clock(datetime.now(UTC))
    first, second = RecordingDialer(pool), RecordingDialer(pool)
    claims = await dispatcher(pool, first, clock).tick()
    assert [c.dial_at - claims[0].dial_at for c in claims] == [timedelta(0), timedelta(seconds=0.5)]
    # Another process looking at the same instant finds the campaign's clock already a second ahead.
    assert await dispatcher(pool, second, clock).tick() == []
    clock.now += PACE_SLOT
    later = await dispatcher(pool, second, clock).tick()
    assert later[0].dial_at - claims[-1].dial_at >= timedelta(seconds=0.5)
    assert campaign.id == later[0].campaign_id


async def test_each_recipient_is_called_inside_their_own_window(pool: asyncpg.Pool) -> None:
    new_york, tokyo = "+12125550142", "+81312345678"
    # Wednesday 2026-01-14 15:00 UTC: 10:00 in New York, midnight in Tokyo.
    clock = Clock(datetime(2026, 1, 14, 15, 0, tzinfo=UTC))
    campaign = await running_campaign(pool, [new_york, tokyo], window=("09:00", "17:00"))
    dialer = RecordingDialer(pool)
    await tick(dispatcher(pool, dialer, clock))
    assert dialer.numbers() == [new_york]
    waiting = await recipient_state(pool, campaign.id, tokyo)
    assert (waiting["state"], waiting["nextAttemptAt"]) == ("QUEUED", datetime(2026, 1, 15, 0, 0, tzinfo=UTC))

    clock.now = datetime(2026, 1, 15, 0, 0, tzinfo=UTC)
    await tick(dispatcher(pool, dialer, clock))
    assert dialer.numbers() == [new_york, tokyo]


async def test_retries_follow_the_policy_delays_then_the_recipient_fails(pool: asyncpg.Pool) -> None:
    number = NUMBERS[0]
    policy = CampaignRetryPolicy(max_attempts=3, retry_on=frozenset({"busy"}), delays_seconds=(60, 300))
    campaign = await running_campaign(pool, [number], rules=DialingRules(calls_per_second=50, retry=policy))
    clock = Clock(datetime.now(UTC))
    dialer = RecordingDialer(pool)
    dispatch = dispatcher(pool, dialer, clock)
    waits = []
    for _ in range(3):
        await tick(dispatch)
        await end_call(pool, dialer.dials[-1], CallStatus.MISSED, "busy")
        await tick(dispatch)  # reconciles the ended call
        state = await recipient_state(pool, campaign.id, number)
        if state["state"] == "QUEUED":
            ended = await pool.fetchval(
                'SELECT "endedAt" FROM "CampaignAttempt" WHERE "id" = $1', dialer.dials[-1].attempt_id
            )
            waits.append(state["nextAttemptAt"] - ended)
            await tick(dispatch)
            assert len(dialer.dials) == len(waits), "no retry before its delay"
            clock.now = state["nextAttemptAt"] + timedelta(seconds=1)
    assert waits == [timedelta(seconds=60), timedelta(seconds=300)]
    final = await recipient_state(pool, campaign.id, number)
    assert (final["state"], final["attempts"], final["lastOutcome"]) == ("FAILED", 3, "busy")
    done = await get(pool, campaign)
    assert (done.status, done.completed_calls, done.progress) == (CampaignStatus.COMPLETED, 1, 100)


async def test_an_outcome_the_policy_does_not_retry_finishes_the_recipient(pool: asyncpg.Pool) -> None:
    policy = CampaignRetryPolicy(max_attempts=3, retry_on=frozenset({"busy"}))
    campaign = await running_campaign(pool, NUMBERS[:1], rules=DialingRules(calls_per_second=50, retry=policy))
    dialer = RecordingDialer(pool)
    dispatch = dispatcher(pool, dialer)
    await tick(dispatch)
    await end_call(pool, dialer.dials[0], CallStatus.MISSED, "no-answer")
    await tick(dispatch)
    state = await recipient_state(pool, campaign.id, NUMBERS[0])
    assert (state["state"], state["attempts"], state["lastOutcome"]) == ("FAILED", 1, "no-answer")


async def test_a_voicemail_is_its_own_outcome(pool: asyncpg.Pool) -> None:
    policy = CampaignRetryPolicy(max_attempts=2, retry_on=frozenset({"voicemail"}), delays_seconds=(0,))
    campaign = await running_campaign(pool, NUMBERS[:1], rules=DialingRules(calls_per_second=50, retry=policy))
    dialer = RecordingDialer(pool)
    dispatch = dispatcher(pool, dialer)
    await tick(dispatch)
    await end_call(pool, dialer.dials[0], CallStatus.COMPLETED, "voicemail_left")
    await tick(dispatch)
    await tick(dispatch)
    assert len(dialer.dials) == 2
    await end_call(pool, dialer.dials[1], CallStatus.COMPLETED, "caller_hangup")
    await tick(dispatch)
    state = await recipient_state(pool, campaign.id, NUMBERS[0])
    assert (state["state"], state["lastOutcome"]) == ("DONE", "completed")


async def test_a_refused_dial_is_a_failed_attempt(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(pool, NUMBERS[:2])
    dialer = RecordingDialer(pool, refuse={NUMBERS[0]})
    await tick(dispatcher(pool, dialer))
    state = await recipient_state(pool, campaign.id, NUMBERS[0])
    assert (state["state"], state["lastOutcome"]) == ("FAILED", "failed")
    assert "refused" in state["lastReason"]


async def test_out_of_credits_pauses_the_campaign_with_a_reason(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(pool, NUMBERS[:3], credits=0)
    org = campaign.organization_id
    dialer = RecordingDialer(pool)
    await tick(dispatcher(pool, dialer))
    assert dialer.dials == []
    state = await campaigns.get_dispatch_state(pool, organization_id=org, campaign_id=campaign.id)
    assert state.paused and state.paused_reason is not None and "out of credits" in state.paused_reason

    await pool.execute('UPDATE "Organization" SET "credits" = 10 WHERE "id" = $1', org)
    await tick(dispatcher(pool, dialer))
    assert dialer.dials == [], "a paused campaign stays paused until resumed"
    await campaigns.resume_campaign(pool, organization_id=org, campaign_id=campaign.id)
    await tick(dispatcher(pool, dialer))
    assert len(dialer.dials) == 3


async def test_pause_holds_new_dials_and_resume_continues(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(
        pool, NUMBERS[:2], rules=DialingRules(max_concurrent_calls=1, calls_per_second=50)
    )
    org = campaign.organization_id
    dialer = RecordingDialer(pool)
    dispatch = dispatcher(pool, dialer)
    await tick(dispatch)
    await campaigns.pause_campaign(pool, organization_id=org, campaign_id=campaign.id)
    await end_call(pool, dialer.dials[0], CallStatus.COMPLETED, "path_end")
    await tick(dispatch)
    assert len(dialer.dials) == 1
    assert (await get(pool, campaign)).completed_calls == 1, "the call in flight was still reconciled"
    await campaigns.resume_campaign(pool, organization_id=org, campaign_id=campaign.id)
    await tick(dispatch)
    assert len(dialer.dials) == 2


async def test_stop_mid_flight_dials_nobody_new_and_reconciles_the_calls_in_flight(pool: asyncpg.Pool) -> None:
    policy = CampaignRetryPolicy(max_attempts=3, retry_on=frozenset({"busy"}), delays_seconds=(0,))
    rules = DialingRules(max_concurrent_calls=2, calls_per_second=50, retry=policy)
    campaign = await running_campaign(pool, NUMBERS[:5], rules=rules)
    org = campaign.organization_id
    dialer = RecordingDialer(pool)
    dispatch = dispatcher(pool, dialer)
    await tick(dispatch)
    assert len(dialer.dials) == 2
    await campaigns.stop_campaign(pool, organization_id=org, campaign_id=campaign.id)
    await end_call(pool, dialer.dials[0], CallStatus.MISSED, "busy")
    await end_call(pool, dialer.dials[1], CallStatus.COMPLETED, "path_end")
    for _ in range(3):
        await tick(dispatch)
    assert len(dialer.dials) == 2, "no dial after the stop, not even a retry"
    states = {n: (await recipient_state(pool, campaign.id, n))["state"] for n in NUMBERS[:5]}
    # The busy one would have been retried: the stop, not its outcome, ends its calls, as for those never dialed.
    assert states[dialer.dials[0].phone_number] == "CANCELED"
    assert states[dialer.dials[1].phone_number] == "DONE"
    assert sorted(states.values()) == ["CANCELED", "CANCELED", "CANCELED", "CANCELED", "DONE"]
    stopped = await get(pool, campaign)
    assert (stopped.status, stopped.completed_calls) == (CampaignStatus.STOPPED, 1)


async def test_a_call_whose_recipient_has_no_attempt_left_fails_though_its_campaign_stopped(
    pool: asyncpg.Pool,
) -> None:
    policy = CampaignRetryPolicy(max_attempts=1, retry_on=frozenset({"busy"}))
    campaign = await running_campaign(pool, NUMBERS[:1], rules=DialingRules(calls_per_second=50, retry=policy))
    dialer = RecordingDialer(pool)
    dispatch = dispatcher(pool, dialer)
    await tick(dispatch)
    await campaigns.stop_campaign(pool, organization_id=campaign.organization_id, campaign_id=campaign.id)
    await end_call(pool, dialer.dials[0], CallStatus.MISSED, "busy")
    await tick(dispatch)

    state = await recipient_state(pool, campaign.id, NUMBERS[0])
    assert (state["state"], state["attempts"], state["lastOutcome"]) == ("FAILED", 1, "busy")


async def test_a_claim_whose_campaign_stopped_before_its_slot_is_not_dialed(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(pool, NUMBERS[:2], rules=DialingRules(max_concurrent_calls=2, calls_per_second=1))
    dialer = RecordingDialer(pool)
    # Ticks two seconds apart claim two slots at one call per second: the second dial waits a whole second.
    dispatch = CampaignDispatcher(pool, dialer, timing=DispatchTiming(interval=timedelta(seconds=2)))
    first, second = await dispatch.tick()
    await campaigns.stop_campaign(pool, organization_id=campaign.organization_id, campaign_id=campaign.id)
    await dispatch.drain()
    assert second.phone_number not in dialer.numbers()
    state = await recipient_state(pool, campaign.id, second.phone_number)
    assert (state["state"], state["attempts"]) == ("CANCELED", 0)
    assert first.phone_number != second.phone_number


async def test_a_lease_that_expires_after_the_stop_cancels_its_recipient(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(
        pool, NUMBERS[:2], rules=DialingRules(max_concurrent_calls=1, calls_per_second=50)
    )
    clock = Clock(datetime.now(UTC))
    lost = dispatcher(pool, RecordingDialer(pool), clock)
    assert len(await lost.tick()) == 1
    for task in list(lost._dials):  # the process dies before dialing
        task.cancel()
    await lost.drain()
    await campaigns.stop_campaign(pool, organization_id=campaign.organization_id, campaign_id=campaign.id)

    clock.now += timedelta(seconds=31)
    survivor = RecordingDialer(pool)
    await tick(dispatcher(pool, survivor, clock))
    assert survivor.dials == []
    states = [await recipient_state(pool, campaign.id, number) for number in NUMBERS[:2]]
    assert [(s["state"], s["attempts"], s["lastReason"]) for s in states] == [("CANCELED", 0, "campaign stopped")] * 2


async def test_an_expired_lease_without_a_call_log_is_requeued_without_counting(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(pool, NUMBERS[:1])
    clock = Clock(datetime.now(UTC))
    lost = dispatcher(pool, RecordingDialer(pool), clock)
    [claim] = await lost.tick()
    for task in list(lost._dials):  # the process dies before dialing
        task.cancel()
    await lost.drain()
    dialing = await recipient_state(pool, campaign.id, NUMBERS[0])
    assert (dialing["state"], dialing["attempts"]) == ("DIALING", 1)

    clock.now += timedelta(seconds=31)
    survivor = RecordingDialer(pool)
    await tick(dispatcher(pool, survivor, clock))
    assert survivor.numbers() == [NUMBERS[0]]
    assert survivor.dials[0].attempt_number == 1, "the lost claim never dialed: it did not count"
    abandoned = await pool.fetchval('SELECT "state" FROM "CampaignAttempt" WHERE "id" = $1', claim.attempt_id)
    assert abandoned == "ABANDONED"


async def test_an_expired_lease_with_a_call_log_follows_the_call(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(pool, NUMBERS[:1])
    clock = Clock(datetime.now(UTC))
    dying = RecordingDialer(pool)
    lost = dispatcher(pool, dying, clock)
    [claim] = await lost.tick()
    await lost.drain()
    # As if the process died after the CallLog and Twilio's request but before recording the placement.
    await pool.execute(
        """UPDATE "CampaignAttempt" SET "state" = 'DIALING', "callLogId" = NULL WHERE "id" = $1""", claim.attempt_id
    )
    await pool.execute(
        """UPDATE "CampaignRecipientDispatch" SET "state" = 'DIALING', "leaseOwner" = 'dead',
           "leaseExpiresAt" = $2 WHERE "recipientId" = $1""",
        claim.recipient_id,
        clock.now,
    )
    clock.now += timedelta(seconds=1)
    survivor = RecordingDialer(pool)
    await tick(dispatcher(pool, survivor, clock))
    assert survivor.dials == [], "the call was placed: no second dial"
    state = await recipient_state(pool, campaign.id, NUMBERS[0])
    assert (state["state"], state["attempts"]) == ("IN_CALL", 1)
    log_id = await pool.fetchval('SELECT "callLogId" FROM "CampaignAttempt" WHERE "id" = $1', claim.attempt_id)
    await call_logs.finalize_call_log(
        pool, organization_id=campaign.organization_id, call_log_id=log_id, status=CallStatus.COMPLETED
    )
    await tick(dispatcher(pool, survivor, clock))
    assert (await get(pool, campaign)).status == CampaignStatus.COMPLETED


async def test_a_call_log_written_as_the_lease_expires_is_left_to_its_dial_not_requeued(pool: asyncpg.Pool) -> None:
    # The dial writes its CallLog (Twilio not asked yet) in the transaction that holds its lease, and commits it while
    # another process expires that lease: the expiry passes the recipient by, and after the commit neither gives it
    # back nor counts it (only Twilio knows whether the request arrived: the placement lookup asks).
    campaign = await running_campaign(pool, NUMBERS[:1])
    clock = Clock(datetime.now(UTC))
    slow = dispatcher(pool, RecordingDialer(pool), clock)
    [claim] = await slow.tick()
    for task in list(slow._dials):  # the dial is taken over by hand below
        task.cancel()
    await slow.drain()
    clock.now += timedelta(seconds=31)
    async with pool.acquire() as dial, dial.transaction():
        await campaign_dispatch.hold_lease(dial, claim)
        await call_logs.create_call_log(
            dial,
            organization_id=claim.organization_id,
            call_type=CallType.OUTBOUND,
            call_id=call_logs.pending_call_id(),
            agent_id=claim.agent_id,
            campaign_id=claim.campaign_id,
            phone_number=claim.phone_number,
            metadata={RECIPIENT_METADATA_KEY: claim.recipient_id},
        )
        assert await campaign_dispatch.expire_leases(pool, now=clock.now) == (0, 0)

    assert await campaign_dispatch.expire_leases(pool, now=clock.now) == (0, 0)
    state = await recipient_state(pool, campaign.id, NUMBERS[0])
    assert (state["state"], state["attempts"]) == ("DIALING", 1)
    attempt = await pool.fetchrow('SELECT "state", "reason" FROM "CampaignAttempt" WHERE "id" = $1', claim.attempt_id)
    assert attempt is not None
    assert (attempt["state"], attempt["reason"]) == ("DIALING", campaign_dispatch.CALL_LOG_WRITTEN)


async def test_the_last_recipient_completes_the_campaign_and_emits_the_event(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(pool, NUMBERS[:2])
    org = campaign.organization_id
    for name in ("campaign.started", "campaign.completed"):
        await create_event(pool, organization_id=org, name=name, webhook_url="https://hooks.example.com/dialtone")
    dialer = RecordingDialer(pool)
    dispatch = dispatcher(pool, dialer)
    await tick(dispatch)
    for claim in dialer.dials:
        await end_call(pool, claim, CallStatus.COMPLETED, "path_end")
    await tick(dispatch)
    done = await get(pool, campaign)
    assert (done.status, done.total_calls, done.completed_calls, done.progress) == (
        CampaignStatus.COMPLETED,
        2,
        2,
        100,
    )
    events = await pool.fetch(
        'SELECT "event", "payload" FROM "WebhookDelivery" WHERE "organizationId" = $1 ORDER BY "createdAt"', org
    )
    assert [e["event"] for e in events] == ["campaign.started", "campaign.completed"]
    assert events[1]["payload"]["data"]["reached"] == 2


async def test_a_future_start_keeps_the_campaign_planned_until_then(pool: asyncpg.Pool) -> None:
    org_campaign = await running_campaign(pool, NUMBERS[:1])
    await pool.execute(
        'UPDATE "Campaign" SET "startDate" = $2, "startTime" = $3 WHERE "id" = $1',
        org_campaign.id,
        datetime(2030, 1, 1).date(),
        "08:30",
    )
    clock = Clock(datetime(2029, 12, 31, 12, 0, tzinfo=UTC))
    dialer = RecordingDialer(pool)
    await tick(dispatcher(pool, dialer, clock))
    assert dialer.dials == [] and (await get(pool, org_campaign)).status == CampaignStatus.PLANNED
    clock.now = datetime(2030, 1, 1, 8, 30, tzinfo=UTC)
    await tick(dispatcher(pool, dialer, clock))
    assert len(dialer.dials) == 1 and (await get(pool, org_campaign)).status == CampaignStatus.CONTINUING


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (DialingRules(timezone="Mars/Olympus"), "Mars/Olympus"),
        (DialingRules(max_concurrent_calls=0), "concurrent"),
        (DialingRules(retry=CampaignRetryPolicy(retry_on=frozenset({"angry"}))), "angry"),
    ],
)
async def test_unusable_rules_are_refused_before_anything_is_written(
    pool: asyncpg.Pool, rules: DialingRules, message: str
) -> None:
    org = await insert_organization(pool)
    agent = await create_agent(pool, organization_id=org, name="Caller")
    with pytest.raises(ConstraintViolation, match=message):
        await campaigns.create_campaign(pool, organization_id=org, batch_name="X", agent_id=agent.id, rules=rules)
    assert await campaigns.list_campaigns(pool, organization_id=org) == []


@dataclass
class BlockedDialer(RecordingDialer):
    """A dialer whose every dial finds the organization out of credits (as place_call's NoCredits does)."""

    async def dial(self, claim: Claim) -> DialResult:
        self.dials.append(claim)
        raise CampaignBlocked("organization has no credits left; add credits to place calls")


async def test_credits_running_out_at_dial_time_pause_the_campaign_and_lose_nobody(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(pool, NUMBERS[:2])
    await tick(dispatcher(pool, BlockedDialer(pool)))
    state = await campaigns.get_dispatch_state(pool, organization_id=campaign.organization_id, campaign_id=campaign.id)
    assert state.paused and state.paused_reason is not None and "no credits" in state.paused_reason
    for number in NUMBERS[:2]:
        waiting = await recipient_state(pool, campaign.id, number)
        assert (waiting["state"], waiting["attempts"]) == ("QUEUED", 0)


async def test_a_failed_recipient_emits_recipient_failed(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(pool, NUMBERS[:1])
    org = campaign.organization_id
    await create_event(pool, organization_id=org, name="recipient.failed", webhook_url="https://hooks.example.com/x")
    await tick(dispatcher(pool, RecordingDialer(pool, refuse={NUMBERS[0]})))
    payload = await pool.fetchval(
        """SELECT "payload" FROM "WebhookDelivery" WHERE "organizationId" = $1 AND "event" = 'recipient.failed'""",
        org,
    )
    assert payload["data"]["outcome"] == "failed" and payload["data"]["attempts"] == 1


async def test_the_api_role_sees_only_its_organizations_dispatch_rows(pool: asyncpg.Pool) -> None:
    mine = await running_campaign(pool, NUMBERS[:2])
    await running_campaign(pool, NUMBERS[2:3])
    await tick(dispatcher(pool, RecordingDialer(pool)))
    async with tenant_transaction(pool, mine.organization_id) as conn:
        for table in ("CampaignDispatch", "CampaignRecipientDispatch", "CampaignAttempt"):
            organizations = await conn.fetch(f'SELECT DISTINCT "organizationId" FROM "{table}"')
            assert [row["organizationId"] for row in organizations] == [mine.organization_id], table


async def test_a_dial_that_would_land_after_the_window_closes_is_given_back(pool: asyncpg.Pool) -> None:
    new_york = "+12125550143"
    clock = Clock(datetime(2026, 1, 14, 21, 59, 59, tzinfo=UTC))  # 16:59:59 in New York
    campaign = await running_campaign(pool, [new_york], window=("09:00", "17:00"))
    dialer = RecordingDialer(pool)
    dispatch = dispatcher(pool, dialer, clock)
    [claim] = await dispatch.tick()
    assert claim.dial_by == datetime(2026, 1, 14, 22, 0, tzinfo=UTC)
    clock.now = claim.dial_by  # the process stalled past 17:00 before its dial ran
    await dispatch.drain()
    assert dialer.dials == []
    state = await recipient_state(pool, campaign.id, new_york)
    assert (state["state"], state["attempts"]) == ("QUEUED", 0)


async def test_a_stopping_engine_dials_nobody_new_and_gives_its_claims_back_to_the_others(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(pool, NUMBERS[:3], rules=DialingRules(max_concurrent_calls=3, calls_per_second=1))
    stopping = RecordingDialer(pool)
    # Ticks two seconds apart claim two slots at one call per second: the second waits a whole second for its own.
    dispatch = CampaignDispatcher(pool, stopping, timing=DispatchTiming(interval=timedelta(seconds=2)))
    claims = await dispatch.tick()
    assert len(claims) == 2
    dispatch.stop_dialing()  # the engine drains before its first dial has run
    await dispatch.drain()
    assert await dispatch.tick() == []
    assert stopping.dials == []
    states = [await recipient_state(pool, campaign.id, number) for number in NUMBERS[:3]]
    assert [(s["state"], s["attempts"]) for s in states] == [("QUEUED", 0)] * 3

    other = RecordingDialer(pool)
    another_engine = dispatcher(pool, other, Clock(datetime.now(UTC) + PACE_SLOT * 2))  # past the slots given back
    for _ in NUMBERS[:3]:
        await tick(another_engine)
    assert sorted(other.numbers()) == NUMBERS[:3]
