"""Knowledge bases and their documents: the text an agent may look things up in during a call."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from storage.enums import DocumentStatus, DocumentType, KnowledgeBaseStatus
from storage.errors import NotFound, translate_errors
from storage.records import Queryable, Record, fetch_page, new_id, set_clause

_COLUMNS = (
    '"id", "organizationId", "name", "description", "fileCount", "websiteCount", "textCount", "status", '
    '"createdAt", "updatedAt"'
)
_DOCUMENT_COLUMNS = (
    '"id", "organizationId", "knowledgeBaseId", "name", "type", "url", "content", "fileSize", "mimeType", '
    '"status", "createdAt", "updatedAt"'
)


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
    created_at: datetime
    updated_at: datetime


class KnowledgeBaseWithDocuments(KnowledgeBase):
    """A knowledge base together with all its documents, as an agent's bundle carries it."""

    documents: list[KnowledgeBaseDocument]


async def create_knowledge_base(
    db: Queryable, *, organization_id: str, name: str, description: str | None = None
) -> KnowledgeBase:
    """Create an empty knowledge base in an organization."""
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "KnowledgeBase" ("id", "organizationId", "name", "description")
            VALUES ($1, $2, $3, $4)
            RETURNING {_COLUMNS}
            """,
            new_id(),
            organization_id,
            name,
            description,
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
) -> KnowledgeBaseDocument:
    """Add a document (status PROCESSING) to a knowledge base and count it there, in one statement.

    An EMPTY knowledge base becomes PROCESSING. NotFound if the knowledge base is not the organization's.
    """
    with translate_errors():
        row = await db.fetchrow(
            f"""
            WITH counted AS (
                UPDATE "KnowledgeBase" SET
                    "fileCount" = "fileCount" + ($3::"DocumentType" = 'FILE')::int,
                    "websiteCount" = "websiteCount" + ($3::"DocumentType" = 'WEBSITE')::int,
                    "textCount" = "textCount" + ($3::"DocumentType" = 'TEXT')::int,
                    "status" = CASE WHEN "status" = 'EMPTY' THEN 'PROCESSING' ELSE "status" END
                WHERE "id" = $1 AND "organizationId" = $2
                RETURNING "id", "organizationId"
            )
            INSERT INTO "KnowledgeBaseDocument"
                ("id", "organizationId", "knowledgeBaseId", "name", "type", "url", "content", "fileSize", "mimeType")
            SELECT $4, counted."organizationId", counted."id", $5, $3, $6, $7, $8, $9
            FROM counted
            RETURNING {_DOCUMENT_COLUMNS}
            """,
            knowledge_base_id,
            organization_id,
            type,
            new_id(),
            name,
            url,
            content,
            file_size,
            mime_type,
        )
    if row is None:
        raise NotFound("KnowledgeBase", knowledge_base_id)
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
    """Remove a document and uncount it from its knowledge base, in one statement (EMPTY when none is left).

    NotFound if the knowledge base has no such document or is not the organization's.
    """
    with translate_errors():
        deleted = await db.fetchval(
            """
            WITH gone AS (
                DELETE FROM "KnowledgeBaseDocument"
                WHERE "id" = $1 AND "knowledgeBaseId" = $2 AND "organizationId" = $3
                RETURNING "knowledgeBaseId", "organizationId", "type"
            ), uncounted AS (
                UPDATE "KnowledgeBase" kb SET
                    "fileCount" = GREATEST(kb."fileCount" - (gone."type" = 'FILE')::int, 0),
                    "websiteCount" = GREATEST(kb."websiteCount" - (gone."type" = 'WEBSITE')::int, 0),
                    "textCount" = GREATEST(kb."textCount" - (gone."type" = 'TEXT')::int, 0),
                    "status" = CASE WHEN kb."fileCount" + kb."websiteCount" + kb."textCount" <= 1
                                    THEN 'EMPTY'::"KnowledgeBaseStatus" ELSE kb."status" END
                FROM gone
                WHERE kb."id" = gone."knowledgeBaseId" AND kb."organizationId" = gone."organizationId"
            )
            SELECT count(*) FROM gone
            """,
            document_id,
            knowledge_base_id,
            organization_id,
        )
    if not deleted:
        raise NotFound("KnowledgeBaseDocument", document_id)
