"""Phone numbers to E.164: the one rule for what number Dialtone accepts, wherever it comes from.

The API's `/v1/calls` and `/v1/phone-numbers`, campaign recipient files and the agent's transfer tool all go
through `e164`, so a number one of them accepts is never refused by another.
"""

from __future__ import annotations

from typing import Final

import phonenumbers
from phonenumbers import NumberParseException, ValidationResult

__all__ = ["InvalidPhoneNumber", "e164"]

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


def _parse_error(exc: NumberParseException, text: str, region: str | None) -> str:
    if exc.error_type != NumberParseException.INVALID_COUNTRY_CODE:
        return _PARSE_ERRORS.get(exc.error_type, "not a phone number")
    if text.startswith("+"):
        return f"unknown country code; write it in international form, e.g. {_EXAMPLE}"
    if region is None:
        return f"no country code; write it in international form, e.g. {_EXAMPLE}"
    return f"no country code, and {region!r} is not a region to read it in; write it as e.g. {_EXAMPLE}"
