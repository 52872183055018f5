"""The providers' errors: one root that says which stage failed and, when known, which provider."""

from __future__ import annotations

import pytest

from pipelines.errors import PipelineUnavailable, ProviderError
from pipelines.llm.base import LLMError
from pipelines.llm.conversation_path import InvalidConversationPath
from pipelines.realtime.openai_realtime import RealtimeConnectionLost, RealtimeError
from pipelines.stt.base import STTError
from pipelines.tools import ToolConfigurationError
from pipelines.tts.base import TTSError


@pytest.mark.parametrize(
    ("error", "stage"),
    [
        (STTError, "stt"),
        (LLMError, "llm"),
        (TTSError, "tts"),
        (RealtimeError, "realtime"),
        (RealtimeConnectionLost, "realtime"),
        (InvalidConversationPath, "llm"),
        (ToolConfigurationError, "tools"),
    ],
)
def test_each_stages_error_is_a_provider_error_of_its_stage(error: type[ProviderError], stage: str) -> None:
    with pytest.raises(ProviderError) as caught:
        raise error("it broke", provider="acme")
    assert caught.value.stage == stage
    assert caught.value.provider == "acme"
    assert str(caught.value) == "it broke"


def test_an_error_of_a_stage_that_is_named_per_instance_keeps_that_stage() -> None:
    error = PipelineUnavailable("tts: elevenlabs needs the key ELEVENLABS_API_KEY, which is not set", stage="tts")
    assert (error.stage, error.provider) == ("tts", None)


def test_a_provider_error_without_a_stage_is_refused() -> None:
    with pytest.raises(TypeError, match="PipelineUnavailable needs the stage it failed in"):
        PipelineUnavailable("somewhere")


def test_a_tool_configuration_error_is_still_a_value_error() -> None:
    assert issubclass(ToolConfigurationError, ValueError)
