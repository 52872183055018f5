"""Live call events through the real server: simulated calls on the offline pipeline, read as Server-Sent Events by
an API client while they happen, resumed after a drop, across engine processes, and only by their organization."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from twilio.request_validator import RequestValidator

from engine.api import key_watch
from engine.api.resources import live_call_events as live_call_events_api
from engine.call import live_events
from engine.simulator import Dtmf, HangUp, Pause, Say
from storage import agents, api_keys, call_logs, engine_nodes, live_call_events, tools
from storage.enums import CallType
from storage.live_call_events import EVENT_CHANNEL, NewEvent
from storage.records import new_id
from tests.engine_server import running_engine
from tests.fakes.server import serve
from tests.sse_client import EventStream
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_calls_e2e import CALLER, TOKEN, call, call_log, make_line, turns
from tests.test_repo_call_logs import open_call

BOOKING = (Say("I would like to book an appointment"), Say("tuesday please"))


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    async with running_engine(db_url, twilio_auth_token=TOKEN, allow_private_tool_urls=True) as base:  # loopback hooks
        yield base


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


async def running_call_id(api: Api, tenant: Tenant) -> str:
    """The id of the tenant's call once its media session runs (it then appears with runsHere or a node)."""
    for _ in range(400):
        _, page = await api.call("GET", "/live-calls", tenant.owner_key)
        running = [entry for entry in page["data"] if "engineNode" in entry["metadata"]]
        if running:
            return str(running[0]["id"])
        await asyncio.sleep(0.05)
    raise AssertionError("the call never started")


async def test_an_organization_stream_follows_a_call_as_it_happens(
    engine: str, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    tenant = await make_tenant(pool, "Watched")
    number, agent_id = await make_line(pool, tenant.organization_id, firstSentence="Hello from the live line.")
    async with EventStream(session, f"{engine}/v1/live-calls/events", tenant.owner_key) as stream:
        result = await call(engine, number, *BOOKING)
        ended = await stream.until(lambda e: e.type == "call.ended")
    log = await call_log(pool, result)
    rows = await turns(pool, log["id"])

    events = [event for event in stream.events if event.data.get("callLogId") == log["id"]]
    ids = [event.id for event in events]
    assert all(event_id is not None for event_id in ids) and ids == sorted(ids)  # type: ignore[type-var]
    assert events[0].type == "call.started"
    assert {key: events[0].data[key] for key in ("direction", "from", "to", "agentId")} == {
        "direction": "inbound",
        "from": CALLER,
        "to": number,
        "agentId": agent_id,
    }
    assert ended.data | {"at": None} == {
        "callLogId": log["id"],
        "at": None,
        "status": "COMPLETED",
        "endReason": "path_end",
        "durationSeconds": log["duration"],
        "transfer": None,
    }
    assert events[-1] is ended
    assert all(event.data["at"].endswith("+00:00") for event in events)

    # The turns as the CallLog has them, in the same order and with the same indices.
    written = [(row["index"], row["speaker"], row["text"]) for row in rows]
    told = [
        (event.data["turnIndex"], "caller", event.data["text"])
        if event.type == "caller.final"
        else (event.data["turnIndex"], "agent", event.data["spokenText"])
        for event in events
        if event.type in ("caller.final", "agent.turn")
    ]
    assert [(index, speaker.lower(), text) for index, speaker, text in written] == told
    assert any("book" in event.data["text"] for event in stream.of_type("caller.final"))
    assert any("appointment" in event.data["text"] for event in stream.of_type("caller.interim"))

    # The agent's words were told as they started playing, before their turn was written.
    spoken = stream.of_type("agent.speaking")
    assert spoken[0].data == {
        "callLogId": log["id"],
        "at": spoken[0].data["at"],
        "turnIndex": 0,
        "text": "Hello from the live line.",
    }
    first_turn = next(event for event in events if event.type == "agent.turn")
    assert first_turn.data["turnIndex"] == 0 and not first_turn.data["interrupted"]
    assert spoken[0].id is not None and first_turn.id is not None and spoken[0].id < first_turn.id

    latencies = stream.of_type("turn.latency")
    latency_rows = {row["index"]: row["latencyMs"] for row in rows if row["latencyMs"] is not None}
    assert latency_rows and {e.data["turnIndex"]: e.data["voiceToVoiceMs"] for e in latencies} == latency_rows
    assert all(e.data["speculative"] in (True, False) and "firstFrameSent" in e.data for e in latencies)

    states = [event.data["state"] for event in stream.of_type("call.state")]
    assert states[0] == "listening" and "responding" in states and states[-1] == "ended"
    assert [(e.data["nodeId"], e.data["edgeId"]) for e in stream.of_type("path.node")][-2:] == [
        ("book", "greeting-book"),
        ("confirm", "book-confirm"),
    ]


LOOKUP_PATH_NODES = [
    {"id": "greet", "type": "speak", "data": {"isStart": True, "text": "Press one to look up your account."}},
    {"id": "lookup", "type": "webhook", "data": {"tool": "lookup_account"}},
    {"id": "found", "type": "end", "data": {"text": "Found it. Goodbye."}},
    {"id": "down", "type": "end", "data": {"text": "Sorry, our system is down. Goodbye."}},
]
LOOKUP_PATH_EDGES = [
    {"id": "pressed", "source": "greet", "target": "lookup", "data": {"digit": "1"}},
    {"id": "looked-up", "source": "lookup", "target": "found", "data": {"result": "success"}},
    {"id": "failed", "source": "lookup", "target": "down", "data": {"result": "failure"}},
]


async def test_a_path_step_is_told_when_the_path_moves_not_with_the_next_agent_turn(
    engine: str, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    tenant = await make_tenant(pool, "Moving")
    number, agent_id = await make_line(pool, tenant.organization_id, nodes=LOOKUP_PATH_NODES, edges=LOOKUP_PATH_EDGES)
    seen_while_looking_up: list[bool] = []

    async def lookup(_request: web.Request) -> web.Response:
        # The webhook answers once the stream has told the lookup node (or after 5 s): no agent turn comes before.
        with contextlib.suppress(TimeoutError):
            await stream.until(lambda e: e.type == "path.node" and e.data["nodeId"] == "lookup", timeout=5)
        seen_while_looking_up.append(any(e.data["nodeId"] == "lookup" for e in stream.of_type("path.node")))
        return web.json_response({"balance": "$12"})

    hooks = web.Application()
    hooks.router.add_post("/lookup", lookup)
    async with serve(hooks) as hook:
        tool = await tools.create_tool(
            pool,
            organization_id=tenant.organization_id,
            name="Accounts",
            is_connected=True,
            configuration={"function": {"name": "lookup_account"}, "webhook": {"url": f"{hook}/lookup"}},
        )
        await agents.link_tool(pool, organization_id=tenant.organization_id, agent_id=agent_id, tool_id=tool.id)
        async with EventStream(session, f"{engine}/v1/live-calls/events", tenant.owner_key) as stream:
            result = await call(engine, number, Dtmf("1"), Pause(500))
            await stream.until(lambda e: e.type == "call.ended")
    log = await call_log(pool, result)
    assert log["metadata"]["endReason"] == "path_end"
    assert seen_while_looking_up == [True]
    steps = [(e.data["nodeId"], e.data["edgeId"]) for e in stream.of_type("path.node")]
    assert steps == [("greet", None), ("lookup", "pressed"), ("found", "looked-up")]


async def test_a_call_stream_starts_with_a_snapshot_and_resumes_after_a_drop_with_nothing_lost(
    engine: str, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    tenant = await make_tenant(pool, "Resumed")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello from the resumed line.")
    api = Api(session, engine)
    async with EventStream(session, f"{engine}/v1/live-calls/events", tenant.owner_key) as everything:
        running = asyncio.create_task(call(engine, number, Pause(1000), *BOOKING))
        call_log_id = await running_call_id(api, tenant)
        url = f"{engine}/v1/live-calls/{call_log_id}/events"
        first = EventStream(session, url, tenant.owner_key)
        async with first:
            snapshot = await first.until(lambda e: e.type == "call.snapshot")
            await first.until(lambda e: e.type == "caller.final")
        last_seen = max(event.id for event in first.events if event.id is not None)
        async with EventStream(session, url, tenant.owner_key, last_event_id=last_seen) as resumed:
            await resumed.until(lambda e: e.type == "call.ended")
            await resumed.until_ended()  # a call's stream ends with its call
        await running
        await everything.until(lambda e: e.type == "call.ended")

    assert snapshot.id is None and first.events[0] is snapshot
    assert snapshot.data | {"at": None, "startedAt": None} == {
        "callLogId": call_log_id,
        "status": "IN_PROGRESS",
        "direction": "inbound",
        "from": CALLER,
        "to": number,
        "agentId": snapshot.data["agentId"],
        "startedAt": None,
        "engineNode": snapshot.data["engineNode"],
        "at": None,
    }
    assert snapshot.data["engineNode"]
    assert not any(event.id is None for event in resumed.events)  # no snapshot on resuming
    complete = [event.id for event in everything.events if event.data["callLogId"] == call_log_id]
    after_first = [event.id for event in first.events if event.id is not None]
    assert after_first + [event.id for event in resumed.events] == complete[complete.index(after_first[0]) :]


async def test_events_recorded_by_one_engine_process_are_read_through_another(
    engine: str, db_url: str, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    tenant = await make_tenant(pool, "Elsewhere")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello from the other process.")
    async with (
        running_engine(db_url, twilio_auth_token=TOKEN) as other,
        EventStream(session, f"{other}/v1/live-calls/events", tenant.owner_key) as stream,
    ):
        result = await call(engine, number, *BOOKING)  # held by `engine`, watched through `other`
        await stream.until(lambda e: e.type == "call.ended")
    log = await call_log(pool, result)
    types = [event.type for event in stream.events if event.data["callLogId"] == log["id"]]
    assert types[0] == "call.started" and types[-1] == "call.ended"
    assert types.count("caller.final") == 2 and types.count("agent.turn") == 3


async def test_another_organization_gets_404_and_sees_none_of_the_events(
    engine: str, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    tenant = await make_tenant(pool, "Owner")
    stranger = await make_tenant(pool, "Stranger")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello, this is private.")
    api = Api(session, engine)
    async with (
        EventStream(session, f"{engine}/v1/live-calls/events", stranger.owner_key) as theirs,
        EventStream(session, f"{engine}/v1/live-calls/events", tenant.owner_key) as ours,
    ):
        running = asyncio.create_task(call(engine, number, Pause(500), BOOKING[0], Pause(1500), HangUp()))
        call_log_id = await running_call_id(api, tenant)
        headers = {"Authorization": f"Bearer {stranger.owner_key}"}
        async with session.get(f"{engine}/v1/live-calls/{call_log_id}/events", headers=headers) as refused:
            assert refused.status == 404
            assert (await refused.json())["error"]["code"] == "not_found"
        await running
        await ours.until(lambda e: e.type == "call.ended")
    assert theirs.events == []


async def test_a_stream_ends_once_its_key_is_revoked(
    engine: str, pool: asyncpg.Pool, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(key_watch, "KEY_RECHECK_SECONDS", 0.2)
    tenant = await make_tenant(pool, "Revoked")
    async with EventStream(session, f"{engine}/v1/live-calls/events", tenant.owner_key) as stream:
        await api_keys.revoke_api_key(pool, organization_id=tenant.organization_id, key_id=tenant.owner_key_id)
        await stream.until_ended(timeout=10)  # not kept open, with every call's words, until the client leaves
    headers = {"Authorization": f"Bearer {tenant.owner_key}", "Last-Event-ID": "0"}
    async with session.get(f"{engine}/v1/live-calls/events", headers=headers) as again:
        assert again.status == 401


async def test_a_call_nobody_watches_records_no_events(engine: str, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Unwatched")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Nobody is listening.")
    result = await call(engine, number, BOOKING[0], Pause(1500), HangUp())
    log = await call_log(pool, result)
    assert len(await turns(pool, log["id"])) >= 2  # the agent spoke and the caller answered: events were emitted
    assert await pool.fetchval('SELECT count(*) FROM "LiveCallEvent" WHERE "callLogId" = $1', log["id"]) == 0


async def test_a_resume_position_that_is_not_an_event_id_is_refused(
    engine: str, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    tenant = await make_tenant(pool, "Malformed")
    for position in ("yesterday", "²", str(2**63)):
        headers = {"Authorization": f"Bearer {tenant.owner_key}", "Last-Event-ID": position}
        async with session.get(f"{engine}/v1/live-calls/events", headers=headers) as response:
            assert response.status == 422
            assert (await response.json())["error"]["field"] == "Last-Event-ID"
    api = Api(session, engine)
    status, body = await api.call("GET", "/live-calls/events?lastEventId=-1", tenant.owner_key)
    assert status == 422 and body["error"]["field"] == "lastEventId"


async def test_the_openapi_document_describes_both_streams(engine: str, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{engine}/v1/openapi.json") as response:
        document = await response.json()
    for path in ("/v1/live-calls/events", "/v1/live-calls/{callLogId}/events"):
        operation = document["paths"][path]["get"]
        assert list(operation["responses"]["200"]["content"]) == ["text/event-stream"]
        assert "call.snapshot" in operation["responses"]["200"]["description"]
        assert {p["name"] for p in operation["parameters"]} >= {"Last-Event-ID", "lastEventId"}
    assert "404" in document["paths"]["/v1/live-calls/{callLogId}/events"]["get"]["responses"]


async def test_a_call_stream_ends_once_its_call_is_over_while_the_organization_s_other_calls_go_on(
    engine: str, pool: asyncpg.Pool, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live_call_events_api, "KEEPALIVE_SECONDS", 1.0)
    tenant = await make_tenant(pool, "Busy")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello from the busy line.")
    over = await call_log(pool, await call(engine, number, BOOKING[0], Pause(500), HangUp()))
    other = await call_log(pool, await call(engine, number, BOOKING[0], Pause(500), HangUp()))

    async with (
        EventStream(session, f"{engine}/v1/live-calls/events", tenant.owner_key) as everything,
        EventStream(session, f"{engine}/v1/live-calls/{over['id']}/events", tenant.owner_key) as finished,
    ):
        # Another call of the organization speaks all along.
        talking = asyncio.create_task(talk(pool, tenant.organization_id, other["id"], events=10**6, words=1, every=0.2))
        try:
            await finished.until_ended(timeout=20)  # not held open for as long as any other call of its org goes on
            await everything.until(lambda e: e.type == "caller.interim")
        finally:
            talking.cancel()
            await asyncio.gather(talking, return_exceptions=True)
    assert finished.events == []


async def organization_with_a_call(engine: str, pool: asyncpg.Pool, name: str) -> tuple[Tenant, str]:
    """A new organization and the id of its one call, over (the events the test records for it are all it has)."""
    tenant = await make_tenant(pool, name)
    number, _ = await make_line(pool, tenant.organization_id, firstSentence=f"Hello from {name}.")
    return tenant, str((await call_log(pool, await call(engine, number, BOOKING[0], Pause(500), HangUp())))["id"])


async def stalled_stream(engine: str, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An organization stream opened by a client that then reads nothing (a small window, a small buffer)."""
    address = urlsplit(engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (address.hostname, address.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    head = f"GET /v1/live-calls/events HTTP/1.1\r\nHost: {address.netloc}\r\nAuthorization: Bearer {key}\r\n"
    writer.write(f"{head}Connection: close\r\n\r\n".encode())
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    return reader, writer


async def talk(
    pool: asyncpg.Pool, organization_id: str, call_log_id: str, *, events: int, words: int = 7000, every: float = 0
) -> None:
    """Events of a call of the organization, one batch each (`every` seconds apart), as the engine process holding it
    records them (by default 20 kB each); the last one's text is "over"."""
    announcement = json.dumps({"orgs": [organization_id]})
    for n in range(events):
        text = "over" if n == events - 1 else f"{n} " + "la " * words
        await live_call_events.record_events(
            pool, [NewEvent(organization_id, call_log_id, "caller.interim", {"text": text})]
        )
        await pool.execute("SELECT pg_notify($1, $2)", EVENT_CHANNEL, announcement)
        await asyncio.sleep(every)


async def until_cut(reader: asyncio.StreamReader) -> None:
    """Read what the server sent until it ends the connection."""
    async with asyncio.timeout(30):
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(65536):
                pass


async def test_a_client_that_reads_nothing_is_cut_off_and_stops_holding_its_lease(
    engine: str, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live_call_events_api, "STALLED_SECONDS", 1.0)
    monkeypatch.setattr(live_events, "WATCH_RENEW_SECONDS", 0.2)
    tenant, speaking = await organization_with_a_call(engine, pool, "Stalled")
    reader, writer = await stalled_stream(engine, tenant.owner_key)
    try:
        await talk(pool, tenant.organization_id, speaking, events=500)  # 10 MB: more than the sockets hold
        # Its lease is let go (what it missed stays there for its reconnection), and its connection cut.
        await until_let_go(pool, tenant.organization_id)
        await until_cut(reader)
    finally:
        writer.close()


async def test_a_stream_whose_client_reads_nothing_ends_once_its_key_is_revoked(
    engine: str, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(key_watch, "KEY_RECHECK_SECONDS", 0.2)
    monkeypatch.setattr(live_events, "WATCH_RENEW_SECONDS", 0.2)
    monkeypatch.setattr(live_call_events_api, "STALLED_SECONDS", 3600.0)  # only the revocation can end it
    tenant, speaking = await organization_with_a_call(engine, pool, "Stuck")
    reader, writer = await stalled_stream(engine, tenant.owner_key)
    try:
        await talk(pool, tenant.organization_id, speaking, events=500)
        await api_keys.revoke_api_key(pool, organization_id=tenant.organization_id, key_id=tenant.owner_key_id)
        await until_let_go(pool, tenant.organization_id)  # not held, with the organization's calls, until it reads
        await until_cut(reader)
    finally:
        writer.close()


async def until_let_go(pool: asyncpg.Pool, organization_id: str) -> None:
    """Wait until the organization's one stream lease is no longer renewed: its stream has ended."""
    async with asyncio.timeout(30):
        while True:
            left = await pool.fetchval(
                'SELECT "expiresAt" - now() FROM "LiveCallWatch" WHERE "organizationId" = $1', organization_id
            )
            if left <= live_events.RECONNECT_GRACE:
                return
            await asyncio.sleep(0.1)  # a row of the database, which nothing announces


async def event_reads(pool: asyncpg.Pool) -> int:
    """How many times the database has read the LiveCallEvent table (every backend's counts, once they are flushed:
    within 10 s of going idle, PGSTAT_IDLE_INTERVAL)."""
    await asyncio.sleep(11)
    await pool.execute("SELECT pg_stat_clear_snapshot()")
    reads = await pool.fetchval(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'LiveCallEvent'"
    )
    return int(reads)


async def test_many_streams_of_a_busy_organization_cost_one_read_of_its_events_per_batch(
    engine: str, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    tenant, speaking = await organization_with_a_call(engine, pool, "Watched by many")
    streams, batches = 50, 20
    async with contextlib.AsyncExitStack() as opened:
        watching = [
            await opened.enter_async_context(EventStream(session, f"{engine}/v1/live-calls/events", tenant.owner_key))
            for _ in range(streams)
        ]
        before = await event_reads(pool)
        await talk(pool, tenant.organization_id, speaking, events=batches, words=10, every=0.1)
        for stream in watching:
            await stream.until(lambda e: e.data["text"] == "over")
        after = await event_reads(pool)
    assert all(len(stream.events) == batches for stream in watching)  # every stream got every event
    assert after - before < streams * batches / 2  # not a read per stream and batch (1000 here)


async def test_a_stream_resuming_from_further_back_than_its_process_keeps_gets_every_event_in_order(
    engine: str, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    tenant, speaking = await organization_with_a_call(engine, pool, "Far behind")
    url = f"{engine}/v1/live-calls/events"
    async with EventStream(session, url, tenant.owner_key) as following:  # the process reads as the events come
        await talk(pool, tenant.organization_id, speaking, events=10, words=1)
        first = await following.until(lambda e: e.data["text"] == "over")
        await talk(pool, tenant.organization_id, speaking, events=1200, words=1)
        last = await following.until(lambda e: e.data["text"] == "over" and e is not first)
        async with (
            EventStream(session, url, tenant.owner_key, last_event_id=first.id) as resumed,
            EventStream(
                session, f"{engine}/v1/live-calls/{speaking}/events", tenant.owner_key, last_event_id=first.id
            ) as resumed_call,
        ):
            await resumed.until(lambda e: e.id == last.id)
            await resumed_call.until(lambda e: e.id == last.id)
    told = [event.id for event in following.events]
    after_first = told[told.index(first.id) + 1 :]
    assert len(after_first) == 1200
    assert [event.id for event in resumed.events] == after_first
    assert [event.id for event in resumed_call.events] == after_first


async def test_a_call_whose_engine_process_died_is_told_ended_when_recovery_closes_it(
    engine: str, db_url: str, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    tenant = await make_tenant(pool, "Orphaned")
    dead = f"dead-{new_id()}"
    await engine_nodes.register_node(
        pool, node_id=dead, hostname="gone", pid=1, now=datetime.now(UTC) - timedelta(hours=1)
    )
    orphan = await open_call(pool, tenant.organization_id, metadata={"engineNode": dead})
    watched = await open_call(pool, tenant.organization_id, metadata={"engineNode": dead})
    url = f"{engine}/v1/live-calls/events"
    async with (
        EventStream(session, url, tenant.owner_key) as everything,
        EventStream(session, f"{engine}/v1/live-calls/{watched.id}/events", tenant.owner_key) as one,
    ):
        async with running_engine(db_url, twilio_auth_token=TOKEN):  # starting, it closes what dead processes left
            pass
        await everything.until(lambda e: len(everything.of_type("call.ended")) == 2)
        ended = {event.data["callLogId"]: event for event in everything.of_type("call.ended")}
        told = await one.until(lambda e: e.type == "call.ended")
        await one.until_ended()
    assert set(ended) == {orphan.id, watched.id}
    for event in (*ended.values(), told):
        assert event.data | {"at": None, "callLogId": None} == {
            "callLogId": None,
            "at": None,
            "status": "FAILED",
            "endReason": "engine_lost",
            "durationSeconds": 0,
            "transfer": None,
        }
    assert told.data["callLogId"] == watched.id


async def test_a_call_twilio_ends_before_its_media_stream_started_is_told_ended(
    engine: str, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    tenant = await make_tenant(pool, "Hung up while ringing")
    ringing = await call_logs.create_call_log(  # listed in progress: its media stream has not started yet
        pool,
        organization_id=tenant.organization_id,
        call_type=CallType.INBOUND,
        call_id="CA" + secrets.token_hex(16),
        agent_id=None,
    )
    async with EventStream(session, f"{engine}/v1/live-calls/events", tenant.owner_key) as everything:
        form = {"CallSid": ringing.call_id, "AccountSid": "AC" + "1" * 32, "CallStatus": "canceled"}
        signature = RequestValidator(TOKEN).compute_signature(f"{engine}/twilio/status", form)
        async with session.post(f"{engine}/twilio/status", data=form, headers={"X-Twilio-Signature": signature}) as r:
            assert r.status == 204
        ended = await everything.until(lambda e: e.type == "call.ended", timeout=30)
    assert ended.data | {"at": None} == {
        "callLogId": ringing.id,
        "at": None,
        "status": "MISSED",
        "endReason": "canceled",
        "durationSeconds": 0,
        "transfer": None,
    }
