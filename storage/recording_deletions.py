"""Recordings to remove from their store because their call was deleted ("RecordingDeletion", migration 0030).

A trigger queues a row whenever a "CallRecording" row goes (its CallLog or organization deleted, by the engine or
in SQL by anyone else), and one for every recording a TRUNCATE empties (migration 0032); a recording whose upload was
under way is due only when that upload's lease ends, when what it uploaded is there to remove. Workers `claim_due`
the rows they can carry out with FOR UPDATE SKIP LOCKED under a lease, like the upload queue, and `forget` each once
the recording is removed, or `retry_later` while the store fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from storage.call_recordings import CallRecording
from storage.records import Queryable, Record, new_id

_COLUMNS = (
    '"id", "organizationId", "callLogId", "store", "objectKey", "spool", "localPath", "onDisk", "attemptCount", '
    '"lastError", "createdAt"'
)


class RecordingDeletion(Record):
    """A deleted call's recording still to remove: the object under `object_key` in `store`, and the file at
    `local_path` in the state folder `spool` when `on_disk` (it may still be there)."""

    id: str
    organization_id: str
    call_log_id: str
    store: str
    object_key: str
    spool: str
    local_path: str
    on_disk: bool
    attempt_count: int
    last_error: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ClaimedDeletion:
    """A queued deletion a worker holds until `lease_token`'s lease runs out."""

    deletion: RecordingDeletion
    lease_token: str


async def queue_object_deletion(db: Queryable, recording: CallRecording) -> None:
    """Queue the removal of the object a recording was uploaded to after its row had gone (its call was deleted, or
    retention deleted it, while the upload was under way). Unscoped: the engine's own upload worker."""
    await db.execute(
        """
        INSERT INTO "RecordingDeletion" ("id", "organizationId", "callLogId", "store", "objectKey", "spool",
                                         "localPath", "onDisk")
        VALUES ($1, $2, $3, $4, $5, $6, $7, false)
        """,
        new_id(),
        recording.organization_id,
        recording.call_log_id,
        recording.store,
        recording.object_key,
        recording.spool,
        recording.local_path,
    )


async def claim_due(
    db: Queryable, *, spool: str, store: str, limit: int, lease: timedelta, due_by: datetime
) -> list[ClaimedDeletion]:
    """Take up to `limit` deletions due by `due_by` (and now), oldest first, for `lease`: those this process can carry
    out, kept in its `store` (or locally) and, when a file may be left on a disk, on its `spool`'s. Rows others hold
    are skipped. Unscoped: deletions outlive their organization."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    lease_token = new_id()
    rows = await db.fetch(
        f"""
        WITH due AS (
            SELECT "id" FROM "RecordingDeletion"
            WHERE "nextAttemptAt" <= LEAST(clock_timestamp(), $6::timestamptz(3))
              AND ("store" = 'local' OR "store" = $2) AND (NOT "onDisk" OR "spool" = $1)
            ORDER BY "nextAttemptAt", "id"
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        )
        UPDATE "RecordingDeletion" d SET
            "leaseToken" = $4,
            "leasedUntil" = clock_timestamp() + $5::interval,
            "nextAttemptAt" = clock_timestamp() + $5::interval,
            "attemptCount" = d."attemptCount" + 1
        FROM due WHERE d."id" = due."id"
        RETURNING {", ".join(f"d.{column.strip()}" for column in _COLUMNS.split(","))}
        """,
        spool,
        store,
        limit,
        lease_token,
        lease,
        due_by,
    )
    return [ClaimedDeletion(RecordingDeletion.from_row(row), lease_token) for row in rows]


async def forget(db: Queryable, claim: ClaimedDeletion) -> bool:
    """The claimed recording is removed: drop its row; False if the lease was lost to another worker."""
    status = await db.execute(
        'DELETE FROM "RecordingDeletion" WHERE "id" = $1 AND "leaseToken" = $2', claim.deletion.id, claim.lease_token
    )
    return status != "DELETE 0"


async def retry_later(db: Queryable, claim: ClaimedDeletion, *, error: str, next_attempt_at: datetime) -> bool:
    """The claimed removal failed: try again at `next_attempt_at`; False if the lease was lost."""
    status = await db.execute(
        """
        UPDATE "RecordingDeletion" SET "lastError" = $3, "nextAttemptAt" = $4, "leaseToken" = NULL,
                                       "leasedUntil" = NULL
        WHERE "id" = $1 AND "leaseToken" = $2
        """,
        claim.deletion.id,
        claim.lease_token,
        error[:1000],
        next_attempt_at,
    )
    return status != "UPDATE 0"
