"""A node cut off from the database, while Twilio and its callers still reach it: it ends its own calls before the
other nodes take them for lost, and a short blip leaves them be.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from engine.call.call_log_spill import SPILL_DIRNAME
from engine.call.driver import DEFAULT_GOODBYE
from engine.simulator import Pause
from storage import engine_nodes, events, live_call_events, organizations
from storage.enums import Plan
from tests.databases import database_name
from tests.test_call_log_writer import OnOffProxy, proxy  # noqa: F401 (fixtures)
from tests.test_calls_e2e import call as simulated_call
from tests.test_calls_e2e import finished_call_log, make_line
from tests.test_drain_processes import Engine, engine, held_call

STREAM_TIMEOUT = timedelta(minutes=10)
NODE_TIMEOUT = 10.0
HEARTBEAT_INTERVAL = 0.5


def proxied_engine(through: OnOffProxy, db_url: str, tmp_path: Path) -> AbstractAsyncContextManager[Engine]:
    """An engine whose database is behind `through`, heartbeating fast, with a short node timeout and finish."""
    return engine(
        through.url(database_name(db_url)),
        tmp_path,
        drain_seconds=1,
        DIALTONE_NODE_HEARTBEAT_INTERVAL=str(HEARTBEAT_INTERVAL),
        DIALTONE_NODE_TIMEOUT=str(NODE_TIMEOUT),
        DIALTONE_CALL_LOG_FINISH_TIMEOUT="1",
    )


async def line(pool: asyncpg.Pool, *, silence_timeout_s: int = 600) -> tuple[str, str]:
    """A number answered by an offline agent that waits `silence_timeout_s` for a silent caller (by default as long
    as it may), of a new organization with 100 credits; (the number, the organization's id)."""
    org = await organizations.create_organization(
        pool, name="Fenced", slug=f"fenced-{secrets.token_hex(4)}", plan=Plan.ENTERPRISE, credits=100
    )
    number, _ = await make_line(
        pool, org.id, firstSentence="Hello from the fenced line.", silenceTimeoutSeconds=silence_timeout_s
    )
    return number, org.id


async def goodbye_written(pool: asyncpg.Pool, call_log_id: str) -> None:
    """Return once the call's last turn written is the agent's goodbye."""
    for _ in range(600):
        said = await pool.fetchval(
            'SELECT "text" FROM "CallTurn" WHERE "callLogId" = $1 ORDER BY "index" DESC LIMIT 1', call_log_id
        )
        if said == DEFAULT_GOODBYE:
            return
        await asyncio.sleep(0.1)
    pytest.fail("the call's goodbye never reached the database")


async def live_events_written(pool: asyncpg.Pool, call_log_id: str) -> None:
    """Return once the live events the node queued while its database was away are written: after the call.ended
    recovery told (the node writes its queue in one statement, its own call.ended last)."""
    told = await pool.fetchval(
        'SELECT min("id") FROM "LiveCallEvent" WHERE "callLogId" = $1 AND "type" = $2', call_log_id, "call.ended"
    )
    assert told is not None, "recovery told the live streams nothing"
    for _ in range(600):
        if await pool.fetchval(
            'SELECT count(*) FROM "LiveCallEvent" WHERE "callLogId" = $1 AND "id" > $2', call_log_id, told
        ):
            return
        await asyncio.sleep(0.1)
    pytest.fail("the node never wrote the live events it queued while its database was away")


async def spill_written(state: Path) -> None:
    """Return once the engine's spill holds no call's file (the database took them all)."""
    for _ in range(600):
        if not list((state / SPILL_DIRNAME).rglob("*.jsonl")):
            return
        await asyncio.sleep(0.1)
    pytest.fail("the spilled CallLog was never written")


@pytest.mark.parametrize("partitioned", [False, True], ids=["refused", "partitioned"])
async def test_a_node_cut_off_from_the_database_ends_its_calls_itself_and_they_end_once_when_it_returns(
    db_url: str,
    pool: asyncpg.Pool,
    proxy: OnOffProxy,  # noqa: F811 (the fixture)
    tmp_path: Path,
    partitioned: bool,
) -> None:
    # Refused: every connection dropped and new ones refused. Partitioned: nothing answers, and nothing fails either.
    number, org = await line(pool)
    await events.create_event(pool, organization_id=org, name="call.ended", webhook_url="https://hooks.example/x")
    # A live event stream on another node watches the organization's calls all along.
    watch = live_call_events.Watch(org, None)
    await live_call_events.open_watch(pool, watch, node="another", until=datetime.now(UTC) + timedelta(hours=1))
    async with proxied_engine(proxy, db_url, tmp_path) as node:
        caller = asyncio.create_task(simulated_call(node.url, number, Pause(120_000), timeout_s=150))
        call_log_id = await held_call(pool, number)
        # The node's database is away; Twilio and the caller still reach it.
        if partitioned:
            proxy.stall()
        else:
            await proxy.down()
        for _ in range(600):  # another node's recovery, once the node's heartbeat is a node timeout old
            if await engine_nodes.close_orphaned_calls(
                pool, node_timeout=timedelta(seconds=NODE_TIMEOUT), stream_timeout=STREAM_TIMEOUT
            ):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("recovery never took the cut-off node's call for lost")
        # The node ended the call itself, the database still away: no call runs on that nobody bills or sees.
        done, _ = await asyncio.wait({caller}, timeout=30)
        assert caller in done, "the cut-off node's call ran on after the others closed it as lost"
        result = caller.result()
        assert result.call_log_id == call_log_id
        assert len(result.utterances) >= 2, "the caller heard no goodbye"
        assert f"call {result.call_sid} ended: engine_lost (FAILED" in node.log()

        if partitioned:
            proxy.flow()
        else:
            await proxy.up()
        await goodbye_written(pool, call_log_id)  # its turns reach the database, from the spill or its writer
        await spill_written(tmp_path / "state")
        await live_events_written(pool, call_log_id)

    ended = await finished_call_log(pool, call_log_id)
    assert (ended["status"], ended["metadata"]["endReason"]) == ("FAILED", "engine_lost")
    told = await pool.fetch('SELECT "payload" FROM "WebhookDelivery" WHERE "event" = $1', "call.ended")
    told_here = [json.loads(row["payload"]) if isinstance(row["payload"], str) else row["payload"] for row in told]
    assert [data["data"]["callLogId"] for data in told_here].count(call_log_id) == 1
    live = await pool.fetch(
        'SELECT "data" FROM "LiveCallEvent" WHERE "callLogId" = $1 AND "type" = $2', call_log_id, "call.ended"
    )
    assert len(live) == 1, f"the live streams were told the call ended {len(live)} times"
    assert await pool.fetchval('SELECT count(*) FROM "CreditReservation" WHERE "callLogId" = $1', call_log_id) == 0
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org) == 99


async def test_a_short_database_blip_leaves_a_nodes_calls_running(
    db_url: str,
    pool: asyncpg.Pool,
    proxy: OnOffProxy,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    number, _ = await line(pool)
    async with proxied_engine(proxy, db_url, tmp_path) as node:
        caller = asyncio.create_task(simulated_call(node.url, number, Pause(120_000), timeout_s=150))
        call_log_id = await held_call(pool, number)
        await proxy.down()
        await asyncio.sleep(1.0)  # far less than the node timeout
        await proxy.up()
        await asyncio.sleep(NODE_TIMEOUT)  # past when a lease lost in the blip would have ended the call
        assert not caller.done(), "a short database blip ended the call"
        assert await pool.fetchval('SELECT "status" FROM "CallLog" WHERE "id" = $1', call_log_id) == "IN_PROGRESS"
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        assert "cut off from the database" not in node.log()


async def test_a_call_the_agent_ends_while_the_database_does_not_answer_lets_its_caller_go_at_once(
    db_url: str,
    pool: asyncpg.Pool,
    proxy: OnOffProxy,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    number, _ = await line(pool, silence_timeout_s=5)
    async with engine(
        proxy.url(database_name(db_url)), tmp_path, drain_seconds=1, DIALTONE_NODE_TIMEOUT="600"
    ) as node:  # no fence: only the end of the call is at stake
        caller = asyncio.create_task(simulated_call(node.url, number, Pause(120_000), timeout_s=150))
        call_log_id = await held_call(pool, number)
        proxy.stall()  # a partition: the end of the call cannot be written, nor fail, for a while
        try:
            # The agent hangs up on the silent caller (by closing the stream: the engine has no Twilio account).
            done, _ = await asyncio.wait({caller}, timeout=30)
            assert caller in done, "the caller was held on the line until the database answered"
            assert f"call {caller.result().call_sid} ended: silence_timeout (COMPLETED" in node.log()
        finally:
            proxy.flow()
        for _ in range(600):  # its writer's next attempt, once the database answers again
            ended = await pool.fetchrow('SELECT "status", "metadata" FROM "CallLog" WHERE "id" = $1', call_log_id)
            assert ended is not None
            if ended["status"] != "IN_PROGRESS":
                break
            await asyncio.sleep(0.1)
    assert ended is not None
    assert (ended["status"], ended["metadata"]["endReason"]) == ("COMPLETED", "silence_timeout")
