"""A user whose account is not ACTIVE cannot use their API keys: refused at the /v1 API's front door, through the
real server and real PostgreSQL, until the account is ACTIVE again."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from storage import api_keys, organizations, users
from storage.enums import UserRole, UserStatus
from tests.test_api_auth import Api, assert_error
from tests.test_api_cli import dialtone


async def member_key(pool: asyncpg.Pool, status: UserStatus, slug: str) -> tuple[str, str, str]:
    """(organization id, user id, plaintext key) of a new OWNER whose account has `status`."""
    org = await organizations.create_organization(pool, name=slug, slug=slug)
    user = await users.create_user(pool, email=f"{slug}@example.com", status=status)
    await users.add_member(pool, user_id=user.id, organization_id=org.id, role=UserRole.OWNER)
    created = await api_keys.create_api_key(pool, organization_id=org.id, user_id=user.id, name="k", live=True)
    return org.id, user.id, created.plaintext


async def test_a_pending_users_key_is_refused_with_the_reason(api: Api, pool: asyncpg.Pool) -> None:
    _, _, key = await member_key(pool, UserStatus.PENDING, "pending-co")
    status, body = await api.call("GET", "/organization", key)
    assert status == 401
    assert_error(body, "unauthorized")
    assert "PENDING" in body["error"]["message"] and "not ACTIVE" in body["error"]["message"]


async def test_a_refused_key_is_not_marked_as_used(api: Api, pool: asyncpg.Pool) -> None:
    _, user_id, key = await member_key(pool, UserStatus.PENDING, "untouched-co")
    await api.call("GET", "/organization", key)
    last_used = await pool.fetchval('SELECT "lastUsedAt" FROM "ApiKey" WHERE "userId" = $1', user_id)
    assert last_used is None


async def test_the_key_works_once_the_account_is_active(api: Api, pool: asyncpg.Pool) -> None:
    org_id, user_id, key = await member_key(pool, UserStatus.PENDING, "activated-co")
    await pool.execute('UPDATE "User" SET "status" = \'ACTIVE\' WHERE "id" = $1', user_id)
    status, body = await api.call("GET", "/organization", key)
    assert status == 200
    assert body["id"] == org_id


async def test_an_active_users_key_stops_working_when_the_account_is_no_longer_active(
    api: Api, pool: asyncpg.Pool
) -> None:
    _, user_id, key = await member_key(pool, UserStatus.ACTIVE, "suspended-co")
    assert (await api.call("GET", "/organization", key))[0] == 200
    await pool.execute('UPDATE "User" SET "status" = \'PENDING\' WHERE "id" = $1', user_id)
    status, body = await api.call("POST", "/knowledge-bases", key, json={"name": "after"})
    assert status == 401
    assert_error(body, "unauthorized")


async def test_the_storage_lookup_refuses_a_pending_users_key(pool: asyncpg.Pool) -> None:
    _, _, key = await member_key(pool, UserStatus.PENDING, "lookup-co")
    assert await api_keys.authenticate(pool, plaintext=key, now=datetime.now(UTC)) is None


async def test_the_cli_mints_no_key_for_a_user_who_is_not_active(db_url: str, pool: asyncpg.Pool) -> None:
    org = await organizations.create_organization(pool, name="CLI pending", slug="cli-pending")
    user = await users.create_user(pool, email="new@cli-pending.example")
    await users.add_member(pool, user_id=user.id, organization_id=org.id, role=UserRole.OWNER)
    code, out, err = await dialtone(
        "api-key", "create", "--org", "cli-pending", "--user", "new@cli-pending.example", database_url=db_url
    )
    assert code == 1
    assert "PENDING, not ACTIVE" in err
    assert "sk_live_" not in out
    assert await api_keys.list_api_keys(pool, organization_id=org.id) == []
