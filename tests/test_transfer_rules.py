"""Where an agent may transfer a call: its `transfer` configuration, validated when saved, and the rule every
transfer goes through (exact numbers, patterns, and only plain fixed-line and mobile numbers through a pattern)."""

from __future__ import annotations

from typing import Any

import pytest

from config.agent import AgentConfigurationError, parse_agent_configuration
from pipelines.conversation.transfer_rules import AllowedTransfer, Refusal, TransferRules, builtin_functions

BILLING = {"number": "+1 415 555 0199", "label": "Billing"}
SUPPORT = {"pattern": "+1415555****", "label": "Support team"}
UK_PREMIUM = "+449098790000"  # 0909 879 0000: a UK premium-rate number


def rules(*destinations: dict[str, str]) -> TransferRules:
    config = parse_agent_configuration({"transfer": {"destinations": list(destinations)}})
    return TransferRules.from_config(config.transfer)


def problems(transfer: Any) -> list[tuple[str, str]]:
    with pytest.raises(AgentConfigurationError) as caught:
        parse_agent_configuration({"transfer": transfer})
    return caught.value.problems


# ---------------------------------------------------------------------------------------------- the rule


def test_an_exact_number_is_allowed_in_any_spelling() -> None:
    assert rules(BILLING).check("+1 (415) 555-0199") == AllowedTransfer("+14155550199", "Billing")


def test_an_exact_destination_may_be_named_by_its_label() -> None:
    assert rules(BILLING).check("billing") == AllowedTransfer("+14155550199", "Billing")


def test_a_pattern_allows_the_numbers_of_its_length_that_start_with_it() -> None:
    support = rules(SUPPORT)
    assert support.check("+14155552671") == AllowedTransfer("+14155552671", "Support team")
    assert isinstance(support.check("+14155562671"), Refusal)


def test_an_unlisted_number_is_refused_naming_what_the_agent_may_use() -> None:
    verdict = rules(BILLING, SUPPORT).check("+12025550123")

    assert isinstance(verdict, Refusal)
    assert verdict.message.startswith("error: +12025550123 is not a number this agent may transfer to.")
    assert "Billing (+14155550199)" in verdict.message
    assert "Support team (+1415555 followed by 4 more digits" in verdict.message


def test_a_premium_rate_number_is_refused_even_when_a_pattern_matches_it() -> None:
    verdict = rules({"pattern": "+44909*******", "label": "UK lines"}).check(UK_PREMIUM)

    assert isinstance(verdict, Refusal)
    assert verdict.message.startswith(f"error: {UK_PREMIUM} is a premium-rate number, which this agent may not")


def test_a_toll_free_number_needs_listing_exactly() -> None:
    assert isinstance(rules({"pattern": "+1800*******", "label": "Vendors"}).check("+18002752273"), Refusal)
    listed = rules({"number": "+18002752273", "label": "Vendor desk"})
    assert listed.check("+18002752273") == AllowedTransfer("+18002752273", "Vendor desk")


def test_a_premium_rate_number_listed_exactly_is_allowed() -> None:
    assert rules({"number": UK_PREMIUM, "label": "Paid helpline"}).check(UK_PREMIUM) == AllowedTransfer(
        UK_PREMIUM, "Paid helpline"
    )


@pytest.mark.parametrize("given", ["112", "+4487", "999", "call me maybe"])
def test_short_codes_and_words_are_refused_as_invalid(given: str) -> None:
    verdict = rules(BILLING, SUPPORT).check(given)

    assert isinstance(verdict, Refusal)
    assert verdict.message.startswith(f"error: {given!r} is not a valid phone number")
    assert "Billing (+14155550199)" in verdict.message


def test_a_number_without_country_code_is_read_in_the_default_region() -> None:
    assert rules(SUPPORT).check("(415) 555-2671", region="US") == AllowedTransfer("+14155552671", "Support team")


def test_without_a_transfer_section_nothing_is_allowed_and_the_function_is_not_offered() -> None:
    none = TransferRules.from_config(parse_agent_configuration({}).transfer)

    assert isinstance(none.check("+14155550199"), Refusal)
    assert [spec.name for spec in builtin_functions(none)] == ["end_call", "send_dtmf", "opt_out"]


def test_the_offered_function_lists_the_destinations() -> None:
    [transfer] = [spec for spec in builtin_functions(rules(BILLING, SUPPORT)) if spec.name == "transfer_call"]

    assert "Billing (+14155550199)" in transfer.description
    assert "Support team (+1415555 followed by 4 more digits" in transfer.description


# ---------------------------------------------------------------------------------------------- the configuration


def test_the_configuration_keeps_numbers_in_e164() -> None:
    config = parse_agent_configuration({"transfer": {"destinations": [BILLING, SUPPORT]}})

    assert config.to_json()["transfer"] == {
        "destinations": [
            {"label": "Billing", "number": "+14155550199", "pattern": None},
            {"label": "Support team", "number": None, "pattern": "+1415555****"},
        ]
    }


@pytest.mark.parametrize(
    ("destination", "path", "message"),
    [
        ({"number": "+1555", "label": "x"}, "number", "not a valid phone number (too short for its country)"),
        ({"pattern": "+1415555", "label": "x"}, "pattern", "must be '+', the digits every number starts with"),
        ({"pattern": "+1415*", "label": "x"}, "pattern", "matches no number Dialtone can dial"),
        ({"pattern": "+4**********", "label": "x"}, "pattern", "must spell out the whole country code"),
        ({"label": "x"}, "", "give either a number or a pattern"),
        ({"number": "+14155550199", "pattern": "+1415555****", "label": "x"}, "", "give either a number or a pattern"),
        ({"number": "+14155550199", "lable": "x"}, "lable", "unknown option; did you mean 'label'?"),
    ],
)
def test_a_bad_destination_is_refused_naming_its_field(destination: dict[str, str], path: str, message: str) -> None:
    field = "transfer.destinations[0]" + (f".{path}" if path else "")

    assert any(where == field and what.startswith(message) for where, what in problems({"destinations": [destination]}))


def test_an_empty_destination_list_is_refused() -> None:
    assert problems({"destinations": []}) == [
        ("transfer.destinations", "must list at least one destination (leave transfer out to turn transfers off)")
    ]
