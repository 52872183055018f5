"""The one rule for digits an agent may press, and the same rule as the send_dtmf function's JSON schema."""

from __future__ import annotations

import re

import pytest

from media.dtmf import DIGITS_PATTERN, MAX_DIGITS, InvalidDigits, check_digits, dtmf_audio
from pipelines.tools import BUILTIN_FUNCTIONS, SEND_DTMF

DIGIT_STRINGS = [
    ("1", True),
    ("0123456789*#", True),
    ("ABCD", True),
    ("1w2W3", True),
    ("9" * MAX_DIGITS, True),
    ("9" * (MAX_DIGITS + 1), False),
    ("", False),
    ("12e", False),
    ("1 2", False),
    ("callsales", False),
    ("abcd", False),
]


@pytest.mark.parametrize(("digits", "valid"), DIGIT_STRINGS)
def test_digits_are_valid_when_every_character_is_a_key_or_a_pause_and_there_are_at_most_32(
    digits: str, valid: bool
) -> None:
    if valid:
        assert check_digits(digits) == digits
    else:
        with pytest.raises(InvalidDigits, match="cannot dial"):
            check_digits(digits)


@pytest.mark.parametrize(("digits", "valid"), DIGIT_STRINGS)
def test_the_send_dtmf_schema_accepts_exactly_the_digits_the_rule_accepts(digits: str, valid: bool) -> None:
    [spec] = [spec for spec in BUILTIN_FUNCTIONS if spec.name == SEND_DTMF]
    pattern = spec.parameters["properties"]["digits"]["pattern"]
    assert pattern == DIGITS_PATTERN
    assert (re.fullmatch(pattern, digits) is not None) == valid


def test_tones_are_refused_for_digits_the_rule_refuses() -> None:
    with pytest.raises(InvalidDigits, match=f"more than {MAX_DIGITS}"):
        dtmf_audio("1" * (MAX_DIGITS + 1))
