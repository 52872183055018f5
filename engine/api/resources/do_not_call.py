"""/v1/do-not-call: the organization's do-not-call list. No campaign and no /v1/calls request dials a number on it."""

from __future__ import annotations

import asyncio
from typing import Annotated

from pydantic import Field, StringConstraints

from config.phone import InvalidPhoneNumber, e164
from engine.api.errors import unprocessable
from engine.api.models import Region, RequestModel, ResponseModel, ShortText
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from engine.campaigns.recipients_csv import RecipientsFileError
from engine.do_not_call.csv_import import read_do_not_call
from storage import campaigns, do_not_call
from storage.do_not_call import DoNotCallEntry, DoNotCallSource, SkippedRecipient

resource = Resource(
    "Do not call",
    "The organization's do-not-call list: numbers (E.164) no campaign dials and /v1/calls refuses. Callees who ask "
    "not to be called again land here by themselves (sources OPT_OUT_MODEL and OPT_OUT_PHRASE).",
)

Reason = Annotated[str, StringConstraints(max_length=500, pattern=r"^[^\x00]*$")]


class DoNotCallQuery(PageQuery):
    """A page of the list, newest first; `phoneNumber` finds one number's entry."""

    phone_number: ShortText | None = Field(None, description="Only this number's entry (any written form).")


class DoNotCallCreate(RequestModel):
    """A number never to call, and why."""

    phone_number: ShortText = Field(description="In international form (stored as E.164).")
    reason: Reason | None = None


class DoNotCallImport(RequestModel):
    """CSV text: the `phoneNumber` column (or the first column; a header row is optional), an optional `reason`."""

    csv: Annotated[str, StringConstraints(max_length=5_000_000)]
    reason: Reason | None = Field(None, description="For rows without a reason of their own.")
    default_region: Region | None = Field(None, description="Region (e.g. US) for numbers without a +country code.")


class InvalidLine(ResponseModel):
    """A line of the import that was not listed."""

    line: int
    value: str
    reason: str


class DoNotCallImportResult(ResponseModel):
    """What an import did: numbers newly listed, already listed (left as they were), and lines refused."""

    rows: int
    added: int
    already_listed: int
    duplicates: int
    invalid: int
    invalid_lines: list[InvalidLine] = Field(description="Line by line, the first 1,000 refused.")


def _number(given: str, field: str) -> str:
    try:
        return e164(given)
    except InvalidPhoneNumber as exc:
        raise unprocessable(str(exc), field) from None


@resource.get("/do-not-call", summary="List the do-not-call list", response=Page[DoNotCallEntry], query=DoNotCallQuery)
async def list_do_not_call(call: ApiCall) -> Page[DoNotCallEntry]:
    """The organization's entries, newest first, each with its reason, source and (for opt-outs) its CallLog."""
    query = call.query_as(DoNotCallQuery)
    number = _number(query.phone_number, "phoneNumber") if query.phone_number is not None else None
    async with call.tenant() as db:
        rows = await do_not_call.list_entries(
            db,
            organization_id=call.caller.organization_id,
            limit=query.fetch_limit,
            before=query.position(),
            phone_number=number,
        )
    return to_page(Page[DoNotCallEntry], rows, query)


@resource.post(
    "/do-not-call", summary="Add a number to the do-not-call list", response=DoNotCallEntry, body=DoNotCallCreate
)
async def add_do_not_call(call: ApiCall) -> DoNotCallEntry:
    """List a number; a number already listed keeps its entry, which is returned. 422 if it is not a phone number."""
    body = call.body_as(DoNotCallCreate)
    number = _number(body.phone_number, "phoneNumber")
    async with call.tenant() as db:
        entry, _ = await do_not_call.add_entry(
            db,
            organization_id=call.caller.organization_id,
            phone_number=number,
            source=DoNotCallSource.API,
            reason=body.reason,
        )
    return entry


@resource.get("/do-not-call/{entryId}", summary="Get a do-not-call entry", response=DoNotCallEntry)
async def get_do_not_call(call: ApiCall) -> DoNotCallEntry:
    """One entry of the organization's list."""
    async with call.tenant() as db:
        return await do_not_call.get_entry(
            db, organization_id=call.caller.organization_id, entry_id=call.path["entryId"]
        )


@resource.delete("/do-not-call/{entryId}", summary="Remove a number from the do-not-call list")
async def remove_do_not_call(call: ApiCall) -> None:
    """Take the entry off the list: campaigns and calls may dial the number again."""
    async with call.tenant() as db:
        await do_not_call.remove_entry(db, organization_id=call.caller.organization_id, entry_id=call.path["entryId"])


@resource.post(
    "/do-not-call/import",
    summary="Import numbers to the do-not-call list from CSV",
    response=DoNotCallImportResult,
    body=DoNotCallImport,
    status=200,
)
async def import_do_not_call(call: ApiCall) -> DoNotCallImportResult:
    """List every valid number of the CSV text; invalid lines come back with their line number and reason.

    Idempotent: numbers already listed are counted in `alreadyListed` and keep their entry. 422 at `csv` for text
    that is not CSV the importer reads (a field past 131,072 characters), naming the line.
    """
    body = call.body_as(DoNotCallImport)
    try:
        # CPU work (every number read): off the event loop the calls share.
        parsed = await asyncio.to_thread(
            read_do_not_call, body.csv, default_region=body.default_region, reason=body.reason
        )
    except RecipientsFileError as exc:
        raise unprocessable(str(exc), "csv") from None
    async with call.tenant() as db:
        added = await do_not_call.add_entries(
            db, organization_id=call.caller.organization_id, numbers=parsed.numbers, source=DoNotCallSource.CSV_IMPORT
        )
    return DoNotCallImportResult(
        rows=parsed.rows,
        added=added,
        already_listed=len(parsed.numbers) - added,
        duplicates=parsed.duplicates,
        invalid=parsed.invalid,
        invalid_lines=[InvalidLine(line=p.line, value=p.value, reason=p.reason) for p in parsed.problems],
    )


@resource.get(
    "/campaigns/{campaignId}/do-not-call",
    summary="List a campaign's recipients skipped as do not call",
    response=Page[SkippedRecipient],
    query=PageQuery,
)
async def list_skipped_recipients(call: ApiCall) -> Page[SkippedRecipient]:
    """The campaign's recipients never dialed because their number is on the list (state DO_NOT_CALL), and why."""
    query = call.query_as(PageQuery)
    organization_id, campaign_id = call.caller.organization_id, call.path["campaignId"]
    async with call.tenant() as db:
        await campaigns.get_campaign(db, organization_id=organization_id, campaign_id=campaign_id)
        rows = await do_not_call.skipped_recipients(
            db,
            organization_id=organization_id,
            campaign_id=campaign_id,
            limit=query.fetch_limit,
            before=query.position(),
        )
    return to_page(Page[SkippedRecipient], rows, query, lambda row: (row.skipped_at, row.recipient_id))
