"""Fresh PostgreSQL databases for tests: empty ones, or clones of a template migrated once per session."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from storage.migrate import migrate
from storage.pool import create_pool


def with_database(server_url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def database_name(url: str) -> str:
    """The database a URL points at."""
    return urlsplit(url).path.lstrip("/")


class TestDatabases:
    """Creates uniquely named databases on one server and drops them all at the end."""

    __test__ = False  # not a test class

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.prefix = f"dialtone_test_{secrets.token_hex(3)}"
        self._created: list[str] = []
        self._template: str | None = None

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def empty(self) -> str:
        """URL of a new, empty database."""
        name = f"{self.prefix}_{len(self._created)}"
        await self._admin(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return with_database(self.server_url, name)

    async def migrated(self) -> str:
        """URL of a new database holding the whole schema (cloned from a template migrated once)."""
        if self._template is None:
            template_url = await self.empty()
            conn = await asyncpg.connect(template_url)
            try:
                await migrate(conn)
            finally:
                await conn.close()
            self._template = self._created[-1]
        name = f"{self.prefix}_{len(self._created)}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"')
        self._created.append(name)
        return with_database(self.server_url, name)

    async def pool(self, url: str) -> asyncpg.Pool:
        """A pool on one of these databases, with the engine's codecs."""
        return await create_pool(url, min_size=1, max_size=5)

    async def drop_all(self) -> None:
        """Drop every database this object created."""
        for name in reversed(self._created):
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._created.clear()
