"""Bearer API keys: who is calling (organization, user, role), resolved once per request before any handler runs."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from engine.api.errors import ApiError
from engine.server.appkeys import DATABASE, SETTINGS
from storage.api_keys import ApiKeyHolder, authenticate_holder
from storage.api_rate_limits import RequestCount, count_request
from storage.enums import UserRole

LAST_USED_RESOLUTION = timedelta(minutes=1)
"""ApiKey.lastUsedAt is rewritten at most this often per key, so busy keys cost no write per request."""

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing: the only ones a VIEWER may use."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from: the key's organization, the key's user and that user's role there."""

    organization_id: str
    user_id: str
    api_key_id: str
    role: UserRole
    key_expires_at: datetime | None = None
    """When the key making the request stops working (None: never): no key it creates outlives it."""

    @property
    def can_write(self) -> bool:
        """Whether the caller may change anything (OWNER and ADMIN may; VIEWER may only read)."""
        return self.role is not UserRole.VIEWER


CALLER = web.RequestKey("api_caller", Caller)
"""Where the auth middleware leaves the caller for the handlers."""

RATE_LIMIT_HEADERS = web.RequestKey("api_rate_limit_headers", dict[str, str])
"""The X-RateLimit-* headers of a counted request, added to whatever answers it (errors included)."""

KEY_SUBPROTOCOL = "dialtone.key."
"""A WebSocket opened by a browser, which cannot set headers, offers its key as this subprotocol + base64url(key)."""

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="dialtone"'}


def unauthorized(message: str) -> ApiError:
    """401 with the message; the response names the scheme to use."""
    return ApiError(401, "unauthorized", message)


def auth_middleware(public_paths: frozenset[str]) -> Middleware:
    """Middleware: resolve `Authorization: Bearer <key>` to a Caller, count the request against the key's rate
    limit (429 past it), refuse writes from VIEWERs.

    Paths in `public_paths` (the OpenAPI document) need no key.
    """

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public_paths:
            return await handler(request)
        caller = request[CALLER] = await _caller(request)
        limit = request.config_dict[SETTINGS].api_rate_limit_per_minute
        if not limit:
            return await _authorized(request, handler, caller)
        counted = await count_request(
            request.config_dict[DATABASE].pool, api_key_id=caller.api_key_id, organization_id=caller.organization_id
        )
        request[RATE_LIMIT_HEADERS] = rate_limit_headers(counted, limit)
        if not counted.allowed(limit):
            refused = ApiError(
                429,
                "rate_limited",
                f"this API key made more than {limit} requests this minute; retry after {counted.retry_after} s",
            )
            refused.headers = {"Retry-After": str(counted.retry_after)}
            raise refused
        return await _authorized(request, handler, caller)

    return authenticate


async def _authorized(request: web.Request, handler: Handler, caller: Caller) -> web.StreamResponse:
    if request.method not in READ_METHODS:
        require_writer(caller)
    return await handler(request)


def require_writer(caller: Caller, doing: str | None = None) -> None:
    """403 unless the caller's role may change things (OWNER, ADMIN): every write, and the reads as sensitive as a
    write (`doing` names them, e.g. listening to a call, and the refusal says so)."""
    refusal = writer_refusal(caller, doing)
    if refusal is not None:
        raise ApiError(403, "forbidden", refusal)


def writer_refusal(caller: Caller, doing: str | None = None) -> str | None:
    """Why the caller may not do what only an OWNER or ADMIN may (`doing`, when named): the 403's message; None
    when the caller's role may."""
    if caller.can_write:
        return None
    message = "this API key's user is a VIEWER of the organization and can only read"
    if doing is not None:
        message = f"{message}: {doing} needs an OWNER's or ADMIN's key"
    return message


def rate_limit_headers(counted: RequestCount, limit: int) -> dict[str, str]:
    """The `X-RateLimit-*` headers: the key's limit a minute, what is left of it, and seconds until it resets."""
    return {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(counted.remaining(limit)),
        "X-RateLimit-Reset": str(counted.retry_after),
    }


async def add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: give a counted request's answer, whatever it is, its X-RateLimit-* headers."""
    response.headers.update(request.get(RATE_LIMIT_HEADERS, {}))


def presented_key(request: web.Request) -> str | None:
    """The key of `Authorization: Bearer`, or on a WebSocket upgrade of a `dialtone.key.<base64url>` subprotocol."""
    scheme, _, plaintext = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and plaintext.strip():
        return plaintext.strip()
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return None
    for offered in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        encoded = offered.strip().removeprefix(KEY_SUBPROTOCOL)
        if encoded != offered.strip():
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("ascii")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise _with_challenge(
                    unauthorized(f"the {KEY_SUBPROTOCOL}… subprotocol holds no base64url-encoded API key")
                ) from None
    return None


async def _caller(request: web.Request) -> Caller:
    plaintext = presented_key(request)
    if plaintext is None:
        raise _with_challenge(
            unauthorized(
                "send an API key as 'Authorization: Bearer sk_live_...' (a WebSocket may instead offer the "
                f"subprotocol '{KEY_SUBPROTOCOL}<the key in base64url>')"
            )
        )
    # Before the organization is known, so as the owner role: the key is what names the organization.
    holder = await authenticate_holder(
        request.config_dict[DATABASE].pool,
        plaintext=plaintext,
        now=datetime.now(UTC),
        touch_interval=LAST_USED_RESOLUTION,
    )
    return accepted_caller(holder)


def accepted_caller(holder: ApiKeyHolder | None) -> Caller:
    """The caller a presented key makes, as `authenticate_holder` found its holder; 401 (ApiError) if the key is
    refused: unknown, revoked or expired (None), or its user no longer an ACTIVE member of the key's organization."""
    if holder is None:
        raise _with_challenge(unauthorized("the API key is not valid: unknown, revoked or expired"))
    if holder.member_role is None:
        raise _with_challenge(unauthorized("the API key's user is no longer a member of its organization"))
    if not holder.usable:
        raise _with_challenge(
            unauthorized(
                f"the API key's user account is {holder.user_status.value}, not ACTIVE: its keys cannot be used"
            )
        )
    key = holder.api_key
    return Caller(
        organization_id=key.organization_id,
        user_id=key.user_id,
        api_key_id=key.id,
        role=holder.member_role,
        key_expires_at=key.expiration_date,
    )


def _with_challenge(error: ApiError) -> ApiError:
    error.headers = _CHALLENGE
    return error
