"""/v1/phone-numbers: the numbers that ring the organization's agents, in E.164."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from config.phone import InvalidPhoneNumber, e164
from engine.api.errors import unprocessable
from engine.api.models import RequestModel, ShortText, UpdateModel
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from storage import phone_numbers
from storage.enums import PhoneNumberStatus
from storage.phone_numbers import PhoneNumber

ClosedMessage = Annotated[str, StringConstraints(min_length=1, max_length=1000, pattern=r"^[^\x00]*\S[^\x00]*$")]
"""Words Twilio says to a caller: not empty, no NUL."""

resource = Resource("Phone numbers", "Numbers the organization owns, each switched on or off per direction.")


class PhoneNumberCreate(RequestModel):
    """A number to add, in international form (stored as E.164); numbers are unique across organizations."""

    phone_number: ShortText
    label: ShortText | None = None
    inbound_status: PhoneNumberStatus = PhoneNumberStatus.ENABLED
    outbound_status: PhoneNumberStatus = PhoneNumberStatus.ENABLED
    closed_message: ClosedMessage | None = Field(
        None,
        description="What callers hear when every agent on the number is outside its inboundHours, before the call "
        "hangs up; default: a short 'we are closed' message.",
    )


class PhoneNumberUpdate(UpdateModel):
    """Fields to change; the number itself cannot change (delete it and add the new one)."""

    not_null = frozenset({"inbound_status", "outbound_status", "closed_message"})

    label: ShortText | None = None
    inbound_status: PhoneNumberStatus | None = None
    outbound_status: PhoneNumberStatus | None = None
    closed_message: ClosedMessage | None = None


@resource.get("/phone-numbers", summary="List phone numbers", response=Page[PhoneNumber], query=PageQuery)
async def list_phone_numbers(call: ApiCall) -> Page[PhoneNumber]:
    """The organization's numbers, newest first."""
    query = call.query_as(PageQuery)
    async with call.tenant() as db:
        rows = await phone_numbers.list_phone_numbers_page(
            db, organization_id=call.caller.organization_id, limit=query.fetch_limit, before=query.position()
        )
    return to_page(Page[PhoneNumber], rows, query)


@resource.post(
    "/phone-numbers", summary="Add a phone number", response=PhoneNumber, body=PhoneNumberCreate, errors=(409,)
)
async def create_phone_number(call: ApiCall) -> PhoneNumber:
    """Add a number; 409 if any organization already has it."""
    body = call.body_as(PhoneNumberCreate)
    try:
        number = e164(body.phone_number)
    except InvalidPhoneNumber as exc:
        raise unprocessable(str(exc), "phoneNumber") from None
    async with call.tenant() as db:
        return await phone_numbers.create_phone_number(
            db,
            organization_id=call.caller.organization_id,
            phone_number=number,
            label=body.label,
            inbound_status=body.inbound_status,
            outbound_status=body.outbound_status,
            closed_message=body.closed_message,
        )


@resource.get("/phone-numbers/{phoneNumberId}", summary="Get a phone number", response=PhoneNumber)
async def get_phone_number(call: ApiCall) -> PhoneNumber:
    """One number."""
    async with call.tenant() as db:
        return await phone_numbers.get_phone_number(
            db, organization_id=call.caller.organization_id, phone_number_id=call.path["phoneNumberId"]
        )


@resource.patch(
    "/phone-numbers/{phoneNumberId}", summary="Update a phone number", response=PhoneNumber, body=PhoneNumberUpdate
)
async def update_phone_number(call: ApiCall) -> PhoneNumber:
    """Change a number's label or closed message, or switch it on or off for inbound or outbound calls."""
    changes = call.body_as(PhoneNumberUpdate).changes()
    async with call.tenant() as db:
        return await phone_numbers.update_phone_number(
            db, organization_id=call.caller.organization_id, phone_number_id=call.path["phoneNumberId"], changes=changes
        )


@resource.delete("/phone-numbers/{phoneNumberId}", summary="Delete a phone number")
async def delete_phone_number(call: ApiCall) -> None:
    """Remove a number; agents using it are left without one."""
    async with call.tenant() as db:
        await phone_numbers.delete_phone_number(
            db, organization_id=call.caller.organization_id, phone_number_id=call.path["phoneNumberId"]
        )
