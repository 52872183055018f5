"""A call's first instants through two real engines on one database: a caller hanging up while the call is still
being set up, and two media streams for one call reaching two engine processes. The call's setup is held up with a
lock on a table it reads (a slow database), so each race runs the same way every time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from twilio.request_validator import RequestValidator

from config.settings import load_settings
from engine.server.app import create_app
from storage import organizations
from storage.enums import Plan
from tests.engine_server import running_engine
from tests.test_calls_e2e import TOKEN, _answered_call, _start, finished_call_log, make_line, signed_upgrade

CONNECTED = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
SETUP_TABLE = '"AgentTool"'
"""A table the call's setup reads (the agent's bundle) and neither the status callback nor the stream's claim does."""
_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)


@pytest.fixture(scope="module")
async def engines(db_url: str) -> AsyncIterator[tuple[str, str]]:
    """Two engine processes' applications on loopback, sharing one database."""
    async with (
        running_engine(db_url, twilio_auth_token=TOKEN) as first,
        running_engine(db_url, twilio_auth_token=TOKEN) as second,
    ):
        yield first, second


@pytest.fixture(scope="module")
async def organization_id(pool: asyncpg.Pool) -> str:
    """One organization with credits for every line of this module."""
    org = await organizations.create_organization(
        pool, name="Races", slug="stream-start-races", plan=Plan.ENTERPRISE, credits=500
    )
    return org.id


@asynccontextmanager
async def slow_setup(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
    """Hold every call's setup at its agent's bundle until the block ends; yields the connection holding it."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"LOCK TABLE {SETUP_TABLE} IN ACCESS EXCLUSIVE MODE")
        yield conn


async def setups_waiting(conn: asyncpg.pool.PoolConnectionProxy, count: int) -> None:
    """Wait until `count` call setups are held up by `slow_setup`."""
    for _ in range(400):
        waiting = await conn.fetchval(
            f"SELECT count(*) FROM pg_locks WHERE relation = '{SETUP_TABLE}'::regclass AND NOT granted"
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.025)
    pytest.fail(f"{count} call setup(s) never reached the agent's bundle")


def stop_message(call_sid: str) -> str:
    """Twilio's `stop` for the call's stream: the caller hung up."""
    stop = {"callSid": call_sid, "accountSid": "AC" + "1" * 32}
    return json.dumps({"event": "stop", "sequenceNumber": "2", "streamSid": "MZ" + "2" * 32, "stop": stop})


async def post_status(engine: str, call_sid: str, status: str, duration_s: int) -> None:
    """Post Twilio's signed status callback for the call."""
    form = {"CallSid": call_sid, "AccountSid": "AC" + "1" * 32, "CallStatus": status, "CallDuration": str(duration_s)}
    signature = RequestValidator(TOKEN).compute_signature(f"{engine}/twilio/status", form)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{engine}/twilio/status", data=form, headers={"X-Twilio-Signature": signature}) as response,
    ):
        assert response.status == 204


async def test_a_caller_hanging_up_while_the_call_is_set_up_completes_the_call_as_a_caller_hangup(
    engines: tuple[str, str], pool: asyncpg.Pool, organization_id: str
) -> None:
    # The stream started, then the caller hung up before the session's first write: Twilio's stop reaches the
    # stream and its `completed` callback reaches the engine while the call is still being set up.
    engine, _ = engines
    number, _ = await make_line(pool, organization_id)
    call_sid, call_log_id, media_url = await _answered_call(engine, number)
    async with aiohttp.ClientSession() as http, http.ws_connect(media_url, headers=signed_upgrade(media_url)) as ws:
        async with slow_setup(pool) as holder:
            await ws.send_str(CONNECTED)
            await ws.send_str(_start(call_sid, call_log_id))
            await setups_waiting(holder, 1)
            await ws.send_str(stop_message(call_sid))
            await post_status(engine, call_sid, "completed", 1)
        message = await ws.receive(timeout=30)
        while message.type not in _CLOSED:
            message = await ws.receive(timeout=30)

    row = await finished_call_log(pool, call_log_id)
    assert (row["status"], row["metadata"]["endReason"]) == ("COMPLETED", "caller_hangup")
    assert row["duration"] <= 5


async def _first_sign(ws: aiohttp.ClientWebSocketResponse, message: aiohttp.WSMessage | None = None) -> str:
    """Whether the engine speaks on this stream ("media") or closes it without a word ("closed"), reading on from
    `message` when one was received already."""
    while True:
        if message is None:
            message = await ws.receive(timeout=30)
        if message.type in _CLOSED:
            return "closed"
        if message.type is aiohttp.WSMsgType.TEXT and json.loads(message.data).get("event") == "media":
            return "media"
        message = None


async def test_two_streams_for_one_call_on_two_engines_run_it_once(
    engines: tuple[str, str], pool: asyncpg.Pool, organization_id: str
) -> None:
    # Both streams start before either session's first write: only one engine may run the call.
    first, second = engines
    number, _ = await make_line(pool, organization_id, firstSentence="Hello from one engine only.")
    call_sid, call_log_id, media_url = await _answered_call(first, number)
    second_url = media_url.replace(first.removeprefix("http://"), second.removeprefix("http://"))
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(media_url, headers=signed_upgrade(media_url)) as one,
        http.ws_connect(second_url, headers=signed_upgrade(second_url)) as other,
    ):
        async with slow_setup(pool) as holder:
            await one.send_str(CONNECTED)
            await one.send_str(_start(call_sid, call_log_id))
            await setups_waiting(holder, 1)
            await other.send_str(CONNECTED)
            await other.send_str(_start(call_sid, call_log_id))
            refused = asyncio.create_task(other.receive(timeout=30))
            waiting_both = asyncio.create_task(setups_waiting(holder, 2))
            # The second stream is refused at once, or (the defect) held up in setup beside the first.
            await asyncio.wait((refused, waiting_both), return_when=asyncio.FIRST_COMPLETED)
            waiting_both.cancel()
        signs = [await _first_sign(one), await _first_sign(other, await refused)]
        assert sorted(signs) == ["closed", "media"]
        running = one if signs[0] == "media" else other
        await running.send_str(stop_message(call_sid))
        row = await finished_call_log(pool, call_log_id)

    assert (row["status"], row["metadata"]["endReason"]) == ("COMPLETED", "caller_hangup")
    node = row["metadata"]["engineNode"]
    assert await pool.fetchval('SELECT count(*) FROM "EngineNode" WHERE "id" = $1', node) == 1


async def test_a_call_whose_setup_fails_after_its_stream_took_it_ends_failed_at_once(
    engines: tuple[str, str], pool: asyncpg.Pool, organization_id: str
) -> None:
    # Once its stream has taken the call, the CallLog names this engine: no status callback closes it, and no
    # recovery while the engine lives. The database connection reading the agent is cut mid-setup.
    engine, _ = engines
    number, _ = await make_line(pool, organization_id)
    call_sid, call_log_id, media_url = await _answered_call(engine, number)
    async with aiohttp.ClientSession() as http, http.ws_connect(media_url, headers=signed_upgrade(media_url)) as ws:
        async with slow_setup(pool) as holder:
            await ws.send_str(CONNECTED)
            await ws.send_str(_start(call_sid, call_log_id))
            await setups_waiting(holder, 1)
            cut = await holder.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks"
                f" WHERE relation = '{SETUP_TABLE}'::regclass AND NOT granted"
            )
            assert cut == 1
        assert await _first_sign(ws) == "closed"

    row = await finished_call_log(pool, call_log_id)
    assert (row["status"], row["metadata"]["endReason"]) == ("FAILED", "internal_error")
    assert row["metadata"]["engineNode"]


async def test_a_call_still_being_set_up_when_the_engine_stops_is_ended_with_the_others(
    db_url: str, pool: asyncpg.Pool, organization_id: str, tmp_path: Path
) -> None:
    # The engine's shutdown ends the calls it runs; this one's stream has taken it, but its session is still being
    # set up as the shutdown starts: it must end with the engine too, not start talking to a stopping engine.
    app = create_app(load_settings(database_url=db_url, twilio_auth_token=TOKEN, state_dir=str(tmp_path)))
    shutting_down = asyncio.Event()

    async def shutdown_begins(app: web.Application) -> None:
        shutting_down.set()

    # First, and without yielding: the engine's own handler, ending its live calls, runs before the test goes on.
    app.on_shutdown.insert(0, shutdown_begins)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    stopped: asyncio.Task[None] | None = None
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        engine = f"http://{host}:{port}"
        number, _ = await make_line(pool, organization_id, firstSentence="Hello from a stopping engine.")
        call_sid, call_log_id, media_url = await _answered_call(engine, number)
        async with aiohttp.ClientSession() as http, http.ws_connect(media_url, headers=signed_upgrade(media_url)) as ws:
            async with slow_setup(pool) as holder:
                await ws.send_str(CONNECTED)
                await ws.send_str(_start(call_sid, call_log_id))
                await setups_waiting(holder, 1)
                stopped = asyncio.create_task(runner.cleanup())
                await asyncio.wait_for(shutting_down.wait(), 30)
            assert await _first_sign(ws) == "closed"
    finally:
        await (runner.cleanup() if stopped is None else stopped)

    row = await finished_call_log(pool, call_log_id)
    assert (row["status"], row["metadata"]["endReason"]) == ("FAILED", "engine_shutdown")
