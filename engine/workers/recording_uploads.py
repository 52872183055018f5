"""Finished recordings into their store: a row per recording, uploads with retries, and the retention sweep.

At a call's end `RecordingUploads.finished` writes the recording's "CallRecording" row. With object storage, the
upload worker of every process claims its spool's PENDING rows under leases, uploads each file, and removes the
local file only once the store has confirmed it; a failed upload is retried later with a growing wait, by any
process whose state folder holds that spool (this one, a later run, or another replica sharing the folder). The
retention sweep deletes recordings older than DIALTONE_RECORDING_RETENTION_DAYS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiohttp import web

from config.settings import Settings
from engine.server.appkeys import DATABASE, RECORDING_KEY, SETTINGS
from media.recording import repair_wav_header
from storage import Pool, call_recordings, recording_deletions
from storage.call_recordings import CallRecording, ClaimedUpload, RecordingStatus
from storage.errors import DATABASE_ERRORS, InvalidReference
from storage.recording_stores import (
    RecordingStore,
    RecordingStoreError,
    object_key,
    open_recording_store,
    remove_recording,
)
from storage.recordings import recording_files, recording_path, recording_url

log = logging.getLogger(__name__)

LEFT_BEHIND_AFTER = timedelta(minutes=10)
"""How long a call's CallLog must have been closed and unchanged before its unrecorded file counts as left behind."""

SPOOL_ID_FILENAME = "recording_spool_id"
"""The file in the state folder naming its spool of recordings waiting for upload ("CallRecording"."spool")."""
CLAIM_BATCH = 4
UPLOAD_LEASE = timedelta(minutes=10)
RETENTION_INTERVAL = timedelta(hours=1)
RETENTION_BATCH = 500


def _utc_now() -> datetime:
    return datetime.now(UTC)


def retry_wait(settings: Settings, attempts: int) -> float:
    """Seconds before trying again a recording's store after `attempts` failed tries: from
    DIALTONE_RECORDING_UPLOAD_RETRY_INITIAL, doubling, up to DIALTONE_RECORDING_UPLOAD_RETRY_MAX."""
    return min(settings.recording_upload_retry_initial * 2.0 ** (attempts - 1), settings.recording_upload_retry_max)


def kept_at(settings: Settings, organization_id: str, call_log_id: str) -> tuple[str, Path]:
    """Where a call's recording is kept: its key in the store, and its file in this process's state folder. Made from
    the organization's and the call's ids, never read from the row's "objectKey" and "localPath": a row written
    wrongly (by code or SQL with the API role's grants) must not point a worker at another organization's recording
    or at another file of this host. RecordingStoreError for ids that are not an organization's and a call's."""
    try:
        return object_key(organization_id, call_log_id), recording_path(settings, organization_id, call_log_id)
    except ValueError as exc:
        raise RecordingStoreError(str(exc)) from None


def spool_id(state_dir: Path) -> str:
    """The id of the state folder's recording spool: made once (atomically), shared by every process using it."""
    path = state_dir / SPOOL_ID_FILENAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{SPOOL_ID_FILENAME}.")
        try:
            with os.fdopen(descriptor, "w", encoding="ascii") as file:
                file.write(secrets.token_hex(16) + "\n")
            with contextlib.suppress(FileExistsError):  # another process made it first: adopt theirs
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
    return path.read_text(encoding="ascii").strip()


class RecordingUploads:
    """This process's side of the recordings: rows at calls' ends, uploads of its spool, the retention sweep."""

    def __init__(
        self,
        pool: Pool,
        store: RecordingStore,
        settings: Settings,
        *,
        spool: str,
        key: bytes | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """Keep recordings in `store`; `spool` is this state folder's spool id. `key` signs the links of the
        recordings left behind by processes killed mid-call (without it, they get none)."""
        self._pool = pool
        self.store = store
        self._settings = settings
        self._spool = spool
        self._key = key
        self._clock = clock
        self._wake = asyncio.Event()

    @property
    def spool(self) -> str:
        """The id of this process's state folder, whose files it uploads and removes."""
        return self._spool

    async def finished(self, *, organization_id: str, call_log_id: str, path: Path, size: int) -> bool:
        """Record a call's finished recording file; with object storage, wake the uploader for it. Whether it was.

        A database that cannot take the row leaves the file where it is (served by this host): logged, never raised.
        A call deleted while it ran (its CallLog, or its organization) has no row to name its file: removed at once.
        """
        try:
            await call_recordings.add_recording(
                self._pool,
                organization_id=organization_id,
                call_log_id=call_log_id,
                store=self.store.name,
                object_key=object_key(organization_id, call_log_id),
                spool=self._spool,
                local_path=str(path),
                size=size,
                stored=not self.store.uploads,
                now=self._clock(),
            )
        except InvalidReference:
            await asyncio.to_thread(path.unlink, missing_ok=True)
            log.warning("recording of call %s removed: the call was deleted while it ran", call_log_id)
            return False
        except DATABASE_ERRORS as exc:
            log.error("recording of call %s stays in %s: could not record it (%s)", call_log_id, path, exc)
            return False
        if self.store.uploads:
            self._wake.set()
        return True

    async def adopt_left_behind(self, *, after: timedelta = LEFT_BEHIND_AFTER) -> int:
        """Record the recordings that processes killed mid-call left in the state folder, of calls closed at least
        `after` ago; how many.

        Crash recovery closes such a call without its recording, but the file holds its audio up to the last flush
        before the crash; its header, which counted only the first flush's audio, is made to count all of it. Once it
        has its row, it is uploaded, served and expired like any other, instead of staying on this disk unlisted and
        past the retention period; and its call gets the link a call's end gives it (CallLog.recordingUrl), when this
        process knows its public address (DIALTONE_PUBLIC_URL).
        """
        files = await asyncio.to_thread(recording_files, self._settings)
        if not files:
            return 0
        paths = {call_log_id: (organization_id, path) for organization_id, call_log_id, path in files}
        left = await call_recordings.ended_without_recording(
            self._pool,
            files=[(organization_id, call_log_id) for organization_id, call_log_id, _ in files],
            untouched_for=after,
        )
        for call_log_id in left:
            organization_id, path = paths[call_log_id]
            await asyncio.to_thread(repair_wav_header, path)
            size = (await asyncio.to_thread(path.stat)).st_size
            if await self.finished(organization_id=organization_id, call_log_id=call_log_id, path=path, size=size):
                await self._link(organization_id, call_log_id)
        if left:
            log.warning("recorded %d recordings that engine processes killed mid-call left behind", len(left))
        return len(left)

    async def remove_unneeded_files(self) -> int:
        """Remove the local files of recordings already uploaded (or deleted by retention) that a process killed
        between the store's confirmation and the file's removal left in the state folder, and those of calls deleted
        that no recording row named (deleted while they ran, or before their file was adopted); how many."""
        files = await asyncio.to_thread(recording_files, self._settings)
        if not files:
            return 0
        paths = {call_log_id: path for _, call_log_id, path in files}
        done = await call_recordings.no_longer_needed(
            self._pool, files=[(organization_id, call_log_id) for organization_id, call_log_id, _ in files]
        )
        for call_log_id in done:
            await asyncio.to_thread(paths[call_log_id].unlink, missing_ok=True)
        if done:
            log.warning("removed %d local recordings no longer needed (uploaded, expired, of deleted calls)", len(done))
        return len(done)

    async def _link(self, organization_id: str, call_log_id: str) -> None:
        """Store the signed link of an adopted recording in its call, as the call's end would have."""
        base = self._settings.public_url
        if self._key is None or base is None:
            log.warning(
                "recording of call %s has no link in CallLog.recordingUrl: without DIALTONE_PUBLIC_URL this process "
                "does not know the address a link must name (an API key of the organization fetches it)",
                call_log_id,
            )
            return
        url = recording_url(self._settings, base, call_log_id, key=self._key, now=self._clock())
        await call_recordings.link_recording(
            self._pool, organization_id=organization_id, call_log_id=call_log_id, url=url
        )

    async def upload_due(self) -> int:
        """Upload every recording of this spool due when the pass starts; how many are now stored.

        A recording that fails is due again only after its wait, so it is not tried twice in one pass.
        """
        stored = 0
        started = self._clock()
        while claims := await call_recordings.claim_due(
            self._pool, spool=self._spool, limit=CLAIM_BATCH, lease=UPLOAD_LEASE, due_by=started
        ):
            for claim in claims:
                stored += await self._upload(claim)
        return stored

    async def _upload(self, claim: ClaimedUpload) -> int:
        recording = claim.recording
        try:
            key, path = kept_at(self._settings, recording.organization_id, recording.call_log_id)
            if not await asyncio.to_thread(path.is_file):
                raise RecordingStoreError(f"{path}: the local recording file is missing")
            await self.store.put(key, path)
        except RecordingStoreError as exc:
            wait = retry_wait(self._settings, recording.attempt_count)
            log.warning("recording of call %s: %s; retrying in %.0f s", recording.call_log_id, exc, wait)
            await call_recordings.retry_later(
                self._pool, claim, error=str(exc), next_attempt_at=self._clock() + timedelta(seconds=wait)
            )
            return 0
        if not await call_recordings.mark_stored(self._pool, claim, now=self._clock()):
            await self._lost(recording)
            return 0
        # Only now, with the store's confirmation recorded, may the local copy go.
        await asyncio.to_thread(path.unlink, missing_ok=True)
        log.info("recording of call %s uploaded (%d bytes)", recording.call_log_id, recording.bytes)
        return 1

    async def _lost(self, recording: CallRecording) -> None:
        """An upload whose row was no longer this worker's to mark stored: another worker's after the lease ran out,
        or gone while the upload was under way (its call deleted, or retention deleted it). An object uploaded for a
        recording gone is queued for removal now: retention left it no queued removal, and the one its row's deletion
        queued (migration 0032) waits only for the end of the upload's lease, which this upload may have outlived."""
        current = await call_recordings.find_recording(self._pool, call_log_id=recording.call_log_id)
        if current is not None and current.id == recording.id and current.status is not RecordingStatus.DELETED:
            log.warning("recording of call %s: uploaded after its lease ran out", recording.call_log_id)
            return
        await recording_deletions.queue_object_deletion(self._pool, recording)
        log.warning(
            "recording of call %s: deleted while it was uploaded; its object is queued for removal",
            recording.call_log_id,
        )

    async def expire(self) -> int:
        """Delete the recordings older than the retention period; how many were deleted.

        Every expired recording is looked at, RETENTION_BATCH at a time: those this process must leave (another
        state folder's, another store's, or one its store would not delete now) stay behind without holding up
        the rest, and a backlog larger than one batch is cleared in one sweep.
        """
        days = self._settings.recording_retention_days
        if days is None:
            return 0
        deleted = 0
        cutoff = self._clock() - timedelta(days=days)
        after: tuple[datetime, str] | None = None
        while batch := await call_recordings.expired_recordings(
            self._pool, created_before=cutoff, limit=RETENTION_BATCH, after=after
        ):
            for recording in batch:
                deleted += await self._delete(recording)
            after = (batch[-1].created_at, batch[-1].id)
        if deleted:
            log.info("deleted %d recordings older than %d days", deleted, days)
        return deleted

    async def _delete(self, recording: CallRecording) -> int:
        """Delete an expired recording if this process can: 1 if it did, 0 if it is left for later or others."""
        local_only = recording.status is RecordingStatus.PENDING or recording.store == "local"
        if local_only and recording.spool != self._spool:
            return 0  # its file is in another state folder; a process using that one deletes it
        if not local_only and recording.store != self.store.name:
            return 0  # kept in a store this process is not configured for
        try:
            key, path = kept_at(self._settings, recording.organization_id, recording.call_log_id)
            if local_only:
                await remove_recording(self.store, key=None, local_file=path)
            else:
                await remove_recording(self.store, key=key, local_file=None)
        except RecordingStoreError as exc:
            log.warning("recording of call %s: not deleted yet (%s)", recording.call_log_id, exc)
            return 0
        await call_recordings.mark_deleted(self._pool, recording, now=self._clock(), object_removed=not local_only)
        return 1

    async def run(self) -> None:
        """Upload due recordings when woken or every DIALTONE_RECORDING_UPLOAD_INTERVAL; hourly (and at once), record
        those left behind by processes killed mid-call, remove local files no longer needed (copies a killed process
        left after their upload, files of deleted calls), and sweep the expired ones."""
        next_sweep = self._clock()
        while True:
            try:
                if self.store.uploads:
                    await self.upload_due()
                if self._clock() >= next_sweep:
                    next_sweep = self._clock() + RETENTION_INTERVAL
                    await self.adopt_left_behind()
                    await self.remove_unneeded_files()
                    await self.expire()
            except DATABASE_ERRORS as exc:
                log.warning("recording uploads: database unavailable (%s); retrying", exc)
            except Exception:  # the worker must outlive any one bad pass
                log.exception("recording uploads: pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._settings.recording_upload_interval)
            self._wake.clear()


RECORDING_UPLOADS = web.AppKey("recording_uploads", RecordingUploads)


async def recording_uploads_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the recording store and its worker under RECORDING_UPLOADS."""
    settings = app[SETTINGS]
    store = await open_recording_store(settings)
    spool = await asyncio.to_thread(spool_id, Path(settings.state_dir))
    uploads = RecordingUploads(app[DATABASE].pool, store, settings, spool=spool, key=app[RECORDING_KEY])
    app[RECORDING_UPLOADS] = uploads
    task = asyncio.create_task(uploads.run(), name="recording-uploads")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.aclose()
