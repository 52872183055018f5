"""/v1/me: who the API key speaks for (its organization, its user and that user's role there) and what the key may
do, so that a client can offer only what the key is allowed (the same rules the other operations enforce)."""

from __future__ import annotations

from pydantic import Field

from engine.api.auth import writer_refusal
from engine.api.models import ResponseModel
from engine.api.operations import ApiCall, Resource
from engine.api.resources import live_call_listen
from engine.api.resources.api_keys import ApiKeyView
from storage import api_keys
from storage.enums import UserRole

resource = Resource("Me", "The API key itself: whose it is, and what it may do.")


class Me(ResponseModel):
    """The caller as the API sees it; never the key itself, only its prefix."""

    organization_id: str
    user_id: str
    role: UserRole = Field(description="The key's user's role in the organization.")
    api_key: ApiKeyView
    can_write: bool = Field(description="Whether the key may change anything (OWNER, ADMIN); a VIEWER's only reads.")
    write_refusal: str | None = Field(
        description="Why the key may not change anything: the message of the 403 any write answers it; null if it may."
    )
    can_listen: bool = Field(description="Whether the key may listen to calls in progress (/live-calls/{id}/listen).")
    listen_refusal: str | None = Field(
        description="Why the key may not listen: the message of the 403 the listen endpoint answers it; null if it may."
    )


# 404 on the key itself: it was deleted while the request was under way.
@resource.get("/me", summary="The API key's organization, role and permissions", response=Me, errors=(404,))
async def get_me(call: ApiCall) -> Me:
    """The key's organization, user and role, the key (its prefix, never the key) and what it may do."""
    caller = call.caller
    async with call.tenant() as db:
        key = await api_keys.get_api_key(db, organization_id=caller.organization_id, key_id=caller.api_key_id)
    write_refusal = writer_refusal(caller)  # the words the auth middleware's 403 gives a VIEWER's write
    listen_refusal = live_call_listen.resource.operation_of(live_call_listen.listen_to_live_call).refusal(caller)
    return Me(
        organization_id=caller.organization_id,
        user_id=caller.user_id,
        role=caller.role,
        api_key=ApiKeyView.of(key),
        can_write=write_refusal is None,
        write_refusal=write_refusal,
        can_listen=listen_refusal is None,
        listen_refusal=listen_refusal,
    )
