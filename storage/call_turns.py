"""Call turns: each finished turn of a call, one row apiece, mirrored as a readable line in CallLog.transcript.

Writing a turn is idempotent on (callLogId, index), and its transcript line is appended only by the write that
inserted it, so a write retried after a lost acknowledgement duplicates nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from storage.enums import CallStatus
from storage.errors import NotFound, translate_errors
from storage.records import Queryable, Record, new_ids, within_transaction

Speaker = Literal["caller", "agent"]
"""Who spoke a turn."""

_COLUMNS = (
    '"id", "organizationId", "callLogId", "index", "speaker", "text", "startMs", "endMs", "interrupted", '
    '"latencyMs", "latency", "createdAt"'
)
_SPEAKER_LABELS: Mapping[str, str] = {"caller": "Caller", "agent": "Agent"}


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """A finished turn to write: its place in the call, who spoke, what was heard, and when (ms from call start)."""

    index: int
    speaker: Speaker
    text: str
    start_ms: int
    end_ms: int
    interrupted: bool = False
    latency_ms: int | None = None
    latency: Mapping[str, int] | None = None
    """An agent turn's stages, ms after the caller stopped speaking (sttEndOfTurn, llmFirstToken, ...)."""


class CallTurn(Record):
    """A stored turn of a call."""

    id: str
    organization_id: str
    call_log_id: str
    index: int
    speaker: Speaker
    text: str
    start_ms: int
    end_ms: int
    interrupted: bool
    latency_ms: int | None
    latency: dict[str, int] | None
    created_at: datetime


def transcript_line(speaker: str, text: str, *, interrupted: bool) -> str:
    """The turn as CallLog.transcript shows it: "Caller: …" or "Agent: … [interrupted]"."""
    line = f"{_SPEAKER_LABELS.get(speaker, speaker.title())}: {text}"
    return f"{line} [interrupted]" if interrupted else line


async def lock_call_log(db: Queryable, *, organization_id: str, call_log_id: str) -> CallStatus:
    """Lock the organization's call row until the caller's transaction ends; its status. NotFound otherwise."""
    status: str | None = await db.fetchval(
        'SELECT "status" FROM "CallLog" WHERE "id" = $1 AND "organizationId" = $2 FOR UPDATE',
        call_log_id,
        organization_id,
    )
    if status is None:
        raise NotFound("CallLog", call_log_id)
    return CallStatus(status)


async def insert_turns(
    db: Queryable,
    *,
    organization_id: str,
    call_log_id: str,
    turns: Sequence[TurnRecord],
    metadata: Mapping[str, Any] | None = None,
) -> list[CallTurn]:
    """Write turns of the organization's call, skip those already written, and return the ones inserted.

    In the same transaction, the inserted turns' lines are appended to CallLog.transcript in turn order and
    `metadata` is merged into CallLog.metadata. NotFound if the organization has no such call.
    """
    async with within_transaction(db) as conn:
        # Locking the call serialises writers of the same call, so transcript lines land in write order.
        await lock_call_log(conn, organization_id=organization_id, call_log_id=call_log_id)
        rows: list[asyncpg.Record] = []
        if turns:
            with translate_errors():
                rows = await conn.fetch(
                    f"""
                    INSERT INTO "CallTurn"
                        ("id", "organizationId", "callLogId", "index", "speaker", "text", "startMs", "endMs",
                         "interrupted", "latencyMs", "latency")
                    SELECT t.id, $1, $2, t.index, t.speaker, t.text, t.start_ms, t.end_ms, t.interrupted, t.latency_ms,
                           t.latency
                    FROM unnest($3::text[], $4::int[], $5::text[], $6::text[], $7::int[], $8::int[], $9::bool[],
                                $10::int[], $11::jsonb[])
                        AS t(id, index, speaker, text, start_ms, end_ms, interrupted, latency_ms, latency)
                    ORDER BY t.index
                    ON CONFLICT ("callLogId", "index") DO NOTHING
                    RETURNING {_COLUMNS}
                    """,
                    organization_id,
                    call_log_id,
                    new_ids(len(turns)),
                    [t.index for t in turns],
                    [t.speaker for t in turns],
                    [t.text for t in turns],
                    [t.start_ms for t in turns],
                    [t.end_ms for t in turns],
                    [t.interrupted for t in turns],
                    [t.latency_ms for t in turns],
                    [dict(t.latency) if t.latency is not None else None for t in turns],
                )
        inserted = sorted(CallTurn.from_rows(rows), key=lambda turn: turn.index)
        lines = "\n".join(transcript_line(t.speaker, t.text, interrupted=t.interrupted) for t in inserted)
        if lines or metadata:
            await conn.execute(
                """
                UPDATE "CallLog" SET
                    "transcript" = CASE WHEN $3::text IS NULL THEN "transcript"
                                        WHEN "transcript" IS NULL OR "transcript" = '' THEN $3
                                        ELSE "transcript" || E'\\n' || $3 END,
                    "metadata" = "metadata" || $4::jsonb
                WHERE "id" = $1 AND "organizationId" = $2
                """,
                call_log_id,
                organization_id,
                lines or None,
                dict(metadata) if metadata else {},
            )
    return inserted


async def list_turns(db: Queryable, *, organization_id: str, call_log_id: str) -> list[CallTurn]:
    """The turns of the organization's call, in turn order (empty for a call it does not have)."""
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "CallTurn"
        WHERE "callLogId" = $1 AND "organizationId" = $2
        ORDER BY "index"
        """,
        call_log_id,
        organization_id,
    )
    return CallTurn.from_rows(rows)
