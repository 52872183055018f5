"""A call whose CallLog is given a final status by something else while it runs (an operator's or a dashboard's
`UPDATE "CallLog" SET "status" = ...` in SQL): the credits its reservation holds are settled all the same, when the
call ends, on the minutes it ran, or by recovery's sweep when nothing is left to end it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from engine.simulator import Pause, Say
from engine.workers.recovery import STRANDED_RESERVATION_IDLE, NodeHeartbeat
from storage import credit_reservations
from storage.call_logs import CallLog
from tests.databases import TestDatabases
from tests.engine_server import running_engine
from tests.test_api_auth import make_tenant
from tests.test_calls_e2e import TOKEN, call, make_line, turns
from tests.test_drain_processes import engine, held_call, line
from tests.test_repo_agents import insert_organization
from tests.test_repo_call_logs import open_call

RATES = {"free": 2, "pro": 2, "enterprise": 2}


async def balance(pool: asyncpg.Pool, organization_id: str) -> int:
    """The organization's credits now."""
    credits: int = await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', organization_id)
    return credits


async def test_a_call_set_completed_in_sql_while_it_runs_is_settled_at_its_end(pool: asyncpg.Pool, db_url: str) -> None:
    tenant = await make_tenant(pool, "Ended outside", credits=10)  # one credit a minute
    number, _ = await make_line(
        pool, tenant.organization_id, firstSentence="Hello, you are through.", silenceTimeoutSeconds=120
    )
    async with running_engine(db_url, twilio_auth_token=TOKEN) as base:
        running = asyncio.create_task(call(base, number, Say("I would like to book an appointment"), Pause(3_000)))
        call_log_id = None
        for _ in range(1800):
            call_log_id = await pool.fetchval(
                'SELECT "id" FROM "CallLog" WHERE "organizationId" = $1', tenant.organization_id
            )
            if call_log_id is not None and len(await turns(pool, call_log_id)) >= 3:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the call never answered its caller")
        # An operator closes the call by hand while it still runs, its reservation holding credits.
        await pool.execute('UPDATE "CallLog" SET "status" = \'COMPLETED\' WHERE "id" = $1', call_log_id)
        assert await credit_reservations.reserved_credits(pool, call_log_id=call_log_id) is not None
        await running
        for _ in range(200):  # the session's end is written just after the caller has gone
            metadata = await pool.fetchval('SELECT "metadata" FROM "CallLog" WHERE "id" = $1', call_log_id)
            if "minutesCharged" in metadata or "endReason" in metadata:
                break
            await asyncio.sleep(0.05)

    # The call ran under a minute: it pays that minute, and nothing stays held.
    assert await credit_reservations.reserved_credits(pool, call_log_id=call_log_id) is None
    assert await balance(pool, tenant.organization_id) == 9
    row = await pool.fetchrow('SELECT "status", "metadata" FROM "CallLog" WHERE "id" = $1', call_log_id)
    assert row is not None
    assert row["status"] == "COMPLETED"  # left as the operator set it
    assert (row["metadata"]["minutesCharged"], row["metadata"]["creditsPerMinute"]) == (1, 1)


@pytest.fixture
async def own_database(databases: TestDatabases) -> str:
    """The URL of a database of this test's own: the sweep looks across every organization."""
    return await databases.migrated()


@pytest.fixture
async def own_pool(databases: TestDatabases, own_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test's own database."""
    pool = await databases.pool(own_database)
    yield pool
    await pool.close()


async def ended_by_hand(pool: asyncpg.Pool, organization_id: str, *, node: str | None, minutes: int) -> CallLog:
    """A call that reserved `minutes` minutes at RATES (its stream taken by `node`, or never started), then was set
    COMPLETED in SQL by an operator, and whose session never ended it (its node died)."""
    call_log = await open_call(
        pool, organization_id, metadata={"engineNode": node} if node else None, credit_rates=RATES
    )
    for _ in range(minutes - 1):
        assert await credit_reservations.extend_reservation(pool, call_log_id=call_log.id)
    await pool.execute('UPDATE "CallLog" SET "status" = \'COMPLETED\' WHERE "id" = $1', call_log.id)
    return call_log


async def test_the_sweep_settles_reservations_of_calls_ended_by_hand_once_no_meter_extends_them(
    own_pool: asyncpg.Pool,
) -> None:
    org = await insert_organization(own_pool)
    await own_pool.execute('UPDATE "Organization" SET "credits" = 20 WHERE "id" = $1', org)
    three_minutes = await ended_by_hand(own_pool, org, node="dead", minutes=3)
    never_streamed = await ended_by_hand(own_pool, org, node=None, minutes=1)
    running = await open_call(own_pool, org, metadata={"engineNode": "dead"}, credit_rates=RATES)
    assert await balance(own_pool, org) == 20 - 6 - 2 - 2

    # Just ended: a meter may still be running them (its next extension is due within the minute).
    now = datetime.now(UTC)
    assert await credit_reservations.settle_stranded_reservations(own_pool, idle_for=STRANDED_RESERVATION_IDLE) == 0
    later = now + STRANDED_RESERVATION_IDLE + timedelta(seconds=1)
    assert (
        await credit_reservations.settle_stranded_reservations(own_pool, idle_for=STRANDED_RESERVATION_IDLE, now=later)
        == 2
    )

    # Two of the three minutes were surely started; the call never streamed pays nothing; the running one is its own.
    assert await balance(own_pool, org) == 20 - 4 - 2
    for ended in (three_minutes, never_streamed):
        assert await credit_reservations.reserved_credits(own_pool, call_log_id=ended.id) is None
    assert await credit_reservations.reserved_credits(own_pool, call_log_id=running.id) == 2
    metadata = await own_pool.fetchval('SELECT "metadata" FROM "CallLog" WHERE "id" = $1', three_minutes.id)
    assert (metadata["minutesCharged"], metadata["creditsPerMinute"]) == (2, 2)
    assert (
        await credit_reservations.settle_stranded_reservations(own_pool, idle_for=STRANDED_RESERVATION_IDLE, now=later)
        == 0
    )
    assert await balance(own_pool, org) == 20 - 4 - 2


async def test_sweeps_of_several_nodes_at_once_settle_each_reservation_once(own_pool: asyncpg.Pool) -> None:
    orgs = [await insert_organization(own_pool) for _ in range(3)]
    await own_pool.execute('UPDATE "Organization" SET "credits" = 40 WHERE "id" = ANY($1::text[])', orgs)
    for org in orgs:
        for minutes in (1, 2, 3, 4):
            await ended_by_hand(own_pool, org, node="dead", minutes=minutes)
    later = datetime.now(UTC) + STRANDED_RESERVATION_IDLE + timedelta(seconds=1)

    settled = await asyncio.gather(
        *(
            credit_reservations.settle_stranded_reservations(own_pool, idle_for=STRANDED_RESERVATION_IDLE, now=later)
            for _ in range(4)
        )
    )

    assert sum(settled) == 12
    # Each organization reserved 1 + 2 + 3 + 4 minutes and pays 1 + 1 + 2 + 3 of them, two credits each.
    for org in orgs:
        assert await balance(own_pool, org) == 40 - 2 * (1 + 1 + 2 + 3)
    assert await own_pool.fetchval('SELECT count(*) FROM "CreditReservation"') == 0


async def test_recovery_settles_what_calls_ended_by_hand_left_held(own_pool: asyncpg.Pool) -> None:
    org = await insert_organization(own_pool)
    await own_pool.execute('UPDATE "Organization" SET "credits" = 10 WHERE "id" = $1', org)
    call_log = await ended_by_hand(own_pool, org, node="dead", minutes=2)
    later = datetime.now(UTC) + STRANDED_RESERVATION_IDLE + timedelta(seconds=1)

    await NodeHeartbeat(own_pool, clock=lambda: later).recover()

    assert await credit_reservations.reserved_credits(own_pool, call_log_id=call_log.id) is None
    assert await balance(own_pool, org) == 10 - 2  # its first minute, surely started


async def test_a_call_ended_by_hand_whose_engine_was_killed_is_settled_by_recovery(
    own_database: str, own_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    number = await line(own_pool)  # 100 credits, one a minute
    org = await own_pool.fetchval('SELECT "organizationId" FROM "PhoneNumber" WHERE "phoneNumber" = $1', number)
    async with engine(own_database, tmp_path, drain_seconds=20) as doomed:
        caller = asyncio.create_task(call(doomed.url, number, Pause(60_000)))
        call_log_id = await held_call(own_pool, number)
        await own_pool.execute('UPDATE "CallLog" SET "status" = \'COMPLETED\' WHERE "id" = $1', call_log_id)
        doomed.process.send_signal(signal.SIGKILL)  # its session will never end the call
        await doomed.process.wait()
        await asyncio.gather(caller, return_exceptions=True)
    assert await credit_reservations.reserved_credits(own_pool, call_log_id=call_log_id) == 1
    later = datetime.now(UTC) + STRANDED_RESERVATION_IDLE + timedelta(seconds=1)

    await NodeHeartbeat(own_pool, clock=lambda: later).recover()

    assert await credit_reservations.reserved_credits(own_pool, call_log_id=call_log_id) is None
    assert await balance(own_pool, org) == 99  # the minute it started
    metadata = await own_pool.fetchval('SELECT "metadata" FROM "CallLog" WHERE "id" = $1', call_log_id)
    assert metadata["minutesCharged"] == 1
