"""The engine's connection to PostgreSQL: an asyncpg pool, on DATABASE_URL or on the embedded server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import asyncpg

from config.settings import Settings
from storage.embedded import EmbeddedServer, start_embedded
from storage.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "dialtone"


@dataclass(frozen=True, slots=True)
class Database:
    """An open pool, where it points (for messages and /health), and the embedded server if one runs."""

    pool: asyncpg.Pool
    location: str
    embedded: EmbeddedServer | None = None
    call_writes: asyncpg.Pool | None = None
    """A few connections for the live calls' CallLog writers, given back without asyncpg's reset query (see
    `create_pool(stateless=True)`): the writers' statements are most of a busy engine's queries. None: use `pool`."""
    url: str = field(default="", repr=False)  # its password with it: `location` says where, for a traceback or print
    """The connection URL (with its password: never log it), for the few dedicated connections beside the pools."""

    @property
    def call_log_pool(self) -> asyncpg.Pool:
        """The pool the calls' CallLog writers use."""
        return self.call_writes or self.pool

    async def close(self) -> None:
        """Close every connection of the pools, waiting for queries in flight (at most 10 s)."""
        for pool in (self.pool, self.call_writes):
            if pool is None:
                continue
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except TimeoutError:
                pool.terminate()


def describe_location(url: str) -> str:
    """host:port/database of a libpq URL (the socket path for Unix sockets), without credentials."""
    parts = urlsplit(url)
    database = parts.path.lstrip("/") or "postgres"
    socket_host = parse_qs(parts.query).get("host", [None])[0]
    if socket_host:
        return f"{socket_host} (socket)/{database}"
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}/{database}"


def describe_failure(exc: BaseException, timeout: float) -> str:
    """Words for why a connection attempt failed."""
    match exc:
        case ConnectionRefusedError():
            return "connection refused"
        case socket.gaierror():
            return "host name not found"
        case TimeoutError():
            return f"no answer within {timeout:g}s"
        case FileNotFoundError():
            return "no server socket there"
        case asyncpg.InvalidPasswordError() | asyncpg.InvalidAuthorizationSpecificationError():
            return "authentication failed"
        case asyncpg.InvalidCatalogNameError():
            return "database does not exist"
        case asyncpg.TooManyConnectionsError():
            return "the server has too many connections"
        case asyncpg.PostgresError():
            return str(exc)
        case OSError() if exc.strerror:
            return exc.strerror.lower()
        case _:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb travel as Python objects, not strings, in both directions.
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(type_name, encoder=_dump_json, decoder=json.loads, schema="pg_catalog", format="text")


def _dump_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


class PooledConnection(asyncpg.Connection):
    """asyncpg's connection, which can end a transaction begun by hand and reset its session in one round trip."""

    __slots__ = ("_session_reset",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session_reset = False

    async def end_transaction_and_reset(self, ending: Literal["COMMIT", "ROLLBACK"]) -> None:
        """End the transaction (begun with a plain BEGIN) and run asyncpg's reset query in the same message.

        The last use of the connection before it goes back to the pool, which then skips its own reset query:
        the session is already as that query leaves it (one round trip saved).
        """
        await self.execute(f"{ending};\n{self.get_reset_query()}")
        self._session_reset = True

    def take_session_reset(self) -> bool:
        """Whether `end_transaction_and_reset` was the last thing done; asked once, as the connection goes back."""
        was_reset, self._session_reset = self._session_reset, False
        return was_reset


async def _reset_session(conn: asyncpg.Connection) -> None:
    """asyncpg's reset query (advisory unlocks, CLOSE ALL, UNLISTEN, RESET ALL), unless already run in the
    connection's last message; asyncpg has already rolled back any open transaction by now."""
    if not (isinstance(conn, PooledConnection) and conn.take_session_reset()):
        await conn.execute(conn.get_reset_query())


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without the reset query: asyncpg has already rolled back any open transaction by now."""
    if isinstance(conn, PooledConnection):
        conn.take_session_reset()


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 10.0, stateless: bool = False
) -> asyncpg.Pool:
    """An asyncpg pool with the engine's codecs; DatabaseUnavailable with one clear line if it cannot connect.

    `stateless`: a connection goes back to the pool without asyncpg's reset query (advisory unlocks, CLOSE ALL,
    UNLISTEN, RESET ALL), one round trip per use saved. Only for code that never leaves session state behind:
    no session-level SET, advisory lock, LISTEN or cursor outside a transaction (an open transaction is still
    rolled back).
    """
    try:
        return await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            init=_init_connection,
            connection_class=PooledConnection,
            reset=_keep_session if stateless else _reset_session,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(
            f"{source_name(url)}: could not connect to {describe_location(url)} ({describe_failure(exc, timeout)})"
        ) from None


def source_name(url: str) -> str:
    """The setting a URL came from, for messages."""
    return "embedded PostgreSQL" if "host=/" in url and "@/" in url else "DATABASE_URL"


async def ensure_database(server_url: str, name: str, *, timeout: float = 10.0) -> None:
    """Create database `name` on the server unless it exists; safe when several processes race."""
    try:
        conn = await asyncpg.connect(server_url, timeout=timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(
            f"embedded PostgreSQL: could not connect to {describe_location(server_url)} "
            f"({describe_failure(exc, timeout)})"
        ) from None
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # Another process may create it between the look and the CREATE: that is success too.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def open_database(settings: Settings, *, calls: bool = True) -> Database:
    """Open the pool the settings ask for, starting the embedded server first when DATABASE_URL is unset;
    with `calls`, the CallLog writers' own pool as well (half as many connections at most)."""
    embedded: EmbeddedServer | None = None
    if settings.database_url:
        url = settings.database_url
    else:
        embedded = await asyncio.to_thread(start_embedded, Path(settings.state_dir))
        await ensure_database(embedded.url(), EMBEDDED_DATABASE, timeout=settings.db_connect_timeout)
        url = embedded.url(EMBEDDED_DATABASE)
    pool = await create_pool(
        url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        timeout=settings.db_connect_timeout,
    )
    if not calls:
        return Database(pool=pool, location=describe_location(url), embedded=embedded, url=url)
    try:
        call_writes = await create_pool(
            url,
            min_size=min(1, settings.db_pool_min),
            max_size=max(1, settings.db_pool_max // 2),
            timeout=settings.db_connect_timeout,
            stateless=True,
        )
    except BaseException:
        await pool.close()
        raise
    return Database(pool=pool, location=describe_location(url), embedded=embedded, call_writes=call_writes, url=url)


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[Database]:
    """Open the database for the length of a block (commands: without the calls' pool)."""
    db = await open_database(settings, calls=False)
    try:
        yield db
    finally:
        await db.close()


DirectConnection = asyncpg.Connection
"""A connection of its own, outside the pool (e.g. one that LISTENs for notifications for the process's life)."""


async def connect_direct(url: str, *, timeout: float, application_name: str) -> DirectConnection:
    """Open one connection to `url` outside the pool, named `application_name` in pg_stat_activity."""
    return await asyncpg.connect(url, timeout=timeout, server_settings={"application_name": application_name})
