"""Campaign dispatch state in PostgreSQL: claims under FOR UPDATE SKIP LOCKED leases, dials, and reconciliation.

Every engine process runs the same dispatcher against one database. Claims for one campaign are serialised by
a row lock on its "CampaignDispatch" row taken with SKIP LOCKED (a process that finds it locked moves on to
another campaign), so the concurrency cap, the pace and the attempt count are decided by one process at a time
and are never exceeded, whatever the number of processes. Decisions that need time zones and calling windows
are the engine's (engine/campaigns/dispatcher.py); this module only reads and writes rows, in the caller's transaction.

A recipient moves QUEUED -> DIALING (leased to one process, attempt counted) -> IN_CALL (a CallLog exists)
-> QUEUED again (retry) or DONE / FAILED, or CANCELED when its campaign was stopped before it was reached. A
recipient whose number is on the organization's do-not-call list (storage/do_not_call.py) goes to DO_NOT_CALL
instead of being dialed: at the claim, or at the last check before the dial. Outcomes come from the CallLog, which
Twilio's status callbacks and the call's media session finish, so attempts placed by a process that died are still
reconciled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg

from storage.call_logs import PENDING_CALL_ID_PREFIX
from storage.campaign_states import (
    ATTEMPT_TRANSITIONS,
    IN_FLIGHT,
    RECIPIENT_TRANSITIONS,
    UNFINISHED,
    AttemptOutcome,
    AttemptState,
    InvalidDispatchTransition,
    RecipientDispatchState,
    sources,
    sql_states,
)
from storage.campaigns import (
    STOPPED_REASON,
    CampaignDispatchState,
    DialingRules,
    recipient_variables,
    transition_campaign,
)
from storage.do_not_call import listed_reason
from storage.end_reasons import VOICEMAIL, EndReason
from storage.enums import CallStatus, CampaignStatus, Plan
from storage.records import Connection, Queryable, new_id, transaction
from storage.webhook_outbox import WebhookEvent, enqueue_event

RECIPIENT_METADATA_KEY = "campaignRecipientId"
"""The CallLog metadata key naming the campaign recipient a call was placed for (set by the outbound dialer)."""
ATTEMPT_CALL_LOG = f"""
    SELECT l."id" FROM "CallLog" l
    WHERE l."campaignId" = rd."campaignId" AND l."metadata"->>'{RECIPIENT_METADATA_KEY}' = rd."recipientId"
      AND l."createdAt" >= a."startedAt" - interval '1 minute'
      AND NOT EXISTS (SELECT 1 FROM "CampaignAttempt" o WHERE o."callLogId" = l."id")
    ORDER BY l."createdAt" DESC LIMIT 1
"""
"""The CallLog a DIALING attempt `a` of recipient `rd` wrote, if any: a subquery (the dialer names the recipient)."""
CALL_LOG_WRITTEN = "CallLog written: Twilio may have been asked for the call"
"""The reason of an attempt whose dial wrote its CallLog (`hold_lease`), until the attempt ends: Twilio may have the
call even once that CallLog is deleted, so the attempt is never given back as one that never reached Twilio."""
# The condition of each move: the states the tables let a row leave for the target.
_RECIPIENT_MOVES = {state: sql_states(sources(RECIPIENT_TRANSITIONS, state)) for state in RecipientDispatchState}
_ATTEMPT_MOVES = {state: sql_states(sources(ATTEMPT_TRANSITIONS, state)) for state in AttemptState}
_DIALING_COLUMNS = (
    'd."campaignId", d."fromNumber", d."timezone", d."daysOfWeek", d."maxConcurrentCalls", d."callsPerSecond", '
    'd."maxAttempts", d."retryOn", d."retryDelaysSeconds", d."paused", d."pausedReason", d."startedAt", '
    'd."finishedAt"'
)


_LIVE_CALL = """SELECT 1 FROM "CallLog" l
    WHERE l."organizationId" = {organization} AND l."phoneNumber" = {number} AND l."status" = 'IN_PROGRESS'"""
"""A subquery: a call of the organization with that number (its callee, or its caller) that has not ended."""


@dataclass(frozen=True, slots=True)
class DueCampaign:
    """A campaign this process holds the claim lock of, with what a claim decision needs."""

    id: str
    organization_id: str
    agent_id: str
    status: CampaignStatus
    start_date: date | None
    start_time: str | None
    call_start_time: str | None
    call_end_time: str | None
    dispatch: CampaignDispatchState
    next_dial_at: datetime
    credits: int
    from_number: str | None
    """The campaign's own caller id, else the default one (storage.phone_numbers.default_caller_id); None: neither."""
    in_flight: int
    organization_plan: Plan
    organization_calls: int
    """The organization's calls in progress now, every campaign's and the API's: its plan's call slots taken."""

    @property
    def rules(self) -> DialingRules:
        """The campaign's dialing rules."""
        return self.dispatch.rules


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    """A recipient waiting for a dial, locked by the claiming transaction; `variables` are its calls' (its name and
    notes included, storage.campaigns.recipient_variables)."""

    id: str
    phone_number: str
    name: str | None
    timezone: str | None
    variables: dict[str, str]
    attempts: int


@dataclass(frozen=True, slots=True)
class Pick:
    """A queued recipient chosen for a paced slot: dial at `dial_at`, and not at all once `dial_by` has passed."""

    recipient: QueuedRecipient
    dial_at: datetime
    dial_by: datetime
    """When the recipient's calling window closes."""


@dataclass(frozen=True, slots=True)
class Claim:
    """One leased dial: who to call, from which number, for which agent, not before `dial_at` nor after `dial_by`."""

    attempt_id: str
    attempt_number: int
    campaign_id: str
    organization_id: str
    agent_id: str
    recipient_id: str
    phone_number: str
    name: str | None
    variables: dict[str, str]
    from_number: str
    dial_at: datetime
    dial_by: datetime
    lease_owner: str


# ----------------------------------------------------------------------------------------------- claiming


async def lock_due_campaign(conn: Connection, *, now: datetime, skip: Sequence[str] = ()) -> DueCampaign | None:
    """Lock the campaign due soonest that no other process is claiming for, skipping `skip`; None if none is due."""
    row = await conn.fetchrow(
        f"""
        SELECT c."id", c."organizationId", c."agentId", c."status", c."startDate", c."startTime",
               c."callStartTime", c."callEndTime", d."nextDialAt", {_DIALING_COLUMNS},
               o."credits", o."plan"::text AS "plan",
               (SELECT count(*) FROM "CallLog" l
                WHERE l."organizationId" = c."organizationId" AND l."status" = 'IN_PROGRESS'
               )::int AS "organizationCalls",
               -- No caller id of the campaign's own: the default one (migration 0024), as for the API's calls.
               COALESCE(d."fromNumber", dialtone_default_caller_id(c."organizationId", c."agentId"))
                   AS "resolvedFromNumber",
               (SELECT count(*) FROM "CampaignAttempt" a
                WHERE a."campaignId" = c."id" AND a."state" IN ({sql_states(IN_FLIGHT)}))::int AS "inFlight"
        FROM "CampaignDispatch" d
        JOIN "Campaign" c ON c."id" = d."campaignId"
        JOIN "Organization" o ON o."id" = c."organizationId"
        WHERE NOT d."paused" AND d."finishedAt" IS NULL AND d."nextDialAt" <= $1
          AND c."status" IN ('PLANNED', 'CONTINUING')
          AND NOT (c."id" = ANY($2::text[]))
        ORDER BY d."nextDialAt"
        LIMIT 1
        FOR UPDATE OF d SKIP LOCKED
        """,
        now,
        list(skip),
    )
    if row is None:
        return None
    return DueCampaign(
        id=row["id"],
        organization_id=row["organizationId"],
        agent_id=row["agentId"],
        status=CampaignStatus(row["status"]),
        start_date=row["startDate"],
        start_time=row["startTime"],
        call_start_time=row["callStartTime"],
        call_end_time=row["callEndTime"],
        dispatch=CampaignDispatchState.from_dispatch_row(row),
        next_dial_at=row["nextDialAt"],
        credits=row["credits"],
        from_number=row["resolvedFromNumber"],
        in_flight=row["inFlight"],
        organization_plan=Plan(row["plan"]),
        organization_calls=row["organizationCalls"],
    )


async def mark_started(conn: Connection, campaign: DueCampaign) -> None:
    """PLANNED -> CONTINUING, and the campaign.started event, in the caller's transaction.

    InvalidCampaignTransition if the campaign is no longer PLANNED (stopped or unscheduled since it was locked).
    """
    started = await transition_campaign(
        conn, organization_id=campaign.organization_id, campaign_id=campaign.id, status=CampaignStatus.CONTINUING
    )
    await conn.execute(
        'UPDATE "CampaignDispatch" SET "startedAt" = CURRENT_TIMESTAMP WHERE "campaignId" = $1', campaign.id
    )
    await enqueue_event(
        conn,
        organization_id=campaign.organization_id,
        event=WebhookEvent.CAMPAIGN_STARTED,
        data={"campaignId": campaign.id, "totalCalls": started.total_calls},
        agent_id=campaign.agent_id,
    )


async def defer_campaign(conn: Connection, campaign_id: str, until: datetime) -> None:
    """Look at the campaign again no sooner than `until` (a future start, the next window, the next retry)."""
    await conn.execute('UPDATE "CampaignDispatch" SET "nextDialAt" = $2 WHERE "campaignId" = $1', campaign_id, until)


async def pause_for(conn: Connection, campaign: DueCampaign, reason: str) -> None:
    """Pause the campaign with a reason an operator reads (e.g. out of credits); resume_campaign undoes it."""
    await conn.execute(
        'UPDATE "CampaignDispatch" SET "paused" = true, "pausedReason" = $2 WHERE "campaignId" = $1',
        campaign.id,
        reason,
    )


async def lock_queued(conn: Connection, campaign: DueCampaign, *, now: datetime, limit: int) -> list[QueuedRecipient]:
    """Lock up to `limit` of the campaign's recipients whose next attempt is due, soonest first; one whose number the
    organization is in a call with (another campaign's, the API's, an inbound one) waits until that call ends.

    In the same statement, candidates whose number is on the organization's do-not-call list leave the queue for
    DO_NOT_CALL with the list's reason (and count as finished): they are never returned, so never dialed.
    """
    rows = await conn.fetch(
        f"""
        WITH candidates AS (
            SELECT rd."recipientId", rd."organizationId", r."phoneNumber", r."name", r."notes", rd."timezone",
                   rd."variables",
                   rd."attempts", rd."nextAttemptAt",
                   {listed_reason('rd."organizationId"', 'r."phoneNumber"')} AS "doNotCall"
            FROM "CampaignRecipientDispatch" rd
            JOIN "CampaignRecipient" r ON r."id" = rd."recipientId"
            WHERE rd."campaignId" = $1 AND rd."state" = '{RecipientDispatchState.QUEUED}'
              AND rd."nextAttemptAt" <= $2 AND rd."attempts" < $3
              AND NOT EXISTS ({_LIVE_CALL.format(organization='rd."organizationId"', number='r."phoneNumber"')})
            ORDER BY rd."nextAttemptAt", rd."recipientId"
            LIMIT $4
            FOR UPDATE OF rd SKIP LOCKED
        ),
        listed AS (
            UPDATE "CampaignRecipientDispatch" rd SET
                "state" = '{RecipientDispatchState.DO_NOT_CALL}', "lastReason" = c."doNotCall"
            FROM candidates c
            WHERE rd."recipientId" = c."recipientId" AND c."doNotCall" IS NOT NULL
            RETURNING rd."recipientId"
        ),
        counted AS (
            UPDATE "Campaign" SET
                "completedCalls" = "completedCalls" + n.listed,
                "progress" = CASE WHEN "totalCalls" > 0
                                  THEN LEAST(100, ("completedCalls" + n.listed) * 100 / "totalCalls") ELSE 0 END
            FROM (SELECT count(*)::int AS listed FROM listed) n
            WHERE "id" = $1 AND n.listed > 0
        )
        SELECT * FROM candidates WHERE "doNotCall" IS NULL
        ORDER BY "nextAttemptAt", "recipientId"
        """,
        campaign.id,
        now,
        campaign.rules.retry.max_attempts,
        limit,
    )
    return [
        QueuedRecipient(
            id=row["recipientId"],
            phone_number=row["phoneNumber"],
            name=row["name"],
            timezone=row["timezone"],
            variables=recipient_variables(
                name=row["name"], notes=row["notes"], variables={str(k): str(v) for k, v in row["variables"].items()}
            ),
            attempts=row["attempts"],
        )
        for row in rows
    ]


async def defer_recipients(conn: Connection, deferrals: Sequence[tuple[str, datetime]]) -> None:
    """Move queued recipients' next attempt to when their calling window opens."""
    if not deferrals:
        return
    await conn.execute(
        f"""
        UPDATE "CampaignRecipientDispatch" rd SET "nextAttemptAt" = v.at
        FROM unnest($1::text[], $2::timestamptz[]) AS v(id, at)
        WHERE rd."recipientId" = v.id AND rd."state" = '{RecipientDispatchState.QUEUED}'
        """,
        [recipient_id for recipient_id, _ in deferrals],
        [at for _, at in deferrals],
    )


async def earliest_queued(conn: Connection, campaign_id: str) -> datetime | None:
    """When the campaign's soonest queued recipient is due, or None when nobody waits."""
    value: datetime | None = await conn.fetchval(
        f"""
        SELECT min("nextAttemptAt") FROM "CampaignRecipientDispatch"
        WHERE "campaignId" = $1 AND "state" = '{RecipientDispatchState.QUEUED}'
        """,
        campaign_id,
    )
    return value


async def lease(
    conn: Connection,
    campaign: DueCampaign,
    picks: Sequence[Pick],
    *,
    owner: str,
    lease_for: timedelta,
    next_dial_at: datetime,
) -> list[Claim]:
    """Lease the picked recipients to `owner`, each to be dialed at its time, counting one attempt each.

    The campaign's pacing clock moves to `next_dial_at`, so every process continues the same schedule.
    """
    assert campaign.from_number is not None, "a campaign without a caller id is paused, never leased"
    claims = [
        Claim(
            attempt_id=new_id(),
            attempt_number=pick.recipient.attempts + 1,
            campaign_id=campaign.id,
            organization_id=campaign.organization_id,
            agent_id=campaign.agent_id,
            recipient_id=pick.recipient.id,
            phone_number=pick.recipient.phone_number,
            name=pick.recipient.name,
            variables=pick.recipient.variables,
            from_number=campaign.from_number,
            dial_at=pick.dial_at,
            dial_by=pick.dial_by,
            lease_owner=owner,
        )
        for pick in picks
    ]
    if not claims:
        return []
    await conn.execute(
        f"""
        UPDATE "CampaignRecipientDispatch" rd SET
            "state" = '{RecipientDispatchState.DIALING}', "attempts" = rd."attempts" + 1, "leaseOwner" = $2,
            "leaseExpiresAt" = v.expires
        FROM unnest($1::text[], $3::timestamptz[]) AS v(id, expires)
        WHERE rd."recipientId" = v.id AND rd."state" IN ({_RECIPIENT_MOVES[RecipientDispatchState.DIALING]})
        """,
        [claim.recipient_id for claim in claims],
        owner,
        [claim.dial_at + lease_for for claim in claims],
    )
    await conn.executemany(
        """
        INSERT INTO "CampaignAttempt"
            ("id", "organizationId", "campaignId", "recipientId", "attemptNumber", "dialedBy", "startedAt")
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        """,
        [
            (c.attempt_id, c.organization_id, c.campaign_id, c.recipient_id, c.attempt_number, owner, c.dial_at)
            for c in claims
        ],
    )
    await defer_campaign(conn, campaign.id, next_dial_at)
    return claims


# ----------------------------------------------------------------------------------------------- dialing


_HELD_BY_CLAIM = f"""
    JOIN "CampaignAttempt" a ON a."id" = $3 AND a."state" = '{AttemptState.DIALING}'
    WHERE rd."recipientId" = $1 AND rd."state" = '{RecipientDispatchState.DIALING}' AND rd."leaseOwner" = $2
    FOR UPDATE OF rd
"""
"""The end of a query on the dispatch row `rd` of a claim's recipient ($1), leased by $2 for its attempt $3, still
DIALING: locked, or no row once the lease is lost."""


async def begin_dial(pool: asyncpg.Pool, claim: Claim, *, now: datetime, lease_for: timedelta) -> bool:
    """Renew the lease right before dialing; False (and the claim released) if the dial must not happen.

    It must not when the lease was lost (expired and taken over), or the campaign was stopped or paused
    since the claim: a stopped campaign's recipient is CANCELED, a paused one's goes back to the queue.
    """
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            f"""
            SELECT c."status", d."paused", {listed_reason('rd."organizationId"', 'r."phoneNumber"')} AS "doNotCall"
            FROM "CampaignRecipientDispatch" rd
            JOIN "CampaignRecipient" r ON r."id" = rd."recipientId"
            JOIN "Campaign" c ON c."id" = rd."campaignId"
            JOIN "CampaignDispatch" d ON d."campaignId" = rd."campaignId"
            {_HELD_BY_CLAIM}
            """,
            claim.recipient_id,
            claim.lease_owner,
            claim.attempt_id,
        )
        if row is None:
            return False  # the lease is gone: whoever holds the recipient now decides
        if row["doNotCall"] is not None:  # listed since the claim: never dialed
            await _abandon(
                conn,
                claim.attempt_id,
                claim.recipient_id,
                to=RecipientDispatchState.DO_NOT_CALL,
                reason=row["doNotCall"],
            )
            await _count_finished(conn, claim.campaign_id)
            return False
        if row["status"] == CampaignStatus.CONTINUING and not row["paused"]:
            await conn.execute(
                'UPDATE "CampaignRecipientDispatch" SET "leaseExpiresAt" = $2 WHERE "recipientId" = $1',
                claim.recipient_id,
                now + lease_for,
            )
            return True
        # Paused: the recipient waits for the resume. Stopped: _abandon cancels it.
        await _abandon(
            conn, claim.attempt_id, claim.recipient_id, to=RecipientDispatchState.QUEUED, reason="campaign paused"
        )
        return False


class LeaseLost(Exception):
    """A dial's lease is no longer its own (it expired while the dial stalled, and the recipient went back to the
    queue or on to another dial): the dial must not happen."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(
            f"recipient {claim.recipient_id} of campaign {claim.campaign_id}: the dial's lease was lost before its "
            "CallLog was written; not dialed"
        )


async def hold_lease(conn: Connection, claim: Claim) -> None:
    """In the transaction that writes a dial's CallLog, before it: lock the recipient's dispatch row while the claim
    still holds it, so that the lease's expiry waits for the CallLog and then follows it rather than queueing the
    recipient again. LeaseLost when the claim no longer holds it.

    The attempt's reason becomes CALL_LOG_WRITTEN, committed with the CallLog or not at all: a CallLog deleted later
    (the dashboard deletes rows in SQL) does not make the attempt look like one that never reached Twilio."""
    held = await conn.fetchval(
        f"""
        SELECT true FROM "CampaignRecipientDispatch" rd
        {_HELD_BY_CLAIM}
        """,
        claim.recipient_id,
        claim.lease_owner,
        claim.attempt_id,
    )
    if not held:
        raise LeaseLost(claim)
    await conn.execute('UPDATE "CampaignAttempt" SET "reason" = $2 WHERE "id" = $1', claim.attempt_id, CALL_LOG_WRITTEN)


class CalleeInCall(Exception):
    """The claim's number is in a call with its organization already (another campaign's dial of it, say): it is not
    dialed now, and waits for that call to end."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(f"{claim.phone_number} is already in a call with this organization; called once it ends")


async def hold_callee(conn: Connection, claim: Claim) -> None:
    """In the transaction that writes a dial's CallLog, before it: CalleeInCall if the organization has a call with the
    claim's number that has not ended. Dials of one number (two campaigns' recipients) take turns on a transaction
    lock of it, so the second sees the first's CallLog."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('dialtone.callee:' || $1::text || ':' || $2::text))",
        claim.organization_id,
        claim.phone_number,
    )
    live = await conn.fetchval(
        f"SELECT EXISTS ({_LIVE_CALL.format(organization='$1::text', number='$2::text')})",
        claim.organization_id,
        claim.phone_number,
    )
    if live:
        raise CalleeInCall(claim)


async def record_placed(pool: asyncpg.Pool, claim: Claim, *, call_log_id: str, call_sid: str | None) -> bool:
    """The dial created its CallLog: from now on the CallLog decides. False if the lease had been lost.

    A CallLog deleted since the dial wrote it (the dashboard deletes rows in SQL) ends the attempt as a placed call's
    deleted CallLog does (`reconcile_ended_calls`): the call was placed all the same.
    """
    try:
        async with transaction(pool) as conn:
            attempt = await conn.fetchval(
                f"""
                UPDATE "CampaignAttempt" SET "state" = '{AttemptState.PLACED}', "callLogId" = $2, "callSid" = $3
                WHERE "id" = $1 AND "state" IN ({_ATTEMPT_MOVES[AttemptState.PLACED]}) RETURNING "id"
                """,
                claim.attempt_id,
                call_log_id,
                call_sid,
            )
            if attempt is None:
                return False
            await conn.execute(
                f"""
                UPDATE "CampaignRecipientDispatch" SET
                    "state" = '{RecipientDispatchState.IN_CALL}', "leaseOwner" = NULL, "leaseExpiresAt" = NULL
                WHERE "recipientId" = $1 AND "state" IN ({_RECIPIENT_MOVES[RecipientDispatchState.IN_CALL]})
                """,
                claim.recipient_id,
            )
    except asyncpg.ForeignKeyViolationError:  # "callLogId" names a CallLog no more
        async with transaction(pool) as conn:
            now = await conn.fetchval(
                f"""
                SELECT CURRENT_TIMESTAMP FROM "CampaignAttempt"
                WHERE "id" = $1 AND "state" = '{AttemptState.DIALING}' FOR UPDATE
                """,
                claim.attempt_id,
            )
            if now is None:
                return False
            await _finish_deleted_call(conn, claim.attempt_id, ended_at=now)
    return True


async def record_refused(
    pool: asyncpg.Pool, claim: Claim, *, reason: str, call_log_id: str | None, now: datetime
) -> None:
    """The dial was refused (an invalid number, Twilio said no): a `failed` outcome, retried by the policy."""
    async with transaction(pool) as conn:
        locked = await conn.fetchval(
            f'SELECT 1 FROM "CampaignAttempt" WHERE "id" = $1 AND "state" = \'{AttemptState.DIALING}\' FOR UPDATE',
            claim.attempt_id,
        )
        if locked is None:
            return
        await finish_attempt(
            conn,
            attempt_id=claim.attempt_id,
            outcome=AttemptOutcome.FAILED,
            reason=reason,
            ended_at=now,
            call_log_id=call_log_id,
        )


async def record_do_not_call(pool: asyncpg.Pool, claim: Claim) -> None:
    """The dial was refused because the number is on the do-not-call list: DO_NOT_CALL, with the list's reason."""
    async with transaction(pool) as conn:
        reason = await conn.fetchval(
            f"SELECT {listed_reason('$1::text', '$2::text')}", claim.organization_id, claim.phone_number
        )
        to = RecipientDispatchState.DO_NOT_CALL
        if await _abandon(conn, claim.attempt_id, claim.recipient_id, to=to, reason=reason or "do not call"):
            await _count_finished(conn, claim.campaign_id)


async def record_not_dialable(pool: asyncpg.Pool, claim: Claim, *, reason: str) -> None:
    """The dial was refused before it reached Twilio for what would refuse every retry: the organization's dial policy
    does not dial the number (storage.dial_policies; it may have tightened since the import), or the recipient's
    variables break a call's limits. FAILED with `reason`, the attempt not counted and never retried; the campaign
    completes if it was its last."""
    async with transaction(pool) as conn:
        to = RecipientDispatchState.FAILED
        if await _abandon(conn, claim.attempt_id, claim.recipient_id, to=to, reason=f"not dialed: {reason}"):
            await _count_finished(conn, claim.campaign_id)
            await complete_if_done(conn, claim.campaign_id)  # it may have been the last one, as an outcome may


async def release_claim(pool: asyncpg.Pool, claim: Claim, *, reason: str) -> None:
    """Give a claim back without dialing: the attempt does not count, the recipient waits again."""
    async with transaction(pool) as conn:
        await _abandon(conn, claim.attempt_id, claim.recipient_id, to=RecipientDispatchState.QUEUED, reason=reason)


async def pause_campaign_for(pool: asyncpg.Pool, campaign_id: str, reason: str) -> None:
    """Pause a campaign from the dialing side (the dialer reported no credits)."""
    await pool.execute(
        'UPDATE "CampaignDispatch" SET "paused" = true, "pausedReason" = $2 WHERE "campaignId" = $1',
        campaign_id,
        reason,
    )


async def give_back(conn: Connection, attempt_id: str, recipient_id: str, *, reason: str) -> None:
    """In the caller's transaction: a DIALING attempt that never reached Twilio does not count; its recipient waits
    again with `reason` as its last reason."""
    await _abandon(conn, attempt_id, recipient_id, to=RecipientDispatchState.QUEUED, reason=reason)


async def _abandon(
    conn: Connection, attempt_id: str, recipient_id: str, *, to: RecipientDispatchState, reason: str
) -> bool:
    """Give a leased attempt back without it counting; the recipient moves to `to`. False if it was not in flight.

    A recipient that would wait again in a stopped campaign is CANCELED instead, as the stop did to those waiting
    then: whichever way its lease ends after the stop (expired, the window closed, Twilio never got the call).
    """
    released = await conn.fetchval(
        f"""
        UPDATE "CampaignAttempt" SET "state" = '{AttemptState.ABANDONED}', "reason" = $2, "endedAt" = CURRENT_TIMESTAMP
        WHERE "id" = $1 AND "state" IN ({_ATTEMPT_MOVES[AttemptState.ABANDONED]}) RETURNING "id"
        """,
        attempt_id,
        reason,
    )
    if released is None:
        return False
    if to is RecipientDispatchState.QUEUED and await _campaign_stopped(conn, attempt_id):
        to, reason = RecipientDispatchState.CANCELED, STOPPED_REASON
    # Only a lease is given back: the recipient leaves DIALING, for a state the table allows from there.
    await conn.execute(
        f"""
        UPDATE "CampaignRecipientDispatch" SET
            "state" = $2, "attempts" = "attempts" - 1, "leaseOwner" = NULL, "leaseExpiresAt" = NULL,
            "lastReason" = $3
        WHERE "recipientId" = $1 AND "state" = '{RecipientDispatchState.DIALING}'
        """,
        recipient_id,
        to,
        reason,
    )
    return True


async def _campaign_stopped(conn: Connection, attempt_id: str) -> bool:
    """Whether the attempt's campaign is STOPPED; a stop still being committed is waited for (FOR SHARE), so that
    it either sees this recipient waiting and cancels it, or is seen here."""
    stopped: bool = await conn.fetchval(
        f"""
        SELECT c."status" = '{CampaignStatus.STOPPED}' FROM "CampaignAttempt" a
        JOIN "Campaign" c ON c."id" = a."campaignId" WHERE a."id" = $1
        FOR SHARE OF c
        """,
        attempt_id,
    )
    return stopped


async def _count_finished(conn: Connection, campaign_id: str) -> None:
    """One more of the campaign's recipients is finished without a call (its number is on the do-not-call list, or
    one the dial policy refuses)."""
    await conn.execute(
        """
        UPDATE "Campaign" SET
            "completedCalls" = "completedCalls" + 1,
            "progress" = CASE WHEN "totalCalls" > 0
                              THEN LEAST(100, ("completedCalls" + 1) * 100 / "totalCalls") ELSE 0 END
        WHERE "id" = $1
        """,
        campaign_id,
    )


# ----------------------------------------------------------------------------------------------- outcomes


def call_outcome(status: CallStatus, metadata: Mapping[str, Any]) -> AttemptOutcome:
    """What a finished CallLog means for the retry policy: completed, busy, no-answer, voicemail or failed."""
    reason = EndReason.read(metadata.get("endReason"))
    if reason in VOICEMAIL:
        return AttemptOutcome.VOICEMAIL
    if status == CallStatus.COMPLETED:
        return AttemptOutcome.COMPLETED
    if reason is EndReason.BUSY:
        return AttemptOutcome.BUSY
    if status == CallStatus.MISSED and reason is not EndReason.CANCELED:
        return AttemptOutcome.NO_ANSWER
    return AttemptOutcome.FAILED


async def finish_attempt(
    conn: Connection,
    *,
    attempt_id: str,
    outcome: AttemptOutcome,
    reason: str | None,
    ended_at: datetime,
    call_log_id: str | None,
    retry: bool = True,
) -> None:
    """End a locked attempt with its outcome; retry the recipient or finish them, and the campaign if it is done.
    Without `retry`, the recipient is finished whatever the retry policy says of the outcome.

    Runs in the caller's transaction. A finished recipient counts in completedCalls; a failed one also emits
    recipient.failed. A stopped campaign never retries: a recipient its retry policy would have called again is
    CANCELED instead, as the stop did to those waiting then, neither counted nor announced; one reached is DONE, and
    one whose attempts are spent FAILED, whatever the stop.
    """
    row = await conn.fetchrow(
        f"""
        UPDATE "CampaignAttempt" a SET
            "state" = '{AttemptState.ENDED}', "outcome" = $2, "reason" = $3, "endedAt" = $4,
            "callLogId" = COALESCE($5, a."callLogId")
        WHERE a."id" = $1 AND a."state" IN ({_ATTEMPT_MOVES[AttemptState.ENDED]})
        RETURNING a."recipientId", a."campaignId", a."organizationId"
        """,
        attempt_id,
        outcome,
        reason,
        ended_at,
        call_log_id,
    )
    if row is None:
        raise InvalidDispatchTransition(f"attempt {attempt_id} is not in flight; it cannot end")
    campaign = await conn.fetchrow(
        f"""
        SELECT c."status" AS "campaignStatus", c."agentId", {_DIALING_COLUMNS}
        FROM "Campaign" c JOIN "CampaignDispatch" d ON d."campaignId" = c."id" WHERE c."id" = $1
        FOR UPDATE OF d
        """,
        row["campaignId"],
    )
    assert campaign is not None
    # Locks in the order every writer takes them: "CampaignDispatch", then "Campaign", then recipients.
    dispatch = CampaignDispatchState.from_dispatch_row(campaign)
    attempts = await conn.fetchval(
        'SELECT "attempts" FROM "CampaignRecipientDispatch" WHERE "recipientId" = $1 FOR UPDATE', row["recipientId"]
    )
    retry_at = None
    if retry and outcome is not AttemptOutcome.COMPLETED:
        retry_at = dispatch.rules.retry.retry_at(outcome, attempts, ended_at)
    if retry_at is not None and campaign["campaignStatus"] in (CampaignStatus.PLANNED, CampaignStatus.CONTINUING):
        await conn.execute(
            f"""
            UPDATE "CampaignRecipientDispatch" SET
                "state" = '{RecipientDispatchState.QUEUED}', "nextAttemptAt" = $2, "lastOutcome" = $3,
                "lastReason" = $4, "leaseOwner" = NULL, "leaseExpiresAt" = NULL
            WHERE "recipientId" = $1 AND "state" IN ({_RECIPIENT_MOVES[RecipientDispatchState.QUEUED]})
            """,
            row["recipientId"],
            retry_at,
            outcome,
            reason,
        )
        # The campaign's clock is not moved: an idle campaign is looked at again every few seconds anyway.
        return
    if retry_at is not None:  # the stop, not the outcome, ends this recipient's calls
        final, reason = RecipientDispatchState.CANCELED, STOPPED_REASON
    elif outcome is AttemptOutcome.COMPLETED:
        final = RecipientDispatchState.DONE
    else:
        final = RecipientDispatchState.FAILED
    await conn.execute(
        f"""
        UPDATE "CampaignRecipientDispatch" SET
            "state" = $2, "lastOutcome" = $3, "lastReason" = $4, "leaseOwner" = NULL, "leaseExpiresAt" = NULL
        WHERE "recipientId" = $1 AND "state" IN ({_RECIPIENT_MOVES[final]})
        """,
        row["recipientId"],
        final,
        outcome,
        reason,
    )
    if final is RecipientDispatchState.CANCELED:
        return
    await conn.execute(
        """
        UPDATE "Campaign" SET
            "completedCalls" = "completedCalls" + 1,
            "progress" = CASE WHEN "totalCalls" > 0
                              THEN LEAST(100, ("completedCalls" + 1) * 100 / "totalCalls") ELSE 0 END
        WHERE "id" = $1
        """,
        row["campaignId"],
    )
    if final is RecipientDispatchState.FAILED:
        await enqueue_event(
            conn,
            organization_id=row["organizationId"],
            event=WebhookEvent.RECIPIENT_FAILED,
            data={
                "campaignId": row["campaignId"],
                "recipientId": row["recipientId"],
                "attempts": attempts,
                "outcome": outcome,
                "reason": reason,
                "callLogId": call_log_id,
            },
            agent_id=campaign["agentId"],
        )
    await complete_if_done(conn, row["campaignId"])


async def complete_if_done(conn: Connection, campaign_id: str) -> bool:
    """COMPLETED + campaign.completed when a CONTINUING campaign has nobody left to call or to hear from.

    Locks the campaign row first, so two transactions finishing its last two recipients cannot both miss it.
    """
    campaign = await conn.fetchrow(
        """
        SELECT "organizationId", "agentId", "status", "totalCalls", "completedCalls" FROM "Campaign"
        WHERE "id" = $1 FOR UPDATE
        """,
        campaign_id,
    )
    if campaign is None or campaign["status"] != CampaignStatus.CONTINUING:
        return False
    busy = await conn.fetchval(
        f"""
        SELECT EXISTS (SELECT 1 FROM "CampaignRecipientDispatch"
                       WHERE "campaignId" = $1 AND "state" IN ({sql_states(UNFINISHED)}))
        """,
        campaign_id,
    )
    if busy:
        return False
    await transition_campaign(
        conn, organization_id=campaign["organizationId"], campaign_id=campaign_id, status=CampaignStatus.COMPLETED
    )
    await conn.execute(
        'UPDATE "Campaign" SET "progress" = CASE WHEN "totalCalls" > 0 THEN 100 ELSE 0 END WHERE "id" = $1',
        campaign_id,
    )
    await conn.execute(
        'UPDATE "CampaignDispatch" SET "finishedAt" = CURRENT_TIMESTAMP WHERE "campaignId" = $1', campaign_id
    )
    counts = await count_by_state(conn, organization_id=campaign["organizationId"], campaign_id=campaign_id)
    await enqueue_event(
        conn,
        organization_id=campaign["organizationId"],
        event=WebhookEvent.CAMPAIGN_COMPLETED,
        data={
            "campaignId": campaign_id,
            "totalCalls": campaign["totalCalls"],
            "completedCalls": campaign["completedCalls"],
            "reached": counts.get(RecipientDispatchState.DONE, 0),
            "failed": counts.get(RecipientDispatchState.FAILED, 0),
        },
        agent_id=campaign["agentId"],
    )
    return True


async def count_by_state(db: Queryable, *, organization_id: str, campaign_id: str) -> dict[RecipientDispatchState, int]:
    """How many of the organization's campaign's recipients are in each dispatch state (none: left out)."""
    rows = await db.fetch(
        """
        SELECT "state", count(*)::int AS n FROM "CampaignRecipientDispatch"
        WHERE "campaignId" = $1 AND "organizationId" = $2 GROUP BY "state"
        """,
        campaign_id,
        organization_id,
    )
    return {RecipientDispatchState(row["state"]): row["n"] for row in rows}


# ----------------------------------------------------------------------------------------------- reconciling


async def reconcile_ended_calls(pool: asyncpg.Pool, *, limit: int = 200) -> int:
    """Finish placed attempts whose CallLog has ended (from any process); return how many.

    A placed attempt whose CallLog is gone (the dashboard deletes rows in SQL, also of running calls; the engine hangs
    such a call up) ends FAILED with the reason `call_deleted`, and its recipient is not called again, whatever the
    retry policy: the organization deleted that call, and nothing tells whether it reached the recipient.

    Campaigns are taken in id order, so two processes reconciling at once lock them in the same order.
    """
    async with transaction(pool) as conn:
        # A placed attempt always names its CallLog: one named by none lost it to the deletion (ON DELETE SET NULL).
        rows = await conn.fetch(
            f"""
            SELECT a."id", l."id" AS "callLogId", l."status", l."metadata",
                   COALESCE(l."updatedAt", CURRENT_TIMESTAMP) AS "endedAt"
            FROM "CampaignAttempt" a LEFT JOIN "CallLog" l ON l."id" = a."callLogId"
            WHERE a."state" = '{AttemptState.PLACED}' AND (l."status" <> 'IN_PROGRESS' OR a."callLogId" IS NULL)
            ORDER BY a."campaignId", a."startedAt"
            LIMIT $1
            FOR UPDATE OF a SKIP LOCKED
            """,
            limit,
        )
        for row in rows:
            if row["callLogId"] is None:
                await _finish_deleted_call(conn, row["id"], ended_at=row["endedAt"])
                continue
            status = CallStatus(row["status"])
            outcome = call_outcome(status, row["metadata"])
            await finish_attempt(
                conn,
                attempt_id=row["id"],
                outcome=outcome,
                reason=row["metadata"].get("endReason") or status.value.lower(),
                ended_at=row["endedAt"],
                call_log_id=row["callLogId"],
            )
    return len(rows)


async def _finish_deleted_call(conn: Connection, attempt_id: str, *, ended_at: datetime) -> None:
    """End a locked attempt whose call's CallLog was deleted: FAILED, `call_deleted`, and never retried (the
    organization deleted that call, and nothing tells whether it reached the recipient)."""
    await finish_attempt(
        conn,
        attempt_id=attempt_id,
        outcome=AttemptOutcome.FAILED,
        reason=EndReason.CALL_DELETED.value,
        ended_at=ended_at,
        call_log_id=None,
        retry=False,
    )


async def expire_leases(pool: asyncpg.Pool, *, now: datetime, limit: int = 200) -> tuple[int, int]:
    """Settle leases whose process went away; return (requeued without an attempt, followed to a CallLog).

    The dialer creates the CallLog (with the recipient in its metadata) before it asks Twilio for the call,
    and renews its lease right before. So an expired lease whose attempt wrote no CallLog means Twilio was
    never asked: the recipient is queued again and the attempt does not count. With a CallLog that holds a
    CallSid, the call exists: the attempt counts and follows that CallLog like any placed call. A CallLog still
    without a CallSid is left alone here: only Twilio knows whether the request arrived, and the engine asks
    it (storage/campaign_placements.py, engine/twilio/placement_lookup.py). An attempt that wrote its CallLog
    (CALL_LOG_WRITTEN), deleted since, may have been placed: it ends as a placed call whose CallLog is deleted
    does (`reconcile_ended_calls`), its recipient FAILED and never dialed again; it counts in neither number.
    """
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            f"""
            SELECT rd."recipientId", rd."campaignId", a."id" AS "attemptId", a."startedAt", l."id" AS "callLogId",
                   a."reason" IS NOT DISTINCT FROM $4 AS "callLogWritten"
            FROM "CampaignRecipientDispatch" rd
            JOIN "CampaignAttempt" a ON a."recipientId" = rd."recipientId" AND a."state" = '{AttemptState.DIALING}'
            LEFT JOIN "CallLog" l ON l."id" = ({ATTEMPT_CALL_LOG})
            WHERE rd."state" = '{RecipientDispatchState.DIALING}' AND rd."leaseExpiresAt" < $1
              AND (l."id" IS NULL OR NOT starts_with(l."callId", $3))
            ORDER BY rd."leaseExpiresAt"
            LIMIT $2
            FOR UPDATE OF rd, a SKIP LOCKED
            """,
            now,
            limit,
            PENDING_CALL_ID_PREFIX,
            CALL_LOG_WRITTEN,
        )
        requeued = followed = 0
        for row in rows:
            if row["callLogId"] is None and row["callLogWritten"]:
                # This statement sees the CallLog, which its snapshot may predate (written as the row was locked).
                if not await _call_log_exists(conn, row["attemptId"]):
                    await _finish_deleted_call(conn, row["attemptId"], ended_at=now)
                continue  # one just written: the next expiry follows it, or Twilio is asked about it
            if row["callLogId"] is None:
                await _abandon(
                    conn, row["attemptId"], row["recipientId"], to=RecipientDispatchState.QUEUED, reason="lease expired"
                )
                requeued += 1
                continue
            await conn.execute(
                f"""
                UPDATE "CampaignAttempt" SET "state" = '{AttemptState.PLACED}', "callLogId" = $2
                WHERE "id" = $1 AND "state" IN ({_ATTEMPT_MOVES[AttemptState.PLACED]})
                """,
                row["attemptId"],
                row["callLogId"],
            )
            await conn.execute(
                f"""
                UPDATE "CampaignRecipientDispatch" SET
                    "state" = '{RecipientDispatchState.IN_CALL}', "leaseOwner" = NULL, "leaseExpiresAt" = NULL
                WHERE "recipientId" = $1 AND "state" IN ({_RECIPIENT_MOVES[RecipientDispatchState.IN_CALL]})
                """,
                row["recipientId"],
            )
            followed += 1
    return requeued, followed


async def _call_log_exists(conn: Connection, attempt_id: str) -> bool:
    """Whether the DIALING attempt's CallLog exists."""
    found: bool = await conn.fetchval(
        f"""
        SELECT EXISTS ({ATTEMPT_CALL_LOG}) FROM "CampaignAttempt" a
        JOIN "CampaignRecipientDispatch" rd ON rd."recipientId" = a."recipientId"
        WHERE a."id" = $1
        """,
        attempt_id,
    )
    return found
