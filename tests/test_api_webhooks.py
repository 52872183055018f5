"""Webhooks through /v1: subscribing (event names and addresses checked), the delivery log with the receiver's
response codes, and the signing secret, against the real engine delivering to a receiver on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from storage.webhook_outbox import WebhookEvent, enqueue_event
from tests.engine_server import running_engine
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_webhook_delivery import FAST_DELIVERY, eventually
from tests.webhook_receiver import webhook_receiver


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    async with running_engine(db_url, **FAST_DELIVERY) as base:
        yield base


@pytest.fixture
async def api(engine: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine)


@pytest.fixture(scope="module")
async def tenant(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Hooked")


async def test_the_delivery_log_shows_each_attempt_and_the_receivers_codes(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    async with webhook_receiver(fail_first=1) as receiver:
        status, event = await api.call(
            "POST", "/events", tenant.owner_key, json={"name": "call.ended", "webhookUrl": receiver.url()}
        )
        assert status == 201, event
        async with pool.acquire() as conn, conn.transaction():
            await enqueue_event(
                conn, organization_id=tenant.organization_id, event=WebhookEvent.CALL_ENDED, data={"callLogId": "c1"}
            )

        async def delivered() -> bool:
            _, page = await api.call("GET", f"/events/{event['id']}/deliveries", tenant.owner_key)
            return bool(page["data"]) and page["data"][0]["status"] == "DELIVERED"

        await eventually(delivered, "the delivery to succeed")
        _, page = await api.call("GET", "/webhook-deliveries?status=DELIVERED", tenant.viewer_key)
        [delivery] = page["data"]
        assert delivery["eventId"] == event["id"] and delivery["lastResponseCode"] == 200
        status, detail = await api.call("GET", f"/webhook-deliveries/{delivery['id']}", tenant.viewer_key)
        assert status == 200
        assert [attempt["responseCode"] for attempt in detail["attempts"]] == [503, 200]

        status, secret = await api.call("GET", "/webhook-signing-secret", tenant.owner_key)
        assert status == 200
        [accepted] = receiver.accepted()
        fields = dict(part.split("=", 1) for part in accepted.signature.split(","))
        expected = hmac.new(secret["secret"].encode(), f"{fields['t']}.".encode() + accepted.body, hashlib.sha256)
        assert hmac.compare_digest(fields["v1"], expected.hexdigest())

    status, _ = await api.call("GET", "/webhook-signing-secret", tenant.viewer_key)
    assert status == 403
    other = await make_tenant(pool, "Stranger")
    status, _ = await api.call("GET", f"/webhook-deliveries/{delivery['id']}", other.owner_key)
    assert status == 404
    status, _ = await api.call("GET", f"/events/{event['id']}/deliveries", other.owner_key)
    assert status == 404


async def test_unknown_event_names_are_refused(api: Api, tenant: Tenant) -> None:
    status, body = await api.call(
        "POST", "/events", tenant.owner_key, json={"name": "call.completed", "webhookUrl": "https://hooks.example/x"}
    )
    assert status == 422 and body["error"]["field"] == "name"


async def test_private_addresses_are_refused_unless_the_engine_allows_them(db_url: str, tenant: Tenant) -> None:
    async with running_engine(db_url) as base, aiohttp.ClientSession() as session:
        api = Api(session, base)
        for url in ("http://127.0.0.1:9/hook", "http://10.0.0.7/hook", "http://[::1]/hook", "http://localhost/x"):
            status, body = await api.call(
                "POST", "/events", tenant.owner_key, json={"name": "call.ended", "webhookUrl": url}
            )
            assert (status, body["error"]["field"]) == (422, "webhookUrl"), url
        status, _ = await api.call(
            "POST", "/events", tenant.owner_key, json={"name": "call.ended", "webhookUrl": "https://hooks.example/y"}
        )
        assert status == 201
