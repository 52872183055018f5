"""The webhook outbox in PostgreSQL: what enqueue_event queues, how claims, leases and outcomes behave."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from storage.agents import create_agent
from storage.call_logs import create_call_log, finalize_call_log
from storage.enums import CallStatus, CallType
from storage.errors import InvalidReference
from storage.events import create_event, set_event_enabled
from storage.organizations import create_organization
from storage.records import new_id
from storage.tenancy import tenant_transaction
from storage.webhook_outbox import (
    ClaimedDelivery,
    DeliveryRetryPolicy,
    DeliveryStatus,
    UnknownWebhookEvent,
    WebhookEvent,
    claim_due,
    enqueue_event,
    get_delivery,
    list_attempts,
    list_deliveries,
    next_due_in,
    record_failure,
    record_success,
    signing_secret,
)

HOOK = "https://hooks.example.com/dialtone"
UNCAPPED = 1000  # per_organization for tests of something else than fairness
FAST = DeliveryRetryPolicy(
    initial=timedelta(seconds=30), maximum=timedelta(seconds=120), give_up_after=timedelta(hours=24)
)


async def new_organization(pool: asyncpg.Pool) -> str:
    organization = await create_organization(pool, name="Acme", slug=f"acme-{new_id()}")
    return organization.id


async def new_agent(pool: asyncpg.Pool, organization_id: str) -> str:
    agent = await create_agent(pool, organization_id=organization_id, name="Ava")
    return agent.id


async def subscribe(
    pool: asyncpg.Pool, organization_id: str, name: str, *, agent_id: str | None = None, enabled: bool = True
) -> str:
    event = await create_event(
        pool,
        organization_id=organization_id,
        name=name,
        webhook_url=f"{HOOK}/{new_id()}",
        agent_id=agent_id,
        is_enabled=enabled,
    )
    return event.id


async def enqueue(pool: asyncpg.Pool, organization_id: str, event: str, agent_id: str | None = None) -> int:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue_event(
            conn, organization_id=organization_id, event=WebhookEvent(event), data={"n": 1}, agent_id=agent_id
        )


async def claim_own(pool: asyncpg.Pool, organization_id: str, *, lease: timedelta) -> list[ClaimedDelivery]:
    """Claim every due delivery (the module's database is shared), keeping those of `organization_id`."""
    claimed = await claim_due(pool, limit=1000, per_organization=UNCAPPED, lease=lease)
    return [d for d in claimed if d.organization_id == organization_id]


async def make_due(pool: asyncpg.Pool, organization_id: str) -> None:
    """Make the organization's pending deliveries due now (a second back: timestamps are rounded to the ms)."""
    await pool.execute(
        """
        UPDATE "WebhookDelivery" SET "nextAttemptAt" = clock_timestamp() - interval '1 s'
        WHERE "organizationId" = $1 AND "status" = 'PENDING'
        """,
        organization_id,
    )


async def due_count(pool: asyncpg.Pool, organization_id: str) -> int:
    count: int = await pool.fetchval(
        """
        SELECT count(*) FROM "WebhookDelivery"
        WHERE "organizationId" = $1 AND "status" = 'PENDING' AND "nextAttemptAt" <= clock_timestamp()
        """,
        organization_id,
    )
    return count


async def queued_event_ids(pool: asyncpg.Pool, organization_id: str) -> list[str]:
    rows = await pool.fetch(
        'SELECT "eventId" FROM "WebhookDelivery" WHERE "organizationId" = $1 ORDER BY "eventId"', organization_id
    )
    return [row["eventId"] for row in rows]


async def test_an_event_is_queued_for_each_enabled_subscription_of_the_organization_and_the_agent(
    pool: asyncpg.Pool,
) -> None:
    org = await new_organization(pool)
    agent, other_agent = await new_agent(pool, org), await new_agent(pool, org)
    org_wide = await subscribe(pool, org, "call.ended")
    own = await subscribe(pool, org, "call.ended", agent_id=agent)
    await subscribe(pool, org, "call.ended", agent_id=other_agent)
    await subscribe(pool, org, "call.ended", enabled=False)
    await subscribe(pool, org, "call.started")
    await subscribe(pool, await new_organization(pool), "call.ended")

    queued = await enqueue(pool, org, "call.ended", agent_id=agent)

    assert queued == 2
    assert await queued_event_ids(pool, org) == sorted([org_wide, own])
    rows = await pool.fetch('SELECT * FROM "WebhookDelivery" WHERE "organizationId" = $1', org)
    assert {row["occurrenceId"] for row in rows} == {rows[0]["payload"]["id"]}
    assert all(row["status"] == "PENDING" and row["attemptCount"] == 0 for row in rows)
    assert rows[0]["payload"]["type"] == "call.ended"
    assert rows[0]["payload"]["data"] == {"n": 1}


async def test_an_event_without_an_agent_reaches_only_organization_wide_subscriptions(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    org_wide = await subscribe(pool, org, "campaign.started")
    await subscribe(pool, org, "campaign.started", agent_id=await new_agent(pool, org))

    assert await enqueue(pool, org, "campaign.started") == 1
    assert await queued_event_ids(pool, org) == [org_wide]


async def test_nothing_is_queued_when_nobody_subscribes(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)

    assert await enqueue(pool, org, "transcript.updated") == 0
    assert await queued_event_ids(pool, org) == []


async def test_deliveries_exist_only_if_the_callers_transaction_commits(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    await subscribe(pool, org, "call.ended")

    with pytest.raises(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            assert await enqueue_event(conn, organization_id=org, event=WebhookEvent.CALL_ENDED, data={}) == 1
            raise RuntimeError("the change being reported failed")

    assert await queued_event_ids(pool, org) == []


async def test_unknown_events_and_data_that_is_not_json_are_refused(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    await subscribe(pool, org, "call.ended")

    with pytest.raises(UnknownWebhookEvent, match=r"'call\.finished'"):
        await enqueue_event(pool, organization_id=org, event="call.finished", data={})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="object"):
        await enqueue_event(pool, organization_id=org, event=WebhookEvent.CALL_ENDED, data={"x": object()})
    assert await queued_event_ids(pool, org) == []


async def test_ending_a_call_queues_call_ended_with_the_call_once(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    agent = await new_agent(pool, org)
    await subscribe(pool, org, "call.ended")
    call = await create_call_log(
        pool,
        organization_id=org,
        call_type=CallType.INBOUND,
        call_id=f"CA{new_id()}",
        agent_id=agent,
        phone_number="+15550001111",
        metadata={"to": "+15550002222"},
    )

    for _ in range(2):  # ending it again changes nothing and queues nothing
        await finalize_call_log(
            pool,
            organization_id=org,
            call_log_id=call.id,
            status=CallStatus.COMPLETED,
            duration=42,
            metadata={"endReason": "caller_hung_up"},
        )

    payloads = await pool.fetch('SELECT "payload" FROM "WebhookDelivery" WHERE "organizationId" = $1', org)
    assert len(payloads) == 1
    data = payloads[0]["payload"]["data"]
    assert data["callLogId"] == call.id
    assert (data["status"], data["endReason"], data["duration"]) == ("COMPLETED", "caller_hung_up", 42)
    assert (data["from"], data["to"], data["callType"], data["agentId"]) == (
        "+15550001111",
        "+15550002222",
        "INBOUND",
        agent,
    )


async def test_concurrent_claims_never_share_a_delivery(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    await subscribe(pool, org, "call.ended")
    for _ in range(20):
        await enqueue(pool, org, "call.ended")

    ids: list[str] = []
    # Claims that find the organization taken by another skip it, as they skip its rows: claim in rounds.
    while await due_count(pool, org):
        claims = await asyncio.gather(
            *(claim_due(pool, limit=3, per_organization=UNCAPPED, lease=timedelta(minutes=5)) for _ in range(10))
        )
        ids += [d.id for claim in claims for d in claim if d.organization_id == org]

    assert len(ids) == len(set(ids)) == 20


async def test_a_claimed_delivery_is_claimed_again_only_after_its_lease_ends(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    await subscribe(pool, org, "call.ended")
    await enqueue(pool, org, "call.ended")
    [held] = await claim_own(pool, org, lease=timedelta(minutes=5))
    assert await claim_own(pool, org, lease=timedelta(minutes=5)) == []

    await make_due(pool, org)  # the holder died: its lease runs out
    [taken] = await claim_own(pool, org, lease=timedelta(minutes=5))

    assert taken.id == held.id
    assert taken.lease_token != held.lease_token
    assert await record_success(pool, delivery=held, response_code=200, duration_ms=5) is None
    assert await record_success(pool, delivery=taken, response_code=204, duration_ms=5) is DeliveryStatus.DELIVERED
    attempts = await list_attempts(pool, organization_id=org, delivery_id=held.id)
    assert [(a.attempt, a.response_code) for a in attempts] == [(1, 204)]


async def test_success_marks_the_delivery_and_counts_a_trigger_of_its_event(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    event_id = await subscribe(pool, org, "call.ended")
    await enqueue(pool, org, "call.ended")
    [claimed] = await claim_own(pool, org, lease=timedelta(minutes=5))

    status = await record_success(pool, delivery=claimed, response_code=202, duration_ms=12)

    delivery = await get_delivery(pool, organization_id=org, delivery_id=claimed.id)
    assert status is DeliveryStatus.DELIVERED
    assert (delivery.status, delivery.attempt_count, delivery.last_response_code) == ("DELIVERED", 1, 202)
    assert delivery.delivered_at is not None and delivery.leased_until is None
    assert await pool.fetchval('SELECT "triggerCount" FROM "Event" WHERE "id" = $1', event_id) == 1


async def test_failures_back_off_exponentially_and_are_logged(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    event_id = await subscribe(pool, org, "call.ended")
    await enqueue(pool, org, "call.ended")
    waits = []
    for _ in range(4):
        await make_due(pool, org)  # without waiting out the backoff
        [claimed] = await claim_own(pool, org, lease=timedelta(minutes=5))
        status = await record_failure(
            pool, delivery=claimed, response_code=503, error="HTTP 503", duration_ms=3, policy=FAST, jitter=1.0
        )
        assert status is DeliveryStatus.PENDING
        waits.append(
            await pool.fetchval(
                'SELECT "nextAttemptAt" - "updatedAt" FROM "WebhookDelivery" WHERE "id" = $1', claimed.id
            )
        )

    rounded = [round(wait.total_seconds()) for wait in waits]
    assert rounded == [30, 60, 120, 120]
    attempts = await list_attempts(pool, organization_id=org, delivery_id=claimed.id)
    assert [(a.attempt, a.response_code, a.error) for a in attempts] == [(n, 503, "HTTP 503") for n in range(1, 5)]
    assert await pool.fetchval('SELECT "triggerCount" FROM "Event" WHERE "id" = $1', event_id) == 0


async def test_jitter_shortens_the_wait_to_no_less_than_half(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    await subscribe(pool, org, "call.ended")
    await enqueue(pool, org, "call.ended")
    [claimed] = await claim_own(pool, org, lease=timedelta(minutes=5))

    await record_failure(pool, delivery=claimed, response_code=None, error="x", duration_ms=1, policy=FAST, jitter=0.0)

    wait = await pool.fetchval(
        'SELECT "nextAttemptAt" - "updatedAt" FROM "WebhookDelivery" WHERE "id" = $1', claimed.id
    )
    assert round(wait.total_seconds()) == 15


async def test_a_delivery_is_given_up_once_its_next_attempt_would_pass_the_deadline(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    await subscribe(pool, org, "call.ended")
    await enqueue(pool, org, "call.ended")
    [claimed] = await claim_own(pool, org, lease=timedelta(minutes=5))
    short = DeliveryRetryPolicy(
        initial=timedelta(minutes=1), maximum=timedelta(minutes=1), give_up_after=timedelta(seconds=30)
    )

    status = await record_failure(
        pool, delivery=claimed, response_code=500, error="HTTP 500", duration_ms=1, policy=short, jitter=1.0
    )

    assert status is DeliveryStatus.FAILED
    assert await claim_own(pool, org, lease=timedelta(minutes=5)) == []
    [failed] = await list_deliveries(pool, organization_id=org, status=DeliveryStatus.FAILED)
    assert (failed.id, failed.last_error, failed.attempt_count) == (claimed.id, "HTTP 500", 1)


async def test_a_disabled_subscription_is_given_up_at_once(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    event_id = await subscribe(pool, org, "call.ended")
    await enqueue(pool, org, "call.ended")
    await set_event_enabled(pool, organization_id=org, event_id=event_id, enabled=False)
    [claimed] = await claim_own(pool, org, lease=timedelta(minutes=5))

    status = await record_failure(
        pool, delivery=claimed, response_code=None, error="disabled", duration_ms=0, policy=FAST, jitter=1, give_up=True
    )

    assert claimed.subscription_enabled is False
    assert status is DeliveryStatus.FAILED


async def test_the_delivery_log_pages_newest_first_and_filters_by_subscription(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    first = await subscribe(pool, org, "call.ended")
    second = await subscribe(pool, org, "call.ended")
    for _ in range(3):
        await enqueue(pool, org, "call.ended")

    page = await list_deliveries(pool, organization_id=org, limit=4)
    rest = await list_deliveries(pool, organization_id=org, before=(page[-1].created_at, page[-1].id))
    only_first = await list_deliveries(pool, organization_id=org, event_id=first)

    assert len(page) == 4 and len(rest) == 2
    everything = page + rest
    assert [(d.created_at, d.id) for d in everything] == sorted(
        ((d.created_at, d.id) for d in everything), reverse=True
    )
    assert {d.event_id for d in only_first} == {first} and len(only_first) == 3
    assert {d.event_id for d in everything} == {first, second}
    with pytest.raises(ValueError, match="limit"):
        await list_deliveries(pool, organization_id=org, limit=0)


async def test_the_api_role_sees_only_its_organizations_deliveries(pool: asyncpg.Pool) -> None:
    mine, theirs = await new_organization(pool), await new_organization(pool)
    await subscribe(pool, mine, "call.ended")
    await subscribe(pool, theirs, "call.ended")
    await enqueue(pool, mine, "call.ended")
    await enqueue(pool, theirs, "call.ended")

    async with tenant_transaction(pool, mine) as conn:
        visible = await conn.fetch('SELECT "organizationId" FROM "WebhookDelivery"')
        unscoped = await list_deliveries(conn, organization_id=theirs)

    assert {row["organizationId"] for row in visible} == {mine}
    assert unscoped == []


async def test_each_organization_has_one_stable_signing_secret(pool: asyncpg.Pool) -> None:
    org, other = await new_organization(pool), await new_organization(pool)

    secrets = await asyncio.gather(*(signing_secret(pool, organization_id=org) for _ in range(5)))

    assert len(set(secrets)) == 1
    assert secrets[0].startswith("whsec_") and len(secrets[0]) > 40
    assert await signing_secret(pool, organization_id=org) == secrets[0]
    assert await signing_secret(pool, organization_id=other) != secrets[0]
    with pytest.raises(InvalidReference):
        await signing_secret(pool, organization_id="no-such-organization")


async def test_next_due_in_reports_the_soonest_pending_delivery(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    await subscribe(pool, org, "call.ended")
    await enqueue(pool, org, "call.ended")

    due_in = await next_due_in(pool, per_organization=UNCAPPED)

    assert due_in is not None and due_in <= timedelta(0)


async def test_the_api_role_can_queue_events_for_its_own_organization(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool)
    event_id = await subscribe(pool, org, "campaign.completed")

    async with tenant_transaction(pool, org) as conn:
        queued = await enqueue_event(
            conn, organization_id=org, event=WebhookEvent.CAMPAIGN_COMPLETED, data={"campaignId": "k"}
        )

    assert queued == 1
    assert await queued_event_ids(pool, org) == [event_id]
