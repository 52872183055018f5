"""Where an agent may transfer a call: the one rule every transfer goes through, against toll fraud.

An agent transfers only to the destinations its configuration lists (`transfer.destinations`): exact numbers,
or patterns (`+1415555****`: the digits every number starts with, then one `*` per remaining digit). A number a
pattern matches must also be a plain geographic or mobile number (`PLAIN_TYPES`): premium-rate, shared-cost,
toll-free, personal, UAN, VoIP, pager, voicemail-access and unclassified numbers are refused unless listed
exactly as a `number`. And a pattern does not cross a border (`_in_patterns_country`): countries that share a
calling code (the +1 of the US, Canada and the Caribbean; the +44 of the UK, Guernsey, Jersey and the Isle of Man)
are reached through it only where the pattern spells out their own digits, so `+1**********` is the United States
and not Jamaica's 876. With no `transfer` section the agent cannot transfer, and `transfer_call` is not offered.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Final

import phonenumbers
from phonenumbers import PhoneMetadata, PhoneNumber, geocoder

from config.agent import TransferConfig
from config.phone import InvalidPhoneNumber, NumberKind, e164, number_kind
from pipelines.tools import BUILTIN_FUNCTIONS, TRANSFER_CALL, FunctionSpec

__all__ = ["NO_TRANSFERS", "PLAIN_TYPES", "AllowedTransfer", "Refusal", "TransferRules", "builtin_functions"]

PLAIN_TYPES: Final = frozenset({NumberKind.FIXED_LINE, NumberKind.MOBILE, NumberKind.FIXED_LINE_OR_MOBILE})
"""Number kinds a pattern may reach. Toll-free is left out on purpose: in North America toll-free traffic pumping
makes the line that dials it a revenue source, and a business's toll-free desk is one number to list exactly."""


@dataclass(frozen=True, slots=True)
class AllowedTransfer:
    """A transfer the rules allow: the E.164 number to dial and the destination's label."""

    number: str
    label: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A transfer the rules refuse; `message` is the function result that tells the model why and what it may do."""

    given: str
    message: str


@dataclass(frozen=True, slots=True)
class _Destination:
    label: str
    number: str | None = None
    prefix: str = ""
    wildcards: int = 0

    def matches(self, number: str) -> bool:
        if self.number is not None:
            return number == self.number
        return number.startswith(self.prefix) and len(number) == len(self.prefix) + self.wildcards

    @property
    def pattern(self) -> str:
        return self.prefix + "*" * self.wildcards

    def describe(self) -> str:
        if self.number is not None:
            return f"{self.label} ({self.number})"
        return f"{self.label} ({self.prefix} followed by {self.wildcards} more digits, which the caller gives)"


@dataclass(frozen=True, slots=True)
class TransferRules:
    """The destinations one agent may transfer to (none: the agent cannot transfer)."""

    destinations: tuple[_Destination, ...] = ()

    @classmethod
    def from_config(cls, section: TransferConfig | None) -> TransferRules:
        """The rules of an agent's validated `transfer` section (None: no transfers at all)."""
        if section is None:
            return NO_TRANSFERS
        return cls(
            tuple(
                _Destination(d.label, number=d.number)
                if d.number is not None
                else _Destination(d.label, prefix=(d.pattern or "").rstrip("*"), wildcards=(d.pattern or "").count("*"))
                for d in section.destinations
            )
        )

    @property
    def offered(self) -> bool:
        """Whether the model is offered `transfer_call` at all."""
        return bool(self.destinations)

    def check(self, given: str, *, region: str | None = None) -> AllowedTransfer | Refusal:
        """Whether a transfer to `given` (a number as the model wrote it, or an exact destination's label) may go.

        `region` (e.g. "US") reads a number written without its country code.
        """
        if not self.offered:
            return Refusal(
                given, "error: this agent cannot transfer calls; tell the caller and offer to help otherwise"
            )
        for destination in self.destinations:
            if destination.number is not None and given.strip().casefold() == destination.label.casefold():
                return AllowedTransfer(destination.number, destination.label)
        try:
            number = e164(given, region=region)
        except InvalidPhoneNumber as exc:
            return Refusal(
                given,
                f"error: {exc}, so the call was not transferred; ask the caller for the full number with its "
                f"country code, or offer {self._choices()}",
            )
        exact = next((d for d in self.destinations if d.number == number), None)
        if exact is not None:
            return AllowedTransfer(number, exact.label)
        matched = next((d for d in self.destinations if d.matches(number)), None)
        if matched is None:
            return Refusal(given, f"error: {number} is not a number this agent may transfer to. {self._refused()}")
        parsed = phonenumbers.parse(number)
        kind = number_kind(parsed)
        if kind not in PLAIN_TYPES:
            return Refusal(
                given, f"error: {number} is {kind.described}, which this agent may not transfer to. {self._refused()}"
            )
        if not _in_patterns_country(parsed, matched.prefix):
            where = geocoder.country_name_for_number(parsed, "en") or phonenumbers.region_code_for_number(parsed)
            return Refusal(
                given,
                f"error: {number} is in {where}, not in the country the pattern {matched.pattern} covers, so this "
                f"agent may not transfer to it. {self._refused()}",
            )
        return AllowedTransfer(number, matched.label)

    def function_spec(self) -> FunctionSpec | None:
        """`transfer_call` as this agent's model sees it, its destinations in the description; None if not offered."""
        if not self.offered:
            return None
        base = next(spec for spec in BUILTIN_FUNCTIONS if spec.name == TRANSFER_CALL)
        parameters = dict(base.parameters)
        properties = dict(parameters["properties"])
        properties["phone_number"] = {
            "type": "string",
            "description": "The number to transfer to, in E.164 (+15551234567), or the label of a listed number.",
        }
        parameters["properties"] = properties
        description = f"{base.description} Transfer only to: {self._listing()}; never to any other number."
        return dataclasses.replace(base, description=description, parameters=parameters)

    def _listing(self) -> str:
        return "; ".join(d.describe() for d in self.destinations)

    def _choices(self) -> str:
        return f"one of: {self._listing()}"

    def _refused(self) -> str:
        return f"The call was not transferred; tell the caller, and offer {self._choices()}."


def _in_patterns_country(number: PhoneNumber, prefix: str) -> bool:
    """Whether `number`, matched by a pattern starting `prefix`, is in the country that pattern names.

    Where several countries share a calling code, a pattern names the code's main country (the United States for
    +1, the United Kingdom for +44) unless its digits go on to spell another's: that country's own leading digits
    where phonenumbers knows them (`+1876` for Jamaica, `+447624` for the Isle of Man), else at least an area code
    (`_SPELLED_DIGITS`: `+1416` for Toronto, `+441481` for Guernsey). So `+1**********` reaches US numbers, not the
    Caribbean's, which are billed as international calls and include the area codes of one-ring toll fraud (809,
    876).
    """
    region = phonenumbers.region_code_for_number(number)
    code = number.country_code
    if region is None or code is None:
        return False
    if region == phonenumbers.region_code_for_country_code(code):
        return True
    national = prefix.removeprefix("+").removeprefix(str(code))
    metadata = PhoneMetadata.metadata_for_region(region)
    leading = metadata.leading_digits if metadata is not None else None
    if leading:
        return re.match(f"(?:{leading})", national) is not None
    return len(national) >= _SPELLED_DIGITS.get(code, _SPELLED_DIGITS_ELSEWHERE)


_SPELLED_DIGITS: Final = {1: 3}
"""National digits a pattern must spell to reach a country sharing its calling code that phonenumbers tells apart
by its numbers' patterns alone: Canada's three-digit area codes in +1."""
_SPELLED_DIGITS_ELSEWHERE: Final = 4
"""The same elsewhere (Guernsey and Jersey in +44: 1481, 1534, 7781, 7700, ...; Cocos and Christmas Islands in +61)."""

NO_TRANSFERS: Final = TransferRules()
"""The rules of an agent without a `transfer` section: no destination, no `transfer_call`."""


def builtin_functions(rules: TransferRules) -> list[FunctionSpec]:
    """The built-in functions an agent's model is offered: `transfer_call` only with destinations, listing them."""
    transfer = rules.function_spec()
    return [
        offered
        for spec in BUILTIN_FUNCTIONS
        if (offered := transfer if spec.name == TRANSFER_CALL else spec) is not None
    ]
