"""The API when its database is gone or refuses connections: every /v1 request answers 503 in the API's error shape,
never a 500; the call paths retry the same errors (storage.errors.TRANSIENT_ERRORS)."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

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


async def test_a_role_out_of_connections_makes_the_api_unavailable_not_failing(databases: TestDatabases) -> None:
    # The engine connects as a role of its own, as on a managed server whose roles have connection limits (superusers
    # have none). It bypasses row-level security as the schema's owner does.
    url = await databases.migrated()
    role = f"engine_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN BYPASSRLS IN ROLE dialtone_api')
        for grant in ("ALL ON ALL TABLES", "ALL ON ALL SEQUENCES"):
            await admin.execute(f'GRANT {grant} IN SCHEMA public TO "{role}"')
        pool = await databases.pool(url)
        try:
            tenant = await make_tenant(pool, "Crowded")
        finally:
            await pool.close()
        parts = urlsplit(url)
        as_role = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname or ''}"))
        async with running_engine(as_role, apply_migrations=False) as engine, aiohttp.ClientSession() as session:
            api = Api(session, engine)
            status, _ = await api.call("GET", "/agents", tenant.owner_key)
            assert status == 200
            await admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
            answers = [await api.call("GET", "/agents", tenant.owner_key) for _ in range(3)]
            with pytest.raises(asyncpg.TooManyConnectionsError):  # what the engine's pool meets as it reconnects
                await asyncpg.connect(as_role)
    finally:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        await admin.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "{role}"')
        await admin.execute(f'REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM "{role}"')
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()
    assert [status for status, _ in answers] == [503] * 3
    assert all(body["error"]["code"] == "unavailable" for _, body in answers)
