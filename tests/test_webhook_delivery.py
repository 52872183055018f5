"""Webhook delivery through the real engine on loopback: receivers on 127.0.0.1, the outbox in real PostgreSQL.

Events are queued with storage.webhook_outbox.enqueue_event, as the engine's emitters queue them; what is checked
is what a subscriber sees (the POSTs its server accepted) and what the delivery log says.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from storage.agents import create_agent
from storage.events import create_event
from storage.organizations import create_organization
from storage.records import new_id
from storage.webhook_outbox import WebhookEvent, claim_due, enqueue_event, record_success, signing_secret
from tests.databases import TestDatabases
from tests.engine_server import running_engine
from tests.webhook_receiver import webhook_receiver

README = Path(__file__).resolve().parent.parent / "README.md"
WAIT_S = 60.0  # a ceiling for slow machines, never a measure of speed

# Retries come quickly, so a test sees several in moments; the lease stays far above any request's duration.
FAST_DELIVERY: dict[str, Any] = {
    "allow_private_webhook_urls": True,  # the receivers listen on 127.0.0.1
    "webhook_retry_initial": 0.05,
    "webhook_retry_max": 0.2,
    "webhook_poll_interval": 0.5,
    "webhook_timeout": 20.0,
    "webhook_lease": 60.0,
}


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until `check()` holds; fail naming `what` if it never does."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {WAIT_S:g} s")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    """The engine, delivering this module's database's webhooks."""
    async with running_engine(db_url, **FAST_DELIVERY) as base:
        yield base


async def new_organization(pool: asyncpg.Pool) -> str:
    organization = await create_organization(pool, name="Hooks", slug=f"hooks-{new_id()}")
    return organization.id


async def subscribe(
    pool: asyncpg.Pool, organization_id: str, url: str, *, agent_id: str | None = None, enabled: bool = True
) -> str:
    event = await create_event(
        pool, organization_id=organization_id, name="call.ended", webhook_url=url, agent_id=agent_id, is_enabled=enabled
    )
    return event.id


async def emit(pool: asyncpg.Pool, organization_id: str, data: dict[str, Any], agent_id: str | None = None) -> int:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue_event(
            conn, organization_id=organization_id, event=WebhookEvent.CALL_ENDED, data=data, agent_id=agent_id
        )


async def statuses(pool: asyncpg.Pool, organization_id: str) -> list[str]:
    rows = await pool.fetch('SELECT "status" FROM "WebhookDelivery" WHERE "organizationId" = $1', organization_id)
    return [row["status"] for row in rows]


async def all_delivered(pool: asyncpg.Pool, organization_id: str, count: int) -> bool:
    return await statuses(pool, organization_id) == ["DELIVERED"] * count


async def trigger_count(pool: asyncpg.Pool, event_id: str) -> int:
    count: int = await pool.fetchval('SELECT "triggerCount" FROM "Event" WHERE "id" = $1', event_id)
    return count


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def readme_verifier() -> Callable[[str, str, bytes], bool]:
    """`verify_signature` as the README's Webhooks section defines it, executed from the README itself."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Webhooks\n") :]
    section = section[: section.index("\n## ", 1)]
    [snippet] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "README.md (Webhooks)", "exec"), namespace)  # noqa: S102 -- the README's own snippet
    verify: Callable[[str, str, bytes], bool] = namespace["verify_signature"]
    return verify


async def test_a_receiver_failing_twice_then_succeeding_accepts_each_event_exactly_once(
    engine: str, pool: asyncpg.Pool
) -> None:
    org = await new_organization(pool)
    async with webhook_receiver(fail_first=2) as receiver:
        event_id = await subscribe(pool, org, receiver.url("flaky"))
        for n in range(5):
            assert await emit(pool, org, {"n": n}) == 1

        await eventually(lambda: all_delivered(pool, org, 5), "every delivery accepted")

        accepted = receiver.accepted_ids()
        assert len(accepted) == 5 and set(accepted.values()) == {1}
        assert sorted(r.json["data"]["n"] for r in receiver.accepted()) == list(range(5))
        assert all(receiver.attempts_of(r.delivery_id) == 3 for r in receiver.accepted())
    rows = await pool.fetch(
        """
        SELECT d."attemptCount", d."lastResponseCode", d."lastError", array_agg(a."responseCode" ORDER BY a."attempt")
            AS codes
        FROM "WebhookDelivery" d JOIN "WebhookAttempt" a ON a."deliveryId" = d."id"
        WHERE d."organizationId" = $1 GROUP BY d."id"
        """,
        org,
    )
    assert [(r["attemptCount"], r["lastResponseCode"], r["lastError"], r["codes"]) for r in rows] == [
        (3, 200, None, [503, 503, 200])
    ] * 5
    assert await trigger_count(pool, event_id) == 5


async def test_a_receiver_down_for_the_whole_test_leaves_its_events_pending_and_none_lost(
    engine: str, pool: asyncpg.Pool
) -> None:
    org = await new_organization(pool)
    event_id = await subscribe(pool, org, f"http://127.0.0.1:{unused_port()}/down")
    for n in range(3):
        await emit(pool, org, {"n": n})

    async def each_tried_three_times() -> bool:
        counts = await pool.fetch(
            'SELECT "attemptCount" FROM "WebhookDelivery" WHERE "organizationId" = $1 AND "attemptCount" >= 3', org
        )
        return len(counts) == 3

    await eventually(each_tried_three_times, "three attempts of each delivery")

    rows = await pool.fetch('SELECT * FROM "WebhookDelivery" WHERE "organizationId" = $1', org)
    assert sorted(row["payload"]["data"]["n"] for row in rows) == [0, 1, 2]
    assert {row["status"] for row in rows} == {"PENDING"}
    assert all(row["lastResponseCode"] is None and "Cannot connect" in row["lastError"] for row in rows)
    attempts = await pool.fetch('SELECT "responseCode", "error" FROM "WebhookAttempt" WHERE "organizationId" = $1', org)
    assert len(attempts) >= 9
    assert all(a["responseCode"] is None and a["error"] for a in attempts)
    assert await trigger_count(pool, event_id) == 0


async def test_deliveries_are_signed_as_the_readme_says_and_its_snippet_verifies_them(
    engine: str, pool: asyncpg.Pool
) -> None:
    verify_signature = readme_verifier()
    org = await new_organization(pool)
    async with webhook_receiver() as receiver:
        await subscribe(pool, org, receiver.url("signed"))
        await emit(pool, org, {"transcript": "Caller: café, s'il vous plaît", "duration": 12})
        await emit(pool, org, {"transcript": None})
        await eventually(lambda: all_delivered(pool, org, 2), "both deliveries accepted")
    secret = await signing_secret(pool, organization_id=org)
    other_secret = await signing_secret(pool, organization_id=await new_organization(pool))

    received = receiver.accepted()
    assert len(received) == 2
    for request in received:
        assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", request.signature)
        assert verify_signature(secret, request.signature, request.body)
        assert not verify_signature(secret, request.signature, request.body.replace(b"}", b" }", 1))
        assert not verify_signature(other_secret, request.signature, request.body)
        assert (request.event, request.user_agent) == ("call.ended", "Dialtone-Webhooks/1.0")
        assert request.json["type"] == "call.ended" and request.json["organizationId"] == org
    assert received[0].json["data"]["transcript"] in {"Caller: café, s'il vous plaît", None}
    assert secret not in str(received)


async def test_disabled_events_are_skipped_and_agent_events_reach_only_that_agents_subscriptions(
    engine: str, pool: asyncpg.Pool
) -> None:
    org = await new_organization(pool)
    agent = (await create_agent(pool, organization_id=org, name="Ava")).id
    other_agent = (await create_agent(pool, organization_id=org, name="Bo")).id
    async with webhook_receiver() as receiver:
        org_wide = await subscribe(pool, org, receiver.url("org"))
        disabled = await subscribe(pool, org, receiver.url("disabled"), enabled=False)
        own = await subscribe(pool, org, receiver.url("own"), agent_id=agent)
        others = await subscribe(pool, org, receiver.url("others"), agent_id=other_agent)

        assert await emit(pool, org, {"callLogId": "c1"}, agent_id=agent) == 2
        assert await emit(pool, org, {"callLogId": "c2"}) == 1
        await eventually(lambda: all_delivered(pool, org, 3), "three deliveries accepted")

    assert sorted((r.path, r.json["data"]["callLogId"]) for r in receiver.received) == [
        ("/org", "c1"),
        ("/org", "c2"),
        ("/own", "c1"),
    ]
    counts = [await trigger_count(pool, event_id) for event_id in (org_wide, disabled, own, others)]
    assert counts == [2, 0, 1, 0]


async def test_a_redirect_is_a_failed_attempt_and_is_not_followed(engine: str, pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    async with webhook_receiver() as receiver:
        receiver.redirect_to = receiver.url("elsewhere")
        await subscribe(pool, org, receiver.url("moved"))
        await emit(pool, org, {"n": 1})

        async def tried_twice() -> bool:
            attempts = await pool.fetchval(
                'SELECT "attemptCount" FROM "WebhookDelivery" WHERE "organizationId" = $1', org
            )
            return bool(attempts is not None and attempts >= 2)

        await eventually(tried_twice, "two attempts")

    row = await pool.fetchrow('SELECT * FROM "WebhookDelivery" WHERE "organizationId" = $1', org)
    assert row is not None
    assert (row["status"], row["lastResponseCode"]) == ("PENDING", 307)
    assert {r.path for r in receiver.received} == {"/moved"}


async def test_addresses_on_private_networks_are_refused_without_the_setting(databases: TestDatabases) -> None:
    url = await databases.migrated()
    pool = await databases.pool(url)
    try:
        org = await new_organization(pool)
        settings = {**FAST_DELIVERY, "allow_private_webhook_urls": False}
        async with webhook_receiver() as receiver, running_engine(url, **settings):
            literal = await subscribe(pool, org, receiver.url("literal"))
            named = await subscribe(pool, org, receiver.url("named").replace("127.0.0.1", "localhost"))
            await emit(pool, org, {"n": 1})

            async def both_refused_twice() -> bool:
                tried = await pool.fetchval(
                    'SELECT count(*) FROM "WebhookDelivery" WHERE "organizationId" = $1 AND "attemptCount" >= 2', org
                )
                return bool(tried == 2)

            await eventually(both_refused_twice, "two refused attempts of each delivery")

        rows = await pool.fetch(
            'SELECT "eventId", "status", "lastError" FROM "WebhookDelivery" WHERE "organizationId" = $1', org
        )
        errors = {row["eventId"]: row["lastError"] for row in rows}
        assert receiver.received == []
        assert {row["status"] for row in rows} == {"PENDING"}
        assert "127.0.0.1 is not a public address" in errors[literal]
        assert "localhost resolves to" in errors[named] and "not a public address" in errors[named]
        assert all("DIALTONE_ALLOW_PRIVATE_WEBHOOK_URLS" in error for error in errors.values())
    finally:
        await pool.close()


async def test_two_engines_never_deliver_a_leased_delivery_twice(databases: TestDatabases) -> None:
    url = await databases.migrated()
    pool = await databases.pool(url)
    try:
        org = await new_organization(pool)
        async with (
            webhook_receiver() as receiver,
            running_engine(url, **FAST_DELIVERY),
            running_engine(url, **FAST_DELIVERY),
        ):
            await subscribe(pool, org, receiver.url("shared"))
            receiver.hold_next = True
            await emit(pool, org, {"n": "held"})

            async def one_arrived() -> bool:
                return len(receiver.received) == 1

            await eventually(one_arrived, "the first delivery arriving")
            [held] = receiver.received
            for n in range(8):
                await emit(pool, org, {"n": n})

            async def others_accepted() -> bool:
                return len([r for r in receiver.accepted() if r.delivery_id != held.delivery_id]) == 8

            # Both engines keep claiming while the first delivery is held; neither may take it again.
            await eventually(others_accepted, "the later deliveries accepted")
            assert receiver.attempts_of(held.delivery_id) == 1
            receiver.held[held.delivery_id].set()
            await eventually(lambda: all_delivered(pool, org, 9), "all nine delivered")

        assert receiver.attempts_of(held.delivery_id) == 1
        assert sorted(receiver.accepted_ids().values()) == [1] * 9
        assert await pool.fetchval('SELECT count(*) FROM "WebhookAttempt" WHERE "organizationId" = $1', org) == 9
    finally:
        await pool.close()


async def test_a_lease_left_by_a_process_that_died_expires_and_another_engine_delivers(
    databases: TestDatabases,
) -> None:
    url = await databases.migrated()
    pool = await databases.pool(url)
    try:
        org = await new_organization(pool)
        async with webhook_receiver() as receiver:
            event_id = await subscribe(pool, org, receiver.url("orphaned"))
            await emit(pool, org, {"n": 1})
            # A process claims it and dies before posting: only its lease remains.
            [orphaned] = await claim_due(pool, limit=10, per_organization=1, lease=timedelta(seconds=1))
            async with running_engine(url, **FAST_DELIVERY):
                await eventually(lambda: all_delivered(pool, org, 1), "the orphaned delivery delivered")

            # Its outcome, had it lived to record one, would no longer count.
            assert await record_success(pool, delivery=orphaned, response_code=200, duration_ms=1) is None

        assert len(receiver.received) == 1
        assert receiver.received[0].delivery_id == orphaned.id
        assert await trigger_count(pool, event_id) == 1
    finally:
        await pool.close()


async def test_a_committed_event_wakes_the_worker_without_waiting_for_its_next_poll(databases: TestDatabases) -> None:
    url = await databases.migrated()
    pool = await databases.pool(url)
    try:
        org = await new_organization(pool)
        # Poll interval and lease far beyond the test's patience: only the notification can bring the second
        # delivery in time.
        settings = {**FAST_DELIVERY, "webhook_poll_interval": 3600.0, "webhook_lease": 3600.0}
        async with webhook_receiver() as receiver, running_engine(url, **settings):
            await subscribe(pool, org, receiver.url("notified"))

            async def listening() -> bool:
                sessions = await pool.fetchval(
                    """
                    SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND query ILIKE 'LISTEN %dialtone_webhooks%'
                    """
                )
                return bool(sessions == 1)

            await eventually(listening, "the worker listening")
            await emit(pool, org, {"n": 1})  # may be found by the worker's first look, made as it began listening
            await eventually(lambda: all_delivered(pool, org, 1), "the first delivery")
            await emit(pool, org, {"n": 2})
            await eventually(lambda: all_delivered(pool, org, 2), "the second delivery, woken by NOTIFY")

        assert sorted(r.json["data"]["n"] for r in receiver.accepted()) == [1, 2]
    finally:
        await pool.close()
