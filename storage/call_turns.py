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

from config.text import storable_text
from storage.enums import CallStatus
from storage.errors import NotFound, translate_errors
from storage.records import Queryable, Record, new_ids
from storage.webhook_outbox import WebhookEvent, subscribed

Speaker = Literal["caller", "agent"]
"""Who spoke a turn."""

_COLUMNS = (
    '"id", "organizationId", "callLogId", "index", "speaker", "text", "startMs", "endMs", "interrupted", '
    '"latencyMs", "latency", "pathNodeId", "pathEdgeId", "knowledge", "createdAt"'
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
    path_node_id: str | None = None
    """The conversation path's node the turn was spoken at (None without a path)."""
    path_edge_id: str | None = None
    """The edge the path took to reach that node during this turn (None if it stayed)."""
    knowledge: Mapping[str, Any] | None = None
    """An agent turn's knowledge searches and the passages they found (engine.knowledge.lookup)."""


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
    path_node_id: str | None
    path_edge_id: str | None
    knowledge: dict[str, Any] | None = None
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


_WRITE_TURNS = f"""
    WITH target AS (
        -- Locking the call serialises writers of the same call, so transcript lines land in write order.
        SELECT "id" FROM "CallLog" WHERE "id" = $2 AND "organizationId" = $1 FOR UPDATE
    ), watched AS (
        SELECT $13::text IS NOT NULL AND EXISTS (
            SELECT 1 FROM "Event" WHERE {subscribed("$1", "$13", "$14")}
        ) AS yes
    ), inserted AS (
        INSERT INTO "CallTurn"
            ("id", "organizationId", "callLogId", "index", "speaker", "text", "startMs", "endMs",
             "interrupted", "latencyMs", "latency", "pathNodeId", "pathEdgeId", "knowledge")
        SELECT t.id, $1, $2, t.index, t.speaker, t.text, t.start_ms, t.end_ms, t.interrupted, t.latency_ms, t.latency,
               t.path_node_id, t.path_edge_id, t.knowledge
        FROM unnest($3::text[], $4::int[], $5::text[], $6::text[], $7::int[], $8::int[], $9::bool[], $10::int[],
                    $11::jsonb[], $16::text[], $17::text[], $18::jsonb[])
            AS t(id, index, speaker, text, start_ms, end_ms, interrupted, latency_ms, latency, path_node_id,
                 path_edge_id, knowledge)
        WHERE EXISTS (SELECT 1 FROM target) AND NOT (SELECT yes FROM watched)
        ORDER BY t.index
        ON CONFLICT ("callLogId", "index") DO NOTHING
        RETURNING {_COLUMNS}
    ), appended AS (
        -- Only the lines of turns this write inserted: a retried write adds none twice.
        SELECT string_agg(l.line, E'\\n' ORDER BY l.index) AS lines
        FROM inserted JOIN unnest($4::int[], $12::text[]) AS l(index, line) USING ("index")
    ), updated AS (
        UPDATE "CallLog" SET
            "transcript" = CASE WHEN a.lines IS NULL THEN "transcript"
                                WHEN "transcript" IS NULL OR "transcript" = '' THEN a.lines
                                ELSE "transcript" || E'\\n' || a.lines END,
            "metadata" = "metadata" || $15::jsonb
        FROM appended AS a
        WHERE "id" = $2 AND "organizationId" = $1 AND NOT (SELECT yes FROM watched)
            AND (a.lines IS NOT NULL OR $15::jsonb <> '{{}}'::jsonb)
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM target) AS found, (SELECT yes FROM watched) AS watched, i.*
    FROM (SELECT 1) AS one LEFT JOIN inserted AS i ON true
"""
"""One statement, so one round trip and atomic on its own: lock the call, insert the turns that are new, append
their lines to the transcript and merge the metadata; with $13 (an event name), only if nothing subscribes to it."""


async def insert_turns(
    db: Queryable,
    *,
    organization_id: str,
    call_log_id: str,
    turns: Sequence[TurnRecord],
    metadata: Mapping[str, Any] | None = None,
) -> list[CallTurn]:
    """Write turns of the organization's call, skip those already written, and return the ones inserted.

    Atomically with them (in one statement, and within the caller's transaction if it has one), the inserted turns'
    lines are appended to CallLog.transcript in turn order and `metadata` is merged into CallLog.metadata.
    NotFound if the organization has no such call.
    """
    rows = await _write_turns(db, (organization_id, call_log_id), turns, metadata, None)
    inserted = CallTurn.from_rows([row for row in rows if row["id"] is not None])
    return sorted(inserted, key=lambda turn: turn.index)


async def insert_turns_unless_subscribed(
    db: Queryable,
    *,
    organization_id: str,
    call_log_id: str,
    turns: Sequence[TurnRecord],
    metadata: Mapping[str, Any] | None = None,
    event: WebhookEvent,
    agent_id: str | None,
) -> bool:
    """`insert_turns` in one round trip, unless an enabled subscription of the organization (or of `agent_id`)
    wants `event`: then nothing is written and the answer is False, and the caller writes the turns in a transaction
    that also queues the event for the subscribers. NotFound if the organization has no such call."""
    rows = await _write_turns(db, (organization_id, call_log_id), turns, metadata, (event, agent_id))
    return not rows[0]["watched"]


async def _write_turns(
    db: Queryable,
    call: tuple[str, str],
    turns: Sequence[TurnRecord],
    metadata: Mapping[str, Any] | None,
    unless_subscribed: tuple[str, str | None] | None,
) -> list[asyncpg.Record]:
    """Run _WRITE_TURNS for the call (organization id, call log id); `unless_subscribed` is (event, agent id)."""
    organization_id, call_log_id = call
    event, agent_id = unless_subscribed if unless_subscribed is not None else (None, None)
    # What was said may hold what no text column can (a NUL from a recognizer's or model's JSON): never lose the turn.
    texts = [storable_text(t.text) for t in turns]
    with translate_errors():
        rows = await db.fetch(
            _WRITE_TURNS,
            organization_id,
            call_log_id,
            new_ids(len(turns)),
            [t.index for t in turns],
            [t.speaker for t in turns],
            texts,
            [t.start_ms for t in turns],
            [t.end_ms for t in turns],
            [t.interrupted for t in turns],
            [t.latency_ms for t in turns],
            [dict(t.latency) if t.latency is not None else None for t in turns],
            [transcript_line(t.speaker, text, interrupted=t.interrupted) for t, text in zip(turns, texts, strict=True)],
            event,
            agent_id,
            dict(metadata) if metadata else {},
            [t.path_node_id for t in turns],
            [t.path_edge_id for t in turns],
            [dict(t.knowledge) if t.knowledge is not None else None for t in turns],
        )
    if not rows[0]["found"]:
        raise NotFound("CallLog", call_log_id)
    return rows


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
