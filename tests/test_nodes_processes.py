"""Three real `dialtone serve` processes on one database behind a load balancer that passes WebSockets, keeping
recordings in S3-compatible storage (moto's server on loopback):

a call placed through the balancer lands on one node; it is hung up through another node (the command travels
through PostgreSQL LISTEN/NOTIFY; no Twilio account anywhere); its recording is fetched through the third; and a
node killed mid-call leaves its call closed by the others. A listener joining through one node as the call ends on
another is told it ended; one whose node waits for the holding node's answer while another listener there comes and
goes hears the call.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from config.settings import load_settings
from engine.simulator import Pause
from storage import call_recordings
from storage.call_recordings import RecordingStatus
from tests.fakes.engine_processes import engine_environment, free_port, start_engine, wait_healthy
from tests.fakes.websocket_load_balancer import websocket_load_balancer
from tests.s3_server import s3_server
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_api_live_listen import listen, url_of
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


@dataclass(frozen=True, slots=True)
class HeldCall:
    """A call of `tenant` in progress on one of two real nodes: `holder` runs it, `other` is reached at `through`."""

    tenant: Tenant
    call_log_id: str
    holder: asyncio.subprocess.Process
    other: asyncio.subprocess.Process
    through: str
    http: aiohttp.ClientSession

    def listen(self) -> asyncio.Task[aiohttp.ClientWebSocketResponse]:
        """Open a listen socket to the call through `other`, in the background."""
        headers = {"Authorization": f"Bearer {self.tenant.owner_key}"}
        return asyncio.create_task(self.http.ws_connect(url_of(self.through, self.call_log_id), headers=headers))

    async def hang_up(self) -> tuple[int, Any]:
        """Hang the call up through `other`."""
        return await Api(self.http, self.through).call(
            "POST", f"/live-calls/{self.call_log_id}/hangup", self.tenant.owner_key
        )


@asynccontextmanager
async def call_held_by_one_of_two_nodes(pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> AsyncIterator[HeldCall]:
    """Two `dialtone serve` processes on the database and a silent caller on one; stopped (resumed first) at exit."""
    tenant = await make_tenant(pool, "Held")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello from a node.")
    ports = [free_port() for _ in range(2)]
    backends = [f"http://127.0.0.1:{port}" for port in ports]
    env = engine_environment(
        db_url,
        DIALTONE_SECRET_KEY="s" * 64,
        DIALTONE_LOG_LEVEL="WARNING",
        DIALTONE_DISPATCH="false",
        DIALTONE_OFFLINE_WORKERS="1",
        TWILIO_AUTH_TOKEN=TOKEN,
    )
    engines = [
        await start_engine(port, {**env, "DIALTONE_STATE_DIR": str(tmp_path / f"n{index}")}, tmp_path)
        for index, port in enumerate(ports)
    ]
    try:
        for backend, engine in zip(backends, engines, strict=True):
            await wait_healthy(backend, engine)
        running = asyncio.create_task(call(backends[0], number, Pause(60_000), timeout_s=60))
        call_log_id, pid = await holder_of(pool, tenant.organization_id)
        holder, other = sorted(engines, key=lambda engine: engine.pid != pid)
        async with aiohttp.ClientSession() as http:
            yield HeldCall(tenant, call_log_id, holder, other, backends[engines.index(other)], http)
        await running
    finally:
        for engine in engines:
            if engine.returncode is None:
                engine.send_signal(signal.SIGCONT)
                engine.send_signal(signal.SIGTERM)
        for engine in engines:
            await asyncio.wait_for(engine.communicate(), 30)


async def test_a_listener_joining_through_another_node_as_the_call_ends_is_told_it_ended(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    async with call_held_by_one_of_two_nodes(pool, db_url, tmp_path) as held:
        # The holding node, stopped, takes the listen command and then the hang-up together once it runs again; the
        # listener's node, stopped meanwhile, then reads the lease's acknowledgement with the end of the call's audio.
        held.holder.send_signal(signal.SIGSTOP)
        joining = held.listen()
        await asyncio.sleep(0.3)
        hanging = asyncio.create_task(held.hang_up())
        await asyncio.sleep(0.3)
        held.other.send_signal(signal.SIGSTOP)
        held.holder.send_signal(signal.SIGCONT)
        await asyncio.sleep(1.5)
        held.other.send_signal(signal.SIGCONT)
        assert await hanging == (202, {"callLogId": held.call_log_id, "endedBy": "engine"})
        async with await joining as ws:
            listened = await asyncio.wait_for(listen(ws), 30)
    assert listened.start["callLogId"] == held.call_log_id
    assert listened.stop == {"event": "stop", "reason": "call ended"}


async def test_a_listener_hears_the_call_though_another_came_and_left_while_the_holding_node_was_asked(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    async with call_held_by_one_of_two_nodes(pool, db_url, tmp_path) as held:
        # The holding node, stopped, answers nothing: the first listener's node waits for its lease while a second
        # listener joins that wait and leaves.
        held.holder.send_signal(signal.SIGSTOP)
        first = held.listen()
        await asyncio.sleep(0.5)
        async with await held.listen() as second:
            assert (await second.receive_json(timeout=10))["event"] == "start"
        await asyncio.sleep(0.5)
        held.holder.send_signal(signal.SIGCONT)
        async with await first as ws:
            assert (await ws.receive_json(timeout=10))["event"] == "start"
            heard = await ws.receive(timeout=10)
        assert await held.hang_up() == (202, {"callLogId": held.call_log_id, "endedBy": "engine"})
    assert heard.type is aiohttp.WSMsgType.BINARY
