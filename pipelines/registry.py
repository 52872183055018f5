"""The provider registry: an agent's configuration JSON → the STT, LLM and TTS instances of one call.

Each stage may list providers in order. A provider is usable when the engine has what it needs: the offline
ones (PocketSphinx, the conversation-path runner, eSpeak NG) always are; a cloud one (Deepgram, OpenAI,
ElevenLabs) needs its API key — from the settings (`DEEPGRAM_API_KEY`...) or, with `api_key_ref:
"tool:<id>"`, from one of the agent's Tools. The unusable are skipped; a stage with several usable providers
becomes a fallback chain (pipelines.fallback); a stage with none refuses the call, saying which key is missing.

`check_pipeline` does the same choice without opening anything, for the voice webhook to refuse a call before
answering it; `build_pipeline` makes the instances when the media stream starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from config.agent import (
    AgentConfiguration,
    ConversationPathLLMConfig,
    DeepgramSTTConfig,
    ElevenLabsTTSConfig,
    EspeakTTSConfig,
    LLMConfig,
    OpenAILLMConfig,
    OpenAIRealtimeConfig,
    SphinxSTTConfig,
    STTConfig,
    TTSConfig,
)
from config.settings import Settings
from pipelines.fallback import FallbackLLM, FallbackSTT, FallbackTTS, OnFailover
from pipelines.llm.base import LanguageModel
from pipelines.llm.conversation_path import ConversationPathLLM, PathGraph
from pipelines.llm.simple import SimpleResponder
from pipelines.offline_workers import INLINE, OfflineWork
from pipelines.stt.base import SpeechToText
from pipelines.stt.sphinx import SphinxSTT
from pipelines.tools import ToolRunner
from pipelines.tts.base import TextToSpeech
from pipelines.tts.espeak import EspeakTTS

# Keys an agent may name with `env:`: the provider settings, and variables an operator set aside for agents.
# Any other variable of the process (the database password, Twilio's token) is never handed to a provider.
_SETTING_KEYS = {
    "DEEPGRAM_API_KEY": "deepgram_api_key",
    "OPENAI_API_KEY": "openai_api_key",
    "ELEVENLABS_API_KEY": "elevenlabs_api_key",
}
AGENT_KEY_PREFIX = "DIALTONE_AGENT_KEY_"


class PipelineUnavailable(Exception):
    """No provider listed for a stage can run here; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Pipeline:
    """One call's three providers."""

    stt: SpeechToText
    llm: LanguageModel
    tts: TextToSpeech


@dataclass(frozen=True, slots=True)
class RealtimePlan:
    """A speech-to-speech agent's provider and the key it will use."""

    config: OpenAIRealtimeConfig
    api_key: str
    base_url: str


@dataclass(frozen=True, slots=True)
class PathSource:
    """A conversation path the agent may follow: its id and react-flow graph."""

    id: str
    nodes: Sequence[Any]
    edges: Sequence[Any]


@dataclass(frozen=True, slots=True)
class VoiceChoice:
    """The agent's Voice row, as far as a synthesizer cares."""

    provider: str | None
    provider_voice_id: str | None


@dataclass(frozen=True, slots=True)
class ProviderContext:
    """What cloud providers need beyond their options: keys and endpoints, the prompt, the agent's functions."""

    settings: Settings | None = None
    tool_keys: Mapping[str, str] = field(default_factory=dict)
    """The agent's Tools' `apiKey`s by Tool id."""
    instructions: str = ""
    """The system prompt, variables filled in."""
    tools: ToolRunner | None = None
    voice_ids: Mapping[str, str] = field(default_factory=dict)
    """ElevenLabs voice ids by lower-cased voice name (Voice rows the organization may use)."""
    on_failover: OnFailover | None = None
    default_region: str | None = None
    """Region (e.g. "US") to read phone numbers the model gives without a country code in."""
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    offline_work: OfflineWork = INLINE
    """Where offline providers decode and synthesize: the engine's OfflineWorkers; inline for tests and tools."""


class ProviderKeyMissing(Exception):
    """This provider cannot run here (its key is missing); the message says why."""


def check_pipeline(config: AgentConfiguration, context: ProviderContext | None = None) -> None:
    """Raise PipelineUnavailable if some stage has no usable provider (nothing is opened or built)."""
    context = context or ProviderContext()
    if config.realtime:
        plan_realtime(config, context)
        return
    for stage, options in (("stt", config.stt), ("llm", config.llm), ("tts", config.tts)):
        problems = []
        for option in options:
            try:
                provider_key(option, context)
                break
            except ProviderKeyMissing as exc:
                problems.append(str(exc))
        else:
            raise PipelineUnavailable(f"{stage}: " + "; ".join(problems))


def plan_realtime(config: AgentConfiguration, context: ProviderContext) -> RealtimePlan:
    """The first usable speech-to-speech provider, or PipelineUnavailable saying which key is missing."""
    problems = []
    for option in config.realtime or ():
        try:
            key = provider_key(option, context)
        except ProviderKeyMissing as exc:
            problems.append(str(exc))
            continue
        return RealtimePlan(option, key or "", _settings(context).openai_base_url)
    raise PipelineUnavailable("realtime: " + "; ".join(problems or ["no provider configured"]))


def build_pipeline(
    config: AgentConfiguration,
    *,
    paths: Sequence[PathSource] = (),
    voice: VoiceChoice | None = None,
    context: ProviderContext | None = None,
) -> Pipeline:
    """Build the call's providers: the usable ones of each stage, in order, as a fallback chain if several."""
    context = context or ProviderContext()
    if config.realtime:
        raise PipelineUnavailable("realtime: speech-to-speech agents run a RealtimeCallSession, not a pipeline")
    llm, keywords = _build_llm(config.llm, paths, context)
    return Pipeline(
        stt=_build_stt(config.stt, config, keywords, context),
        llm=llm,
        tts=_build_tts(config.tts, voice, context),
    )


def _settings(context: ProviderContext) -> Settings:
    if context.settings is None:
        raise ProviderKeyMissing("cloud providers need the engine's settings")
    return context.settings


def provider_key(option: Any, context: ProviderContext) -> str | None:
    """The API key a provider would use (None for offline providers); ProviderKeyMissing naming the missing key."""
    key_name: str | None = getattr(option, "key_name", None)
    if key_name is None:
        return None
    reference: str = option.api_key_ref or f"env:{key_name}"
    kind, _, name = reference.partition(":")
    if kind == "tool":
        key = context.tool_keys.get(name)
        if not key:
            raise ProviderKeyMissing(
                f"{option.provider} needs the apiKey of tool {name}, which is not linked to this agent or has no apiKey"
            )
        return key
    if name in _SETTING_KEYS:
        secret = getattr(context.settings, _SETTING_KEYS[name], None) if context.settings is not None else None
        if secret is None or not secret.get_secret_value():
            raise ProviderKeyMissing(f"{option.provider} needs the key {name}, which is not set")
        return str(secret.get_secret_value())
    if not name.startswith(AGENT_KEY_PREFIX):
        raise ProviderKeyMissing(
            f"{option.provider}: {name} is not a key setting (use one of {', '.join(_SETTING_KEYS)} "
            f"or a variable named {AGENT_KEY_PREFIX}*)"
        )
    key = context.environ.get(name, "")
    if not key:
        raise ProviderKeyMissing(f"{option.provider} needs the key {name}, which is not set")
    return key


def _usable(
    stage: str, options: Sequence[Any], context: ProviderContext, make: Callable[[Any, str | None], Any]
) -> list[tuple[str, Any]]:
    chosen: list[tuple[str, Any]] = []
    problems: list[str] = []
    for option in options:
        try:
            key = provider_key(option, context)
        except ProviderKeyMissing as exc:
            problems.append(str(exc))
            continue
        chosen.append((option.provider, make(option, key)))
    if not chosen:
        raise PipelineUnavailable(f"{stage}: " + "; ".join(problems))
    return chosen


def _build_stt(
    stage: Sequence[STTConfig], config: AgentConfiguration, keywords: Sequence[str], context: ProviderContext
) -> SpeechToText:
    def make(option: STTConfig, key: str | None) -> Callable[[], SpeechToText]:
        if isinstance(option, DeepgramSTTConfig):
            from pipelines.stt.deepgram import DeepgramSTT  # the SDK loads only for agents that use it

            url = _settings(context).deepgram_url
            return lambda: DeepgramSTT(option, api_key=key or "", url=url)
        assert isinstance(option, SphinxSTTConfig)
        return lambda: SphinxSTT(
            work=context.offline_work,
            keyphrases=(*option.keyphrases, *keywords),
            end_silence_ms=config.endpointing.silence_ms,
        )

    factories = _usable("stt", stage, context, make)
    if len(factories) == 1:
        return factories[0][1]()  # type: ignore[no-any-return]
    return FallbackSTT(factories, on_failover=context.on_failover)


def _build_llm(
    stage: Sequence[LLMConfig], paths: Sequence[PathSource], context: ProviderContext
) -> tuple[LanguageModel, list[str]]:
    keywords: list[str] = []

    def make(option: LLMConfig, key: str | None) -> LanguageModel:
        if isinstance(option, OpenAILLMConfig):
            from pipelines.llm.openai_chat import OpenAIChatLLM, openai_client

            client = openai_client(key or "", _settings(context).openai_base_url)
            return OpenAIChatLLM(
                option,
                client=client,
                instructions=context.instructions,
                tools=context.tools,
                default_region=context.default_region,
            )
        assert isinstance(option, ConversationPathLLMConfig)
        path = _choose_path(option, paths)
        if path is None:
            return SimpleResponder()
        runner = ConversationPathLLM.from_path(path, option)
        keywords.extend(runner.keywords())
        return runner

    models = _usable("llm", stage, context, make)
    if len(models) == 1:
        return models[0][1], keywords
    return FallbackLLM(models, on_failover=context.on_failover), keywords


def _choose_path(option: ConversationPathLLMConfig, paths: Sequence[PathSource]) -> PathGraph | None:
    if option.conversation_path_id is None:
        return paths[0] if paths else None
    for path in paths:
        if path.id == option.conversation_path_id:
            return path
    raise PipelineUnavailable(f"llm: conversation path {option.conversation_path_id} is not linked to this agent")


def _build_tts(stage: Sequence[TTSConfig], voice: VoiceChoice | None, context: ProviderContext) -> TextToSpeech:
    def make(option: TTSConfig, key: str | None) -> TextToSpeech:
        if isinstance(option, ElevenLabsTTSConfig):
            from pipelines.tts.elevenlabs import ElevenLabsTTS

            return ElevenLabsTTS(
                option,
                api_key=key or "",
                url=_settings(context).elevenlabs_url,
                voice_id=_elevenlabs_voice(option, voice, context),
            )
        assert isinstance(option, EspeakTTSConfig)
        name = option.voice
        if voice is not None and voice.provider == "espeak" and voice.provider_voice_id:
            name = voice.provider_voice_id
        return EspeakTTS(work=context.offline_work, voice=name, rate=option.rate, pitch=option.pitch)

    synthesizers = _usable("tts", stage, context, make)
    if len(synthesizers) == 1:
        return synthesizers[0][1]  # type: ignore[no-any-return]
    return FallbackTTS(synthesizers, on_failover=context.on_failover)


DEFAULT_ELEVENLABS_VOICE = "21m00Tcm4TlvDq8ikWAM"  # ElevenLabs' stock "Rachel"


def _elevenlabs_voice(option: ElevenLabsTTSConfig, voice: VoiceChoice | None, context: ProviderContext) -> str:
    """The configured voice (a name of a Voice row, or a voice id), else the agent's ElevenLabs Voice."""
    if option.voice:
        return context.voice_ids.get(option.voice.lower(), option.voice)
    if voice is not None and voice.provider == "elevenlabs" and voice.provider_voice_id:
        return voice.provider_voice_id
    return DEFAULT_ELEVENLABS_VOICE
