"""A real `dialtone serve` process stopped by SIGTERM drains: it refuses new calls with 503 while the calls it holds
go on to their natural end, then it exits; calls still running when its drain time is up, or when a second signal
comes, end as `engine_shutdown`.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.simulator import HangUp, Pause, Say, SimulationError
from engine.twilio.webhooks import MEDIA_PATH
from storage import organizations
from storage.enums import Plan
from tests.fakes.engine_processes import DIALTONE, engine_environment, free_port, wait_healthy
from tests.test_calls_e2e import TOKEN, call, finished_call_log, make_line


@dataclass
class Engine:
    """A running `dialtone serve` process, its base URL, and the file its log goes to."""

    process: asyncio.subprocess.Process
    url: str
    log_file: Path

    def log(self) -> str:
        """What it has logged so far."""
        return self.log_file.read_text()

    async def exited(self) -> int:
        """Its exit code, once it has exited by itself (bounded, so a stuck engine fails the test)."""
        return await asyncio.wait_for(self.process.wait(), 60)


@asynccontextmanager
async def engine(db_url: str, tmp_path: Path, *, drain_seconds: float, **settings: str) -> AsyncIterator[Engine]:
    """`dialtone serve` checking signatures with TOKEN and draining for `drain_seconds`, with further `settings`
    (environment variables); killed if left running."""
    env = engine_environment(
        db_url,
        DIALTONE_STATE_DIR=str(tmp_path / "state"),
        DIALTONE_LOG_LEVEL="INFO",
        DIALTONE_DISPATCH="false",
        DIALTONE_OFFLINE_WORKERS="1",
        DIALTONE_DRAIN_SECONDS=str(drain_seconds),
        TWILIO_AUTH_TOKEN=TOKEN,
        **settings,
    )
    port = free_port()
    log_file = tmp_path / "engine.log"
    with log_file.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *DIALTONE, "serve", "--port", str(port), env=env, cwd=tmp_path, stderr=log
        )
    running = Engine(process, f"http://127.0.0.1:{port}", log_file)
    try:
        await wait_healthy(running.url, process)
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def line(pool: asyncpg.Pool) -> str:
    """A number answered by an offline agent of a new organization with credits and no concurrent-call limit."""
    org = await organizations.create_organization(
        pool, name="Drain", slug=f"drain-{secrets.token_hex(4)}", plan=Plan.ENTERPRISE, credits=100
    )
    number, _ = await make_line(pool, org.id, firstSentence="Hello from the draining line.")
    return number


async def held_call(pool: asyncpg.Pool, number: str) -> str:
    """The id of the number's call once the engine has taken its media stream."""
    for _ in range(600):
        call_log_id = await pool.fetchval(
            """SELECT c."id" FROM "CallLog" c JOIN "PhoneNumber" p ON p."organizationId" = c."organizationId"
               WHERE p."phoneNumber" = $1 AND c."status" = 'IN_PROGRESS' AND c."metadata" ? 'engineNode'""",
            number,
        )
        if call_log_id is not None:
            return str(call_log_id)
        await asyncio.sleep(0.05)
    pytest.fail(f"no call to {number} was taken")


async def health_once_stopping(url: str) -> tuple[int, dict[str, Any]]:
    """/health's answer once it is no longer 200 (the signal has been handled)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(url + "/health") as response:
                if response.status != 200:
                    return response.status, await response.json()
            await asyncio.sleep(0.05)
    pytest.fail("/health still answers 200")


async def test_a_stopping_engine_refuses_new_calls_and_lets_its_live_call_end_normally(
    db_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    number = await line(pool)
    async with engine(db_url, tmp_path, drain_seconds=60) as running:
        began = time.monotonic()
        # The caller waits, then asks, hears the answer and hangs up: all of it after the engine was told to stop.
        live = asyncio.create_task(call(running.url, number, Pause(5000), Say("I would like to book an appointment")))
        call_log_id = await held_call(pool, number)
        running.process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic() - began

        status, body = await health_once_stopping(running.url)
        assert (status, body["status"], body["liveCalls"]) == (503, "draining", 1)
        with pytest.raises(SimulationError, match="voice webhook answered HTTP 503"):
            await call(running.url, number, HangUp())
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(running.url + MEDIA_PATH)
        assert refused.value.status == 503

        result = await live
        assert await running.exited() == 0

    asked = next(event.at for event in result.events if event.who == "caller" and "appointment" in event.text)
    assert asked > signalled_at, "the caller spoke only after the engine was told to stop"
    replies = [utterance for utterance in result.utterances if utterance.started_at > asked]
    assert replies, "the agent answered the caller while the engine drained"
    log = await finished_call_log(pool, call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "caller_hangup")
    turns = await pool.fetch('SELECT "speaker" FROM "CallTurn" WHERE "callLogId" = $1 ORDER BY "index"', call_log_id)
    assert [turn["speaker"] for turn in turns][:3] == ["agent", "caller", "agent"]
    logged = running.log()
    assert "draining: refusing new calls, waiting up to 60 s for 1 live call(s)" in logged
    assert "drained: every live call has ended" in logged


async def test_calls_still_running_when_the_drain_time_is_up_end_as_engine_shutdown(
    db_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    number = await line(pool)
    async with engine(db_url, tmp_path, drain_seconds=2) as running:
        live = asyncio.create_task(call(running.url, number, Pause(60_000)))
        call_log_id = await held_call(pool, number)
        running.process.send_signal(signal.SIGTERM)
        status, body = await health_once_stopping(running.url)
        assert (status, body["status"]) == (503, "draining")
        assert await running.exited() == 0
        await live

    log = await finished_call_log(pool, call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "engine_shutdown")
    assert "drain time (2 s) is up: ending 1 live call(s) still running" in running.log()


async def test_a_second_signal_ends_the_drain_and_its_calls_at_once(
    db_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    number = await line(pool)
    async with engine(db_url, tmp_path, drain_seconds=3600) as running:
        live = asyncio.create_task(call(running.url, number, Pause(60_000)))
        call_log_id = await held_call(pool, number)
        running.process.send_signal(signal.SIGTERM)
        status, body = await health_once_stopping(running.url)
        assert (status, body["status"]) == (503, "draining")
        running.process.send_signal(signal.SIGINT)  # Ctrl-C, as `make run` gets it
        assert await running.exited() == 0, "stopped long before the hour's drain was up"
        await live

    log = await finished_call_log(pool, call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "engine_shutdown")
    logged = running.log()
    assert "second stop signal: ending the live calls now" in logged
    assert "drain cut short by a second signal: ending 1 live call(s) now" in logged
