"""What a call needs before its first word: the agent's configuration, prompt, functions, keys and voice.

The voice webhook uses `provider_keys` with `check_pipeline` to refuse a call its agent cannot run (a
missing key) before answering it; the media socket uses `prepare_call` to build the call's providers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import phonenumbers

from config.agent import AgentConfiguration, ElevenLabsTTSConfig
from config.settings import Settings
from engine.knowledge.embeddings import OpenAIEmbedder
from engine.knowledge.lookup import KnowledgeLookup
from engine.server import metrics
from pipelines.clients import ProviderClients
from pipelines.fallback import OnFailover
from pipelines.knowledge import KnowledgeFunction
from pipelines.languages import language_instruction
from pipelines.llm.prompt import call_variables, hidden_names, render_prompt
from pipelines.offline_workers import OfflineWork
from pipelines.registry import PathSource, ProviderContext, ProviderKeys, VoiceChoice
from pipelines.tools import ToolCallObserver, ToolRunner, agent_functions
from storage import Pool, campaigns, conversation_paths, voices
from storage.agents import AgentBundle
from storage.call_logs import CallLog
from storage.enums import VoiceStatus
from storage.errors import NotFound
from storage.records import Queryable

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTIONS = (
    "You are a helpful, concise phone agent. Speak in short, natural sentences; never use lists, markdown or emoji. "
    "When the caller is done, say goodbye and use end_call."
)


@dataclass(frozen=True, slots=True)
class PreparedCall:
    """Everything the session of one call is built from."""

    context: ProviderContext
    config: AgentConfiguration
    """The agent's configuration with the lines it says word for word (`goodbyeSentence`, `apologySentence`) filled
    from the call's variables, as the first sentence is."""
    first_sentence: str | None
    paths: list[PathSource]
    voice: VoiceChoice | None
    variables: Mapping[str, Any]
    knowledge: KnowledgeLookup | None = None
    """The agent's knowledge bases, searched during the call (None when it has none)."""


def tool_keys(bundle: AgentBundle) -> dict[str, str]:
    """API keys kept in the agent's Tools (`configuration.apiKey`), by Tool id."""
    keys = {}
    for tool in bundle.tools:
        key = tool.configuration.get("apiKey") if isinstance(tool.configuration, dict) else None
        if isinstance(key, str) and key:
            keys[tool.id] = key
    return keys


def provider_keys(settings: Settings, bundle: AgentBundle) -> ProviderKeys:
    """Keys and endpoints only: enough to tell whether the agent's providers can run.

    Scoped to the agent's organization: its `DIALTONE_AGENT_KEY_<organizationId>_*` variables and shared ones only.
    """
    return ProviderKeys(settings, tool_keys=tool_keys(bundle), organization_id=bundle.agent.organization_id)


async def prepare_call(
    db: Queryable,
    *,
    settings: Settings,
    clients: ProviderClients,
    config: AgentConfiguration,
    bundle: AgentBundle,
    call_log: CallLog,
    offline_work: OfflineWork,
    on_failover: OnFailover | None = None,
    on_tool_call: ToolCallObserver | None = None,
    now: datetime | None = None,
    embedder: OpenAIEmbedder | None = None,
) -> PreparedCall:
    """Fill the prompt, gather the agent's functions and voices, and pick the first sentence for one call.

    A campaign call speaks its campaign's taskPrompt and firstSentence when they are set; per-call variables
    (CallLog.metadata.variables, e.g. a recipient's columns) fill `{{...}}` placeholders with the agent's own.
    The call's providers and functions will go through the engine's `clients`; its knowledge lookups search by
    vector too when the engine has an `embedder`; `on_tool_call` hears of each function the model calls.
    """
    campaign = await campaigns.find_call_campaign(
        db, organization_id=call_log.organization_id, campaign_id=call_log.campaign_id
    )
    variables = template_variables(config, call_log, now or datetime.now(UTC), tell_hidden=True)
    template = (campaign.task_prompt if campaign and campaign.task_prompt else None) or config.prompt
    rendered = render_prompt(template or DEFAULT_INSTRUCTIONS, variables)
    instructions = "\n\n".join(part for part in (rendered.text, language_instruction(config.language)) if part)
    if rendered.missing:
        log.warning("call %s: prompt variables without a value: %s", call_log.call_id, ", ".join(rendered.missing))
    first_template = (
        campaign.first_sentence if campaign and campaign.first_sentence else None
    ) or config.first_sentence
    first_sentence = render_prompt(first_template, variables).text if first_template else None
    spoken = {
        name: render_prompt(line, variables).text
        for name in ("goodbye_sentence", "apology_sentence")
        if (line := getattr(config, name))
    }

    knowledge = None
    if bundle.knowledge_bases and isinstance(db, Pool):
        knowledge = KnowledgeLookup(
            db,
            organization_id=call_log.organization_id,
            knowledge_base_ids=[kb.id for kb in bundle.knowledge_bases],
            limit=settings.kb_search_results,
            embedder=embedder,
        )
    runner = ToolRunner(
        # A Tool the organization has not connected (Tool.isConnected false) is not offered to the model.
        agent_functions([tool for tool in bundle.tools if tool.is_connected]),
        call={
            "callLogId": call_log.id,
            "callSid": call_log.call_id,
            "agentId": call_log.agent_id,
            "customer": call_log.phone_number,
        },
        session=clients.http(allow_private=settings.allow_private_tool_urls),
        allow_private=settings.allow_private_tool_urls,
        local=[KnowledgeFunction(knowledge)] if knowledge is not None else [],
        observe=on_tool_call,
    )
    voice_ids: dict[str, str] = {}
    if any(isinstance(option, ElevenLabsTTSConfig) and option.voice for option in config.tts):
        for voice in await voices.list_voices(db, organization_id=call_log.organization_id):
            if voice.provider == "elevenlabs" and voice.provider_voice_id and voice.status is VoiceStatus.READY:
                voice_ids.setdefault(voice.name.lower(), voice.provider_voice_id)
    context = ProviderContext(
        keys=provider_keys(settings, bundle),
        clients=clients,
        instructions=instructions,
        tools=runner,
        voice_ids=voice_ids,
        on_failover=on_failover or count_failover,
        on_replay_lost=count_replay_lost,
        default_region=_region(bundle.phone_number.phone_number if bundle.phone_number else call_log.phone_number),
        offline_work=offline_work,
        knowledge=knowledge,
        knowledge_vocabulary=tuple(await knowledge.vocabulary()) if knowledge and _offline_stt(config) else (),
        variables=variables,
    )
    return PreparedCall(
        context=context,
        config=config.model_copy(update=spoken) if spoken else config,
        first_sentence=first_sentence,
        paths=await call_paths(db, bundle, campaign_path_id=campaign.conversation_path_id if campaign else None),
        voice=_ready_voice(bundle, call_log),
        variables=variables,
        knowledge=knowledge,
    )


def template_variables(
    config: AgentConfiguration, call_log: CallLog, now: datetime, *, tell_hidden: bool = False
) -> dict[str, Any]:
    """What a call's `{{...}}` placeholders are filled from, in its prompt, first sentence and voicemail message alike:
    the call's own (`customer.name`, `now`...), the agent's `variables`, and the per-call ones on top
    (CallLog.metadata.variables, e.g. a recipient's columns). A name that would hide a built-in (`today`), refused
    when given but stored before that rule, is left out: the built-in fills its placeholder. The call's setup
    (`tell_hidden`) logs which, once a call; its voicemail message and post-call analysis fill theirs alike."""
    extra: dict[str, Any] = dict(config.variables)
    per_call = call_log.metadata.get("variables")
    if isinstance(per_call, dict):
        extra.update(per_call)
    hidden = hidden_names(extra) if tell_hidden else None
    if hidden:
        log.warning(
            "call %s: variables named like built-in prompt variables are left out (the built-ins fill them; "
            "rename them): %s",
            call_log.call_id,
            ", ".join(hidden),
        )
    return call_variables(
        now=now,
        timezone=config.timezone,
        customer_number=call_log.phone_number,
        customer_name=call_log.customer,
        direction=call_log.call_type.value.lower(),
        extra=extra,
    )


def _ready_voice(bundle: AgentBundle, call_log: CallLog) -> VoiceChoice | None:
    """The agent's Voice if it is READY; a voice still PROCESSING or in ERROR gives way to the provider's default."""
    voice = bundle.voice
    if voice is None:
        return None
    if voice.status is not VoiceStatus.READY:
        log.warning(
            "call %s: the agent's voice %s is %s, not READY; the call speaks with the provider's default voice",
            call_log.call_id,
            voice.id,
            voice.status.value,
        )
        return None
    return VoiceChoice(voice.provider, voice.provider_voice_id)


async def call_paths(db: Queryable, bundle: AgentBundle, *, campaign_path_id: str | None) -> list[PathSource]:
    """The paths a call may follow, the one it follows first: its campaign's path, else the agent's default."""
    paths = [PathSource(p.id, p.nodes, p.edges, p.agent_speech) for p in bundle.conversation_paths]
    if campaign_path_id is None:
        return paths
    try:
        chosen = await conversation_paths.get_conversation_path(
            db, organization_id=bundle.agent.organization_id, conversation_path_id=campaign_path_id
        )
    except NotFound:  # deleted since the campaign was read: the agent's own path
        return paths
    others = [path for path in paths if path.id != chosen.id]
    return [PathSource(chosen.id, chosen.nodes, chosen.edges, chosen.agent_speech, from_campaign=True), *others]


def _offline_stt(config: AgentConfiguration) -> bool:
    return any(option.provider == "sphinx" for option in config.stt)


def _region(number: str | None) -> str | None:
    if not number:
        return None
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(number)) or None
    except phonenumbers.NumberParseException:
        return None


def count_replay_lost(provider: str, lost_ms: int) -> None:
    """Count the caller's speech a recognizer could not hear again after a drop (it logs the loss itself)."""
    metrics.STT_REPLAY_LOST_MS.labels(provider).inc(lost_ms)


def count_failover(stage: str, failed: str, replacement: str) -> None:
    """Count a provider switch (and log it: operators want to know their primary is failing)."""
    log.warning("%s provider %s failed; the call goes on with %s", stage, failed, replacement)
    metrics.PROVIDER_FAILOVERS.labels(stage, replacement).inc()
    metrics.PROVIDER_ERRORS.labels(stage, failed).inc()
