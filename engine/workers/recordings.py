"""GET /recordings/{id}.wav: a call's recording, for a valid signed URL or an API key of its organization."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from engine.api.auth import LAST_USED_RESOLUTION
from engine.server.appkeys import DATABASE, RECORDING_KEY, SETTINGS
from engine.workers.recording_uploads import RECORDING_UPLOADS
from storage import call_recordings
from storage.api_keys import authenticate_holder
from storage.call_recordings import RecordingStatus
from storage.errors import DATABASE_ERRORS
from storage.recording_stores import LocalFile, RecordingStoreError, RemoteLink, object_key
from storage.recordings import (
    RECORDING_ID,
    load_secret_key,
    recording_owner,
    recording_path,
    verify_recording_signature,
)

log = logging.getLogger(__name__)

RECORDING_ROUTE = "/recordings/{call_log_id}.wav"
"""The route `handle_recording` serves."""


async def recordings_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: load (or make, once) the signing key and keep it under RECORDING_KEY."""
    app[RECORDING_KEY] = await asyncio.to_thread(load_secret_key, app[SETTINGS])
    yield


async def handle_recording(request: web.Request) -> web.StreamResponse:
    """200 with the WAV (ranges honoured) for a valid signature or an owner's API key; 302 to a short-lived
    presigned URL when the recording is in object storage.

    403 for a bad or expired signature, 401 for a missing or invalid key, 404 for a recording that does not
    exist or is another organization's (never saying which).
    """
    call_log_id = request.match_info["call_log_id"]
    if not RECORDING_ID.fullmatch(call_log_id):
        return _error(404, "no such recording")
    db = request.app[DATABASE].pool
    now = datetime.now(UTC)
    query = request.rel_url.query
    try:
        if "signature" in query or "expires" in query:
            signed = verify_recording_signature(
                call_log_id,
                expires=query.get("expires", ""),
                signature=query.get("signature", ""),
                key=request.app[RECORDING_KEY],
                now=now,
            )
            if not signed:
                return _error(403, "the recording link is invalid or has expired")
            organization_id = await recording_owner(db, call_log_id=call_log_id)
        else:
            scheme, _, plaintext = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not plaintext:
                return _error(401, "send a signed recording link, or an API key as 'Authorization: Bearer <key>'")
            holder = await authenticate_holder(
                db, plaintext=plaintext.strip(), now=now, touch_interval=LAST_USED_RESOLUTION
            )
            if holder is None or not holder.usable:
                return _error(
                    401, "the API key is invalid, revoked or expired, or its user is no longer an active member"
                )
            owner = await recording_owner(db, call_log_id=call_log_id)
            organization_id = owner if owner == holder.api_key.organization_id else None
    except DATABASE_ERRORS as exc:
        log.warning("recording %s: database unavailable (%s: %s)", call_log_id, type(exc).__name__, exc)
        return _error(503, "the database is unavailable; try again shortly")
    if organization_id is None:
        return _error(404, "no such recording")
    return await _serve(request, organization_id, call_log_id)


async def _serve(request: web.Request, organization_id: str, call_log_id: str) -> web.StreamResponse:
    """The recording's file, or a redirect to where the store serves it."""
    try:
        where = await _locate(request.app, organization_id, call_log_id)
    except DATABASE_ERRORS as exc:
        log.warning("recording %s: database unavailable (%s: %s)", call_log_id, type(exc).__name__, exc)
        return _error(503, "the database is unavailable; try again shortly")
    except RecordingStoreError as exc:
        log.warning("recording %s: %s", call_log_id, exc)
        return _error(503, "the recording store is unavailable; try again shortly")
    match where:
        case LocalFile(path):
            return web.FileResponse(path, headers={"Content-Type": "audio/wav", "Cache-Control": "private, no-store"})
        case RemoteLink(url):
            raise web.HTTPFound(url, headers={"Cache-Control": "private, no-store"})
        case _:
            return _error(404, "no such recording")


async def _locate(app: web.Application, organization_id: str, call_log_id: str) -> LocalFile | RemoteLink | None:
    """Where this process can serve the recording from: its own disk, or the store the recording's row names."""
    local = recording_path(app[SETTINGS], organization_id, call_log_id)
    recording = await call_recordings.find_recording(app[DATABASE].pool, call_log_id=call_log_id)
    if recording is None or recording.status is RecordingStatus.PENDING:
        # Not yet uploaded (or made before recordings had rows): only the host whose disk has it can serve it.
        return LocalFile(local) if await asyncio.to_thread(local.is_file) else None
    if recording.status is RecordingStatus.DELETED:
        return None
    store = app[RECORDING_UPLOADS].store
    if recording.store != store.name:
        raise RecordingStoreError(f"the recording is kept in the {recording.store} store, not configured here")
    # The key is the call's, not the row's: a row written wrongly never serves another organization's recording.
    return await store.locate(object_key(organization_id, call_log_id), expires_in=app[SETTINGS].recording_link_ttl)


def _error(status: int, message: str) -> web.Response:
    headers: dict[str, Any] = {"WWW-Authenticate": 'Bearer realm="dialtone"'} if status == 401 else {}
    return web.json_response({"error": message}, status=status, headers=headers)
