"""What the /v1 API refuses when an agent is saved, so that no call finds out later: a language a provider cannot
work in, a voice that is not READY (through the real server and real PostgreSQL); and the agent's language in the
offline synthesizer and the Realtime session."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from config.agent import OpenAIRealtimeConfig, parse_agent_configuration
from config.settings import load_settings
from pipelines.clients import ProviderClients
from pipelines.languages import espeak_voice, language_instruction, localized
from pipelines.realtime.openai_realtime import session_update
from pipelines.registry import ProviderContext, ProviderKeys, build_pipeline
from pipelines.tts.espeak import EspeakTTS, speak_ulaw
from storage import voices
from storage.enums import VoiceStatus
from tests.test_api_auth import Api, Tenant, assert_error, make_tenant


@pytest.fixture(scope="module")
async def acme(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Acme")


async def save(api: Api, acme: Tenant, **body: Any) -> tuple[int, Any]:
    return await api.call("POST", "/agents", acme.owner_key, json={"name": "Agent", **body})


# Language


async def test_a_pocketsphinx_agent_in_german_is_refused_naming_the_language(api: Api, acme: Tenant) -> None:
    status, body = await save(api, acme, configuration={"language": "de-DE", "stt": {"provider": "sphinx"}})
    assert status == 422
    assert_error(body, "validation_error", "configuration.language")
    assert "PocketSphinx has no model for 'de-DE'" in body["error"]["message"]


async def test_pocketsphinx_in_a_language_of_its_own_is_refused_at_that_option(api: Api, acme: Tenant) -> None:
    status, body = await save(api, acme, configuration={"stt": {"provider": "sphinx", "language": "fr"}})
    assert status == 422
    assert_error(body, "validation_error", "configuration.stt[0].language")


async def test_an_english_offline_agent_is_accepted_and_keeps_its_language(api: Api, acme: Tenant) -> None:
    status, body = await save(api, acme, configuration={"language": "en-US"})
    assert status == 201
    assert body["configuration"]["language"] == "en-US"


async def test_a_spanish_espeak_agent_is_accepted(api: Api, acme: Tenant) -> None:
    configuration = {"language": "es", "stt": {"provider": "deepgram"}, "tts": {"provider": "espeak"}}
    status, body = await save(api, acme, configuration=configuration)
    assert status == 201, body


async def test_a_language_espeak_has_no_voice_for_is_refused(api: Api, acme: Tenant) -> None:
    configuration = {"language": "tlh", "stt": {"provider": "deepgram"}, "tts": {"provider": "espeak"}}
    status, body = await save(api, acme, configuration=configuration)
    assert status == 422
    assert_error(body, "validation_error", "configuration.language")
    assert "eSpeak NG has no voice for 'tlh'" in body["error"]["message"]


@pytest.mark.parametrize("voice", ["english", "Alex", "en-us+alex"])
async def test_an_espeak_voice_the_wheel_does_not_ship_is_refused_naming_it(api: Api, acme: Tenant, voice: str) -> None:
    status, body = await save(api, acme, configuration={"tts": {"provider": "espeak", "voice": voice}})
    assert status == 422, body
    assert_error(body, "validation_error", "configuration.tts[0].voice")
    assert f"eSpeak NG has no voice {voice!r}" in body["error"]["message"]


async def test_espeak_voices_named_by_name_file_or_language_with_a_variant_are_accepted(api: Api, acme: Tenant) -> None:
    for voice in ("English (America)", "gmw/en-US", "en-GB", "en-us+f3"):
        status, body = await save(api, acme, configuration={"tts": {"provider": "espeak", "voice": voice}})
        assert status == 201, (voice, body)


@pytest.mark.parametrize(
    ("configuration", "field"),
    [
        ({"firstSentence": "Hello and welcome " * 250}, "configuration.firstSentence"),
        ({"goodbye_sentence": "Goodbye " * 600}, "configuration.goodbye_sentence"),
        ({"apologySentence": "Sorry " * 700}, "configuration.apologySentence"),
        (
            {"voicemail": {"detect": True, "action": "leave_message", "message": "Call us back " * 400}},
            "configuration.voicemail.message",
        ),
    ],
)
async def test_a_sentence_the_agent_would_say_for_many_minutes_is_refused_naming_it(
    api: Api, acme: Tenant, configuration: dict[str, Any], field: str
) -> None:
    # One synthesis each: eSpeak NG takes about a second per 15,000 characters, and a worker's job has 30 s.
    status, body = await save(api, acme, configuration=configuration)
    assert status == 422, body
    assert_error(body, "validation_error", field)
    assert "at most 4000 characters" in body["error"]["message"]


async def test_an_english_only_elevenlabs_model_is_refused_for_french(api: Api, acme: Tenant) -> None:
    configuration = {
        "language": "fr-FR",
        "stt": {"provider": "deepgram"},
        "tts": {"provider": "elevenlabs", "model": "eleven_monolingual_v1"},
    }
    status, body = await save(api, acme, configuration=configuration)
    assert status == 422
    assert_error(body, "validation_error", "configuration.tts[0].model")
    assert "eleven_flash_v2_5" in body["error"]["message"]


async def test_a_language_that_is_not_a_bcp47_tag_is_refused(api: Api, acme: Tenant) -> None:
    status, body = await save(api, acme, configuration={"language": "Spanish please"})
    assert status == 422
    assert_error(body, "validation_error", "configuration.language")


async def test_changing_an_agents_language_to_one_its_providers_lack_is_refused(api: Api, acme: Tenant) -> None:
    _, agent = await save(api, acme)
    status, body = await api.call(
        "PATCH", f"/agents/{agent['id']}", acme.owner_key, json={"configuration": {"language": "ja"}}
    )
    assert status == 422
    assert_error(body, "validation_error", "configuration.language")


def test_espeak_speaks_the_agents_language_with_its_own_voice() -> None:
    assert (espeak_voice("es"), espeak_voice("es-ES"), espeak_voice("fr-FR"), espeak_voice("en-US")) == (
        "es",
        "es",
        "fr-fr",
        "en-us",
    )
    assert espeak_voice("tlh") is None


async def test_a_spanish_agents_espeak_synthesizes_with_the_spanish_voice(provider_clients: ProviderClients) -> None:
    config = parse_agent_configuration({"language": "es", "tts": {"provider": "espeak"}})
    pipeline = build_pipeline(
        config,
        context=ProviderContext(keys=ProviderKeys(load_settings(), organization_id=None), clients=provider_clients),
    )
    assert isinstance(pipeline.tts, EspeakTTS)
    assert pipeline.tts.voice == "es"
    spoken = b"".join([chunk async for chunk in pipeline.tts.synthesize("Buenos días, señora.")])
    assert spoken == speak_ulaw("Buenos días, señora.", "es", pipeline.tts.rate, pipeline.tts.pitch)
    assert spoken != speak_ulaw("Buenos días, señora.", "en-us", pipeline.tts.rate, pipeline.tts.pitch)


def test_a_realtime_model_is_told_the_language_and_transcribes_in_it() -> None:
    entry = localized(OpenAIRealtimeConfig(transcription_model="gpt-4o-mini-transcribe"), "pt-BR")
    update = session_update(entry, instructions="Sell.\n\n" + language_instruction("pt-BR"))
    assert update["session"]["audio"]["input"]["transcription"] == {
        "model": "gpt-4o-mini-transcribe",
        "language": "pt",
    }
    assert "Speak Portuguese (pt-BR)" in update["session"]["instructions"]


# Voice status


@pytest.mark.parametrize("status", [VoiceStatus.PROCESSING, VoiceStatus.ERROR])
async def test_an_agent_with_a_voice_that_is_not_ready_is_refused(
    api: Api, pool: asyncpg.Pool, acme: Tenant, status: VoiceStatus
) -> None:
    voice = await voices.create_custom_voice(
        pool, organization_id=acme.organization_id, name=f"Clone {status}", provider="elevenlabs", status=status
    )
    code, body = await save(api, acme, voiceId=voice.id)
    assert code == 422
    assert_error(body, "validation_error", "voiceId")
    assert f"is {status.value}" in body["error"]["message"]


async def test_changing_an_agents_voice_to_one_not_ready_is_refused_and_keeps_the_old(
    api: Api, pool: asyncpg.Pool, acme: Tenant
) -> None:
    ready = await voices.create_custom_voice(pool, organization_id=acme.organization_id, name="Ready")
    cloning = await voices.create_custom_voice(
        pool, organization_id=acme.organization_id, name="Cloning", status=VoiceStatus.PROCESSING
    )
    status, agent = await save(api, acme, voiceId=ready.id)
    assert status == 201
    status, body = await api.call("PATCH", f"/agents/{agent['id']}", acme.owner_key, json={"voiceId": cloning.id})
    assert status == 422
    assert_error(body, "validation_error", "voiceId")
    _, unchanged = await api.call("GET", f"/agents/{agent['id']}", acme.owner_key)
    assert unchanged["voiceId"] == ready.id
