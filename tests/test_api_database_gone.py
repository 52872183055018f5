"""The API when its database is gone or refuses connections: every /v1 request answers 503 in the API's error shape,
never a 500; the call paths retry the same errors (storage.errors.TRANSIENT_ERRORS)."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from storage.errors import TRANSIENT_ERRORS, DatabaseUnavailable
from storage.pool import create_pool
from tests.databases import TestDatabases, database_name
from tests.engine_server import running_engine
from tests.test_api_auth import Api, make_tenant


async def test_a_dropped_database_makes_the_api_unavailable_not_failing(databases: TestDatabases) -> None:
    url = await databases.migrated()
    pool = await databases.pool(url)
    try:
        tenant = await make_tenant(pool, "Dropped")
    finally:
        await pool.close()
    async with running_engine(url) as engine, aiohttp.ClientSession() as session:
        api = Api(session, engine)
        status, _ = await api.call("GET", "/agents", tenant.owner_key)
        assert status == 200
        admin = await asyncpg.connect(databases.server_url)
        try:
            await admin.execute(f'DROP DATABASE "{database_name(url)}" WITH (FORCE)')
        finally:
            await admin.close()
        answers = [await api.call("GET", "/agents", tenant.owner_key) for _ in range(3)]
    assert [status for status, _ in answers] == [503] * 3
    assert all(body["error"]["code"] == "unavailable" for _, body in answers)


async def test_connections_the_server_refuses_count_as_the_database_unavailable(databases: TestDatabases) -> None:
    url = await databases.migrated()
    role = f"limited_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(databases.server_url)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
        parts = urlsplit(url)
        as_role = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname or ''}"))
        with pytest.raises(asyncpg.TooManyConnectionsError) as refused:
            await asyncpg.connect(as_role)
        assert isinstance(refused.value, TRANSIENT_ERRORS)
        with pytest.raises(DatabaseUnavailable, match="too many connections"):
            await create_pool(as_role)
    finally:
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()
