"""Call logs: one row per call, written while the call runs, whose status moves only along allowed edges.

A call starts IN_PROGRESS and ends once, as COMPLETED, FAILED or MISSED; every move is a single conditional
UPDATE, so two writers racing to end the same call cannot both win.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from storage import call_events, call_slots, credit_reservations, live_call_events, transfer_legs
from storage.end_reasons import EndReason, ending
from storage.enums import CallStatus, CallType
from storage.errors import InvalidReference, NotFound, StorageError, translate_errors
from storage.records import Queryable, Record, new_id, transaction

_FIELDS = (
    "id",
    "organizationId",
    "callType",
    "agentId",
    "campaignId",
    "callId",
    "customer",
    "phoneNumber",
    "timestamp",
    "duration",
    "status",
    "transcript",
    "recordingUrl",
    "metadata",
    "createdAt",
    "updatedAt",
)
_COLUMNS = ", ".join(f'"{field}"' for field in _FIELDS)
_CALL_COLUMNS = ", ".join(f'c."{field}"' for field in _FIELDS)
CALL_LOG_COLUMNS = _CALL_COLUMNS
"""A CallLog's columns qualified by the alias `c`, for other modules' queries that return whole CallLogs."""

CALL_TRANSITIONS: Mapping[CallStatus, frozenset[CallStatus]] = {
    CallStatus.IN_PROGRESS: frozenset({CallStatus.COMPLETED, CallStatus.FAILED, CallStatus.MISSED}),
    CallStatus.COMPLETED: frozenset(),
    CallStatus.FAILED: frozenset(),
    CallStatus.MISSED: frozenset(),
}
"""The statuses each status may move to: only IN_PROGRESS moves, and only to a final status."""


class CallLog(Record):
    """A call: who, when, how it went, what was said, and where its recording is."""

    id: str
    organization_id: str
    call_type: CallType
    agent_id: str | None
    campaign_id: str | None
    call_id: str
    customer: str | None
    phone_number: str | None
    timestamp: datetime
    duration: int | None
    status: CallStatus
    transcript: str | None
    recording_url: str | None
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class CallLogEntry(CallLog):
    """A call log as the call history lists it, with its agent's name and type and its campaign's name."""

    agent_name: str | None
    agent_type: str | None
    campaign_batch_name: str | None


class InvalidCallTransition(StorageError):
    """A call log was asked to move to a status its current status does not lead to; nothing changed."""

    def __init__(self, call_log_id: str, current: CallStatus, requested: CallStatus) -> None:
        super().__init__(
            f"CallLog {call_log_id} is {current}; it cannot become {requested} "
            "(only an IN_PROGRESS call moves, to COMPLETED, FAILED or MISSED)"
        )
        self.call_log_id = call_log_id
        self.current = current
        self.requested = requested


async def create_call_log(
    db: Queryable,
    *,
    organization_id: str,
    call_type: CallType,
    call_id: str,
    agent_id: str | None = None,
    campaign_id: str | None = None,
    customer: str | None = None,
    phone_number: str | None = None,
    metadata: dict[str, Any] | None = None,
    credit_rates: Mapping[str, int] | None = None,
    call_limits: Mapping[str, int] | None = None,
) -> CallLog:
    """Open the log of a call that starts now (IN_PROGRESS); with `credit_rates` (credits a minute by plan),
    reserve its first minute in the same transaction; with `call_limits` (calls in progress at once by plan, 0 for
    no limit), take one of the organization's call slots first (storage.call_slots).

    AlreadyExists if a log has that callId; InvalidReference if the agent or campaign is not the organization's;
    InsufficientCredits if the balance cannot pay for the first minute; ConcurrentCallLimitReached if the
    organization has no free call slot. Each leaves nothing written.
    """
    async with transaction(db) as conn:
        if call_limits is not None:
            await call_slots.take_call_slot(conn, organization_id=organization_id, limits=call_limits)
        with translate_errors():
            row = await conn.fetchrow(
                f"""
                INSERT INTO "CallLog"
                    ("id", "organizationId", "callType", "callId", "agentId", "campaignId", "customer", "phoneNumber",
                     "metadata")
                SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
                WHERE ($5::text IS NULL OR EXISTS (
                        SELECT 1 FROM "Agent" WHERE "id" = $5 AND "organizationId" = $2))
                  AND ($6::text IS NULL OR EXISTS (
                        SELECT 1 FROM "Campaign" WHERE "id" = $6 AND "organizationId" = $2))
                RETURNING {_COLUMNS}
                """,
                new_id(),
                organization_id,
                call_type,
                call_id,
                agent_id,
                campaign_id,
                customer,
                phone_number,
                metadata if metadata is not None else {},
            )
        if row is None:
            raise await _foreign_reference(conn, organization_id, agent_id, campaign_id)
        call_log = CallLog.from_row(row)
        if credit_rates is not None:
            await credit_reservations.reserve_first_minute(
                conn, organization_id=organization_id, call_log_id=call_log.id, rates=credit_rates
            )
        return call_log


async def record_refused_call(
    db: Queryable,
    *,
    organization_id: str,
    call_type: CallType,
    call_id: str,
    reason: EndReason,
    detail: str | None = None,
    status: CallStatus = CallStatus.MISSED,
    agent_id: str | None = None,
    customer: str | None = None,
    phone_number: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> CallLog:
    """Log a call the engine turned away before it ran: MISSED (e.g. over its plan's concurrent-call limit) or
    FAILED (its agent cannot run), with `reason` and `detail`, a duration of 0 and no credit charged, its call.ended
    queued, all in one transaction.

    AlreadyExists if a log has that callId (Twilio retried the webhook).
    """
    async with transaction(db) as conn:
        call_log = await create_call_log(
            conn,
            organization_id=organization_id,
            call_type=call_type,
            call_id=call_id,
            agent_id=agent_id,
            customer=customer,
            phone_number=phone_number,
            metadata=metadata,
        )
        return await finalize_call_log(
            conn,
            organization_id=organization_id,
            call_log_id=call_log.id,
            status=status,
            duration=0,
            metadata=ending(reason, detail),
        )


async def _foreign_reference(
    db: Queryable, organization_id: str, agent_id: str | None, campaign_id: str | None
) -> InvalidReference:
    # Only reached when the guarded INSERT refused a reference: name which one.
    if agent_id is not None and not await db.fetchval(
        'SELECT EXISTS (SELECT 1 FROM "Agent" WHERE "id" = $1 AND "organizationId" = $2)', agent_id, organization_id
    ):
        return InvalidReference(f"Agent {agent_id} does not exist in organization {organization_id}")
    return InvalidReference(f"Campaign {campaign_id} does not exist in organization {organization_id}")


async def get_call_log(db: Queryable, *, organization_id: str, call_log_id: str) -> CallLog:
    """The organization's call log with that id; NotFound otherwise."""
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "CallLog" WHERE "id" = $1 AND "organizationId" = $2', call_log_id, organization_id
    )
    if row is None:
        raise NotFound("CallLog", call_log_id)
    return CallLog.from_row(row)


async def get_by_call_id(db: Queryable, *, call_id: str) -> CallLog | None:
    """The call log of a provider's call id (Twilio's CallSid), or None.

    Unscoped by design: a status callback knows only the CallSid; scope later calls by the log's organization.
    """
    row = await db.fetchrow(f'SELECT {_COLUMNS} FROM "CallLog" WHERE "callId" = $1', call_id)
    return CallLog.from_row(row) if row is not None else None


async def append_transcript(db: Queryable, *, organization_id: str, call_log_id: str, text: str) -> None:
    """Add a line to the call's transcript in one UPDATE, so concurrent appends all land."""
    with translate_errors():
        status = await db.execute(
            """
            UPDATE "CallLog"
            SET "transcript" = CASE WHEN "transcript" IS NULL OR "transcript" = '' THEN $3
                                    ELSE "transcript" || E'\\n' || $3 END
            WHERE "id" = $1 AND "organizationId" = $2
            """,
            call_log_id,
            organization_id,
            text,
        )
    if status == "UPDATE 0":
        raise NotFound("CallLog", call_log_id)


async def finalize_call_log(
    db: Queryable,
    *,
    organization_id: str,
    call_log_id: str,
    status: CallStatus,
    duration: int | None = None,
    recording_url: str | None = None,
    metadata: dict[str, Any] | None = None,
    minutes_charged: int = 0,
    told_live: bool = False,
) -> CallLog:
    """End an IN_PROGRESS call with a final status, its duration (s), recording and metadata merged in.

    Ending it again with the same status returns the row unchanged; with another status, or to a status that
    is not final, raises InvalidCallTransition and changes nothing. The ending queues call.ended for webhook
    subscribers and settles the call's credit reservation in the same transaction: `minutes_charged` started
    minutes are charged at its rate (none for a call that never connected), the rest returns to the balance, and
    the rate and the minutes stay in the metadata (credit_reservations.settlement_metadata).
    The live event streams watching the call are told its call.ended in that transaction too, unless `told_live`:
    its media session told them itself, after its last words.
    """
    if status not in CALL_TRANSITIONS[CallStatus.IN_PROGRESS]:
        current = await get_call_log(db, organization_id=organization_id, call_log_id=call_log_id)
        raise InvalidCallTransition(call_log_id, current.status, status)
    # call.ended is queued in the transaction that ends the call: subscribers hear of every ending, once.
    async with transaction(db) as conn:
        with translate_errors():
            row = await conn.fetchrow(
                f"""
                UPDATE "CallLog" SET
                    "status" = $3,
                    "duration" = COALESCE($4, "duration"),
                    "recordingUrl" = COALESCE($5, "recordingUrl"),
                    "metadata" = "metadata" || $6::jsonb || COALESCE((
                        SELECT {credit_reservations.settlement_metadata("r", "$7::integer")}
                        FROM "CreditReservation" r WHERE r."callLogId" = $1
                    ), '{{}}'::jsonb)
                WHERE "id" = $1 AND "organizationId" = $2 AND "status" = 'IN_PROGRESS'
                RETURNING {_COLUMNS}
                """,
                call_log_id,
                organization_id,
                status,
                duration,
                recording_url,
                metadata if metadata is not None else {},
                minutes_charged,
            )
        if row is not None:
            ended = CallLog.from_row(row)
            legs = await transfer_legs.legs_of(conn, [call_log_id])
            await call_events.enqueue_call_ended(conn, ended, legs.get(call_log_id))
            if not told_live:
                await _tell_live_streams_ended(conn, [ended], legs)
            await credit_reservations.settle_reservation(
                conn, organization_id=organization_id, call_log_id=call_log_id, minutes=minutes_charged
            )
            return ended
    # Ended by something else first (a dashboard's UPDATE, a status callback racing this end): the reservation it
    # left, if any, is settled all the same, on the minutes this ending charges.
    await settle_ended_call(
        db, organization_id=organization_id, call_log_id=call_log_id, minutes_charged=minutes_charged
    )
    current = await get_call_log(db, organization_id=organization_id, call_log_id=call_log_id)
    if current.status == status:
        return current
    raise InvalidCallTransition(call_log_id, current.status, status)


async def settle_ended_call(
    db: Queryable, *, organization_id: str, call_log_id: str, minutes_charged: int
) -> int | None:
    """Settle the credit reservation of a call that was ended (its CallLog given a final status) by anything but its
    own ending, which settles it (`finalize_call_log`): an operator's or a dashboard's `UPDATE "CallLog" SET
    "status" = ...` while it ran, a status callback racing it. `minutes_charged` started minutes are charged at its
    rate, as its own end would have, the rest returns, and the rate and the minutes stay in its metadata
    (credit_reservations.settlement_metadata). The CallLog is locked first, then the reservation, then the
    organization (migration 0033). The new balance, or None when the call holds no reservation (settled already, or
    still IN_PROGRESS: its end settles it).
    """
    async with transaction(db) as conn:
        with translate_errors():
            kept = await conn.execute(
                f"""
                UPDATE "CallLog" c
                SET "metadata" = c."metadata" || {credit_reservations.settlement_metadata("r", "$3::integer")}
                FROM "CreditReservation" r
                WHERE c."id" = $1 AND c."organizationId" = $2 AND c."status" <> 'IN_PROGRESS'
                  AND r."callLogId" = c."id"
                """,
                call_log_id,
                organization_id,
                minutes_charged,
            )
        if kept == "UPDATE 0":
            return None
        return await credit_reservations.settle_reservation(
            conn, organization_id=organization_id, call_log_id=call_log_id, minutes=minutes_charged
        )


async def fail_unstarted(
    db: Queryable,
    call_log: CallLog,
    reason: EndReason,
    detail: str | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """End a call that never ran (it was not placed, or its session could not start) as FAILED with `reason`.

    A call something else ended first (a status callback, recovery) is left as it ended.
    """
    with contextlib.suppress(InvalidCallTransition):
        await finalize_call_log(
            db,
            organization_id=call_log.organization_id,
            call_log_id=call_log.id,
            status=CallStatus.FAILED,
            duration=0,
            metadata={**(metadata or {}), **ending(reason, detail)},
        )


async def list_call_logs(
    db: Queryable,
    *,
    organization_id: str,
    call_type: CallType | None = None,
    status: CallStatus | None = None,
    agent_id: str | None = None,
    campaign_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    before: tuple[datetime, str] | None = None,
) -> list[CallLogEntry]:
    """The organization's call history, newest first, filtered, with agent and campaign names.

    `since` and `until` bound the start time inclusively. For the next page pass
    `before=(entry.timestamp, entry.id)` of the last entry of this one.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    conditions = ['c."organizationId" = $1']
    args: list[Any] = [organization_id]
    for condition, value in (
        ('c."callType" = ${}', call_type),
        ('c."status" = ${}', status),
        ('c."agentId" = ${}', agent_id),
        ('c."campaignId" = ${}', campaign_id),
        ('c."timestamp" >= ${}', since),
        ('c."timestamp" <= ${}', until),
    ):
        if value is not None:
            args.append(value)
            conditions.append(condition.format(len(args)))
    if before is not None:
        args.extend(before)
        conditions.append(f'(c."timestamp", c."id") < (${len(args) - 1}, ${len(args)})')
    args.append(limit)
    rows = await db.fetch(
        f"""
        SELECT {_CALL_COLUMNS},
            a."name" AS "agentName", a."type" AS "agentType", k."batchName" AS "campaignBatchName"
        FROM "CallLog" c
        LEFT JOIN "Agent" a ON a."id" = c."agentId"
        LEFT JOIN "Campaign" k ON k."id" = c."campaignId"
        WHERE {" AND ".join(conditions)}
        ORDER BY c."timestamp" DESC, c."id" DESC
        LIMIT ${len(args)}
        """,
        *args,
    )
    return CallLogEntry.from_rows(rows)


async def list_in_progress(db: Queryable, *, older_than: datetime) -> list[CallLog]:
    """Every organization's calls still IN_PROGRESS that started before `older_than`, oldest first.

    Unscoped by design: crash recovery at start-up looks across all tenants.
    """
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "CallLog"
        WHERE "status" = 'IN_PROGRESS' AND "timestamp" < $1
        ORDER BY "timestamp", "id"
        """,
        older_than,
    )
    return CallLog.from_rows(rows)


async def fail_stale_in_progress(
    db: Queryable, *, older_than: datetime, reason: EndReason, detail: str | None = None
) -> int:
    """Mark FAILED, ended for `reason`, every call still IN_PROGRESS that started before `older_than`.

    Returns how many were marked; each one's call.ended is queued, and its credit reservation settled, in the same
    transaction. Unscoped by design, like list_in_progress: nothing stays IN_PROGRESS forever.
    """
    async with transaction(db) as conn:
        with translate_errors():
            rows = await conn.fetch(
                f"""
                UPDATE "CallLog"
                SET "status" = 'FAILED', "metadata" = "metadata" || $2::jsonb
                WHERE "status" = 'IN_PROGRESS' AND "timestamp" < $1
                RETURNING {_COLUMNS}
                """,
                older_than,
                ending(reason, detail),
            )
        await after_bulk_ending(conn, rows)
    return len(rows)


async def after_bulk_ending(conn: Queryable, rows: list[asyncpg.Record]) -> None:
    """For CallLog rows just ended in bulk, in the transaction that ended them: queue each one's call.ended, tell it
    to the live event streams watching it (no media session will: none runs it), and settle its credit reservation
    on the minutes it surely started (only a call's own media session knows how long it ran)."""
    ended = CallLog.from_rows(rows)
    legs = await transfer_legs.legs_of(conn, [call_log.id for call_log in ended])
    for call_log in ended:
        await call_events.enqueue_call_ended(conn, call_log, legs.get(call_log.id))
    await _tell_live_streams_ended(conn, ended, legs)
    await credit_reservations.settle_orphaned_reservations(conn, call_log_ids=[row["id"] for row in rows])


async def _tell_live_streams_ended(
    conn: Queryable, ended: list[CallLog], legs: Mapping[str, Mapping[str, Any]]
) -> None:
    """call.ended, for the live event streams watching them, of calls no media session tells the end of (none ran
    them, or the engine process running them died), with their transfer `legs` (transfer_legs.legs_of)."""
    now = datetime.now(UTC)
    told = [
        live_call_events.NewEvent.stamped(
            call_log.organization_id,
            call_log.id,
            "call.ended",
            {
                "status": call_log.status.value,
                "endReason": call_log.metadata.get("endReason"),
                "durationSeconds": call_log.duration or 0,
                "transfer": legs.get(call_log.id),
            },
            at=now,
        )
        for call_log in ended
    ]
    await live_call_events.record_if_watched(conn, told)


PENDING_CALL_ID_PREFIX = "pending:"
"""How an outbound call's callId starts until Twilio has given it a CallSid."""


def pending_call_id() -> str:
    """A unique placeholder callId for an outbound call that Twilio has not created yet."""
    return PENDING_CALL_ID_PREFIX + new_id()


async def adopt_call_id(db: Queryable, *, call_log_id: str, call_id: str) -> CallLog | None:
    """Give an outbound call log its provider call id (Twilio's CallSid) if it still has its placeholder.

    Returns the updated log, or None if it has a call id already (or does not exist). Unscoped by design: a
    status callback may arrive before the code that placed the call has stored the CallSid, and knows only
    the CallLog id it was given in its (signed) URL.
    """
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "CallLog" SET "callId" = $2
            WHERE "id" = $1 AND starts_with("callId", $3)
            RETURNING {_COLUMNS}
            """,
            call_log_id,
            call_id,
            PENDING_CALL_ID_PREFIX,
        )
    return CallLog.from_row(row) if row is not None else None


async def call_log_exists(db: Queryable, *, call_log_id: str, call_id: str) -> bool:
    """Whether a call log has the id `call_log_id` or the provider call id `call_id` (whatever its organization).

    Unscoped by design, as `adopt_call_id`: a status callback whose signed URL names a CallLog that is gone (deleted
    in SQL, as the dashboard does) knows nothing else of it.
    """
    found: bool = await db.fetchval(
        'SELECT EXISTS (SELECT 1 FROM "CallLog" WHERE "id" = $1 OR "callId" = $2)', call_log_id, call_id
    )
    return found


async def claim_stream(db: Queryable, *, call_log_id: str, call_id: str, node_id: str) -> CallLog | None:
    """Take a call for the media stream engine node `node_id` has just seen start: the call's first write.

    The stream names the call twice, by CallSid and by CallLog id (an outbound call whose CallSid is not stored yet
    adopts it here, as `adopt_call_id` does); the call must be IN_PROGRESS and taken by no stream yet. One
    conditional UPDATE tags it with the node (metadata.engineNode) and the instant, by the database's clock, its
    stream started (metadata.streamStartedAt: an outbound call's answer, which its `timestamp`, the dial, is not),
    and queues call.started with it, so of two
    streams racing for one call, on one node or on two, exactly one wins; from then on the call is that node's to
    end (or recovery's, should the node die), not a status callback's. Returns the call taken, or None: no such
    call, not in progress, or taken already. Unscoped by design: the stream knows only what Twilio sent.
    """
    async with transaction(db) as conn:
        with translate_errors():
            row = await conn.fetchrow(
                f"""
                UPDATE "CallLog" SET
                    "callId" = $2,
                    "metadata" = "metadata" || jsonb_build_object(
                        'engineNode', $3::text, 'streamStartedAt', statement_timestamp())
                WHERE "id" = $1 AND ("callId" = $2 OR starts_with("callId", $4))
                  AND "status" = 'IN_PROGRESS' AND NOT "metadata" ? 'engineNode'
                RETURNING {_COLUMNS}
                """,
                call_log_id,
                call_id,
                node_id,
                PENDING_CALL_ID_PREFIX,
            )
        if row is None:
            return None
        claimed = CallLog.from_row(row)
        await call_events.enqueue_call_started(conn, claimed)
    return claimed


async def merge_metadata(
    db: Queryable, *, organization_id: str, call_log_id: str, metadata: Mapping[str, Any]
) -> CallLog:
    """Merge keys into a call's metadata (whatever its status) in one UPDATE; NotFound if it has no such log."""
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "CallLog" SET "metadata" = "metadata" || $3::jsonb
            WHERE "id" = $1 AND "organizationId" = $2
            RETURNING {_COLUMNS}
            """,
            call_log_id,
            organization_id,
            dict(metadata),
        )
    if row is None:
        raise NotFound("CallLog", call_log_id)
    return CallLog.from_row(row)


async def store_analysis(db: Queryable, *, organization_id: str, call_log_id: str, metadata: Mapping[str, Any]) -> bool:
    """Merge a post-call analysis (`metadata.analysis` and what goes with it) into the organization's call, unless one
    is stored already (an engine that took the analysis over finished first) or there is no such call; whether it was.
    """
    if "analysis" not in metadata:
        raise ValueError("an analysis must say what it was (metadata.analysis)")
    with translate_errors():
        status = await db.execute(
            """
            UPDATE "CallLog" SET "metadata" = "metadata" || $3::jsonb
            WHERE "id" = $1 AND "organizationId" = $2 AND NOT ("metadata" ? 'analysis')
            """,
            call_log_id,
            organization_id,
            dict(metadata),
        )
    return status != "UPDATE 0"


@dataclass(frozen=True, slots=True)
class AnalysisClaim:
    """A call's post-call analysis taken by a node: the call's organization, and which attempt this is (1 first)."""

    organization_id: str
    attempt: int


async def claim_for_analysis(
    db: Queryable, *, call_log_id: str, node_id: str, stale_after: timedelta
) -> AnalysisClaim | None:
    """Take an ended call's post-call analysis for engine node `node_id`, counting the attempt; None if not taken.

    None if the call is still IN_PROGRESS, already analyzed (metadata.analysis), or claimed by a node less than
    `stale_after` ago: one node analyzes each call, and a claim left by a node that died, or one put off
    (`put_off_analysis`), is taken over once stale. Each claim counts one attempt in metadata.analysisClaim.attempts.
    Unscoped by design: it runs on behalf of the engine, as calls end.
    """
    row = await db.fetchrow(
        """
        UPDATE "CallLog" SET "metadata" = "metadata" || jsonb_build_object('analysisClaim', jsonb_build_object(
                'node', $2::text, 'at', now(),
                'attempts', COALESCE(("metadata" -> 'analysisClaim' ->> 'attempts')::int, 0) + 1,
                'lastError', "metadata" -> 'analysisClaim' -> 'lastError'))
        WHERE "id" = $1 AND "status" <> 'IN_PROGRESS' AND NOT ("metadata" ? 'analysis')
          AND (NOT ("metadata" ? 'analysisClaim')
               OR ("metadata" -> 'analysisClaim' ->> 'at')::timestamptz < now() - $3::interval)
        RETURNING "organizationId", ("metadata" -> 'analysisClaim' ->> 'attempts')::int AS "attempt"
        """,
        call_log_id,
        node_id,
        stale_after,
    )
    return None if row is None else AnalysisClaim(row["organizationId"], row["attempt"])


async def put_off_analysis(
    db: Queryable, *, call_log_id: str, node_id: str, stale_after: timedelta, retry_in: timedelta, error: str
) -> bool:
    """Leave node `node_id`'s claim on the call's analysis to go stale `retry_in` from now (the sweep then takes it
    up again), noting `error` as why; whether the claim was still the node's and the call unanalyzed."""
    status = await db.execute(
        """
        UPDATE "CallLog" SET "metadata" = jsonb_set("metadata", '{analysisClaim}', ("metadata" -> 'analysisClaim')
                || jsonb_build_object('at', now() - $3::interval + $4::interval, 'lastError', $5::text))
        WHERE "id" = $1 AND "metadata" -> 'analysisClaim' ->> 'node' = $2 AND NOT ("metadata" ? 'analysis')
        """,
        call_log_id,
        node_id,
        stale_after,
        retry_in,
        error,
    )
    return status == "UPDATE 1"


async def awaiting_analysis(db: Queryable, *, ended_within: timedelta, stale_after: timedelta, limit: int) -> list[str]:
    """Ids of calls that started within `ended_within` and ended unanalyzed, unclaimed or with a stale claim.

    What a process that died left behind (queued or running analyses); oldest first. Unscoped by design.
    """
    rows = await db.fetch(
        """
        SELECT "id" FROM "CallLog"
        WHERE "timestamp" > now() - $1::interval AND "status" <> 'IN_PROGRESS' AND NOT ("metadata" ? 'analysis')
          AND (NOT ("metadata" ? 'analysisClaim')
               OR ("metadata" -> 'analysisClaim' ->> 'at')::timestamptz < now() - $2::interval)
        ORDER BY "timestamp"
        LIMIT $3
        """,
        ended_within,
        stale_after,
        limit,
    )
    return [row["id"] for row in rows]


async def get_call_log_entry(db: Queryable, *, organization_id: str, call_log_id: str) -> CallLogEntry:
    """The organization's call log with that id, with its agent's name and type and its campaign's name."""
    row = await db.fetchrow(
        f"""
        SELECT {_CALL_COLUMNS},
            a."name" AS "agentName", a."type" AS "agentType", k."batchName" AS "campaignBatchName"
        FROM "CallLog" c
        LEFT JOIN "Agent" a ON a."id" = c."agentId" AND a."organizationId" = c."organizationId"
        LEFT JOIN "Campaign" k ON k."id" = c."campaignId" AND k."organizationId" = c."organizationId"
        WHERE c."id" = $1 AND c."organizationId" = $2
        """,
        call_log_id,
        organization_id,
    )
    if row is None:
        raise NotFound("CallLog", call_log_id)
    return CallLogEntry.from_row(row)
