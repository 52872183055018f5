"""Live-call control across engine processes: a hang-up sent to any process reaches the one holding the call through
PostgreSQL LISTEN/NOTIFY, with no Twilio account; the channel's listener survives a dropped connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.call.control_channel import Acknowledgement, ControlChannel, ControlChannelError
from engine.simulator import CallEnding, Pause
from storage.records import new_id
from tests.databases import database_name
from tests.engine_server import running_engine
from tests.test_api_auth import Api, make_tenant
from tests.test_call_log_writer import OnOffProxy
from tests.test_calls_e2e import TOKEN, call, call_log, make_line
from tests.test_repo_call_logs import open_call


@pytest.fixture(scope="module")
async def two_engines(db_url: str) -> AsyncIterator[tuple[str, str]]:
    """Two engine processes' apps on one database, with no Twilio account."""
    async with (
        running_engine(db_url, twilio_auth_token=TOKEN) as first,
        running_engine(db_url, twilio_auth_token=TOKEN) as second,
    ):
        yield first, second


async def held_by_a_node(pool: asyncpg.Pool, organization_id: str) -> str:
    """The id of the organization's call in progress once an engine node has tagged it as its own."""
    for _ in range(400):
        row = await pool.fetchrow(
            """SELECT "id" FROM "CallLog" WHERE "organizationId" = $1 AND "status" = 'IN_PROGRESS'
               AND "metadata" ? 'engineNode'""",
            organization_id,
        )
        if row is not None:
            return str(row["id"])
        await asyncio.sleep(0.05)
    raise AssertionError("no engine node took the call")


async def test_a_hang_up_sent_to_another_process_ends_the_call_where_it_runs(
    two_engines: tuple[str, str], pool: asyncpg.Pool
) -> None:
    holder, other = two_engines
    tenant = await make_tenant(pool, "Across")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello from one node.")
    running = asyncio.create_task(call(holder, number, Pause(60_000), timeout_s=90))
    call_log_id = await held_by_a_node(pool, tenant.organization_id)
    async with aiohttp.ClientSession() as session:
        api = Api(session, other)
        _, page = await api.call("GET", "/live-calls", tenant.owner_key)
        assert [(entry["id"], entry["runsHere"]) for entry in page["data"]] == [(call_log_id, False)]
        status, body = await api.call("POST", f"/live-calls/{call_log_id}/hangup", tenant.owner_key)
    assert (status, body) == (202, {"callLogId": call_log_id, "endedBy": "engine"})
    result = await running
    assert result.ending is CallEnding.ENGINE_CLOSED
    log = await call_log(pool, result)
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "api_hangup")


async def test_a_call_whose_process_stopped_cannot_be_hung_up_and_says_why(
    two_engines: tuple[str, str], pool: asyncpg.Pool
) -> None:
    _, other = two_engines
    tenant = await make_tenant(pool, "Orphan")
    log = await open_call(pool, tenant.organization_id, metadata={"engineNode": new_id()})
    async with aiohttp.ClientSession() as session:
        status, body = await Api(session, other).call("POST", f"/live-calls/{log.id}/hangup", tenant.owner_key)
    assert status == 409
    assert "stopped" in body["error"]["message"]


async def test_a_hang_up_of_another_organizations_call_is_not_found(
    two_engines: tuple[str, str], pool: asyncpg.Pool
) -> None:
    _, other = two_engines
    owner, stranger = await make_tenant(pool, "Owner"), await make_tenant(pool, "Stranger")
    log = await open_call(pool, owner.organization_id, metadata={"engineNode": new_id()})
    async with aiohttp.ClientSession() as session:
        status, _ = await Api(session, other).call("POST", f"/live-calls/{log.id}/hangup", stranger.owner_key)
    assert status == 404


# ------------------------------------------------------------------------------------------ the channel itself


Handled = list[tuple[str, dict[str, Any]]]
"""The commands a test node carried out: (call id, arguments)."""


def channel_on(
    db_url: str, pool: asyncpg.Pool, node_id: str, handled: Handled, *, listen_url: str | None = None
) -> ControlChannel:
    """A command channel for `node_id` answering "echo", recording what it handles; it listens on `listen_url`
    (`db_url` by default)."""

    async def echo(call_log_id: str, args: Mapping[str, Any]) -> Acknowledgement:
        handled.append((call_log_id, dict(args)))
        return Acknowledgement(applied=True, result={"echo": args.get("text")})

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(listen_url or db_url, server_settings={"application_name": f"control-{node_id}"})

    return ControlChannel(connect, pool, node_id=node_id, handlers={"echo": echo})


async def test_a_command_is_carried_out_by_its_node_only_and_acknowledged(db_url: str, pool: asyncpg.Pool) -> None:
    handled_a: Handled = []
    handled_b: Handled = []
    a, b = channel_on(db_url, pool, "node-a", handled_a), channel_on(db_url, pool, "node-b", handled_b)
    await a.start()
    await b.start()
    try:
        ack = await a.send("node-b", "call-1", "echo", {"text": "hi"}, timeout=5)
        assert ack == Acknowledgement(applied=True, detail="", result={"echo": "hi"})
        assert (handled_a, handled_b) == ([], [("call-1", {"text": "hi"})])
        unknown = await a.send("node-b", "call-1", "transfer", {}, timeout=5)
        assert not unknown.applied and "transfer" in unknown.detail
        with pytest.raises(ControlChannelError, match="did not acknowledge"):
            await a.send("node-gone", "call-1", "echo", {}, timeout=0.3)
    finally:
        await a.stop()
        await b.stop()


async def test_a_command_that_reaches_its_node_after_the_sender_gave_up_is_not_carried_out(
    db_url: str, pool: asyncpg.Pool, postgres_server_url: str
) -> None:
    proxy = OnOffProxy(postgres_server_url)
    await proxy.up()
    handled: Handled = []
    node = channel_on(db_url, pool, "node-late", handled, listen_url=proxy.url(database_name(db_url)))
    sender = channel_on(db_url, pool, "node-asking", [])
    await node.start()
    await sender.start()
    try:
        proxy.stall()  # the node hears nothing for a while: stopped, starved of CPU, a slow network
        with pytest.raises(ControlChannelError, match="did not acknowledge"):
            await sender.send("node-late", "call-3", "echo", {"text": "too late"}, timeout=0.3)
        proxy.flow()  # the command the sender gave up on (409 to its API client) arrives now
        ack = await sender.send("node-late", "call-4", "echo", {"text": "in time"}, timeout=5)
        assert ack.applied
        assert handled == [("call-4", {"text": "in time"})]
    finally:
        await node.stop()
        await sender.stop()
        await proxy.down()


async def test_the_listener_reconnects_after_the_database_drops_its_connection(db_url: str, pool: asyncpg.Pool) -> None:
    handled: Handled = []
    node = channel_on(db_url, pool, "node-r", handled)
    sender = channel_on(db_url, pool, "node-s", [])
    await node.start()
    await sender.start()
    try:
        killed = await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            "control-node-r",
        )
        assert killed == 1
        ack = None
        for _ in range(100):  # until both listeners are back
            try:
                ack = await sender.send("node-r", "call-2", "echo", {"text": "again"}, timeout=0.5)
                break
            except ControlChannelError:
                await asyncio.sleep(0.1)
        assert ack is not None and ack.applied
        assert handled[-1] == ("call-2", {"text": "again"})
    finally:
        await node.stop()
        await sender.stop()


async def test_subscribers_hear_published_payloads_and_a_none_after_each_reconnection(
    db_url: str, pool: asyncpg.Pool
) -> None:
    heard: list[str | None] = []
    listener = channel_on(db_url, pool, "node-l", [])
    publisher = channel_on(db_url, pool, "node-p", [])
    await listener.subscribe("dialtone_test_topic", heard.append)  # before start: added as it connects
    await listener.start()
    await publisher.start()
    try:
        assert heard == [None]
        await publisher.publish("dialtone_test_topic", "one")
        for _ in range(50):
            if "one" in heard:
                break
            await asyncio.sleep(0.05)
        assert heard == [None, "one"]
        late: list[str | None] = []
        await listener.subscribe("dialtone_other_topic", late.append)  # while listening: added at once
        await publisher.publish("dialtone_other_topic", "two")
        await publisher.publish("dialtone_test_topic", "three")
        for _ in range(50):
            if late == ["two"] and "three" in heard:
                break
            await asyncio.sleep(0.05)
        assert late == ["two"] and heard == [None, "one", "three"]
        await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            "control-node-l",
        )
        for _ in range(100):
            if heard[-1] is None and late[-1:] == [None]:
                break
            await asyncio.sleep(0.1)
        assert heard[-1] is None and late[-1] is None  # back, and told that payloads may have been lost
        listener.unsubscribe("dialtone_test_topic", heard.append)
        with pytest.raises(ValueError, match="too large"):
            await publisher.publish("dialtone_test_topic", "x" * 8000)
    finally:
        await listener.stop()
        await publisher.stop()
