"""Credit reservations: a call holds the credits of its next minute before it uses them, so no balance goes negative.

A call reserves its first minute when its CallLog is created, extends the reservation one minute at a time while it
runs, and its ending settles it: the minutes used are charged, the rest returns to the organization. A CallLog deleted
while its call runs (the dashboard deletes rows in SQL) settles it at the deletion, by the rule of
`settle_orphaned_reservations` (migration 0031); a reservation deleted any other way while its call is IN_PROGRESS is
refused (migration 0035). A call whose CallLog something else ended while it ran (an operator's UPDATE of its
status) is settled at its own end all the same (call_logs.settle_ended_call), or by recovery's sweep when nothing
ends it (`settle_stranded_reservations`). Each change is one SQL statement, so concurrent calls can never reserve the
same credit twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from storage.enums import Plan
from storage.errors import NotFound
from storage.organizations import shortfall
from storage.records import Queryable, transaction


def check_rates(rates: Mapping[str, int]) -> None:
    """ValueError unless `rates` gives every plan a rate of 0 credits a minute or more."""
    missing = {plan.value for plan in Plan} - set(rates)
    if missing or any(rate < 0 for rate in rates.values()):
        raise ValueError(f"credit rates must give every plan a rate of 0 or more, got {dict(rates)}")


async def reserve_first_minute(
    db: Queryable, *, organization_id: str, call_log_id: str, rates: Mapping[str, int]
) -> int:
    """Move one minute's credits, at the rate `rates` gives the organization's plan, from its balance into the
    call's reservation; return the balance left.

    Raises InsufficientCredits (and reserves nothing) when the balance does not cover the minute.
    """
    check_rates(rates)
    row = await db.fetchrow(
        """
        WITH rate AS (
            SELECT ($3::jsonb ->> "plan"::text)::integer AS "perMinute" FROM "Organization" WHERE "id" = $1
        ), taken AS (
            UPDATE "Organization" o SET "credits" = o."credits" - rate."perMinute"
            FROM rate
            WHERE o."id" = $1 AND o."credits" >= rate."perMinute"
            RETURNING o."credits", rate."perMinute"
        ), held AS (
            INSERT INTO "CreditReservation" ("callLogId", "credits", "creditsPerMinute")
            SELECT $2, "perMinute", "perMinute" FROM taken
        )
        SELECT taken."credits", rate."perMinute" FROM rate LEFT JOIN taken ON true
        """,
        organization_id,
        call_log_id,
        dict(rates),
    )
    if row is None:
        raise NotFound("Organization", organization_id)
    if row["credits"] is None:
        raise await shortfall(db, organization_id=organization_id, amount=row["perMinute"])
    balance: int = row["credits"]
    return balance


async def extend_reservation(db: Queryable, *, call_log_id: str) -> bool:
    """Reserve one more minute for a running call at its rate; False when the balance cannot pay for it (or the
    call's reservation is already settled). NotFound when the CallLog is gone (deleted while the call ran, as the
    platform's dashboard does in SQL: its deletion settled the reservation, migration 0031)."""
    # The reservation is locked before the balance is touched, in the order its settlement takes them: an extension
    # racing the call's end either lands before it (and is returned by it) or finds the reservation gone and takes
    # nothing. Without the lock, it took the minute from a balance whose reservation had just been deleted.
    row = await db.fetchrow(
        """
        WITH rate AS (
            SELECT c."organizationId", r."creditsPerMinute"
            FROM "CreditReservation" r JOIN "CallLog" c ON c."id" = r."callLogId"
            WHERE r."callLogId" = $1
            FOR NO KEY UPDATE OF r
        ), taken AS (
            UPDATE "Organization" o SET "credits" = o."credits" - rate."creditsPerMinute"
            FROM rate
            WHERE o."id" = rate."organizationId" AND o."credits" >= rate."creditsPerMinute"
            RETURNING rate."creditsPerMinute"
        ), extended AS (
            UPDATE "CreditReservation" r
            SET "credits" = r."credits" + taken."creditsPerMinute"
            FROM taken
            WHERE r."callLogId" = $1
            RETURNING r."credits"
        )
        SELECT EXISTS (SELECT 1 FROM extended) AS "extended",
               EXISTS (SELECT 1 FROM "CallLog" WHERE "id" = $1) AS "present"
        """,
        call_log_id,
    )
    assert row is not None  # a SELECT without FROM: always one row
    if not row["present"]:
        raise NotFound("CallLog", call_log_id)
    extended: bool = row["extended"]
    return extended


async def settle_reservation(db: Queryable, *, organization_id: str, call_log_id: str, minutes: int) -> int | None:
    """End a call's reservation: charge `minutes` started minutes at its rate and return the rest to the balance.

    A call that ran past what it reserved is charged what the balance holds, never below zero. Returns the new
    balance, or None when the call holds no reservation (settled already, or it never reserved). The caller has
    ended the CallLog in the same transaction (the database refuses to delete the reservation of a call still
    IN_PROGRESS, migration 0035), and keeps the rate and the minutes in its metadata (`settlement_metadata`), for
    minutes charged after its end.
    """
    if minutes < 0:
        raise ValueError(f"minutes to charge cannot be negative, got {minutes}")
    balance: int | None = await db.fetchval(
        """
        WITH held AS (
            DELETE FROM "CreditReservation" r USING "CallLog" c
            WHERE r."callLogId" = $2 AND c."id" = r."callLogId" AND c."organizationId" = $1
            RETURNING r."credits", r."creditsPerMinute"
        )
        UPDATE "Organization" o
        SET "credits" = GREATEST(o."credits" + held."credits" - held."creditsPerMinute" * $3, 0)
        FROM held
        WHERE o."id" = $1
        RETURNING o."credits"
        """,
        organization_id,
        call_log_id,
        minutes,
    )
    return balance


def settlement_metadata(reservation: str, minutes: str) -> str:
    """SQL of the CallLog metadata its settlement keeps, from the call's "CreditReservation" row named `reservation`
    and the SQL of the minutes charged: `creditsPerMinute`, the rate the call paid, and `minutesCharged`, so that
    minutes charged after the end (`charge_after_end`) are at that rate and never charge a minute twice."""
    return f"""jsonb_build_object('creditsPerMinute', {reservation}."creditsPerMinute", 'minutesCharged', {minutes})"""


async def charge_after_end(
    db: Queryable, *, organization_id: str, call_log_id: str, minutes: int, rates: Mapping[str, int], marker: str
) -> bool:
    """Charge an ended call `minutes` more started minutes at the rate it paid (the `creditsPerMinute` its settlement
    kept; the organization's plan rate in `rates` for a call settled before it was kept), once: the CallLog's
    metadata gets `marker` (the minutes) in the same statement, and a call that has it already is not charged again.
    For time Twilio ran the call after its media session ended (the voicemail message it speaks after the beep).

    Like a settlement, it charges what the balance holds, never below zero. False when nothing was charged now.
    """
    check_rates(rates)
    if minutes <= 0:
        return False
    charged = await db.fetchval(
        """
        WITH marked AS (
            UPDATE "CallLog" SET "metadata" = "metadata" || jsonb_build_object($5::text, $3::integer)
            WHERE "id" = $2 AND "organizationId" = $1 AND NOT ("metadata" ? $5::text)
            RETURNING ("metadata" ->> 'creditsPerMinute')::integer AS "paid"
        )
        UPDATE "Organization" o
        SET "credits" = GREATEST(
            o."credits" - $3 * COALESCE(marked."paid", ($4::jsonb ->> o."plan"::text)::integer), 0
        )
        FROM marked
        WHERE o."id" = $1
        RETURNING o."credits"
        """,
        organization_id,
        call_log_id,
        minutes,
        dict(rates),
        marker,
    )
    return charged is not None


async def settle_orphaned_reservations(db: Queryable, *, call_log_ids: Sequence[str]) -> None:
    """Settle the reservations of calls closed without their media session's end (recovery after an engine was lost):
    each is charged the minutes it surely started, and the rest returns to its organization.

    A call whose media stream started (its CallLog names an engine node) started its first minute, and every minute
    but the last it reserved (each next minute is reserved in the last seconds of the one before): it pays those, at
    least one, and may be undercharged a minute, never overcharged. A call whose stream never started pays nothing.
    The rule is the database's `dialtone_credits_surely_used` (migration 0031), which also settles the reservation of
    a call whose CallLog is deleted. A call closed with the duration of its stream known (recovery of a transferred
    call, storage.engine_nodes.close_orphaned_calls) pays its started minutes instead, as its own end would have,
    within what it reserved. Each keeps its rate and the minutes charged in its CallLog's metadata, as
    `settlement_metadata` says. The caller has locked the CallLogs (it ended them): the organizations' rows are taken
    last, in id order, as every settlement of several calls takes them (migration 0033).
    """
    kept = settlement_metadata("held", 'held."charged" / NULLIF(held."creditsPerMinute", 0)')
    async with transaction(db) as conn:
        await conn.execute(
            f"""
            WITH held AS (
                DELETE FROM "CreditReservation" r USING "CallLog" c
                WHERE r."callLogId" = ANY($1::text[]) AND c."id" = r."callLogId"
                RETURNING c."id", c."organizationId", r."credits", r."creditsPerMinute", GREATEST(
                    "dialtone_credits_surely_used"(r."credits", r."creditsPerMinute", c."metadata" ? 'engineNode'),
                    CASE WHEN c."metadata" ? 'engineNode' AND c."duration" IS NOT NULL THEN
                        LEAST(r."credits", ceil(c."duration" / 60.0)::integer * r."creditsPerMinute") END) AS "charged"
            ), kept AS (
                UPDATE "CallLog" c SET "metadata" = c."metadata" || {kept}
                FROM held
                WHERE c."id" = held."id"
            )
            INSERT INTO "CreditReturn" ("callLogId", "organizationId", "credits")
            SELECT "id", "organizationId", "credits" - "charged" FROM held
            """,
            list(call_log_ids),
        )
        # The organizations' rows last, in id order, as a deletion of CallLogs takes them (migration 0033): two
        # settlements of several organizations never take them in opposite orders.
        await conn.execute('SELECT "dialtone_return_credits"()')


async def settle_stranded_reservations(
    db: Queryable, *, idle_for: timedelta, now: datetime | None = None, limit: int = 500
) -> int:
    """Settle the reservations that calls ended by something else than their own end left behind, and nothing will
    settle now: their CallLog is no longer IN_PROGRESS (an operator's `UPDATE "CallLog" SET "status" = ...` while
    they ran) and no meter has extended them for `idle_for` before `now` (the database's clock when None), so no
    media session runs them any more (it died with its node, or never started). Each pays by the rule of
    `settle_orphaned_reservations`; how many were settled, at most `limit` a pass.

    Safe with several engine nodes sweeping at once and with the calls' own ends: the CallLogs are locked first
    (one another node or an ending holds is left to it), then the reservations, then the organizations (migration
    0033), and a reservation settled already is not there to settle again. Unscoped by design, as recovery is.
    """
    async with transaction(db) as conn:
        rows = await conn.fetch(
            """
            SELECT c."id" FROM "CallLog" c JOIN "CreditReservation" r ON r."callLogId" = c."id"
            WHERE c."status" <> 'IN_PROGRESS'
              AND r."updatedAt" < COALESCE($1::timestamptz, statement_timestamp()) - $2::interval
            ORDER BY c."id"
            LIMIT $3
            FOR NO KEY UPDATE OF c SKIP LOCKED
            """,
            now,
            idle_for,
            limit,
        )
        stranded = [row["id"] for row in rows]
        if stranded:
            await settle_orphaned_reservations(conn, call_log_ids=stranded)
    return len(stranded)


async def reserved_credits(db: Queryable, *, call_log_id: str) -> int | None:
    """Credits the call holds in its reservation now, or None when it holds none."""
    held: int | None = await db.fetchval(
        'SELECT "credits" FROM "CreditReservation" WHERE "callLogId" = $1', call_log_id
    )
    return held
