"""A call's reads under row-level security in three round trips: the same isolation as every API transaction,
begun with its role and organization in one message and committed with the pool's reset in another."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from asyncpg.connection import LoggedQuery

from storage import knowledge_bases
from storage.pool import create_pool
from storage.tenancy import API_ROLE, ORGANIZATION_SETTING, tenant_read_transaction
from tests.test_repo_agents import insert_organization


@pytest.fixture
async def one_connection(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool of a single connection, so what one use leaves behind is what the next one finds."""
    pool = await create_pool(db_url, min_size=1, max_size=1)
    yield pool
    await pool.close()


async def knowledge_base_of_each(pool: asyncpg.Pool, *organization_ids: str) -> None:
    for organization_id in organization_ids:
        await knowledge_bases.create_knowledge_base(pool, organization_id=organization_id, name="Shared name")


async def session(pool: asyncpg.Pool) -> dict[str, object]:
    """What a new user of the pool's connection finds (the organization setting reads '' once a transaction set it)."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT current_user AS role, coalesce(current_setting($1, true), '') AS organization,"
            " current_setting('application_name') AS application, pg_current_xact_id_if_assigned() AS xact,"
            " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS locks",
            ORGANIZATION_SETTING,
        )
        assert row is not None
        return dict(row)


async def test_reads_see_only_the_organization_s_rows_as_the_api_role(pool: asyncpg.Pool) -> None:
    acme, globex = await insert_organization(pool), await insert_organization(pool)
    await knowledge_base_of_each(pool, acme, globex)
    async with tenant_read_transaction(pool, acme) as conn:
        owners = await conn.fetch('SELECT DISTINCT "organizationId" FROM "KnowledgeBase"')  # no filter of ours
        assert [row["organizationId"] for row in owners] == [acme]
        assert await conn.fetchval("SELECT current_user") == API_ROLE


async def test_writes_are_refused(pool: asyncpg.Pool) -> None:
    acme = await insert_organization(pool)
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        async with tenant_read_transaction(pool, acme) as conn:
            await conn.execute(
                'INSERT INTO "KnowledgeBase" ("id", "organizationId", "name", "updatedAt") VALUES ($1, $2, $3, now())',
                "kb-written",
                acme,
                "Written",
            )
    assert await pool.fetchval('SELECT count(*) FROM "KnowledgeBase" WHERE "id" = $1', "kb-written") == 0


async def test_an_organization_id_that_could_end_a_literal_is_sent_as_a_parameter(pool: asyncpg.Pool) -> None:
    crafted = "o'; RESET ROLE; --"
    await pool.execute('INSERT INTO "Organization" ("id", "name", "slug") VALUES ($1, $1, $2)', crafted, "crafted")
    other = await insert_organization(pool)
    await knowledge_base_of_each(pool, crafted, other)
    async with tenant_read_transaction(pool, crafted) as conn:
        assert await conn.fetchval("SELECT current_user") == API_ROLE
        owners = await conn.fetch('SELECT DISTINCT "organizationId" FROM "KnowledgeBase"')
        assert [row["organizationId"] for row in owners] == [crafted]


async def test_the_commit_resets_the_session_and_the_pool_sends_no_reset_of_its_own(
    one_connection: asyncpg.Pool,
) -> None:
    acme = await insert_organization(one_connection)
    sent: list[str] = []

    def log(query: LoggedQuery) -> None:
        sent.append(query.query)

    async with one_connection.acquire() as the_connection:
        the_connection.add_query_logger(log)
    fresh = await session(one_connection)
    sent.clear()
    async with tenant_read_transaction(one_connection, acme) as conn:
        # Session state a careless read could leave: all of it is undone by the message that commits.
        await conn.execute("SELECT set_config('application_name', 'left-behind', false), pg_advisory_lock(42)")
    assert len(sent) == 3  # BEGIN with role and organization; the read; COMMIT with the reset (none after it)
    assert sent[0].startswith("BEGIN READ ONLY;") and "set_config" in sent[0]
    assert sent[2].startswith("COMMIT;") and "RESET ALL" in sent[2] and "pg_advisory_unlock_all" in sent[2]
    assert await session(one_connection) == fresh


async def test_a_failed_read_is_rolled_back_and_the_session_reset(one_connection: asyncpg.Pool) -> None:
    acme = await insert_organization(one_connection)
    fresh = await session(one_connection)
    with pytest.raises(asyncpg.UndefinedTableError):
        async with tenant_read_transaction(one_connection, acme) as conn:
            await conn.execute("SELECT set_config('application_name', 'left-behind', false)")
            await conn.fetch('SELECT * FROM "NoSuchTable"')
    assert await session(one_connection) == fresh
    with pytest.raises(KeyError):  # an error of the caller's own, after a read
        async with tenant_read_transaction(one_connection, acme) as conn:
            await conn.fetchval("SELECT 1")
            raise KeyError("the caller's own")
    assert await session(one_connection) == fresh


async def test_a_read_cancelled_mid_query_leaves_a_clean_connection(one_connection: asyncpg.Pool) -> None:
    # A caller hanging up while their question is searched.
    acme = await insert_organization(one_connection)
    fresh = await session(one_connection)
    loop_errors: list[str] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: loop_errors.append(str(context.get("message"))))

    async def read() -> None:
        async with tenant_read_transaction(one_connection, acme) as conn:
            await conn.execute("SELECT pg_sleep(5)")

    try:
        task = asyncio.create_task(read())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await session(one_connection) == fresh
    finally:
        loop.set_exception_handler(previous)
    assert loop_errors == []  # asyncpg resets no connection with a transaction left open
