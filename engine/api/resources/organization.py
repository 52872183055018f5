"""/v1/organization: the caller's own organization and its credit balance (read-only)."""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints

from engine.api.models import Name, ResponseModel, UpdateModel
from engine.api.operations import ApiCall, Resource
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
