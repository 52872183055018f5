"""The provider registry: an agent's configuration JSON → the STT, LLM and TTS instances of one call.

Each stage may list providers in order; a call gets the first one this engine can run with the keys it
has. The offline providers (PocketSphinx, the conversation-path runner, eSpeak NG) need nothing; the
cloud ones (Deepgram, OpenAI, ElevenLabs, OpenAI Realtime) are wired in by the cloud-pipelines work and
until then are reported as unavailable, so a call configured only for them is refused with that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from config.agent import (
    AgentConfiguration,
    ConversationPathLLMConfig,
    EspeakTTSConfig,
    LLMConfig,
    SphinxSTTConfig,
    STTConfig,
    TTSConfig,
)
from pipelines.llm.base import LanguageModel
from pipelines.llm.conversation_path import ConversationPathLLM, PathGraph
from pipelines.llm.simple import SimpleResponder
from pipelines.stt.base import SpeechToText
from pipelines.stt.sphinx import SphinxSTT
from pipelines.tts.base import TextToSpeech
from pipelines.tts.espeak import EspeakTTS


class PipelineUnavailable(Exception):
    """No provider listed for a stage can run here; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Pipeline:
    """One call's three providers."""

    stt: SpeechToText
    llm: LanguageModel
    tts: TextToSpeech


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


def build_pipeline(
    config: AgentConfiguration,
    *,
    paths: Sequence[PathSource] = (),
    voice: VoiceChoice | None = None,
) -> Pipeline:
    """Build the call's providers from the first usable entry of each stage."""
    if config.realtime:
        raise PipelineUnavailable("realtime: OpenAI Realtime is not available in this engine yet")
    llm, keywords = _build_llm(config.llm, paths)
    return Pipeline(
        stt=_build_stt(config.stt, config, keywords),
        llm=llm,
        tts=_build_tts(config.tts, voice),
    )


def _build_stt(stage: Sequence[STTConfig], config: AgentConfiguration, keywords: Sequence[str]) -> SpeechToText:
    for option in stage:
        if isinstance(option, SphinxSTTConfig):
            return SphinxSTT(
                keyphrases=(*option.keyphrases, *keywords),
                end_silence_ms=config.endpointing.silence_ms,
            )
    raise PipelineUnavailable(_unavailable("stt", stage))


def _build_llm(stage: Sequence[LLMConfig], paths: Sequence[PathSource]) -> tuple[LanguageModel, list[str]]:
    for option in stage:
        if isinstance(option, ConversationPathLLMConfig):
            path = _choose_path(option, paths)
            if path is None:
                return SimpleResponder(), []
            runner = ConversationPathLLM.from_path(path, option)
            return runner, runner.keywords()
    raise PipelineUnavailable(_unavailable("llm", stage))


def _choose_path(option: ConversationPathLLMConfig, paths: Sequence[PathSource]) -> PathGraph | None:
    if option.conversation_path_id is None:
        return paths[0] if paths else None
    for path in paths:
        if path.id == option.conversation_path_id:
            return path
    raise PipelineUnavailable(f"llm: conversation path {option.conversation_path_id} is not linked to this agent")


def _build_tts(stage: Sequence[TTSConfig], voice: VoiceChoice | None) -> TextToSpeech:
    for option in stage:
        if isinstance(option, EspeakTTSConfig):
            name = option.voice
            if voice is not None and voice.provider == "espeak" and voice.provider_voice_id:
                name = voice.provider_voice_id
            return EspeakTTS(voice=name, rate=option.rate, pitch=option.pitch)
    raise PipelineUnavailable(_unavailable("tts", stage))


def _unavailable(stage_name: str, stage: Sequence[Any]) -> str:
    names = ", ".join(option.provider for option in stage) or "none"
    return f"{stage_name}: no provider this engine can run yet (configured: {names})"
