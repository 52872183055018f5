"""GET /health over real HTTP: database reachability and schema version, and what happens when they fail."""

from __future__ import annotations

import aiohttp
import asyncpg

from storage.migrate import load_migrations
from tests.databases import TestDatabases, database_name
from tests.engine_server import running_engine


async def test_health_reports_a_reachable_database_and_its_schema_version(db_url: str) -> None:
    async with running_engine(db_url) as base, aiohttp.ClientSession() as http, http.get(f"{base}/health") as response:
        body = await response.json()
    assert response.status == 200
    assert body["status"] == "ok"
    assert body["database"]["reachable"] is True
    assert body["database"]["schemaVersion"] == load_migrations()[-1].version
    assert body["database"]["pendingMigrations"] == []


async def test_health_is_unavailable_with_pending_migrations(databases: TestDatabases) -> None:
    url = await databases.empty()
    async with (
        running_engine(url, apply_migrations=False) as base,
        aiohttp.ClientSession() as http,
        http.get(f"{base}/health") as response,
    ):
        body = await response.json()
    assert response.status == 503
    assert body["status"] == "schema-outdated"
    assert body["database"]["schemaVersion"] == 0
    assert body["database"]["pendingMigrations"] == [m.label for m in load_migrations()]


async def test_health_turns_unavailable_when_the_database_goes_away_and_the_server_keeps_serving(
    databases: TestDatabases,
) -> None:
    url = await databases.migrated()
    name = database_name(url)
    async with running_engine(url) as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/health") as before:
            assert before.status == 200
        admin = await asyncpg.connect(databases.server_url)
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        async with http.get(f"{base}/health") as during:
            body = await during.json()
        async with http.get(f"{base}/health") as again:
            assert again.status == 503
    assert during.status == 503
    assert body["status"] == "unavailable"
    assert body["database"]["reachable"] is False
