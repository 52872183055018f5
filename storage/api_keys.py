"""API keys: issued once in plaintext, stored only as a SHA-256 hash, checked on every API request."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import Field

from storage.enums import ApiKeyStatus, UserRole, UserStatus
from storage.errors import NotFound, translate_errors
from storage.records import Queryable, Record, fetch_page, new_id

LIVE_PREFIX = "sk_live_"
TEST_PREFIX = "sk_test_"
DISPLAY_PREFIX_LENGTH = 12

# A prefix, then secrets.token_urlsafe(32): 32 random bytes as 43 characters of unpadded urlsafe base64.
_KEY_FORMAT = re.compile(r"sk_(?:live|test)_[A-Za-z0-9_-]{43}")
_COLUMNS = (
    '"id", "organizationId", "userId", "name", "key", "keyPrefix", "expirationDate", "status", "lastUsedAt", '
    '"createdAt", "updatedAt"'
)
_COLUMNS_OF_K = ", ".join(f"k.{column}" for column in _COLUMNS.split(", "))


class ApiKey(Record):
    """An API key as stored: its hash (never shown), a display prefix, and whether it may be used."""

    id: str
    organization_id: str
    user_id: str
    name: str
    key: str = Field(repr=False)
    key_prefix: str
    expiration_date: datetime | None
    status: ApiKeyStatus
    last_used_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @property
    def live(self) -> bool:
        """Whether this is a live key (sk_live_) rather than a test key (sk_test_)."""
        return self.key_prefix.startswith(LIVE_PREFIX)


@dataclass(frozen=True, slots=True)
class CreatedApiKey:
    """A key just created: its record and the plaintext, which is returned this once and never again."""

    api_key: ApiKey
    plaintext: str = field(repr=False)


def hash_key(plaintext: str) -> str:
    """The stored form of a key: SHA-256, hex."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


async def create_api_key(
    db: Queryable,
    *,
    organization_id: str,
    user_id: str,
    name: str,
    live: bool,
    expiration_date: datetime | None = None,
    id: str | None = None,
) -> CreatedApiKey:
    """Issue a new key for an organization; the plaintext is in the result and nowhere else."""
    plaintext = (LIVE_PREFIX if live else TEST_PREFIX) + secrets.token_urlsafe(32)
    with translate_errors(hide_values=frozenset({"key"})):
        row = await db.fetchrow(
            f"""
            INSERT INTO "ApiKey" ("id", "organizationId", "userId", "name", "key", "keyPrefix", "expirationDate")
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            RETURNING {_COLUMNS}
            """,
            id or new_id(),
            organization_id,
            user_id,
            name,
            hash_key(plaintext),
            plaintext[:DISPLAY_PREFIX_LENGTH],
            expiration_date,
        )
    assert row is not None
    return CreatedApiKey(api_key=ApiKey.from_row(row), plaintext=plaintext)


async def authenticate(db: Queryable, *, plaintext: str, now: datetime) -> ApiKey | None:
    """The active, unexpired key of an ACTIVE user matching `plaintext`, with its use at `now` recorded; else None.

    Unscoped by design: the key is what tells which organization is calling.
    """
    if not _KEY_FORMAT.fullmatch(plaintext):
        return None
    row = await db.fetchrow(
        f"""
        UPDATE "ApiKey" k SET "lastUsedAt" = $2
        WHERE "key" = $1 AND "status" = 'ACTIVE' AND ("expirationDate" IS NULL OR "expirationDate" > $2)
          AND EXISTS (SELECT 1 FROM "User" u WHERE u."id" = k."userId" AND u."status" = 'ACTIVE')
        RETURNING {_COLUMNS}
        """,
        hash_key(plaintext),
        now,
    )
    return ApiKey.from_row(row) if row is not None else None


async def get_api_key(db: Queryable, *, organization_id: str, key_id: str) -> ApiKey:
    """One of the organization's keys; NotFound if it has no key with that id."""
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "ApiKey" WHERE "organizationId" = $1 AND "id" = $2', organization_id, key_id
    )
    if row is None:
        raise NotFound("ApiKey", key_id)
    return ApiKey.from_row(row)


async def list_api_keys(db: Queryable, *, organization_id: str) -> list[ApiKey]:
    """The organization's keys, revoked ones included, oldest first."""
    rows = await db.fetch(
        f'SELECT {_COLUMNS} FROM "ApiKey" WHERE "organizationId" = $1 ORDER BY "createdAt", "id"', organization_id
    )
    return ApiKey.from_rows(rows)


async def revoke_api_key(db: Queryable, *, organization_id: str, key_id: str) -> ApiKey:
    """Revoke one of the organization's keys for good (revoking twice is harmless); NotFound if not its key."""
    row = await db.fetchrow(
        f"""
        UPDATE "ApiKey" SET "status" = 'REVOKED'
        WHERE "organizationId" = $1 AND "id" = $2
        RETURNING {_COLUMNS}
        """,
        organization_id,
        key_id,
    )
    if row is None:
        raise NotFound("ApiKey", key_id)
    return ApiKey.from_row(row)


class ApiKeyHolder(Record):
    """An accepted key with its user's account status and role in the key's organization (None if not a member)."""

    api_key: ApiKey
    member_role: UserRole | None
    user_status: UserStatus

    @property
    def usable(self) -> bool:
        """Whether the key may be used: its user is an ACTIVE member of the key's organization."""
        return self.member_role is not None and self.user_status is UserStatus.ACTIVE


async def authenticate_holder(
    db: Queryable, *, plaintext: str, now: datetime, touch_interval: timedelta
) -> ApiKeyHolder | None:
    """The active, unexpired key matching `plaintext`, its user's account status and role in the key's organization.

    None for an unknown, revoked or expired key. lastUsedAt moves to `now` only when the key is usable (see
    `ApiKeyHolder.usable`) and it is older than `touch_interval`, so a busy key is not rewritten on every request.
    Unscoped by design, like `authenticate`: the key is what tells which organization is calling.
    """
    if not _KEY_FORMAT.fullmatch(plaintext):
        return None
    key_hash = hash_key(plaintext)
    holders = await authenticate_holders(db, key_hashes=[key_hash], now=now, touch_interval=touch_interval)
    return holders.get(key_hash)


async def authenticate_holders(
    db: Queryable, *, key_hashes: Sequence[str], now: datetime, touch_interval: timedelta
) -> dict[str, ApiKeyHolder]:
    """`authenticate_holder` for many keys in one statement, given by their stored form (`hash_key`): the holder of
    each key still accepted, by that form; a key unknown, revoked or expired is absent."""
    rows = await db.fetch(
        f"""
        WITH found AS (
            SELECT {_COLUMNS_OF_K}, m."role" AS "memberRole", u."status" AS "userStatus"
            FROM "ApiKey" k
            JOIN "User" u ON u."id" = k."userId"
            LEFT JOIN "UserOrganization" m ON m."userId" = k."userId" AND m."organizationId" = k."organizationId"
            WHERE k."key" = ANY($1::text[]) AND k."status" = 'ACTIVE'
              AND (k."expirationDate" IS NULL OR k."expirationDate" > $2)
        ), touched AS (
            UPDATE "ApiKey" k SET "lastUsedAt" = $2
            FROM found
            WHERE k."id" = found."id" AND found."memberRole" IS NOT NULL AND found."userStatus" = 'ACTIVE'
              AND (found."lastUsedAt" IS NULL OR found."lastUsedAt" <= $2 - $3::interval)
        )
        SELECT * FROM found
        """,
        list(key_hashes),
        now,
        touch_interval,
    )
    return {
        row["key"]: ApiKeyHolder(
            api_key=ApiKey.from_row(row), member_role=row["memberRole"], user_status=UserStatus(row["userStatus"])
        )
        for row in rows
    }


async def list_api_keys_page(
    db: Queryable, *, organization_id: str, limit: int, before: tuple[datetime, str] | None = None
) -> list[ApiKey]:
    """A page of the organization's keys, revoked ones included, newest first, after the (createdAt, id) `before`."""
    rows = await fetch_page(
        db, table="ApiKey", columns=_COLUMNS, organization_id=organization_id, limit=limit, before=before
    )
    return ApiKey.from_rows(rows)
