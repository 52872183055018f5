"""The `Idempotency-Key` header: a creation retried with the same key and body is answered, not run, again.

An operation declared `idempotent=True` runs through `idempotent()` when the request carries the header: the key
is claimed for the caller's organization and operation before the handler runs, the handler's answer (success or
error) is kept, and a retry gets it back with `Idempotent-Replayed: true`. The same key with another body is a
422; a retry while the first request still runs is a 409. The two answers that say nothing was done and to try
again later (429, 503) are not kept: the key is released, so the retry runs. A handler that fails unexpectedly
may have done part of its work, so its key keeps a 500 answer: a retry never repeats a half-done creation. So does
a key whose request was lost with its process (no answer IN_FLIGHT_LIMIT after it was claimed), from its next retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta

from aiohttp import web

from engine.api.auth import CALLER
from engine.api.errors import ApiError, storage_refusal
from engine.server.appkeys import DATABASE, SETTINGS
from storage import Pool, idempotency_keys
from storage.errors import StorageError
from storage.idempotency_keys import ClaimState
from storage.tenancy import tenant_transaction

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
IN_FLIGHT_RETRY_AFTER_SECONDS = 1
IN_FLIGHT_LIMIT = timedelta(minutes=10)
"""Longer than any idempotent request runs (POST /v1/calls, the longest, waits at most DIALTONE_CALL_SLOT_WAIT, 120 s
at most, for a call slot and 10 s for Twilio): a key claimed this long ago with no answer was lost with its process."""

_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY_CHARS}}}")


def key_description() -> str:
    """What the header does, for the OpenAPI document."""
    return (
        "A unique value per intended operation (e.g. a UUID), at most 255 visible ASCII characters. A retry with the "
        "same key and body gets the first answer (`Idempotent-Replayed: true`) and creates nothing; the same key "
        "with another body is a 422; a retry while the first request runs is a 409. Keys expire after "
        "DIALTONE_IDEMPOTENCY_KEY_TTL seconds (24 h by default)."
    )


def request_hash(raw: bytes) -> str:
    """SHA-256 of the body's canonical JSON (keys sorted, no spaces), or of its bytes when it is not JSON (or nests
    too deeply, or holds a number too long, to parse: the request then gets its 400)."""
    try:
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSONDecodeError, or a number too long
        return hashlib.sha256(raw).hexdigest()
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


RETRY_LATER_STATUSES = frozenset({429, 503})
"""Answers that mean nothing was done: their key is released, not kept."""

_UNKNOWN_OUTCOME = ApiError(
    500,
    "internal_error",
    "the server failed while handling the first request with this Idempotency-Key; what it did is unknown, so it "
    "is not run again: check the resource, then use a new key",
)


async def idempotent(
    request: web.Request, operation: str, respond: Callable[[], Awaitable[web.Response]]
) -> web.Response:
    """Answer the request through its Idempotency-Key: the stored answer, or `respond()`'s, kept for retries."""
    key = request.headers[IDEMPOTENCY_HEADER]
    if not _KEY.fullmatch(key):
        raise ApiError(
            422,
            "invalid_value",
            f"{IDEMPOTENCY_HEADER}: 1 to {MAX_KEY_CHARS} visible ASCII characters, with no spaces",
            IDEMPOTENCY_HEADER,
        )
    organization_id = request[CALLER].organization_id
    pool = request.config_dict[DATABASE].pool
    ttl = timedelta(seconds=request.config_dict[SETTINGS].idempotency_key_ttl)
    names = {"organization_id": organization_id, "operation": operation, "key": key}
    body_hash = request_hash(await request.read())  # before the transaction: a slow body must hold no connection
    async with tenant_transaction(pool, organization_id) as db:
        claim = await idempotency_keys.claim_key(
            db, request_hash=body_hash, ttl=ttl, in_flight_limit=IN_FLIGHT_LIMIT, **names
        )
    match claim.state:
        case ClaimState.OTHER_REQUEST:
            raise ApiError(
                422,
                "idempotency_key_reused",
                f"this {IDEMPOTENCY_HEADER} was used with another request body; use a new key for a new request",
                IDEMPOTENCY_HEADER,
            )
        case ClaimState.IN_FLIGHT:
            busy = ApiError(
                409,
                "idempotency_key_in_flight",
                f"a request with this {IDEMPOTENCY_HEADER} is still running; retry shortly to get its answer",
                IDEMPOTENCY_HEADER,
            )
            busy.headers["Retry-After"] = str(IN_FLIGHT_RETRY_AFTER_SECONDS)
            raise busy
        case ClaimState.ABANDONED:  # the first request may have done part of its work: never run it again
            lost = _UNKNOWN_OUTCOME.response()
            await _keep(pool, names, lost)
            return lost
        case ClaimState.ANSWERED:
            assert claim.status is not None and claim.body is not None
            return web.Response(
                status=claim.status,
                text=claim.body,
                content_type="application/json",
                headers={REPLAYED_HEADER: "true"},
            )
    try:
        response = await _answer(respond)
    except BaseException:
        await asyncio.shield(_keep(pool, names, _UNKNOWN_OUTCOME.response()))
        raise
    await _keep(pool, names, response)
    return response


async def _answer(respond: Callable[[], Awaitable[web.Response]]) -> web.Response:
    """`respond()`'s answer, its refusals included: an ApiError, or a storage error the database refused the request
    with (a missing reference, a taken value), answered as error_middleware would, so a retry hears the same."""
    try:
        return await respond()
    except ApiError as exc:
        return exc.response()
    except StorageError as exc:
        refused = storage_refusal(exc)
        if refused is None:
            raise
        return refused.response()


async def _keep(pool: Pool, names: dict[str, str], response: web.Response) -> None:
    """Store the answer for the key's retries, or release the key when the answer says to try again later."""
    async with tenant_transaction(pool, names["organization_id"]) as db:
        if response.status in RETRY_LATER_STATUSES or response.text is None:
            await idempotency_keys.release_key(db, **names)
        else:
            await idempotency_keys.store_answer(db, status=response.status, body=response.text, **names)
