"""Transfer legs: the dialed leg of a transferred call holds the credits of its longest allowed length, and pays for
the minutes it ran.

A transfer opens its leg before Twilio is asked to dial: as many whole minutes as the balance pays for, up to the
agent's limit, move from the organization's balance into the leg, and that length is the `<Dial>`'s time limit, so
the leg can never run longer than it holds credits for. When the dial ends, its started minutes are charged at the
call's rate and the rest returns to the balance; the CallLog's `metadata.transfer` says how it went. A CallLog deleted
while its leg is open (the dashboard deletes rows in SQL) leaves the leg detached ("DetachedTransferLeg", migration
0031), settled the same way. Each change is one SQL statement, and settling twice charges once. A leg's credits return
through "CreditReturn" when its row is deleted (released, or settled detached): the database refuses a deletion of a
leg still dialed that does not hand them there (migration 0035).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from storage.credit_reservations import check_rates
from storage.errors import NotFound
from storage.organizations import shortfall
from storage.records import Queryable, transaction
from storage.webhook_outbox import WebhookEvent, enqueue_event

__all__ = [
    "NOT_DIALED",
    "OpenLeg",
    "SettledLeg",
    "TransferLeg",
    "legs_of",
    "open_leg",
    "overdue_legs",
    "release_leg",
    "reserved_leg_credits",
    "settle_leg",
]

NOT_DIALED = "not-dialed"
"""The dial status the sweep gives a leg Twilio has no dialed call for (the engine stopped before asking it)."""


@dataclass(frozen=True, slots=True)
class TransferLeg:
    """A transfer's leg as opened: its destination, the credits it holds, and the time limit they pay for."""

    call_log_id: str
    to: str
    credits: int
    credits_per_minute: int
    time_limit_seconds: int


@dataclass(frozen=True, slots=True)
class SettledLeg:
    """A leg as settled: how the dial ended, how long it ran, what it was charged, and the balance after."""

    call_log_id: str
    dial_status: str
    duration_seconds: int
    credits_charged: int
    balance: int


@dataclass(frozen=True, slots=True)
class OpenLeg:
    """A leg still waiting for its settlement: the call it belongs to (its Twilio CallSid) and when it started."""

    call_log_id: str
    call_sid: str
    started_at: datetime
    time_limit_seconds: int


async def open_leg(
    db: Queryable, *, organization_id: str, call_log_id: str, to: str, max_minutes: int, rates: Mapping[str, int]
) -> TransferLeg:
    """Reserve the credits of the call's transfer to `to`: as many whole minutes as the organization's balance pays
    for, at most `max_minutes` (all of them when the rate is 0). The rate is the call's own (its credit
    reservation's), else the one `rates` gives the organization's plan.

    Raises InsufficientCredits (and reserves nothing) when the balance does not pay for one minute; NotFound when
    the organization has no such call.
    """
    if max_minutes < 1:
        raise ValueError(f"a transfer needs at least one minute, got {max_minutes}")
    check_rates(rates)
    async with transaction(db) as conn:
        # The CallLog first, in the order its deletion takes them (migration 0033: the CallLog, then the
        # organization): taking the organization's row first and the CallLog's for the leg's foreign key after, the
        # leg deadlocked with a deletion of its call. A call deleted meanwhile is not found below.
        await conn.execute(
            'SELECT FROM "CallLog" WHERE "id" = $1 AND "organizationId" = $2 FOR KEY SHARE',
            call_log_id,
            organization_id,
        )
        row = await conn.fetchrow(
            """
            WITH terms AS (
                SELECT o."credits",
                       COALESCE(r."creditsPerMinute", ($5::jsonb ->> o."plan"::text)::integer) AS "perMinute"
                FROM "CallLog" c
                JOIN "Organization" o ON o."id" = c."organizationId"
                LEFT JOIN "CreditReservation" r ON r."callLogId" = c."id"
                WHERE c."id" = $2 AND c."organizationId" = $1
            ), minutes AS (
                SELECT "perMinute", CASE WHEN "perMinute" = 0 THEN $4::integer
                                         ELSE LEAST($4::integer, "credits" / "perMinute") END AS "minutes"
                FROM terms
            ), taken AS (
                UPDATE "Organization" o SET "credits" = o."credits" - minutes."minutes" * minutes."perMinute"
                FROM minutes
                WHERE o."id" = $1 AND minutes."minutes" >= 1
                  AND o."credits" >= minutes."minutes" * minutes."perMinute"
                RETURNING minutes."minutes", minutes."perMinute"
            ), held AS (
                INSERT INTO "TransferLeg" ("callLogId", "to", "credits", "creditsPerMinute", "timeLimitSeconds")
                SELECT $2, $3, taken."minutes" * taken."perMinute", taken."perMinute", taken."minutes" * 60 FROM taken
                RETURNING "timeLimitSeconds", "credits"
            )
            SELECT terms."perMinute", held."timeLimitSeconds", held."credits"
            FROM terms LEFT JOIN held ON true
            """,
            organization_id,
            call_log_id,
            to,
            max_minutes,
            dict(rates),
        )
    if row is None:
        raise NotFound("CallLog", call_log_id)
    per_minute: int = row["perMinute"]
    if row["timeLimitSeconds"] is None:
        raise await shortfall(db, organization_id=organization_id, amount=per_minute)
    return TransferLeg(
        call_log_id=call_log_id,
        to=to,
        credits=row["credits"],
        credits_per_minute=per_minute,
        time_limit_seconds=row["timeLimitSeconds"],
    )


async def settle_leg(
    db: Queryable, *, call_log_id: str, dial_status: str, duration_seconds: int, call_sid: str | None = None
) -> SettledLeg | None:
    """End the call's open leg: charge its started minutes (`duration_seconds` of talk, never more than it holds)
    at its rate, return the rest to the balance, note the leg in the CallLog's `metadata.transfer`, and queue
    transfer.ended for webhook subscribers, all in one transaction. A leg its CallLog's deletion detached is settled
    alike, with no CallLog left to note it in. With `call_sid`, only a leg of that Twilio call is settled.

    Returns None when the call has no open leg (settled already, or never opened): a second settlement charges
    nothing.
    """
    if duration_seconds < 0:
        raise ValueError(f"a leg's duration cannot be negative, got {duration_seconds}")
    minutes = math.ceil(duration_seconds / 60)
    async with transaction(db) as conn:
        # The CallLog is locked first, in the order its deletion's trigger takes them (migration 0031: the CallLog,
        # then its leg): taking the leg first, a settlement racing the deletion deadlocked with it. Once a deletion
        # has gone before, this statement's snapshot finds the leg detached.
        await conn.execute('SELECT FROM "CallLog" WHERE "id" = $1 FOR NO KEY UPDATE', call_log_id)
        # A leg is open in "TransferLeg" or detached, never both: its CallLog's deletion moves it in one statement.
        row = await conn.fetchrow(
            """
            WITH leg AS (
                UPDATE "TransferLeg" SET
                    "endedAt" = CURRENT_TIMESTAMP,
                    "dialStatus" = $2,
                    "durationSeconds" = $3,
                    "creditsCharged" = LEAST("credits", "creditsPerMinute" * $4::integer)
                WHERE "callLogId" = $1 AND "endedAt" IS NULL
                  AND ($5::text IS NULL OR EXISTS (SELECT 1 FROM "CallLog" WHERE "id" = $1 AND "callId" = $5))
                RETURNING "callLogId", "to", "credits", "creditsCharged", "timeLimitSeconds"
            ), call AS (
                UPDATE "CallLog" c SET "metadata" = c."metadata" || jsonb_build_object('transfer', jsonb_build_object(
                    'to', leg."to", 'dialStatus', $2::text, 'durationSeconds', $3::integer,
                    'timeLimitSeconds', leg."timeLimitSeconds", 'creditsCharged', leg."creditsCharged"))
                FROM leg
                WHERE c."id" = leg."callLogId"
                RETURNING c."organizationId", c."agentId", c."campaignId"
            ), paid AS (
                UPDATE "Organization" o SET "credits" = o."credits" + leg."credits" - leg."creditsCharged"
                FROM leg, call
                WHERE o."id" = call."organizationId"
                RETURNING o."credits"
            ), detached AS (
                DELETE FROM "DetachedTransferLeg"
                WHERE "callLogId" = $1 AND ($5::text IS NULL OR "callId" = $5)
                RETURNING "organizationId", "agentId", "campaignId", "to", "credits", "timeLimitSeconds",
                          LEAST("credits", "creditsPerMinute" * $4::integer) AS "creditsCharged"
            ), returned AS (
                INSERT INTO "CreditReturn" ("callLogId", "organizationId", "credits")
                SELECT $1, "organizationId", "credits" - "creditsCharged" FROM detached
            )
            SELECT paid."credits", leg."creditsCharged", leg."to", leg."timeLimitSeconds",
                   call."organizationId", call."agentId", call."campaignId"
            FROM leg, call, paid
            UNION ALL
            SELECT NULL, "creditsCharged", "to", "timeLimitSeconds", "organizationId", "agentId", "campaignId"
            FROM detached
            """,
            call_log_id,
            dial_status,
            duration_seconds,
            minutes,
            call_sid,
        )
        if row is None:
            return None
        balance: int = row["credits"] if row["credits"] is not None else await _returned(conn, row["organizationId"])
        await enqueue_event(
            conn,
            organization_id=row["organizationId"],
            event=WebhookEvent.TRANSFER_ENDED,
            data={
                "callLogId": call_log_id,
                "agentId": row["agentId"],
                "campaignId": row["campaignId"],
                "to": row["to"],
                "dialStatus": dial_status,
                "durationSeconds": duration_seconds,
                "timeLimitSeconds": row["timeLimitSeconds"],
                "creditsCharged": row["creditsCharged"],
            },
            agent_id=row["agentId"],
        )
    return SettledLeg(
        call_log_id=call_log_id,
        dial_status=dial_status,
        duration_seconds=duration_seconds,
        credits_charged=row["creditsCharged"],
        balance=balance,
    )


async def release_leg(db: Queryable, *, call_log_id: str) -> int | None:
    """Undo the call's open leg, which Twilio was not asked to dial after all (its request failed): every credit it
    held returns, and the call may try another transfer. A leg its CallLog's deletion detached meanwhile returns
    alike. Returns the balance, or None when it had no open leg."""
    async with transaction(db) as conn:
        # The CallLog first, in the order its deletion's trigger takes them, as `settle_leg` does.
        await conn.execute('SELECT FROM "CallLog" WHERE "id" = $1 FOR NO KEY UPDATE', call_log_id)
        organization_id: str | None = await conn.fetchval(
            """
            WITH leg AS (
                DELETE FROM "TransferLeg" l USING "CallLog" c
                WHERE l."callLogId" = $1 AND l."endedAt" IS NULL AND c."id" = l."callLogId"
                RETURNING l."callLogId", c."organizationId", l."credits"
            ), detached AS (
                DELETE FROM "DetachedTransferLeg" WHERE "callLogId" = $1
                RETURNING "callLogId", "organizationId", "credits"
            )
            INSERT INTO "CreditReturn" ("callLogId", "organizationId", "credits")
            SELECT * FROM leg UNION ALL SELECT * FROM detached
            RETURNING "organizationId"
            """,
            call_log_id,
        )
        if organization_id is None:
            return None
        return await _returned(conn, organization_id)


async def _returned(conn: Queryable, organization_id: str) -> int:
    """Give the organizations what this transaction's "CreditReturn" rows hold (migration 0033), and return the
    balance of `organization_id` after. A leg's deletion hands its credits to "CreditReturn" in its own statement:
    one that does not is refused (migration 0035), as it would lose them."""
    await conn.execute('SELECT "dialtone_return_credits"()')
    balance: int = await conn.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', organization_id)
    return balance


async def legs_of(db: Queryable, call_log_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The transfer legs of these calls, by CallLog id, as call.ended tells them: `to`, `dialStatus`,
    `durationSeconds`, `timeLimitSeconds`, `creditsCharged` (how it went is null while the leg runs: its settlement
    follows as transfer.ended). Calls without a leg are left out."""
    rows = await db.fetch(
        """
        SELECT "callLogId", "to", "dialStatus", "durationSeconds", "timeLimitSeconds", "creditsCharged"
        FROM "TransferLeg" WHERE "callLogId" = ANY($1::text[])
        """,
        list(call_log_ids),
    )
    return {row["callLogId"]: {name: value for name, value in row.items() if name != "callLogId"} for row in rows}


async def reserved_leg_credits(db: Queryable, *, call_log_id: str) -> int | None:
    """Credits the call's open leg holds now, or None when it has none."""
    held: int | None = await db.fetchval(
        'SELECT "credits" FROM "TransferLeg" WHERE "callLogId" = $1 AND "endedAt" IS NULL', call_log_id
    )
    return held


async def overdue_legs(db: Queryable, *, now: datetime, grace: timedelta, limit: int = 100) -> list[OpenLeg]:
    """Open legs (detached ones too) whose time limit ran out more than `grace` before `now`: their dial has ended,
    but no settlement came. Unscoped by design: the engine settles every organization's legs."""
    rows = await db.fetch(
        """
        SELECT * FROM (
            SELECT l."callLogId", c."callId", l."startedAt", l."timeLimitSeconds"
            FROM "TransferLeg" l JOIN "CallLog" c ON c."id" = l."callLogId"
            WHERE l."endedAt" IS NULL
            UNION ALL
            SELECT "callLogId", "callId", "startedAt", "timeLimitSeconds" FROM "DetachedTransferLeg"
        ) l
        WHERE l."startedAt" + make_interval(secs => l."timeLimitSeconds") + $2::interval < $1
        ORDER BY l."startedAt"
        LIMIT $3
        """,
        now,
        grace,
        limit,
    )
    return [_open_leg(row) for row in rows]


def _open_leg(row: Any) -> OpenLeg:
    return OpenLeg(
        call_log_id=row["callLogId"],
        call_sid=row["callId"],
        started_at=row["startedAt"],
        time_limit_seconds=row["timeLimitSeconds"],
    )
