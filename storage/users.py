"""Users and their memberships of organizations; passwords kept only as argon2 hashes."""

from __future__ import annotations

import asyncio
import functools
import secrets
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import Field

from storage.enums import UserRole, UserStatus
from storage.errors import NotFound, translate_errors
from storage.records import Queryable, Record, new_id

_USER_COLUMNS = (
    '"id", "email", "firstName", "lastName", "phone", "timeZone", "password", "avatar", "role", "status", '
    '"twoFactorEnabled", "twoFactorSecret", "createdAt", "updatedAt"'
)
_MEMBERSHIP_COLUMNS = '"userId", "organizationId", "role", "createdAt", "updatedAt"'

_hasher = PasswordHasher()


class User(Record):
    """A person who signs in to the platform; secrets stay out of repr."""

    id: str
    email: str
    first_name: str | None
    last_name: str | None
    phone: str | None
    time_zone: str
    password: str | None = Field(repr=False)
    avatar: str | None
    role: UserRole
    status: UserStatus
    two_factor_enabled: bool
    two_factor_secret: str | None = Field(repr=False)
    created_at: datetime
    updated_at: datetime


class Membership(Record):
    """A user's place in one organization, with the role they hold there."""

    user_id: str
    organization_id: str
    role: UserRole
    created_at: datetime
    updated_at: datetime


def normalize_email(email: str) -> str:
    """The stored form of an email address: trimmed and lower-cased."""
    normalized = email.strip().lower()
    local, at, domain = normalized.partition("@")
    if not (local and at and domain):
        raise ValueError(f"not an email address: {email!r}")
    return normalized


async def hash_password(password: str) -> str:
    """The argon2 hash of a password, computed off the event loop."""
    return await asyncio.to_thread(_hasher.hash, password)


async def create_user(
    db: Queryable,
    *,
    email: str,
    password: str | None = None,
    first_name: str | None = None,
    last_name: str | None = None,
    phone: str | None = None,
    time_zone: str = "UTC",
    avatar: str | None = None,
    role: UserRole = UserRole.VIEWER,
    status: UserStatus = UserStatus.PENDING,
    two_factor_enabled: bool = False,
    two_factor_secret: str | None = None,
    id: str | None = None,
) -> User:
    """Create a user (the password is stored hashed); AlreadyExists with field "email" if it is taken."""
    password_hash = await hash_password(password) if password is not None else None
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "User" ("id", "email", "firstName", "lastName", "phone", "timeZone", "password",
                                "avatar", "role", "status", "twoFactorEnabled", "twoFactorSecret")
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
            RETURNING {_USER_COLUMNS}
            """,
            id or new_id(),
            normalize_email(email),
            first_name,
            last_name,
            phone,
            time_zone,
            password_hash,
            avatar,
            role,
            status,
            two_factor_enabled,
            two_factor_secret,
        )
    assert row is not None
    return User.from_row(row)


async def get_user(db: Queryable, *, user_id: str) -> User:
    """The user with that id; NotFound if there is none."""
    row = await db.fetchrow(f'SELECT {_USER_COLUMNS} FROM "User" WHERE "id" = $1', user_id)
    if row is None:
        raise NotFound("User", user_id)
    return User.from_row(row)


async def get_user_by_email(db: Queryable, *, email: str) -> User | None:
    """The user with that email address, whatever its case, or None."""
    try:
        normalized = normalize_email(email)
    except ValueError:
        return None
    row = await db.fetchrow(f'SELECT {_USER_COLUMNS} FROM "User" WHERE "email" = $1', normalized)
    return User.from_row(row) if row is not None else None


async def set_password(db: Queryable, *, user_id: str, password: str) -> User:
    """Replace a user's password (stored hashed)."""
    password_hash = await hash_password(password)
    row = await db.fetchrow(
        f'UPDATE "User" SET "password" = $2 WHERE "id" = $1 RETURNING {_USER_COLUMNS}', user_id, password_hash
    )
    if row is None:
        raise NotFound("User", user_id)
    return User.from_row(row)


async def verify_password(db: Queryable, *, email: str, password: str) -> User | None:
    """The user if the email and password match, else None; as slow for an unknown email as for a wrong password.

    A hash made with older argon2 parameters is upgraded on a successful check.
    """
    user = await get_user_by_email(db, email=email)
    matches = await asyncio.to_thread(_check, user.password if user is not None else None, password)
    if not matches or user is None or user.password is None:
        return None
    if not _hasher.check_needs_rehash(user.password):
        return user
    # Compare-and-set: a password changed meanwhile is left alone.
    row = await db.fetchrow(
        f'UPDATE "User" SET "password" = $3 WHERE "id" = $1 AND "password" = $2 RETURNING {_USER_COLUMNS}',
        user.id,
        user.password,
        await hash_password(password),
    )
    return User.from_row(row) if row is not None else user


async def delete_user(db: Queryable, *, user_id: str) -> None:
    """Delete a user, with their memberships and API keys (the schema cascades)."""
    with translate_errors():
        deleted = await db.fetchval('DELETE FROM "User" WHERE "id" = $1 RETURNING "id"', user_id)
    if deleted is None:
        raise NotFound("User", user_id)


async def add_member(
    db: Queryable, *, user_id: str, organization_id: str, role: UserRole = UserRole.VIEWER
) -> Membership:
    """Make a user a member of an organization; AlreadyExists if they are one, InvalidReference if either is unknown."""
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "UserOrganization" ("userId", "organizationId", "role")
            VALUES ($1, $2, $3)
            RETURNING {_MEMBERSHIP_COLUMNS}
            """,
            user_id,
            organization_id,
            role,
        )
    assert row is not None
    return Membership.from_row(row)


async def find_membership(db: Queryable, *, organization_id: str, user_id: str) -> Membership | None:
    """The user's membership of that organization, or None if they are not a member."""
    row = await db.fetchrow(
        f'SELECT {_MEMBERSHIP_COLUMNS} FROM "UserOrganization" WHERE "organizationId" = $1 AND "userId" = $2',
        organization_id,
        user_id,
    )
    return Membership.from_row(row) if row is not None else None


async def list_members(db: Queryable, *, organization_id: str) -> list[Membership]:
    """Every membership of an organization, oldest first."""
    rows = await db.fetch(
        f"""
        SELECT {_MEMBERSHIP_COLUMNS} FROM "UserOrganization"
        WHERE "organizationId" = $1
        ORDER BY "createdAt", "userId"
        """,
        organization_id,
    )
    return Membership.from_rows(rows)


async def list_memberships(db: Queryable, *, user_id: str) -> list[Membership]:
    """Every organization a user belongs to, as memberships, oldest first."""
    rows = await db.fetch(
        f"""
        SELECT {_MEMBERSHIP_COLUMNS} FROM "UserOrganization"
        WHERE "userId" = $1
        ORDER BY "createdAt", "organizationId"
        """,
        user_id,
    )
    return Membership.from_rows(rows)


def _check(password_hash: str | None, password: str) -> bool:
    """Whether the password matches the hash; with no hash, spend the same work and answer False."""
    try:
        return _hasher.verify(password_hash or _decoy_hash(), password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def _decoy_hash() -> str:
    # Checked against when the email is unknown, so a miss costs the same time as a wrong password.
    return _hasher.hash(secrets.token_urlsafe(16))
