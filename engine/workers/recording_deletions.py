"""Recordings of deleted calls removed from their store: the queue a trigger fills when a call goes (migration 0030).

The dashboard deletes CallLogs and organizations in SQL; their recordings' rows go with them, and a trigger queues
what is left to remove. Every process takes the queued removals it can carry out under a lease (those of its store,
and, for a file that may still be on a disk, of its state folder), removes the object and the file, and drops the
row; a store that fails is tried again later with a growing wait, so an outage delays the removal, never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

from aiohttp import web

from config.settings import Settings
from engine.server.appkeys import DATABASE, SETTINGS
from engine.workers.recording_uploads import RECORDING_UPLOADS, kept_at, retry_wait
from storage import Pool, recording_deletions
from storage.errors import DATABASE_ERRORS
from storage.recording_deletions import ClaimedDeletion
from storage.recording_stores import RecordingStore, RecordingStoreError, remove_recording

log = logging.getLogger(__name__)

CLAIM_BATCH = 16
DELETION_LEASE = timedelta(minutes=5)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class RecordingDeletions:
    """This process's share of the recordings of deleted calls: removed from `store` and from its state folder."""

    def __init__(
        self,
        pool: Pool,
        store: RecordingStore,
        settings: Settings,
        *,
        spool: str,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """Remove recordings kept in `store`, and files in the state folder whose spool id is `spool`."""
        self._pool = pool
        self._store = store
        self._settings = settings
        self._spool = spool
        self._clock = clock

    async def delete_due(self) -> int:
        """Remove every queued recording this process can that is due when the pass starts; how many were removed.

        A removal that fails is due again only after its wait, so it is not tried twice in one pass.
        """
        removed = 0
        started = self._clock()
        while claims := await recording_deletions.claim_due(
            self._pool,
            spool=self._spool,
            store=self._store.name,
            limit=CLAIM_BATCH,
            lease=DELETION_LEASE,
            due_by=started,
        ):
            for claim in claims:
                removed += await self._remove(claim)
        return removed

    async def _remove(self, claim: ClaimedDeletion) -> int:
        deletion = claim.deletion
        try:
            key, path = kept_at(self._settings, deletion.organization_id, deletion.call_log_id)
            await remove_recording(
                self._store,
                key=key if deletion.store != "local" else None,
                local_file=path if deletion.on_disk else None,
            )
        except RecordingStoreError as exc:
            wait = retry_wait(self._settings, deletion.attempt_count)
            log.warning("recording of deleted call %s: %s; retrying in %.0f s", deletion.call_log_id, exc, wait)
            await recording_deletions.retry_later(
                self._pool, claim, error=str(exc), next_attempt_at=self._clock() + timedelta(seconds=wait)
            )
            return 0
        if not await recording_deletions.forget(self._pool, claim):
            return 0  # removed after the lease ran out: another worker has it again, and finds it gone
        log.info("recording of deleted call %s removed", deletion.call_log_id)
        return 1

    async def run(self) -> None:
        """Remove due recordings every DIALTONE_RECORDING_UPLOAD_INTERVAL, until cancelled."""
        while True:
            try:
                await self.delete_due()
            except DATABASE_ERRORS as exc:
                log.warning("recording deletions: database unavailable (%s); retrying", exc)
            except Exception:  # the worker must outlive any one bad pass
                log.exception("recording deletions: pass failed")
            await asyncio.sleep(self._settings.recording_upload_interval)


async def recording_deletions_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the worker removing the recordings of deleted calls, through the uploads' store."""
    uploads = app[RECORDING_UPLOADS]
    deletions = RecordingDeletions(app[DATABASE].pool, uploads.store, app[SETTINGS], spool=uploads.spool)
    task = asyncio.create_task(deletions.run(), name="recording-deletions")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
