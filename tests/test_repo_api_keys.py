"""API keys: shown once, stored hashed, accepted only while active and unexpired, scoped to their organization."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from storage.api_keys import (
    ApiKey,
    authenticate,
    create_api_key,
    get_api_key,
    list_api_keys,
    revoke_api_key,
)
from storage.enums import ApiKeyStatus, UserStatus
from storage.errors import AlreadyExists, NotFound
from storage.organizations import Organization, create_organization
from storage.records import new_id
from storage.users import User, create_user

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


async def new_owner(pool: asyncpg.Pool) -> tuple[Organization, User]:
    organization = await create_organization(pool, name="Acme", slug=f"acme-{new_id()}")
    user = await create_user(pool, email=f"dev-{new_id()}@example.com", status=UserStatus.ACTIVE)
    return organization, user


async def test_an_api_key_keeps_every_column_through_a_round_trip(pool: asyncpg.Pool) -> None:
    organization, user = await new_owner(pool)
    expires = NOW + timedelta(days=30)
    created = await create_api_key(
        pool, organization_id=organization.id, user_id=user.id, name="CI", live=True, expiration_date=expires
    )

    fetched = await get_api_key(pool, organization_id=organization.id, key_id=created.api_key.id)
    row = await pool.fetchrow('SELECT * FROM "ApiKey" WHERE "id" = $1', fetched.id)

    assert fetched == created.api_key
    assert (fetched.organization_id, fetched.user_id, fetched.name) == (organization.id, user.id, "CI")
    assert (fetched.expiration_date, fetched.status, fetched.last_used_at) == (expires, ApiKeyStatus.ACTIVE, None)
    assert row is not None
    assert set(row.keys()) == {field.alias for field in ApiKey.model_fields.values()}
    assert ApiKey.from_row(row) == fetched


async def test_a_live_key_is_sk_live_and_43_random_characters_with_a_12_character_display_prefix(
    pool: asyncpg.Pool,
) -> None:
    organization, user = await new_owner(pool)

    created = await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="prod", live=True)

    assert re.fullmatch(r"sk_live_[A-Za-z0-9_-]{43}", created.plaintext)
    assert created.api_key.key_prefix == created.plaintext[:12]
    assert created.api_key.live


async def test_a_test_key_is_sk_test(pool: asyncpg.Pool) -> None:
    organization, user = await new_owner(pool)

    created = await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="dev", live=False)

    assert created.plaintext.startswith("sk_test_")
    assert not created.api_key.live


async def test_the_key_is_stored_only_as_its_sha256_hash(pool: asyncpg.Pool) -> None:
    organization, user = await new_owner(pool)
    created = await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="prod", live=True)

    row = await pool.fetchrow('SELECT * FROM "ApiKey" WHERE "id" = $1', created.api_key.id)

    assert row is not None
    assert row["key"] == hashlib.sha256(created.plaintext.encode()).hexdigest()
    assert all(created.plaintext not in str(value) for value in row.values())


async def test_neither_the_key_nor_its_hash_appears_in_a_repr(pool: asyncpg.Pool) -> None:
    organization, user = await new_owner(pool)
    created = await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="prod", live=True)

    for text in (repr(created), repr(created.api_key)):
        assert created.plaintext not in text
        assert created.api_key.key not in text
    assert created.api_key.key_prefix in repr(created.api_key)


async def test_a_colliding_key_is_refused_without_showing_its_hash(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    organization, user = await new_owner(pool)
    monkeypatch.setattr(secrets, "token_urlsafe", lambda nbytes: "A" * 43)
    first = await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="one", live=True)

    with pytest.raises(AlreadyExists) as raised:
        await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="two", live=True)

    assert raised.value.field == "key"
    assert first.api_key.key not in str(raised.value)
    assert str(raised.value) == "ApiKey with key already exists"


async def test_a_valid_key_authenticates_and_records_when_it_was_used(pool: asyncpg.Pool) -> None:
    organization, user = await new_owner(pool)
    created = await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="prod", live=True)

    authenticated = await authenticate(pool, plaintext=created.plaintext, now=NOW)

    assert authenticated is not None
    assert (authenticated.id, authenticated.organization_id) == (created.api_key.id, organization.id)
    assert authenticated.last_used_at == NOW
    assert (await get_api_key(pool, organization_id=organization.id, key_id=created.api_key.id)).last_used_at == NOW


async def test_an_unknown_key_does_not_authenticate(pool: asyncpg.Pool) -> None:
    assert await authenticate(pool, plaintext="sk_live_" + "B" * 43, now=NOW) is None


@pytest.mark.parametrize(
    "plaintext",
    ["", "sk_live_", "sk_live_short", "pk_live_" + "C" * 43, "sk_prod_" + "C" * 43, "sk_live_" + "C" * 44],
)
async def test_a_malformed_key_does_not_authenticate(pool: asyncpg.Pool, plaintext: str) -> None:
    assert await authenticate(pool, plaintext=plaintext, now=NOW) is None


async def test_a_revoked_key_no_longer_authenticates(pool: asyncpg.Pool) -> None:
    organization, user = await new_owner(pool)
    created = await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="prod", live=True)
    await asyncio.sleep(0.01)  # updatedAt is kept to the millisecond

    revoked = await revoke_api_key(pool, organization_id=organization.id, key_id=created.api_key.id)

    assert revoked.status is ApiKeyStatus.REVOKED
    assert revoked.updated_at > created.api_key.updated_at
    assert await authenticate(pool, plaintext=created.plaintext, now=NOW) is None


async def test_revoking_a_key_twice_is_harmless(pool: asyncpg.Pool) -> None:
    organization, user = await new_owner(pool)
    created = await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="prod", live=True)
    await revoke_api_key(pool, organization_id=organization.id, key_id=created.api_key.id)

    again = await revoke_api_key(pool, organization_id=organization.id, key_id=created.api_key.id)

    assert again.status is ApiKeyStatus.REVOKED


async def test_a_key_authenticates_until_its_expiration_date_and_not_from_then_on(pool: asyncpg.Pool) -> None:
    organization, user = await new_owner(pool)
    expires = NOW + timedelta(hours=1)
    created = await create_api_key(
        pool, organization_id=organization.id, user_id=user.id, name="temp", live=True, expiration_date=expires
    )

    assert await authenticate(pool, plaintext=created.plaintext, now=expires - timedelta(seconds=1)) is not None
    assert await authenticate(pool, plaintext=created.plaintext, now=expires) is None
    assert await authenticate(pool, plaintext=created.plaintext, now=expires + timedelta(days=1)) is None


async def test_another_organization_can_neither_see_nor_revoke_a_key(pool: asyncpg.Pool) -> None:
    organization, user = await new_owner(pool)
    other, _ = await new_owner(pool)
    created = await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="prod", live=True)

    with pytest.raises(NotFound):
        await get_api_key(pool, organization_id=other.id, key_id=created.api_key.id)
    with pytest.raises(NotFound):
        await revoke_api_key(pool, organization_id=other.id, key_id=created.api_key.id)

    assert await authenticate(pool, plaintext=created.plaintext, now=NOW) is not None


async def test_an_organization_lists_only_its_own_keys_revoked_ones_included(pool: asyncpg.Pool) -> None:
    organization, user = await new_owner(pool)
    other, other_user = await new_owner(pool)
    first = await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="a", live=True)
    second = await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="b", live=False)
    await create_api_key(pool, organization_id=other.id, user_id=other_user.id, name="c", live=True)
    await revoke_api_key(pool, organization_id=organization.id, key_id=first.api_key.id)

    listed = await list_api_keys(pool, organization_id=organization.id)

    assert {key.id for key in listed} == {first.api_key.id, second.api_key.id}
