"""The organization's outbound dial policy: which numbers its calls may dial, the one rule against toll fraud.

One rule, one home: `OutboundDialPolicy.refusal` decides for every outbound call, whoever places it. `place_call`
(engine/twilio/outbound_calls.py) asks it before POST /v1/calls or the campaign dispatcher dials anything, and the
campaign recipient import (engine/campaigns/recipients_csv.py) asks it for each row, so a number the API refuses is
never imported as dialable, and one imported while allowed is still refused at its dial once the policy tightens.
A call's transfer (engine/call/paid_transfer.py), a leg the organization pays for too, asks it before Twilio dials,
whatever the agent's transfer destinations list.
The kind of a number is config.phone's `number_kind`, the reading the transfer rules judge by too.

By default (`DEFAULT_KINDS`) a call may reach fixed-line, mobile, fixed-line-or-mobile, VoIP and toll-free numbers
of a country. Toll-free numbers are dialed because the number's owner pays for the call, so a call to one earns
nobody a share of the organization's money; VoIP numbers because many countries give them to ordinary homes and
businesses (France's 09, the UK's 056, Germany's 032) at the price of a geographic call. Premium-rate, shared-cost,
personal (forwarding), UAN, pager and voicemail-access numbers, and numbers of no known type, are the ranges whose
revenue the called party shares: they need an OWNER's or ADMIN's deliberate opt-in (`allowed_kinds`). So do the
international networks (+870, +881, +882, ...: satellite phones and the like, which phonenumbers calls mobile or
VoIP but which are the dearest destinations there are).

The countries dialed are, by default, those of the organization's own phone numbers (`home_countries`: the region
of each of its "PhoneNumber" rows, inbound-only ones included since an inbound call is transferred from its number;
`_region_of` says how one outside every known range counts), as Twilio's Geo Permissions open a new account to its
home country only. The region counts, not the country code: a US number does not open +1 876 (Jamaica) or +1 809
(the Dominican Republic), numbers that look American but are billed as international calls, the classic one-ring
and revenue-share fraud destinations. An organization without a number dials no country. `allowed_countries`, once
an OWNER or ADMIN sets it, replaces the default (NULL is the default). `get_policy` reads the countries in the query
that reads the policy, so every caller of `refusal` judges by the same countries at the cost of one query.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from datetime import datetime
from functools import lru_cache
from typing import Final

import asyncpg
import phonenumbers
from phonenumbers import geocoder

from config.phone import NumberKind, number_kind
from storage.records import Connection, Queryable, Record

__all__ = [
    "DEFAULT_KINDS",
    "DEFAULT_POLICY",
    "OPT_IN_KINDS",
    "InvalidDialPolicy",
    "OutboundDialPolicy",
    "get_policy",
    "lock_policy",
    "set_policy",
]

DEFAULT_KINDS: Final = frozenset(
    {
        NumberKind.FIXED_LINE,
        NumberKind.MOBILE,
        NumberKind.FIXED_LINE_OR_MOBILE,
        NumberKind.VOIP,
        NumberKind.TOLL_FREE,
    }
)
"""The kinds every organization's calls may dial."""
OPT_IN_KINDS: Final = frozenset(NumberKind) - DEFAULT_KINDS
"""The kinds an organization dials only once it allows them (the values "allowedKinds" may hold)."""
_INTERNATIONAL_NETWORKS: Final = "001"
"""phonenumbers' region of the numbers of no country (+800, +870, +881, +882, ...)."""
_HOW_TO_ALLOW: Final = "an OWNER or ADMIN may change that: PATCH /v1/organization/dial-policy"
_COLUMNS: Final = '"organizationId", "allowedKinds", "allowedCountries", "internationalNetworks", "updatedAt"'
_OWN_NUMBERS: Final = (
    'ARRAY(SELECT DISTINCT n."phoneNumber" FROM "PhoneNumber" n WHERE n."organizationId" = $1) AS "phoneNumbers"'
)
"""A column of the organization's own numbers (the default countries' source), beside a query of its policy."""


class InvalidDialPolicy(ValueError):
    """A policy that cannot be set; `field` is the API's name of the part at fault (allowedKinds, allowedCountries)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class OutboundDialPolicy(Record):
    """Which numbers an organization's outbound calls may dial: the default kinds, plus those it allowed."""

    organization_id: str | None = None
    allowed_kinds: frozenset[NumberKind] = frozenset()
    """Opt-in kinds (OPT_IN_KINDS) dialed besides DEFAULT_KINDS."""
    allowed_countries: tuple[str, ...] | None = None
    """ISO 3166 region codes ("GB") an OWNER or ADMIN set: only numbers of these countries are dialed; None: the
    default, `home_countries`."""
    home_countries: tuple[str, ...] = ()
    """The regions of the organization's own phone numbers, sorted (`get_policy` reads them): the countries dialed
    while `allowed_countries` is None."""
    international_networks: bool = False
    """Whether numbers of the international networks (+870, +881, +882, ...) are dialed, of the kinds allowed; they are
    no country's, so `allowed_countries` does not narrow them."""
    updated_at: datetime | None = None
    """When an OWNER or ADMIN last set it; None for the default of an organization that never did."""

    @property
    def dialed_countries(self) -> tuple[str, ...]:
        """The countries whose numbers are dialed: `allowed_countries` if set, else `home_countries`."""
        return self.allowed_countries if self.allowed_countries is not None else self.home_countries

    def refusal(self, number: str) -> str | None:
        """Why a call to the E.164 `number` (as config.phone.e164 gives it) may not be placed, or None if it may.

        The reason names the number's kind or country, and who may allow it: "+449012345678 is a premium-rate
        number; this organization does not dial premium-rate numbers (...)".
        """
        parsed = phonenumbers.parse(number)
        kind = number_kind(parsed)
        if kind not in DEFAULT_KINDS and kind not in self.allowed_kinds:
            return f"{number} is {kind.described}; this organization does not dial {kind.plural} ({_HOW_TO_ALLOW})"
        region = phonenumbers.region_code_for_number(parsed)
        if region == _INTERNATIONAL_NETWORKS:
            # Not a country: `international_networks` alone decides, whatever the list of countries.
            if self.international_networks:
                return None
            return (
                f"{number} is a number of an international network (satellite phones and the like), not of a "
                f"country; this organization does not dial those ({_HOW_TO_ALLOW})"
            )
        # A number in no range of its country code's plan is of no known country: only an organization that dials
        # every country sharing the code (+1: the US, Canada and 23 others) dials it.
        code = parsed.country_code or 0
        regions = {region} if region else set(phonenumbers.region_codes_for_country_code(code))
        dialed = self.dialed_countries
        if regions and regions <= set(dialed):
            return None
        if region:
            where = geocoder.country_name_for_number(parsed, "en") or region
            widened = f", e.g. {json.dumps({'allowedCountries': sorted({*dialed, region})})}"
        else:
            where = f"no country phonenumbers can tell (+{code} is shared by {', '.join(sorted(regions))})"
            widened = ""
        if self.allowed_countries is not None:
            return (
                f"{number} is in {where}; this organization dials only numbers in {', '.join(dialed)} "
                f"({_HOW_TO_ALLOW}{widened})"
            )
        if not dialed:
            return (
                f"{number} is in {where}; this organization has no phone number, and by default dials only the "
                f"countries of its phone numbers ({_HOW_TO_ALLOW}{widened})"
            )
        return (
            f"{number} is in {where}; by default this organization dials only the countries of its phone numbers, "
            f"{', '.join(dialed)} ({_HOW_TO_ALLOW}{widened})"
        )


DEFAULT_POLICY: Final = OutboundDialPolicy()
"""The policy of an organization that never set one, as it stands before its numbers are read: DEFAULT_KINDS, the
countries of its numbers (none here), no international network."""


async def get_policy(db: Queryable, *, organization_id: str) -> OutboundDialPolicy:
    """The organization's policy, its `home_countries` filled in; the default if it never set one. One query."""
    row = await db.fetchrow(
        f"""
        SELECT {_OWN_NUMBERS}, p."allowedKinds", p."allowedCountries", p."internationalNetworks", p."updatedAt"
        FROM (SELECT 1) AS one LEFT JOIN "OutboundDialPolicy" p ON p."organizationId" = $1
        """,
        organization_id,
    )
    assert row is not None
    return _read_policy(organization_id, row)


def _read_policy(organization_id: str, row: asyncpg.Record) -> OutboundDialPolicy:
    """The policy of a row of `_COLUMNS` and `_OWN_NUMBERS`, the policy's columns all NULL for the default."""
    home = _home_countries(row["phoneNumbers"])
    if row["updatedAt"] is None:
        return DEFAULT_POLICY.model_copy(update={"organization_id": organization_id, "home_countries": home})
    return OutboundDialPolicy.from_row({**dict(row.items()), "organizationId": organization_id, "homeCountries": home})


def _home_countries(numbers: Iterable[str]) -> tuple[str, ...]:
    regions = {_region_of(number) for number in numbers}
    return tuple(sorted(region for region in regions if region is not None))


@lru_cache(maxsize=16384)
def _region_of(number: str) -> str | None:
    """The country of one of the organization's numbers; None for a number of no country, or not one (a row another
    writer left unreadable opens nothing). Cached: a dispatcher asks for the same numbers at every dial.

    A number outside every range phonenumbers knows counts as in the main country of its code (+1: the US): the
    numbers an organization gets from its carrier are real, and its metadata lags new ranges (a new US area code)
    behind the carriers. A number to dial gets no such benefit of the doubt (`refusal`)."""
    try:
        parsed = phonenumbers.parse(number)
    except phonenumbers.NumberParseException:
        return None
    region = phonenumbers.region_code_for_number(parsed) or phonenumbers.region_code_for_country_code(
        parsed.country_code or 0
    )
    return region if region in phonenumbers.SUPPORTED_REGIONS else None


async def lock_policy(conn: Connection, *, organization_id: str) -> OutboundDialPolicy:
    """The organization's policy as `get_policy` reads it, no other `lock_policy` getting past this point for it
    until the caller's transaction ends: for a change of part of it (`set_policy` writes it whole) that must not
    write back, as they were, parts another change is setting meanwhile. There may be no row yet to lock, so the lock
    is a transaction advisory lock of the organization's policy."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('dialtone.dial_policy:' || $1::text))", organization_id)
    return await get_policy(conn, organization_id=organization_id)


async def set_policy(
    db: Queryable,
    *,
    organization_id: str,
    allowed_kinds: Collection[NumberKind],
    allowed_countries: Collection[str] | None,
    international_networks: bool,
) -> OutboundDialPolicy:
    """Replace the organization's policy. InvalidDialPolicy for a kind that is dialed anyway, or a country that is not
    an ISO 3166 region code, naming it."""
    for kind in allowed_kinds:
        if kind not in OPT_IN_KINDS:
            raise InvalidDialPolicy(
                "allowedKinds", f"{kind} numbers are dialed anyway; list only {', '.join(sorted(OPT_IN_KINDS))}"
            )
    countries = None if allowed_countries is None else sorted(set(allowed_countries))
    for country in countries or ():
        if country not in phonenumbers.SUPPORTED_REGIONS:
            raise InvalidDialPolicy(
                "allowedCountries", f"{country!r} is not the ISO 3166 region code of a country (e.g. 'GB', 'US')"
            )
    if countries == []:
        raise InvalidDialPolicy(
            "allowedCountries",
            "an empty list of countries would dial nothing: give at least one, or null for the default (the "
            "countries of the organization's phone numbers)",
        )
    row = await db.fetchrow(
        f"""
        INSERT INTO "OutboundDialPolicy" ("organizationId", "allowedKinds", "allowedCountries", "internationalNetworks")
        VALUES ($1, $2, $3, $4)
        ON CONFLICT ("organizationId") DO UPDATE SET
            "allowedKinds" = EXCLUDED."allowedKinds", "allowedCountries" = EXCLUDED."allowedCountries",
            "internationalNetworks" = EXCLUDED."internationalNetworks"
        RETURNING {_COLUMNS}, {_OWN_NUMBERS}
        """,
        organization_id,
        sorted(set(allowed_kinds)),
        countries,
        international_networks,
    )
    assert row is not None
    return _read_policy(organization_id, row)
