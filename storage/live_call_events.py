"""Live call events and the leases of the streams that watch them (migration 0019).

Engine processes record events of watched calls in batches (`record_events`); the API reads an organization's or a
call's events after the last id a stream sent (`events_after`). Ids increase in commit order: each batch is
inserted under one transaction advisory lock, so a reader never sees a smaller id appear after a larger one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from storage.errors import translate_errors
from storage.records import Queryable, new_id, transaction

EVENT_CHANNEL: Final = "dialtone_live_event"
"""Announces recorded events: {"orgs": [organization ids]}; streams of those organizations read what is new."""

_WRITE_LOCK = 0x4C495645  # "LIVE": serializes event inserts, so ids become visible in increasing order


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to record: its call, organization, type and JSON data."""

    organization_id: str
    call_log_id: str
    type: str
    data: dict[str, Any]

    @classmethod
    def stamped(
        cls, organization_id: str, call_log_id: str, event_type: str, data: dict[str, Any], *, at: datetime
    ) -> NewEvent:
        """An event whose data starts with its call's id and its time, `at` (UTC), as every stream sends them."""
        return cls(
            organization_id,
            call_log_id,
            event_type,
            {"callLogId": call_log_id, "at": at.isoformat(timespec="milliseconds"), **data},
        )


@dataclass(frozen=True, slots=True)
class LiveCallEvent(NewEvent):
    """One thing that happened in a call, as recorded: with its id, as a stream sends it."""

    id: int


@dataclass(frozen=True, slots=True)
class Watch:
    """A stream's lease: the organization it watches, and the call (None: every call of the organization)."""

    organization_id: str
    call_log_id: str | None


async def record_events(db: Queryable, events: Sequence[NewEvent]) -> int:
    """Insert `events` in one statement, in order; the largest id given (0 for none).

    The events of a call whose CallLog is gone (deleted while it ran, as the platform's dashboard does in SQL) are
    left out: nothing could show them, and they must not cost the other calls' events of the batch. So is a call's
    second call.ended: a node cut off from the database (or stopped) queues its call's end while recovery, elsewhere,
    tells it as it closes the call lost; the first one written stands (inserts take turns under the write lock).
    """
    if not events:
        return 0
    async with transaction(db) as conn:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _WRITE_LOCK)
        with translate_errors():
            return int(
                await conn.fetchval(
                    """
                    WITH present AS (
                        -- Locked as the foreign key's check locks them: a call deleted meanwhile is left out here
                        -- instead of failing the whole batch there. An event naming another organization's call
                        -- still reaches the check, and is refused.
                        SELECT "id" FROM "CallLog" WHERE "id" = ANY($2::text[]) FOR KEY SHARE
                    ), inserted AS (
                        INSERT INTO "LiveCallEvent" ("organizationId", "callLogId", "type", "data")
                        SELECT o, c, t, d::jsonb FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                            WITH ORDINALITY AS e(o, c, t, d, n)
                        WHERE e.c IN (SELECT "id" FROM present)
                          AND NOT (e.t = 'call.ended' AND EXISTS (
                              SELECT 1 FROM "LiveCallEvent" x WHERE x."callLogId" = e.c AND x."type" = e.t))
                        ORDER BY n
                        RETURNING "id"
                    )
                    SELECT coalesce(max("id"), 0) FROM inserted
                    """,
                    [e.organization_id for e in events],
                    [e.call_log_id for e in events],
                    [e.type for e in events],
                    [json.dumps(e.data, separators=(",", ":"), default=str) for e in events],
                )
            )


async def record_if_watched(db: Queryable, events: Sequence[NewEvent]) -> None:
    """Record those of `events` a stream watches now (an unexpired lease on their call or their organization), and
    announce them on EVENT_CHANNEL as the transaction commits: for the events of calls that end where no engine
    process's LiveEvents records them (recovery closing a dead process's calls, Twilio ending one never connected).
    Unscoped by design, like those endings."""
    if not events:
        return
    async with transaction(db) as conn:
        rows = await conn.fetch(
            """
            SELECT n FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS e(o, c, n)
            WHERE EXISTS (
                SELECT 1 FROM "LiveCallWatch" w
                WHERE w."organizationId" = e.o AND (w."callLogId" IS NULL OR w."callLogId" = e.c)
                  AND w."expiresAt" > now()
            )
            ORDER BY n
            """,
            [e.organization_id for e in events],
            [e.call_log_id for e in events],
        )
        watched = [events[row["n"] - 1] for row in rows]
        if not watched:  # the usual case: nothing written, and the write lock not taken
            return
        await record_events(conn, watched)
        organizations = sorted({event.organization_id for event in watched})
        await conn.execute(
            "SELECT pg_notify($1, $2)", EVENT_CHANNEL, json.dumps({"orgs": organizations}, separators=(",", ":"))
        )


async def events_after(
    db: Queryable, *, organization_id: str, call_log_id: str | None, after: int, limit: int = 500
) -> list[LiveCallEvent]:
    """The organization's events (only the call's, if given) with ids above `after`, oldest first."""
    rows = await db.fetch(
        """
        SELECT "id", "organizationId", "callLogId", "type", "data" FROM "LiveCallEvent"
        WHERE "organizationId" = $1 AND ($2::text IS NULL OR "callLogId" = $2) AND "id" > $3
        ORDER BY "id" LIMIT $4
        """,
        organization_id,
        call_log_id,
        after,
        limit,
    )
    return [
        LiveCallEvent(row["organizationId"], row["callLogId"], row["type"], row["data"], id=row["id"]) for row in rows
    ]


async def last_event_id(db: Queryable, *, organization_id: str, call_log_id: str | None) -> int:
    """The id of the organization's (or the call's) latest event; 0 when it has none."""
    value = await db.fetchval(
        """
        SELECT max("id") FROM "LiveCallEvent"
        WHERE "organizationId" = $1 AND ($2::text IS NULL OR "callLogId" = $2)
        """,
        organization_id,
        call_log_id,
    )
    return int(value or 0)


async def open_watch(db: Queryable, watch: Watch, *, node: str, until: datetime) -> str:
    """Hold a lease on `watch` until `until` for a stream on engine process `node`; the lease's id."""
    watch_id = new_id()
    with translate_errors():
        await db.execute(
            'INSERT INTO "LiveCallWatch" ("id", "organizationId", "callLogId", "node", "expiresAt") '
            "VALUES ($1, $2, $3, $4, $5)",
            watch_id,
            watch.organization_id,
            watch.call_log_id,
            node,
            until,
        )
    return watch_id


async def expire_watch(db: Queryable, *, organization_id: str, watch_id: str, until: datetime) -> None:
    """Move a lease's end to `until`: sooner, as its stream closes (open streams' leases are `renew_watches`')."""
    await db.execute(
        'UPDATE "LiveCallWatch" SET "expiresAt" = $3 WHERE "id" = $2 AND "organizationId" = $1',
        organization_id,
        watch_id,
        until,
    )


async def renew_watches(db: Queryable, *, node: str, watch_ids: Sequence[str], until: datetime) -> None:
    """Move the end of the leases `watch_ids` of engine process `node`'s open streams to `until`, in one statement
    for all of them. Unscoped by design, like `current_watches`: a process's streams watch any organization, and
    only leases that process opened (its `node`) are renewed."""
    await db.execute(
        'UPDATE "LiveCallWatch" SET "expiresAt" = $3 WHERE "id" = ANY($2::text[]) AND "node" = $1',
        node,
        list(watch_ids),
        until,
    )


async def current_watches(db: Queryable, *, now: datetime) -> list[Watch]:
    """Every unexpired lease, of every organization (engine processes decide what to record from these)."""
    rows = await db.fetch(
        'SELECT DISTINCT "organizationId", "callLogId" FROM "LiveCallWatch" WHERE "expiresAt" > $1', now
    )
    return [Watch(row["organizationId"], row["callLogId"]) for row in rows]


async def prune(db: Queryable, *, now: datetime, keep: timedelta) -> int:
    """Delete events older than `keep` and expired leases; how many events were deleted."""
    await db.execute('DELETE FROM "LiveCallWatch" WHERE "expiresAt" <= $1', now)
    status = await db.execute('DELETE FROM "LiveCallEvent" WHERE "createdAt" < $1', now - keep)
    return int(status.split()[-1])
