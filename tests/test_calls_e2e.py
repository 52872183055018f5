"""Whole calls through the real server: Twilio's webhook and media stream (the simulator), real providers,
real PostgreSQL. Each test reads the outcome a user would see: the CallLog, its turns, the frames sent."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import sys
from base64 import b64encode
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from twilio.request_validator import RequestValidator

from config.agent import parse_agent_configuration
from engine.simulator import CallResult, DropAudio, Dtmf, HangUp, Pause, Say, simulate_call
from storage import agents, campaigns, conversation_paths, organizations, phone_numbers
from storage.demo import DEMO_PATH_EDGES, DEMO_PATH_NODES
from storage.enums import AgentStatus, CallerType, Plan
from storage.records import Queryable
from tests.engine_server import running_engine

TOKEN = "test-auth-token-0123456789abcdef"
CALLER = "+15005550006"
_numbers = itertools.count(200)
REPO = str(Path(__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    """The engine on loopback, checking Twilio signatures with TOKEN."""
    async with running_engine(db_url, twilio_auth_token=TOKEN) as base:
        yield base


@pytest.fixture(scope="module")
async def organization_id(pool: asyncpg.Pool) -> str:
    """One organization with credits for every line of this module, on the plan without a concurrent-call limit."""
    org = await organizations.create_organization(
        pool, name="Calls", slug="calls-e2e", plan=Plan.ENTERPRISE, credits=500
    )
    return org.id


async def make_line(
    pool: asyncpg.Pool,
    organization_id: str,
    *,
    nodes: list[dict[str, Any]] | None = None,
    edges: list[dict[str, Any]] | None = None,
    **behaviour: Any,
) -> tuple[str, str]:
    """A phone number answered by a new offline agent following the given path; returns (number, agent id)."""
    number = await phone_numbers.create_phone_number(
        pool, organization_id=organization_id, phone_number=f"+1555555{next(_numbers):04d}"
    )
    config = {"stt": {"provider": "sphinx"}, "llm": {"provider": "conversation_path"}, "tts": {"provider": "espeak"}}
    agent = await agents.create_agent(
        pool,
        organization_id=organization_id,
        name=f"agent for {number.phone_number}",
        status=AgentStatus.ACTIVE,
        caller_type=CallerType.INBOUND,
        phone_number_id=number.id,
        configuration=parse_agent_configuration({**config, **behaviour}).to_json(),
    )
    path = await conversation_paths.create_conversation_path(
        pool,
        organization_id=organization_id,
        name="path",
        nodes=nodes if nodes is not None else DEMO_PATH_NODES,
        edges=edges if edges is not None else DEMO_PATH_EDGES,
    )
    await agents.link_conversation_path(
        pool, organization_id=organization_id, agent_id=agent.id, conversation_path_id=path.id
    )
    return number.phone_number, agent.id


async def call(engine: str, number: str, *steps: Any, timeout_s: float = 90) -> CallResult:
    """Place one simulated call."""
    return await simulate_call(engine, to=number, from_=CALLER, script=steps, auth_token=TOKEN, timeout_s=timeout_s)


async def call_log(pool: asyncpg.Pool, result: CallResult) -> asyncpg.Record:
    """The call's CallLog row once its session has finished it (the writer may still be at work briefly)."""
    call_log_id = await pool.fetchval('SELECT "id" FROM "CallLog" WHERE "callId" = $1', result.call_sid)
    assert call_log_id is not None, f"no CallLog for {result.call_sid}"
    return await finished_call_log(pool, call_log_id)


async def finished_call_log(pool: asyncpg.Pool, call_log_id: str) -> asyncpg.Record:
    """The CallLog once something has finished it."""
    for _ in range(100):
        row = await pool.fetchrow('SELECT * FROM "CallLog" WHERE "id" = $1', call_log_id)
        if row is not None and row["status"] != "IN_PROGRESS":
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"CallLog {call_log_id} never finished")


async def turns(pool: asyncpg.Pool, call_log_id: str) -> list[asyncpg.Record]:
    """The call's turns, in order."""
    return await pool.fetch('SELECT * FROM "CallTurn" WHERE "callLogId" = $1 ORDER BY "index"', call_log_id)


async def test_an_inbound_call_walks_the_path_and_its_call_log_is_written_while_it_runs(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, agent_id = await make_line(pool, organization_id, firstSentence="Hello from the test line.")
    credits_before = await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', organization_id)
    running = asyncio.create_task(
        call(engine, number, Say("I would like to book an appointment"), Say("tuesday please"))
    )
    seen_live: list[tuple[str, int]] = []
    while not running.done():
        row = await pool.fetchrow(
            'SELECT l."status", count(t."id") AS n FROM "CallLog" l LEFT JOIN "CallTurn" t ON t."callLogId" = l."id"'
            ' WHERE l."agentId" = $1 GROUP BY l."status"',
            agent_id,
        )
        if row is not None:
            seen_live.append((row["status"], row["n"]))
        await asyncio.sleep(0.25)
    result = await running

    assert any(status == "IN_PROGRESS" and n >= 2 for status, n in seen_live), seen_live
    log = await call_log(pool, result)
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "path_end")
    assert log["callType"] == "INBOUND"
    assert log["phoneNumber"] == CALLER
    assert log["duration"] >= 5
    rows = await turns(pool, log["id"])
    assert [r["speaker"] for r in rows] == ["agent", "caller", "agent", "caller", "agent"]
    assert rows[0]["text"].startswith("Hello from the test line. Would you like to book an appointment")
    assert "book" in rows[1]["text"]
    assert rows[2]["text"] == "Sure. Which day would suit you, Monday to Friday?"
    assert "tuesday" in rows[3]["text"]
    assert rows[4]["text"].startswith("Great, you are booked in.")
    assert all(r["latencyMs"] is not None for r in rows[2::2])
    assert all(r["startMs"] <= r["endMs"] for r in rows)
    assert [r["startMs"] for r in rows] == sorted(r["startMs"] for r in rows)
    assert log["transcript"].splitlines()[1].startswith("Caller:")
    assert await pool.fetchval('SELECT "totalCalls" FROM "Agent" WHERE "id" = $1', agent_id) == 1
    charged = credits_before - await pool.fetchval(
        'SELECT "credits" FROM "Organization" WHERE "id" = $1', organization_id
    )
    assert charged == -(-log["duration"] // 60)
    async with aiohttp.ClientSession() as http, http.get(log["recordingUrl"]) as response:
        wav = await response.read()
    assert response.status == 200
    assert wav[:4] == b"RIFF"


async def test_the_caller_talking_over_the_agent_clears_playback_and_keeps_only_what_was_heard(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    long_opening = (
        "Welcome to the test line. This opening is long on purpose, so that the caller has plenty of time to "
        "interrupt it before it ends, which is exactly what this test is about."
    )
    number, _ = await make_line(pool, organization_id, firstSentence=long_opening)
    result = await call(engine, number, Say("I would like to book an appointment", barge_in_after_ms=2000))
    log = await call_log(pool, result)
    rows = await turns(pool, log["id"])

    assert result.clears, "the engine never sent clear"
    assert any(mark.flushed for mark in result.marks)
    opening = rows[0]
    assert opening["speaker"] == "agent"
    assert opening["interrupted"] is True
    heard = opening["text"]
    assert heard and long_opening.startswith(heard)
    assert len(heard) < len(long_opening) / 2
    assert rows[1]["speaker"] == "caller"
    assert "book" in rows[1]["text"]
    assert rows[2]["text"] == "Sure. Which day would suit you, Monday to Friday?"


async def test_dtmf_digits_are_caller_input(engine: str, pool: asyncpg.Pool, organization_id: str) -> None:
    nodes = [
        {"id": "menu", "data": {"isStart": True, "text": "Press one for sales or two for support."}},
        {"id": "sales", "data": {"text": "Connecting you to sales. Goodbye.", "endCall": True}},
        {"id": "support", "data": {"text": "Connecting you to support. Goodbye.", "endCall": True}},
    ]
    edges = [
        {"id": "1", "source": "menu", "target": "sales", "data": {"digit": "1"}},
        {"id": "2", "source": "menu", "target": "support", "data": {"digit": "2"}},
    ]
    number, _ = await make_line(pool, organization_id, nodes=nodes, edges=edges)
    result = await call(engine, number, Dtmf("2"))
    log = await call_log(pool, result)
    rows = await turns(pool, log["id"])

    assert result.dtmf_sent == ["2"]
    assert [(r["speaker"], r["text"]) for r in rows[1:]] == [
        ("caller", "[DTMF 2]"),
        ("agent", "Connecting you to support. Goodbye."),
    ]
    assert log["metadata"]["endReason"] == "path_end"


async def test_a_call_reaching_its_maximum_duration_ends_with_a_goodbye(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await make_line(
        pool,
        organization_id,
        maxDurationSeconds=10,
        goodbyeSentence="Time is up. Goodbye from {{ company }}.",  # filled as the first sentence is
        variables={"company": "Acme"},
    )
    result = await call(engine, number, Pause(20_000))
    log = await call_log(pool, result)
    rows = await turns(pool, log["id"])

    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "max_duration")
    assert rows[-1]["speaker"] == "agent"
    assert rows[-1]["text"] == "Time is up. Goodbye from Acme."
    assert 10 <= log["duration"] <= 20


async def test_a_silent_caller_is_said_goodbye_to_after_the_silence_timeout(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await make_line(pool, organization_id, silenceTimeoutSeconds=5)
    result = await call(engine, number, Pause(30_000))
    log = await call_log(pool, result)

    assert log["metadata"]["endReason"] == "silence_timeout"
    assert log["duration"] < 25


async def test_a_caller_hanging_up_mid_sentence_completes_the_call_with_what_was_heard(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await make_line(
        pool, organization_id, firstSentence="This is a long welcome that the caller will not wait to hear the end of."
    )
    result = await call(engine, number, Pause(1500), HangUp())
    log = await call_log(pool, result)
    rows = await turns(pool, log["id"])

    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "caller_hangup")
    assert len(rows) == 1
    assert rows[0]["interrupted"] is True


async def test_a_forged_signature_is_refused_and_creates_nothing(engine: str, pool: asyncpg.Pool) -> None:
    count_before = await pool.fetchval('SELECT count(*) FROM "CallLog"')
    form = {"CallSid": "CA" + "f" * 32, "AccountSid": "AC" + "0" * 32, "From": CALLER, "To": "+15555550999"}
    forged = RequestValidator("not-the-token").compute_signature(f"{engine}/twilio/voice", form)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{engine}/twilio/voice", data=form, headers={"X-Twilio-Signature": forged}) as bad:
            bad_status = bad.status
        async with http.post(f"{engine}/twilio/voice", data=form) as unsigned:
            unsigned_status = unsigned.status
    assert (bad_status, unsigned_status) == (403, 403)
    assert await pool.fetchval('SELECT count(*) FROM "CallLog"') == count_before


async def _start_stream_during(
    pool: asyncpg.Pool, answered: tuple[str, str, str], change: Callable[[Queryable], Awaitable[object]]
) -> None:
    """Start the media stream of an `answered` call, with `change` made and committed just as the stream, having
    taken its CallLog, reads its agent: a lock that reading waits for is held until then. The stream ends at once
    (Twilio's stop)."""
    call_sid, call_log_id, media_url = answered
    async with (
        pool.acquire() as changing,
        aiohttp.ClientSession() as http,
        http.ws_connect(media_url, headers=signed_upgrade(media_url)) as ws,
    ):
        transaction = changing.transaction()
        await transaction.start()
        await changing.execute('LOCK TABLE "Tool" IN ACCESS EXCLUSIVE MODE')
        await ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send_str(_start(call_sid, call_log_id))
        for _ in range(200):
            if await pool.fetchval(
                """SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = '"Tool"'::regclass"""
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the stream never read the call's agent")
        await change(changing)
        await transaction.commit()
        stop = {"accountSid": "AC" + "1" * 32, "callSid": call_sid}
        await ws.send_str(
            json.dumps({"event": "stop", "sequenceNumber": "2", "streamSid": "MZ" + "2" * 32, "stop": stop})
        )


async def test_an_agent_deleted_as_its_call_stream_starts_fails_the_call_at_once_as_agent_deleted(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, agent_id = await make_line(pool, organization_id)

    async def delete_agent(db: Queryable) -> None:
        await agents.delete_agent(db, organization_id=organization_id, agent_id=agent_id)

    answered = await _answered_call(engine, number)
    await _start_stream_during(pool, answered, delete_agent)
    log = await finished_call_log(pool, answered[1])
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "agent_deleted")
    assert log["agentId"] is None


async def test_a_campaign_deleted_as_its_call_stream_starts_leaves_a_call_of_the_agent_alone(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, agent_id = await make_line(pool, organization_id)
    campaign = await campaigns.create_campaign(
        pool, organization_id=organization_id, batch_name="deleted at the stream's start", agent_id=agent_id
    )
    answered = await _answered_call(engine, number)
    # The call was placed for the campaign (its CallLog names it) before the campaign went.
    await pool.execute('UPDATE "CallLog" SET "campaignId" = $1 WHERE "id" = $2', campaign.id, answered[1])

    async def delete_campaign(db: Queryable) -> None:
        await campaigns.delete_campaign(db, organization_id=organization_id, campaign_id=campaign.id)

    await _start_stream_during(pool, answered, delete_campaign)
    log = await finished_call_log(pool, answered[1])
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "caller_hangup")
    assert log["campaignId"] is None


async def _answered_call(engine: str, number: str) -> tuple[str, str, str]:
    """Ring the engine as Twilio would; return (CallSid, CallLog id, media URL) from its TwiML."""
    call_sid = "CA" + secrets.token_hex(16)
    form = {"CallSid": call_sid, "AccountSid": "AC" + "1" * 32, "From": CALLER, "To": number}
    signature = RequestValidator(TOKEN).compute_signature(f"{engine}/twilio/voice", form)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{engine}/twilio/voice", data=form, headers={"X-Twilio-Signature": signature}) as response,
    ):
        twiml = await response.text()
    call_log_id = twiml.split('name="callLogId" value="')[1].split('"')[0]
    media_url = twiml.split('url="')[1].split('"')[0]
    return call_sid, call_log_id, media_url


def signed_upgrade(media_url: str) -> dict[str, str]:
    """The header Twilio opens the media WebSocket at `media_url` with: its signature of the URL."""
    return {"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(media_url, {})}


def _start(call_sid: str, call_log_id: str) -> str:
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": "MZ" + "2" * 32,
            "start": {
                "streamSid": "MZ" + "2" * 32,
                "accountSid": "AC" + "1" * 32,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "customParameters": {"callLogId": call_log_id},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    )


_MALFORMED = {
    "bad_json": "{not json",
    "invalid_base64": json.dumps(
        {
            "event": "media",
            "sequenceNumber": "2",
            "streamSid": "MZ" + "2" * 32,
            "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": "%%%not base64%%%"},
        }
    ),
    "unknown_event": json.dumps({"event": "teleport", "sequenceNumber": "2", "streamSid": "MZ" + "2" * 32}),
    "oversized": json.dumps({"event": "media", "padding": "x" * 200_000}),
    "over_a_megabyte": json.dumps({"event": "media", "padding": "x" * 1_100_000}),
    "nested_thousands_deep": "[" * 3000,
    "number_of_5000_digits": json.dumps(
        {
            "event": "media",
            "sequenceNumber": "2",
            "streamSid": "MZ" + "2" * 32,
            "media": {"track": "inbound", "chunk": "1", "timestamp": "9" * 5000, "payload": "//8="},
        }
    ),
    "timestamp_ten_minutes_ahead": json.dumps(
        {
            "event": "media",
            "sequenceNumber": "2",
            "streamSid": "MZ" + "2" * 32,
            "media": {"track": "inbound", "chunk": "1", "timestamp": "600000", "payload": "//8="},
        }
    ),
}
_MALFORMED_ERRORS = {
    "bad_json": "MalformedMessage: ",
    "invalid_base64": "MalformedMessage: ",
    "unknown_event": "UnknownEvent: ",
    "oversized": "MessageTooLarge: ",
    "over_a_megabyte": "MessageTooLarge: ",
    "nested_thousands_deep": "MalformedMessage: ",
    "number_of_5000_digits": "MalformedMessage: ",
    "timestamp_ten_minutes_ahead": "AheadOfRealTime: ",
}


async def test_malformed_input_fails_only_that_call_while_another_carries_on(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    # One call of each kind of malformed input, all while a good call runs: each fails alone, the good one completes.
    good_number, _ = await make_line(pool, organization_id)
    good = asyncio.create_task(call(engine, good_number, Say("what are your opening hours"), Say("no thanks bye")))
    await asyncio.sleep(1.0)

    async def malformed_call(kind: str) -> tuple[str, dict[str, str]]:
        bad_number, _ = await make_line(pool, organization_id)
        call_sid, call_log_id, media_url = await _answered_call(engine, bad_number)
        async with aiohttp.ClientSession() as http, http.ws_connect(media_url, headers=signed_upgrade(media_url)) as ws:
            await ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send_str(_start(call_sid, call_log_id))
            await asyncio.sleep(0.3)
            await ws.send_str(_MALFORMED[kind])
            closed = await ws.receive(timeout=10)
            while closed.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                closed = await ws.receive(timeout=10)
        bad_log = await finished_call_log(pool, call_log_id)  # aiohttp itself closes on a frame over its limit
        return kind, {"status": bad_log["status"], **bad_log["metadata"]}

    ended = dict(await asyncio.gather(*(malformed_call(kind) for kind in sorted(_MALFORMED))))
    result = await good

    for kind, expected in _MALFORMED_ERRORS.items():
        assert (ended[kind]["status"], ended[kind]["endReason"]) == ("FAILED", "protocol_error"), kind
        assert ended[kind]["endDetail"].startswith(expected), (kind, ended[kind]["endDetail"])
    good_log = await call_log(pool, result)
    assert (good_log["status"], good_log["metadata"]["endReason"]) == ("COMPLETED", "path_end")


async def test_media_before_start_closes_the_stream_and_the_status_callback_fails_the_call(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await make_line(pool, organization_id)
    call_sid, call_log_id, media_url = await _answered_call(engine, number)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(media_url, headers=signed_upgrade(media_url)) as ws:
            await ws.send_str(_MALFORMED["invalid_base64"].replace("%%%not base64%%%", "//8="))
            message = await ws.receive(timeout=10)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        form = {"CallSid": call_sid, "AccountSid": "AC" + "1" * 32, "CallStatus": "completed", "CallDuration": "3"}
        signature = RequestValidator(TOKEN).compute_signature(f"{engine}/twilio/status", form)
        async with http.post(f"{engine}/twilio/status", data=form, headers={"X-Twilio-Signature": signature}) as r:
            assert r.status == 204
    row = await pool.fetchrow('SELECT * FROM "CallLog" WHERE "id" = $1', call_log_id)
    assert row is not None
    assert (row["status"], row["metadata"]["endReason"]) == ("FAILED", "stream_never_started")


async def test_twenty_concurrent_calls_all_complete_with_their_own_call_logs(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, agent_id = await make_line(pool, organization_id)
    results = await asyncio.gather(
        *(call(engine, number, Say("I would like to book an appointment"), Say("tuesday please")) for _ in range(20))
    )
    logs = [await call_log(pool, result) for result in results]

    assert len({log["id"] for log in logs}) == 20
    assert [log["status"] for log in logs] == ["COMPLETED"] * 20
    off_path = [
        (log["metadata"]["endReason"], log["transcript"]) for log in logs if log["metadata"]["endReason"] != "path_end"
    ]
    assert off_path == []
    for log in logs:
        assert [r["speaker"] for r in await turns(pool, log["id"])] == ["agent", "caller", "agent", "caller", "agent"]
    assert await pool.fetchval('SELECT "totalCalls" FROM "Agent" WHERE "id" = $1', agent_id) == 20


async def test_the_agent_hangs_up_through_twilios_rest_api_when_it_has_credentials(
    db_url: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    account_sid = "AC" + "9" * 32
    hang_ups: list[tuple[str, str, str]] = []

    async def update_call(request: web.Request) -> web.Response:
        form = await request.post()
        hang_ups.append((request.match_info["call_sid"], str(form.get("Status")), request.headers["Authorization"]))
        return web.json_response({"sid": request.match_info["call_sid"], "status": "completed"})

    fake_twilio = web.Application()
    fake_twilio.router.add_post("/2010-04-01/Accounts/{account}/Calls/{call_sid}.json", update_call)
    runner = web.AppRunner(fake_twilio)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api_base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    nodes = [{"id": "bye", "data": {"isStart": True, "text": "We are closed today. Goodbye.", "endCall": True}}]
    number, _ = await make_line(pool, organization_id, nodes=nodes, edges=[])
    try:
        async with running_engine(
            db_url, twilio_auth_token=TOKEN, twilio_account_sid=account_sid, twilio_api_base=api_base
        ) as engine:
            result = await call(engine, number)
    finally:
        await runner.cleanup()
    log = await call_log(pool, result)

    assert [(sid, status) for sid, status, _ in hang_ups] == [(result.call_sid, "completed")]
    assert hang_ups[0][2] == "Basic " + b64encode(f"{account_sid}:{TOKEN}".encode()).decode()
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "path_end")


async def test_dialtone_call_places_a_call_from_the_command_line(
    engine: str, pool: asyncpg.Pool, organization_id: str, tmp_path: Path
) -> None:
    number, agent_id = await make_line(pool, organization_id)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_"))}
    env |= {"PYTHONPATH": REPO, "TWILIO_AUTH_TOKEN": TOKEN}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.server.cli", "call", "--url", engine, "--to", number,
        "--say", "what are your opening hours", "--say", "no thanks bye", "--save", str(tmp_path / "heard.wav"),
        env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 90)
    printed = output.decode()

    assert process.returncode == 0, printed
    assert "caller: what are your opening hours" in printed
    assert (tmp_path / "heard.wav").stat().st_size > 44
    row = await pool.fetchrow('SELECT * FROM "CallLog" WHERE "agentId" = $1', agent_id)
    assert row is not None
    assert (row["status"], row["metadata"]["endReason"]) == ("COMPLETED", "path_end")


async def inbound_gap_metrics(engine: str) -> tuple[float, float]:
    """The engine's (gaps, missing ms) counters of inbound media, from /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"{engine}/metrics") as response:
        text = await response.text()
    values = dict(line.split(" ") for line in text.splitlines() if line.startswith("dialtone_inbound_media_gap"))
    return float(values["dialtone_inbound_media_gaps_total"]), float(values["dialtone_inbound_media_gap_ms_total"])


async def test_caller_audio_twilio_dropped_reaches_the_call_log_and_the_metrics(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await make_line(pool, organization_id, firstSentence="Hi.")
    gaps_before, ms_before = await inbound_gap_metrics(engine)

    result = await call(engine, number, Pause(200), DropAudio(500), Pause(200), HangUp())

    log = await call_log(pool, result)
    assert log["metadata"]["inboundGaps"] == {"count": 1, "totalMs": 500, "longestMs": 500}
    assert await inbound_gap_metrics(engine) == (gaps_before + 1, ms_before + 500)


LONG_UTTERANCE = " ".join(["i would like to book an appointment for next tuesday morning at ten my name is alex"] * 4)
"""About 18 s of speech without a pause: PocketSphinx decodes it as one utterance, a second or more of CPU."""


async def test_a_long_utterance_on_one_call_never_stalls_health_or_another_call(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    long_number, _ = await make_line(pool, organization_id)
    other_number, _ = await make_line(pool, organization_id)
    stalls: list[float] = []
    health: list[int] = []
    done = asyncio.Event()

    async def watch_loop() -> None:
        # Every stall of the loop (the engine's and ours) shows up as a late wake-up of this timer.
        loop = asyncio.get_running_loop()
        while not done.is_set():
            due = loop.time() + 0.02
            await asyncio.sleep(0.02)
            stalls.append(loop.time() - due)

    async def poll_health() -> None:
        async with aiohttp.ClientSession() as http:
            while not done.is_set():
                async with http.get(f"{engine}/health") as response:
                    health.append(response.status)
                await asyncio.sleep(0.1)

    watchers = [asyncio.create_task(watch_loop()), asyncio.create_task(poll_health())]
    try:
        long_call, other_call = await asyncio.gather(
            call(engine, long_number, Say(LONG_UTTERANCE), Pause(6000), HangUp()),
            call(engine, other_number, Pause(4000), Say("what are your opening hours"), Say("no thanks bye")),
        )
    finally:
        done.set()
        await asyncio.gather(*watchers)

    long_rows = await turns(pool, (await call_log(pool, long_call))["id"])
    assert "appointment" in " ".join(r["text"] for r in long_rows if r["speaker"] == "caller").split()
    other_log = await call_log(pool, other_call)
    assert (other_log["status"], other_log["metadata"]["endReason"]) == ("COMPLETED", "path_end")
    assert len(health) > 50 and set(health) == {200}
    assert max(stalls) < 0.5, f"the event loop stalled for {max(stalls) * 1000:.0f} ms"
