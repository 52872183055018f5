"""Where each call's recording is kept ("CallRecording"): queued at the call's end, uploaded under leases, expired.

A row is PENDING until its file is in the store, then STORED, then DELETED by the retention sweep. Upload workers
`claim_due` rows of their own spool (the state folder that holds the file) with FOR UPDATE SKIP LOCKED, like the webhook
outbox: a claim moves "nextAttemptAt" to the end of its lease, so a worker that dies only delays the upload, and
every outcome is recorded against the claim's lease token.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from storage.errors import translate_errors
from storage.records import Queryable, Record, new_id, transaction

_COLUMNS = (
    '"id", "organizationId", "callLogId", "store", "objectKey", "spool", "localPath", "bytes", "status", '
    '"attemptCount", "nextAttemptAt", "lastError", "storedAt", "deletedAt", "createdAt"'
)


class RecordingStatus(StrEnum):
    """Where a recording stands: waiting for its upload, kept in its store, or deleted by retention."""

    PENDING = "PENDING"
    STORED = "STORED"
    DELETED = "DELETED"


class CallRecording(Record):
    """A call's recording: its store and key there, the local file it was written to, and its status."""

    id: str
    organization_id: str
    call_log_id: str
    store: str
    object_key: str
    spool: str
    local_path: str
    bytes: int
    status: RecordingStatus
    attempt_count: int
    next_attempt_at: datetime
    last_error: str | None
    stored_at: datetime | None
    deleted_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ClaimedUpload:
    """A PENDING recording a worker holds until `lease_token`'s lease runs out."""

    recording: CallRecording
    lease_token: str


async def add_recording(
    db: Queryable,
    *,
    organization_id: str,
    call_log_id: str,
    store: str,
    object_key: str,
    spool: str,
    local_path: str,
    size: int,
    stored: bool,
    now: datetime,
) -> CallRecording:
    """Record a call's finished recording: STORED when it is already in its store, else PENDING (due now).

    Adding the same call's recording again returns the row there is.
    """
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "CallRecording" ("id", "organizationId", "callLogId", "store", "objectKey", "spool",
                                         "localPath", "bytes", "status", "storedAt", "nextAttemptAt", "createdAt")
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, CASE WHEN $10 THEN $11::timestamptz END, $11, $11)
            ON CONFLICT ("callLogId") DO UPDATE SET "callLogId" = EXCLUDED."callLogId"
            RETURNING {_COLUMNS}
            """,
            new_id(),
            organization_id,
            call_log_id,
            store,
            object_key,
            spool,
            local_path,
            size,
            RecordingStatus.STORED if stored else RecordingStatus.PENDING,
            stored,
            now,
        )
    assert row is not None
    return CallRecording.from_row(row)


async def ended_without_recording(
    db: Queryable, *, files: list[tuple[str, str]], untouched_for: timedelta
) -> list[str]:
    """Of these (organization id, call log id) recording files, the calls that ended with no recording row and no
    change for `untouched_for` (by the database's clock): files left by a process that died before the call's end
    recorded them. Calls still IN_PROGRESS are left out (a process may be writing them), and so are calls that ended
    lately (a live process closes the CallLog a moment before it closes and records the file). Unscoped: the engine
    looks at its own state folder's files."""
    rows = await db.fetch(
        """
        SELECT c."id" FROM unnest($1::text[], $2::text[]) AS f("organizationId", "id")
        JOIN "CallLog" c ON c."id" = f."id" AND c."organizationId" = f."organizationId"
        WHERE c."status" <> 'IN_PROGRESS' AND c."updatedAt" <= now() - $3::interval
          AND NOT EXISTS (SELECT 1 FROM "CallRecording" r WHERE r."callLogId" = c."id")
        ORDER BY c."id"
        """,
        [organization_id for organization_id, _ in files],
        [call_log_id for _, call_log_id in files],
        untouched_for,
    )
    return [row["id"] for row in rows]


async def no_longer_needed(db: Queryable, *, files: list[tuple[str, str]]) -> list[str]:
    """Of these (organization id, call log id) recording files, the calls whose recording the local file is no longer
    needed for: uploaded to object storage, or deleted by retention (left by a process that died before it removed the
    file), or whose call was deleted (a file its row's deletion did not know of: the recording of a call deleted while
    it ran, or left by a killed process before anything recorded it). Unscoped: the engine looks at its own state
    folder's files."""
    rows = await db.fetch(
        """
        SELECT f."callLogId" FROM unnest($1::text[], $2::text[]) AS f("organizationId", "callLogId")
        LEFT JOIN "CallRecording" r ON r."callLogId" = f."callLogId" AND r."organizationId" = f."organizationId"
        WHERE r."status" = 'DELETED' OR (r."status" = 'STORED' AND r."store" <> 'local')
           OR NOT EXISTS (
               SELECT 1 FROM "CallLog" c WHERE c."id" = f."callLogId" AND c."organizationId" = f."organizationId"
           )
        ORDER BY f."callLogId"
        """,
        [organization_id for organization_id, _ in files],
        [call_log_id for _, call_log_id in files],
    )
    return [row["callLogId"] for row in rows]


async def find_recording(db: Queryable, *, call_log_id: str) -> CallRecording | None:
    """The recording row of a call, or None. Unscoped: callers check the call's owner first."""
    row = await db.fetchrow(f'SELECT {_COLUMNS} FROM "CallRecording" WHERE "callLogId" = $1', call_log_id)
    return None if row is None else CallRecording.from_row(row)


async def claim_due(
    db: Queryable, *, spool: str, limit: int, lease: timedelta, due_by: datetime
) -> list[ClaimedUpload]:
    """Take up to `limit` PENDING recordings of `spool` due by `due_by` (and now), oldest first, for `lease`; rows
    others hold are skipped."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    lease_token = new_id()
    rows = await db.fetch(
        f"""
        WITH due AS (
            SELECT "id" FROM "CallRecording"
            WHERE "status" = 'PENDING' AND "spool" = $1
              AND "nextAttemptAt" <= LEAST(clock_timestamp(), $5::timestamptz(3))
            ORDER BY "nextAttemptAt", "id"
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        )
        UPDATE "CallRecording" r SET
            "leaseToken" = $3,
            "leasedUntil" = clock_timestamp() + $4::interval,
            "nextAttemptAt" = clock_timestamp() + $4::interval,
            "attemptCount" = r."attemptCount" + 1
        FROM due WHERE r."id" = due."id"
        RETURNING {", ".join(f"r.{column.strip()}" for column in _COLUMNS.split(","))}
        """,
        spool,
        limit,
        lease_token,
        lease,
        due_by,
    )
    return [ClaimedUpload(CallRecording.from_row(row), lease_token) for row in rows]


async def mark_stored(db: Queryable, claim: ClaimedUpload, *, now: datetime) -> bool:
    """The claimed upload is confirmed by the store; False if the lease was lost to another worker."""
    status = await db.execute(
        """
        UPDATE "CallRecording" SET "status" = 'STORED', "storedAt" = $3, "lastError" = NULL,
                                   "leaseToken" = NULL, "leasedUntil" = NULL
        WHERE "id" = $1 AND "leaseToken" = $2 AND "status" = 'PENDING'
        """,
        claim.recording.id,
        claim.lease_token,
        now,
    )
    return status != "UPDATE 0"


async def retry_later(db: Queryable, claim: ClaimedUpload, *, error: str, next_attempt_at: datetime) -> bool:
    """The claimed upload failed: try again at `next_attempt_at`; False if the lease was lost."""
    status = await db.execute(
        """
        UPDATE "CallRecording" SET "lastError" = $3, "nextAttemptAt" = $4, "leaseToken" = NULL, "leasedUntil" = NULL
        WHERE "id" = $1 AND "leaseToken" = $2 AND "status" = 'PENDING'
        """,
        claim.recording.id,
        claim.lease_token,
        error[:1000],
        next_attempt_at,
    )
    return status != "UPDATE 0"


async def expired_recordings(
    db: Queryable, *, created_before: datetime, limit: int, after: tuple[datetime, str] | None = None
) -> list[CallRecording]:
    """Recordings not yet deleted that were made before `created_before`, oldest first. Unscoped: retention.

    For the next page pass `after=(recording.created_at, recording.id)` of the last recording of this one.
    """
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "CallRecording"
        WHERE "status" <> 'DELETED' AND "createdAt" < $1
          AND ($3::timestamptz IS NULL OR ("createdAt", "id") > ($3, $4))
        ORDER BY "createdAt", "id" LIMIT $2
        """,
        created_before,
        limit,
        *(after or (None, None)),
    )
    return CallRecording.from_rows(rows)


async def link_recording(db: Queryable, *, organization_id: str, call_log_id: str, url: str) -> None:
    """Give a call closed without its recording's link (crash recovery closed it) that link in CallLog.recordingUrl,
    unless it has one."""
    await db.execute(
        """
        UPDATE "CallLog" SET "recordingUrl" = $3
        WHERE "id" = $1 AND "organizationId" = $2 AND "recordingUrl" IS NULL
        """,
        call_log_id,
        organization_id,
        url,
    )


async def mark_deleted(db: Queryable, recording: CallRecording, *, now: datetime, object_removed: bool) -> None:
    """The recording is gone: DELETED, and its call log no longer links to it.

    Unless the caller removed its object (`object_removed`), an object its uploads may have put is queued for removal
    ("RecordingDeletion"), due when the row's upload lease ends, as for a recording deleted with its call (migration
    0032): a PENDING recording whose upload was tried can be in the store all the same, its process killed (or the
    store's answer lost) between the store taking it and the row saying so, and one uploaded since the caller read it
    is STORED now. Never tried, it has no object: nothing is queued.
    """
    async with transaction(db) as conn:
        if not object_removed:
            await conn.execute(
                """
                INSERT INTO "RecordingDeletion" ("id", "organizationId", "callLogId", "store", "objectKey", "spool",
                                                 "localPath", "onDisk", "nextAttemptAt")
                SELECT $2, "organizationId", "callLogId", "store", "objectKey", "spool", "localPath", false,
                       GREATEST(CURRENT_TIMESTAMP, "leasedUntil")
                FROM "CallRecording"
                WHERE "id" = $1 AND "store" <> 'local' AND "attemptCount" > 0 AND "status" <> 'DELETED'
                FOR UPDATE
                """,
                recording.id,
                new_id(),
            )
        await conn.execute(
            """
            UPDATE "CallRecording" SET "status" = 'DELETED', "deletedAt" = $2, "leaseToken" = NULL,
                                       "leasedUntil" = NULL
            WHERE "id" = $1
            """,
            recording.id,
            now,
        )
        await conn.execute(
            'UPDATE "CallLog" SET "recordingUrl" = NULL WHERE "id" = $1 AND "organizationId" = $2',
            recording.call_log_id,
            recording.organization_id,
        )
