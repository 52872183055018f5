"""/v1/voices: the platform's system voices (read-only) and the organization's own custom voices."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from engine.api.errors import ApiError
from engine.api.models import LongText, Name, RequestModel, ShortText, UpdateModel, Url
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from storage import voices
from storage.enums import VoiceStatus
from storage.records import Queryable
from storage.voices import Voice

resource = Resource("Voices", "System voices every organization can use, and the organization's custom voices.")

Tags = Annotated[list[ShortText], Field(max_length=50)]


class VoiceListQuery(PageQuery):
    """Which voices to list."""

    custom: bool | None = Field(None, description="true: only custom voices; false: only system voices.")


class VoiceCreate(RequestModel):
    """A custom voice: which provider speaks it, and that provider's id for it."""

    name: Name
    provider: ShortText | None = None
    provider_voice_id: ShortText | None = None
    gender: ShortText | None = None
    description: LongText | None = None
    avatar: Url | None = None
    tags: Tags = Field(default_factory=list)
    status: VoiceStatus = VoiceStatus.READY
    audio_url: Url | None = None


class VoiceUpdate(UpdateModel):
    """Fields of a custom voice to change; null clears an optional one."""

    not_null = frozenset({"name", "tags", "status"})

    name: Name | None = None
    provider: ShortText | None = None
    provider_voice_id: ShortText | None = None
    gender: ShortText | None = None
    description: LongText | None = None
    avatar: Url | None = None
    tags: Tags | None = None
    status: VoiceStatus | None = None
    audio_url: Url | None = None


@resource.get("/voices", summary="List voices", response=Page[Voice], query=VoiceListQuery)
async def list_voices(call: ApiCall) -> Page[Voice]:
    """System voices and the organization's custom voices, newest first."""
    query = call.query_as(VoiceListQuery)
    async with call.tenant() as db:
        rows = await voices.list_voices_page(
            db,
            organization_id=call.caller.organization_id,
            limit=query.fetch_limit,
            before=query.position(),
            custom=query.custom,
        )
    return to_page(Page[Voice], rows, query)


@resource.post("/voices", summary="Create a custom voice", response=Voice, body=VoiceCreate)
async def create_voice(call: ApiCall) -> Voice:
    """Add a custom voice only this organization sees."""
    body = call.body_as(VoiceCreate)
    async with call.tenant() as db:
        return await voices.create_custom_voice(db, organization_id=call.caller.organization_id, **body.model_dump())


@resource.get("/voices/{voiceId}", summary="Get a voice", response=Voice)
async def get_voice(call: ApiCall) -> Voice:
    """A system voice or one of the organization's custom voices."""
    async with call.tenant() as db:
        return await voices.get_voice_for_organization(
            db, organization_id=call.caller.organization_id, voice_id=call.path["voiceId"]
        )


@resource.patch("/voices/{voiceId}", summary="Update a custom voice", response=Voice, body=VoiceUpdate, errors=(409,))
async def update_voice(call: ApiCall) -> Voice:
    """Change one of the organization's custom voices; 409 for a system voice, which is read-only."""
    changes = call.body_as(VoiceUpdate).changes()
    async with call.tenant() as db:
        await _custom_voice(call, db)
        return await voices.update_custom_voice(
            db, organization_id=call.caller.organization_id, voice_id=call.path["voiceId"], changes=changes
        )


@resource.delete("/voices/{voiceId}", summary="Delete a custom voice", errors=(409,))
async def delete_voice(call: ApiCall) -> None:
    """Delete one of the organization's custom voices (agents using it lose it); 409 for a system voice."""
    async with call.tenant() as db:
        await _custom_voice(call, db)
        await voices.delete_custom_voice(db, organization_id=call.caller.organization_id, voice_id=call.path["voiceId"])


async def _custom_voice(call: ApiCall, db: Queryable) -> Voice:
    voice = await voices.get_voice_for_organization(
        db, organization_id=call.caller.organization_id, voice_id=call.path["voiceId"]
    )
    if voice.organization_id is None:
        raise ApiError(409, "read_only", f"voice {voice.id} is a system voice; system voices cannot be changed")
    return voice
