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
VoIP but which are the dearest destinations there are). `allowed_countries` narrows calls to some countries.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Final

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
    """ISO 3166 region codes ("GB"): only numbers of these countries are dialed; None: any country."""
    international_networks: bool = False
    """Whether numbers of the international networks (+870, +881, +882, ...) are dialed, of the kinds allowed; they are
    no country's, so `allowed_countries` does not narrow them."""
    updated_at: datetime | None = None
    """When an OWNER or ADMIN last set it; None for the default of an organization that never did."""

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
        if self.allowed_countries is not None and region not in self.allowed_countries:
            where = geocoder.country_name_for_number(parsed, "en") or region or "no known country"
            return (
                f"{number} is in {where}; this organization dials only numbers in "
                f"{', '.join(self.allowed_countries)} ({_HOW_TO_ALLOW})"
            )
        return None


DEFAULT_POLICY: Final = OutboundDialPolicy()
"""The policy of an organization that never set one: DEFAULT_KINDS, any country, no international network."""


async def get_policy(db: Queryable, *, organization_id: str) -> OutboundDialPolicy:
    """The organization's policy; the default (organization_id filled in) if it never set one."""
    row = await db.fetchrow(f'SELECT {_COLUMNS} FROM "OutboundDialPolicy" WHERE "organizationId" = $1', organization_id)
    if row is None:
        return DEFAULT_POLICY.model_copy(update={"organization_id": organization_id})
    return OutboundDialPolicy.from_row(row)


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
            "allowedCountries", "an empty list of countries would dial nothing: give at least one, or null for any"
        )
    row = await db.fetchrow(
        f"""
        INSERT INTO "OutboundDialPolicy" ("organizationId", "allowedKinds", "allowedCountries", "internationalNetworks")
        VALUES ($1, $2, $3, $4)
        ON CONFLICT ("organizationId") DO UPDATE SET
            "allowedKinds" = EXCLUDED."allowedKinds", "allowedCountries" = EXCLUDED."allowedCountries",
            "internationalNetworks" = EXCLUDED."internationalNetworks"
        RETURNING {_COLUMNS}
        """,
        organization_id,
        sorted(set(allowed_kinds)),
        countries,
        international_networks,
    )
    assert row is not None
    return OutboundDialPolicy.from_row(row)
