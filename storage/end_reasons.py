"""Why a call ended: the values of `CallLog.metadata.endReason`, a contract read by retry policies and webhooks.

The free text that used to ride after a colon (`"protocol_error: MalformedMessage: …"`) is kept apart, in
`metadata.endDetail`, so a reader matches the reason exactly and never parses a prefix.
"""

from __future__ import annotations

from enum import StrEnum


class EndReason(StrEnum):
    """Why a call ended, as stored in `CallLog.metadata.endReason`."""

    # The conversation ended normally.
    CALLER_HANGUP = "caller_hangup"
    AGENT_HANGUP = "agent_hangup"
    PATH_END = "path_end"
    TRANSFERRED = "transferred"
    SILENCE_TIMEOUT = "silence_timeout"
    MAX_DURATION = "max_duration"
    API_HANGUP = "api_hangup"
    VOICEMAIL_LEFT = "voicemail_left"
    VOICEMAIL_HANGUP = "voicemail_hangup"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    """The organization's balance could not pay the call's next minute (the agent said goodbye: COMPLETED) or, for
    an inbound call, its first (the call was refused: MISSED)."""
    CLOSED = "closed"
    """An inbound call outside every agent's hours on the number: the caller heard its closed message."""
    # Twilio's own final status for an outbound call nobody answered (the status callback writes it).
    BUSY = "busy"
    NO_ANSWER = "no-answer"
    CANCELED = "canceled"
    TWILIO_FAILED = "failed"
    # The call could not be placed or started.
    TWILIO_REFUSED = "twilio_refused"
    TWILIO_UNREACHABLE = "twilio_unreachable"
    PLACEMENT_INTERRUPTED = "placement_interrupted"  # older rows only: an interrupted placement now waits for Twilio
    NOT_PLACED = "not_placed"  # its request never reached Twilio (dialer died, or no answer): Twilio has no such call
    STREAM_NEVER_STARTED = "stream_never_started"
    AGENT_DELETED = "agent_deleted"
    PIPELINE_UNAVAILABLE = "pipeline_unavailable"
    CONCURRENT_CALL_LIMIT = "concurrent_call_limit"
    """An inbound call refused because its organization had as many calls in progress as its plan allows."""
    NUMBER_DISABLED = "number_disabled"
    """An inbound call refused because its organization has disabled the number for inbound calls."""
    NO_ACTIVE_AGENT = "no_active_agent"
    """An inbound call refused because the number has no ACTIVE INBOUND agent."""
    # Something failed while the call ran.
    STREAM_LOST = "stream_lost"
    PROTOCOL_ERROR = "protocol_error"
    STT_UNAVAILABLE = "stt_unavailable"
    STT_FAILED = "stt_failed"
    LLM_FAILED = "llm_failed"
    TTS_FAILED = "tts_failed"
    REALTIME_UNAVAILABLE = "realtime_unavailable"
    REALTIME_FAILED = "realtime_failed"
    INTERNAL_ERROR = "internal_error"
    ENGINE_SHUTDOWN = "engine_shutdown"
    ENGINE_LOST = "engine_lost"
    CALL_DELETED = "call_deleted"
    """The call's CallLog was deleted while it ran (the dashboard deletes rows in SQL): the engine hung it up. Never
    stored, having nowhere to be: the engine's log says it."""

    @classmethod
    def read(cls, stored: object) -> EndReason | None:
        """The reason a stored `endReason` names, including the older `"reason: detail"` form; None if unknown."""
        return cls.parse(stored)[0]

    @classmethod
    def parse(cls, stored: object) -> tuple[EndReason | None, str | None]:
        """The reason and the detail of a stored or spoken `"reason: detail"` text; (None, None) if unknown."""
        if not isinstance(stored, str) or not stored:
            return None, None
        head, _, tail = stored.partition(":")
        reason = cls._value2member_map_.get(head.strip()) or _OLDER_SPELLINGS.get(head.strip())
        if reason is None:
            return None, None
        return reason, tail.strip() or None  # type: ignore[return-value]


# Inbound calls Twilio gave up on were stored under their own names before the reasons became one enum.
_OLDER_SPELLINGS = {"no_answer": EndReason.NO_ANSWER, "twilio_failed": EndReason.TWILIO_FAILED}

MAX_DETAIL_CHARS = 500
"""The longest `metadata.endDetail` kept: enough for an exception's message, never a whole traceback."""


def ending(reason: EndReason, detail: str | None = None) -> dict[str, str]:
    """The CallLog metadata items that say why a call ended: `endReason`, and `endDetail` when there is one."""
    items = {"endReason": reason.value}
    if detail:
        items["endDetail"] = detail[:MAX_DETAIL_CHARS]
    return items


NEVER_CONNECTED = frozenset({EndReason.BUSY, EndReason.NO_ANSWER, EndReason.CANCELED, EndReason.TWILIO_FAILED})
"""Reasons for an outbound call that never reached a person or a machine."""

VOICEMAIL = frozenset({EndReason.VOICEMAIL_LEFT, EndReason.VOICEMAIL_HANGUP})
"""Reasons for a call an answering machine took."""
