"""Tools: the external integrations (calendars, CRMs, payments) an organization connects for its agents."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from storage.errors import NotFound, translate_errors
from storage.records import Queryable, Record, StoredJsonObject, fetch_page, new_id, set_clause

_COLUMNS = (
    '"id", "organizationId", "name", "description", "category", "logo", "iconBgColor", "isConnected", '
    '"configuration", "createdAt", "updatedAt"'
)


class Tool(Record):
    """An integration; its configuration holds credentials, so it never shows in a repr."""

    id: str
    organization_id: str
    name: str
    description: str | None
    category: str | None
    logo: str | None
    icon_bg_color: str | None
    is_connected: bool
    configuration: StoredJsonObject = Field(repr=False)
    """An object when saved through the API; read as stored otherwise (pipelines.tools refuses it in a call)."""
    created_at: datetime
    updated_at: datetime


async def create_tool(
    db: Queryable,
    *,
    organization_id: str,
    name: str,
    description: str | None = None,
    category: str | None = None,
    logo: str | None = None,
    icon_bg_color: str | None = None,
    is_connected: bool = False,
    configuration: dict[str, Any] | None = None,
) -> Tool:
    """Create a tool in an organization."""
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "Tool"
                ("id", "organizationId", "name", "description", "category", "logo", "iconBgColor", "isConnected",
                 "configuration")
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            RETURNING {_COLUMNS}
            """,
            new_id(),
            organization_id,
            name,
            description,
            category,
            logo,
            icon_bg_color,
            is_connected,
            configuration if configuration is not None else {},
        )
    assert row is not None
    return Tool.from_row(row)


async def get_tool(db: Queryable, *, organization_id: str, tool_id: str) -> Tool:
    """The organization's tool with that id; NotFound otherwise."""
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "Tool" WHERE "id" = $1 AND "organizationId" = $2', tool_id, organization_id
    )
    if row is None:
        raise NotFound("Tool", tool_id)
    return Tool.from_row(row)


async def list_tools(db: Queryable, *, organization_id: str) -> list[Tool]:
    """The organization's tools, newest first."""
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "Tool"
        WHERE "organizationId" = $1
        ORDER BY "createdAt" DESC, "id" DESC
        """,
        organization_id,
    )
    return Tool.from_rows(rows)


async def delete_tool(db: Queryable, *, organization_id: str, tool_id: str) -> None:
    """Delete a tool; agents that used it simply lose it."""
    with translate_errors():
        deleted = await db.fetchval(
            'DELETE FROM "Tool" WHERE "id" = $1 AND "organizationId" = $2 RETURNING "id"', tool_id, organization_id
        )
    if deleted is None:
        raise NotFound("Tool", tool_id)


async def list_tools_page(
    db: Queryable, *, organization_id: str, limit: int, before: tuple[datetime, str] | None = None
) -> list[Tool]:
    """A page of the organization's tools, newest first, after the (createdAt, id) `before`."""
    rows = await fetch_page(
        db, table="Tool", columns=_COLUMNS, organization_id=organization_id, limit=limit, before=before
    )
    return Tool.from_rows(rows)


async def update_tool(db: Queryable, *, organization_id: str, tool_id: str, changes: dict[str, Any]) -> Tool:
    """Change some of a tool's fields (snake_case names); NotFound if not the organization's."""
    assignments, args = set_clause("Tool", changes, _UPDATABLE, first=3)
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "Tool" SET {assignments}
            WHERE "id" = $1 AND "organizationId" = $2
            RETURNING {_COLUMNS}
            """,
            tool_id,
            organization_id,
            *args,
        )
    if row is None:
        raise NotFound("Tool", tool_id)
    return Tool.from_row(row)


_UPDATABLE = frozenset({"name", "description", "category", "logo", "icon_bg_color", "is_connected", "configuration"})
