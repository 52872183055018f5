"""Organizations, the tenants: creation, lookup and the credit balance that pays for calls.

Every credit change is one UPDATE statement, so concurrent calls can never spend the same credit twice, and the
schema holds every balance at zero or above. Calls pay through storage.credit_reservations.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from storage.enums import Plan
from storage.errors import ConstraintViolation, NotFound, StorageError, translate_errors
from storage.records import Queryable, Record, new_id

_COLUMNS = '"id", "name", "slug", "plan", "credits", "createdAt", "updatedAt"'


class Organization(Record):
    """A tenant: every agent, number, call and key belongs to one."""

    id: str
    name: str
    slug: str
    plan: Plan
    credits: int
    created_at: datetime
    updated_at: datetime


class InsufficientCredits(StorageError):
    """The organization's balance does not cover a charge; nothing was charged."""

    def __init__(self, organization_id: str, balance: int, amount: int) -> None:
        super().__init__(
            f"Organization {organization_id} has {balance} credits, not enough for a charge of {amount}; "
            "add credits and try again"
        )
        self.organization_id = organization_id
        self.balance = balance
        self.amount = amount


async def create_organization(
    db: Queryable,
    *,
    name: str,
    slug: str,
    plan: Plan = Plan.FREE,
    credits: int = 0,
    id: str | None = None,
) -> Organization:
    """Create an organization; AlreadyExists when the slug is taken."""
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "Organization" ("id", "name", "slug", "plan", "credits")
            VALUES ($1, $2, $3, $4, $5)
            RETURNING {_COLUMNS}
            """,
            id or new_id(),
            name,
            slug,
            plan,
            credits,
        )
    assert row is not None
    return Organization.from_row(row)


async def get_organization(db: Queryable, *, organization_id: str) -> Organization:
    """The organization with that id; NotFound if there is none."""
    row = await db.fetchrow(f'SELECT {_COLUMNS} FROM "Organization" WHERE "id" = $1', organization_id)
    if row is None:
        raise NotFound("Organization", organization_id)
    return Organization.from_row(row)


async def get_organization_by_slug(db: Queryable, *, slug: str) -> Organization | None:
    """The organization with that slug, or None."""
    row = await db.fetchrow(f'SELECT {_COLUMNS} FROM "Organization" WHERE "slug" = $1', slug)
    return Organization.from_row(row) if row is not None else None


async def delete_organization(db: Queryable, *, organization_id: str) -> None:
    """Delete an organization and, through the schema's cascades, everything it owns."""
    with translate_errors():
        deleted = await db.fetchval('DELETE FROM "Organization" WHERE "id" = $1 RETURNING "id"', organization_id)
    if deleted is None:
        raise NotFound("Organization", organization_id)


async def add_credits(db: Queryable, *, organization_id: str, amount: int) -> int:
    """Add `amount` (> 0) credits; return the new balance."""
    if amount <= 0:
        raise ValueError(f"credits to add must be positive, got {amount}")
    balance = await _update_credits(
        db,
        'UPDATE "Organization" SET "credits" = "credits" + $2 WHERE "id" = $1 RETURNING "credits"',
        organization_id,
        amount,
    )
    if balance is None:
        raise NotFound("Organization", organization_id)
    return balance


async def charge_credits(db: Queryable, *, organization_id: str, amount: int) -> int:
    """Take `amount` (> 0) credits only if the balance covers it; return the new balance.

    Raises InsufficientCredits (and charges nothing) when it does not.
    """
    if amount <= 0:
        raise ValueError(f"credits to charge must be positive, got {amount}")
    balance = await _update_credits(
        db,
        """
        UPDATE "Organization" SET "credits" = "credits" - $2
        WHERE "id" = $1 AND "credits" >= $2
        RETURNING "credits"
        """,
        organization_id,
        amount,
    )
    if balance is not None:
        return balance
    raise await shortfall(db, organization_id=organization_id, amount=amount)


async def shortfall(db: Queryable, *, organization_id: str, amount: int) -> InsufficientCredits:
    """Why a conditional charge of `amount` did not apply: the balance it found short (NotFound: no organization)."""
    current = await db.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', organization_id)
    if current is None:
        raise NotFound("Organization", organization_id)
    return InsufficientCredits(organization_id, current, amount)


async def _update_credits(db: Queryable, sql: str, organization_id: str, amount: int) -> int | None:
    try:
        balance: int | None = await db.fetchval(sql, organization_id, amount)
    except asyncpg.NumericValueOutOfRangeError as exc:
        raise ConstraintViolation(
            f"Organization {organization_id}: a change of {amount} credits is out of range"
        ) from exc
    return balance


async def update_organization(db: Queryable, *, organization_id: str, changes: dict[str, Any]) -> Organization:
    """Rename an organization or change its slug (snake_case names); AlreadyExists when the slug is taken."""
    unknown = set(changes) - {"name", "slug"}
    if unknown:
        raise ValueError(f"Organization fields that cannot be changed here: {', '.join(sorted(unknown))}")
    if not changes:
        return await get_organization(db, organization_id=organization_id)
    args: list[Any] = [organization_id]
    assignments = []
    for name, value in changes.items():
        args.append(value)
        assignments.append(f'"{name}" = ${len(args)}')
    with translate_errors():
        row = await db.fetchrow(
            f'UPDATE "Organization" SET {", ".join(assignments)} WHERE "id" = $1 RETURNING {_COLUMNS}', *args
        )
    if row is None:
        raise NotFound("Organization", organization_id)
    return Organization.from_row(row)
