"""Hanging up through /v1 a call this engine process runs, with no Twilio account: a simulated call on the offline
pipeline is listed as running here, and the hang-up ends its media stream and finishes its CallLog."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from engine.simulator import CallEnding, Pause
from tests.engine_server import running_engine
from tests.test_api_auth import Api, make_tenant
from tests.test_calls_e2e import TOKEN, call, call_log, make_line


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    async with running_engine(db_url, twilio_auth_token=TOKEN) as base:  # no account SID: no Twilio REST client
        yield base


async def test_hang_up_ends_a_call_running_here(engine: str, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Local")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello from the hang-up line.")
    async with aiohttp.ClientSession() as session:
        api = Api(session, engine)
        running = asyncio.create_task(call(engine, number, Pause(60_000), timeout_s=90))
        live: list[dict[str, object]] = []
        for _ in range(300):
            _, page = await api.call("GET", "/live-calls", tenant.owner_key)
            live = page["data"]
            if live and live[0]["runsHere"]:  # the CallLog opens at the webhook; the session with the stream
                break
            await asyncio.sleep(0.05)
        assert [entry["runsHere"] for entry in live] == [True]
        status, body = await api.call("POST", f"/live-calls/{live[0]['id']}/hangup", tenant.owner_key)
        assert status == 202
        assert body == {"callLogId": live[0]["id"], "endedBy": "engine"}
        result = await running
    assert result.ending is CallEnding.ENGINE_CLOSED
    log = await call_log(pool, result)
    assert log["id"] == live[0]["id"]
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "api_hangup")
