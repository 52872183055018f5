"""Seed fields that reach a call: the agent's language at every provider, Tool.isConnected, Voice.status.

Whole calls through the real server and PostgreSQL; Deepgram, OpenAI and ElevenLabs are local fakes speaking their
wire protocols, reached through the vendors' SDKs (tests/test_cloud_calls_e2e.py has the same set-up).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from config.agent import parse_agent_configuration
from engine.simulator import Pause, Say
from pipelines.registry import DEFAULT_ELEVENLABS_VOICE
from storage import agents, organizations, phone_numbers, tools, voices
from storage.enums import AgentStatus, CallerType, VoiceStatus
from tests.engine_server import running_engine
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.elevenlabs import FakeElevenLabs
from tests.fakes.openai_chat import FakeOpenAI
from tests.test_calls_e2e import call_log as finished_log
from tests.test_cloud_calls_e2e import CLOUD, DG_KEY, EL_KEY, OPENAI_KEY, TOKEN, Fakes, call

_numbers = itertools.count(100)


@pytest.fixture(scope="module")
async def fakes() -> AsyncIterator[Fakes]:
    async with (
        FakeDeepgram(api_key=DG_KEY) as deepgram,
        FakeOpenAI(api_key=OPENAI_KEY) as openai,
        FakeElevenLabs(api_key=EL_KEY, ms_per_char=10) as elevenlabs,
    ):
        yield Fakes(deepgram, openai, elevenlabs)


@pytest.fixture(scope="module")
async def engine(db_url: str, fakes: Fakes) -> AsyncIterator[str]:
    async with running_engine(db_url, twilio_auth_token=TOKEN, **fakes.settings()) as base:
        yield base


@pytest.fixture(scope="module")
async def organization_id(pool: asyncpg.Pool) -> str:
    org = await organizations.create_organization(pool, name="Fields", slug="fields-calls", credits=500)
    return org.id


async def line(
    pool: asyncpg.Pool, organization_id: str, voice_id: str | None = None, **configuration: Any
) -> tuple[str, str]:
    """A number answered by a new cloud agent; returns (number, agent id)."""
    number = await phone_numbers.create_phone_number(
        pool, organization_id=organization_id, phone_number=f"+1555557{next(_numbers):04d}"
    )
    agent = await agents.create_agent(
        pool,
        organization_id=organization_id,
        name=f"agent {number.phone_number}",
        status=AgentStatus.ACTIVE,
        caller_type=CallerType.INBOUND,
        phone_number_id=number.id,
        voice_id=voice_id,
        configuration=parse_agent_configuration({**CLOUD, "firstSentence": "Hola.", **configuration}).to_json(),
    )
    return number.phone_number, agent.id


async def test_a_spanish_agent_is_heard_spoken_and_prompted_in_spanish(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await line(
        pool, organization_id, language="es", prompt="You take orders.", tts={"provider": "elevenlabs"}
    )
    fakes.deepgram.transcripts.extend(["Quiero una pizza."])
    fakes.openai.replies.extend(["Claro, ¿de qué tamaño?"])
    result = await call(engine, number, Say("quiero una pizza"), Pause(300))
    assert (await finished_log(pool, result))["status"] == "COMPLETED"
    assert fakes.deepgram.queries[-1]["language"] == "es"
    assert fakes.elevenlabs.queries[-1]["language_code"] == "es"
    assert fakes.elevenlabs.queries[-1]["model_id"] == "eleven_flash_v2_5"
    system = fakes.openai.requests[-1]["messages"][0]
    assert system["role"] == "system"
    assert system["content"].startswith("You take orders.")
    assert "Speak Spanish (es)" in system["content"]


async def test_an_english_agent_gets_no_language_instruction(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await line(pool, organization_id, prompt="You take orders.")
    fakes.deepgram.transcripts.extend(["A pizza please."])
    fakes.openai.replies.extend(["Sure."])
    await call(engine, number, Say("a pizza please"), Pause(300))
    assert fakes.deepgram.queries[-1]["language"] == "en-US"
    assert fakes.openai.requests[-1]["messages"][0]["content"] == "You take orders."


async def test_a_provider_language_of_its_own_wins_over_the_agents(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await line(pool, organization_id, language="es", stt={"provider": "deepgram", "language": "es-419"})
    fakes.deepgram.transcripts.extend(["Hola."])
    fakes.openai.replies.extend(["Hola."])
    await call(engine, number, Say("hola"), Pause(300))
    assert fakes.deepgram.queries[-1]["language"] == "es-419"


def _function_tool(name: str) -> dict[str, Any]:
    return {
        "function": {"name": name, "description": f"{name} things.", "parameters": {"type": "object"}},
        "webhook": {"url": "https://tools.example.com/hook"},
    }


async def test_a_tool_that_is_not_connected_is_not_offered_to_the_model(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, agent_id = await line(pool, organization_id)
    for name, connected in (("book_table", True), ("charge_card", False)):
        tool = await tools.create_tool(
            pool, organization_id=organization_id, name=name, is_connected=connected, configuration=_function_tool(name)
        )
        await agents.link_tool(pool, organization_id=organization_id, agent_id=agent_id, tool_id=tool.id)
    fakes.deepgram.transcripts.extend(["A table for two."])
    fakes.openai.replies.extend(["Done."])
    await call(engine, number, Say("a table for two"), Pause(300))
    offered = {tool["function"]["name"] for tool in fakes.openai.requests[-1]["tools"]}
    assert offered == {"end_call", "send_dtmf", "opt_out", "book_table"}


async def test_a_voice_that_is_no_longer_ready_gives_way_to_the_providers_default(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    voice = await voices.create_custom_voice(
        pool, organization_id=organization_id, name="Clone", provider="elevenlabs", provider_voice_id="clone-123"
    )
    number, _ = await line(pool, organization_id, voice_id=voice.id, tts={"provider": "elevenlabs"})
    fakes.deepgram.transcripts.extend(["Hi."])
    fakes.openai.replies.extend(["Hello."])
    await call(engine, number, Say("hi"), Pause(300))
    assert fakes.elevenlabs.sockets[-1].voice_id == "clone-123"

    await voices.set_custom_voice_status(
        pool, organization_id=organization_id, voice_id=voice.id, status=VoiceStatus.ERROR
    )
    fakes.deepgram.transcripts.extend(["Hi again."])
    fakes.openai.replies.extend(["Hello again."])
    result = await call(engine, number, Say("hi again"), Pause(300))
    assert (await finished_log(pool, result))["status"] == "COMPLETED"
    assert fakes.elevenlabs.sockets[-1].voice_id == DEFAULT_ELEVENLABS_VOICE


async def test_a_stored_agent_in_a_language_its_recognizer_lacks_is_refused_before_answering(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    # Written straight to the database (the API would have refused it): the webhook still checks.
    number, _ = await line(pool, organization_id, language="de-DE", stt={"provider": "sphinx"})
    result = await call(engine, number, Pause(100))
    assert result.refusal is not None and "not set up correctly" in result.refusal
    assert result.stream_url is None


async def test_a_stored_agent_with_an_espeak_voice_the_wheel_lacks_is_refused_before_answering(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    # "Alex" is an eSpeak variant, not a voice: given to the library it crashes the offline worker process.
    number, _ = await line(pool, organization_id, tts={"provider": "espeak", "voice": "Alex"})
    result = await call(engine, number, Pause(100))
    assert result.refusal is not None and "not set up correctly" in result.refusal
    assert result.stream_url is None


async def test_a_custom_espeak_voice_the_wheel_lacks_fails_the_call_naming_it(
    engine: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    voice = await voices.create_custom_voice(
        pool, organization_id=organization_id, name="Variant", provider="espeak", provider_voice_id="Alex"
    )
    number, _ = await line(pool, organization_id, voice_id=voice.id, tts={"provider": "espeak"})
    result = await call(engine, number, Pause(300))
    log = await finished_log(pool, result)
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "tts_failed")
    assert "unknown voice 'Alex'" in log["metadata"]["endDetail"]
