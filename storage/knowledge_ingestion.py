"""The knowledge ingestion queue: documents waiting to be read, chunked and indexed, claimed by workers under leases.

`storage.knowledge_bases.add_document` queues a document in the transaction that adds it. Workers `claim_due`
documents with FOR UPDATE SKIP LOCKED: a claim moves "nextAttemptAt" to the end of its lease, so a worker that dies
mid-ingestion only delays the document until another worker claims it. Outcomes are recorded against the claim's
lease token, so a worker whose lease ran out cannot overwrite the work of the one that took over.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from storage.enums import DocumentType
from storage.knowledge_bases import LOCK_KNOWLEDGE_BASE, REFRESH_TERMS
from storage.records import Connection, Queryable, new_ids, transaction

MAX_ERROR_CHARS = 1000
"""The longest reason stored with a document in ERROR."""


@dataclass(frozen=True, slots=True)
class ClaimedDocument:
    """A document a worker holds until `lease_token`'s lease ends: what to read and where its passages go."""

    document_id: str
    organization_id: str
    knowledge_base_id: str
    name: str
    type: DocumentType
    url: str | None
    content: str | None
    mime_type: str | None
    language: str
    attempt_count: int
    lease_token: str


async def claim_due(db: Queryable, *, limit: int, lease: timedelta) -> list[ClaimedDocument]:
    """Claim up to `limit` queued documents that are due, for `lease`; each claim counts as one attempt."""
    lease_token = secrets.token_hex(16)
    rows = await db.fetch(
        """
        WITH due AS (
            SELECT "documentId" FROM "KnowledgeBaseIngestion"
            WHERE "nextAttemptAt" <= clock_timestamp()
            ORDER BY "nextAttemptAt"
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE "KnowledgeBaseIngestion" i SET
                "leaseToken" = $2, "leasedUntil" = clock_timestamp() + $3::interval,
                "nextAttemptAt" = clock_timestamp() + $3::interval, "attemptCount" = i."attemptCount" + 1
            FROM due WHERE i."documentId" = due."documentId"
            RETURNING i."documentId", i."organizationId", i."attemptCount"
        )
        SELECT d."id", d."organizationId", d."knowledgeBaseId", d."name", d."type", d."url", d."content",
               d."mimeType", kb."language", claimed."attemptCount"
        FROM claimed
        JOIN "KnowledgeBaseDocument" d
            ON d."id" = claimed."documentId" AND d."organizationId" = claimed."organizationId"
        JOIN "KnowledgeBase" kb ON kb."id" = d."knowledgeBaseId" AND kb."organizationId" = d."organizationId"
        """,
        limit,
        lease_token,
        lease,
    )
    return [
        ClaimedDocument(
            document_id=row["id"],
            organization_id=row["organizationId"],
            knowledge_base_id=row["knowledgeBaseId"],
            name=row["name"],
            type=DocumentType(row["type"]),
            url=row["url"],
            content=row["content"],
            mime_type=row["mimeType"],
            language=row["language"],
            attempt_count=row["attemptCount"],
            lease_token=lease_token,
        )
        for row in rows
    ]


async def stored_file(db: Queryable, claim: ClaimedDocument) -> bytes | None:
    """The uploaded bytes of a claimed FILE document; None if none were stored."""
    data: bytes | None = await db.fetchval(
        'SELECT "data" FROM "KnowledgeBaseFile" WHERE "documentId" = $1 AND "organizationId" = $2',
        claim.document_id,
        claim.organization_id,
    )
    return data


async def next_due_in(db: Queryable) -> timedelta | None:
    """How long until the next queued document is due (zero or less: due now); None when none is queued."""
    wait: timedelta | None = await db.fetchval(
        'SELECT min("nextAttemptAt") - clock_timestamp() FROM "KnowledgeBaseIngestion"'
    )
    return wait


async def record_ready(
    db: Queryable,
    claim: ClaimedDocument,
    *,
    chunks: Sequence[str],
    file_size: int | None = None,
    mime_type: str | None = None,
) -> bool:
    """Replace the document's passages with `chunks`, mark it READY and take it off the queue, together.

    `file_size` and `mime_type`, when given, are what the bytes showed. False, changing nothing, if the claim's
    lease was lost to another worker (or the document was deleted meanwhile).
    """
    async with transaction(db) as conn:
        await conn.execute(LOCK_KNOWLEDGE_BASE, claim.knowledge_base_id, claim.organization_id)
        if not await _settle_claim(conn, claim):
            return False
        await conn.execute(
            """
            INSERT INTO "KnowledgeBaseChunk" ("id", "organizationId", "knowledgeBaseId", "documentId", "position",
                                              "content", "language", "searchVector")
            SELECT c.id, $1, $2, $3, c.position - 1, c.content, $4::text, to_tsvector($4::text::regconfig, c.content)
            FROM unnest($5::text[], $6::text[]) WITH ORDINALITY AS c(id, content, position)
            """,
            claim.organization_id,
            claim.knowledge_base_id,
            claim.document_id,
            claim.language,
            new_ids(len(chunks)),
            list(chunks),
        )
        await conn.execute(
            """
            UPDATE "KnowledgeBaseDocument" SET
                "status" = 'READY', "error" = NULL,
                "fileSize" = COALESCE($3, "fileSize"), "mimeType" = COALESCE($4, "mimeType")
            WHERE "id" = $1 AND "organizationId" = $2
            """,
            claim.document_id,
            claim.organization_id,
            file_size,
            mime_type,
        )
        await conn.execute(REFRESH_TERMS, claim.knowledge_base_id, claim.organization_id)
    return True


async def _settle_claim(conn: Connection, claim: ClaimedDocument) -> bool:
    """In the caller's transaction: take the document off the queue and drop its passages, if the claim still holds
    its lease (False, changing nothing, if another worker took it over or the document was deleted)."""
    held = await conn.fetchval(
        'DELETE FROM "KnowledgeBaseIngestion" WHERE "documentId" = $1 AND "leaseToken" = $2 RETURNING 1',
        claim.document_id,
        claim.lease_token,
    )
    if held is None:
        return False
    await conn.execute(
        'DELETE FROM "KnowledgeBaseChunk" WHERE "documentId" = $1 AND "organizationId" = $2',
        claim.document_id,
        claim.organization_id,
    )
    return True


async def record_error(db: Queryable, claim: ClaimedDocument, *, error: str, retry_in: timedelta | None) -> bool:
    """Record a failed attempt: retried after `retry_in`, or (None) the document marked ERROR with the reason.

    A document in ERROR keeps no passages. False, changing nothing, if the claim's lease was lost.
    """
    reason = error[:MAX_ERROR_CHARS]
    async with transaction(db) as conn:
        await conn.execute(LOCK_KNOWLEDGE_BASE, claim.knowledge_base_id, claim.organization_id)
        if retry_in is not None:
            held = await conn.fetchval(
                """
                UPDATE "KnowledgeBaseIngestion" SET
                    "leaseToken" = NULL, "leasedUntil" = NULL, "lastError" = $3,
                    "nextAttemptAt" = clock_timestamp() + $4::interval
                WHERE "documentId" = $1 AND "leaseToken" = $2
                RETURNING 1
                """,
                claim.document_id,
                claim.lease_token,
                reason,
                retry_in,
            )
            return held is not None
        if not await _settle_claim(conn, claim):
            return False
        await conn.execute(
            """
            UPDATE "KnowledgeBaseDocument" SET "status" = 'ERROR', "error" = $3
            WHERE "id" = $1 AND "organizationId" = $2
            """,
            claim.document_id,
            claim.organization_id,
            reason,
        )
        await conn.execute(REFRESH_TERMS, claim.knowledge_base_id, claim.organization_id)
    return True
