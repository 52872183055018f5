"""API rate limits per key, counted in PostgreSQL: two engine processes on one database share each key's count; past
the limit, 429 with Retry-After in the API's error shape; every answer says the limit in X-RateLimit-* headers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import aiohttp
import asyncpg
import pytest

from tests.engine_server import running_engine
from tests.test_api_auth import Tenant, make_tenant

LIMIT = 5


@pytest.fixture(scope="module")
async def engines(db_url: str) -> AsyncIterator[tuple[str, str]]:
    """Two engine processes' applications on one database, each allowing LIMIT requests a minute per key."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_engine(db_url, api_rate_limit_per_minute=LIMIT))
        second = await stack.enter_async_context(running_engine(db_url, api_rate_limit_per_minute=LIMIT))
        yield first, second


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, base: str, key: str) -> tuple[int, dict[str, str], dict[str, object]]:
    """GET /v1/organization with the key: status, headers and JSON body."""
    async with http.get(f"{base}/v1/organization", headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status, dict(response.headers), await response.json()


async def fresh_window(pool: asyncpg.Pool) -> None:
    """Wait, if need be, for a minute with time enough left that a burst does not straddle two windows."""
    seconds = await pool.fetchval("SELECT extract(second FROM CURRENT_TIMESTAMP)::float8")
    if seconds > 50:
        await asyncio.sleep(60.5 - seconds)


@pytest.fixture
async def tenant(pool: asyncpg.Pool) -> Tenant:
    tenant = await make_tenant(pool, "Busy")
    await fresh_window(pool)
    return tenant


async def test_a_burst_through_two_processes_gets_exactly_the_limit_and_429s_for_the_rest(
    engines: tuple[str, str], http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    answers = await asyncio.gather(*(get(http, engines[n % 2], tenant.owner_key) for n in range(12)))

    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * LIMIT + [429] * (12 - LIMIT)
    for status, headers, body in answers:
        assert headers["X-RateLimit-Limit"] == str(LIMIT)
        assert 1 <= int(headers["X-RateLimit-Reset"]) <= 60
        if status == 429:
            assert body["error"]["code"] == "rate_limited"  # type: ignore[index]
            assert f"more than {LIMIT} requests" in body["error"]["message"]  # type: ignore[index]
            assert 1 <= int(headers["Retry-After"]) <= 60
            assert headers["X-RateLimit-Remaining"] == "0"
    remaining = sorted(int(headers["X-RateLimit-Remaining"]) for status, headers, _ in answers if status == 200)
    assert remaining == list(range(LIMIT))


async def test_each_key_has_its_own_count(
    engines: tuple[str, str], http: aiohttp.ClientSession, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    for _ in range(LIMIT):
        assert (await get(http, engines[0], tenant.owner_key))[0] == 200
    assert (await get(http, engines[1], tenant.owner_key))[0] == 429

    status, headers, _ = await get(http, engines[1], tenant.viewer_key)
    assert (status, headers["X-RateLimit-Remaining"]) == (200, str(LIMIT - 1))


async def test_errors_of_a_counted_request_carry_the_limit_headers_too(
    engines: tuple[str, str], http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    async with http.get(
        f"{engines[0]}/v1/agents/no-such-agent", headers={"Authorization": f"Bearer {tenant.owner_key}"}
    ) as response:
        assert response.status == 404
        assert response.headers["X-RateLimit-Remaining"] == str(LIMIT - 1)


async def test_a_new_window_starts_the_count_again_in_the_same_row(
    engines: tuple[str, str], http: aiohttp.ClientSession, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    for _ in range(LIMIT + 1):
        await get(http, engines[0], tenant.owner_key)
    assert (await get(http, engines[0], tenant.owner_key))[0] == 429

    # The window the counts were made in is over (as a minute later).
    await pool.execute(
        """UPDATE "ApiRateLimit" SET "windowStart" = "windowStart" - interval '1 minute' WHERE "apiKeyId" = $1""",
        tenant.owner_key_id,
    )
    status, headers, _ = await get(http, engines[1], tenant.owner_key)

    assert (status, headers["X-RateLimit-Remaining"]) == (200, str(LIMIT - 1))
    rows = await pool.fetch('SELECT "count" FROM "ApiRateLimit" WHERE "apiKeyId" = $1', tenant.owner_key_id)
    assert [row["count"] for row in rows] == [1]


async def test_a_deleted_key_takes_its_count_with_it(
    engines: tuple[str, str], http: aiohttp.ClientSession, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    await get(http, engines[0], tenant.viewer_key)
    viewer_key_id = await pool.fetchval(
        'SELECT "apiKeyId" FROM "ApiRateLimit" WHERE "organizationId" = $1 AND "apiKeyId" <> $2',
        tenant.organization_id,
        tenant.owner_key_id,
    )
    await pool.execute('DELETE FROM "ApiKey" WHERE "id" = $1', viewer_key_id)
    assert await pool.fetchval('SELECT count(*) FROM "ApiRateLimit" WHERE "apiKeyId" = $1', viewer_key_id) == 0


async def test_unauthenticated_requests_are_refused_before_anything_is_counted(
    engines: tuple[str, str], http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    before = await pool.fetchval('SELECT count(*) FROM "ApiRateLimit"')
    async with http.get(f"{engines[0]}/v1/organization", headers={"Authorization": "Bearer sk_live_nope"}) as response:
        assert response.status == 401
        assert "X-RateLimit-Limit" not in response.headers
    assert await pool.fetchval('SELECT count(*) FROM "ApiRateLimit"') == before


async def test_a_limit_of_zero_counts_nothing(db_url: str, http: aiohttp.ClientSession, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Unlimited")
    async with running_engine(db_url, api_rate_limit_per_minute=0) as base:
        answers = await asyncio.gather(*(get(http, base, tenant.owner_key) for _ in range(LIMIT + 3)))
    assert [status for status, _, _ in answers] == [200] * (LIMIT + 3)
    assert all("X-RateLimit-Limit" not in headers for _, headers, _ in answers)
    assert (
        await pool.fetchval('SELECT count(*) FROM "ApiRateLimit" WHERE "organizationId" = $1', tenant.organization_id)
        == 0
    )
