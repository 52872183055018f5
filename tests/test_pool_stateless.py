"""The CallLog writers' pool: connections go back without asyncpg's reset query, yet never carry a transaction."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from config.settings import Settings
from storage.pool import create_pool, database, describe_location, open_database


async def _application_name_after_release(url: str, *, stateless: bool) -> str:
    pool = await create_pool(url, min_size=1, max_size=1, stateless=stateless)
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'left-behind'")
        async with pool.acquire() as conn:  # the same connection: the pool holds one
            return str(await conn.fetchval("SHOW application_name"))
    finally:
        await pool.close()


async def test_stateless_pool_skips_the_reset_query_the_default_pool_runs(db_url: str) -> None:
    # What the saved round trip is: session state a release would have reset stays.
    assert await _application_name_after_release(db_url, stateless=False) != "left-behind"
    assert await _application_name_after_release(db_url, stateless=True) == "left-behind"


async def test_stateless_pool_rolls_back_a_transaction_left_open(db_url: str) -> None:
    pool = await create_pool(db_url, min_size=1, max_size=1, stateless=True)
    try:
        async with pool.acquire() as conn:
            await conn.execute("CREATE TEMP TABLE IF NOT EXISTS t (v int)")
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO t VALUES (1)")
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM t") == 0
    finally:
        await pool.close()


async def test_open_database_gives_the_call_writers_their_own_stateless_pool(db_url: str) -> None:
    db = await open_database(Settings(database_url=db_url, db_pool_max=6))
    try:
        assert db.call_writes is not None and db.call_log_pool is db.call_writes
        assert db.call_writes.get_max_size() == 3
        async with db.call_log_pool.acquire() as conn:
            await conn.execute("SET application_name = 'writer'")
        async with db.call_log_pool.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await db.close()
    with pytest.raises(asyncpg.InterfaceError):
        await db.call_writes.fetchval("SELECT 1")


async def test_commands_open_no_pool_for_calls(db_url: str) -> None:
    async with database(Settings(database_url=db_url)) as db:
        assert db.call_writes is None and db.call_log_pool is db.pool


async def test_a_database_printed_shows_where_it_points_but_not_its_password(db_url: str) -> None:
    parts = urlsplit(db_url)
    password = parts.password or "not-for-tracebacks"
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.netloc.rpartition('@')[2]}"
    with_password = urlunsplit(parts._replace(netloc=netloc))  # the server trusts its socket: any password connects
    async with database(Settings(database_url=with_password)) as db:
        assert await db.pool.fetchval("SELECT 1") == 1
        shown = repr(db)
    assert password not in shown
    assert describe_location(with_password) in shown
