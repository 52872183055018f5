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
        ],
        "maxMinutes": 60,
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


# A pattern on a calling code that several countries share names its main one (toll fraud's favourite numbers are
# Caribbean ones that look domestic: +1 876, +1 809); another's numbers need its own digits in the pattern.
NANP = {"pattern": "+1**********", "label": "North America"}
UK = {"pattern": "+44**********", "label": "United Kingdom"}


@pytest.mark.parametrize(
    ("given", "country"),
    [
        ("+18765551234", "Jamaica"),
        ("+18092201234", "Dominican Republic"),
        ("+13405551234", "U.S. Virgin Islands"),
        ("+16705551234", "Northern Mariana Islands"),
        ("+14416641234", "Bermuda"),
        ("+14165550123", "Canada"),
    ],
)
def test_a_pattern_on_plus_one_does_not_reach_the_other_countries_of_the_code(given: str, country: str) -> None:
    verdict = rules(NANP).check(given)

    assert isinstance(verdict, Refusal)
    assert verdict.message.startswith(f"error: {given} is in {country}, not in the country the pattern +1**********")
    assert "North America (+1 followed by 10 more digits" in verdict.message


@pytest.mark.parametrize("given", ["+447781123456", "+447911123456", "+447624123456", "+441481712345"])
def test_a_pattern_on_plus_forty_four_reaches_the_uk_and_not_the_crown_dependencies(given: str) -> None:
    assert isinstance(rules(UK).check(given), Refusal)
    assert rules(UK).check("+442079460123") == AllowedTransfer("+442079460123", "United Kingdom")
    assert rules(UK).check("+447400123456") == AllowedTransfer("+447400123456", "United Kingdom")


def test_a_pattern_on_plus_one_reaches_the_united_states_in_any_spelling() -> None:
    assert rules(NANP).check("(415) 555-0123", region="US") == AllowedTransfer("+14155550123", "North America")
    assert rules(NANP).check("+1 212 555 0123") == AllowedTransfer("+12125550123", "North America")


@pytest.mark.parametrize(
    ("pattern", "given"),
    [
        ("+1876*******", "+18765551234"),  # Jamaica's own leading digits
        ("+1416*******", "+14165550123"),  # a Canadian area code
        ("+447624******", "+447624123456"),  # the Isle of Man's leading digits
        ("+441481******", "+441481712345"),  # Guernsey's area code
    ],
)
def test_a_pattern_that_spells_another_countrys_digits_reaches_it(pattern: str, given: str) -> None:
    assert rules({"pattern": pattern, "label": "There"}).check(given) == AllowedTransfer(given, "There")


def test_three_digits_of_a_uk_pattern_do_not_reach_guernseys_mobiles_inside_them() -> None:
    # UK mobiles 778x include Guernsey's 7781: three digits name the UK's range, four name Guernsey's.
    assert isinstance(rules({"pattern": "+44778*******", "label": "UK"}).check("+447781123456"), Refusal)
    assert rules({"pattern": "+44778*******", "label": "UK"}).check("+447780123456") == AllowedTransfer(
        "+447780123456", "UK"
    )
