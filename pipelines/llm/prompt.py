"""Fill an agent's prompt template: `{{name}}` and dotted `{{customer.name}}` placeholders from the call's variables."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "STANDARD_VARIABLES",
    "RenderedPrompt",
    "call_variables",
    "hidden_names",
    "hidden_standard_variable",
    "render_prompt",
    "variable_name_refusal",
    "without_hidden",
]

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_MISSING = object()

STANDARD_VARIABLES: Final = {
    "now": "the date and time of the call",
    "today": "the date of the call",
    "customer.number": "the other party's number",
    "customer.name": "the other party's name",
    "call.direction": "inbound or outbound",
}
"""The placeholders `call_variables` fills for every call, by dotted name, with what each holds."""


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """A filled-in template, and the placeholders no variable answered (filled with "" and listed once each)."""

    text: str
    missing: tuple[str, ...] = ()


def render_prompt(template: str, variables: Mapping[str, Any]) -> RenderedPrompt:
    """Replace each `{{ name }}` / `{{ a.b.c }}` in `template` with its value from the nested `variables`.

    A dotted name is looked up as a literal key first (`{"customer.name": ...}`), then mapping by mapping.
    Unknown names become "" and are listed in `RenderedPrompt.missing`, in order of first appearance.
    """
    missing: list[str] = []

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        value = _lookup(variables, name)
        if value is _MISSING:
            if name not in missing:
                missing.append(name)
            return ""
        return _format(value)

    return RenderedPrompt(_PLACEHOLDER.sub(fill, template), tuple(missing))


def call_variables(
    *,
    now: datetime,
    timezone: str | None,
    customer_number: str | None,
    customer_name: str | None,
    direction: str,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The standard variables of a call: `now`, `today`, `customer.number`, `customer.name`, `call.direction`.

    `now` reads like "Tuesday, November 24, 2026, 3:04 PM EST" in `timezone` (an IANA name; None or an unknown
    name means UTC). `extra` (the agent's variables, a call's or a campaign recipient's) is merged in, mapping
    into mapping, so `{"recipient": {"notes": ...}}` and `{"recipient.notes": ...}` both give `{{recipient.notes}}`,
    and `customer.plan` adds to `{{customer.…}}`. A name that would hide a standard variable (`today`, `customer`:
    see hidden_standard_variable) is left out: the standard one always fills its placeholder. Such names are
    refused wherever variables are saved (variable_name_refusal); only ones stored before that get here.
    """
    local = (now if now.tzinfo else now.replace(tzinfo=UTC)).astimezone(_zone(timezone))
    standard: dict[str, Any] = {
        "now": f"{_long_date(local)}, {_clock_time(local)} {local.tzname()}",
        "today": _long_date(local),
        "customer": {"number": customer_number, "name": customer_name},
        "call": {"direction": direction},
    }
    return _merged(standard, without_hidden(extra))


def hidden_standard_variable(name: str) -> str | None:
    """The standard variable a call variable named `name` would hide if it took its place, or None.

    `customer` hides `customer.name` (its value replaces the whole mapping), `now.zone` hides `now`; `customer.plan`
    hides nothing, it adds to the mapping.
    """
    parts = [part.strip() for part in name.split(".")]
    for standard in STANDARD_VARIABLES:
        own = standard.split(".")
        shared = min(len(parts), len(own))
        if parts[:shared] == own[:shared]:
            return standard
    return None


def variable_name_refusal(name: str) -> str | None:
    """Why a prompt variable may not be called `name`, or None: the one rule for every variable a user names (an
    agent's `variables`, a call's, a campaign recipient's, a conversation path's). One named like a built-in prompt
    variable (`today`, `customer`, ...) would take its place in every call's prompt, losing either the built-in or
    the user's data, so it is refused where it is given, naming it."""
    hidden = hidden_standard_variable(name)
    if hidden is None:
        return None
    return (
        f"a variable named {name!r} would hide the built-in prompt variable {{{{{hidden}}}}} "
        f"({STANDARD_VARIABLES[hidden]}), which every call fills in"
    )


def without_hidden(variables: Mapping[str, Any]) -> dict[str, Any]:
    """`variables` without those named like a built-in prompt variable (variable_name_refusal), which the built-in
    fills instead: what a call does with such a name stored before it was refused. A mapping's own values count
    by their dotted names: `{"customer": {"plan": ...}}` adds `{{customer.plan}}` and stays."""
    return _partition(variables, "")[0]


def hidden_names(variables: Mapping[str, Any]) -> list[str]:
    """The dotted names `without_hidden` leaves out of `variables`, in order."""
    return _partition(variables, "")[1]


def _partition(variables: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
    kept: dict[str, Any] = {}
    hidden: list[str] = []
    for key, value in variables.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not _within_standard(name):
            kept[key], below = _partition(value, f"{name}.")
            hidden.extend(below)
        elif hidden_standard_variable(name) is None:
            kept[key] = value
        else:
            hidden.append(name)
    return kept, hidden


def _within_standard(name: str) -> bool:
    """Whether `name` is a standard variable or a name below one (`now.zone`): a mapping there replaces it."""
    parts = [part.strip() for part in name.split(".")]
    return any(parts[: len(own)] == own for own in (standard.split(".") for standard in STANDARD_VARIABLES))


def _lookup(variables: Mapping[str, Any], name: str) -> Any:
    if not name:
        return _MISSING
    if name in variables:
        return variables[name]
    node: Any = variables
    for part in name.split("."):
        if not isinstance(node, Mapping) or part.strip() not in node:
            return _MISSING
        node = node[part.strip()]
    return node


def _format(value: Any) -> str:
    match value:
        case None:
            return ""
        case str():
            return value
        case bool():
            return "true" if value else "false"
        case int() | Decimal():
            return str(value)
        case float():
            # 0.1 + 0.2 reads as 0.3, 12.0 as 12.
            return f"{value:.15g}"
        case datetime() | date():
            return value.isoformat()
        case Mapping():
            return json.dumps(value, default=str, ensure_ascii=False)
        case Sequence():
            return ", ".join(_format(item) for item in value)
        case _:
            return str(value)


def _zone(name: str | None) -> ZoneInfo:
    if not name:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("unknown time zone %r: prompt times are given in UTC", name)
        return ZoneInfo("UTC")


_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    *("January", "February", "March", "April", "May", "June"),
    *("July", "August", "September", "October", "November", "December"),
)


def _long_date(moment: datetime) -> str:
    # Spelled out here rather than with strftime, whose names follow the process locale.
    return f"{_DAYS[moment.weekday()]}, {_MONTHS[moment.month - 1]} {moment.day}, {moment.year}"


def _clock_time(moment: datetime) -> str:
    hour = moment.hour % 12 or 12
    return f"{hour}:{moment.minute:02d} {'AM' if moment.hour < 12 else 'PM'}"


def _merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, given in extra.items():
        head, _, rest = str(key).partition(".")
        value = {rest: given} if rest else given
        current = result.get(head)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            result[head] = _merged(current, value)
        elif isinstance(value, Mapping):
            result[head] = _merged({}, value)
        else:
            result[head] = value
    return result
