"""Migrations: applied once each, recorded, safe when two processes migrate at once, edits caught."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg
import pytest

from storage.errors import MigrationError
from storage.migrate import load_migrations, migrate, migration_status
from tests.databases import TestDatabases


async def test_migrations_apply_from_empty_and_record_each_version(databases: TestDatabases) -> None:
    conn = await asyncpg.connect(await databases.empty())
    try:
        applied = await migrate(conn)
        status = await migration_status(conn)
    finally:
        await conn.close()
    shipped = load_migrations()
    assert [m.version for m in applied] == [m.version for m in shipped]
    assert [a.version for a in status.applied] == [m.version for m in shipped]
    assert status.pending == []
    assert status.current_version == shipped[-1].version


async def test_rerunning_migrate_applies_nothing(databases: TestDatabases) -> None:
    conn = await asyncpg.connect(await databases.migrated())
    try:
        assert await migrate(conn) == []
        count = await conn.fetchval('SELECT count(*) FROM "SchemaMigration"')
    finally:
        await conn.close()
    assert count == len(load_migrations())


async def test_two_concurrent_migrators_apply_each_migration_once(databases: TestDatabases) -> None:
    url = await databases.empty()
    first, second = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        results = await asyncio.gather(migrate(first), migrate(second))
        rows = await first.fetch('SELECT "version" FROM "SchemaMigration" ORDER BY "version"')
    finally:
        await first.close()
        await second.close()
    shipped = [m.version for m in load_migrations()]
    assert sorted(m.version for result in results for m in result) == shipped
    assert [r["version"] for r in rows] == shipped


async def test_a_migration_edited_after_it_was_applied_is_refused(databases: TestDatabases) -> None:
    conn = await asyncpg.connect(await databases.migrated())
    try:
        shipped = load_migrations()
        edited = [replace(shipped[0], sql=shipped[0].sql + "\n-- edited\n"), *shipped[1:]]
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, edited)
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_behind(databases: TestDatabases) -> None:
    conn = await asyncpg.connect(await databases.migrated())
    try:
        broken = replace(
            load_migrations()[0],
            version=9999,
            name="broken",
            sql='CREATE TABLE "HalfDone" ("id" TEXT); SELECT no_such_function();',
        )
        with pytest.raises(MigrationError, match="9999_broken failed"):
            await migrate(conn, [*load_migrations(), broken])
        half_done = await conn.fetchval("SELECT to_regclass('\"HalfDone\"')")
        recorded = await conn.fetchval('SELECT count(*) FROM "SchemaMigration" WHERE "version" = 9999')
    finally:
        await conn.close()
    assert half_done is None
    assert recorded == 0
