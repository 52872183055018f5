"""The agent's `configuration` JSON as a typed, validated schema: providers per stage, call behaviour, defaults.

`parse_agent_configuration` turns the stored JSON into a frozen `AgentConfiguration` or raises
`AgentConfigurationError` naming every bad field by its JSON path. Provider options keep the vendors' own
snake_case names; call-behaviour keys are camelCase (the dashboard is JavaScript) and snake_case is accepted too.
"""

from __future__ import annotations

import difflib
import json
import re
import zoneinfo
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

import phonenumbers
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel, to_snake
from pydantic_core import ErrorDetails

from config.phone import InvalidPhoneNumber, e164

_Number = TypeVar("_Number", int, float)


def _between(low: _Number, high: _Number) -> AfterValidator:
    def check(value: _Number) -> _Number:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return AfterValidator(check)


def _at_least(low: int) -> AfterValidator:
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be at least {low}")
        return value

    return AfterValidator(check)


_KEY_REF = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]*|tool:[A-Za-z0-9_-]+")


def _key_ref(value: str) -> str:
    if not _KEY_REF.fullmatch(value):
        raise ValueError("must be 'env:<VARIABLE>' or 'tool:<toolId>', naming where the key is kept, not the key")
    return value


def _deepgram_endpointing(value: object) -> object:
    # A union of int and Literal[False] would report one error per member; one sentence reads better.
    if value is False:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number of milliseconds, or false to turn endpointing off")
    if value < 10:
        raise ValueError("must be at least 10 ms, or false to turn endpointing off")
    return value


def _time_zone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError("must be an IANA time zone such as 'America/New_York'") from None
    return value


_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*")


def _language_tag(value: str) -> str:
    if not _LANGUAGE_TAG.fullmatch(value):
        raise ValueError("must be a BCP 47 language tag such as 'en-US', 'es' or 'fr-FR'")
    return value


MAX_SPOKEN_CHARS = 4000
"""The longest text the agent says word for word (a sentence of its configuration, a path node's line): minutes
of speech already, and one synthesis job each, which an offline worker must finish within its deadline."""

SpokenText = Annotated[str, Field(max_length=MAX_SPOKEN_CHARS)]
"""A text the agent says word for word."""

KeyRef = Annotated[str, AfterValidator(_key_ref)]
"""Where a provider's API key comes from: `env:<VARIABLE>` or `tool:<toolId>`."""

Words = Annotated[tuple[str, ...], Field(strict=False)]
"""A list of strings in the JSON, kept as a tuple."""


class ProviderConfig(BaseModel):
    """Options of one provider; keys are the vendor's own names and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)

    provider: str
    """Which vendor or engine serves the stage; each subclass narrows it to its own name."""


class CloudProviderConfig(ProviderConfig):
    """A provider that needs an API key."""

    key_name: ClassVar[str]
    """The setting that holds the key when `api_key_ref` is not given."""

    api_key_ref: KeyRef | None = None
    """Where the key comes from (`env:<VARIABLE>` or `tool:<toolId>`); default: the provider's setting. Which variables
    an organization's agents may name is pipelines.registry's rule (`agent_key_refusal`)."""


# Speech to text


class DeepgramSTTConfig(CloudProviderConfig):
    """Deepgram live streaming speech-to-text; options are Deepgram's `/v1/listen` query parameters."""

    key_name: ClassVar[str] = "DEEPGRAM_API_KEY"

    provider: Literal["deepgram"] = "deepgram"
    model: str = "nova-3"
    language: str | None = None
    """Deepgram's `language`; null: the agent's language."""
    endpointing: Annotated[int | Literal[False], BeforeValidator(_deepgram_endpointing)] = 300
    """Milliseconds of silence before Deepgram marks `speech_final`, or false to turn it off."""
    interim_results: bool = True
    utterance_end_ms: Annotated[int, _at_least(1000)] | None = 1000
    """Gap after the last final word before Deepgram sends `UtteranceEnd`; null turns it off."""
    vad_events: bool = True
    smart_format: bool = True
    keywords: Words = ()

    @model_validator(mode="before")
    @classmethod
    def _no_utterance_end_by_default_without_interim_results(cls, data: Any) -> Any:
        # Deepgram sends UtteranceEnd only with interim results, so the default must give way.
        if isinstance(data, dict) and data.get("interim_results") is False and "utterance_end_ms" not in data:
            return {**data, "utterance_end_ms": None}
        return data

    @field_validator("utterance_end_ms")
    @classmethod
    def _needs_interim_results(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("interim_results") is False:
            raise ValueError("needs interim_results: true (Deepgram sends UtteranceEnd only then); or use null")
        return value


class SphinxSTTConfig(ProviderConfig):
    """PocketSphinx offline speech-to-text: no network, no key."""

    provider: Literal["sphinx"] = "sphinx"
    language: str | None = None
    """Null: the agent's language; only US English has a model (any other is refused when the agent is saved)."""
    keyphrases: Annotated[Words, Field(max_length=1000)] = ()
    """Phrases the recogniser should favour (names, product words); a thousand at most, as of a path's keywords:
    its vocabulary is built in a worker that has 30 s, and fifty thousand phrases take that long."""


# Language model


class OpenAILLMConfig(CloudProviderConfig):
    """OpenAI streaming Chat Completions with tools."""

    key_name: ClassVar[str] = "OPENAI_API_KEY"

    provider: Literal["openai"] = "openai"
    model: str = "gpt-4o-mini"
    temperature: Annotated[float, _between(0, 2)] = 0.6
    max_tokens: Annotated[int, _between(1, 4096)] | None = None
    top_p: Annotated[float, _between(0, 1)] | None = None
    knowledge_in_context: bool = False
    """Search the agent's knowledge bases with each caller turn and give the model the best passages with it
    (besides the `search_knowledge_base` function it always has when the agent has knowledge bases)."""


class ConversationPathLLMConfig(ProviderConfig):
    """The offline conversation-path runner: the agent's ConversationPath nodes, keyword routing, knowledge base."""

    provider: Literal["conversation_path"] = "conversation_path"
    conversation_path_id: str | None = None
    """The ConversationPath to run; default: the agent's first linked path."""
    fallback_reply: str = "Sorry, I didn't catch that. Could you say it another way?"
    """What the agent says when no edge of the path matches the caller's words."""


# Text to speech


class ElevenLabsTTSConfig(CloudProviderConfig):
    """ElevenLabs text-to-speech over its multi-stream-input WebSocket (HTTP streaming as fallback)."""

    key_name: ClassVar[str] = "ELEVENLABS_API_KEY"

    provider: Literal["elevenlabs"] = "elevenlabs"
    voice: str | None = None
    """Voice name or voice id; default: the agent's Voice."""
    model: str = "eleven_flash_v2_5"
    language_code: str | None = None
    """ISO 639-1 code the model must speak; null: the agent's language, with the models that take one
    (eleven_flash_v2_5, eleven_turbo_v2_5)."""
    stability: Annotated[float, _between(0, 1)] | None = None
    """Null keeps the voice's own saved setting, as do `similarity_boost` and `speed`."""
    similarity_boost: Annotated[float, _between(0, 1)] | None = None
    speed: Annotated[float, _between(0.7, 1.2)] | None = None
    optimize_streaming_latency: Annotated[int, _between(0, 4)] | None = None


class EspeakTTSConfig(ProviderConfig):
    """eSpeak NG offline text-to-speech: no network, no key."""

    provider: Literal["espeak"] = "espeak"
    voice: str | None = None
    """An eSpeak NG voice ("en-us", "fr"); null: the voice for the agent's language."""
    rate: Annotated[int, _between(80, 450)] = 175
    """Words per minute."""
    pitch: Annotated[int, _between(0, 99)] = 50


# Speech to speech


class OpenAIRealtimeConfig(CloudProviderConfig):
    """OpenAI Realtime (GA) speech-to-speech, in place of the stt, llm and tts stages."""

    key_name: ClassVar[str] = "OPENAI_API_KEY"

    provider: Literal["openai"] = "openai"
    model: str = "gpt-realtime"
    voice: str = "marin"
    turn_detection: Literal["server_vad", "semantic_vad"] = "server_vad"
    eagerness: Literal["low", "medium", "high", "auto"] | None = None
    """How soon `semantic_vad` answers; only with that turn detection."""
    silence_duration_ms: Annotated[int, _between(100, 5000)] | None = None
    """Silence that ends the caller's turn under `server_vad`; only with that turn detection."""
    speed: Annotated[float, _between(0.25, 1.5)] | None = None
    transcription_model: str | None = None
    """Model that transcribes the caller for the call log (e.g. `gpt-4o-mini-transcribe`); null: none."""
    language: str | None = None
    """The caller's language for that transcription (ISO 639-1); null: the agent's language."""
    analysis_model: str = "gpt-4o-mini"
    """The chat model that writes the post-call summary and success judgement, with this entry's key."""

    @field_validator("eagerness")
    @classmethod
    def _eagerness_needs_semantic_vad(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("turn_detection", "semantic_vad") != "semantic_vad":
            raise ValueError("applies only with turn_detection 'semantic_vad'")
        return value

    @field_validator("silence_duration_ms")
    @classmethod
    def _silence_needs_server_vad(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("turn_detection", "server_vad") != "server_vad":
            raise ValueError("applies only with turn_detection 'server_vad'")
        return value


STTConfig = Annotated[DeepgramSTTConfig | SphinxSTTConfig, Field(discriminator="provider")]
"""One speech-to-text provider, chosen by its `provider` key."""
LLMConfig = Annotated[OpenAILLMConfig | ConversationPathLLMConfig, Field(discriminator="provider")]
"""One language-model provider, chosen by its `provider` key."""
TTSConfig = Annotated[ElevenLabsTTSConfig | EspeakTTSConfig, Field(discriminator="provider")]
"""One text-to-speech provider, chosen by its `provider` key."""
RealtimeConfig = Annotated[OpenAIRealtimeConfig, Field(discriminator="provider")]
"""One speech-to-speech provider, chosen by its `provider` key."""


def _members(stage_type: Any) -> tuple[type[BaseModel], ...]:
    chosen = get_args(stage_type)[0]  # Annotated[<union or model>, Field(discriminator=...)]
    return get_args(chosen) or (chosen,)


_STAGE_MODELS: dict[str, dict[str, type[BaseModel]]] = {
    stage: {model.model_fields["provider"].default: model for model in _members(stage_type)}
    for stage, stage_type in {"stt": STTConfig, "llm": LLMConfig, "tts": TTSConfig, "realtime": RealtimeConfig}.items()
}
PROVIDERS: dict[str, tuple[str, ...]] = {stage: tuple(models) for stage, models in _STAGE_MODELS.items()}
"""The provider names each stage accepts, e.g. `PROVIDERS["stt"] == ("deepgram", "sphinx")`."""

_OFFLINE_DEFAULTS = {
    "stt": {"provider": "sphinx"},
    "llm": {"provider": "conversation_path"},
    "tts": {"provider": "espeak"},
}


def _one_or_more(value: Any) -> Any:
    # A stage is one provider object or a list of them tried in order; inside, it is always a tuple.
    if isinstance(value, dict):
        return (value,)
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError("must name at least one provider (an empty fallback list has none to try)")
        return tuple(value)
    raise ValueError('must be a provider object such as {"provider": "..."} or a list of them')


_ONE_OR_MORE = BeforeValidator(_one_or_more)


# Call behaviour


class _CallBehaviour(BaseModel):
    """Call-behaviour keys: camelCase in the JSON, snake_case accepted, snake_case attributes."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        frozen=True,
        strict=True,
        use_attribute_docstrings=True,
    )


_BACKCHANNEL_WORDS = ("uh-huh", "mm-hmm", "yeah", "right", "okay", "ok", "sure", "yes")


class InterruptionConfig(_CallBehaviour):
    """When the caller's speech makes the agent stop talking (barge-in)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    threshold_ms: Annotated[int, _between(0, 3000)] = 300
    """Caller speech needed before the agent yields."""
    min_words: Annotated[int, _between(1, 20)] = 1
    """Words the caller must say before the agent yields."""
    backchannel_words: Words = _BACKCHANNEL_WORDS
    """Words that acknowledge without interrupting ("uh-huh") when said alone."""


class EndpointingConfig(_CallBehaviour):
    """When the caller's turn is over."""

    model_config = ConfigDict(extra="forbid")

    silence_ms: Annotated[int, _between(100, 5000)] = 700
    """VAD silence that ends the caller's turn when the speech-to-text gives no end of turn."""
    wait_for_greeting: bool = True
    """On outbound calls, let the callee speak first."""
    speculate: bool = True
    """Start the reply (model and synthesizer) after a short silence, before the turn is confirmed; its audio is
    held until it is, and it is dropped if the caller speaks on or the final words differ."""
    speculate_after_ms: Annotated[int, _between(40, 2000)] = 120
    """VAD silence after the caller's speech at which the recognizer is asked for its final words and the
    speculative reply starts."""
    incomplete_silence_ms: Annotated[int, _between(300, 5000)] = 1000
    """Silence that ends a turn whose words are clearly unfinished (no terminal punctuation from a punctuating
    recognizer, or a last word such as "and", "to", "the"): a pause inside a sentence is not an end of turn."""


class FirstClauseConfig(_CallBehaviour):
    """Where the first audio of a reply starts: at the first phrase that can be spoken naturally."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Speak from the first clause boundary; off, the first audio waits for the model's whole first sentence."""
    min_words: Annotated[int, _between(1, 50)] = 4
    """Words the first clause must have before its boundary counts ("Sure," alone is not cut off)."""
    marks: Annotated[str, Field(min_length=1, max_length=16)] = ",;:\u2014\u2013"
    """The characters that end a clause (followed by a space): comma, semicolon, colon, em and en dashes."""


class VoicemailConfig(_CallBehaviour):
    """What to do when an outbound call reaches an answering machine."""

    model_config = ConfigDict(extra="forbid")

    detect: bool = False
    """Ask Twilio to tell people from answering machines on outbound calls (Twilio bills each detection)."""
    action: Literal["leave_message", "hang_up"] = "hang_up"
    """After the greeting's beep, speak `message` then hang up; or hang up as soon as a machine is detected."""
    message: SpokenText | None = None
    """The message left after the beep; `{{name}}` placeholders are filled from the call's variables."""
    detection_timeout_seconds: Annotated[int, _between(3, 59)] = 30
    """How long Twilio may listen before it gives up and calls the answer `unknown` (treated as a person)."""

    @model_validator(mode="after")
    def _message_to_leave(self) -> VoicemailConfig:
        if self.action == "leave_message" and not (self.message and self.message.strip()):
            raise ValueError("action 'leave_message' needs a message to leave")
        return self


_TRANSFER_PATTERN = re.compile(r"\+(\d+)(\*+)")
_PATTERN_EXAMPLE = "+1415555****"


def _transfer_number(value: str) -> str:
    try:
        return e164(value)
    except InvalidPhoneNumber as exc:
        raise ValueError(f"not a valid phone number ({exc.reason})") from None


def _transfer_pattern(value: str) -> str:
    # One `*` per digit keeps a pattern to one length: a prefix alone would also match any number it starts.
    pattern = value.replace(" ", "")
    match = _TRANSFER_PATTERN.fullmatch(pattern)
    if match is None:
        raise ValueError(
            f"must be '+', the digits every number starts with, then one '*' per remaining digit, e.g. "
            f"'{_PATTERN_EXAMPLE}'"
        )
    prefix, wildcards = match.groups()
    try:
        example = e164(f"+{prefix}{'0' * len(wildcards)}")
    except InvalidPhoneNumber as exc:
        raise ValueError(f"matches no number Dialtone can dial ({exc.reason})") from None
    if len(str(phonenumbers.parse(example).country_code)) > len(prefix):
        raise ValueError("must spell out the whole country code before the first '*'")
    return pattern


class TransferDestination(_CallBehaviour):
    """A destination the agent may transfer calls to: one exact `number`, or a `pattern`, with a label."""

    model_config = ConfigDict(extra="forbid")

    label: Annotated[str, Field(min_length=1, max_length=80)]
    """What the model is told the destination is (e.g. "Billing desk")."""
    number: Annotated[str, AfterValidator(_transfer_number)] | None = None
    """An exact number (stored in E.164); allowed whatever its type, toll-free included, though a transfer is made
    only to a number the organization's dial policy dials (premium-rate only with its opt-in, storage.dial_policies).
    """
    pattern: Annotated[str, AfterValidator(_transfer_pattern)] | None = None
    """`+` and the digits every number starts with, then one `*` per remaining digit (`+1415555****`); only plain
    fixed-line and mobile numbers it matches are allowed."""

    @model_validator(mode="after")
    def _number_or_pattern(self) -> TransferDestination:
        if (self.number is None) == (self.pattern is None):
            raise ValueError("give either a number or a pattern")
        return self


DEFAULT_TRANSFER_MINUTES = 60
"""A transferred call's longest talk to its destination unless the agent's `transfer.maxMinutes` says otherwise."""
MAX_TRANSFER_MINUTES = 240
"""The most `transfer.maxMinutes` may be: Twilio's own limit on a dialed leg (4 hours)."""


class TransferConfig(_CallBehaviour):
    """Where the agent's model may transfer calls; without this section the agent cannot transfer."""

    model_config = ConfigDict(extra="forbid")

    destinations: Annotated[tuple[TransferDestination, ...], Field(strict=False)]
    """The allowed destinations; leave `transfer` out altogether to turn transfers off."""
    max_minutes: Annotated[int, Field(ge=1, le=MAX_TRANSFER_MINUTES)] = DEFAULT_TRANSFER_MINUTES
    """The longest a transferred call may talk to its destination: Twilio ends the dialed leg then, or sooner when
    the organization's credits pay for fewer minutes (they are reserved when the transfer starts)."""

    @field_validator("destinations")
    @classmethod
    def _some(cls, value: tuple[TransferDestination, ...]) -> tuple[TransferDestination, ...]:
        if not value:
            raise ValueError("must list at least one destination (leave transfer out to turn transfers off)")
        return value


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = get_args(Weekday)
"""Day names of `inboundHours`, Monday first (ISO weekday = index + 1)."""

_HH_MM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")


def _hh_mm(value: str) -> str:
    if not _HH_MM.fullmatch(value):
        raise ValueError("must be a time of day as HH:MM (00:00 to 23:59)")
    return value


def _one_or_more_windows(value: Any) -> Any:
    if isinstance(value, dict):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(value)
    raise ValueError('must be an hours object such as {"days": ["mon"], "start": "09:00", "end": "17:00"} or a list')


class InboundHours(_CallBehaviour):
    """Hours an agent answers its number: local times on some days. `end` before `start` runs past midnight
    (and belongs to the day it opens on); `start` equal to `end` is the whole day."""

    model_config = ConfigDict(extra="forbid")

    days: Annotated[tuple[Weekday, ...], Field(strict=False)] = WEEKDAYS
    """The days it opens on ("mon" ... "sun"); default: every day."""
    start: Annotated[str, AfterValidator(_hh_mm)] = "00:00"
    end: Annotated[str, AfterValidator(_hh_mm)] = "00:00"
    timezone: Annotated[str, AfterValidator(_time_zone)] | None = None
    """The IANA time zone the hours are read in; default: the agent's `timezone`."""

    @field_validator("days")
    @classmethod
    def _some_days(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must list at least one day (leave inboundHours out to answer at any time)")
        return value


class AgentConfiguration(_CallBehaviour):
    """An agent's complete configuration: providers per stage (primary first, then fallbacks) and call behaviour."""

    # Unknown top-level keys are the dashboard's own (UI state and the like): kept and stored back.
    model_config = ConfigDict(extra="allow")

    # Declared first: the stage validators below read it.
    realtime: Annotated[tuple[RealtimeConfig, ...], _ONE_OR_MORE] | None = None
    """Speech-to-speech providers in place of stt, llm and tts; null for the stt → llm → tts pipeline. With
    realtime, stt, llm and tts may all be given too: the pipeline that takes the call over if the model is lost."""
    stt: Annotated[tuple[STTConfig, ...], _ONE_OR_MORE] = ()
    """Speech-to-text providers, primary first; empty only with `realtime`. Default: sphinx."""
    llm: Annotated[tuple[LLMConfig, ...], _ONE_OR_MORE] = ()
    """Language-model providers, primary first; empty only with `realtime`. Default: conversation_path."""
    tts: Annotated[tuple[TTSConfig, ...], _ONE_OR_MORE] = ()
    """Text-to-speech providers, primary first; empty only with `realtime`. Default: espeak."""

    first_sentence: SpokenText | None = None
    """What the agent says first, word for word; null lets the caller speak first (see `modelGreets`)."""
    model_greets: bool = False
    """With no `firstSentence`, the language model opens the call with words of its own instead of waiting for the
    caller (a conversation path's opening node speaks either way)."""
    apology_sentence: SpokenText | None = None
    """What the caller hears when a provider fails mid-reply and the next one takes over (default: a short apology)."""
    prompt: str | None = None
    """The system prompt; `{{name}}` placeholders are filled from `variables` and the call (`{{customer.name}}`,
    `{{now}}`...)."""
    language: Annotated[str, AfterValidator(_language_tag)] = "en-US"
    """The language the agent speaks (BCP 47: "en-US", "es", "fr-FR"): each provider gets it in its own form
    (a provider's own `language`/`voice` wins); models are told to speak it."""
    timezone: Annotated[str, AfterValidator(_time_zone)] = "UTC"
    """The IANA time zone `{{now}}` and `{{today}}` are told in (e.g. `America/New_York`)."""
    inbound_hours: Annotated[tuple[InboundHours, ...], BeforeValidator(_one_or_more_windows)] = ()
    """When the agent answers its number (one hours object or a list; any one open is enough); empty: at any
    time. Several agents may share a number: the one whose hours are open answers (see the README's
    "Time-based routing")."""
    max_duration_seconds: Annotated[int, _between(10, 14400)] = 1800
    ring_timeout_seconds: Annotated[int, _between(5, 600)] = 30
    """How long an outbound call rings before it counts as not answered (Twilio's `Timeout`)."""
    silence_timeout_seconds: Annotated[int, _between(5, 600)] = 30
    """The agent hangs up after this long with nobody speaking."""
    goodbye_sentence: SpokenText | None = None
    interruption: InterruptionConfig = InterruptionConfig()
    endpointing: EndpointingConfig = EndpointingConfig()
    first_clause: FirstClauseConfig = FirstClauseConfig()
    """When a reply's first audio starts (see FirstClauseConfig)."""
    voicemail: VoicemailConfig = VoicemailConfig()
    transfer: TransferConfig | None = None
    """Where the model may transfer calls (`transfer_call`); null: nowhere, and the function is not offered."""
    recording: bool = True
    variables: dict[str, str] = Field(default_factory=dict)
    post_call_summary: str | None = None
    """After each call, the language model fills this template from the transcript into metadata.summary (a
    campaign's own postCallSummary takes precedence); needs an OpenAI language model."""
    success_criteria: str | None = None
    """What makes a call a success, judged after the call (default: the campaign's task, else the agent's prompt)."""

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data: Any) -> Any:
        # Without `realtime`, a stage left out (or null) gets its offline provider; with it, it stays empty.
        if not isinstance(data, dict):
            return data
        given = {key: value for key, value in data.items() if key not in _OFFLINE_DEFAULTS or value is not None}
        if data.get("realtime") is not None:
            return given
        return {**_OFFLINE_DEFAULTS, **given}

    @model_validator(mode="after")
    def _whole_fallback_pipeline(self) -> AgentConfiguration:
        # With `realtime`, the three stages are the pipeline that takes over if the model is lost: all or none.
        listed = [stage for stage in ("stt", "llm", "tts") if getattr(self, stage)]
        if self.realtime and listed and len(listed) != 3:
            missing = ", ".join(stage for stage in ("stt", "llm", "tts") if stage not in listed)
            raise ValueError(
                f"with realtime, stt, llm and tts are the fallback pipeline and must all be given (missing: {missing})"
            )
        return self

    @property
    def realtime_fallback(self) -> bool:
        """Whether a speech-to-speech agent lists the pipeline that takes over when its model is lost."""
        return bool(self.realtime and self.stt and self.llm and self.tts)

    def to_json(self) -> dict[str, Any]:
        """The normalised configuration as a JSON object (camelCase keys, stages as lists) to store back."""
        unused = ({"stt", "llm", "tts"} if not self.realtime_fallback else set()) if self.realtime else {"realtime"}
        return self.model_dump(mode="json", by_alias=True, exclude=unused)


class AgentConfigurationError(ValueError):
    """An agent configuration that cannot be used; `problems` lists (JSON path, message) for each bad field."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        super().__init__("; ".join(f"{path}: {message}" for path, message in self.problems))


def parse_agent_configuration(data: Any) -> AgentConfiguration:
    """Validate an agent's configuration JSON (object, JSON text, or null for all defaults), filling defaults."""
    if isinstance(data, str | bytes | bytearray):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise AgentConfigurationError([("configuration", f"not valid JSON ({exc})")]) from None
    if data is None:
        data = {}
    try:
        return AgentConfiguration.model_validate(data)
    except ValidationError as exc:
        raise AgentConfigurationError([_describe(error, data) for error in exc.errors()]) from None


def required_keys(config: AgentConfiguration) -> list[str]:
    """The keys the primary providers need: a setting name (`DEEPGRAM_API_KEY`) or `tool:<toolId>`, in stage order."""
    primaries = [config.realtime[0]] if config.realtime else [config.stt[0], config.llm[0], config.tts[0]]
    keys: list[str] = []
    for provider in primaries:
        if isinstance(provider, CloudProviderConfig):
            key = (provider.api_key_ref or provider.key_name).removeprefix("env:")
            if key not in keys:
                keys.append(key)
    return keys


# Error messages


_SECTIONS: dict[str, type[BaseModel]] = {
    "interruption": InterruptionConfig,
    "endpointing": EndpointingConfig,
    "voicemail": VoicemailConfig,
    "transfer": TransferConfig,
    "transfer.destinations": TransferDestination,
    "inboundHours": InboundHours,
}

_PLAIN_MESSAGES = {
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
}


def _describe(error: ErrorDetails, data: Any) -> tuple[str, str]:
    loc = error["loc"]
    path = _json_path(loc, data)
    stage = str(loc[0]) if loc else ""
    match error["type"]:
        case "union_tag_invalid":
            tag = error.get("ctx", {}).get("tag")
            return f"{path}.provider", f"unknown provider {tag!r} (expected one of: {_providers(stage)})"
        case "union_tag_not_found":
            return f"{path}.provider", f"missing: name the provider (one of: {_providers(stage)})"
        case "model_attributes_type":
            example = PROVIDERS.get(stage, ("...",))[0]
            return path, f'must be a provider object such as {{"provider": "{example}"}}'
        case "extra_forbidden":
            return path, _unknown_option(loc)
        case "literal_error":
            return path, f"must be {error.get('ctx', {}).get('expected')}" + _shown(error, path)
        case "value_error":
            return path, str(error["msg"]).removeprefix("Value error, ") + _shown(error, path)
        case "string_too_long":
            return path, f"must be at most {error.get('ctx', {}).get('max_length')} characters"
        case "too_long":
            return path, f"must list at most {error.get('ctx', {}).get('max_length')} items"
        case kind:
            return path, _PLAIN_MESSAGES.get(kind, str(error["msg"])) + _shown(error, path)


def _json_path(loc: tuple[int | str, ...], data: Any) -> str:
    # pydantic's location has extra steps the JSON lacks (the discriminator's tag, index 0 of a stage given as one
    # object) and spells keys by alias; walk the caller's data to name each step the way they wrote it.
    path, node = "", data
    for part in loc:
        if isinstance(part, int):
            if isinstance(node, list):
                path += f"[{part}]"
                node = node[part] if 0 <= part < len(node) else None
            continue
        if isinstance(node, dict) and node.get("provider") == part and _is_tag(part):
            continue
        key = part
        if isinstance(node, dict) and part not in node and to_snake(part) in node:
            key = to_snake(part)
        path = f"{path}.{key}" if path else key
        node = node.get(key) if isinstance(node, dict) else None
    return path or "configuration"


def _is_tag(part: str) -> bool:
    return any(part in names for names in PROVIDERS.values())


def _providers(stage: str) -> str:
    return ", ".join(PROVIDERS.get(stage, ()))


def _owner(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    stage = str(loc[0]) if loc else ""
    if stage in _STAGE_MODELS:
        return next((_STAGE_MODELS[stage][part] for part in loc[1:] if part in _STAGE_MODELS[stage]), None)
    return _SECTIONS.get(".".join(str(part) for part in loc[:-1] if isinstance(part, str)))


def _unknown_option(loc: tuple[int | str, ...]) -> str:
    owner = _owner(loc)
    if owner is None:
        return "unknown option"
    allowed = [field.alias or name for name, field in owner.model_fields.items()]
    given = str(loc[-1])
    spellings: list[Callable[[str], str]] = [to_snake, to_camel]
    close = [spell(given) for spell in spellings if spell(given) in allowed] or difflib.get_close_matches(
        given, allowed, n=1
    )
    if close:
        return f"unknown option; did you mean {close[0]!r}?"
    return f"unknown option (expected one of: {', '.join(allowed)})"


_SECRET_LOOKING = re.compile(r"api_?key|secret|token|password", re.IGNORECASE)


def _shown(error: ErrorDetails, path: str) -> str:
    # Echo short scalar inputs so the user sees what was read; never what may be a key pasted in the wrong place.
    given = error.get("input")
    if _SECRET_LOOKING.search(path) or isinstance(given, dict | list | tuple) or given is None:
        return ""
    text = repr(given) if not isinstance(given, bool) else str(given).lower()
    return f" (got {text})" if len(text) <= 40 else ""
