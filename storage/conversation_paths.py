"""Conversation paths: react-flow graphs of nodes and edges that script how an agent's calls go."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from storage.errors import NotFound, translate_errors
from storage.records import Queryable, Record, StoredJsonArray, fetch_page, new_id, set_clause

_COLUMNS = '"id", "organizationId", "name", "useCase", "agentSpeech", "nodes", "edges", "createdAt", "updatedAt"'


class ConversationPath(Record):
    """A conversation flow: react-flow `nodes` and `edges`, kept as the JSON the flow builder saved.

    Both are arrays when saved through the API; a value of another shape left by another writer is read as it is,
    so that the path can still be listed and fixed, and a call on it fails naming the problem (pipelines.paths).
    """

    id: str
    organization_id: str
    name: str
    use_case: str | None
    agent_speech: str | None
    nodes: StoredJsonArray
    edges: StoredJsonArray
    created_at: datetime
    updated_at: datetime


async def create_conversation_path(
    db: Queryable,
    *,
    organization_id: str,
    name: str,
    use_case: str | None = None,
    agent_speech: str | None = None,
    nodes: list[Any] | None = None,
    edges: list[Any] | None = None,
) -> ConversationPath:
    """Create a conversation path in an organization."""
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "ConversationPath" ("id", "organizationId", "name", "useCase", "agentSpeech", "nodes", "edges")
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            RETURNING {_COLUMNS}
            """,
            new_id(),
            organization_id,
            name,
            use_case,
            agent_speech,
            nodes if nodes is not None else [],
            edges if edges is not None else [],
        )
    assert row is not None
    return ConversationPath.from_row(row)


async def get_conversation_path(db: Queryable, *, organization_id: str, conversation_path_id: str) -> ConversationPath:
    """The organization's conversation path with that id; NotFound otherwise."""
    return await _select(db, organization_id, conversation_path_id, "")


async def lock_conversation_path(db: Queryable, *, organization_id: str, conversation_path_id: str) -> ConversationPath:
    """The path, its row locked until the transaction ends: a change of half its graph is checked against the
    other half as it will stand, not as a concurrent change is replacing it. NotFound if not the organization's."""
    return await _select(db, organization_id, conversation_path_id, "FOR UPDATE")


async def _select(db: Queryable, organization_id: str, conversation_path_id: str, lock: str) -> ConversationPath:
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "ConversationPath" WHERE "id" = $1 AND "organizationId" = $2 {lock}',
        conversation_path_id,
        organization_id,
    )
    if row is None:
        raise NotFound("ConversationPath", conversation_path_id)
    return ConversationPath.from_row(row)


async def list_conversation_paths(db: Queryable, *, organization_id: str) -> list[ConversationPath]:
    """The organization's conversation paths, newest first."""
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "ConversationPath"
        WHERE "organizationId" = $1
        ORDER BY "createdAt" DESC, "id" DESC
        """,
        organization_id,
    )
    return ConversationPath.from_rows(rows)


async def delete_conversation_path(db: Queryable, *, organization_id: str, conversation_path_id: str) -> None:
    """Delete a conversation path; agents lose it and campaigns that followed it keep running without one."""
    with translate_errors():
        deleted = await db.fetchval(
            'DELETE FROM "ConversationPath" WHERE "id" = $1 AND "organizationId" = $2 RETURNING "id"',
            conversation_path_id,
            organization_id,
        )
    if deleted is None:
        raise NotFound("ConversationPath", conversation_path_id)


async def list_conversation_paths_page(
    db: Queryable, *, organization_id: str, limit: int, before: tuple[datetime, str] | None = None
) -> list[ConversationPath]:
    """A page of the organization's conversation paths, newest first, after the (createdAt, id) `before`."""
    rows = await fetch_page(
        db, table="ConversationPath", columns=_COLUMNS, organization_id=organization_id, limit=limit, before=before
    )
    return ConversationPath.from_rows(rows)


async def update_conversation_path(
    db: Queryable, *, organization_id: str, conversation_path_id: str, changes: dict[str, Any]
) -> ConversationPath:
    """Change a path's name, use case, speech or graph (snake_case names); NotFound if not the organization's."""
    assignments, args = set_clause(
        "ConversationPath", changes, {"name", "use_case", "agent_speech", "nodes", "edges"}, first=3
    )
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "ConversationPath" SET {assignments}
            WHERE "id" = $1 AND "organizationId" = $2
            RETURNING {_COLUMNS}
            """,
            conversation_path_id,
            organization_id,
            *args,
        )
    if row is None:
        raise NotFound("ConversationPath", conversation_path_id)
    return ConversationPath.from_row(row)
