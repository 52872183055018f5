"""Knowledge bases and their documents: the text an agent may look things up in during a call."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from storage.enums import DocumentStatus, DocumentType, KnowledgeBaseStatus
from storage.errors import NotFound, StorageError, translate_errors
from storage.records import Queryable, Record, fetch_page, new_id, set_clause, transaction


class DocumentLimitReached(StorageError):
    """The knowledge base already holds DOCUMENT_LIMIT documents."""

    def __init__(self, knowledge_base_id: str, limit: int) -> None:
        super().__init__(
            f"knowledge base {knowledge_base_id} already holds {limit} documents, the most it may; "
            "delete one before adding another"
        )
        self.knowledge_base_id = knowledge_base_id
        self.limit = limit


_COLUMNS = (
    '"id", "organizationId", "name", "description", "fileCount", "websiteCount", "textCount", "status", '
    '"language", "createdAt", "updatedAt"'
)
_DOCUMENT_COLUMNS = (
    '"id", "organizationId", "knowledgeBaseId", "name", "type", "url", "content", "fileSize", "mimeType", '
    '"status", "error", "createdAt", "updatedAt"'
)

DOCUMENT_LIMIT = 100
"""Documents a knowledge base may hold (the platform's DOCUMENT_LIMIT)."""

REFRESH_TERMS = 'SELECT "dialtone_knowledge_terms_refresh"($1, $2)'
"""Recount the knowledge base's lexemes after its passages changed (migration 0018), under its lock."""

LOCK_KNOWLEDGE_BASE = """
SELECT 1 FROM "KnowledgeBase" WHERE "id" = $1 AND "organizationId" = $2 FOR NO KEY UPDATE
"""
"""LOCK_ORDER: every transaction that changes a knowledge base's documents, their queue rows or passages locks
the knowledge base first (the trigger of migration 0018 updates it after each document change), so the API and
ingestion workers never wait on each other in opposite orders."""


class KnowledgeBase(Record):
    """A named set of documents, with a count of each kind of document in it."""

    id: str
    organization_id: str
    name: str
    description: str | None
    file_count: int
    website_count: int
    text_count: int
    status: KnowledgeBaseStatus
    language: str = "english"
    """The PostgreSQL text-search configuration its passages are indexed and searched in."""
    created_at: datetime
    updated_at: datetime


class KnowledgeBaseDocument(Record):
    """One file, web page or text in a knowledge base."""

    id: str
    organization_id: str
    knowledge_base_id: str
    name: str
    type: DocumentType
    url: str | None
    content: str | None
    file_size: int | None
    mime_type: str | None
    status: DocumentStatus
    error: str | None = None
    """Why ingestion failed (status ERROR); None otherwise."""
    created_at: datetime
    updated_at: datetime


class KnowledgeBaseWithDocuments(KnowledgeBase):
    """A knowledge base together with all its documents, as an agent's bundle carries it."""

    documents: list[KnowledgeBaseDocument]


async def create_knowledge_base(
    db: Queryable, *, organization_id: str, name: str, description: str | None = None, language: str = "english"
) -> KnowledgeBase:
    """Create an empty knowledge base in an organization, searched in `language` (a text-search configuration)."""
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "KnowledgeBase" ("id", "organizationId", "name", "description", "language")
            VALUES ($1, $2, $3, $4, $5)
            RETURNING {_COLUMNS}
            """,
            new_id(),
            organization_id,
            name,
            description,
            language,
        )
    assert row is not None
    return KnowledgeBase.from_row(row)


async def get_knowledge_base(db: Queryable, *, organization_id: str, knowledge_base_id: str) -> KnowledgeBase:
    """The organization's knowledge base with that id; NotFound otherwise."""
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "KnowledgeBase" WHERE "id" = $1 AND "organizationId" = $2',
        knowledge_base_id,
        organization_id,
    )
    if row is None:
        raise NotFound("KnowledgeBase", knowledge_base_id)
    return KnowledgeBase.from_row(row)


async def list_knowledge_bases(db: Queryable, *, organization_id: str) -> list[KnowledgeBase]:
    """The organization's knowledge bases, newest first."""
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "KnowledgeBase"
        WHERE "organizationId" = $1
        ORDER BY "createdAt" DESC, "id" DESC
        """,
        organization_id,
    )
    return KnowledgeBase.from_rows(rows)


async def add_document(
    db: Queryable,
    *,
    organization_id: str,
    knowledge_base_id: str,
    name: str,
    type: DocumentType,
    url: str | None = None,
    content: str | None = None,
    file_size: int | None = None,
    mime_type: str | None = None,
    data: bytes | None = None,
) -> KnowledgeBaseDocument:
    """Add a document (status PROCESSING) to a knowledge base and queue its ingestion, in one transaction.

    `data` is an uploaded file's bytes, kept for the ingestion worker. The knowledge base's counts and status
    follow by trigger (migration 0018). NotFound if the knowledge base is not the organization's;
    DocumentLimitReached if it already holds DOCUMENT_LIMIT documents.
    """
    async with transaction(db) as conn:
        # The lock makes concurrent additions to one knowledge base count one after the other (and see LOCK_ORDER).
        held = await conn.fetchval(
            """
            SELECT "fileCount" + "websiteCount" + "textCount" FROM "KnowledgeBase"
            WHERE "id" = $1 AND "organizationId" = $2
            FOR NO KEY UPDATE
            """,
            knowledge_base_id,
            organization_id,
        )
        if held is None:
            raise NotFound("KnowledgeBase", knowledge_base_id)
        if held >= DOCUMENT_LIMIT:
            raise DocumentLimitReached(knowledge_base_id, DOCUMENT_LIMIT)
        with translate_errors():
            row = await conn.fetchrow(
                f"""
                INSERT INTO "KnowledgeBaseDocument" ("id", "organizationId", "knowledgeBaseId", "name", "type",
                                                     "url", "content", "fileSize", "mimeType")
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                RETURNING {_DOCUMENT_COLUMNS}
                """,
                new_id(),
                organization_id,
                knowledge_base_id,
                name,
                type,
                url,
                content,
                file_size,
                mime_type,
            )
            assert row is not None
            if data is not None:
                await conn.execute(
                    'INSERT INTO "KnowledgeBaseFile" ("documentId", "organizationId", "data") VALUES ($1, $2, $3)',
                    row["id"],
                    organization_id,
                    data,
                )
            await conn.execute(
                'INSERT INTO "KnowledgeBaseIngestion" ("documentId", "organizationId") VALUES ($1, $2)',
                row["id"],
                organization_id,
            )
    return KnowledgeBaseDocument.from_row(row)


async def get_document(
    db: Queryable, *, organization_id: str, knowledge_base_id: str, document_id: str
) -> KnowledgeBaseDocument:
    """One document of one of the organization's knowledge bases; NotFound otherwise."""
    row = await db.fetchrow(
        f"""
        SELECT {_DOCUMENT_COLUMNS} FROM "KnowledgeBaseDocument"
        WHERE "id" = $1 AND "knowledgeBaseId" = $2 AND "organizationId" = $3
        """,
        document_id,
        knowledge_base_id,
        organization_id,
    )
    if row is None:
        raise NotFound("KnowledgeBaseDocument", document_id)
    return KnowledgeBaseDocument.from_row(row)


async def reingest_document(
    db: Queryable, *, organization_id: str, knowledge_base_id: str, document_id: str
) -> KnowledgeBaseDocument:
    """Queue a document to be ingested again (a website re-crawled): PROCESSING, its error cleared.

    Its current passages stay searchable until the new ones replace them. A read already under way is superseded
    (its claim ends here, so its outcome is not recorded): it may have read the document before the change that
    prompted the request. NotFound if not the organization's.
    """
    async with transaction(db) as conn:
        await conn.execute(LOCK_KNOWLEDGE_BASE, knowledge_base_id, organization_id)
        row = await conn.fetchrow(
            f"""
            UPDATE "KnowledgeBaseDocument" SET "status" = 'PROCESSING', "error" = NULL
            WHERE "id" = $1 AND "knowledgeBaseId" = $2 AND "organizationId" = $3
            RETURNING {_DOCUMENT_COLUMNS}
            """,
            document_id,
            knowledge_base_id,
            organization_id,
        )
        if row is None:
            raise NotFound("KnowledgeBaseDocument", document_id)
        await conn.execute(
            """
            INSERT INTO "KnowledgeBaseIngestion" ("documentId", "organizationId") VALUES ($1, $2)
            ON CONFLICT ("documentId") DO UPDATE SET
                "attemptCount" = 0, "nextAttemptAt" = CURRENT_TIMESTAMP, "lastError" = NULL,
                "leaseToken" = NULL, "leasedUntil" = NULL
            """,
            document_id,
            organization_id,
        )
    return KnowledgeBaseDocument.from_row(row)


async def list_documents(db: Queryable, *, organization_id: str, knowledge_base_id: str) -> list[KnowledgeBaseDocument]:
    """The documents of one of the organization's knowledge bases, oldest first (none for another's)."""
    rows = await db.fetch(
        f"""
        SELECT {_DOCUMENT_COLUMNS} FROM "KnowledgeBaseDocument"
        WHERE "knowledgeBaseId" = $1 AND "organizationId" = $2
        ORDER BY "createdAt", "id"
        """,
        knowledge_base_id,
        organization_id,
    )
    return KnowledgeBaseDocument.from_rows(rows)


async def delete_knowledge_base(db: Queryable, *, organization_id: str, knowledge_base_id: str) -> None:
    """Delete a knowledge base with its documents; agents that used it simply lose it."""
    with translate_errors():
        deleted = await db.fetchval(
            'DELETE FROM "KnowledgeBase" WHERE "id" = $1 AND "organizationId" = $2 RETURNING "id"',
            knowledge_base_id,
            organization_id,
        )
    if deleted is None:
        raise NotFound("KnowledgeBase", knowledge_base_id)


async def list_knowledge_bases_page(
    db: Queryable, *, organization_id: str, limit: int, before: tuple[datetime, str] | None = None
) -> list[KnowledgeBase]:
    """A page of the organization's knowledge bases, newest first, after the (createdAt, id) `before`."""
    rows = await fetch_page(
        db, table="KnowledgeBase", columns=_COLUMNS, organization_id=organization_id, limit=limit, before=before
    )
    return KnowledgeBase.from_rows(rows)


async def update_knowledge_base(
    db: Queryable, *, organization_id: str, knowledge_base_id: str, changes: dict[str, Any]
) -> KnowledgeBase:
    """Rename or redescribe a knowledge base (snake_case names); NotFound if not the organization's."""
    assignments, args = set_clause("KnowledgeBase", changes, {"name", "description"}, first=3)
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "KnowledgeBase" SET {assignments}
            WHERE "id" = $1 AND "organizationId" = $2
            RETURNING {_COLUMNS}
            """,
            knowledge_base_id,
            organization_id,
            *args,
        )
    if row is None:
        raise NotFound("KnowledgeBase", knowledge_base_id)
    return KnowledgeBase.from_row(row)


async def list_documents_page(
    db: Queryable,
    *,
    organization_id: str,
    knowledge_base_id: str,
    limit: int,
    before: tuple[datetime, str] | None = None,
) -> list[KnowledgeBaseDocument]:
    """A page of one knowledge base's documents, newest first, after the (createdAt, id) `before`."""
    rows = await db.fetch(
        f"""
        SELECT {_DOCUMENT_COLUMNS} FROM "KnowledgeBaseDocument"
        WHERE "organizationId" = $1 AND "knowledgeBaseId" = $2
          AND ($3::timestamptz IS NULL OR ("createdAt", "id") < ($3, $4))
        ORDER BY "createdAt" DESC, "id" DESC
        LIMIT $5
        """,
        organization_id,
        knowledge_base_id,
        *(before or (None, None)),
        limit,
    )
    return KnowledgeBaseDocument.from_rows(rows)


async def delete_document(db: Queryable, *, organization_id: str, knowledge_base_id: str, document_id: str) -> None:
    """Remove a document with its passages and stored file; its knowledge base's counts follow by trigger.

    NotFound if the knowledge base has no such document or is not the organization's.
    """
    with translate_errors():
        async with transaction(db) as conn:
            await conn.execute(LOCK_KNOWLEDGE_BASE, knowledge_base_id, organization_id)
            deleted = await conn.fetchval(
                """
                DELETE FROM "KnowledgeBaseDocument"
                WHERE "id" = $1 AND "knowledgeBaseId" = $2 AND "organizationId" = $3
                RETURNING "id"
                """,
                document_id,
                knowledge_base_id,
                organization_id,
            )
            if deleted is not None:
                await conn.execute(REFRESH_TERMS, knowledge_base_id, organization_id)
    if deleted is None:
        raise NotFound("KnowledgeBaseDocument", document_id)
