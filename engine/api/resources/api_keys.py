"""/v1/api-keys: the organization's API keys; the plaintext is returned once, at creation, and never again."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field, field_validator

from engine.api.errors import unprocessable
from engine.api.models import Name, RequestModel, ResponseModel, Timestamp
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from storage import api_keys
from storage.api_keys import ApiKey
from storage.enums import ApiKeyStatus

resource = Resource("API keys", "Bearer keys for this API. Only a SHA-256 hash of each key is stored.")


class ApiKeyView(ResponseModel):
    """An API key as listed: its display prefix, never the key."""

    id: str
    name: str
    key_prefix: str
    mode: Literal["live", "test"]
    user_id: str
    status: ApiKeyStatus
    expiration_date: datetime | None
    last_used_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyView:
        """The view of a stored key."""
        return cls(
            id=key.id,
            name=key.name,
            key_prefix=key.key_prefix,
            mode="live" if key.live else "test",
            user_id=key.user_id,
            status=key.status,
            expiration_date=key.expiration_date,
            last_used_at=key.last_used_at,
            created_at=key.created_at,
        )


class CreatedApiKeyView(ApiKeyView):
    """A key just created, with its plaintext: store it now, it is not shown again."""

    key: str


class ApiKeyCreate(RequestModel):
    """A new key for the caller's user in the caller's organization."""

    name: Name
    mode: Literal["live", "test"] = Field("live", description="live keys start sk_live_, test keys sk_test_.")
    expiration_date: Timestamp | None = Field(
        None,
        description="When the key stops working; never if absent. A key that expires makes only keys that expire no "
        "later than it does (absent: the same time).",
    )

    @field_validator("expiration_date")
    @classmethod
    def _future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value <= datetime.now(UTC):
            raise ValueError("must be in the future")
        return value


@resource.get("/api-keys", summary="List API keys", response=Page[ApiKeyView], query=PageQuery)
async def list_api_keys(call: ApiCall) -> Page[ApiKeyView]:
    """The organization's keys, revoked ones included, newest first; only their prefixes."""
    query = call.query_as(PageQuery)
    async with call.tenant() as db:
        rows = await api_keys.list_api_keys_page(
            db, organization_id=call.caller.organization_id, limit=query.fetch_limit, before=query.position()
        )
    return to_page(Page[ApiKeyView], [ApiKeyView.of(row) for row in rows], query)


@resource.post("/api-keys", summary="Create an API key", response=CreatedApiKeyView, body=ApiKeyCreate)
async def create_api_key(call: ApiCall) -> CreatedApiKeyView:
    """Create a key owned by the caller's user; the response is the only time the key itself is shown.

    A key that expires cannot make one that outlives it: without `expirationDate` the new key expires with it, and a
    later one is a 422.
    """
    body = call.body_as(ApiKeyCreate)
    expiration_date, limit = body.expiration_date, call.caller.key_expires_at
    if limit is not None:
        if expiration_date is not None and expiration_date > limit:
            raise unprocessable(
                f"body expirationDate: must not be after {limit.isoformat()}, when the key making this request expires",
                "expirationDate",
            )
        expiration_date = expiration_date or limit
    async with call.tenant() as db:
        created = await api_keys.create_api_key(
            db,
            organization_id=call.caller.organization_id,
            user_id=call.caller.user_id,
            name=body.name,
            live=body.mode == "live",
            expiration_date=expiration_date,
        )
    view = ApiKeyView.of(created.api_key)
    return CreatedApiKeyView(**view.model_dump(), key=created.plaintext)


@resource.get("/api-keys/{apiKeyId}", summary="Get an API key", response=ApiKeyView)
async def get_api_key(call: ApiCall) -> ApiKeyView:
    """One key, by its prefix."""
    async with call.tenant() as db:
        key = await api_keys.get_api_key(db, organization_id=call.caller.organization_id, key_id=call.path["apiKeyId"])
    return ApiKeyView.of(key)


@resource.post("/api-keys/{apiKeyId}/revoke", summary="Revoke an API key", response=ApiKeyView, status=200)
async def revoke_api_key(call: ApiCall) -> ApiKeyView:
    """Revoke a key for good (revoking twice is harmless); requests with it get 401 from then on."""
    async with call.tenant() as db:
        key = await api_keys.revoke_api_key(
            db, organization_id=call.caller.organization_id, key_id=call.path["apiKeyId"]
        )
    return ApiKeyView.of(key)
