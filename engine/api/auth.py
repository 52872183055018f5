"""Bearer API keys: who is calling (organization, user, role), resolved once per request before any handler runs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from engine.api.errors import ApiError
from engine.server.appkeys import DATABASE
from storage.api_keys import authenticate_holder
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

    @property
    def can_write(self) -> bool:
        """Whether the caller may change anything (OWNER and ADMIN may; VIEWER may only read)."""
        return self.role is not UserRole.VIEWER


CALLER = web.RequestKey("api_caller", Caller)
"""Where the auth middleware leaves the caller for the handlers."""

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="dialtone"'}


def unauthorized(message: str) -> ApiError:
    """401 with the message; the response names the scheme to use."""
    return ApiError(401, "unauthorized", message)


def auth_middleware(public_paths: frozenset[str]) -> Middleware:
    """Middleware: resolve `Authorization: Bearer <key>` to a Caller, refuse writes from VIEWERs.

    Paths in `public_paths` (the OpenAPI document) need no key.
    """

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public_paths:
            return await handler(request)
        request[CALLER] = await _caller(request)
        if request.method not in READ_METHODS and not request[CALLER].can_write:
            raise ApiError(403, "forbidden", "this API key's user is a VIEWER of the organization and can only read")
        return await handler(request)

    return authenticate


async def _caller(request: web.Request) -> Caller:
    scheme, _, plaintext = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not plaintext.strip():
        raise _with_challenge(unauthorized("send an API key as 'Authorization: Bearer sk_live_...'"))
    # Before the organization is known, so as the owner role: the key is what names the organization.
    holder = await authenticate_holder(
        request.config_dict[DATABASE].pool,
        plaintext=plaintext.strip(),
        now=datetime.now(UTC),
        touch_interval=LAST_USED_RESOLUTION,
    )
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
    return Caller(organization_id=key.organization_id, user_id=key.user_id, api_key_id=key.id, role=holder.member_role)


def _with_challenge(error: ApiError) -> ApiError:
    error.headers = _CHALLENGE
    return error
