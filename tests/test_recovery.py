"""Crash recovery: engine nodes heartbeat, and calls left IN_PROGRESS by a node that died are closed as FAILED,
while calls of live nodes are never touched.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web

from engine.server.appkeys import DATABASE
from engine.simulator import Pause
from engine.workers import recovery
from engine.workers.host_processes import process_is_gone
from engine.workers.recovery import NODE_ID, NodeHeartbeat, recovery_context
from storage import call_logs, credit_reservations, engine_nodes, events
from storage.call_logs import CallLog
from storage.end_reasons import EndReason
from storage.enums import CallStatus
from storage.pool import Database, create_pool
from tests.databases import TestDatabases
from tests.fakes.engine_processes import free_port, start_engine, wait_healthy
from tests.test_call_log_writer import OnOffProxy
from tests.test_calls_e2e import call as simulated_call
from tests.test_calls_e2e import finished_call_log
from tests.test_drain_processes import engine, held_call, line
from tests.test_repo_agents import insert_organization
from tests.test_repo_call_logs import open_call, set_started_at

REPO = Path(__file__).resolve().parent.parent
NODE_TIMEOUT = timedelta(seconds=60)
STREAM_TIMEOUT = timedelta(minutes=10)


@pytest.fixture
async def own_pool(databases: TestDatabases) -> AsyncIterator[asyncpg.Pool]:
    """A database of this test's own: recovery looks across every organization."""
    pool = await databases.pool(await databases.migrated())
    yield pool
    await pool.close()


async def register(pool: asyncpg.Pool, node_id: str, *, last_seen: datetime) -> None:
    """A node last seen at `last_seen`."""
    await engine_nodes.register_node(pool, node_id=node_id, hostname="host", pid=1, now=last_seen)


async def call_on(pool: asyncpg.Pool, organization_id: str, node_id: str | None) -> CallLog:
    """An IN_PROGRESS call, tagged with the node running it (untagged: its stream has not started)."""
    return await open_call(pool, organization_id, metadata={"engineNode": node_id} if node_id else None)


async def reread(pool: asyncpg.Pool, call: CallLog) -> CallLog:
    """The call as stored now."""
    return await call_logs.get_call_log(pool, organization_id=call.organization_id, call_log_id=call.id)


def fast_node(pool: asyncpg.Pool) -> NodeHeartbeat:
    """A node that heartbeats every 50 ms, recovers every 100 ms, and takes others for dead after 1 s."""
    return NodeHeartbeat(
        pool,
        heartbeat_interval=timedelta(seconds=0.05),
        recovery_interval=timedelta(seconds=0.1),
        node_timeout=timedelta(seconds=1),
    )


async def test_only_calls_no_live_node_runs_are_failed_with_the_reason(own_pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    await register(own_pool, "alive", last_seen=now - timedelta(seconds=5))
    await register(own_pool, "dead", last_seen=now - timedelta(minutes=5))
    org = await insert_organization(own_pool)
    of_live_node = await call_on(own_pool, org, "alive")
    of_dead_node = await call_on(own_pool, org, "dead")
    of_unknown_node = await call_on(own_pool, org, "never-registered")
    never_streamed = await call_on(own_pool, org, None)
    await set_started_at(own_pool, never_streamed.id, now - timedelta(minutes=20))
    still_ringing = await call_on(own_pool, org, None)

    closed = await engine_nodes.close_orphaned_calls(
        own_pool, now=now, node_timeout=NODE_TIMEOUT, stream_timeout=STREAM_TIMEOUT
    )

    assert closed == 3
    for call, reason in [
        (of_dead_node, "engine_lost"),
        (of_unknown_node, "engine_lost"),
        (never_streamed, "stream_never_started"),
    ]:
        stored = await reread(own_pool, call)
        assert (stored.status, stored.metadata["endReason"]) == (CallStatus.FAILED, reason)
    for call in (of_live_node, still_ringing):
        assert await reread(own_pool, call) == call


async def test_calls_closed_by_recovery_are_announced_to_call_ended_subscribers(own_pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    await register(own_pool, "dead", last_seen=now - timedelta(minutes=5))
    org = await insert_organization(own_pool)
    await events.create_event(own_pool, organization_id=org, name="call.ended", webhook_url="https://hooks.example/x")
    lost = await call_on(own_pool, org, "dead")
    stale = await call_on(own_pool, org, None)
    await set_started_at(own_pool, stale.id, now - timedelta(days=2))

    await engine_nodes.close_orphaned_calls(own_pool, now=now, node_timeout=NODE_TIMEOUT, stream_timeout=STREAM_TIMEOUT)
    await call_logs.fail_stale_in_progress(own_pool, older_than=now - timedelta(days=1), reason=EndReason.ENGINE_LOST)

    rows = await own_pool.fetch('SELECT "payload" FROM "WebhookDelivery" WHERE "event" = $1', "call.ended")
    ended = {row["payload"]["data"]["callLogId"]: row["payload"]["data"] for row in rows}
    assert set(ended) == {lost.id, stale.id}
    assert ended[lost.id]["status"] == "FAILED" and ended[lost.id]["endReason"] == "engine_lost"


async def test_calls_closed_by_recovery_pay_the_minutes_they_surely_started_and_return_the_rest(
    own_pool: asyncpg.Pool,
) -> None:
    now = datetime.now(UTC)
    await register(own_pool, "dead", last_seen=now - timedelta(minutes=5))
    await register(own_pool, "alive", last_seen=now)
    org = await insert_organization(own_pool)
    await own_pool.execute('UPDATE "Organization" SET "credits" = 20 WHERE "id" = $1', org)
    rates = {"free": 2, "pro": 2, "enterprise": 2}
    just_connected = await open_call(own_pool, org, metadata={"engineNode": "dead"}, credit_rates=rates)
    three_minutes_held = await open_call(own_pool, org, metadata={"engineNode": "dead"}, credit_rates=rates)
    for _ in range(2):  # reserved in the last seconds of its first and second minutes: it had started both
        assert await credit_reservations.extend_reservation(own_pool, call_log_id=three_minutes_held.id)
    stale = await open_call(own_pool, org, metadata={"engineNode": "alive"}, credit_rates=rates)
    await set_started_at(own_pool, stale.id, now - timedelta(days=2))
    never_streamed = await open_call(own_pool, org, credit_rates=rates)
    await set_started_at(own_pool, never_streamed.id, now - timedelta(minutes=20))
    assert await own_pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org) == 8

    await engine_nodes.close_orphaned_calls(own_pool, now=now, node_timeout=NODE_TIMEOUT, stream_timeout=STREAM_TIMEOUT)
    # The first call pays its one minute, the second two of its three, the one never streamed nothing.
    assert await own_pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org) == 8 + 2 + 2
    await call_logs.fail_stale_in_progress(own_pool, older_than=now - timedelta(days=1), reason=EndReason.ENGINE_LOST)

    for call in (just_connected, three_minutes_held, stale, never_streamed):
        assert (await reread(own_pool, call)).status is CallStatus.FAILED
    assert await own_pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org) == 12  # stale: 1 min
    assert await own_pool.fetchval('SELECT count(*) FROM "CreditReservation"') == 0


async def test_a_finished_call_of_a_dead_node_is_left_as_it_ended(own_pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    await register(own_pool, "dead", last_seen=now - timedelta(minutes=5))
    org = await insert_organization(own_pool)
    call = await call_on(own_pool, org, "dead")
    ended = await call_logs.finalize_call_log(
        own_pool, organization_id=org, call_log_id=call.id, status=CallStatus.COMPLETED, duration=30
    )
    assert (
        await engine_nodes.close_orphaned_calls(
            own_pool, now=now, node_timeout=NODE_TIMEOUT, stream_timeout=STREAM_TIMEOUT
        )
        == 0
    )
    assert await reread(own_pool, call) == ended


async def test_a_node_learns_which_of_its_calls_recovery_closed_as_lost(own_pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    await register(own_pool, "paused", last_seen=now - timedelta(minutes=5))
    await register(own_pool, "other", last_seen=now - timedelta(minutes=5))
    org = await insert_organization(own_pool)
    lost, ended_by_itself, of_other = [await call_on(own_pool, org, node) for node in ("paused", "paused", "other")]
    await call_logs.fail_unstarted(own_pool, ended_by_itself, EndReason.STREAM_LOST)
    await engine_nodes.close_orphaned_calls(own_pool, now=now, node_timeout=NODE_TIMEOUT, stream_timeout=STREAM_TIMEOUT)
    held = [lost.id, ended_by_itself.id, of_other.id]
    assert await engine_nodes.calls_closed_as_lost(own_pool, node_id="paused", call_log_ids=held) == [lost.id]


async def test_alive_nodes_are_those_seen_within_the_timeout(own_pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    await register(own_pool, "alive", last_seen=now - timedelta(seconds=59))
    await register(own_pool, "dead", last_seen=now - timedelta(seconds=61))
    alive = await engine_nodes.list_alive_nodes(own_pool, now=now, node_timeout=NODE_TIMEOUT)
    assert [node.id for node in alive] == ["alive"]


async def test_a_heartbeat_moves_last_seen_forward_and_tells_an_unregistered_node_to_register(
    own_pool: asyncpg.Pool,
) -> None:
    now = datetime.now(UTC).replace(microsecond=250_000)  # the columns keep milliseconds
    assert not await engine_nodes.heartbeat(own_pool, node_id="stranger", now=now)
    await register(own_pool, "node", last_seen=now - timedelta(minutes=5))
    assert await engine_nodes.heartbeat(own_pool, node_id="node", now=now)
    [node] = await engine_nodes.list_alive_nodes(own_pool, now=now, node_timeout=NODE_TIMEOUT)
    assert (node.id, node.started_at, node.last_seen_at) == ("node", now - timedelta(minutes=5), now)


async def test_dead_nodes_are_forgotten_only_once_none_of_their_calls_is_open(own_pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    await register(own_pool, "idle", last_seen=now - timedelta(days=2))
    await register(own_pool, "busy", last_seen=now - timedelta(days=2))
    await call_on(own_pool, await insert_organization(own_pool), "busy")
    forgotten = await engine_nodes.forget_dead_nodes(own_pool, now=now, older_than=timedelta(days=1))
    remaining = await own_pool.fetch('SELECT "id" FROM "EngineNode"')
    assert (forgotten, [row["id"] for row in remaining]) == (1, ["busy"])


async def test_a_node_whose_host_clock_runs_ahead_leaves_a_healthy_nodes_calls_alone(
    own_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    await engine_nodes.register_node(own_pool, node_id="healthy", hostname="elsewhere", pid=1)  # the database's clock
    live = await call_on(own_pool, await insert_organization(own_pool), "healthy")

    class FiveMinutesAhead(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> FiveMinutesAhead:
            return cls.fromtimestamp((datetime.now(tz) + timedelta(minutes=5)).timestamp(), tz)

    monkeypatch.setattr(recovery, "datetime", FiveMinutesAhead)  # this host's clock, as the engine reads it
    node = NodeHeartbeat(own_pool, node_timeout=NODE_TIMEOUT)
    await node.start()  # registers, then recovers
    try:
        assert (await reread(own_pool, live)).status is CallStatus.IN_PROGRESS
        [stamped] = [
            n for n in await engine_nodes.list_alive_nodes(own_pool, node_timeout=NODE_TIMEOUT) if n.id == node.node_id
        ]
        database_now = await own_pool.fetchval("SELECT statement_timestamp()")
        assert abs(stamped.last_seen_at - database_now) < timedelta(minutes=1), "stamped by the database's clock"
    finally:
        await node.stop()


async def test_at_start_the_engine_fails_a_dead_nodes_call_and_leaves_a_live_nodes_call(
    own_pool: asyncpg.Pool,
) -> None:
    now = datetime.now(UTC)
    await register(own_pool, "crashed", last_seen=now - timedelta(minutes=3))
    await register(own_pool, "neighbour", last_seen=now)
    org = await insert_organization(own_pool)
    stale = await call_on(own_pool, org, "crashed")
    live = await call_on(own_pool, org, "neighbour")

    app = web.Application()
    app[DATABASE] = Database(pool=own_pool, location="test")
    app.cleanup_ctx.append(recovery_context)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        stored = await reread(own_pool, stale)
        assert (stored.status, stored.metadata["endReason"]) == (CallStatus.FAILED, "engine_lost")
        assert await reread(own_pool, live) == live
        alive = await engine_nodes.list_alive_nodes(own_pool, now=datetime.now(UTC), node_timeout=NODE_TIMEOUT)
        assert app[NODE_ID] in {node.id for node in alive}
    finally:
        await runner.cleanup()
    # A node that stops cleanly leaves the table: its calls, if any were left, are for the next recovery.
    assert await own_pool.fetchval('SELECT count(*) FROM "EngineNode" WHERE "id" = $1', app[NODE_ID]) == 0


async def test_a_running_node_keeps_heartbeating_and_recovers_calls_of_nodes_that_die_later(
    own_pool: asyncpg.Pool,
) -> None:
    heartbeat = fast_node(own_pool)
    await heartbeat.start()
    try:
        org = await insert_organization(own_pool)
        mine = await call_on(own_pool, org, heartbeat.node_id)
        await register(own_pool, "doomed", last_seen=datetime.now(UTC))
        doomed_call = await call_on(own_pool, org, "doomed")
        await asyncio.sleep(1.5)  # "doomed" stops heartbeating; this node goes on
        assert (await reread(own_pool, doomed_call)).status is CallStatus.FAILED
        assert await reread(own_pool, mine) == mine
        alive = await engine_nodes.list_alive_nodes(own_pool, now=datetime.now(UTC), node_timeout=timedelta(seconds=1))
        assert [node.id for node in alive] == [heartbeat.node_id]
    finally:
        await heartbeat.stop()


async def test_after_a_database_outage_other_nodes_get_time_to_heartbeat_before_their_calls_are_judged(
    own_pool: asyncpg.Pool, postgres_server_url: str
) -> None:
    proxy = OnOffProxy(postgres_server_url)
    await proxy.up()
    database = await own_pool.fetchval("SELECT current_database()")
    proxied = await create_pool(proxy.url(database), min_size=1, max_size=2, timeout=1)
    heartbeat = fast_node(proxied)
    await heartbeat.start()
    await register(own_pool, "neighbour", last_seen=datetime.now(UTC))
    call = await call_on(own_pool, await insert_organization(own_pool), "neighbour")
    try:
        await proxy.down()  # the database is away for both nodes, longer than the node timeout
        await asyncio.sleep(1.5)
        await proxy.up()
        await asyncio.sleep(0.3)  # the neighbour's first heartbeat after the outage comes a little later
        for _ in range(8):
            await engine_nodes.heartbeat(own_pool, node_id="neighbour", now=datetime.now(UTC))
            await asyncio.sleep(0.2)
        assert await reread(own_pool, call) == call
    finally:
        await heartbeat.stop()
        proxied.terminate()
        await proxy.down()


def exited_pid() -> int:
    """The PID of a process that has just exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_process_that_exited_is_gone() -> None:
    assert process_is_gone(exited_pid(), registered_at=datetime.now(UTC))


def test_a_running_process_is_not_gone() -> None:
    assert not process_is_gone(os.getpid(), registered_at=datetime.now(UTC))


def test_a_pid_taken_by_a_process_younger_than_the_registration_is_gone() -> None:
    # This PID was registered a day ago by a process that has gone since; this test's process got it later.
    assert process_is_gone(os.getpid(), registered_at=datetime.now(UTC) - timedelta(days=1))


async def test_at_start_a_node_of_this_host_whose_process_is_gone_has_its_calls_closed_at_once(
    own_pool: asyncpg.Pool,
) -> None:
    now = datetime.now(UTC)
    hostname = socket.gethostname()
    await engine_nodes.register_node(own_pool, node_id="killed", hostname=hostname, pid=exited_pid(), now=now)
    await engine_nodes.register_node(own_pool, node_id="sibling", hostname=hostname, pid=os.getpid(), now=now)
    org = await insert_organization(own_pool)
    of_killed = await call_on(own_pool, org, "killed")
    of_sibling = await call_on(own_pool, org, "sibling")

    heartbeat = NodeHeartbeat(own_pool)
    await heartbeat.start()
    try:
        stored = await reread(own_pool, of_killed)
        assert (stored.status, stored.metadata["endReason"]) == (CallStatus.FAILED, "engine_lost")
        assert await reread(own_pool, of_sibling) == of_sibling
    finally:
        await heartbeat.stop()


async def test_an_engine_started_after_a_kill_9_closes_the_dead_engines_call_at_start(
    databases: TestDatabases, tmp_path: Path
) -> None:
    database_url = await databases.migrated()
    own_pool = await databases.pool(database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_"))}
    env.update(PYTHONPATH=str(REPO), DATABASE_URL=database_url, DIALTONE_LOG_LEVEL="WARNING")
    ports = [free_port(), free_port()]
    engines: list[asyncio.subprocess.Process] = []
    try:
        env["DIALTONE_STATE_DIR"] = str(tmp_path / "first")
        first = await start_engine(ports[0], dict(env), tmp_path)
        engines.append(first)
        await wait_healthy(f"http://127.0.0.1:{ports[0]}", first)
        node_id = await own_pool.fetchval('SELECT "id" FROM "EngineNode" WHERE "pid" = $1', first.pid)
        call = await call_on(own_pool, await insert_organization(own_pool), node_id)
        first.send_signal(signal.SIGKILL)
        await first.wait()

        env["DIALTONE_STATE_DIR"] = str(tmp_path / "second")
        second = await start_engine(ports[1], dict(env), tmp_path)
        engines.append(second)
        await wait_healthy(f"http://127.0.0.1:{ports[1]}", second)
        # Recovery ran before the engine answered: no waiting for the dead node's heartbeat to time out.
        stored = await reread(own_pool, call)
        assert (stored.status, stored.metadata["endReason"]) == (CallStatus.FAILED, "engine_lost")
    finally:
        for engine in engines:
            if engine.returncode is None:
                engine.send_signal(signal.SIGTERM)
            await asyncio.wait_for(engine.communicate(), 30)
        await own_pool.close()


async def test_a_call_whose_engine_was_killed_pays_the_minute_it_started(
    databases: TestDatabases, tmp_path: Path
) -> None:
    database_url = await databases.migrated()
    own_pool = await databases.pool(database_url)
    try:
        number = await line(own_pool)  # 100 credits, one a minute
        org = await own_pool.fetchval('SELECT "organizationId" FROM "PhoneNumber" WHERE "phoneNumber" = $1', number)
        (tmp_path / "killed").mkdir()
        (tmp_path / "next").mkdir()
        async with engine(database_url, tmp_path / "killed", drain_seconds=20) as doomed:
            caller = asyncio.create_task(simulated_call(doomed.url, number, Pause(60_000)))
            call_log_id = await held_call(own_pool, number)  # the caller is talking to the agent
            doomed.process.send_signal(signal.SIGKILL)
            await doomed.process.wait()
            await asyncio.gather(caller, return_exceptions=True)
        async with engine(database_url, tmp_path / "next", drain_seconds=1):
            ended = await finished_call_log(own_pool, call_log_id)  # closed by its recovery at start
        assert (ended["status"], ended["metadata"]["endReason"]) == ("FAILED", "engine_lost")
        assert await own_pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org) == 99
        assert await own_pool.fetchval('SELECT count(*) FROM "CreditReservation"') == 0
    finally:
        await own_pool.close()


async def test_a_node_that_runs_again_after_its_calls_were_closed_as_lost_ends_them(
    db_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    number = await line(pool)
    async with engine(db_url, tmp_path, drain_seconds=20, DIALTONE_NODE_HEARTBEAT_INTERVAL="0.2") as node:
        caller = asyncio.create_task(simulated_call(node.url, number, Pause(120_000), timeout_s=150))
        call_log_id = await held_call(pool, number)
        node.process.send_signal(signal.SIGSTOP)  # it heartbeats no more: the others take it for dead
        try:
            for _ in range(300):  # another node's recovery, once the silence passed a (short) node timeout
                if await engine_nodes.close_orphaned_calls(
                    pool, node_timeout=timedelta(seconds=1), stream_timeout=STREAM_TIMEOUT
                ):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("recovery never took the stopped node's call for lost")
        finally:
            node.process.send_signal(signal.SIGCONT)
        result = await caller
        assert result.call_log_id == call_log_id
        assert f"call {result.call_sid} ended: engine_lost (FAILED" in node.log()
        ended = await finished_call_log(pool, call_log_id)
        assert (ended["status"], ended["metadata"]["endReason"]) == ("FAILED", "engine_lost")
