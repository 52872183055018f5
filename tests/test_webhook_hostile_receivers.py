"""Webhook deliveries that can never succeed: each attempt is logged and the delivery is given up in time.

A delivery whose outcome cannot be recorded is retried only when its lease runs out, with nothing logged and no
attempt counted, so it would never reach its give-up time: these tests give up after a few seconds and expect it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiohttp import web

from tests.databases import TestDatabases
from tests.engine_server import running_engine
from tests.fakes.server import serve
from tests.test_webhook_delivery import FAST_DELIVERY, emit, eventually, new_organization, subscribe
from tests.webhook_receiver import webhook_receiver

GIVING_UP_SOON = {**FAST_DELIVERY, "webhook_give_up_after": 2.0}


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    """The engine, delivering this module's database's webhooks and giving up on them after two seconds."""
    async with running_engine(db_url, **GIVING_UP_SOON) as base:
        yield base


async def given_up(pool: asyncpg.Pool, organization_id: str) -> bool:
    status = await pool.fetchval('SELECT "status" FROM "WebhookDelivery" WHERE "organizationId" = $1', organization_id)
    return bool(status == "FAILED")


async def settled(pool: asyncpg.Pool, organization_id: str) -> bool:
    status = await pool.fetchval('SELECT "status" FROM "WebhookDelivery" WHERE "organizationId" = $1', organization_id)
    return bool(status in {"DELIVERED", "FAILED"})


async def test_an_error_body_holding_a_nul_byte_is_logged_and_the_delivery_given_up(
    engine: str, pool: asyncpg.Pool
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=500, body=b"broken\x00backend \xff")

    app = web.Application()
    app.router.add_post("/{path:.*}", answer)
    org = await new_organization(pool)
    async with serve(app) as base:
        await subscribe(pool, org, f"{base}/nul")
        await emit(pool, org, {"n": 1})
        await eventually(lambda: given_up(pool, org), "the delivery given up")

    row = await pool.fetchrow('SELECT * FROM "WebhookDelivery" WHERE "organizationId" = $1', org)
    assert row is not None
    assert row["lastResponseCode"] == 500
    assert row["lastError"] == "HTTP 500: broken\ufffdbackend \ufffd"
    attempts = await pool.fetchval('SELECT count(*) FROM "WebhookAttempt" WHERE "organizationId" = $1', org)
    assert attempts == row["attemptCount"] >= 2


async def test_a_url_stored_past_the_api_that_cannot_be_parsed_is_logged_and_given_up(
    databases: TestDatabases,
) -> None:
    url = await databases.migrated()
    pool = await databases.pool(url)
    try:
        org = await new_organization(pool)
        event_id = await subscribe(pool, org, "https://hooks.example.com/call-ended")
        # The dashboard shares the table and does not check URLs the way the API does.
        await pool.execute('UPDATE "Event" SET "webhookUrl" = $2 WHERE "id" = $1', event_id, "https://[::1/hook")
        async with running_engine(url, **{**GIVING_UP_SOON, "allow_private_webhook_urls": False}):
            await emit(pool, org, {"n": 1})
            await eventually(lambda: given_up(pool, org), "the delivery given up")

        row = await pool.fetchrow('SELECT * FROM "WebhookDelivery" WHERE "organizationId" = $1', org)
        assert row is not None
        assert row["lastResponseCode"] is None
        assert row["lastError"].startswith("invalid webhook URL 'https://[::1/hook'")
        attempts = await pool.fetchval('SELECT count(*) FROM "WebhookAttempt" WHERE "organizationId" = $1', org)
        assert attempts == row["attemptCount"] >= 1
    finally:
        await pool.close()


@pytest.mark.parametrize(
    "host",
    ["①②⑦.0.0.1", "\uff11\uff12\uff17\u3002\uff10\u3002\uff10\u3002\uff11"],
    ids=["enclosed-digits", "fullwidth"],
)
async def test_a_loopback_address_spelled_in_other_unicode_digits_is_refused(
    databases: TestDatabases, host: str
) -> None:
    url = await databases.migrated()
    pool = await databases.pool(url)
    try:
        org = await new_organization(pool)
        settings = {**GIVING_UP_SOON, "allow_private_webhook_urls": False}
        async with webhook_receiver() as receiver, running_engine(url, **settings):
            # The HTTP client reads the host through IDNA, which maps these characters to ASCII digits.
            await subscribe(pool, org, receiver.url("spelled").replace("127.0.0.1", host))
            await emit(pool, org, {"n": 1})
            await eventually(lambda: settled(pool, org), "the delivery delivered or given up")

        row = await pool.fetchrow('SELECT * FROM "WebhookDelivery" WHERE "organizationId" = $1', org)
        assert receiver.received == []
        assert row is not None and row["status"] == "FAILED"
        assert "127.0.0.1, which is not a public address" in row["lastError"]
    finally:
        await pool.close()
