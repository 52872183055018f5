"""The delivery log's history period in real PostgreSQL: finished deliveries past it go, with their attempts, in
bounded batches that several engine processes may run at once; recent and PENDING ones stay.

Rows are made old by moving their "createdAt" back, as a month-old event would have it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from engine.workers.webhook_delivery import DeliverySettings, WebhookDeliveryWorker
from storage.events import create_event
from storage.organizations import create_organization
from storage.records import new_id
from storage.webhook_outbox import (
    DeliveryRetryPolicy,
    DeliveryStatus,
    WebhookEvent,
    claim_due,
    delete_finished_deliveries,
    enqueue_event,
    record_failure,
    record_success,
)
from tests.databases import TestDatabases

HISTORY = timedelta(days=30)
OLD = timedelta(days=31)
RETRY = DeliveryRetryPolicy(
    initial=timedelta(seconds=30), maximum=timedelta(minutes=2), give_up_after=timedelta(days=90)
)
WAIT_S = 60.0  # a ceiling for slow machines, never a measure of speed


def cutoff() -> datetime:
    """The oldest creation time the log keeps, as the worker computes it."""
    return datetime.now(UTC) - HISTORY


async def organization_with_subscriptions(pool: asyncpg.Pool, count: int) -> str:
    """A new organization with `count` subscriptions to call.ended: one event queues `count` deliveries."""
    organization = await create_organization(pool, name="History", slug=f"history-{new_id()}")
    for _ in range(count):
        await create_event(
            pool,
            organization_id=organization.id,
            name=WebhookEvent.CALL_ENDED,
            webhook_url=f"https://hooks.example.com/{new_id()}",
        )
    return organization.id


async def queue_event(pool: asyncpg.Pool, organization_id: str) -> list[str]:
    """Queue one call.ended for every subscription of the organization; the new deliveries' ids."""
    async with pool.acquire() as conn, conn.transaction():
        before = {r["id"] for r in await conn.fetch(_OWN_IDS, organization_id)}
        await enqueue_event(conn, organization_id=organization_id, event=WebhookEvent.CALL_ENDED, data={"n": 1})
        return [r["id"] for r in await conn.fetch(_OWN_IDS, organization_id) if r["id"] not in before]


_OWN_IDS = 'SELECT "id" FROM "WebhookDelivery" WHERE "organizationId" = $1 ORDER BY "id"'


async def attempt(pool: asyncpg.Pool, delivery_ids: list[str], outcome: DeliveryStatus) -> None:
    """Claim these deliveries and record one attempt each: accepted, refused for a retry, or given up."""
    wanted = set(delivery_ids)
    claimed = await claim_due(pool, limit=1000, per_organization=1000, lease=timedelta(minutes=5))
    mine = [d for d in claimed if d.id in wanted]
    assert {d.id for d in mine} == wanted
    for delivery in mine:
        if outcome is DeliveryStatus.DELIVERED:
            await record_success(pool, delivery=delivery, response_code=200, duration_ms=5)
        else:
            await record_failure(
                pool,
                delivery=delivery,
                response_code=500,
                error="HTTP 500",
                duration_ms=5,
                policy=RETRY,
                jitter=0.0,
                give_up=outcome is DeliveryStatus.FAILED,
            )


async def finished(pool: asyncpg.Pool, organization_id: str, count: int, status: DeliveryStatus) -> list[str]:
    """`count` deliveries of the organization, each attempted once and ended in `status`."""
    ids = await queue_event(pool, organization_id)
    assert len(ids) == count
    await attempt(pool, ids, status)
    return ids


async def backdate(pool: asyncpg.Pool, delivery_ids: list[str], by: timedelta) -> None:
    await pool.execute(
        'UPDATE "WebhookDelivery" SET "createdAt" = "createdAt" - $2::interval WHERE "id" = ANY($1::text[])',
        delivery_ids,
        by,
    )


async def statuses(pool: asyncpg.Pool, organization_id: str) -> dict[str, str]:
    rows = await pool.fetch('SELECT "id", "status" FROM "WebhookDelivery" WHERE "organizationId" = $1', organization_id)
    return {row["id"]: row["status"] for row in rows}


async def attempts_of(pool: asyncpg.Pool, delivery_ids: list[str]) -> int:
    count: int = await pool.fetchval(
        'SELECT count(*) FROM "WebhookAttempt" WHERE "deliveryId" = ANY($1::text[])', delivery_ids
    )
    return count


async def test_finished_deliveries_older_than_the_period_go_with_their_attempts(pool: asyncpg.Pool) -> None:
    org = await organization_with_subscriptions(pool, 2)
    old_delivered = await finished(pool, org, 2, DeliveryStatus.DELIVERED)
    old_failed = await finished(pool, org, 2, DeliveryStatus.FAILED)
    await backdate(pool, old_delivered + old_failed, OLD)
    recent = await finished(pool, org, 2, DeliveryStatus.DELIVERED)
    assert await attempts_of(pool, old_delivered + old_failed) == 4

    deleted = await delete_finished_deliveries(pool, created_before=cutoff())

    assert deleted == 4
    assert await statuses(pool, org) == dict.fromkeys(recent, DeliveryStatus.DELIVERED)
    assert await attempts_of(pool, old_delivered + old_failed) == 0
    assert await attempts_of(pool, recent) == 2


async def test_pending_deliveries_stay_whatever_their_age_and_a_leased_one_goes_once_it_has_its_outcome(
    pool: asyncpg.Pool,
) -> None:
    org = await organization_with_subscriptions(pool, 1)
    [retrying] = await queue_event(pool, org)
    await attempt(pool, [retrying], DeliveryStatus.PENDING)  # refused once, a retry to come
    [leased] = await queue_event(pool, org)
    [claim] = [
        d
        for d in await claim_due(pool, limit=1000, per_organization=1000, lease=timedelta(minutes=5))
        if d.id == leased
    ]
    await backdate(pool, [retrying, leased], timedelta(days=60))

    await delete_finished_deliveries(pool, created_before=cutoff())

    assert await statuses(pool, org) == {retrying: DeliveryStatus.PENDING, leased: DeliveryStatus.PENDING}
    assert await attempts_of(pool, [retrying]) == 1
    assert await record_success(pool, delivery=claim, response_code=200, duration_ms=5) is DeliveryStatus.DELIVERED

    await delete_finished_deliveries(pool, created_before=cutoff())  # finished now, and past the period

    assert await statuses(pool, org) == {retrying: DeliveryStatus.PENDING}


async def test_a_backlog_larger_than_a_batch_is_cleared_in_one_sweep(pool: asyncpg.Pool) -> None:
    org = await organization_with_subscriptions(pool, 7)
    old = await finished(pool, org, 7, DeliveryStatus.DELIVERED)
    await backdate(pool, old, OLD)

    deleted = await delete_finished_deliveries(pool, created_before=cutoff(), batch_size=3)

    assert deleted == 7
    assert await statuses(pool, org) == {}


async def test_two_sweeps_at_once_delete_each_delivery_once_and_keep_the_rest(pool: asyncpg.Pool) -> None:
    org = await organization_with_subscriptions(pool, 20)
    old = await finished(pool, org, 20, DeliveryStatus.DELIVERED)
    await backdate(pool, old, OLD)
    recent = await finished(pool, org, 20, DeliveryStatus.FAILED)

    counts = await asyncio.gather(
        delete_finished_deliveries(pool, created_before=cutoff(), batch_size=2),
        delete_finished_deliveries(pool, created_before=cutoff(), batch_size=2),
    )

    assert sum(counts) == 20
    assert await statuses(pool, org) == dict.fromkeys(recent, DeliveryStatus.FAILED)
    assert await attempts_of(pool, old) == 0


async def test_the_delivery_worker_sweeps_the_history_as_it_starts(databases: TestDatabases) -> None:
    pool = await databases.pool(await databases.migrated())
    worker = WebhookDeliveryWorker(pool, DeliverySettings(history=HISTORY))
    try:
        org = await organization_with_subscriptions(pool, 1)
        old = await finished(pool, org, 1, DeliveryStatus.DELIVERED)
        await backdate(pool, old, OLD)
        recent = await finished(pool, org, 1, DeliveryStatus.DELIVERED)

        worker.start()
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while old[0] in await statuses(pool, org):
            assert asyncio.get_running_loop().time() < deadline, "the worker never swept the history"
            await asyncio.sleep(0.05)

        assert await statuses(pool, org) == dict.fromkeys(recent, DeliveryStatus.DELIVERED)
    finally:
        await worker.stop()
        await pool.close()
