"""Specifications of prompt templates: placeholders filled from a call's variables, unknown ones reported."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from pipelines.llm.prompt import (
    STANDARD_VARIABLES,
    RenderedPrompt,
    call_variables,
    hidden_names,
    hidden_standard_variable,
    render_prompt,
)

# Tuesday, November 24, 2026, 20:04 UTC = 3:04 PM in New York (EST).
MOMENT = datetime(2026, 11, 24, 20, 4, tzinfo=UTC)


def standard(**overrides: Any) -> dict[str, Any]:
    """call_variables() with everyday arguments, some replaced."""
    arguments: dict[str, Any] = {
        "now": MOMENT,
        "timezone": "America/New_York",
        "customer_number": "+15551234567",
        "customer_name": "Ann Lee",
        "direction": "inbound",
        "extra": {},
    }
    arguments.update(overrides)
    return call_variables(**arguments)


# --------------------------------------------------------------------------------------------------- render_prompt


def test_a_placeholder_is_replaced_by_its_value() -> None:
    assert render_prompt("Hello {{name}}!", {"name": "Ann"}) == RenderedPrompt("Hello Ann!", ())


def test_spaces_inside_the_braces_are_allowed() -> None:
    assert render_prompt("Hello {{  name }}!", {"name": "Ann"}).text == "Hello Ann!"


def test_a_dotted_name_walks_nested_mappings() -> None:
    variables = {"customer": {"name": "Ann", "address": {"city": "Oslo"}}}
    assert render_prompt("{{customer.name}} in {{ customer.address.city }}", variables).text == "Ann in Oslo"


def test_a_literal_dotted_key_is_found_too() -> None:
    assert render_prompt("{{recipient.notes}}", {"recipient.notes": "call after 5"}).text == "call after 5"


def test_unknown_placeholders_become_empty_and_are_reported_once_each() -> None:
    rendered = render_prompt("Hi {{nmae}}, {{customer.email}}. Bye {{nmae}}.", {"customer": {"name": "Ann"}})
    assert rendered.text == "Hi , . Bye ."
    assert rendered.missing == ("nmae", "customer.email")


def test_a_template_without_placeholders_is_unchanged() -> None:
    template = 'Answer in JSON like {"ok": true}.'
    assert render_prompt(template, {}) == RenderedPrompt(template, ())


def test_numbers_and_booleans_read_naturally() -> None:
    variables = {"count": 3, "price": 19.99, "whole": 12.0, "sum": 0.1 + 0.2, "vip": True, "owes": False}
    rendered = render_prompt("{{count}} {{price}} {{whole}} {{sum}} {{vip}} {{owes}}", variables)
    assert rendered.text == "3 19.99 12 0.3 true false"


def test_other_values_are_formatted_sensibly() -> None:
    variables = {
        "balance": Decimal("10.50"),
        "due": date(2026, 12, 1),
        "tags": ["gold", "early"],
        "card": {"last4": "4242"},
        "unknown": None,
    }
    rendered = render_prompt("{{balance}}|{{due}}|{{tags}}|{{card}}|{{unknown}}", variables)
    assert rendered.text == '10.50|2026-12-01|gold, early|{"last4": "4242"}|'
    assert rendered.missing == ()


# --------------------------------------------------------------------------------------------------- call_variables


def test_now_reads_as_a_date_and_time_in_the_agents_time_zone() -> None:
    assert standard()["now"] == "Tuesday, November 24, 2026, 3:04 PM EST"
    assert standard()["today"] == "Tuesday, November 24, 2026"


def test_now_follows_daylight_saving_time() -> None:
    summer = datetime(2026, 7, 1, 0, 30, tzinfo=UTC)
    assert standard(now=summer)["now"] == "Tuesday, June 30, 2026, 8:30 PM EDT"


def test_midnight_and_noon_read_as_twelve() -> None:
    midnight, noon = datetime(2026, 1, 2, 0, 0, tzinfo=UTC), datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
    assert standard(now=midnight, timezone="UTC")["now"] == "Friday, January 2, 2026, 12:00 AM UTC"
    assert standard(now=noon, timezone="UTC")["now"] == "Friday, January 2, 2026, 12:00 PM UTC"


def test_without_a_time_zone_or_with_an_unknown_one_times_are_in_utc() -> None:
    assert standard(timezone=None)["now"] == "Tuesday, November 24, 2026, 8:04 PM UTC"
    assert standard(timezone="Mars/Olympus_Mons")["now"] == "Tuesday, November 24, 2026, 8:04 PM UTC"


def test_a_naive_now_is_taken_as_utc() -> None:
    naive = datetime(2026, 11, 24, 20, 4)
    assert standard(now=naive)["now"] == "Tuesday, November 24, 2026, 3:04 PM EST"


def test_customer_and_call_details_are_nested_variables() -> None:
    rendered = render_prompt("{{customer.name}} ({{customer.number}}), {{call.direction}}", standard())
    assert rendered == RenderedPrompt("Ann Lee (+15551234567), inbound", ())


def test_an_unknown_customer_name_renders_empty_without_being_reported() -> None:
    rendered = render_prompt("Name: {{customer.name}}", standard(customer_name=None))
    assert rendered == RenderedPrompt("Name: ", ())


def test_extra_variables_merge_into_the_nested_ones() -> None:
    variables = standard(
        extra={"company": "Acme", "recipient": {"notes": "prefers mornings"}, "customer": {"email": "ann@example.com"}}
    )
    rendered = render_prompt(
        "{{company}}: {{recipient.notes}}, {{customer.name}} <{{customer.email}}>",
        variables,
    )
    assert rendered.text == "Acme: prefers mornings, Ann Lee <ann@example.com>"


def test_extra_dotted_keys_become_nested_variables() -> None:
    variables = standard(extra={"recipient.notes": "VIP", "recipient.plan": "gold"})
    assert variables["recipient"] == {"notes": "VIP", "plan": "gold"}
    assert render_prompt("{{ recipient.notes }}/{{recipient.plan}}", variables).text == "VIP/gold"


def test_extra_values_never_hide_the_standard_ones() -> None:
    # Refused wherever variables are given; stored before that rule, the built-in fills the placeholder.
    extra = {
        "today": "whenever",
        "customer": {"name": "Bo", "email": "bo@example.com"},
        "customer.number": "nobody",
        "customer.plan": "gold",
        "call": "x",
        "now": {"zone": "UTC"},
        "plan": "basic",
    }
    variables = standard(extra=extra)
    rendered = render_prompt(
        "{{today}}|{{now}}|{{customer.name}}|{{customer.number}}|{{customer.email}}|{{customer.plan}}|"
        "{{call.direction}}|{{plan}}",
        variables,
    )
    assert rendered.text == (
        "Tuesday, November 24, 2026|Tuesday, November 24, 2026, 3:04 PM EST|Ann Lee|+15551234567|bo@example.com|"
        "gold|inbound|basic"
    )
    assert hidden_names(extra) == ["today", "customer.name", "customer.number", "call", "now"]


def test_the_standard_variables_listed_are_the_ones_every_call_gets() -> None:
    def leaves(variables: dict[str, Any], prefix: str = "") -> set[str]:
        found: set[str] = set()
        for key, value in variables.items():
            found |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
        return found

    assert leaves(standard()) == set(STANDARD_VARIABLES)


@pytest.mark.parametrize(
    ("name", "hidden"),
    [
        ("today", "today"),
        ("now", "now"),
        ("now.zone", "now"),  # a mapping in place of the text
        ("customer", "customer.number"),  # a text in place of the mapping: name and number both lost
        ("customer.name", "customer.name"),
        ("call", "call.direction"),
        ("customer.plan", None),  # added to the mapping, nothing hidden
        ("Today", None),  # placeholders are case-sensitive
        ("plan", None),
    ],
)
def test_a_variable_hides_a_standard_one_when_their_dotted_names_overlap(name: str, hidden: str | None) -> None:
    assert hidden_standard_variable(name) == hidden
