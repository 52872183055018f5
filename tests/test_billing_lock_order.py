"""The billing paths lock in one order, so a deletion of running calls never deadlocks with the engine's own billing:
a CallLog first, then its reservation or transfer leg, then (at the end of the statement, in id order) the
organizations whose balance changes. Each test holds the locks of the real paths in the order that deadlocked."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from storage import call_logs, credit_reservations, transfer_legs
from storage.call_logs import CallLog
from storage.end_reasons import EndReason
from storage.enums import CallStatus
from storage.errors import NotFound
from tests.test_credit_reservations import RATES, balance, blocked_on_a_lock, new_organization, open_paid_call


async def running_calls(pool: asyncpg.Pool, organization_id: str, count: int) -> list[CallLog]:
    """`count` running calls of the organization, each holding its first minute, newest first: the order in which
    `delete_calls_of` reaches them."""
    calls = [await open_paid_call(pool, organization_id) for _ in range(count)]
    now = datetime.now(UTC)
    for age, call in enumerate(calls):
        await pool.execute('UPDATE "CallLog" SET "timestamp" = $2 WHERE "id" = $1', call.id, now - timedelta(hours=age))
    return calls


async def delete_calls_of(pool: asyncpg.Pool, organization_id: str) -> str:
    """The dashboard deletes every CallLog of the organization in one statement, running calls too."""
    async with pool.acquire() as dashboard, dashboard.transaction():
        # Newest first, by "CallLog_organizationId_timestamp_idx", as on a large table: on the tests' small one the
        # planner might scan the rows in any order.
        await dashboard.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off")
        deleted: str = await dashboard.execute('DELETE FROM "CallLog" WHERE "organizationId" = $1', organization_id)
    return deleted


async def test_a_bulk_deletion_and_the_ending_of_one_of_its_calls_both_go_through(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=10)
    _, second = await running_calls(pool, org, 2)
    async with pool.acquire() as engine, engine.transaction():
        # The engine ends the second call: its CallLog is updated first, its reservation settled last.
        await engine.execute('UPDATE "CallLog" SET "duration" = 60 WHERE "id" = $1', second.id)
        deletion = asyncio.create_task(delete_calls_of(pool, org))
        await blocked_on_a_lock(pool)  # the deletion has done the first call and waits for the second
        await call_logs.finalize_call_log(
            engine, organization_id=org, call_log_id=second.id, status=CallStatus.COMPLETED, minutes_charged=1
        )

    assert await deletion == "DELETE 2"
    assert await balance(pool, org) == 10 - RATES["free"]  # the ended call's minute; the other's stream never started


async def test_a_bulk_deletion_and_the_next_minute_of_one_of_its_calls_both_go_through(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=10)
    _, second = await running_calls(pool, org, 2)
    async with pool.acquire() as turn:
        async with turn.transaction():
            # A row written for the second call (a turn) holds its CallLog for its foreign key, as the deletion
            # reaches it; the call's meter asks for its next minute meanwhile.
            await turn.execute('SELECT FROM "CallLog" WHERE "id" = $1 FOR KEY SHARE', second.id)
            deletion = asyncio.create_task(delete_calls_of(pool, org))
            await blocked_on_a_lock(pool)
            extension = asyncio.create_task(credit_reservations.extend_reservation(pool, call_log_id=second.id))
            await blocked_on_a_lock(pool, waiting=2, unless_done=[extension])

        outcomes = await asyncio.gather(deletion, extension, return_exceptions=True)

    assert list(outcomes) == ["DELETE 2", True]
    assert await balance(pool, org) == 10  # neither call's stream started: every minute they held comes back


async def test_a_bulk_deletion_and_the_recovery_of_one_of_its_calls_both_go_through(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=10)
    _, second = await running_calls(pool, org, 2)
    async with pool.acquire() as meter:
        async with meter.transaction():
            # The second call's meter holds its reservation as recovery closes the call (a sweep: its CallLog is
            # ended first, its reservation settled next), and the dashboard deletes the organization's calls.
            await meter.execute('SELECT FROM "CreditReservation" WHERE "callLogId" = $1 FOR NO KEY UPDATE', second.id)
            recovery = asyncio.create_task(
                call_logs.fail_stale_in_progress(
                    pool, older_than=datetime.now(UTC) - timedelta(minutes=30), reason=EndReason.STREAM_NEVER_STARTED
                )
            )
            await blocked_on_a_lock(pool)
            deletion = asyncio.create_task(delete_calls_of(pool, org))
            await blocked_on_a_lock(pool, waiting=2)

        outcomes = await asyncio.gather(recovery, deletion, return_exceptions=True)

    assert list(outcomes) == [1, "DELETE 2"]
    assert await balance(pool, org) == 10


async def test_a_transfer_opened_as_its_call_is_deleted_finds_the_call_gone(pool: asyncpg.Pool) -> None:
    org = await new_organization(pool, credits=100)
    (running,) = await running_calls(pool, org, 1)
    async with pool.acquire() as meter:
        async with meter.transaction():
            # The call's meter holds its reservation as the dashboard deletes the call and the model transfers it.
            await meter.execute('SELECT FROM "CreditReservation" WHERE "callLogId" = $1 FOR NO KEY UPDATE', running.id)
            deletion = asyncio.create_task(pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', running.id))
            await blocked_on_a_lock(pool)
            transfer = asyncio.create_task(
                transfer_legs.open_leg(
                    pool, organization_id=org, call_log_id=running.id, to="+14155550199", max_minutes=3, rates=RATES
                )
            )
            await blocked_on_a_lock(pool, waiting=2, unless_done=[transfer])

        outcomes = await asyncio.gather(deletion, transfer, return_exceptions=True)

    assert outcomes[0] == "DELETE 1"
    assert isinstance(outcomes[1], NotFound)
    assert await balance(pool, org) == 100  # no leg was opened, and the call's minute came back
