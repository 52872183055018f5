"""/v1/organization: the caller's own organization, its credit balance (read-only) and its outbound dial policy."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field, StringConstraints

from config.phone import NumberKind
from engine.api.errors import unprocessable
from engine.api.models import Name, ResponseModel, UpdateModel
from engine.api.operations import ApiCall, Resource
from storage import dial_policies
from storage.dial_policies import DEFAULT_KINDS, OPT_IN_KINDS, InvalidDialPolicy, OutboundDialPolicy
from storage.enums import Plan
from storage.organizations import Organization, get_organization, update_organization

resource = Resource("Organization", "The organization the API key belongs to.")


class Credits(ResponseModel):
    """The organization's balance, never below zero; a started minute of a call costs its plan's rate."""

    credits: int
    plan: Plan


Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")]
"""Lower-case letters, digits and inner hyphens, as in URLs."""


class OrganizationUpdate(UpdateModel):
    """The organization's display name or slug; plan and credits are not the API's to change."""

    not_null = frozenset({"name", "slug"})

    name: Name | None = None
    slug: Slug | None = None


# 404 on the organization itself: it was deleted while the request was under way.
@resource.get("/organization", summary="The caller's organization", response=Organization, errors=(404,))
async def get_own_organization(call: ApiCall) -> Organization:
    """The organization the API key belongs to."""
    async with call.tenant() as db:
        return await get_organization(db, organization_id=call.caller.organization_id)


@resource.get("/organization/credits", summary="The organization's credit balance", response=Credits, errors=(404,))
async def get_credits(call: ApiCall) -> Credits:
    """Credits left (running calls hold their next minute apart) and the plan."""
    async with call.tenant() as db:
        organization = await get_organization(db, organization_id=call.caller.organization_id)
    return Credits(credits=organization.credits, plan=organization.plan)


@resource.patch(
    "/organization",
    summary="Rename the organization",
    response=Organization,
    body=OrganizationUpdate,
    errors=(404, 409),
)
async def update_own_organization(call: ApiCall) -> Organization:
    """Change the organization's name or slug; 409 if another organization has the slug."""
    async with call.tenant() as db:
        return await update_organization(
            db, organization_id=call.caller.organization_id, changes=call.body_as(OrganizationUpdate).changes()
        )


Country = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]
"""An ISO 3166 region code, upper case: GB, US."""


class DialPolicy(ResponseModel):
    """Which numbers the organization's outbound calls (POST /v1/calls, campaigns) may dial, against toll fraud."""

    default_kinds: list[NumberKind] = Field(description="Kinds every organization dials.")
    allowed_kinds: list[NumberKind] = Field(description="Kinds this organization dials besides the default ones.")
    default_countries: list[str] = Field(
        description="The countries of the organization's phone numbers (ISO 3166: GB, US; a US number is not "
        "Jamaica's +1 876): the countries dialed while allowedCountries is null; none without a number."
    )
    allowed_countries: list[str] | None = Field(
        description="Only numbers of these countries are dialed, set by an OWNER or ADMIN in place of "
        "defaultCountries; null: the default, defaultCountries."
    )
    international_networks: bool = Field(
        description="Whether numbers of the international networks (+870, +881, +882, ...: satellite phones and the "
        "like) are dialed."
    )
    updated_at: datetime | None = Field(description="When it was last set; null while it is the default.")

    @classmethod
    def of(cls, policy: OutboundDialPolicy) -> DialPolicy:
        """The API's view of a stored policy."""
        return cls(
            default_kinds=sorted(DEFAULT_KINDS),
            allowed_kinds=sorted(policy.allowed_kinds),
            default_countries=list(policy.home_countries),
            allowed_countries=list(policy.allowed_countries) if policy.allowed_countries is not None else None,
            international_networks=policy.international_networks,
            updated_at=policy.updated_at,
        )


class DialPolicyUpdate(UpdateModel):
    """What to change in the dial policy; fields left out stay as they are."""

    not_null = frozenset({"allowed_kinds", "international_networks"})

    allowed_kinds: list[NumberKind] | None = Field(
        None,
        max_length=len(NumberKind),
        description="The kinds to dial besides the default ones, replacing the list: "
        + ", ".join(sorted(OPT_IN_KINDS))
        + "; [] for none.",
    )
    allowed_countries: list[Country] | None = Field(
        None,
        min_length=1,
        max_length=300,
        description="Dial only numbers of these countries, replacing the list; null: the default, the countries of "
        "the organization's phone numbers.",
    )
    international_networks: bool | None = None


@resource.get("/organization/dial-policy", summary="The outbound dial policy", response=DialPolicy)
async def get_dial_policy(call: ApiCall) -> DialPolicy:
    """Which kinds of numbers, in which countries, the organization's calls may dial (the default until set: the
    default kinds, in the countries of its phone numbers)."""
    async with call.tenant() as db:
        policy = await dial_policies.get_policy(db, organization_id=call.caller.organization_id)
    return DialPolicy.of(policy)


@resource.patch(
    "/organization/dial-policy",
    summary="Change the outbound dial policy",
    response=DialPolicy,
    body=DialPolicyUpdate,
    errors=(422,),
)
async def update_dial_policy(call: ApiCall) -> DialPolicy:
    """Allow more kinds of numbers (premium-rate, ...), dial other countries than those of the organization's numbers,
    or undo either.

    An OWNER's or ADMIN's key only. It applies to the next call placed, campaign recipients already imported included
    (one the policy no longer allows ends `failed`, never dialed). 422 for a kind dialed anyway or an unknown country.
    """
    changes = call.body_as(DialPolicyUpdate).changes()
    organization_id = call.caller.organization_id
    async with call.tenant() as db:
        current = await dial_policies.lock_policy(db, organization_id=organization_id)
        try:
            policy = await dial_policies.set_policy(
                db,
                organization_id=organization_id,
                allowed_kinds=changes.get("allowed_kinds", current.allowed_kinds),
                allowed_countries=changes.get("allowed_countries", current.allowed_countries),
                international_networks=changes.get("international_networks", current.international_networks),
            )
        except InvalidDialPolicy as exc:
            raise unprocessable(f"{exc.field}: {exc}", exc.field) from None
    return DialPolicy.of(policy)
