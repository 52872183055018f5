"""Phone numbers: stored in E.164, unique across organizations, found unscoped for inbound calls only; the default
caller id (its choice among an organization's numbers is specified through the API in test_seed_fields_outbound)."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg
import pytest

from config.phone import InvalidPhoneNumber
from storage.enums import PhoneNumberStatus
from storage.errors import AlreadyExists, NotFound
from storage.organizations import Organization, create_organization
from storage.phone_numbers import (
    PhoneNumber,
    create_phone_number,
    default_caller_id,
    delete_phone_number,
    find_by_number,
    get_phone_number,
    list_phone_numbers,
    set_inbound_status,
    set_outbound_status,
)
from storage.records import new_id
from storage.tenancy import tenant_transaction

# Fictional +1 555 01xx numbers, one per test so the module's shared database never sees a number twice.
_numbers = (f"+1555555{n:04d}" for n in itertools.count(100))


def fresh_number() -> str:
    return next(_numbers)


async def new_organization(pool: asyncpg.Pool) -> Organization:
    return await create_organization(pool, name="Acme", slug=f"acme-{new_id()}")


async def test_a_phone_number_keeps_every_column_through_a_round_trip(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    number = fresh_number()
    created = await create_phone_number(
        pool,
        organization_id=organization.id,
        phone_number=number,
        label="Support Line",
        inbound_status=PhoneNumberStatus.ENABLED,
        outbound_status=PhoneNumberStatus.DISABLED,
    )

    fetched = await get_phone_number(pool, organization_id=organization.id, phone_number_id=created.id)
    row = await pool.fetchrow('SELECT * FROM "PhoneNumber" WHERE "id" = $1', created.id)

    assert fetched == created
    assert (fetched.organization_id, fetched.label, fetched.phone_number) == (organization.id, "Support Line", number)
    assert (fetched.inbound_status, fetched.outbound_status) == (PhoneNumberStatus.ENABLED, PhoneNumberStatus.DISABLED)
    assert row is not None
    assert set(row.keys()) == {field.alias for field in PhoneNumber.model_fields.values()}
    assert PhoneNumber.from_row(row) == fetched


async def test_a_new_number_is_enabled_both_ways(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)

    created = await create_phone_number(pool, organization_id=organization.id, phone_number=fresh_number())

    assert (created.inbound_status, created.outbound_status) == (PhoneNumberStatus.ENABLED, PhoneNumberStatus.ENABLED)


async def test_a_formatted_number_is_stored_in_e164(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)

    created = await create_phone_number(pool, organization_id=organization.id, phone_number="+1 (555) 555-0199")

    assert created.phone_number == "+15555550199"


async def test_an_invalid_number_is_never_stored(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)

    with pytest.raises(InvalidPhoneNumber):
        await create_phone_number(pool, organization_id=organization.id, phone_number="call me maybe")

    assert await list_phone_numbers(pool, organization_id=organization.id) == []


async def test_a_number_another_organization_has_is_refused_however_it_is_written(pool: asyncpg.Pool) -> None:
    first, second = await new_organization(pool), await new_organization(pool)
    number = fresh_number()
    await create_phone_number(pool, organization_id=first.id, phone_number=number)
    spaced = f"{number[:2]} {number[2:5]} {number[5:8]} {number[8:]}"

    with pytest.raises(AlreadyExists) as raised:
        await create_phone_number(pool, organization_id=second.id, phone_number=spaced)

    assert raised.value.field == "phoneNumber"
    assert str(raised.value) == f"PhoneNumber with phoneNumber {number!r} already exists"


async def test_an_inbound_call_finds_its_number_however_the_number_is_written(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    number = fresh_number()
    created = await create_phone_number(pool, organization_id=organization.id, phone_number=number)

    assert await find_by_number(pool, number=number) == created
    assert await find_by_number(pool, number=f"{number[:2]} ({number[2:5]}) {number[5:8]}-{number[8:]}") == created


async def test_an_unknown_or_unparseable_number_finds_nothing(pool: asyncpg.Pool) -> None:
    assert await find_by_number(pool, number=fresh_number()) is None
    assert await find_by_number(pool, number="client:alice") is None


async def test_another_organization_cannot_get_a_number(pool: asyncpg.Pool) -> None:
    owner, other = await new_organization(pool), await new_organization(pool)
    created = await create_phone_number(pool, organization_id=owner.id, phone_number=fresh_number())

    with pytest.raises(NotFound, match=f"PhoneNumber {created.id} not found"):
        await get_phone_number(pool, organization_id=other.id, phone_number_id=created.id)


async def test_an_organization_lists_only_its_own_numbers(pool: asyncpg.Pool) -> None:
    owner, other = await new_organization(pool), await new_organization(pool)
    first = await create_phone_number(pool, organization_id=owner.id, phone_number=fresh_number())
    second = await create_phone_number(pool, organization_id=owner.id, phone_number=fresh_number())
    await create_phone_number(pool, organization_id=other.id, phone_number=fresh_number())

    assert await list_phone_numbers(pool, organization_id=owner.id) == [first, second]


async def test_inbound_and_outbound_are_switched_separately(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    created = await create_phone_number(pool, organization_id=organization.id, phone_number=fresh_number())
    await asyncio.sleep(0.01)  # updatedAt is kept to the millisecond

    inbound_off = await set_inbound_status(
        pool, organization_id=organization.id, phone_number_id=created.id, status=PhoneNumberStatus.DISABLED
    )
    outbound_off = await set_outbound_status(
        pool, organization_id=organization.id, phone_number_id=created.id, status=PhoneNumberStatus.DISABLED
    )

    assert (inbound_off.inbound_status, inbound_off.outbound_status) == ("DISABLED", "ENABLED")
    assert (outbound_off.inbound_status, outbound_off.outbound_status) == ("DISABLED", "DISABLED")
    assert outbound_off.updated_at > created.updated_at


async def test_another_organization_cannot_switch_a_number(pool: asyncpg.Pool) -> None:
    owner, other = await new_organization(pool), await new_organization(pool)
    created = await create_phone_number(pool, organization_id=owner.id, phone_number=fresh_number())

    with pytest.raises(NotFound):
        await set_inbound_status(
            pool, organization_id=other.id, phone_number_id=created.id, status=PhoneNumberStatus.DISABLED
        )
    with pytest.raises(NotFound):
        await set_outbound_status(
            pool, organization_id=other.id, phone_number_id=created.id, status=PhoneNumberStatus.DISABLED
        )

    assert await get_phone_number(pool, organization_id=owner.id, phone_number_id=created.id) == created


async def test_a_deleted_number_no_longer_answers(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    created = await create_phone_number(pool, organization_id=organization.id, phone_number=fresh_number())

    await delete_phone_number(pool, organization_id=organization.id, phone_number_id=created.id)

    assert await find_by_number(pool, number=created.phone_number) is None


async def test_another_organization_cannot_delete_a_number(pool: asyncpg.Pool) -> None:
    owner, other = await new_organization(pool), await new_organization(pool)
    created = await create_phone_number(pool, organization_id=owner.id, phone_number=fresh_number())

    with pytest.raises(NotFound):
        await delete_phone_number(pool, organization_id=other.id, phone_number_id=created.id)

    assert await find_by_number(pool, number=created.phone_number) == created


async def test_numbers_added_at_the_same_moment_are_the_default_caller_id_in_id_order(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    later = await create_phone_number(
        pool, organization_id=organization.id, phone_number=fresh_number(), id=f"1{new_id()}"
    )
    sooner = await create_phone_number(
        pool, organization_id=organization.id, phone_number=fresh_number(), id=f"0{new_id()}"
    )
    await pool.execute(
        'UPDATE "PhoneNumber" SET "createdAt" = $2 WHERE "id" = ANY($1::text[])',
        [later.id, sooner.id],
        later.created_at,
    )

    chosen = await default_caller_id(pool, organization_id=organization.id, agent_id="no-such-agent")
    assert chosen == sooner.phone_number


async def test_the_default_caller_id_does_not_reach_past_row_level_security(pool: asyncpg.Pool) -> None:
    owner, other = await new_organization(pool), await new_organization(pool)
    created = await create_phone_number(pool, organization_id=owner.id, phone_number=fresh_number())

    assert await default_caller_id(pool, organization_id=owner.id, agent_id="none") == created.phone_number
    async with tenant_transaction(pool, owner.id) as db:
        assert await default_caller_id(db, organization_id=owner.id, agent_id="none") == created.phone_number
    async with tenant_transaction(pool, other.id) as db:  # the API role of another organization sees no such number
        assert await default_caller_id(db, organization_id=owner.id, agent_id="none") is None
