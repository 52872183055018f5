"""Voices: system voices seeded idempotently, custom voices private to their organization."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from storage.enums import VoiceStatus
from storage.errors import NotFound
from storage.organizations import Organization, create_organization
from storage.records import new_id
from storage.voices import (
    Voice,
    create_custom_voice,
    delete_custom_voice,
    get_voice_for_organization,
    list_voices,
    set_custom_voice_status,
    upsert_system_voice,
)


async def new_organization(pool: asyncpg.Pool) -> Organization:
    return await create_organization(pool, name="Acme", slug=f"acme-{new_id()}")


async def new_system_voice(pool: asyncpg.Pool, name: str = "June") -> Voice:
    return await upsert_system_voice(pool, name=name, provider="elevenlabs", provider_voice_id=new_id())


async def test_a_custom_voice_keeps_every_column_through_a_round_trip(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    created = await create_custom_voice(
        pool,
        organization_id=organization.id,
        name="Founder clone",
        provider="elevenlabs",
        provider_voice_id="el-123",
        gender="female",
        description="Our founder's voice",
        avatar="#FF6B6B",
        tags=["english", "british", "warm"],
        status=VoiceStatus.PROCESSING,
        audio_url="https://example.com/sample.mp3",
    )

    fetched = await get_voice_for_organization(pool, organization_id=organization.id, voice_id=created.id)
    row = await pool.fetchrow('SELECT * FROM "Voice" WHERE "id" = $1', created.id)

    assert fetched == created
    assert (fetched.organization_id, fetched.is_custom, fetched.name) == (organization.id, True, "Founder clone")
    assert (fetched.provider, fetched.provider_voice_id, fetched.gender) == ("elevenlabs", "el-123", "female")
    assert (fetched.description, fetched.avatar) == ("Our founder's voice", "#FF6B6B")
    assert fetched.tags == ["english", "british", "warm"]
    assert (fetched.status, fetched.audio_url) == (VoiceStatus.PROCESSING, "https://example.com/sample.mp3")
    assert row is not None
    assert set(row.keys()) == {field.alias for field in Voice.model_fields.values()}
    assert Voice.from_row(row) == fetched


async def test_a_system_voice_belongs_to_no_organization_and_is_not_custom(pool: asyncpg.Pool) -> None:
    voice = await upsert_system_voice(
        pool, name="June", provider="elevenlabs", provider_voice_id=new_id(), gender="female", tags=["american"]
    )

    assert (voice.organization_id, voice.is_custom, voice.status, voice.tags) == (
        None,
        False,
        VoiceStatus.READY,
        ["american"],
    )


async def test_upserting_a_system_voice_again_updates_the_same_voice(pool: asyncpg.Pool) -> None:
    provider_voice_id = new_id()
    first = await upsert_system_voice(pool, name="June", provider="elevenlabs", provider_voice_id=provider_voice_id)
    await asyncio.sleep(0.01)  # updatedAt is kept to the millisecond

    second = await upsert_system_voice(
        pool, name="June (v2)", provider="elevenlabs", provider_voice_id=provider_voice_id, tags=["calm"]
    )

    assert second.id == first.id
    assert (second.name, second.tags) == ("June (v2)", ["calm"])
    assert second.updated_at > first.updated_at


async def test_upserting_an_unchanged_system_voice_leaves_it_untouched(pool: asyncpg.Pool) -> None:
    provider_voice_id = new_id()
    first = await upsert_system_voice(pool, name="June", provider="elevenlabs", provider_voice_id=provider_voice_id)

    second = await upsert_system_voice(pool, name="June", provider="elevenlabs", provider_voice_id=provider_voice_id)

    assert second == first


async def test_the_same_provider_voice_id_at_another_provider_is_another_voice(pool: asyncpg.Pool) -> None:
    provider_voice_id = new_id()
    elevenlabs = await upsert_system_voice(pool, name="A", provider="elevenlabs", provider_voice_id=provider_voice_id)

    espeak = await upsert_system_voice(pool, name="A", provider="espeak", provider_voice_id=provider_voice_id)

    assert espeak.id != elevenlabs.id


async def test_concurrent_upserts_of_one_system_voice_create_it_once(pool: asyncpg.Pool) -> None:
    provider_voice_id = new_id()

    voices = await asyncio.gather(
        *(
            upsert_system_voice(pool, name="June", provider="elevenlabs", provider_voice_id=provider_voice_id)
            for _ in range(10)
        )
    )

    assert len({voice.id for voice in voices}) == 1
    count = await pool.fetchval(
        'SELECT count(*) FROM "Voice" WHERE "organizationId" IS NULL AND "providerVoiceId" = $1', provider_voice_id
    )
    assert count == 1


async def test_a_custom_voice_with_the_same_provider_voice_id_is_not_taken_for_the_system_voice(
    pool: asyncpg.Pool,
) -> None:
    organization = await new_organization(pool)
    provider_voice_id = new_id()
    custom = await create_custom_voice(
        pool, organization_id=organization.id, name="Clone", provider="elevenlabs", provider_voice_id=provider_voice_id
    )

    system = await upsert_system_voice(pool, name="June", provider="elevenlabs", provider_voice_id=provider_voice_id)

    assert system.id != custom.id
    assert (await get_voice_for_organization(pool, organization_id=organization.id, voice_id=custom.id)).name == "Clone"


async def test_an_upsert_inside_the_callers_transaction_rolls_back_with_it(pool: asyncpg.Pool) -> None:
    provider_voice_id = new_id()
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        voice = await upsert_system_voice(conn, name="June", provider="elevenlabs", provider_voice_id=provider_voice_id)
        assert await conn.fetchval('SELECT count(*) FROM "Voice" WHERE "id" = $1', voice.id) == 1
        await transaction.rollback()

    assert await pool.fetchval('SELECT count(*) FROM "Voice" WHERE "id" = $1', voice.id) == 0


async def test_an_organization_lists_system_voices_and_its_own_custom_voices_only(pool: asyncpg.Pool) -> None:
    mine, theirs = await new_organization(pool), await new_organization(pool)
    system = await new_system_voice(pool)
    own = await create_custom_voice(pool, organization_id=mine.id, name="Mine")
    other = await create_custom_voice(pool, organization_id=theirs.id, name="Theirs")

    listed = await list_voices(pool, organization_id=mine.id)

    ids = [voice.id for voice in listed]
    assert system.id in ids
    assert own.id in ids
    assert other.id not in ids
    assert ids.index(system.id) < ids.index(own.id)
    assert all(voice.organization_id in (None, mine.id) for voice in listed)


async def test_an_organization_may_use_a_system_voice(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    system = await new_system_voice(pool)

    assert await get_voice_for_organization(pool, organization_id=organization.id, voice_id=system.id) == system


async def test_another_organizations_custom_voice_is_not_found(pool: asyncpg.Pool) -> None:
    owner, other = await new_organization(pool), await new_organization(pool)
    voice = await create_custom_voice(pool, organization_id=owner.id, name="Private")

    with pytest.raises(NotFound, match=f"Voice {voice.id} not found"):
        await get_voice_for_organization(pool, organization_id=other.id, voice_id=voice.id)


async def test_a_custom_voice_becomes_ready_when_cloning_finishes(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    voice = await create_custom_voice(
        pool, organization_id=organization.id, name="Clone", status=VoiceStatus.PROCESSING
    )
    await asyncio.sleep(0.01)  # updatedAt is kept to the millisecond

    ready = await set_custom_voice_status(
        pool, organization_id=organization.id, voice_id=voice.id, status=VoiceStatus.READY
    )

    assert ready.status is VoiceStatus.READY
    assert ready.updated_at > voice.updated_at


async def test_an_organization_cannot_change_a_system_voice_or_anothers_custom_voice(pool: asyncpg.Pool) -> None:
    owner, other = await new_organization(pool), await new_organization(pool)
    system = await new_system_voice(pool)
    custom = await create_custom_voice(pool, organization_id=owner.id, name="Clone")

    with pytest.raises(NotFound):
        await set_custom_voice_status(pool, organization_id=other.id, voice_id=system.id, status=VoiceStatus.ERROR)
    with pytest.raises(NotFound):
        await set_custom_voice_status(pool, organization_id=other.id, voice_id=custom.id, status=VoiceStatus.ERROR)

    assert (
        await get_voice_for_organization(pool, organization_id=owner.id, voice_id=custom.id)
    ).status is VoiceStatus.READY


async def test_an_organization_deletes_its_own_custom_voice(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    voice = await create_custom_voice(pool, organization_id=organization.id, name="Clone")

    await delete_custom_voice(pool, organization_id=organization.id, voice_id=voice.id)

    with pytest.raises(NotFound):
        await get_voice_for_organization(pool, organization_id=organization.id, voice_id=voice.id)


async def test_an_organization_cannot_delete_a_system_voice_or_anothers_custom_voice(pool: asyncpg.Pool) -> None:
    owner, other = await new_organization(pool), await new_organization(pool)
    system = await new_system_voice(pool)
    custom = await create_custom_voice(pool, organization_id=owner.id, name="Clone")

    with pytest.raises(NotFound):
        await delete_custom_voice(pool, organization_id=other.id, voice_id=system.id)
    with pytest.raises(NotFound):
        await delete_custom_voice(pool, organization_id=other.id, voice_id=custom.id)

    assert await get_voice_for_organization(pool, organization_id=other.id, voice_id=system.id) == system
    assert await get_voice_for_organization(pool, organization_id=owner.id, voice_id=custom.id) == custom
