"""Credit reservations: calls hold their next minute before using it, pay by plan, and no balance goes below zero."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

import asyncpg
import pytest

from engine.call.call_log_writer import CallLogWriter
from storage import agents, call_logs, credit_reservations, organizations
from storage.call_logs import CallLog
from storage.enums import CallStatus, CallType, Plan
from storage.errors import NotFound
from storage.organizations import InsufficientCredits
from storage.records import new_id
from tests.test_call_log_writer import completed

RATES = {"free": 1, "pro": 2, "enterprise": 3}


async def new_organization(pool: asyncpg.Pool, *, credits: int, plan: Plan = Plan.FREE) -> str:
    """A new organization on `plan` holding `credits`; its id."""
    org = await organizations.create_organization(
        pool, name="Billing", slug=f"billing-{new_id()}", plan=plan, credits=credits
    )
    return org.id


async def open_paid_call(pool: asyncpg.Pool, organization_id: str) -> CallLog:
    """A call that starts now, its first minute reserved at RATES (InsufficientCredits if it cannot be)."""
    return await call_logs.create_call_log(
        pool,
        organization_id=organization_id,
        call_type=CallType.INBOUND,
        call_id=f"CA{new_id()}",
        credit_rates=RATES,
    )


async def balance(pool: asyncpg.Pool, organization_id: str) -> int:
    """The organization's credits now."""
    return (await organizations.get_organization(pool, organization_id=organization_id)).credits


async def finish(pool: asyncpg.Pool, call: CallLog, duration_s: float) -> None:
    """End the call the way its media session does, after `duration_s`."""
    writer = CallLogWriter(
        pool, organization_id=call.organization_id, call_log_id=call.id, agent_id=None, node_id="node-a"
    )
    await writer.finish(completed(duration_s))


async def test_twenty_calls_racing_for_three_minutes_of_credit_open_exactly_three(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=7, plan=Plan.PRO)  # 2 a minute: three first minutes, one left

    results = await asyncio.gather(*(open_paid_call(pool, org) for _ in range(20)), return_exceptions=True)

    opened = [result for result in results if isinstance(result, CallLog)]
    refused = [result for result in results if isinstance(result, InsufficientCredits)]
    assert (len(opened), len(refused)) == (3, 17)
    assert await balance(pool, org) == 1
    assert await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "organizationId" = $1', org) == 3

    await asyncio.gather(*(finish(pool, call, 42) for call in opened))

    assert await balance(pool, org) == 7 - 3 * RATES["pro"]
    held = [call.id for call in opened]
    assert await pool.fetchval('SELECT count(*) FROM "CreditReservation" WHERE "callLogId" = ANY($1)', held) == 0


async def test_a_refused_call_leaves_no_call_log_and_says_what_the_balance_lacks(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=2, plan=Plan.ENTERPRISE)

    with pytest.raises(InsufficientCredits) as raised:
        await open_paid_call(pool, org)

    assert (raised.value.balance, raised.value.amount) == (2, RATES["enterprise"])
    assert await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "organizationId" = $1', org) == 0
    assert await balance(pool, org) == 2


async def test_a_running_call_extends_its_reservation_a_minute_at_its_plans_rate(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=5, plan=Plan.PRO)
    call = await open_paid_call(pool, org)

    assert await credit_reservations.extend_reservation(pool, call_log_id=call.id)
    assert (await balance(pool, org), await credit_reservations.reserved_credits(pool, call_log_id=call.id)) == (1, 4)
    assert not await credit_reservations.extend_reservation(pool, call_log_id=call.id)  # 1 left, a minute costs 2
    assert (await balance(pool, org), await credit_reservations.reserved_credits(pool, call_log_id=call.id)) == (1, 4)


async def test_the_end_charges_the_minutes_used_and_returns_the_rest(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=10)
    call = await open_paid_call(pool, org)
    for _ in range(3):
        assert await credit_reservations.extend_reservation(pool, call_log_id=call.id)
    assert await balance(pool, org) == 6

    await finish(pool, call, 61)  # two started minutes of the four reserved

    assert await balance(pool, org) == 8
    assert await credit_reservations.reserved_credits(pool, call_log_id=call.id) is None


async def test_a_call_longer_than_its_reservation_takes_what_the_balance_holds_and_never_below_zero(
    pool: asyncpg.Pool,
) -> None:
    org = await new_organization(pool, credits=2)
    call = await open_paid_call(pool, org)

    await finish(pool, call, 300)  # five minutes, one reserved and one more in the balance

    assert await balance(pool, org) == 0


async def test_a_call_that_never_connects_returns_its_whole_reservation(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=3, plan=Plan.ENTERPRISE)
    call = await open_paid_call(pool, org)
    assert await balance(pool, org) == 0

    await call_logs.finalize_call_log(
        pool, organization_id=org, call_log_id=call.id, status=CallStatus.MISSED, duration=0
    )

    assert await balance(pool, org) == 3


async def test_extensions_racing_for_the_last_credits_never_overdraw(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=8)
    calls = [await open_paid_call(pool, org) for _ in range(5)]  # 3 credits left

    extended = await asyncio.gather(
        *(credit_reservations.extend_reservation(pool, call_log_id=call.id) for call in calls * 2)
    )

    assert sum(extended) == 3
    assert await balance(pool, org) == 0


async def test_a_settled_call_cannot_extend_or_settle_again(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=5)
    call = await open_paid_call(pool, org)
    await finish(pool, call, 30)

    assert not await credit_reservations.extend_reservation(pool, call_log_id=call.id)
    assert (
        await credit_reservations.settle_reservation(pool, organization_id=org, call_log_id=call.id, minutes=9) is None
    )
    assert await balance(pool, org) == 4


async def test_calls_opened_without_rates_reserve_nothing_and_are_charged_nothing(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=5)
    agent = await agents.create_agent(pool, organization_id=org, name="Support")
    call = await call_logs.create_call_log(
        pool, organization_id=org, call_type=CallType.INBOUND, call_id=f"CA{new_id()}", agent_id=agent.id
    )

    await finish(pool, call, 90)

    assert await balance(pool, org) == 5


async def test_rates_must_price_every_plan(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=5)
    with pytest.raises(ValueError, match="every plan"):
        await credit_reservations.reserve_first_minute(
            pool, organization_id=org, call_log_id="unused", rates={"free": 1}
        )


async def blocked_on_a_lock(
    pool: asyncpg.Pool, *, waiting: int = 1, unless_done: Collection[asyncio.Future[Any]] = ()
) -> None:
    """Return once `waiting` statements on the database wait for a lock another transaction holds (or as soon as one
    of `unless_done` is done)."""
    for _ in range(1000):
        if any(task.done() for task in unless_done):
            return
        if await pool.fetchval("SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted") >= waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{waiting} statements did not wait for a lock within 10 s")


async def test_an_extension_racing_the_calls_settlement_takes_nothing_from_the_balance(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=10)
    call = await open_paid_call(pool, org)
    async with pool.acquire() as conn, conn.transaction():
        # The call ends (one minute used) while its meter asks for the next minute, which waits for the ending.
        await call_logs.finalize_call_log(
            conn, organization_id=org, call_log_id=call.id, status=CallStatus.COMPLETED, duration=30, minutes_charged=1
        )
        extension = asyncio.create_task(credit_reservations.extend_reservation(pool, call_log_id=call.id))
        await blocked_on_a_lock(pool)

    assert not await extension
    assert await balance(pool, org) == 9  # the one minute used, and not a credit more


async def test_a_deleted_call_pays_the_minutes_it_surely_started_and_the_rest_comes_back(pool: asyncpg.Pool) -> None:
    # The dashboard deletes CallLog rows in SQL, also of running calls (migration 0031 settles their reservation).
    org = await new_organization(pool, credits=10)
    running = await open_paid_call(pool, org)
    await pool.execute(
        """UPDATE "CallLog" SET "metadata" = "metadata" || '{"engineNode": "node-a"}' WHERE "id" = $1""", running.id
    )
    for _ in range(2):
        assert await credit_reservations.extend_reservation(pool, call_log_id=running.id)
    never_connected = await open_paid_call(pool, org)
    assert await balance(pool, org) == 10 - 3 - 1

    await pool.execute('DELETE FROM "CallLog" WHERE "id" = ANY($1)', [running.id, never_connected.id])
    # Three minutes held, the last reserved ahead: two are paid. The call whose stream never started pays nothing.
    assert await balance(pool, org) == 10 - 2
    with pytest.raises(NotFound):
        await credit_reservations.extend_reservation(pool, call_log_id=running.id)
    settled = await credit_reservations.settle_reservation(pool, organization_id=org, call_log_id=running.id, minutes=3)
    assert settled is None and await balance(pool, org) == 10 - 2  # the call's own end finds nothing left to settle


async def test_a_deletion_of_running_calls_reservations_is_refused_and_names_the_safe_way(pool: asyncpg.Pool) -> None:
    # Deleted in SQL, a running call's reservation took its credits with it: none came back, and the call's end
    # found nothing to charge.
    org = await new_organization(pool, credits=10)
    running = await open_paid_call(pool, org)
    assert await credit_reservations.extend_reservation(pool, call_log_id=running.id)

    with pytest.raises(asyncpg.ObjectInUseError) as refused:
        await pool.execute('DELETE FROM "CreditReservation" WHERE "callLogId" = $1', running.id)

    assert 'DELETE FROM "CreditReservation" refused' in str(refused.value)
    assert 'DELETE FROM "CallLog"' in refused.value.as_dict()["hint"]
    assert await credit_reservations.reserved_credits(pool, call_log_id=running.id) == 2
    await finish(pool, running, 55)  # it ends in its first minute, the next one reserved ahead
    assert await balance(pool, org) == 10 - 1


async def three_minutes_held_ended_by_hand(pool: asyncpg.Pool, organization_id: str) -> CallLog:
    """A running call holding three minutes of credits, then set COMPLETED in SQL (by an operator)."""
    call = await open_paid_call(pool, organization_id)
    for _ in range(2):
        assert await credit_reservations.extend_reservation(pool, call_log_id=call.id)
    await pool.execute('UPDATE "CallLog" SET "status" = \'COMPLETED\' WHERE "id" = $1', call.id)
    return call


async def test_an_ending_that_finds_its_call_ended_by_hand_still_settles_the_reservation(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=10)
    call = await three_minutes_held_ended_by_hand(pool, org)

    with pytest.raises(call_logs.InvalidCallTransition):  # a status callback: the call never connected
        await call_logs.finalize_call_log(
            pool, organization_id=org, call_log_id=call.id, status=CallStatus.MISSED, duration=0
        )

    assert await balance(pool, org) == 10  # nothing connected: the three reserved minutes come back
    assert await credit_reservations.reserved_credits(pool, call_log_id=call.id) is None
    stored = await call_logs.get_call_log(pool, organization_id=org, call_log_id=call.id)
    assert stored.status is CallStatus.COMPLETED
    assert (stored.metadata["minutesCharged"], stored.metadata["creditsPerMinute"]) == (0, 1)


async def test_an_ending_with_the_status_set_by_hand_charges_its_minutes_once(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=10)
    call = await three_minutes_held_ended_by_hand(pool, org)

    for _ in range(2):  # the second ending (a retry) finds nothing left to settle
        await call_logs.finalize_call_log(
            pool, organization_id=org, call_log_id=call.id, status=CallStatus.COMPLETED, minutes_charged=2
        )

    assert await balance(pool, org) == 8
    assert await credit_reservations.reserved_credits(pool, call_log_id=call.id) is None
