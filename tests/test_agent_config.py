"""The agent configuration JSON: defaults, the documented examples, fallbacks, and errors that name the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from config.agent import (
    AgentConfigurationError,
    ConversationPathLLMConfig,
    DeepgramSTTConfig,
    ElevenLabsTTSConfig,
    EspeakTTSConfig,
    OpenAILLMConfig,
    OpenAIRealtimeConfig,
    SphinxSTTConfig,
    parse_agent_configuration,
    required_keys,
)

SEED_EXAMPLE = {
    "stt": {"provider": "deepgram", "model": "nova-2"},
    "llm": {"provider": "openai", "model": "gpt-4-turbo"},
    "tts": {"provider": "elevenlabs", "voice": "june"},
}
TUNED_EXAMPLE = {
    "stt": {"provider": "deepgram", "model": "nova-3", "endpointing": 300},
    "llm": {"provider": "openai", "model": "gpt-4o-mini", "temperature": 0.4},
    "tts": {"provider": "elevenlabs", "voice": "june"},
}


def problems_of(data: Any) -> list[tuple[str, str]]:
    with pytest.raises(AgentConfigurationError) as caught:
        parse_agent_configuration(data)
    return caught.value.problems


def test_an_empty_configuration_is_the_offline_stack() -> None:
    config = parse_agent_configuration({})

    assert config.stt == (SphinxSTTConfig(),)
    assert config.llm == (ConversationPathLLMConfig(),)
    assert config.tts == (EspeakTTSConfig(),)
    assert config.realtime is None
    assert required_keys(config) == []


def test_an_empty_configuration_fills_the_call_behaviour_defaults() -> None:
    config = parse_agent_configuration({})

    assert config.max_duration_seconds == 1800
    assert config.silence_timeout_seconds == 30
    assert config.interruption.threshold_ms == 300
    assert "mm-hmm" in config.interruption.backchannel_words
    assert config.endpointing.silence_ms == 700
    assert config.endpointing.wait_for_greeting is True
    assert config.voicemail.action == "hang_up"
    assert config.recording is True


def test_null_or_json_text_configurations_are_read_like_objects() -> None:
    assert parse_agent_configuration(None) == parse_agent_configuration({})
    assert parse_agent_configuration(json.dumps(TUNED_EXAMPLE)) == parse_agent_configuration(TUNED_EXAMPLE)


def test_the_seed_example_parses_with_its_values() -> None:
    config = parse_agent_configuration(SEED_EXAMPLE)

    stt, llm, tts = config.stt[0], config.llm[0], config.tts[0]
    assert isinstance(stt, DeepgramSTTConfig)
    assert stt.model == "nova-2"
    assert isinstance(llm, OpenAILLMConfig)
    assert llm.model == "gpt-4-turbo"
    assert isinstance(tts, ElevenLabsTTSConfig)
    assert tts.voice == "june"


def test_the_tuned_example_parses_with_its_values_and_fills_the_rest() -> None:
    config = parse_agent_configuration(TUNED_EXAMPLE)

    stt, llm = config.stt[0], config.llm[0]
    assert isinstance(stt, DeepgramSTTConfig)
    # No language of Deepgram's own: the agent's (en-US by default) is what calls use.
    assert (stt.model, stt.endpointing, stt.utterance_end_ms, stt.language) == ("nova-3", 300, 1000, None)
    assert config.language == "en-US"
    assert isinstance(llm, OpenAILLMConfig)
    assert (llm.model, llm.temperature) == ("gpt-4o-mini", 0.4)
    assert isinstance(config.tts[0], ElevenLabsTTSConfig)
    assert config.tts[0].model == "eleven_flash_v2_5"


def test_a_fallback_list_keeps_its_order_with_the_primary_first() -> None:
    config = parse_agent_configuration({"stt": [{"provider": "deepgram"}, {"provider": "sphinx"}]})

    assert [provider.provider for provider in config.stt] == ["deepgram", "sphinx"]


def test_a_single_provider_object_becomes_a_list_of_one() -> None:
    config = parse_agent_configuration({"tts": {"provider": "espeak", "rate": 200}})

    assert config.tts == (EspeakTTSConfig(rate=200),)


def test_deepgram_endpointing_can_be_turned_off() -> None:
    config = parse_agent_configuration({"stt": {"provider": "deepgram", "endpointing": False}})

    assert isinstance(config.stt[0], DeepgramSTTConfig)
    assert config.stt[0].endpointing is False


def test_realtime_replaces_the_three_stages() -> None:
    config = parse_agent_configuration(
        {"realtime": {"provider": "openai", "voice": "marin", "turn_detection": "semantic_vad"}}
    )

    assert config.realtime == (OpenAIRealtimeConfig(voice="marin", turn_detection="semantic_vad"),)
    assert (config.stt, config.llm, config.tts) == ((), (), ())


def test_unknown_provider_is_named_with_its_path_and_the_choices() -> None:
    problems = problems_of({"stt": [{"provider": "deepgram"}, {"provider": "deepgrm"}]})

    assert problems == [("stt[1].provider", "unknown provider 'deepgrm' (expected one of: deepgram, sphinx)")]


def test_out_of_range_temperature_is_named_with_its_range() -> None:
    problems = problems_of({"llm": {"provider": "openai", "temperature": 2.5}})

    assert problems == [("llm.temperature", "must be between 0 and 2 (got 2.5)")]


def test_more_pocketsphinx_keyphrases_than_a_worker_can_build_in_time_are_refused() -> None:
    problems = problems_of({"stt": {"provider": "sphinx", "keyphrases": [f"product {n}" for n in range(1001)]}})

    assert problems == [("stt.keyphrases", "must list at most 1000 items")]


def test_a_typo_inside_a_provider_is_an_error_suggesting_the_option() -> None:
    problems = problems_of({"stt": {"provider": "deepgram", "modle": "nova-3"}})

    assert problems == [("stt.modle", "unknown option; did you mean 'model'?")]


def test_realtime_with_only_some_fallback_stages_names_the_missing_ones() -> None:
    problems = problems_of({"realtime": {"provider": "openai"}, "stt": {"provider": "deepgram"}})

    assert len(problems) == 1
    assert "fallback pipeline" in problems[0][1]
    assert "llm, tts" in problems[0][1]


def test_realtime_with_all_three_stages_keeps_them_as_its_fallback_pipeline() -> None:
    config = parse_agent_configuration(
        {
            "realtime": {"provider": "openai"},
            "stt": {"provider": "sphinx"},
            "llm": {"provider": "conversation_path"},
            "tts": {"provider": "espeak"},
        }
    )

    assert config.realtime_fallback
    assert {"realtime", "stt", "llm", "tts"} <= set(config.to_json())


def test_an_empty_fallback_list_is_an_error() -> None:
    problems = problems_of({"llm": []})

    assert problems == [("llm", "must name at least one provider (an empty fallback list has none to try)")]


def test_a_string_where_a_number_belongs_is_an_error_showing_the_value() -> None:
    problems = problems_of({"maxDurationSeconds": "long"})

    assert problems == [("maxDurationSeconds", "must be a whole number (got 'long')")]


def test_every_bad_field_is_reported_and_the_message_lists_them_all() -> None:
    with pytest.raises(AgentConfigurationError) as caught:
        parse_agent_configuration({"silenceTimeoutSeconds": 1, "interruption": {"thresholdMs": -1}})

    assert [path for path, _ in caught.value.problems] == ["silenceTimeoutSeconds", "interruption.thresholdMs"]
    assert "silenceTimeoutSeconds: must be between 5 and 600" in str(caught.value)
    assert "interruption.thresholdMs: must be between 0 and 3000" in str(caught.value)


def test_unknown_keys_inside_call_behaviour_sections_are_errors() -> None:
    problems = problems_of({"endpointing": {"silenceMs": 500, "waitForGreting": False}})

    assert problems == [("endpointing.waitForGreting", "unknown option; did you mean 'waitForGreeting'?")]


def test_unknown_top_level_keys_are_kept_for_the_dashboard() -> None:
    config = parse_agent_configuration({"uiLayout": {"collapsed": True}})

    assert config.to_json()["uiLayout"] == {"collapsed": True}


def test_call_behaviour_accepts_camel_case_and_snake_case() -> None:
    camel = parse_agent_configuration(
        {"firstSentence": "Hello!", "maxDurationSeconds": 600, "interruption": {"minWords": 2}}
    )
    snake = parse_agent_configuration(
        {"first_sentence": "Hello!", "max_duration_seconds": 600, "interruption": {"min_words": 2}}
    )

    assert camel == snake
    assert (camel.first_sentence, camel.max_duration_seconds, camel.interruption.min_words) == ("Hello!", 600, 2)


def test_an_error_names_the_key_as_the_caller_spelled_it() -> None:
    problems = problems_of({"max_duration_seconds": "long"})

    assert problems == [("max_duration_seconds", "must be a whole number (got 'long')")]


def test_an_api_key_pasted_into_api_key_ref_is_not_echoed() -> None:
    problems = problems_of({"tts": {"provider": "elevenlabs", "api_key_ref": "sk_live_abcdef"}})

    assert [path for path, _ in problems] == ["tts.api_key_ref"]
    assert "sk_live_abcdef" not in str(problems)


def test_required_keys_lists_the_keys_of_cloud_primaries_only() -> None:
    config = parse_agent_configuration(
        {
            "stt": [{"provider": "sphinx"}, {"provider": "deepgram"}],
            "llm": {"provider": "openai"},
            "tts": {"provider": "elevenlabs", "api_key_ref": "env:ELEVENLABS_KEY_EU"},
        }
    )

    assert required_keys(config) == ["OPENAI_API_KEY", "ELEVENLABS_KEY_EU"]


def test_required_keys_of_the_seed_example_are_the_three_vendors() -> None:
    config = parse_agent_configuration(SEED_EXAMPLE)

    assert required_keys(config) == ["DEEPGRAM_API_KEY", "OPENAI_API_KEY", "ELEVENLABS_API_KEY"]


def test_required_keys_names_a_tool_held_key_by_its_reference() -> None:
    config = parse_agent_configuration({"realtime": {"provider": "openai", "api_key_ref": "tool:clx7tool0001"}})

    assert required_keys(config) == ["tool:clx7tool0001"]


@pytest.mark.parametrize(
    "data",
    [
        {},
        SEED_EXAMPLE,
        TUNED_EXAMPLE,
        {"stt": [{"provider": "deepgram", "keywords": ["Dialtone"]}, {"provider": "sphinx"}], "variables": {"a": "b"}},
        {"realtime": {"provider": "openai", "turn_detection": "semantic_vad", "eagerness": "low"}, "ui": [1]},
    ],
    ids=["defaults", "seed", "tuned", "fallbacks", "realtime"],
)
def test_parsing_the_stored_json_gives_back_the_same_configuration(data: dict[str, Any]) -> None:
    config = parse_agent_configuration(data)

    stored = json.loads(json.dumps(config.to_json()))
    assert parse_agent_configuration(stored) == config
    assert parse_agent_configuration(stored).to_json() == stored


def test_the_stored_json_uses_camel_case_for_call_behaviour() -> None:
    stored = parse_agent_configuration({"first_sentence": "Hi"}).to_json()

    assert stored["firstSentence"] == "Hi"
    assert stored["interruption"]["thresholdMs"] == 300
    assert "first_sentence" not in stored


def test_the_configuration_is_frozen() -> None:
    config = parse_agent_configuration({})

    with pytest.raises(ValueError, match="frozen"):
        config.recording = False  # type: ignore[misc]
