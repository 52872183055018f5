"""The engine's SDK clients: one per vendor, key and endpoint, owned by the app and closed after the last work that
needs them (calls, then post-call analysis)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import pytest

from config.settings import load_settings
from engine.server.app import create_app
from engine.server.appkeys import PROVIDER_CLIENTS
from engine.simulator import Pause
from pipelines.clients import ProviderClients, ProviderClientsClosed
from storage import organizations
from tests.engine_server import running_engine
from tests.fakes.openai_chat import FakeOpenAI
from tests.fakes.server import serve
from tests.test_calls_e2e import call_log as finished_log
from tests.test_cloud_calls_e2e import DG_KEY, OPENAI_KEY, TOKEN, call, make_line

OFFLINE_SPEECH = {"stt": {"provider": "sphinx"}, "tts": {"provider": "espeak"}}


@pytest.fixture(scope="module")
async def organization_id(pool: asyncpg.Pool) -> str:
    org = await organizations.create_organization(pool, name="Clients", slug="provider-clients", credits=100)
    return org.id


async def test_an_engine_stopped_right_after_a_call_still_completes_the_calls_post_call_analysis(
    db_url: str, pool: asyncpg.Pool, organization_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeOpenAI(api_key=OPENAI_KEY) as openai:
        openai.json_delay_ms = 1000  # the model still thinks about the call when the engine is told to stop
        settings: dict[str, Any] = {"openai_api_key": OPENAI_KEY, "openai_base_url": openai.base_url}
        with caplog.at_level(logging.INFO):
            async with running_engine(db_url, twilio_auth_token=TOKEN, **settings) as engine:
                number, _ = await make_line(pool, organization_id, firstSentence="Hello there.", **OFFLINE_SPEECH)
                log = await finished_log(pool, await call(engine, number, Pause(300)))
                for _ in range(100):
                    if openai.json_requests:
                        break
                    await asyncio.sleep(0.05)
                assert openai.json_requests, "the post-call analysis never asked the model"
            # Leaving the block stops the engine, as SIGTERM does: the analysis is still waiting for its answer.
    metadata = await pool.fetchval('SELECT "metadata" FROM "CallLog" WHERE "id" = $1', log["id"])
    assert metadata["success"] is True, metadata.get("analysis")
    assert metadata["successReason"] == "The fake judged it."
    assert "client has been closed" not in caplog.text


async def test_the_deepgram_client_is_closed_when_the_engine_stops(db_url: str) -> None:
    settings = load_settings(database_url=db_url, deepgram_api_key=DG_KEY, deepgram_url="ws://127.0.0.1:9")
    app = create_app(settings, apply_migrations=False)
    async with serve(app):
        deepgram = app[PROVIDER_CLIENTS].deepgram(DG_KEY, settings.deepgram_url)  # the client calls are given
    with pytest.raises(RuntimeError, match="client has been closed"):
        await deepgram.manage.v1.projects.list()


async def test_one_client_serves_every_call_with_the_same_key_and_endpoint() -> None:
    clients = ProviderClients()
    try:
        deepgram = clients.deepgram(DG_KEY, "wss://deepgram.example")
        assert clients.deepgram(DG_KEY, "wss://deepgram.example") is deepgram
        assert clients.deepgram("dg-other", "wss://deepgram.example") is not deepgram
        assert clients.elevenlabs("el", "https://el.example") is clients.elevenlabs("el", "https://el.example")
        assert clients.http(allow_private=False) is clients.http(allow_private=False)
        assert clients.http(allow_private=True) is not clients.http(allow_private=False)
    finally:
        await clients.aclose()


async def test_closed_clients_refuse_to_hand_out_a_client() -> None:
    clients = ProviderClients()
    session = clients.http(allow_private=False)
    await clients.aclose()
    assert session.closed
    with pytest.raises(ProviderClientsClosed, match="openai client was asked for after"):
        clients.openai(OPENAI_KEY, "https://openai.example/v1")
    with pytest.raises(ProviderClientsClosed):
        clients.http(allow_private=False)
