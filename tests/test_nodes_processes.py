"""Three real `dialtone serve` processes on one database behind a load balancer that passes WebSockets, keeping
recordings in S3-compatible storage (moto's server on loopback):

a call placed through the balancer lands on one node; it is hung up through another node (the command travels
through PostgreSQL LISTEN/NOTIFY; no Twilio account anywhere); its recording is fetched through the third; and a
node killed mid-call leaves its call closed by the others.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from config.settings import load_settings
from engine.simulator import Pause
from storage import call_recordings
from storage.call_recordings import RecordingStatus
from tests.fakes.engine_processes import free_port, start_engine, wait_healthy
from tests.fakes.websocket_load_balancer import websocket_load_balancer
from tests.s3_server import s3_server
from tests.test_api_auth import Api, make_tenant
from tests.test_calls_e2e import TOKEN, call, finished_call_log, make_line
from tests.test_recording_object_storage import make_bucket

REPO = Path(__file__).resolve().parent.parent
BUCKET = "nodes"


async def holder_of(pool: asyncpg.Pool, organization_id: str) -> tuple[str, int]:
    """(call log id, process id of the node holding it) of the organization's call once a node has tagged it."""
    for _ in range(600):
        row = await pool.fetchrow(
            """SELECT c."id", n."pid" FROM "CallLog" c JOIN "EngineNode" n ON n."id" = c."metadata"->>'engineNode'
               WHERE c."organizationId" = $1 AND c."status" = 'IN_PROGRESS'""",
            organization_id,
        )
        if row is not None:
            return str(row["id"]), int(row["pid"])
        await asyncio.sleep(0.05)
    pytest.fail("no engine node took the call")


async def stored_recording(pool: asyncpg.Pool, call_log_id: str) -> call_recordings.CallRecording:
    for _ in range(600):
        row = await call_recordings.find_recording(pool, call_log_id=call_log_id)
        if row is not None and row.status is RecordingStatus.STORED:
            return row
        await asyncio.sleep(0.05)
    pytest.fail(f"the recording of call {call_log_id} was not uploaded")


async def test_three_nodes_share_calls_recordings_and_controls(pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    tenant = await make_tenant(pool, "Nodes")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello from a node.")
    ports = [free_port() for _ in range(3)]
    backends = [f"http://127.0.0.1:{port}" for port in ports]
    with s3_server() as s3:
        overrides = s3.settings(BUCKET)
        await make_bucket(load_settings(state_dir=tmp_path, **overrides))
        async with websocket_load_balancer(backends) as public_url:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_"))}
            env.update({f"DIALTONE_{name.upper()}": str(value) for name, value in overrides.items()})
            env.update(
                PYTHONPATH=str(REPO),
                DATABASE_URL=db_url,
                DIALTONE_PUBLIC_URL=public_url,
                DIALTONE_SECRET_KEY="s" * 64,
                DIALTONE_LOG_LEVEL="WARNING",
                DIALTONE_DISPATCH="false",
                DIALTONE_RECORDING_UPLOAD_INTERVAL="0.2",
                DIALTONE_NODE_HEARTBEAT_INTERVAL="0.3",
                DIALTONE_NODE_TIMEOUT="2",
                DIALTONE_RECOVERY_INTERVAL="0.5",
                DIALTONE_OFFLINE_WORKERS="1",
                TWILIO_AUTH_TOKEN=TOKEN,
            )
            engines = []
            for index, port in enumerate(ports):
                engines.append(
                    await start_engine(port, {**env, "DIALTONE_STATE_DIR": str(tmp_path / f"n{index}")}, tmp_path)
                )
            try:
                for backend, engine in zip(backends, engines, strict=True):
                    await wait_healthy(backend, engine)
                by_pid = {engine.pid: index for index, engine in enumerate(engines)}

                # A call through the balancer lands on one node; another hangs it up; the third serves its recording.
                running = asyncio.create_task(call(public_url, number, Pause(60_000), timeout_s=60))
                call_log_id, pid = await holder_of(pool, tenant.organization_id)
                holder = by_pid[pid]
                hanger, server = [index for index in range(3) if index != holder]
                async with aiohttp.ClientSession() as http:
                    status, body = await Api(http, backends[hanger]).call(
                        "POST", f"/live-calls/{call_log_id}/hangup", tenant.owner_key
                    )
                    assert (status, body) == (202, {"callLogId": call_log_id, "endedBy": "engine"})
                    await running
                    log = await finished_call_log(pool, call_log_id)
                    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "api_hangup")
                    recording = await stored_recording(pool, call_log_id)
                    link = backends[server] + "/recordings/" + log["recordingUrl"].split("/recordings/", 1)[1]
                    async with http.get(link, allow_redirects=False) as response:
                        assert response.status == 302
                        location = response.headers["Location"]
                    async with http.get(location) as response:
                        assert response.status == 200
                        audio = await response.read()
                assert audio[:4] == b"RIFF" and len(audio) == recording.bytes

                # A node killed mid-call: the others close its call.
                doomed_call = asyncio.create_task(call(public_url, number, Pause(60_000), timeout_s=60))
                orphan_id, pid = await holder_of(pool, tenant.organization_id)
                victim = engines[by_pid[pid]]
                victim.send_signal(signal.SIGKILL)
                await victim.wait()
                orphan = await finished_call_log(pool, orphan_id)
                assert (orphan["status"], orphan["metadata"]["endReason"]) == ("FAILED", "engine_lost")
                await doomed_call
            finally:
                for engine in engines:
                    if engine.returncode is None:
                        engine.send_signal(signal.SIGTERM)
                for engine in engines:
                    await asyncio.wait_for(engine.communicate(), 30)
