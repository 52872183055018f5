"""Webhook delivery of a `dialtone serve` killed at the worst instant: the receiver has the POST, the engine has not
recorded its answer. The receiver holds its 200; the process is SIGKILLed while it waits, and a new process on the
same database sends the delivery again once the dead one's lease has ended: at least once, never marked without a
2xx, and the retry carries what a receiver deduplicates on (the same `Dialtone-Delivery`, the same body).
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from tests.test_drain_processes import engine
from tests.test_webhook_delivery import all_delivered, emit, eventually, new_organization, statuses, subscribe
from tests.test_webhook_fairness import fresh
from tests.webhook_receiver import webhook_receiver

__all__ = ["fresh"]  # fixture: a database per test

DELIVERY = {
    "DIALTONE_ALLOW_PRIVATE_WEBHOOK_URLS": "true",  # the receiver listens on 127.0.0.1
    "DIALTONE_WEBHOOK_POLL_INTERVAL": "0.5",
    "DIALTONE_WEBHOOK_TIMEOUT": "20",
    "DIALTONE_WEBHOOK_LEASE": "60",
}


async def test_a_delivery_the_receiver_took_from_a_killed_engine_is_sent_again_the_same_and_marked_once(
    fresh: tuple[str, asyncpg.Pool], tmp_path: Path
) -> None:
    database_url, pool = fresh
    organization_id = await new_organization(pool)
    async with webhook_receiver() as receiver:
        await subscribe(pool, organization_id, receiver.url())
        receiver.hold_next = True  # the receiver has the POST; its 200 never reaches the first engine
        await emit(pool, organization_id, {"callLogId": "killed-mid-delivery"})
        async with engine(database_url, tmp_path, drain_seconds=1, **DELIVERY) as doomed:

            async def arrived() -> bool:
                return len(receiver.received) == 1

            await eventually(arrived, "the first POST to reach the receiver")
            doomed.process.kill()  # SIGKILL
            await doomed.process.wait()
        [first] = receiver.received
        receiver.held[first.delivery_id].set()  # its 200 goes to nobody
        assert await statuses(pool, organization_id) == ["PENDING"]  # never marked without the receiver's 2xx
        # The dead engine's lease ends (a minute on).
        await pool.execute(
            """UPDATE "WebhookDelivery" SET "leasedUntil" = now() - interval '1 second',
                   "nextAttemptAt" = now() - interval '1 second' WHERE "organizationId" = $1""",
            organization_id,
        )
        async with engine(database_url, tmp_path, drain_seconds=1, **DELIVERY):
            await eventually(lambda: all_delivered(pool, organization_id, 1), "the delivery sent again and marked")
        [_, again] = receiver.received
    assert again.delivery_id == first.delivery_id and again.body == first.body and again.status == 200
    assert (
        await pool.fetchval('SELECT "attemptCount" FROM "WebhookDelivery" WHERE "organizationId" = $1', organization_id)
        == 1
    )
    assert (
        await pool.fetchval('SELECT count(*) FROM "WebhookAttempt" WHERE "organizationId" = $1', organization_id) == 1
    )
    assert await pool.fetchval('SELECT "triggerCount" FROM "Event" WHERE "organizationId" = $1', organization_id) == 1
