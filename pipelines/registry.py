"""The provider registry: an agent's configuration JSON → the STT, LLM and TTS instances of one call.

Each stage may list providers in order. A provider is usable when the engine has what it needs: the offline
ones (PocketSphinx, the conversation-path runner, eSpeak NG) always are; a cloud one (Deepgram, OpenAI,
ElevenLabs) needs its API key — from the settings (`DEEPGRAM_API_KEY`...), with `api_key_ref: "tool:<id>"` from
one of the agent's Tools, or with `api_key_ref: "env:DIALTONE_AGENT_KEY_<organizationId>_<NAME>"` (or `_SHARED_`)
from a variable the operator set aside for that organization (or for all: `agent_key_refusal`). The unusable are
skipped; a stage with several usable providers becomes a fallback chain (pipelines.fallback); a stage with none
refuses the call, saying which key is missing.

Each stage is a table from the configuration's `provider` name to a factory (`STT_PROVIDERS`, `LLM_PROVIDERS`,
`TTS_PROVIDERS`): adding a provider is one entry there and one model in `config.agent`.

A call follows at most one conversation path (`PathSource`, the campaign's before the agent's default): the chat
model and the offline runner of the call walk the same `PathEngine`, so a failover keeps the call's place.

`check_pipeline` does the same choice from the keys alone, for the voice webhook to refuse a call before answering
it; `build_pipeline` makes the instances when the media stream starts, with the engine's SDK clients.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import SecretStr

from config.agent import (
    AgentConfiguration,
    CloudProviderConfig,
    ConversationPathLLMConfig,
    DeepgramSTTConfig,
    ElevenLabsTTSConfig,
    EspeakTTSConfig,
    OpenAILLMConfig,
    OpenAIRealtimeConfig,
    ProviderConfig,
    SphinxSTTConfig,
)
from config.settings import Settings
from pipelines.clients import ProviderClients
from pipelines.conversation.opt_out import RECOGNIZER_PHRASES
from pipelines.conversation.transfer_rules import TransferRules
from pipelines.errors import PipelineUnavailable, ProviderKeyMissing, Stage
from pipelines.fallback import FallbackLLM, FallbackSTT, FallbackTTS, OnFailover
from pipelines.knowledge import KnowledgeSource, PassageAnswerer
from pipelines.languages import language_problems, localized
from pipelines.llm.base import LanguageModel
from pipelines.llm.conversation_path import ConversationPathLLM, InvalidConversationPath, runnable_path
from pipelines.llm.simple import SimpleResponder
from pipelines.offline_workers import INLINE, OfflineWork
from pipelines.paths.chat import ChatPath
from pipelines.paths.engine import PathEngine
from pipelines.stt.base import SpeechToText
from pipelines.stt.sphinx import SphinxSTT
from pipelines.tools import ToolRunner
from pipelines.tts.base import TextToSpeech
from pipelines.tts.espeak import EspeakTTS
from pipelines.tts.phrases import PhraseCache

__all__ = [
    "AGENT_KEY_PREFIX",
    "DEFAULT_ELEVENLABS_VOICE",
    "LLM_PROVIDERS",
    "SHARED_AGENT_KEYS",
    "STT_PROVIDERS",
    "TTS_PROVIDERS",
    "PathSource",
    "Pipeline",
    "PipelineUnavailable",
    "ProviderContext",
    "ProviderKeyMissing",
    "ProviderKeys",
    "RealtimePlan",
    "VoiceChoice",
    "agent_key_refusal",
    "build_pipeline",
    "check_pipeline",
    "key_ref_problems",
    "plan_realtime",
    "provider_key",
    "realtime_path",
]

log = logging.getLogger(__name__)

# Keys an agent may name with `env:`: the provider settings (the operator's defaults), and variables an operator set
# aside for agents, each for one organization or shared by all (`agent_key_refusal`). Any other variable of the
# process (the database password, Twilio's token) is never handed to a provider.
_SETTING_KEYS: dict[str, Callable[[Settings], SecretStr | None]] = {
    "DEEPGRAM_API_KEY": lambda settings: settings.deepgram_api_key,
    "OPENAI_API_KEY": lambda settings: settings.openai_api_key,
    "ELEVENLABS_API_KEY": lambda settings: settings.elevenlabs_api_key,
}
AGENT_KEY_PREFIX = "DIALTONE_AGENT_KEY_"
SHARED_AGENT_KEYS = "SHARED"
"""The owner part of `DIALTONE_AGENT_KEY_SHARED_<NAME>`: a key the operator lets every organization spend."""
# The owner part of a variable is the organization id verbatim. Ids are CUIDs (storage.records.new_id, Prisma's
# cuid()): lower-case letters and digits, so never "SHARED" and never an "_", which ends the owner part. An id with
# any other character (only ever inserted by hand) cannot appear in a variable name: that organization has no own
# variables, and its error says so rather than suggesting a name that could never match.
_NAMEABLE_ID = re.compile(r"[A-Za-z0-9]+")
DEFAULT_ELEVENLABS_VOICE = "21m00Tcm4TlvDq8ikWAM"  # ElevenLabs' stock "Rachel"


@dataclass(frozen=True, slots=True)
class Pipeline:
    """One call's three providers."""

    stt: SpeechToText
    llm: LanguageModel
    tts: TextToSpeech
    path: PathEngine | None = None
    """Where the call is on its conversation path, when its model follows one."""
    path_id: str | None = None
    """The ConversationPath's id, with `path`."""
    phrases: PhraseCache | None = None
    """Where the agent's scripted phrases are said from once its voice has said them (the engine's)."""


@dataclass(frozen=True, slots=True)
class RealtimePlan:
    """A speech-to-speech agent's provider and the key it will use."""

    config: OpenAIRealtimeConfig
    api_key: str
    base_url: str


@dataclass(frozen=True, slots=True)
class PathSource:
    """A conversation path the call may follow: its id, react-flow graph and speaking style."""

    id: str
    nodes: Sequence[Any]
    edges: Sequence[Any]
    agent_speech: str | None = None
    """How the agent speaks on this path (the chat model's style)."""
    from_campaign: bool = False
    """The call's campaign chose this path: it overrides the agent's (and the llm's conversation_path_id)."""


@dataclass(frozen=True, slots=True)
class VoiceChoice:
    """The agent's Voice row, as far as a synthesizer cares."""

    provider: str | None
    provider_voice_id: str | None


@dataclass(frozen=True, slots=True)
class ProviderKeys:
    """Where the providers' API keys and endpoints come from: the engine's settings, the agent's Tools, variables."""

    settings: Settings
    tool_keys: Mapping[str, str] = field(default_factory=dict)
    """The agent's Tools' `apiKey`s by Tool id."""
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    """Where `DIALTONE_AGENT_KEY_*` variables are read."""
    organization_id: str | None = field(kw_only=True)
    """The agent's organization: which `DIALTONE_AGENT_KEY_<organizationId>_*` variables it may use. None is the
    engine's own use (an operator setting such as DIALTONE_KB_EMBEDDING_KEY_REF): shared variables only. Required, so
    that every place keys are resolved says whose they are."""


@dataclass(frozen=True, slots=True)
class ProviderContext:
    """What one call's providers are built with beyond their options: keys, the engine's clients, prompt, functions."""

    keys: ProviderKeys
    clients: ProviderClients
    """The engine's SDK clients, shared by every call."""
    instructions: str = ""
    """The system prompt, variables filled in."""
    tools: ToolRunner | None = None
    voice_ids: Mapping[str, str] = field(default_factory=dict)
    """ElevenLabs voice ids by lower-cased voice name (Voice rows the organization may use)."""
    on_failover: OnFailover | None = None
    on_replay_lost: Callable[[str, int], None] | None = None
    """Told (provider, ms) when a recognizer reconnecting could not hear some of the caller's speech again."""
    default_region: str | None = None
    """Region (e.g. "US") to read phone numbers the model gives without a country code in."""
    offline_work: OfflineWork = INLINE
    """Where offline providers decode and synthesize: the engine's OfflineWorkers; inline for tests and tools."""
    knowledge: KnowledgeSource | None = None
    """The agent's knowledge bases, when it has any: the offline model answers from them what its path cannot."""
    variables: Mapping[str, Any] = field(default_factory=dict)
    """The call's variables (`customer.name`, `today`, the agent's and the call's own): its path's `{{…}}` too."""
    knowledge_vocabulary: Sequence[str] = ()
    """Words the knowledge bases use most, for the offline recogniser to expect."""

    @property
    def settings(self) -> Settings:
        """The engine's settings (the providers' endpoints)."""
        return self.keys.settings


@dataclass(frozen=True, slots=True)
class _Build:
    """One call's build, as the factories see it."""

    config: AgentConfiguration
    context: ProviderContext
    paths: Sequence[PathSource]
    voice: VoiceChoice | None
    keywords: list[str] = field(default_factory=list)
    """Words the conversation path listens for: the llm stage adds them, the recognizers are made after it."""
    engines: dict[str, PathEngine] = field(default_factory=dict)
    """The call's place on its path, by path id: one engine shared by the stage's models."""

    def engine(self, path: PathSource) -> PathEngine:
        """The call's engine on `path` (made at first use, from the path's checked graph)."""
        if path.id not in self.engines:
            self.engines[path.id] = PathEngine(
                runnable_path(path.nodes, path.edges),
                tools=self.context.tools,
                knowledge=self.context.knowledge,
                call_variables=self.context.variables,
            )
        return self.engines[path.id]


_Product = TypeVar("_Product")
_Option = TypeVar("_Option", bound=ProviderConfig)

_Factory = Callable[[Any, str | None, _Build], _Product]
"""Makes one stage's provider from its options (the model its `provider` name selects), its key and the build."""


def check_pipeline(config: AgentConfiguration, keys: ProviderKeys) -> None:
    """Raise PipelineUnavailable if some stage has no usable provider or cannot speak the agent's language."""
    problems = language_problems(config)
    if problems:
        path, message = problems[0]
        stages: dict[str, Stage] = {"tts": "tts", "realtime": "realtime"}
        raise PipelineUnavailable(f"{path}: {message}", stage=stages.get(path.partition("[")[0], "stt"))
    if config.realtime:
        plan_realtime(config, keys)
        return
    _keyed("stt", config.stt, keys)
    _keyed("llm", config.llm, keys)
    _keyed("tts", config.tts, keys)


def plan_realtime(config: AgentConfiguration, keys: ProviderKeys) -> RealtimePlan:
    """The first usable speech-to-speech provider, or PipelineUnavailable saying which key is missing."""
    option, key = _keyed("realtime", config.realtime or (), keys)[0]
    return RealtimePlan(localized(option, config.language), key or "", keys.settings.openai_base_url)


def build_pipeline(
    config: AgentConfiguration,
    *,
    context: ProviderContext,
    paths: Sequence[PathSource] = (),
    voice: VoiceChoice | None = None,
) -> Pipeline:
    """Build the call's providers: the usable ones of each stage, in order, as a fallback chain if several."""
    if config.realtime and not config.realtime_fallback:
        raise PipelineUnavailable(
            "realtime: this speech-to-speech agent lists no stt, llm and tts to fall back on", stage="realtime"
        )
    build = _Build(config, context, paths, voice)
    # The language model first: a conversation path adds the words it listens for to the recognizers' vocabulary.
    models = _factories("llm", config.llm, LLM_PROVIDERS, build)
    llm = models[0][1]() if len(models) == 1 else FallbackLLM(_made(models), on_failover=context.on_failover)
    recognizers = _factories("stt", config.stt, STT_PROVIDERS, build)
    stt = recognizers[0][1]() if len(recognizers) == 1 else FallbackSTT(recognizers, on_failover=context.on_failover)
    voices = _factories("tts", config.tts, TTS_PROVIDERS, build)
    tts = voices[0][1]() if len(voices) == 1 else FallbackTTS(_made(voices), on_failover=context.on_failover)
    path_id, engine = next(iter(build.engines.items()), (None, None))
    return Pipeline(stt=stt, llm=llm, tts=tts, path=engine, path_id=path_id, phrases=context.clients.phrases)


def provider_key(option: ProviderConfig, keys: ProviderKeys, *, stage: Stage) -> str | None:
    """The API key a provider would use (None for offline providers); ProviderKeyMissing naming the missing key.

    Messages name variables and Tools, never a key's value.
    """
    if not isinstance(option, CloudProviderConfig):
        return None
    provider = option.provider
    kind, _, name = (option.api_key_ref or f"env:{option.key_name}").partition(":")
    if kind == "tool":
        key = keys.tool_keys.get(name)
        if not key:
            raise ProviderKeyMissing(
                f"{provider} needs the apiKey of tool {name}, which is not linked to this agent or has no apiKey",
                stage=stage,
                provider=provider,
            )
        return key
    # Refused before the variable is read: whether another organization's key is set is not this agent's business.
    refusal = agent_key_refusal(name, keys.organization_id)
    if refusal is not None:
        raise ProviderKeyMissing(f"{provider}: {refusal}", stage=stage, provider=provider)
    if name in _SETTING_KEYS:
        secret = _SETTING_KEYS[name](keys.settings)
        key = secret.get_secret_value() if secret is not None else ""
    else:
        key = keys.environ.get(name, "")
    if not key:
        raise ProviderKeyMissing(f"{provider} needs the key {name}, which is not set", stage=stage, provider=provider)
    return key


def agent_key_refusal(variable: str, organization_id: str | None) -> str | None:
    """Why the agents of `organization_id` (None: the engine's own settings) may never use the key in `variable`; None
    when they may: a provider setting, `DIALTONE_AGENT_KEY_SHARED_<NAME>`, or their own organization's
    `DIALTONE_AGENT_KEY_<organizationId>_<NAME>` (the id compared exactly, case included)."""
    if variable in _SETTING_KEYS:
        return None
    owner, underscore, label = variable.removeprefix(AGENT_KEY_PREFIX).partition("_")
    named = variable.startswith(AGENT_KEY_PREFIX) and bool(owner and underscore and label)
    if named and owner in (SHARED_AGENT_KEYS, organization_id):
        return None
    shared = f"{AGENT_KEY_PREFIX}{SHARED_AGENT_KEYS}_<NAME> (the operator's, shared with every organization)"
    if organization_id is None:
        forms = f"{shared}; one organization's variable is not for the engine's own settings"
    elif _NAMEABLE_ID.fullmatch(organization_id):
        forms = f"{AGENT_KEY_PREFIX}{organization_id}_<NAME> (this organization's own) or {shared}"
    else:
        forms = f"{shared}; organization {organization_id} has no own variables (its id cannot be part of a name)"
    if variable.startswith(AGENT_KEY_PREFIX):
        user = "the engine's own settings" if organization_id is None else "this organization's agents"
        return f"{variable} is not a key {user} may use: name it {forms}"
    return f"{variable} is not a key setting: use {', '.join(_SETTING_KEYS)}, or a variable named {forms}"


def key_ref_problems(config: AgentConfiguration, organization_id: str) -> list[tuple[str, str]]:
    """(JSON path, message) for each provider whose `api_key_ref` names a variable the organization may never use.

    For saving an agent; a key merely unset (or a Tool not linked yet) is not a problem: it may be there by the call.
    """
    problems: list[tuple[str, str]] = []
    for stage in ("stt", "llm", "tts", "realtime"):
        for index, option in enumerate(getattr(config, stage) or ()):
            if not isinstance(option, CloudProviderConfig) or option.api_key_ref is None:
                continue
            kind, _, name = option.api_key_ref.partition(":")
            refusal = agent_key_refusal(name, organization_id) if kind == "env" else None
            if refusal is not None:
                problems.append((f"{stage}[{index}].api_key_ref", refusal))
    return problems


def configuration_references(config: AgentConfiguration) -> list[tuple[str, str, str]]:
    """(JSON path, table, id) of each row the configuration names by id: a conversation-path model's
    `conversation_path_id`, a provider's `api_key_ref: tool:<toolId>`.

    For saving an agent: each must be a row of its organization, linked to the agent or not yet (calls use it once it
    is); an id of no row of the organization's would never be.
    """
    references: list[tuple[str, str, str]] = []
    for stage in ("stt", "llm", "tts", "realtime"):
        for index, option in enumerate(getattr(config, stage) or ()):
            if isinstance(option, ConversationPathLLMConfig) and option.conversation_path_id is not None:
                references.append(
                    (f"{stage}[{index}].conversation_path_id", "ConversationPath", option.conversation_path_id)
                )
            if isinstance(option, CloudProviderConfig) and option.api_key_ref is not None:
                kind, _, name = option.api_key_ref.partition(":")
                if kind == "tool":
                    references.append((f"{stage}[{index}].api_key_ref", "Tool", name))
    return references


def _keyed(stage: Stage, options: Sequence[_Option], keys: ProviderKeys) -> list[tuple[_Option, str | None]]:
    """The stage's usable providers with their keys, in order; PipelineUnavailable naming every missing key."""
    usable: list[tuple[_Option, str | None]] = []
    problems: list[str] = []
    for option in options:
        try:
            usable.append((option, provider_key(option, keys, stage=stage)))
        except ProviderKeyMissing as exc:
            problems.append(str(exc))
    if not usable:
        raise PipelineUnavailable(f"{stage}: " + "; ".join(problems or ["no provider configured"]), stage=stage)
    return usable


def _factories(
    stage: Stage,
    options: Sequence[ProviderConfig],
    table: Mapping[str, _Factory[_Product]],
    build: _Build,
) -> list[tuple[str, Callable[[], _Product]]]:
    """(name, factory) of each usable provider of the stage, in order."""
    return [
        (
            option.provider,
            functools.partial(table[option.provider], localized(option, build.config.language), key, build),
        )
        for option, key in _keyed(stage, options, build.context.keys)
    ]


def _made(factories: Sequence[tuple[str, Callable[[], _Product]]]) -> list[tuple[str, _Product]]:
    return [(name, make()) for name, make in factories]


# ----------------------------------------------------------------------------------------------- speech to text


def _deepgram(option: DeepgramSTTConfig, key: str | None, build: _Build) -> SpeechToText:
    from pipelines.stt.deepgram import DeepgramSTT  # the SDK loads only for agents that use it

    context = build.context
    settings = context.settings
    return DeepgramSTT(
        option,
        clients=context.clients,
        api_key=key or "",
        url=settings.deepgram_url,
        silent_socket_seconds=settings.deepgram_silent_socket_timeout,
        on_replay_lost=functools.partial(context.on_replay_lost, "deepgram") if context.on_replay_lost else None,
    )


def _sphinx(option: SphinxSTTConfig, key: str | None, build: _Build) -> SpeechToText:
    return SphinxSTT(
        work=build.context.offline_work,
        keyphrases=(*option.keyphrases, *build.keywords),
        end_silence_ms=build.config.endpointing.silence_ms,
    )


STT_PROVIDERS: Mapping[str, _Factory[SpeechToText]] = {"deepgram": _deepgram, "sphinx": _sphinx}
"""Speech-to-text factories by the configuration's `provider` name."""


# ----------------------------------------------------------------------------------------------- language model


def _openai_chat(option: OpenAILLMConfig, key: str | None, build: _Build) -> LanguageModel:
    from pipelines.llm.openai_chat import OpenAIChatLLM

    context = build.context
    return OpenAIChatLLM(
        option,
        client=context.clients.openai(key or "", context.settings.openai_base_url),
        instructions=context.instructions,
        tools=context.tools,
        default_region=context.default_region,
        transfer=TransferRules.from_config(build.config.transfer),
        path=_chat_path(build),
        knowledge=context.knowledge,
    )


def _chat_path(build: _Build) -> ChatPath | None:
    """The call's path (the campaign's, else the agent's default) as a chat model walks it; None without one."""
    path = build.paths[0] if build.paths else None
    if path is None:
        return None
    try:
        return ChatPath(build.engine(path), agent_speech=path.agent_speech, path_id=path.id)
    except InvalidConversationPath as exc:  # a draft (no nodes yet): the agent talks from its prompt
        log.warning("conversation path %s is not followed: %s", path.id, exc)
        return None


def realtime_path(paths: Sequence[PathSource], context: ProviderContext) -> ChatPath | None:
    """The path a speech-to-speech call follows (the campaign's, else the agent's default); None without one."""
    return _chat_path(_Build(AgentConfiguration(), context, paths, None))


def _conversation_path(option: ConversationPathLLMConfig, key: str | None, build: _Build) -> LanguageModel:
    path = _choose_path(option, build.paths)
    knowledge = build.context.knowledge
    answer = PassageAnswerer(knowledge) if knowledge is not None else None
    if path is None:
        build.keywords.extend(build.context.knowledge_vocabulary)
        return SimpleResponder(answer=answer)
    runner = ConversationPathLLM.on_engine(build.engine(path), option, answer=answer)
    build.keywords.extend([*runner.keywords(), *RECOGNIZER_PHRASES])  # a callee asking to opt out is heard
    build.keywords.extend(build.context.knowledge_vocabulary)
    return runner


LLM_PROVIDERS: Mapping[str, _Factory[LanguageModel]] = {
    "openai": _openai_chat,
    "conversation_path": _conversation_path,
}
"""Language-model factories by the configuration's `provider` name."""


def _choose_path(option: ConversationPathLLMConfig, paths: Sequence[PathSource]) -> PathSource | None:
    if option.conversation_path_id is None or (paths and paths[0].from_campaign):
        return paths[0] if paths else None
    for path in paths:
        if path.id == option.conversation_path_id:
            return path
    raise PipelineUnavailable(
        f"llm: conversation path {option.conversation_path_id} is not linked to this agent", stage="llm"
    )


# ----------------------------------------------------------------------------------------------- text to speech


def _elevenlabs(option: ElevenLabsTTSConfig, key: str | None, build: _Build) -> TextToSpeech:
    from pipelines.tts.elevenlabs import ElevenLabsTTS

    context = build.context
    return ElevenLabsTTS(
        option,
        clients=context.clients,
        api_key=key or "",
        url=context.settings.elevenlabs_url,
        voice_id=_elevenlabs_voice(option, build.voice, context),
    )


def _espeak(option: EspeakTTSConfig, key: str | None, build: _Build) -> TextToSpeech:
    voice, name = build.voice, option.voice
    if voice is not None and voice.provider == "espeak" and voice.provider_voice_id:
        name = voice.provider_voice_id
    return EspeakTTS(work=build.context.offline_work, voice=name or "en-us", rate=option.rate, pitch=option.pitch)


TTS_PROVIDERS: Mapping[str, _Factory[TextToSpeech]] = {"elevenlabs": _elevenlabs, "espeak": _espeak}
"""Text-to-speech factories by the configuration's `provider` name."""


def _elevenlabs_voice(option: ElevenLabsTTSConfig, voice: VoiceChoice | None, context: ProviderContext) -> str:
    """The configured voice (a name of a Voice row, or a voice id), else the agent's ElevenLabs Voice."""
    if option.voice:
        return context.voice_ids.get(option.voice.lower(), option.voice)
    if voice is not None and voice.provider == "elevenlabs" and voice.provider_voice_id:
        return voice.provider_voice_id
    return DEFAULT_ELEVENLABS_VOICE
