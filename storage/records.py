"""Typed records that cross module boundaries, the query interface repositories take, and row ids."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence, Set
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Protocol, Self, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from cuid2 import Cuid
from pydantic import BaseModel, ConfigDict, WithJsonSchema
from pydantic.alias_generators import to_camel

_cuid = Cuid(length=25)
# For ids by the thousand: a random byte picks a character (256 = 7 x 36 + 4, so "0"-"3" come up 8 times in
# 256 and the others 7: about 5.16 bits per character, 128 bits per id).
_ID_CHARACTERS = bytes(ord("0123456789abcdefghijklmnopqrstuvwxyz"[byte % 36]) for byte in range(256))
_ID_LETTERS = bytes(ord("abcdefghijklmnopqrstuvwxyz"[byte % 26]) for byte in range(256))


def new_id() -> str:
    """A new CUID for a row's primary key (text, collision-resistant, safe to expose)."""
    return _cuid.generate()


def new_ids(count: int) -> list[str]:
    """`count` new primary keys at once, shaped like new_id's: a lowercase letter, then 24 letters or digits.

    Drawn from the operating system's random source (about 128 bits each), a hundred times faster than CUIDs
    one by one: for bulk inserts (a campaign's 100,000 recipients) where id generation would cost seconds.
    """
    letters = os.urandom(count).translate(_ID_LETTERS).decode("ascii")
    rest = os.urandom(24 * count).translate(_ID_CHARACTERS).decode("ascii")
    return [letters[index] + rest[24 * index : 24 * index + 24] for index in range(count)]


StoredJsonArray = Annotated[Any, WithJsonSchema({"type": "array", "items": {}})]
"""A `Json` column the API saves an array in, read as stored: the dashboard shares the table, and Prisma's `Json`
takes any JSON value. A row holding another must still be read (to be refused by its user with a reason, shown,
fixed), not make every query that reads it fail."""
StoredJsonObject = Annotated[Any, WithJsonSchema({"type": "object", "additionalProperties": True})]
"""A `Json` column the API saves an object in, read as stored (see StoredJsonArray)."""

Connection = asyncpg.Connection | PoolConnectionProxy
"""One connection: opened directly, or acquired from a pool."""
Pool: TypeAlias = asyncpg.Pool
"""A pool of connections to the database (open one with storage.pool.open_database)."""


class Queryable(Protocol):
    """What repositories need of a connection or a pool: asyncpg's query methods."""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str: ...

    async def fetch(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> list[asyncpg.Record]: ...

    async def fetchrow(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> asyncpg.Record | None: ...

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any: ...


@asynccontextmanager
async def transaction(db: Queryable) -> AsyncIterator[Connection]:
    """A connection inside a transaction: a pool's own, or a savepoint on the caller's connection."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    elif isinstance(db, Connection):
        async with db.transaction():
            yield db
    else:
        raise TypeError(f"expected an asyncpg pool or connection, got {type(db).__name__}")


class Record(BaseModel):
    """A row as the engine sees it: snake_case attributes over the schema's camelCase columns."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | asyncpg.Record) -> Self:
        """Build the record from a database row whose keys are the table's column names."""
        return cls.model_validate(dict(row.items()))

    @classmethod
    def from_rows(cls, rows: Sequence[asyncpg.Record]) -> list[Self]:
        """Build one record per row."""
        return [cls.from_row(row) for row in rows]


async def fetch_page(
    db: Queryable,
    *,
    table: str,
    columns: str,
    organization_id: str,
    limit: int,
    before: tuple[datetime, str] | None = None,
) -> list[asyncpg.Record]:
    """A page of an organization's rows of `table`, newest first, after the (createdAt, id) `before`."""
    return await db.fetch(
        f"""
        SELECT {columns} FROM "{table}"
        WHERE "organizationId" = $1 AND ($2::timestamptz IS NULL OR ("createdAt", "id") < ($2, $3))
        ORDER BY "createdAt" DESC, "id" DESC
        LIMIT $4
        """,
        organization_id,
        *(before or (None, None)),
        limit,
    )


def set_clause(entity: str, changes: Mapping[str, Any], allowed: Set[str], *, first: int) -> tuple[str, list[Any]]:
    """The SET list of a partial update and its arguments, numbered from `$first`.

    `changes` use snake_case names (the columns are their camelCase); ValueError names any that may not change.
    No change at all gives a no-op assignment, so the UPDATE still returns the row.
    """
    unknown = set(changes) - set(allowed)
    if unknown:
        raise ValueError(f"{entity} fields that cannot be changed: {', '.join(sorted(unknown))}")
    assignments = ['"id" = "id"']
    args: list[Any] = []
    for name, value in changes.items():
        args.append(value)
        assignments.append(f'"{to_camel(name)}" = ${first + len(args) - 1}')
    return ", ".join(assignments), args
