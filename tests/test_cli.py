"""The `dialtone` command as a user runs it: real processes, the embedded database, clear one-line errors."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from config.settings import load_settings
from storage import call_recordings
from storage.migrate import load_migrations
from storage.recording_stores import object_key
from storage.recordings import sign_recording_url
from tests.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, s3_server
from tests.test_api_auth import make_tenant
from tests.test_recording_object_storage import WAV, make_bucket, store_for
from tests.test_repo_call_logs import open_call

DIALTONE = [sys.executable, "-m", "engine.server.cli"]
REPO = Path(__file__).resolve().parent.parent


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


async def _run(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *DIALTONE, *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_an_unreachable_database_gives_one_line_naming_host_and_cause(tmp_path: Path) -> None:
    env = _clean_env(DATABASE_URL="postgresql://dialtone:hunter2@127.0.0.1:1/dialtone")
    code, _, stderr = await _run("db", "status", env=env, cwd=tmp_path)
    assert code == 1
    assert stderr.strip() == "dialtone: DATABASE_URL: could not connect to 127.0.0.1:1/dialtone (connection refused)"
    assert "hunter2" not in stderr


async def test_a_bad_setting_is_named_and_nothing_starts(tmp_path: Path) -> None:
    code, _, stderr = await _run("db", "status", env=_clean_env(DIALTONE_PORT="eighty"), cwd=tmp_path)
    assert code == 2
    assert stderr.startswith("dialtone: DIALTONE_PORT:")
    assert "Traceback" not in stderr


async def test_two_processes_starting_the_embedded_database_at_once_both_succeed(tmp_path: Path) -> None:
    env = _clean_env(DIALTONE_STATE_DIR=str(tmp_path / "state"))
    results = await asyncio.gather(
        _run("db", "migrate", env=env, cwd=tmp_path), _run("db", "migrate", env=env, cwd=tmp_path)
    )
    for code, _, stderr in results:
        assert code == 0, stderr
    applied_lines = [line for _, stdout, _ in results for line in stdout.splitlines() if line.startswith("applied")]
    assert applied_lines == [f"applied {m.label}" for m in load_migrations()]


async def test_embedded_data_is_kept_across_restarts(tmp_path: Path) -> None:
    env = _clean_env(DIALTONE_STATE_DIR=str(tmp_path / "state"))
    first = await _run("db", "migrate", env=env, cwd=tmp_path)
    second = await _run("db", "status", env=env, cwd=tmp_path)
    assert first[0] == 0, first[2]
    assert second[0] == 0, second[2]
    assert f"schema version: {load_migrations()[-1].version}" in second[1]
    assert "up to date" in second[1]


async def test_serve_answers_health_and_stops_cleanly_on_sigterm(db_url: str, tmp_path: Path) -> None:
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        *DIALTONE,
        "serve",
        "--port",
        str(port),
        env=_clean_env(DATABASE_URL=db_url),
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        status = await _poll_health(f"http://127.0.0.1:{port}/health")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert status == 200
    assert process.returncode == 0
    log = stderr.decode()
    assert f"listening on http://127.0.0.1:{port}" in log
    # The cloud SDKs load before the first call, not on the event loop in the middle of calls.
    assert 0 <= log.find("cloud providers loaded in") < log.find("listening on")
    assert log.rstrip().endswith("stopped")
    assert "Traceback" not in log


async def test_serve_on_a_port_in_use_names_the_setting_to_change(db_url: str, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, _, stderr = await _run("serve", "--port", str(port), env=_clean_env(DATABASE_URL=db_url), cwd=tmp_path)

    assert code == 1
    assert stderr.splitlines()[-1] == (
        f"dialtone: DIALTONE_PORT: cannot listen on 127.0.0.1:{port} (address already in use); "
        "choose another port with DIALTONE_PORT (or --port)"
    )


async def test_serve_logs_requests_without_the_signature_of_a_recording_link(db_url: str, tmp_path: Path) -> None:
    port = _free_port()
    secret_key = "k" * 64
    base = f"http://127.0.0.1:{port}"
    link = sign_recording_url(base, "a" * 24, key=secret_key.encode(), expires_at=datetime.now(UTC) + timedelta(days=1))
    signature = link.rsplit("signature=", 1)[1]
    process = await asyncio.create_subprocess_exec(
        *DIALTONE,
        "serve",
        "--port",
        str(port),
        env=_clean_env(DATABASE_URL=db_url, DIALTONE_SECRET_KEY=secret_key, DIALTONE_LOG_LEVEL="DEBUG"),
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _poll_health(f"{base}/health")
        async with aiohttp.ClientSession() as http:
            async with http.get(link) as response:
                status = response.status
            # A request whose body the handler read (Twilio's webhooks are forms) is logged like any other.
            async with http.post(f"{base}/twilio/voice?from=test", data={"CallSid": "CA" + "0" * 32}) as response:
                posted = response.status
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    log = stderr.decode()
    assert status == 404  # a valid link to no recording
    assert f"/recordings/{'a' * 24}.wav" in log  # the request is logged, its credential is not
    assert signature not in log
    assert f'"POST /twilio/voice HTTP/1.1" {posted}' in log, log
    assert "Unhandled exception" not in log and "Traceback" not in log


async def test_serve_at_debug_logs_neither_the_presigned_link_of_a_recording_nor_the_s3_secret(
    db_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # botocore logs every signature it makes at DEBUG, the presigned link's among them ("botocore.auth: Signature:"),
    # next to the request it signs: a log reader could download the recording the link is for.
    tenant = await make_tenant(pool, "Logged")
    call = await open_call(pool, tenant.organization_id)
    port = _free_port()
    with s3_server() as s3:
        settings = load_settings(state_dir=tmp_path, **s3.settings("debug"))
        await make_bucket(settings)
        source = tmp_path / "call.wav"
        source.write_bytes(WAV)
        key = object_key(tenant.organization_id, call.id)
        async with store_for(settings) as store:
            await store.put(key, source)
        await call_recordings.add_recording(
            pool,
            organization_id=tenant.organization_id,
            call_log_id=call.id,
            store="s3",
            object_key=key,
            spool="test",
            local_path=str(source),
            size=len(WAV),
            stored=True,
            now=datetime.now(UTC),
        )
        env = _clean_env(
            DATABASE_URL=db_url,
            DIALTONE_LOG_LEVEL="DEBUG",
            DIALTONE_RECORDING_STORE="s3",
            DIALTONE_S3_BUCKET="debug",
            DIALTONE_S3_ENDPOINT_URL=s3.endpoint_url,
            DIALTONE_S3_ACCESS_KEY_ID=ACCESS_KEY_ID,
            DIALTONE_S3_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY,
        )
        process = await asyncio.create_subprocess_exec(
            *DIALTONE, "serve", "--port", str(port), env=env, cwd=tmp_path, stderr=asyncio.subprocess.PIPE
        )
        try:
            await _poll_health(f"http://127.0.0.1:{port}/health")
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"http://127.0.0.1:{port}/recordings/{call.id}.wav",
                    headers={"Authorization": f"Bearer {tenant.owner_key}"},
                    allow_redirects=False,
                ) as response,
            ):
                status, location = response.status, response.headers.get("Location", "")
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), 20)
    log = stderr.decode()
    assert status == 302, log
    signature = location.rsplit("X-Amz-Signature=", 1)[1]
    assert signature not in log
    assert SECRET_ACCESS_KEY not in log
    assert tenant.owner_key not in log


async def _poll_health(url: str, attempts: int = 600) -> int:
    # Up to a minute: a fresh database is migrated before the server listens, slowly on a loaded machine.
    async with aiohttp.ClientSession() as http:
        for _ in range(attempts):
            try:
                async with http.get(url) as response:
                    return response.status
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    pytest.fail(f"nothing answered at {url}")


@asynccontextmanager
async def _serving_the_demo(db_url: str, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """`dialtone seed-demo`, then `dialtone serve` on a port of its settings, running for the block: the settings a
    `dialtone call` in the same shell has (`DIALTONE_PORT=… make run`, then `dialtone call`)."""
    port = _free_port()
    env = _clean_env(DATABASE_URL=db_url, DIALTONE_PORT=str(port))
    code, _, stderr = await _run("seed-demo", env=env, cwd=tmp_path)
    assert code == 0, stderr
    process = await asyncio.create_subprocess_exec(
        *DIALTONE, "serve", env=env, cwd=tmp_path, stderr=asyncio.subprocess.PIPE
    )
    try:
        await _poll_health(f"http://127.0.0.1:{port}/health")
        yield env
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 20)


async def test_call_reaches_the_engine_on_the_port_serve_was_given_by_its_settings(db_url: str, tmp_path: Path) -> None:
    async with _serving_the_demo(db_url, tmp_path) as env:
        code, stdout, stderr = await _run("call", "--pause", "100", env=env, cwd=tmp_path)
    assert code == 0, stdout + stderr
    assert "webhook answered 200" in stdout
    assert "call ended: caller hung up" in stdout


async def test_call_prints_the_conversation_with_the_agents_words(db_url: str, tmp_path: Path) -> None:
    async with _serving_the_demo(db_url, tmp_path) as env:
        code, stdout, stderr = await _run(
            "call", "--say", "I would like to book an appointment", env=env, cwd=tmp_path, timeout=120
        )
    assert code == 0, stdout + stderr
    conversation = stdout.partition("\nconversation (CallLog ")[2].splitlines()[1:]
    # The demo agent's greeting, then the caller's words as the engine heard them, then the agent's answer.
    assert conversation[0].startswith("  Agent: Thanks for calling the Dialtone demo front desk."), stdout
    assert [line.split(":")[0] for line in conversation[:3]] == ["  Agent", "  Caller", "  Agent"], stdout
