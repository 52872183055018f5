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

__all__ = ["STANDARD_VARIABLES", "RenderedPrompt", "call_variables", "hidden_standard_variable", "render_prompt"]

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
    name means UTC). `extra` (the agent's variables, a campaign recipient's columns) is merged on top, mapping
    into mapping, so `{"recipient": {"notes": ...}}` and `{"recipient.notes": ...}` both give `{{recipient.notes}}`;
    on a clash the `extra` value wins.
    """
    local = (now if now.tzinfo else now.replace(tzinfo=UTC)).astimezone(_zone(timezone))
    standard: dict[str, Any] = {
        "now": f"{_long_date(local)}, {_clock_time(local)} {local.tzname()}",
        "today": _long_date(local),
        "customer": {"number": customer_number, "name": customer_name},
        "call": {"direction": direction},
    }
    return _merged(standard, extra)


def hidden_standard_variable(name: str) -> str | None:
    """The standard variable a call variable named `name` would hide (`call_variables` lets `extra` win), or None.

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
