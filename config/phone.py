"""Phone numbers to E.164, and what kind of number one is: the one rule for each, wherever a number comes from.

The API's `/v1/calls` and `/v1/phone-numbers`, campaign recipient files and the agent's transfer tool all go
through `e164`, so a number one of them accepts is never refused by another. `number_kind` is the one reading of
a number's type (premium-rate, mobile, ...) that the transfer rules and the outbound dial policy both judge by.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumber, PhoneNumberType, ValidationResult

__all__ = ["InvalidPhoneNumber", "NumberKind", "e164", "number_kind", "region_code"]

_EXAMPLE: Final = "+14155550100"

_PARSE_ERRORS: Final = {
    NumberParseException.NOT_A_NUMBER: "not a phone number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too short after the international prefix",
    NumberParseException.TOO_SHORT_NSN: "too short",
    NumberParseException.TOO_LONG: "too long",
}
_LENGTH_VERDICTS: Final = {
    ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
    ValidationResult.TOO_SHORT: "too short for its country",
    ValidationResult.TOO_LONG: "too long for its country",
    ValidationResult.INVALID_LENGTH: "wrong number of digits for its country",
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "a local number; give it with its area code",
}


class InvalidPhoneNumber(ValueError):
    """Text that is not a number Dialtone can dial; `reason` says why in words a person can act on."""

    def __init__(self, number: str, reason: str) -> None:
        super().__init__(f"{number!r} is not a valid phone number ({reason})")
        self.number = number
        self.reason = reason


def e164(raw: str, *, region: str | None = None) -> str:
    """The E.164 form of `raw` (e.g. "+1 (415) 555-0100" → "+14155550100"), or InvalidPhoneNumber.

    The policy is "a number Twilio can dial": a country code (from the text, or `region`, an ISO 3166 code
    such as "US", for a number written without one), no extension, and a possible length for that country.
    It deliberately does not ask whether the number is in a range the numbering plan has assigned
    (phonenumbers' `is_valid_number`): that metadata lags new ranges behind the carriers, and it refuses the
    fictional +1 555 01xx numbers that demos and tests use; whether a number rings is the carrier's answer.
    """
    text = raw.strip()
    try:
        parsed = phonenumbers.parse(text, None if text.startswith("+") else region)
    except NumberParseException as exc:
        raise InvalidPhoneNumber(raw, _parse_error(exc, text, region)) from None
    if parsed.extension:
        raise InvalidPhoneNumber(raw, "extensions cannot be dialed directly")
    verdict = phonenumbers.is_possible_number_with_reason(parsed)
    if verdict != ValidationResult.IS_POSSIBLE:
        raise InvalidPhoneNumber(raw, _LENGTH_VERDICTS.get(verdict, "not a possible number"))
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def region_code(text: str) -> str:
    """`text` as the ISO 3166 code of a region `e164` reads numbers in ("us" → "US"), or a ValueError naming it.

    Checked where it is given: a region no number is read in would turn every national number of an import into an
    error row, and "UK" (the United Kingdom is GB) reads like one.
    """
    code = text.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(
            f"{text!r} is not a region numbers are read in: give its ISO 3166 code, e.g. US, GB (the United Kingdom) "
            "or DE"
        )
    return code


def _parse_error(exc: NumberParseException, text: str, region: str | None) -> str:
    if exc.error_type != NumberParseException.INVALID_COUNTRY_CODE:
        return _PARSE_ERRORS.get(exc.error_type, "not a phone number")
    if text.startswith("+"):
        return f"unknown country code; write it in international form, e.g. {_EXAMPLE}"
    if region is None:
        return f"no country code; write it in international form, e.g. {_EXAMPLE}"
    return f"no country code, and {region!r} is not a region to read it in; write it as e.g. {_EXAMPLE}"


class NumberKind(StrEnum):
    """What a number is in its country's numbering plan (phonenumbers' number types), under the names the API and
    the database use."""

    FIXED_LINE = "fixed_line"
    MOBILE = "mobile"
    FIXED_LINE_OR_MOBILE = "fixed_line_or_mobile"
    """A plan (the +1 of North America, among others) whose numbers do not tell a fixed line from a mobile."""
    TOLL_FREE = "toll_free"
    PREMIUM_RATE = "premium_rate"
    SHARED_COST = "shared_cost"
    VOIP = "voip"
    PERSONAL = "personal"
    PAGER = "pager"
    UAN = "uan"
    VOICEMAIL = "voicemail"
    UNCLASSIFIED = "unclassified"
    """In no range the plan assigns (phonenumbers' UNKNOWN): unassigned, new, or fictional like +1 555 01xx."""

    @property
    def described(self) -> str:
        """The kind in words after "is": "a premium-rate number"."""
        return _KIND_WORDS[self][0]

    @property
    def plural(self) -> str:
        """The kind in words for many: "premium-rate numbers"."""
        return _KIND_WORDS[self][1]


_KIND_WORDS: Final = {
    NumberKind.FIXED_LINE: ("a fixed-line number", "fixed-line numbers"),
    NumberKind.MOBILE: ("a mobile number", "mobile numbers"),
    NumberKind.FIXED_LINE_OR_MOBILE: ("a fixed-line or mobile number", "fixed-line or mobile numbers"),
    NumberKind.TOLL_FREE: ("a toll-free number", "toll-free numbers"),
    NumberKind.PREMIUM_RATE: ("a premium-rate number", "premium-rate numbers"),
    NumberKind.SHARED_COST: ("a shared-cost number", "shared-cost numbers"),
    NumberKind.VOIP: ("an internet telephony number", "internet telephony numbers"),
    NumberKind.PERSONAL: ("a personal (forwarding) number", "personal (forwarding) numbers"),
    NumberKind.PAGER: ("a pager number", "pager numbers"),
    NumberKind.UAN: ("a universal access number", "universal access numbers"),
    NumberKind.VOICEMAIL: ("a voicemail access number", "voicemail access numbers"),
    NumberKind.UNCLASSIFIED: ("a number of no known type", "numbers of no known type"),
}
_KINDS: Final = {
    PhoneNumberType.FIXED_LINE: NumberKind.FIXED_LINE,
    PhoneNumberType.MOBILE: NumberKind.MOBILE,
    PhoneNumberType.FIXED_LINE_OR_MOBILE: NumberKind.FIXED_LINE_OR_MOBILE,
    PhoneNumberType.TOLL_FREE: NumberKind.TOLL_FREE,
    PhoneNumberType.PREMIUM_RATE: NumberKind.PREMIUM_RATE,
    PhoneNumberType.SHARED_COST: NumberKind.SHARED_COST,
    PhoneNumberType.VOIP: NumberKind.VOIP,
    PhoneNumberType.PERSONAL_NUMBER: NumberKind.PERSONAL,
    PhoneNumberType.PAGER: NumberKind.PAGER,
    PhoneNumberType.UAN: NumberKind.UAN,
    PhoneNumberType.VOICEMAIL: NumberKind.VOICEMAIL,
}


def number_kind(number: str | PhoneNumber) -> NumberKind:
    """The kind of an E.164 number (as `e164` returns it) or of a parsed one; UNCLASSIFIED outside every range its
    country's plan assigns."""
    parsed = phonenumbers.parse(number) if isinstance(number, str) else number
    return _KINDS.get(phonenumbers.number_type(parsed), NumberKind.UNCLASSIFIED)
