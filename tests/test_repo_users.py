"""Users: emails unique whatever their case, passwords only as argon2 hashes, memberships of organizations."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from argon2 import PasswordHasher

from storage.api_keys import create_api_key
from storage.enums import UserRole, UserStatus
from storage.errors import AlreadyExists, InvalidReference, NotFound
from storage.organizations import Organization, create_organization
from storage.records import new_id
from storage.users import (
    User,
    add_member,
    create_user,
    delete_user,
    find_membership,
    get_user,
    get_user_by_email,
    list_members,
    list_memberships,
    set_password,
    verify_password,
)


def unique_email() -> str:
    return f"ada-{new_id()}@example.com"


async def new_organization(pool: asyncpg.Pool) -> Organization:
    return await create_organization(pool, name="Acme", slug=f"acme-{new_id()}")


async def test_a_user_keeps_every_column_through_a_round_trip(pool: asyncpg.Pool) -> None:
    email = unique_email()
    created = await create_user(
        pool,
        email=email,
        password="correct horse",
        first_name="Ada",
        last_name="Lovelace",
        phone="+15555550100",
        time_zone="Europe/London",
        avatar="https://example.com/ada.png",
        role=UserRole.ADMIN,
        status=UserStatus.ACTIVE,
        two_factor_enabled=True,
        two_factor_secret="JBSWY3DPEHPK3PXP",
    )

    fetched = await get_user(pool, user_id=created.id)
    row = await pool.fetchrow('SELECT * FROM "User" WHERE "id" = $1', created.id)

    assert fetched == created
    assert (fetched.email, fetched.first_name, fetched.last_name, fetched.phone, fetched.time_zone) == (
        email,
        "Ada",
        "Lovelace",
        "+15555550100",
        "Europe/London",
    )
    assert (fetched.avatar, fetched.role, fetched.status) == ("https://example.com/ada.png", UserRole.ADMIN, "ACTIVE")
    assert (fetched.two_factor_enabled, fetched.two_factor_secret) == (True, "JBSWY3DPEHPK3PXP")
    assert row is not None
    assert set(row.keys()) == {field.alias for field in User.model_fields.values()}
    assert User.from_row(row) == fetched


async def test_a_new_user_is_a_pending_viewer_in_utc_without_a_password(pool: asyncpg.Pool) -> None:
    user = await create_user(pool, email=unique_email())

    assert (user.role, user.status, user.time_zone, user.password) == (UserRole.VIEWER, UserStatus.PENDING, "UTC", None)
    assert not user.two_factor_enabled


async def test_the_password_is_stored_as_an_argon2_hash_not_as_given(pool: asyncpg.Pool) -> None:
    user = await create_user(pool, email=unique_email(), password="correct horse")

    stored = await pool.fetchval('SELECT "password" FROM "User" WHERE "id" = $1', user.id)

    assert stored != "correct horse"
    assert "correct horse" not in stored
    assert stored.startswith("$argon2id$")
    assert PasswordHasher().verify(stored, "correct horse")


async def test_a_users_repr_shows_neither_password_hash_nor_two_factor_secret(pool: asyncpg.Pool) -> None:
    user = await create_user(pool, email=unique_email(), password="correct horse", two_factor_secret="TOTPSECRET")

    assert user.password is not None
    assert user.password not in repr(user)
    assert "TOTPSECRET" not in repr(user)
    assert user.email in repr(user)


async def test_emails_are_stored_lower_cased_and_found_whatever_their_case(pool: asyncpg.Pool) -> None:
    suffix = new_id()
    user = await create_user(pool, email=f"  Grace.Hopper-{suffix}@Example.COM ")

    assert user.email == f"grace.hopper-{suffix}@example.com"
    assert await get_user_by_email(pool, email=f"GRACE.HOPPER-{suffix}@example.com") == user
    assert await get_user_by_email(pool, email=f"nobody-{suffix}@example.com") is None


async def test_an_email_already_taken_in_any_case_is_refused_naming_the_email(pool: asyncpg.Pool) -> None:
    email = unique_email()
    await create_user(pool, email=email)

    with pytest.raises(AlreadyExists) as raised:
        await create_user(pool, email=email.upper())

    assert raised.value.field == "email"
    assert str(raised.value) == f"User with email {email!r} already exists"


@pytest.mark.parametrize("email", ["", "ada", "@example.com", "ada@"])
async def test_a_malformed_email_is_refused(pool: asyncpg.Pool, email: str) -> None:
    with pytest.raises(ValueError, match="not an email address"):
        await create_user(pool, email=email)


async def test_getting_an_unknown_user_is_not_found(pool: asyncpg.Pool) -> None:
    with pytest.raises(NotFound, match="User nope not found"):
        await get_user(pool, user_id="nope")


async def test_the_right_password_signs_the_user_in(pool: asyncpg.Pool) -> None:
    email = unique_email()
    user = await create_user(pool, email=email, password="correct horse")

    assert await verify_password(pool, email=email.upper(), password="correct horse") == user


async def test_a_wrong_password_signs_nobody_in(pool: asyncpg.Pool) -> None:
    email = unique_email()
    await create_user(pool, email=email, password="correct horse")

    assert await verify_password(pool, email=email, password="battery staple") is None


async def test_an_unknown_email_signs_nobody_in(pool: asyncpg.Pool) -> None:
    assert await verify_password(pool, email=unique_email(), password="correct horse") is None


async def test_a_user_without_a_password_cannot_sign_in_with_one(pool: asyncpg.Pool) -> None:
    email = unique_email()
    await create_user(pool, email=email)

    assert await verify_password(pool, email=email, password="") is None


async def test_signing_in_upgrades_a_hash_made_with_weaker_parameters(pool: asyncpg.Pool) -> None:
    email = unique_email()
    user = await create_user(pool, email=email)
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("correct horse")
    await pool.execute('UPDATE "User" SET "password" = $2 WHERE "id" = $1', user.id, weak)

    signed_in = await verify_password(pool, email=email, password="correct horse")

    stored = await pool.fetchval('SELECT "password" FROM "User" WHERE "id" = $1', user.id)
    assert signed_in is not None
    assert stored != weak
    assert signed_in.password == stored
    assert not PasswordHasher().check_needs_rehash(stored)
    assert await verify_password(pool, email=email, password="correct horse") is not None


async def test_setting_a_password_replaces_the_old_one_and_advances_updated_at(pool: asyncpg.Pool) -> None:
    email = unique_email()
    user = await create_user(pool, email=email, password="old secret")
    await asyncio.sleep(0.01)  # updatedAt is kept to the millisecond

    updated = await set_password(pool, user_id=user.id, password="new secret")

    assert updated.updated_at > user.updated_at
    assert await verify_password(pool, email=email, password="old secret") is None
    assert await verify_password(pool, email=email, password="new secret") is not None


async def test_a_member_has_a_role_in_an_organization(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    user = await create_user(pool, email=unique_email())

    membership = await add_member(pool, user_id=user.id, organization_id=organization.id, role=UserRole.ADMIN)

    assert (membership.user_id, membership.organization_id, membership.role) == (
        user.id,
        organization.id,
        UserRole.ADMIN,
    )
    assert await find_membership(pool, organization_id=organization.id, user_id=user.id) == membership


async def test_a_user_is_no_member_of_an_organization_they_were_not_added_to(pool: asyncpg.Pool) -> None:
    mine, theirs = await new_organization(pool), await new_organization(pool)
    user = await create_user(pool, email=unique_email())
    await add_member(pool, user_id=user.id, organization_id=mine.id)

    assert await find_membership(pool, organization_id=theirs.id, user_id=user.id) is None


async def test_adding_a_member_twice_is_refused(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    user = await create_user(pool, email=unique_email())
    await add_member(pool, user_id=user.id, organization_id=organization.id)

    with pytest.raises(AlreadyExists, match="UserOrganization with userId, organizationId"):
        await add_member(pool, user_id=user.id, organization_id=organization.id, role=UserRole.OWNER)


async def test_adding_a_member_to_an_unknown_organization_is_an_invalid_reference(pool: asyncpg.Pool) -> None:
    user = await create_user(pool, email=unique_email())

    with pytest.raises(InvalidReference):
        await add_member(pool, user_id=user.id, organization_id="nope")


async def test_memberships_are_listed_per_user_and_per_organization(pool: asyncpg.Pool) -> None:
    first, second = await new_organization(pool), await new_organization(pool)
    ada, grace = await create_user(pool, email=unique_email()), await create_user(pool, email=unique_email())
    await add_member(pool, user_id=ada.id, organization_id=first.id, role=UserRole.OWNER)
    await add_member(pool, user_id=ada.id, organization_id=second.id)
    await add_member(pool, user_id=grace.id, organization_id=first.id)

    assert {m.organization_id for m in await list_memberships(pool, user_id=ada.id)} == {first.id, second.id}
    assert {m.user_id for m in await list_members(pool, organization_id=first.id)} == {ada.id, grace.id}
    assert [m.user_id for m in await list_members(pool, organization_id=second.id)] == [ada.id]


async def test_deleting_a_user_removes_their_memberships_and_api_keys(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    user = await create_user(pool, email=unique_email())
    await add_member(pool, user_id=user.id, organization_id=organization.id)
    await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="ci", live=True)

    await delete_user(pool, user_id=user.id)

    assert await find_membership(pool, organization_id=organization.id, user_id=user.id) is None
    assert await pool.fetchval('SELECT count(*) FROM "ApiKey" WHERE "userId" = $1', user.id) == 0
    with pytest.raises(NotFound):
        await get_user(pool, user_id=user.id)


async def test_deleting_an_unknown_user_is_not_found(pool: asyncpg.Pool) -> None:
    with pytest.raises(NotFound):
        await delete_user(pool, user_id="nope")
