"""Every answer says `nosniff`; the API's say `no-store` (tenants' data, secrets shown once), unless a route chose
its own caching. The real engine on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from tests.engine_server import running_engine
from tests.test_api_auth import make_tenant


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    async with running_engine(db_url, dispatch_enabled=False) as url:
        yield url


async def test_api_answers_are_never_stored_and_no_answer_is_sniffed(engine: str, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Headers")
    bearer = {"Authorization": f"Bearer {tenant.owner_key}"}
    async with aiohttp.ClientSession() as session:
        for path, headers, status in [
            ("/v1/me", bearer, 200),
            ("/v1/me", {}, 401),
            ("/v1/no-such-thing", bearer, 404),
        ]:
            async with session.get(f"{engine}{path}", headers=headers) as response:
                assert response.status == status, path
                assert response.headers.get("Cache-Control") == "no-store", path
                assert response.headers.get("X-Content-Type-Options") == "nosniff", path
        for path in ["/health", "/monitor/static/no-such-file.js", "/monitor"]:
            async with session.get(f"{engine}{path}") as response:
                assert response.headers.get("X-Content-Type-Options") == "nosniff", path
