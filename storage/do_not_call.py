"""The organization's do-not-call list: E.164 numbers never dialed, each with its reason and where it came from.

One rule, one home: `_entry_of` is the SQL match "this organization's entry for this number". The campaign claim
and the last check before a dial (storage/campaign_dispatch.py, through `listed_reason`) and `listed_entry`, which
`place_call` asks before any call, all use it, so a listed number is refused the same way whoever dials. Numbers
go through config.phone.e164 on the way in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from config.phone import InvalidPhoneNumber, e164
from storage.errors import NotFound, translate_errors
from storage.records import Queryable, Record, new_id, new_ids

log = logging.getLogger(__name__)

_COLUMNS = '"id", "organizationId", "phoneNumber", "reason", "source", "callLogId", "createdAt"'
MAX_REASON_CHARS = 500


def _entry_of(organization: str, number: str) -> str:
    """The rule: the entry `dnc` of organization `organization` for the E.164 number `number` (SQL expressions)."""
    return f'dnc."organizationId" = {organization} AND dnc."phoneNumber" = {number}'


def listed_reason(organization: str, number: str) -> str:
    """The SQL expression of why the number is listed ("do not call: <reason>"), NULL when it is not."""
    return (
        '(SELECT \'do not call: \' || COALESCE(dnc."reason", lower(dnc."source")) '
        f'FROM "DoNotCallEntry" dnc WHERE {_entry_of(organization, number)})'
    )


class DoNotCallSource(StrEnum):
    """How a number came onto the list."""

    API = "API"
    CSV_IMPORT = "CSV_IMPORT"
    CLI = "CLI"
    OPT_OUT_MODEL = "OPT_OUT_MODEL"
    """The agent's model called the built-in `opt_out` function in a call."""
    OPT_OUT_PHRASE = "OPT_OUT_PHRASE"
    """The offline model heard the callee ask not to be called again."""


class DoNotCallEntry(Record):
    """A number the organization never dials."""

    id: str
    organization_id: str
    phone_number: str
    reason: str | None
    source: DoNotCallSource
    call_log_id: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ListedNumber:
    """A number to add in bulk (a CSV row), already in E.164, with its reason."""

    phone_number: str
    reason: str | None = None


def describe(entry: DoNotCallEntry) -> str:
    """Why a dial to this entry's number is refused, in words an operator reads."""
    return f"{entry.phone_number} is on the organization's do-not-call list ({entry.reason or entry.source.lower()})"


async def add_entry(
    db: Queryable,
    *,
    organization_id: str,
    phone_number: str,
    source: DoNotCallSource,
    reason: str | None = None,
    call_log_id: str | None = None,
) -> tuple[DoNotCallEntry, bool]:
    """List a number (normalized to E.164; InvalidPhoneNumber if it is not one); (entry, True if newly added).

    Idempotent: a number already listed keeps its first entry, returned with False.
    """
    number = e164(phone_number)
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "DoNotCallEntry" ("id", "organizationId", "phoneNumber", "reason", "source", "callLogId")
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT ("organizationId", "phoneNumber") DO NOTHING
            RETURNING {_COLUMNS}
            """,
            new_id(),
            organization_id,
            number,
            _reason(reason),
            source,
            call_log_id,
        )
    if row is not None:
        return DoNotCallEntry.from_row(row), True
    existing = await listed_entry(db, organization_id=organization_id, phone_number=number)
    if existing is None:  # removed between the two statements: list it again
        return await add_entry(
            db,
            organization_id=organization_id,
            phone_number=number,
            source=source,
            reason=reason,
            call_log_id=call_log_id,
        )
    return existing, False


async def add_entries(
    db: Queryable, *, organization_id: str, numbers: Sequence[ListedNumber], source: DoNotCallSource
) -> int:
    """List many E.164 numbers at once (an import); numbers already listed are left as they are. How many were new."""
    if not numbers:
        return 0
    with translate_errors():
        rows = await db.fetch(
            """
            INSERT INTO "DoNotCallEntry" ("id", "organizationId", "phoneNumber", "reason", "source")
            SELECT v.id, $1, v.number, v.reason, $2
            FROM unnest($3::text[], $4::text[], $5::text[]) AS v(id, number, reason)
            ON CONFLICT ("organizationId", "phoneNumber") DO NOTHING
            RETURNING "id"
            """,
            organization_id,
            source,
            new_ids(len(numbers)),
            [n.phone_number for n in numbers],
            [_reason(n.reason) for n in numbers],
        )
    return len(rows)


async def listed_entry(db: Queryable, *, organization_id: str, phone_number: str) -> DoNotCallEntry | None:
    """The organization's entry for a number, or None; text that is not a phone number is never listed."""
    try:
        number = e164(phone_number)
    except InvalidPhoneNumber:
        return None
    row = await db.fetchrow(
        f"""
        SELECT {_COLUMNS} FROM "DoNotCallEntry" dnc WHERE {_entry_of("$1", "$2")}
        """,
        organization_id,
        number,
    )
    return DoNotCallEntry.from_row(row) if row is not None else None


async def get_entry(db: Queryable, *, organization_id: str, entry_id: str) -> DoNotCallEntry:
    """One of the organization's entries; NotFound if it has none with that id."""
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "DoNotCallEntry" WHERE "organizationId" = $1 AND "id" = $2', organization_id, entry_id
    )
    if row is None:
        raise NotFound("DoNotCallEntry", entry_id)
    return DoNotCallEntry.from_row(row)


async def list_entries(
    db: Queryable,
    *,
    organization_id: str,
    limit: int,
    before: tuple[datetime, str] | None = None,
    phone_number: str | None = None,
) -> list[DoNotCallEntry]:
    """A page of the organization's list, newest first; with `phone_number` (E.164), only its entry."""
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "DoNotCallEntry"
        WHERE "organizationId" = $1 AND ($2::timestamptz IS NULL OR ("createdAt", "id") < ($2, $3))
          AND ($4::text IS NULL OR "phoneNumber" = $4)
        ORDER BY "createdAt" DESC, "id" DESC
        LIMIT $5
        """,
        organization_id,
        *(before or (None, None)),
        phone_number,
        limit,
    )
    return DoNotCallEntry.from_rows(rows)


async def remove_entry(db: Queryable, *, organization_id: str, entry_id: str) -> None:
    """Take an entry off the list; NotFound if the organization has none with that id."""
    deleted = await db.fetchval(
        'DELETE FROM "DoNotCallEntry" WHERE "organizationId" = $1 AND "id" = $2 RETURNING "id"',
        organization_id,
        entry_id,
    )
    if deleted is None:
        raise NotFound("DoNotCallEntry", entry_id)


async def remove_number(db: Queryable, *, organization_id: str, phone_number: str) -> None:
    """Take a number off the list (InvalidPhoneNumber if it is not one); NotFound if it is not listed."""
    number = e164(phone_number)
    deleted = await db.fetchval(
        'DELETE FROM "DoNotCallEntry" WHERE "organizationId" = $1 AND "phoneNumber" = $2 RETURNING "id"',
        organization_id,
        number,
    )
    if deleted is None:
        raise NotFound("DoNotCallEntry", number)


async def record_opt_out(
    db: Queryable, *, organization_id: str, call_log_id: str, source: DoNotCallSource, reason: str
) -> DoNotCallEntry | None:
    """List the remote party of a call (the CallLog's phoneNumber: the callee out, the caller in) as opted out.

    None when the call has no dialable remote number (an anonymous caller, a SIP client): nothing to list.
    """
    remote = await db.fetchval(
        'SELECT "phoneNumber" FROM "CallLog" WHERE "organizationId" = $1 AND "id" = $2', organization_id, call_log_id
    )
    if remote is None:
        raise NotFound("CallLog", call_log_id)
    try:
        entry, _ = await add_entry(
            db,
            organization_id=organization_id,
            phone_number=remote,
            source=source,
            reason=reason,
            call_log_id=call_log_id,
        )
    except InvalidPhoneNumber:
        log.info("call %s: an opt-out with no dialable remote number; nothing listed", call_log_id)
        return None
    return entry


def _reason(reason: str | None) -> str | None:
    # A NUL (a CSV line, a model's opt-out arguments) counts as a space: PostgreSQL text cannot hold it.
    text = " ".join((reason or "").replace("\x00", " ").split())[:MAX_REASON_CHARS]
    return text or None


class SkippedRecipient(Record):
    """A campaign recipient never dialed because its number is on the do-not-call list."""

    recipient_id: str
    phone_number: str
    name: str | None
    reason: str | None
    skipped_at: datetime


async def skipped_recipients(
    db: Queryable, *, organization_id: str, campaign_id: str, limit: int, before: tuple[datetime, str] | None = None
) -> list[SkippedRecipient]:
    """A page of the campaign's DO_NOT_CALL recipients, latest skipped first, with the list's reason."""
    rows = await db.fetch(
        """
        SELECT d."recipientId", r."phoneNumber", r."name", d."lastReason" AS "reason", d."updatedAt" AS "skippedAt"
        FROM "CampaignRecipientDispatch" d JOIN "CampaignRecipient" r ON r."id" = d."recipientId"
        WHERE d."organizationId" = $1 AND d."campaignId" = $2 AND d."state" = 'DO_NOT_CALL'
          AND ($3::timestamptz IS NULL OR (d."updatedAt", d."recipientId") < ($3, $4))
        ORDER BY d."updatedAt" DESC, d."recipientId" DESC
        LIMIT $5
        """,
        organization_id,
        campaign_id,
        *(before or (None, None)),
        limit,
    )
    return SkippedRecipient.from_rows(rows)
