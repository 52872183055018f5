"""Campaign dials whose CallLog never got a CallSid (the dialer died, or Twilio never answered): finding, settling.

The dialer writes an attempt's CallLog (with a placeholder callId) before it asks Twilio for the call. When its
lease expires with that CallLog still holding the placeholder, only Twilio knows whether the request arrived.
`take_unresolved` hands such attempts to one process at a time (it re-leases them to that process for the lookup,
so a process that dies while looking lets another look after that lease), and the engine asks Twilio
(engine/twilio/placement_lookup.py). Then `adopt_placement` follows the call Twilio created, or
`close_never_placed` closes the CallLog as NOT_PLACED and queues the recipient again without counting the attempt;
the CallLog itself is adopted or closed by the rule API calls share (storage/placements.py). When Twilio cannot be
reached nothing is decided: the lookup lease expires and someone asks again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from storage import placements
from storage.call_logs import PENDING_CALL_ID_PREFIX
from storage.campaign_dispatch import ATTEMPT_CALL_LOG, give_back
from storage.campaign_states import (
    ATTEMPT_TRANSITIONS,
    RECIPIENT_TRANSITIONS,
    AttemptState,
    RecipientDispatchState,
    sources,
    sql_states,
)
from storage.placements import UnresolvedPlacement
from storage.records import Queryable, transaction

NEVER_PLACED_REASON = "never placed: Twilio has no call for this attempt"
"""The `lastReason` of a recipient queued again because its attempt never reached Twilio."""

_TO_PLACED = sql_states(sources(ATTEMPT_TRANSITIONS, AttemptState.PLACED))
_TO_IN_CALL = sql_states(sources(RECIPIENT_TRANSITIONS, RecipientDispatchState.IN_CALL))


@dataclass(frozen=True, slots=True)
class UnresolvedDial(UnresolvedPlacement):
    """An attempt whose CallLog was written but whose call Twilio may or may not have created."""

    attempt_id: str
    recipient_id: str

    def __str__(self) -> str:
        return f"attempt {self.attempt_id} of recipient {self.recipient_id} (CallLog {self.call_log_id})"


async def take_unresolved(
    pool: asyncpg.Pool,
    *,
    now: datetime,
    owner: str,
    hold_for: timedelta,
    written_before: datetime,
    limit: int = 50,
) -> list[UnresolvedDial]:
    """Lease to `owner` for `hold_for` the expired DIALING attempts whose CallLog has no CallSid; return them.

    Only CallLogs written before `written_before`: a younger one's create request may still be on its way.
    """
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            f"""
            SELECT rd."recipientId", a."id" AS "attemptId", a."organizationId",
                   l."id" AS "callLogId", l."phoneNumber", l."metadata"->>'from' AS "fromNumber", l."createdAt"
            FROM "CampaignRecipientDispatch" rd
            JOIN "CampaignAttempt" a ON a."recipientId" = rd."recipientId" AND a."state" = '{AttemptState.DIALING}'
            JOIN "CallLog" l ON l."id" = ({ATTEMPT_CALL_LOG})
            WHERE rd."state" = '{RecipientDispatchState.DIALING}' AND rd."leaseExpiresAt" < $1
              AND starts_with(l."callId", $3) AND l."createdAt" < $4
            ORDER BY rd."leaseExpiresAt"
            LIMIT $2
            FOR UPDATE OF rd, a SKIP LOCKED
            """,
            now,
            limit,
            PENDING_CALL_ID_PREFIX,
            written_before,
        )
        if not rows:
            return []
        await conn.execute(
            """
            UPDATE "CampaignRecipientDispatch" SET "leaseOwner" = $2, "leaseExpiresAt" = $3
            WHERE "recipientId" = ANY($1::text[])
            """,
            [row["recipientId"] for row in rows],
            owner,
            now + hold_for,
        )
    return [
        UnresolvedDial(
            attempt_id=row["attemptId"],
            recipient_id=row["recipientId"],
            organization_id=row["organizationId"],
            call_log_id=row["callLogId"],
            to=row["phoneNumber"],
            from_=row["fromNumber"] or "",
            created_at=row["createdAt"],
        )
        for row in rows
    ]


async def adopt_placement(pool: asyncpg.Pool, placement: UnresolvedDial, *, owner: str, call_sid: str) -> bool:
    """Twilio created the call: store its CallSid on the CallLog and follow it like any placed call.

    False if `owner` no longer holds the lookup lease (someone else settled it). A status callback that stored
    a CallSid meanwhile wins: the attempt then follows the CallLog with that one. NotFound if the CallLog was deleted
    since it was taken: the lookup lease's expiry ends the attempt as one whose CallLog is deleted (expire_leases).
    """
    async with transaction(pool) as conn:
        if not await _holds(conn, placement, owner):
            return False
        await placements.locked_call_log(conn, placement)
        stored = call_sid if await placements.adopt(conn, placement, call_sid) else None
        await conn.execute(
            f"""
            UPDATE "CampaignAttempt" SET "state" = '{AttemptState.PLACED}', "callLogId" = $2, "callSid" = $3
            WHERE "id" = $1 AND "state" IN ({_TO_PLACED})
            """,
            placement.attempt_id,
            placement.call_log_id,
            stored,
        )
        await conn.execute(
            f"""
            UPDATE "CampaignRecipientDispatch" SET
                "state" = '{RecipientDispatchState.IN_CALL}', "leaseOwner" = NULL, "leaseExpiresAt" = NULL
            WHERE "recipientId" = $1 AND "state" IN ({_TO_IN_CALL})
            """,
            placement.recipient_id,
        )
    return True


async def close_never_placed(pool: asyncpg.Pool, placement: UnresolvedDial, *, owner: str) -> bool:
    """Twilio has no such call: the CallLog ends FAILED as NOT_PLACED (placements.close_not_placed), the attempt does
    not count, the recipient waits again (no recipient.failed). False if `owner` no longer holds the lookup lease, or
    a status callback gave the CallLog a CallSid meanwhile (the call exists after all: the next lease expiry follows
    it)."""
    async with transaction(pool) as conn:
        if not await _holds(conn, placement, owner):
            return False
        if not await placements.close_not_placed(conn, await placements.locked_call_log(conn, placement)):
            return False
        await give_back(conn, placement.attempt_id, placement.recipient_id, reason=NEVER_PLACED_REASON)
    return True


async def _holds(conn: Queryable, placement: UnresolvedDial, owner: str) -> bool:
    held = await conn.fetchval(
        f"""
        SELECT 1 FROM "CampaignRecipientDispatch" rd
        JOIN "CampaignAttempt" a ON a."id" = $2 AND a."state" = '{AttemptState.DIALING}'
        WHERE rd."recipientId" = $1 AND rd."state" = '{RecipientDispatchState.DIALING}' AND rd."leaseOwner" = $3
        FOR UPDATE OF rd, a
        """,
        placement.recipient_id,
        placement.attempt_id,
        owner,
    )
    return held is not None
