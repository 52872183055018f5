"""Fair webhook delivery between organizations: one organization's hanging endpoint or burst of events holds at most
its cap of delivery slots, across every engine process, so other organizations' events still go out.

Each test has a database of its own: which organizations a claim serves depends on everything queued in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from storage.records import new_id
from storage.webhook_outbox import ClaimedDelivery, claim_due, next_due_in, record_success
from tests.databases import TestDatabases
from tests.engine_server import running_engine
from tests.fakes.server import serve
from tests.test_webhook_delivery import FAST_DELIVERY, all_delivered, emit, eventually, new_organization, subscribe
from tests.webhook_receiver import webhook_receiver

LEASE = timedelta(minutes=5)

# Four slots per process, two per organization. A request that hangs ends at the timeout, recorded as a failed
# attempt: before then, no attempt of a hanging organization is logged.
FAIR_DELIVERY: dict[str, Any] = {
    **FAST_DELIVERY,
    "webhook_concurrency": 4,
    "webhook_organization_concurrency": 2,
    "webhook_timeout": 10.0,
    "webhook_lease": 60.0,
}


@dataclass
class HangingReceiver:
    """An endpoint that answers nothing until released: it only notes each POST as it arrives."""

    base_url: str = ""
    arrived: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        """Note the delivery, then hang until released."""
        self.arrived.append(request.headers.get("Dialtone-Delivery", ""))
        await self.release.wait()
        return web.Response(status=200)


@asynccontextmanager
async def hanging_receiver() -> AsyncIterator[HangingReceiver]:
    """A hanging endpoint on 127.0.0.1 for as long as the block runs (its requests are released at the end)."""
    receiver = HangingReceiver()
    app = web.Application()
    app.router.add_post("/{path:.*}", receiver.handle)
    async with serve(app) as base:
        receiver.base_url = base
        try:
            yield receiver
        finally:
            receiver.release.set()


@pytest.fixture
async def fresh(databases: TestDatabases) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """A migrated database of this test's own, and a pool on it."""
    url = await databases.migrated()
    pool = await databases.pool(url)
    try:
        yield url, pool
    finally:
        await pool.close()


async def queue(pool: asyncpg.Pool, organization_id: str, count: int) -> None:
    """Subscribe the organization to call.ended once and queue `count` occurrences."""
    await subscribe(pool, organization_id, f"https://hooks.example.com/{new_id()}")
    for n in range(count):
        await emit(pool, organization_id, {"n": n})


def of(claimed: list[ClaimedDelivery], organization_id: str) -> list[ClaimedDelivery]:
    return [d for d in claimed if d.organization_id == organization_id]


async def attempts_logged(pool: asyncpg.Pool, organization_id: str) -> int:
    count: int = await pool.fetchval(
        'SELECT count(*) FROM "WebhookAttempt" WHERE "organizationId" = $1', organization_id
    )
    return count


async def test_a_claim_takes_no_more_of_an_organizations_deliveries_than_its_cap_and_serves_the_others(
    fresh: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = fresh
    busy, quiet = await new_organization(pool), await new_organization(pool)
    await queue(pool, busy, 10)  # queued first: oldest due
    await queue(pool, quiet, 1)

    first = await claim_due(pool, limit=16, per_organization=2, lease=LEASE)
    # Another process claiming next: the cap counts what every worker holds.
    second = await claim_due(pool, limit=16, per_organization=2, lease=LEASE)

    assert (len(of(first, busy)), len(of(first, quiet))) == (2, 1)
    assert second == []


async def test_an_organization_gets_a_place_back_when_an_outcome_is_recorded_or_a_lease_runs_out(
    fresh: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = fresh
    org = await new_organization(pool)
    await queue(pool, org, 10)
    held = await claim_due(pool, limit=16, per_organization=2, lease=LEASE)

    await record_success(pool, delivery=held[0], response_code=200, duration_ms=1)
    after_outcome = await claim_due(pool, limit=16, per_organization=2, lease=LEASE)
    # Their worker died: its leases run out.
    await pool.execute(
        """
        UPDATE "WebhookDelivery" SET "leasedUntil" = clock_timestamp() - interval '1 hour',
            "nextAttemptAt" = clock_timestamp() - interval '1 hour'
        WHERE "organizationId" = $1 AND "leaseToken" IS NOT NULL
        """,
        org,
    )
    after_expiry = await claim_due(pool, limit=16, per_organization=2, lease=LEASE)

    assert (len(held), len(after_outcome), len(after_expiry)) == (2, 1, 2)
    # The deliveries whose leases ran out come first again, as the oldest due.
    assert {d.id for d in after_expiry} == {held[1].id, after_outcome[0].id}


async def test_concurrent_claims_together_stay_within_an_organizations_cap(fresh: tuple[str, asyncpg.Pool]) -> None:
    _, pool = fresh
    org = await new_organization(pool)
    await queue(pool, org, 30)

    for _ in range(3):
        await asyncio.gather(*(claim_due(pool, limit=5, per_organization=3, lease=LEASE) for _ in range(8)))

    in_flight = await pool.fetchval(
        'SELECT count(*) FROM "WebhookDelivery" WHERE "organizationId" = $1 AND "leaseToken" IS NOT NULL', org
    )
    assert in_flight == 3


async def test_an_organization_at_its_cap_is_not_due_until_its_first_lease_ends(
    fresh: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = fresh
    org = await new_organization(pool)
    await queue(pool, org, 5)
    await claim_due(pool, limit=16, per_organization=2, lease=LEASE)

    at_cap = await next_due_in(pool, per_organization=2)
    under_cap = await next_due_in(pool, per_organization=3)

    # A worker waits for a lease to end (or to be woken) instead of polling for deliveries it may not take.
    assert at_cap is not None and LEASE - timedelta(minutes=1) < at_cap <= LEASE
    assert under_cap is not None and under_cap <= timedelta(0)


@pytest.mark.parametrize("engines", [1, 2], ids=["one engine", "two engines"])
async def test_an_organization_whose_endpoint_hangs_holds_only_its_cap_and_not_another_organizations_event(
    fresh: tuple[str, asyncpg.Pool], engines: int
) -> None:
    url, pool = fresh
    slow, quick = await new_organization(pool), await new_organization(pool)
    async with AsyncExitStack() as running:
        hanging = await running.enter_async_context(hanging_receiver())
        answering = await running.enter_async_context(webhook_receiver())
        for _ in range(engines):  # two engines together send no more of it than its cap
            await running.enter_async_context(running_engine(url, **FAIR_DELIVERY))
        await subscribe(pool, slow, f"{hanging.base_url}/slow")
        await subscribe(pool, quick, answering.url("quick"))
        for n in range(12):  # each one wakes every engine
            await emit(pool, slow, {"n": n})

        async def slow_holds_its_cap() -> bool:
            return len(hanging.arrived) >= 2

        await eventually(slow_holds_its_cap, "the hanging organization's requests arriving")
        await emit(pool, quick, {"n": 0})
        await eventually(lambda: all_delivered(pool, quick, 1), "the other organization's event delivered")

        slow_attempts_ended = await attempts_logged(pool, slow)
        slow_requests = len(hanging.arrived)
        hanging.release.set()
        await eventually(lambda: all_delivered(pool, slow, 12), "the hanging organization's events, once answered")

    # Delivered while every request to the hanging endpoint was still waiting, not after one timed out.
    assert slow_attempts_ended == 0
    assert slow_requests == 2
    assert [r.json["organizationId"] for r in answering.accepted()] == [quick]
    assert sorted(hanging.arrived) == sorted(set(hanging.arrived))  # released, each was sent once
