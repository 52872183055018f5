"""Phone numbers an organization owns, stored in E.164, each switched on or off per direction."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic.alias_generators import to_camel

from config.phone import InvalidPhoneNumber, e164
from storage.enums import PhoneNumberStatus
from storage.errors import NotFound, translate_errors
from storage.records import Queryable, Record, fetch_page, new_id

_StatusColumn = Literal["inboundStatus", "outboundStatus"]
_COLUMNS = (
    '"id", "organizationId", "label", "phoneNumber", "inboundStatus", "outboundStatus", "closedMessage", '
    '"createdAt", "updatedAt"'
)


class PhoneNumber(Record):
    """A number that rings an organization's agents, and which ways it may be used."""

    id: str
    organization_id: str
    label: str | None
    phone_number: str
    inbound_status: PhoneNumberStatus
    outbound_status: PhoneNumberStatus
    closed_message: str
    """What callers hear when every agent on the number is outside its hours (then the call hangs up)."""
    created_at: datetime
    updated_at: datetime


async def create_phone_number(
    db: Queryable,
    *,
    organization_id: str,
    phone_number: str,
    label: str | None = None,
    inbound_status: PhoneNumberStatus = PhoneNumberStatus.ENABLED,
    outbound_status: PhoneNumberStatus = PhoneNumberStatus.ENABLED,
    closed_message: str | None = None,
    id: str | None = None,
) -> PhoneNumber:
    """Add a number to an organization, normalised to E.164 (InvalidPhoneNumber if it is not one, see config.phone).

    AlreadyExists if any organization has it. Without `closed_message`, the column's default message.
    """
    values: list[Any] = [id or new_id(), organization_id, label, e164(phone_number), inbound_status, outbound_status]
    # The column's DEFAULT (migration 0014) is the one home of the default message: name the column only if given.
    closed = ', "closedMessage"' if closed_message is not None else ""
    if closed_message is not None:
        values.append(closed_message)
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "PhoneNumber"
                ("id", "organizationId", "label", "phoneNumber", "inboundStatus", "outboundStatus"{closed})
            VALUES ({", ".join(f"${n}" for n in range(1, len(values) + 1))})
            RETURNING {_COLUMNS}
            """,
            *values,
        )
    assert row is not None
    return PhoneNumber.from_row(row)


async def find_by_number(db: Queryable, *, number: str) -> PhoneNumber | None:
    """The number record for a dialed number, whichever organization owns it, or None.

    Unscoped by design: an inbound call names only the number, and the number tells the organization.
    Text that is not a phone number (a SIP URI, a client name) matches nothing.
    """
    try:
        normalized = e164(number)
    except InvalidPhoneNumber:
        return None
    row = await db.fetchrow(f'SELECT {_COLUMNS} FROM "PhoneNumber" WHERE "phoneNumber" = $1', normalized)
    return PhoneNumber.from_row(row) if row is not None else None


async def default_caller_id(db: Queryable, *, organization_id: str, agent_id: str) -> str | None:
    """The number the agent's calls come from when none is given (E.164), or None if the organization has none.

    The agent's own number when outbound calls are ENABLED on it, else the organization's first number that has
    them ENABLED (oldest first, then by id). The rule lives in SQL (migration 0024, `dialtone_default_caller_id`),
    where the campaign dispatcher's claim query uses it too.
    """
    number: str | None = await db.fetchval("SELECT dialtone_default_caller_id($1, $2)", organization_id, agent_id)
    return number


async def get_phone_number(db: Queryable, *, organization_id: str, phone_number_id: str) -> PhoneNumber:
    """One of the organization's numbers; NotFound if it has none with that id."""
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "PhoneNumber" WHERE "organizationId" = $1 AND "id" = $2',
        organization_id,
        phone_number_id,
    )
    if row is None:
        raise NotFound("PhoneNumber", phone_number_id)
    return PhoneNumber.from_row(row)


async def list_phone_numbers(db: Queryable, *, organization_id: str) -> list[PhoneNumber]:
    """The organization's numbers, in number order."""
    rows = await db.fetch(
        f'SELECT {_COLUMNS} FROM "PhoneNumber" WHERE "organizationId" = $1 ORDER BY "phoneNumber"', organization_id
    )
    return PhoneNumber.from_rows(rows)


async def set_inbound_status(
    db: Queryable, *, organization_id: str, phone_number_id: str, status: PhoneNumberStatus
) -> PhoneNumber:
    """Switch whether the number answers incoming calls."""
    return await _set_status(db, "inboundStatus", organization_id, phone_number_id, status)


async def set_outbound_status(
    db: Queryable, *, organization_id: str, phone_number_id: str, status: PhoneNumberStatus
) -> PhoneNumber:
    """Switch whether the number may place outgoing calls."""
    return await _set_status(db, "outboundStatus", organization_id, phone_number_id, status)


async def delete_phone_number(db: Queryable, *, organization_id: str, phone_number_id: str) -> None:
    """Remove one of the organization's numbers (agents using it are left without one)."""
    with translate_errors():
        deleted = await db.fetchval(
            'DELETE FROM "PhoneNumber" WHERE "organizationId" = $1 AND "id" = $2 RETURNING "id"',
            organization_id,
            phone_number_id,
        )
    if deleted is None:
        raise NotFound("PhoneNumber", phone_number_id)


async def _set_status(
    db: Queryable, column: _StatusColumn, organization_id: str, phone_number_id: str, status: PhoneNumberStatus
) -> PhoneNumber:
    row = await db.fetchrow(
        f"""
        UPDATE "PhoneNumber" SET "{column}" = $3
        WHERE "organizationId" = $1 AND "id" = $2
        RETURNING {_COLUMNS}
        """,
        organization_id,
        phone_number_id,
        status,
    )
    if row is None:
        raise NotFound("PhoneNumber", phone_number_id)
    return PhoneNumber.from_row(row)


async def list_phone_numbers_page(
    db: Queryable, *, organization_id: str, limit: int, before: tuple[datetime, str] | None = None
) -> list[PhoneNumber]:
    """A page of the organization's numbers, newest first, after the (createdAt, id) `before`."""
    rows = await fetch_page(
        db, table="PhoneNumber", columns=_COLUMNS, organization_id=organization_id, limit=limit, before=before
    )
    return PhoneNumber.from_rows(rows)


async def update_phone_number(
    db: Queryable, *, organization_id: str, phone_number_id: str, changes: dict[str, Any]
) -> PhoneNumber:
    """Change a number's label, per-direction statuses or closed message (snake_case names); NotFound if not the
    organization's."""
    unknown = set(changes) - {"label", "inbound_status", "outbound_status", "closed_message"}
    if unknown:
        raise ValueError(f"PhoneNumber fields that cannot be changed: {', '.join(sorted(unknown))}")
    if not changes:
        return await get_phone_number(db, organization_id=organization_id, phone_number_id=phone_number_id)
    args: list[Any] = [organization_id, phone_number_id]
    assignments = []
    for name, value in changes.items():
        args.append(value)
        assignments.append(f'"{to_camel(name)}" = ${len(args)}')
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "PhoneNumber" SET {", ".join(assignments)}
            WHERE "organizationId" = $1 AND "id" = $2
            RETURNING {_COLUMNS}
            """,
            *args,
        )
    if row is None:
        raise NotFound("PhoneNumber", phone_number_id)
    return PhoneNumber.from_row(row)
