"""Twilio's webhook parameters read by their documented shapes; anything else is `InvalidTwilioField`, a 400.

A signed request can still carry what Twilio never sends (a NUL, kilobytes of CallSid, a duration of 5,000
digits): the signature proves who sent it, not that it fits the database. Every field a webhook uses is read
here, once, into a typed value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["CallStatusCallback", "DialEnded", "IncomingCall", "InvalidTwilioField", "MachineVerdict"]

_CALL_SID: Final = re.compile(r"CA[0-9a-f]{32}")
_ACCOUNT_SID: Final = re.compile(r"AC[0-9a-f]{32}")
_E164: Final = re.compile(r"\+[1-9][0-9]{1,14}")
_ADDRESS: Final = re.compile(r"(?:client|sip):[\x21-\x7e]{1,250}")
"""A Twilio Client identity or a SIP URI, which Twilio also sends as From/To: printable ASCII, no spaces."""
_ANONYMOUS: Final = frozenset({"anonymous", "restricted", "unknown", "blocked", "private", "unavailable"})
"""Twilio's words for a withheld caller ID, in any case (its numeric forms, like +266696687, are E.164)."""
_TOKEN: Final = re.compile(r"[a-z][a-z_-]{0,31}")
"""A CallStatus or AnsweredBy value: Twilio's are lowercase words joined by - or _."""
_SIP_CODE: Final = re.compile(r"[1-6][0-9]{2}")
_DIGITS: Final = re.compile(r"[0-9]{1,9}")
"""A duration in seconds or ms: ASCII digits only, at most 9 (a call lasts at most a day)."""
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_MAX_CHARS: Final = 128
"""Longest free-text field kept (caller name, city, country); Twilio's CNAM names are at most 15 characters."""


class InvalidTwilioField(ValueError):
    """A webhook parameter is missing or does not have the shape Twilio documents for it."""

    def __init__(self, name: str, problem: str) -> None:
        """Name the parameter and what is wrong with it."""
        super().__init__(f"{name}: {problem}")
        self.name = name


Form = Mapping[str, object]
"""A webhook's parsed form (aiohttp's `request.post()`); a value that is not a string is refused."""


@dataclass(frozen=True, slots=True)
class IncomingCall:
    """The voice webhook of an inbound call: who calls which number, and what Twilio knows of the caller."""

    call_sid: str
    account_sid: str | None
    caller: str | None
    called: str
    caller_name: str | None
    from_city: str | None
    from_country: str | None

    @classmethod
    def read(cls, form: Form) -> IncomingCall:
        """Read the fields of `/twilio/voice`; InvalidTwilioField for any that does not fit."""
        called = _address(form, "To")
        if called is None:
            raise InvalidTwilioField("To", "missing")
        return cls(
            call_sid=_call_sid(form),
            account_sid=_account_sid(form),
            caller=_address(form, "From"),
            called=called,
            caller_name=_text(form, "CallerName"),
            from_city=_text(form, "FromCity"),
            from_country=_text(form, "FromCountry"),
        )


@dataclass(frozen=True, slots=True)
class CallStatusCallback:
    """A call status callback: the call, its account, Twilio's CallStatus, and (when it ended) its length and SIP
    code."""

    call_sid: str
    account_sid: str | None
    status: str
    duration_s: int | None
    sip_response_code: str | None

    @classmethod
    def read(cls, form: Form) -> CallStatusCallback:
        """Read the fields of `/twilio/status`; InvalidTwilioField for any that does not fit."""
        status = _optional(form, "CallStatus", _TOKEN, "a lowercase word")
        if status is None:
            raise InvalidTwilioField("CallStatus", "missing")
        return cls(
            call_sid=_call_sid(form),
            account_sid=_account_sid(form),
            status=status,
            duration_s=_number(form, "CallDuration"),
            sip_response_code=_optional(form, "SipResponseCode", _SIP_CODE, "a three-digit SIP status"),
        )


@dataclass(frozen=True, slots=True)
class DialEnded:
    """A `<Dial>`'s action request: the call that dialed, how the dialed call ended, and how long it talked (0 when
    it was never answered)."""

    call_sid: str
    dial_status: str
    duration_s: int

    @classmethod
    def read(cls, form: Form) -> DialEnded:
        """Read the fields of `/twilio/dial`; InvalidTwilioField for any that does not fit."""
        status = _optional(form, "DialCallStatus", _TOKEN, "a lowercase word")
        if status is None:
            raise InvalidTwilioField("DialCallStatus", "missing")
        return cls(call_sid=_call_sid(form), dial_status=status, duration_s=_number(form, "DialCallDuration") or 0)


@dataclass(frozen=True, slots=True)
class MachineVerdict:
    """An asynchronous answering-machine verdict: the call, who answered (empty if Twilio did not say), how long
    detection took."""

    call_sid: str
    answered_by: str
    detection_ms: int | None

    @classmethod
    def read(cls, form: Form) -> MachineVerdict:
        """Read the fields of `/twilio/amd`; InvalidTwilioField for any that does not fit."""
        return cls(
            call_sid=_call_sid(form),
            answered_by=_optional(form, "AnsweredBy", _TOKEN, "a lowercase word") or "",
            detection_ms=_number(form, "MachineDetectionDuration"),
        )


def _call_sid(form: Form) -> str:
    call_sid = _optional(form, "CallSid", _CALL_SID, "CA followed by 32 hex digits")
    if call_sid is None:
        raise InvalidTwilioField("CallSid", "missing")
    return call_sid


def _string(form: Form, name: str) -> str | None:
    """The field's text, None when absent or empty."""
    value = form.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidTwilioField(name, f"expected text, got {type(value).__name__}")
    return value


def _account_sid(form: Form) -> str | None:
    return _optional(form, "AccountSid", _ACCOUNT_SID, "AC followed by 32 hex digits")


def _optional(form: Form, name: str, shape: re.Pattern[str], described: str) -> str | None:
    value = _string(form, name)
    if value is not None and not shape.fullmatch(value):
        raise InvalidTwilioField(name, f"expected {described}, got {_shown(value)}")
    return value


def _address(form: Form, name: str) -> str | None:
    """A phone number (E.164), a client or SIP address, or one of Twilio's words for a withheld number."""
    value = _string(form, name)
    if value is None or _E164.fullmatch(value) or _ADDRESS.fullmatch(value) or value.lower() in _ANONYMOUS:
        return value
    raise InvalidTwilioField(
        name, f"expected an E.164 number, a client: or sip: address or 'anonymous', got {_shown(value)}"
    )


def _number(form: Form, name: str) -> int | None:
    value = _optional(form, name, _DIGITS, "up to 9 ASCII digits")
    return int(value) if value is not None else None


def _text(form: Form, name: str) -> str | None:
    value = _string(form, name)
    if value is not None and (len(value) > _TEXT_MAX_CHARS or _CONTROL.search(value)):
        raise InvalidTwilioField(name, f"expected up to {_TEXT_MAX_CHARS} characters of text, got {_shown(value)}")
    return value


def _shown(value: str) -> str:
    """The value for an error message: repr, cut short."""
    return repr(value) if len(value) <= 40 else f"{value[:20]!r}... ({len(value)} characters)"
