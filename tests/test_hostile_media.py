"""Hostile media streams through the real server: frames that break parsers, audio faster than real time, a
timestamp far in the future. Each fails only its own call, as a protocol error, while the engine goes on serving."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from config.settings import load_settings
from engine.simulator import Say
from storage import organizations
from storage.recordings import recording_path
from tests.engine_server import running_engine
from tests.test_calls_e2e import (
    _MALFORMED,
    TOKEN,
    _answered_call,
    _start,
    call,
    call_log,
    finished_call_log,
    make_line,
    signed_upgrade,
)

CONNECTED = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
SILENCE_FRAME = base64.b64encode(b"\xff" * 160).decode()  # 20 ms of mu-law silence


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    """The engine on loopback, checking Twilio signatures."""
    async with running_engine(db_url, twilio_auth_token=TOKEN) as base:
        yield base


@pytest.fixture(scope="module")
async def organization_id(pool: asyncpg.Pool) -> str:
    """One organization with credits for every line of this module."""
    org = await organizations.create_organization(pool, name="Hostile", slug="hostile-media", credits=500)
    return org.id


def media(chunk: int, timestamp_ms: int) -> str:
    """One 20 ms inbound frame of silence, spelled as Twilio spells it."""
    return (
        f'{{"event":"media","sequenceNumber":"{chunk + 1}","streamSid":"MZ{"2" * 32}","media":{{"track":"inbound",'
        f'"chunk":"{chunk}","timestamp":"{timestamp_ms}","payload":"{SILENCE_FRAME}"}}}}'
    )


async def until_closed(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Read (and drop) frames until the engine closes the socket."""
    message = await ws.receive(timeout=30)
    while message.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
        message = await ws.receive(timeout=30)


@pytest.mark.parametrize("kind", ["nested_thousands_deep", "number_of_5000_digits", "over_a_megabyte"])
async def test_a_frame_that_breaks_a_parser_before_start_closes_the_stream_without_an_engine_error(
    engine: str, pool: asyncpg.Pool, organization_id: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    number, _ = await make_line(pool, organization_id)
    _, _, media_url = await _answered_call(engine, number)
    caplog.set_level(logging.WARNING)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(media_url, headers=signed_upgrade(media_url)) as ws:
            await ws.send_str(CONNECTED)
            await ws.send_str(_MALFORMED[kind])
            await until_closed(ws)
        async with http.get(f"{engine}/health") as health:
            assert health.status == 200

    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert any("never started properly" in record.getMessage() for record in caplog.records)


async def test_media_sent_faster_than_real_time_fails_that_call_while_another_carries_on(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    good_number, _ = await make_line(pool, organization_id)
    bad_number, _ = await make_line(pool, organization_id)
    good = asyncio.create_task(call(engine, good_number, Say("what are your opening hours"), Say("no thanks bye")))
    call_sid, call_log_id, media_url = await _answered_call(engine, bad_number)
    async with aiohttp.ClientSession() as http, http.ws_connect(media_url, headers=signed_upgrade(media_url)) as ws:
        await ws.send_str(CONNECTED)
        await ws.send_str(_start(call_sid, call_log_id))
        for chunk in range(1, 3001):  # a minute of audio, as fast as the socket takes it
            if ws.closed:
                break
            await ws.send_str(media(chunk, (chunk - 1) * 20))
        async with http.get(f"{engine}/health") as health:
            health_status = health.status
        await until_closed(ws)
    bad_log = await finished_call_log(pool, call_log_id)
    good_log = await call_log(pool, await good)

    assert health_status == 200
    assert bad_log["status"] == "FAILED"
    assert bad_log["metadata"]["endReason"] == "protocol_error"
    assert bad_log["metadata"]["endDetail"].startswith("AheadOfRealTime")
    assert (good_log["status"], good_log["metadata"]["endReason"]) == ("COMPLETED", "path_end")


async def test_a_timestamp_far_in_the_future_fails_the_call_and_its_recording_stays_as_short_as_the_call(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await make_line(pool, organization_id)
    call_sid, call_log_id, media_url = await _answered_call(engine, number)
    async with aiohttp.ClientSession() as http, http.ws_connect(media_url, headers=signed_upgrade(media_url)) as ws:
        await ws.send_str(CONNECTED)
        await ws.send_str(_start(call_sid, call_log_id))
        await ws.send_str(media(1, 0))
        await ws.send_str(media(2, 39 * 3600 * 1000))
        await until_closed(ws)
    row = await finished_call_log(pool, call_log_id)

    assert row["status"] == "FAILED"
    assert row["metadata"]["endReason"] == "protocol_error"
    assert row["metadata"]["endDetail"].startswith("AheadOfRealTime")
    assert row["metadata"]["recordingMs"] <= (row["duration"] + 5) * 1000


async def test_a_recording_that_cannot_be_closed_still_finishes_the_call_log_and_queues_its_analysis(
    db_url: str, pool: asyncpg.Pool, organization_id: str, tmp_path: Path
) -> None:
    number, _ = await make_line(pool, organization_id)
    async with running_engine(db_url, twilio_auth_token=TOKEN, state_dir=str(tmp_path)) as engine:
        call_sid, call_log_id, media_url = await _answered_call(engine, number)
        path = recording_path(load_settings(database_url=db_url, state_dir=str(tmp_path)), organization_id, call_log_id)
        path.mkdir(parents=True)  # a folder where the WAV file should go: closing the recording fails
        async with aiohttp.ClientSession() as http, http.ws_connect(media_url, headers=signed_upgrade(media_url)) as ws:
            await ws.send_str(CONNECTED)
            await ws.send_str(_start(call_sid, call_log_id))
            for chunk in range(1, 11):
                await ws.send_str(media(chunk, (chunk - 1) * 20))
                await asyncio.sleep(0.02)
        row = await finished_call_log(pool, call_log_id)
        analysed = await _analysis(pool, call_log_id)

    assert (row["status"], row["metadata"]["endReason"]) == ("FAILED", "stream_lost")
    assert row["recordingUrl"] is None
    assert analysed is not None


async def _analysis(pool: asyncpg.Pool, call_log_id: str) -> object:
    for _ in range(100):
        analysis = await pool.fetchval('SELECT "metadata"->\'analysis\' FROM "CallLog" WHERE "id" = $1', call_log_id)
        if analysis is not None:
            return analysis
        await asyncio.sleep(0.1)
    return None


async def test_media_streams_racing_for_one_call_run_it_once(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await make_line(pool, organization_id, firstSentence="Hello from the test line.")
    for _ in range(3):  # the streams of a call race anew each time
        call_sid, call_log_id, media_url = await _answered_call(engine, number)
        async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as sockets:
            streams = [
                await sockets.enter_async_context(http.ws_connect(media_url, headers=signed_upgrade(media_url)))
                for _ in range(3)
            ]
            for ws in streams:
                await ws.send_str(CONNECTED)
            await asyncio.gather(*(ws.send_str(_start(call_sid, call_log_id)) for ws in streams))
            heard = await asyncio.gather(*(spoken_to(ws) for ws in streams))

        assert sorted(heard) == [False, False, True]


async def spoken_to(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """Whether the engine sends the agent's audio on this stream (False: it closes the stream, or stays silent)."""
    try:
        while True:
            message = await ws.receive(timeout=5)
            if message.type is not aiohttp.WSMsgType.TEXT:
                return False
            if json.loads(message.data)["event"] == "media":
                return True
    except TimeoutError:
        return False
