"""The provider registry: an agent's configuration → the providers of one call."""

from __future__ import annotations

import pytest

from config.agent import PROVIDERS, parse_agent_configuration
from config.settings import load_settings
from pipelines.clients import ProviderClients
from pipelines.errors import ProviderError
from pipelines.llm.conversation_path import ConversationPathLLM
from pipelines.llm.simple import SimpleResponder
from pipelines.registry import (
    LLM_PROVIDERS,
    STT_PROVIDERS,
    TTS_PROVIDERS,
    PathSource,
    PipelineUnavailable,
    ProviderContext,
    ProviderKeys,
    VoiceChoice,
    build_pipeline,
)
from pipelines.stt.sphinx import SphinxSTT
from pipelines.tts.espeak import EspeakTTS
from storage.demo import DEMO_PATH_EDGES, DEMO_PATH_NODES

DEMO_PATH = PathSource("path1", DEMO_PATH_NODES, DEMO_PATH_EDGES)


@pytest.fixture
def context() -> ProviderContext:
    """An engine without provider keys (offline providers make no client, so none is closed)."""
    return ProviderContext(
        keys=ProviderKeys(load_settings(), environ={}, organization_id=None), clients=ProviderClients()
    )


def test_the_default_configuration_builds_the_offline_pipeline_on_the_agents_path(context: ProviderContext) -> None:
    pipeline = build_pipeline(parse_agent_configuration({}), paths=[DEMO_PATH], context=context)
    assert isinstance(pipeline.stt, SphinxSTT)
    assert isinstance(pipeline.llm, ConversationPathLLM)
    assert isinstance(pipeline.tts, EspeakTTS)


def test_an_agent_without_a_path_gets_the_simple_responder(context: ProviderContext) -> None:
    assert isinstance(build_pipeline(parse_agent_configuration({}), context=context).llm, SimpleResponder)


def test_a_path_named_in_the_configuration_must_be_linked_to_the_agent(context: ProviderContext) -> None:
    config = parse_agent_configuration({"llm": {"provider": "conversation_path", "conversation_path_id": "other"}})
    with pytest.raises(PipelineUnavailable, match="conversation path other is not linked"):
        build_pipeline(config, paths=[DEMO_PATH], context=context)


def test_fallbacks_are_taken_in_order_when_the_first_provider_cannot_run_here(context: ProviderContext) -> None:
    config = parse_agent_configuration({"stt": [{"provider": "deepgram"}, {"provider": "sphinx"}]})
    assert isinstance(build_pipeline(config, context=context).stt, SphinxSTT)


def test_a_stage_with_no_provider_that_can_run_names_the_stage_and_the_providers(context: ProviderContext) -> None:
    config = parse_agent_configuration({"tts": {"provider": "elevenlabs", "voice": "june"}})
    with pytest.raises(PipelineUnavailable, match=r"tts: .*elevenlabs") as refused:
        build_pipeline(config, context=context)
    assert isinstance(refused.value, ProviderError)
    assert refused.value.stage == "tts"


def test_the_agents_espeak_voice_row_chooses_the_voice(context: ProviderContext) -> None:
    pipeline = build_pipeline(parse_agent_configuration({}), voice=VoiceChoice("espeak", "en-gb"), context=context)
    assert isinstance(pipeline.tts, EspeakTTS)
    assert pipeline.tts.voice == "en-gb"


def test_every_provider_the_configuration_accepts_has_a_factory() -> None:
    assert set(STT_PROVIDERS) == set(PROVIDERS["stt"])
    assert set(LLM_PROVIDERS) == set(PROVIDERS["llm"])
    assert set(TTS_PROVIDERS) == set(PROVIDERS["tts"])
