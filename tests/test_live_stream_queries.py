"""What open live event streams cost the database: their leases renewed and their keys checked once per period for
all the streams of an engine process, not once per stream; and a revoked key still ends its streams, and only them.

The engine reaches PostgreSQL through a proxy that counts the statements it executes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from engine.api import key_watch
from engine.call import live_events
from storage import api_keys
from tests.databases import database_name
from tests.engine_server import running_engine
from tests.postgres_statements import StatementCountingProxy
from tests.sse_client import EventStream
from tests.test_api_auth import Tenant, make_tenant

RENEWAL = ('UPDATE "LiveCallWatch"',)
KEY_CHECK = ('FROM "ApiKey" k', 'JOIN "User" u')


@pytest.fixture
async def proxy(postgres_server_url: str) -> AsyncIterator[StatementCountingProxy]:
    async with StatementCountingProxy(postgres_server_url) as proxy:
        yield proxy


@pytest.fixture
async def engine(db_url: str, proxy: StatementCountingProxy, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """An engine whose streams renew their leases every 0.5 s and check their keys every 0.25 s."""
    monkeypatch.setattr(live_events, "WATCH_RENEW_SECONDS", 0.5)
    monkeypatch.setattr(key_watch, "KEY_RECHECK_SECONDS", 0.25)
    async with running_engine(proxy.url(database_name(db_url))) as base:
        yield base


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


async def until_renewed(pool: asyncpg.Pool, organization_ids: list[str], *, leases: int, times: int) -> None:
    """Wait until each of the organizations' `leases` leases has been renewed `times` times (seen from outside)."""
    seen: dict[str, set[object]] = {}
    async with asyncio.timeout(60):
        while len(seen) < leases or any(len(ends) <= times for ends in seen.values()):
            rows = await pool.fetch(
                'SELECT "id", "expiresAt" FROM "LiveCallWatch" WHERE "organizationId" = ANY($1)', organization_ids
            )
            for row in rows:
                seen.setdefault(row["id"], set()).add(row["expiresAt"])
            await asyncio.sleep(0.05)


async def open_streams(
    opened: contextlib.AsyncExitStack, session: aiohttp.ClientSession, engine: str, tenants: list[Tenant], n: int
) -> list[EventStream]:
    """`n` organization streams, the tenants' owner keys taken in turn."""
    return [
        await opened.enter_async_context(
            EventStream(session, f"{engine}/v1/live-calls/events", tenants[i % len(tenants)].owner_key)
        )
        for i in range(n)
    ]


async def test_forty_open_streams_renew_their_leases_and_check_their_keys_in_a_few_queries_per_period(
    engine: str, pool: asyncpg.Pool, proxy: StatementCountingProxy, session: aiohttp.ClientSession
) -> None:
    tenants = [await make_tenant(pool, f"Watchers{n}") for n in range(3)]  # three organizations, three keys
    streams = 40
    async with contextlib.AsyncExitStack() as opened:
        watching = await open_streams(opened, session, engine, tenants, streams)
        renewals, key_checks = proxy.count(*RENEWAL), proxy.count(*KEY_CHECK)
        # Two renewal periods at least, four key periods: every stream's lease renewed twice.
        await until_renewed(pool, [t.organization_id for t in tenants], leases=streams, times=2)
        renewals, key_checks = proxy.count(*RENEWAL) - renewals, proxy.count(*KEY_CHECK) - key_checks
        assert not any(stream.ended for stream in watching)
    # One statement per period for all forty (a few periods passed), not one per stream and period (80 and 160+).
    assert 2 <= renewals < streams // 4
    assert 1 <= key_checks < streams // 4


async def test_a_revoked_key_ends_its_streams_and_no_other_key_s(
    engine: str, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    revoked, kept = await make_tenant(pool, "Revoked"), await make_tenant(pool, "Kept")
    async with contextlib.AsyncExitStack() as opened:
        theirs = await open_streams(opened, session, engine, [revoked], 3)
        ours = await open_streams(opened, session, engine, [kept], 3)
        await api_keys.revoke_api_key(pool, organization_id=revoked.organization_id, key_id=revoked.owner_key_id)
        for stream in theirs:
            await stream.until_ended(timeout=10)
        await until_renewed(pool, [kept.organization_id], leases=3, times=2)  # a few more key checks
        assert not any(stream.ended for stream in ours)
