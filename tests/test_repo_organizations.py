"""Organizations: creation, lookup, the credit balance under concurrency, and what deleting one removes."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from storage.api_keys import create_api_key
from storage.enums import Plan
from storage.errors import AlreadyExists, NotFound
from storage.events import create_event
from storage.organizations import (
    InsufficientCredits,
    Organization,
    add_credits,
    charge_credits,
    create_organization,
    delete_organization,
    get_organization,
    get_organization_by_slug,
)
from storage.phone_numbers import create_phone_number
from storage.records import new_id
from storage.users import add_member, create_user
from storage.voices import create_custom_voice, upsert_system_voice


async def new_organization(pool: asyncpg.Pool, *, credits: int = 0) -> Organization:
    return await create_organization(pool, name="Acme", slug=f"acme-{new_id()}", credits=credits)


async def test_an_organization_keeps_every_column_through_a_round_trip(pool: asyncpg.Pool) -> None:
    slug = f"globex-{new_id()}"
    created = await create_organization(pool, name="Globex", slug=slug, plan=Plan.ENTERPRISE, credits=250)

    fetched = await get_organization(pool, organization_id=created.id)
    row = await pool.fetchrow('SELECT * FROM "Organization" WHERE "id" = $1', created.id)

    assert fetched == created
    assert (fetched.name, fetched.slug, fetched.plan, fetched.credits) == ("Globex", slug, Plan.ENTERPRISE, 250)
    assert row is not None
    assert set(row.keys()) == {field.alias for field in Organization.model_fields.values()}
    assert Organization.from_row(row) == fetched


async def test_a_new_organization_is_on_the_free_plan_with_no_credits(pool: asyncpg.Pool) -> None:
    organization = await create_organization(pool, name="Initech", slug=f"initech-{new_id()}")

    assert organization.plan is Plan.FREE
    assert organization.credits == 0


async def test_an_organization_can_be_created_with_a_fixed_id(pool: asyncpg.Pool) -> None:
    fixed = new_id()

    organization = await create_organization(pool, name="Fixed", slug=f"fixed-{fixed}", id=fixed)

    assert organization.id == fixed


async def test_a_taken_slug_is_refused_naming_the_slug(pool: asyncpg.Pool) -> None:
    slug = f"taken-{new_id()}"
    await create_organization(pool, name="First", slug=slug)

    with pytest.raises(AlreadyExists) as raised:
        await create_organization(pool, name="Second", slug=slug)

    assert raised.value.field == "slug"
    assert str(raised.value) == f"Organization with slug {slug!r} already exists"


async def test_getting_an_unknown_organization_is_not_found(pool: asyncpg.Pool) -> None:
    with pytest.raises(NotFound, match="Organization nope not found"):
        await get_organization(pool, organization_id="nope")


async def test_an_organization_is_found_by_its_slug(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)

    assert await get_organization_by_slug(pool, slug=organization.slug) == organization
    assert await get_organization_by_slug(pool, slug=f"absent-{new_id()}") is None


async def test_adding_credits_returns_and_keeps_the_new_balance(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool, credits=5)

    balance = await add_credits(pool, organization_id=organization.id, amount=20)

    assert balance == 25
    assert (await get_organization(pool, organization_id=organization.id)).credits == 25


@pytest.mark.parametrize("amount", [0, -3])
async def test_adding_a_non_positive_amount_of_credits_is_refused(pool: asyncpg.Pool, amount: int) -> None:
    organization = await new_organization(pool, credits=5)

    with pytest.raises(ValueError, match="must be positive"):
        await add_credits(pool, organization_id=organization.id, amount=amount)

    assert (await get_organization(pool, organization_id=organization.id)).credits == 5


async def test_charging_credits_takes_them_from_the_balance(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool, credits=10)

    balance = await charge_credits(pool, organization_id=organization.id, amount=4)

    assert balance == 6
    assert (await get_organization(pool, organization_id=organization.id)).credits == 6


async def test_a_charge_the_balance_cannot_cover_is_refused_and_charges_nothing(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool, credits=3)

    with pytest.raises(InsufficientCredits) as raised:
        await charge_credits(pool, organization_id=organization.id, amount=5)

    assert (raised.value.balance, raised.value.amount) == (3, 5)
    assert "has 3 credits, not enough for a charge of 5" in str(raised.value)
    assert (await get_organization(pool, organization_id=organization.id)).credits == 3


async def test_concurrent_charges_never_spend_more_than_the_balance(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool, credits=10)

    results = await asyncio.gather(
        *(charge_credits(pool, organization_id=organization.id, amount=1) for _ in range(20)), return_exceptions=True
    )

    successes = [result for result in results if isinstance(result, int)]
    refusals = [result for result in results if isinstance(result, InsufficientCredits)]
    assert len(successes) == 10
    assert len(refusals) == 10
    assert sorted(successes) == list(range(10))
    assert (await get_organization(pool, organization_id=organization.id)).credits == 0


async def test_the_schema_refuses_a_balance_below_zero(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool, credits=2)

    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute('UPDATE "Organization" SET "credits" = -1 WHERE "id" = $1', organization.id)

    assert (await get_organization(pool, organization_id=organization.id)).credits == 2


async def test_credit_operations_on_an_unknown_organization_are_not_found(pool: asyncpg.Pool) -> None:
    for operation in (add_credits, charge_credits):
        with pytest.raises(NotFound):
            await operation(pool, organization_id="nope", amount=1)


async def test_changing_the_balance_advances_updated_at(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool, credits=1)
    await asyncio.sleep(0.01)  # updatedAt is kept to the millisecond

    await add_credits(pool, organization_id=organization.id, amount=1)

    assert (await get_organization(pool, organization_id=organization.id)).updated_at > organization.updated_at


async def test_deleting_an_organization_removes_everything_it_owns(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    user = await create_user(pool, email=f"owner-{new_id()}@example.com")
    await add_member(pool, user_id=user.id, organization_id=organization.id)
    await create_api_key(pool, organization_id=organization.id, user_id=user.id, name="ci", live=False)
    await create_phone_number(pool, organization_id=organization.id, phone_number="+15555550142")
    await create_event(pool, organization_id=organization.id, name="call.ended", webhook_url="https://example.com/h")
    await create_custom_voice(pool, organization_id=organization.id, name="Clone")
    system_voice = await upsert_system_voice(pool, name="June", provider="elevenlabs", provider_voice_id=new_id())

    await delete_organization(pool, organization_id=organization.id)

    for table in ("ApiKey", "PhoneNumber", "Event", "Voice", "UserOrganization"):
        left = await pool.fetchval(f'SELECT count(*) FROM "{table}" WHERE "organizationId" = $1', organization.id)
        assert left == 0, table
    assert await pool.fetchval('SELECT count(*) FROM "User" WHERE "id" = $1', user.id) == 1
    assert await pool.fetchval('SELECT count(*) FROM "Voice" WHERE "id" = $1', system_voice.id) == 1
    with pytest.raises(NotFound):
        await get_organization(pool, organization_id=organization.id)


async def test_deleting_an_unknown_organization_is_not_found(pool: asyncpg.Pool) -> None:
    with pytest.raises(NotFound):
        await delete_organization(pool, organization_id="nope")
