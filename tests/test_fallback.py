"""Fallback chains built by the registry from a stage's list: real providers against the vendors' fakes, the
offline providers behind them."""

from __future__ import annotations

from typing import Any

from config.agent import parse_agent_configuration
from config.settings import load_settings
from pipelines.clients import ProviderClients
from pipelines.fallback import FallbackLLM, FallbackTTS
from pipelines.llm.base import ConversationTurn, TextDelta
from pipelines.registry import ProviderContext, ProviderKeys, build_pipeline
from pipelines.tts.base import Alignment
from tests.fakes.elevenlabs import FakeElevenLabs
from tests.fakes.openai_chat import FakeOpenAI


def context(clients: ProviderClients, **settings: Any) -> tuple[ProviderContext, list[tuple[str, str, str]]]:
    switches: list[tuple[str, str, str]] = []
    return (
        ProviderContext(
            keys=ProviderKeys(load_settings(**settings), organization_id=None),
            clients=clients,
            on_failover=lambda *switch: switches.append(switch),
        ),
        switches,
    )


async def test_a_model_failing_before_it_says_anything_is_replaced_for_the_rest_of_the_call(
    provider_clients: ProviderClients,
) -> None:
    async with FakeOpenAI(api_key="sk-test", default_reply="From the cloud.") as openai:
        ctx, switches = context(provider_clients, openai_api_key="sk-test", openai_base_url=openai.base_url)
        config = parse_agent_configuration({"llm": [{"provider": "openai"}, {"provider": "conversation_path"}]})
        llm = build_pipeline(config, context=ctx).llm
        assert isinstance(llm, FallbackLLM)
        turn = [ConversationTurn("caller", "what are your hours?")]

        assert [e for e in [e async for e in llm.respond(turn)] if isinstance(e, TextDelta)]
        assert switches == []
        openai.fail_next = 5  # HTTP 500s: OpenAI is down
        replies = [e async for e in llm.respond(turn)]
        later = [e async for e in llm.respond(turn)]
    assert switches == [("llm", "openai", "conversation_path")]
    spoken = "".join(e.text for e in replies if isinstance(e, TextDelta))
    assert spoken and "From the cloud" not in spoken  # the offline responder answered
    assert [e for e in later if isinstance(e, TextDelta)]


async def test_a_synthesizer_failing_on_both_transports_is_replaced_by_the_next(
    provider_clients: ProviderClients,
) -> None:
    async with FakeElevenLabs(api_key="el-test") as elevenlabs:
        ctx, switches = context(provider_clients, elevenlabs_api_key="el-test", elevenlabs_url=elevenlabs.url)
        config = parse_agent_configuration({"tts": [{"provider": "elevenlabs", "voice": "v1"}, {"provider": "espeak"}]})
        tts = build_pipeline(config, context=ctx).tts
        assert isinstance(tts, FallbackTTS)
        cloud = [c async for c in tts.synthesize("Hello there.")]
        elevenlabs.refuse_websocket = True  # new sockets are refused, and the warm one breaks on its next sentence
        elevenlabs.fail_next_ws_stream(after_chunks=0)
        elevenlabs.fail_http = True
        offline = [c async for c in tts.synthesize("Hello again.")]
        await tts.close()
    assert any(isinstance(c, Alignment) for c in cloud)  # ElevenLabs spoke the first
    assert switches == [("tts", "elevenlabs", "espeak")]
    audio = b"".join(c for c in offline if isinstance(c, bytes))
    assert len(audio) > 8 * 300  # eSpeak spoke the second


async def test_a_stage_whose_every_provider_lacks_a_key_names_the_keys(provider_clients: ProviderClients) -> None:
    ctx, _ = context(provider_clients)
    config = parse_agent_configuration(
        {"stt": {"provider": "deepgram", "api_key_ref": "env:DIALTONE_AGENT_KEY_SHARED_DG"}}
    )
    try:
        build_pipeline(config, context=ctx)
    except Exception as exc:
        message = str(exc)
    else:
        raise AssertionError("the pipeline was built without a key")
    assert message == "stt: deepgram needs the key DIALTONE_AGENT_KEY_SHARED_DG, which is not set"
