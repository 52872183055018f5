"""Text-to-speech voices: system voices every organization can use, and organizations' own custom voices."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from storage.enums import VoiceStatus
from storage.errors import NotFound, translate_errors
from storage.records import Queryable, Record, new_id, set_clause, transaction

_COLUMNS = (
    '"id", "organizationId", "name", "gender", "description", "avatar", "tags", "isCustom", "status", "audioUrl", '
    '"provider", "providerVoiceId", "createdAt", "updatedAt"'
)


class Voice(Record):
    """A voice agents can speak with; system voices have no organization and are not custom."""

    id: str
    organization_id: str | None
    name: str
    gender: str | None
    description: str | None
    avatar: str | None
    tags: list[str]
    is_custom: bool
    status: VoiceStatus
    audio_url: str | None
    provider: str | None
    provider_voice_id: str | None
    created_at: datetime
    updated_at: datetime


async def create_custom_voice(
    db: Queryable,
    *,
    organization_id: str,
    name: str,
    provider: str | None = None,
    provider_voice_id: str | None = None,
    gender: str | None = None,
    description: str | None = None,
    avatar: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    status: VoiceStatus = VoiceStatus.READY,
    audio_url: str | None = None,
    id: str | None = None,
) -> Voice:
    """Add a custom voice that only this organization sees (PROCESSING while a clone is being made)."""
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "Voice" ("id", "organizationId", "name", "gender", "description", "avatar", "tags",
                                 "isCustom", "status", "audioUrl", "provider", "providerVoiceId")
            VALUES ($1, $2, $3, $4, $5, $6, $7, true, $8, $9, $10, $11)
            RETURNING {_COLUMNS}
            """,
            id or new_id(),
            organization_id,
            name,
            gender,
            description,
            avatar,
            list(tags),
            status,
            audio_url,
            provider,
            provider_voice_id,
        )
    assert row is not None
    return Voice.from_row(row)


async def upsert_system_voice(
    db: Queryable,
    *,
    name: str,
    provider: str,
    provider_voice_id: str,
    gender: str | None = None,
    description: str | None = None,
    avatar: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    status: VoiceStatus = VoiceStatus.READY,
    audio_url: str | None = None,
    id: str | None = None,
) -> Voice:
    """Create the system voice for (provider, provider_voice_id), or bring the existing one up to these values.

    Safe when several processes seed the catalogue at once: one system voice per provider voice results.
    `id` is used only when the voice is created.
    """
    async with transaction(db) as conn:
        # No unique index covers system voices, so writers of the same provider voice take turns.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"dialtone.system_voice:{provider}:{provider_voice_id}"
        )
        existing = await conn.fetchval(
            """
            SELECT "id" FROM "Voice"
            WHERE "organizationId" IS NULL AND "provider" = $1 AND "providerVoiceId" = $2
            ORDER BY "createdAt", "id"
            LIMIT 1
            """,
            provider,
            provider_voice_id,
        )
        values = (name, gender, description, avatar, list(tags), status, audio_url, provider, provider_voice_id)
        with translate_errors():
            if existing is None:
                row = await conn.fetchrow(
                    f"""
                    INSERT INTO "Voice" ("id", "organizationId", "isCustom", "name", "gender", "description",
                                         "avatar", "tags", "status", "audioUrl", "provider", "providerVoiceId")
                    VALUES ($1, NULL, false, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                    RETURNING {_COLUMNS}
                    """,
                    id or new_id(),
                    *values,
                )
            else:
                row = await conn.fetchrow(
                    f"""
                    UPDATE "Voice" SET "name" = $2, "gender" = $3, "description" = $4, "avatar" = $5, "tags" = $6,
                                       "status" = $7, "audioUrl" = $8, "provider" = $9, "providerVoiceId" = $10
                    WHERE "id" = $1
                    RETURNING {_COLUMNS}
                    """,
                    existing,
                    *values,
                )
    assert row is not None
    return Voice.from_row(row)


async def list_voices(db: Queryable, *, organization_id: str) -> list[Voice]:
    """The voices an organization can use: every system voice, then its own custom voices, each by name."""
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "Voice"
        WHERE "organizationId" IS NULL OR "organizationId" = $1
        ORDER BY "organizationId" NULLS FIRST, "name", "id"
        """,
        organization_id,
    )
    return Voice.from_rows(rows)


async def get_voice_for_organization(db: Queryable, *, organization_id: str, voice_id: str) -> Voice:
    """A voice the organization may use (a system voice or its own); NotFound otherwise."""
    row = await db.fetchrow(
        f"""
        SELECT {_COLUMNS} FROM "Voice"
        WHERE "id" = $2 AND ("organizationId" IS NULL OR "organizationId" = $1)
        """,
        organization_id,
        voice_id,
    )
    if row is None:
        raise NotFound("Voice", voice_id)
    return Voice.from_row(row)


async def set_custom_voice_status(db: Queryable, *, organization_id: str, voice_id: str, status: VoiceStatus) -> Voice:
    """Move one of the organization's custom voices to a status (e.g. READY when cloning finishes)."""
    row = await db.fetchrow(
        f"""
        UPDATE "Voice" SET "status" = $3
        WHERE "organizationId" = $1 AND "id" = $2
        RETURNING {_COLUMNS}
        """,
        organization_id,
        voice_id,
        status,
    )
    if row is None:
        raise NotFound("Voice", voice_id)
    return Voice.from_row(row)


async def delete_custom_voice(db: Queryable, *, organization_id: str, voice_id: str) -> None:
    """Delete one of the organization's custom voices (agents using it are left without one)."""
    with translate_errors():
        deleted = await db.fetchval(
            'DELETE FROM "Voice" WHERE "organizationId" = $1 AND "id" = $2 RETURNING "id"', organization_id, voice_id
        )
    if deleted is None:
        raise NotFound("Voice", voice_id)


async def list_voices_page(
    db: Queryable,
    *,
    organization_id: str,
    limit: int,
    before: tuple[datetime, str] | None = None,
    custom: bool | None = None,
) -> list[Voice]:
    """A page of the voices the organization can use (system and its own), newest first, after `before`.

    `custom` True lists only its custom voices, False only system voices.
    """
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "Voice"
        WHERE ("organizationId" IS NULL OR "organizationId" = $1)
          AND ($2::timestamptz IS NULL OR ("createdAt", "id") < ($2, $3))
          AND ($4::boolean IS NULL OR ("organizationId" IS NOT NULL) = $4)
        ORDER BY "createdAt" DESC, "id" DESC
        LIMIT $5
        """,
        organization_id,
        *(before or (None, None)),
        custom,
        limit,
    )
    return Voice.from_rows(rows)


async def update_custom_voice(db: Queryable, *, organization_id: str, voice_id: str, changes: dict[str, Any]) -> Voice:
    """Change fields of one of the organization's custom voices (snake_case names); NotFound for any other voice."""
    stored = {name: list(value) if name == "tags" else value for name, value in changes.items()}
    assignments, args = set_clause("Voice", stored, _CUSTOM_UPDATABLE, first=3)
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "Voice" SET {assignments}
            WHERE "organizationId" = $1 AND "id" = $2
            RETURNING {_COLUMNS}
            """,
            organization_id,
            voice_id,
            *args,
        )
    if row is None:
        raise NotFound("Voice", voice_id)
    return Voice.from_row(row)


_CUSTOM_UPDATABLE = frozenset(
    {"name", "gender", "description", "avatar", "tags", "status", "audio_url", "provider", "provider_voice_id"}
)
