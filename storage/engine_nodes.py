"""Engine nodes: the processes sharing the database, their heartbeats, and the calls a dead one left behind.

A node tags each call it runs with metadata.engineNode. When a node stops heartbeating, every call still
IN_PROGRESS under its tag is closed by whichever node looks next, so no call stays IN_PROGRESS forever: FAILED, or
COMPLETED `transferred` when Twilio had taken its transfer (the caller was handed over as asked).

Heartbeats are stamped, and judged, by the database's clock (`now=None`): one host's clock running ahead of
another's by the node timeout would otherwise have it close the live calls of a healthy node. Tests pass `now`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from storage import call_logs, transfer_legs
from storage.end_reasons import EndReason
from storage.errors import translate_errors
from storage.records import Queryable, Record, transaction

_COLUMNS = '"id", "hostname", "pid", "startedAt", "lastSeenAt"'
_NOW = "COALESCE({}::timestamptz, statement_timestamp())"
"""The given instant, or the database's clock when it is None (the parameter's placeholder goes in the braces)."""
LOST_AFTER_TRANSFER = "the engine node running the call was lost after Twilio took its transfer"
"""The `endDetail` of a call crash recovery closed as transferred."""


class EngineNode(Record):
    """An engine process: where it runs, when it started, and when it last proved it was alive."""

    id: str
    hostname: str
    pid: int
    started_at: datetime
    last_seen_at: datetime


async def register_node(
    db: Queryable, *, node_id: str, hostname: str, pid: int, now: datetime | None = None
) -> EngineNode:
    """Record a process as a live node, seen `now` (the database's clock when None; registering again only
    refreshes it).

    SchemaNotMigrated if the database has no engine-node table yet.
    """
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "EngineNode" ("id", "hostname", "pid", "startedAt", "lastSeenAt")
            VALUES ($1, $2, $3, {_NOW.format("$4")}, {_NOW.format("$4")})
            ON CONFLICT ("id") DO UPDATE SET "lastSeenAt" = GREATEST("EngineNode"."lastSeenAt", EXCLUDED."lastSeenAt")
            RETURNING {_COLUMNS}
            """,
            node_id,
            hostname,
            pid,
            now,
        )
    assert row is not None
    return EngineNode.from_row(row)


async def heartbeat(db: Queryable, *, node_id: str, now: datetime | None = None) -> bool:
    """Record that the node is alive at `now` (the database's clock when None); False if it is not registered (it
    must register again)."""
    status = await db.execute(
        f'UPDATE "EngineNode" SET "lastSeenAt" = GREATEST("lastSeenAt", {_NOW.format("$2")}) WHERE "id" = $1',
        node_id,
        now,
    )
    return status != "UPDATE 0"


async def deregister_node(db: Queryable, *, node_id: str) -> None:
    """Forget a node that stops; calls it still holds are then closed by the next recovery pass."""
    await db.execute('DELETE FROM "EngineNode" WHERE "id" = $1', node_id)


async def list_alive_nodes(db: Queryable, *, node_timeout: timedelta, now: datetime | None = None) -> list[EngineNode]:
    """The nodes seen within `node_timeout` before `now` (the database's clock when None), oldest first."""
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "EngineNode" WHERE "lastSeenAt" >= {_NOW.format("$1")} - $2::interval
        ORDER BY "startedAt", "id"
        """,
        now,
        node_timeout,
    )
    return EngineNode.from_rows(rows)


async def list_nodes_on_host(db: Queryable, *, hostname: str) -> list[EngineNode]:
    """The registered nodes that run on `hostname`, alive or not, oldest first."""
    rows = await db.fetch(
        f'SELECT {_COLUMNS} FROM "EngineNode" WHERE "hostname" = $1 ORDER BY "startedAt", "id"', hostname
    )
    return EngineNode.from_rows(rows)


_ORPHANED = f"""
    c."status" = 'IN_PROGRESS'
    AND CASE WHEN c."metadata" ? 'engineNode'
             THEN NOT EXISTS (SELECT 1 FROM "EngineNode" n
                              WHERE n."id" = c."metadata"->>'engineNode'
                                AND n."lastSeenAt" >= {_NOW.format("$1")} - $2::interval)
             ELSE c."timestamp" < {_NOW.format("$1")} - $3::interval END
"""
"""The IN_PROGRESS calls `c` no live node runs, given `now` ($1), the node timeout ($2) and the stream timeout ($3)."""


@dataclass(frozen=True, slots=True)
class OrphanedTransfer:
    """An orphaned call whose transfer leg is still open: the transfer was asked, and Twilio took it or may have."""

    call_log_id: str
    call_sid: str


async def orphaned_transfers(
    db: Queryable, *, node_timeout: timedelta, stream_timeout: timedelta, now: datetime | None = None
) -> list[OrphanedTransfer]:
    """The calls `close_orphaned_calls` would close now whose transfer leg is open: whether Twilio made their
    transfer only its record of the dial tells. Unscoped by design, as recovery is."""
    rows = await db.fetch(
        f"""
        SELECT c."id", c."callId" FROM "CallLog" c JOIN "TransferLeg" l ON l."callLogId" = c."id"
        WHERE l."endedAt" IS NULL AND c."metadata" ? 'engineNode' AND {_ORPHANED}
        ORDER BY c."timestamp"
        """,
        now,
        node_timeout,
        stream_timeout,
    )
    return [OrphanedTransfer(call_log_id=row["id"], call_sid=row["callId"]) for row in rows]


async def close_orphaned_calls(
    db: Queryable,
    *,
    node_timeout: timedelta,
    stream_timeout: timedelta,
    now: datetime | None = None,
    dialed: Collection[str] = (),
    looked_up: Collection[str] | None = None,
) -> int:
    """Close every IN_PROGRESS call no live node runs; return how many.

    A call tagged with a node not seen within `node_timeout` was handed over if Twilio made its transfer: its leg
    was settled from the dial Twilio made (not `not-dialed`), or its id is in `dialed` (Twilio's record shows its
    transfer's dial, `orphaned_transfers`); it ends COMPLETED with TRANSFERRED, any other FAILED with ENGINE_LOST.
    With `looked_up` (the calls `orphaned_transfers` gave, whose dials were then looked for), a call whose leg is
    open but was not among them is left for the next pass: it was lost while Twilio was being asked.
    An untagged call that started more than `stream_timeout` ago ends FAILED with STREAM_NEVER_STARTED (its media
    stream never opened). Calls of live nodes, and untagged calls younger than `stream_timeout` (still waiting for
    their stream), are left alone. Each closed call's call.ended is queued, and its credit reservation settled (a
    lost call pays the minutes it surely started, credit_reservations.settle_orphaned_reservations), in the same
    transaction; a transfer's leg is left to its own settlement. `now` is the database's clock when None. Unscoped
    by design: recovery looks across every organization.

    A call closed as transferred gets the duration a transfer that ends normally gets, the agent's part of the call,
    and pays its started minutes: from its media stream's start (`metadata.streamStartedAt`, `call_logs.claim_stream`:
    a media session's duration runs from there, and an outbound call's ringing does not count) to its leg's opening
    (`TransferLeg.startedAt`). The leg is opened just before Twilio is asked to dial, and the call's media session
    ends at Twilio's `stop`, which follows once Twilio acts on that request: of what the database holds, it is the
    last instant the agent surely still had the caller. (The leg's settlement is later, by the whole dial; and it may
    not have come yet.) A call whose stream an engine without `streamStartedAt` took (one of an earlier version)
    runs from its `timestamp` instead. The minutes it pays are never more than its meter had reserved as it ran.
    """
    transferred = """(c."metadata" ? 'engineNode' AND (c."id" = ANY($4::text[]) OR EXISTS (
        SELECT 1 FROM "TransferLeg" l WHERE l."callLogId" = c."id" AND l."endedAt" IS NOT NULL
                                        AND l."dialStatus" <> $5)))"""
    async with transaction(db) as conn:
        rows = await conn.fetch(
            f"""
            UPDATE "CallLog" c SET
                "status" = CASE WHEN {transferred} THEN 'COMPLETED'::"CallStatus" ELSE 'FAILED'::"CallStatus" END,
                "duration" = CASE WHEN {transferred} THEN (
                    SELECT ceil(GREATEST(extract(EPOCH FROM l."startedAt" - COALESCE(
                        (c."metadata"->>'streamStartedAt')::timestamptz, c."timestamp")), 0))::integer
                    FROM "TransferLeg" l WHERE l."callLogId" = c."id") ELSE c."duration" END,
                "metadata" = c."metadata" || CASE
                    WHEN {transferred} THEN jsonb_build_object('endReason', $6::text, 'endDetail', $9::text)
                    WHEN c."metadata" ? 'engineNode' THEN jsonb_build_object('endReason', $7::text)
                    ELSE jsonb_build_object('endReason', $8::text) END
            WHERE {_ORPHANED}
              AND ($10::text[] IS NULL OR c."id" = ANY($10::text[]) OR NOT (c."metadata" ? 'engineNode' AND EXISTS (
                  SELECT 1 FROM "TransferLeg" l WHERE l."callLogId" = c."id" AND l."endedAt" IS NULL)))
            RETURNING {call_logs.CALL_LOG_COLUMNS}
            """,
            now,
            node_timeout,
            stream_timeout,
            list(dialed),
            transfer_legs.NOT_DIALED,
            EndReason.TRANSFERRED.value,
            EndReason.ENGINE_LOST.value,
            EndReason.STREAM_NEVER_STARTED.value,
            LOST_AFTER_TRANSFER,
            None if looked_up is None else list(looked_up),
        )
        await call_logs.after_bulk_ending(conn, rows)
    return len(rows)


async def calls_closed_as_lost(db: Queryable, *, node_id: str, call_log_ids: list[str]) -> list[str]:
    """Of these calls the node `node_id` runs, those crash recovery closed as lost (FAILED, ENGINE_LOST) while it
    could not heartbeat. Unscoped by design, as recovery is: a node runs calls of every organization."""
    if not call_log_ids:
        return []
    rows = await db.fetch(
        """
        SELECT "id" FROM "CallLog"
        WHERE "id" = ANY($1::text[]) AND "status" = 'FAILED'
          AND "metadata"->>'engineNode' = $2 AND "metadata"->>'endReason' = $3
        """,
        call_log_ids,
        node_id,
        EndReason.ENGINE_LOST.value,
    )
    return [str(row["id"]) for row in rows]


async def calls_deleted(db: Queryable, *, call_log_ids: list[str]) -> list[str]:
    """Of these calls a node runs, those whose CallLog no longer exists: deleted while they ran (the platform's
    dashboard deletes rows in SQL, alone or with their organization). Unscoped by design, as `calls_closed_as_lost`."""
    if not call_log_ids:
        return []
    rows = await db.fetch(
        """
        SELECT ids."id" FROM unnest($1::text[]) AS ids("id")
        WHERE NOT EXISTS (SELECT 1 FROM "CallLog" c WHERE c."id" = ids."id")
        """,
        call_log_ids,
    )
    return [str(row["id"]) for row in rows]


async def forget_dead_nodes(db: Queryable, *, older_than: timedelta, now: datetime | None = None) -> int:
    """Delete nodes not seen for `older_than` before `now` (the database's clock when None) that no IN_PROGRESS call
    names; return how many."""
    status = await db.execute(
        f"""
        DELETE FROM "EngineNode" n
        WHERE n."lastSeenAt" < {_NOW.format("$1")} - $2::interval
          AND NOT EXISTS (SELECT 1 FROM "CallLog" c
                          WHERE c."status" = 'IN_PROGRESS' AND c."metadata"->>'engineNode' = n."id")
        """,
        now,
        older_than,
    )
    return int(status.rsplit(" ", 1)[1])
