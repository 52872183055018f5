"""Recording uploads and removals of a `dialtone serve` killed at the worst instant: the store has taken (or deleted)
the object, the row does not say so yet. A proxy in front of the S3 store (moto on loopback) passes the object's PUT
or DELETE through and holds the store's answer; the process is SIGKILLed while it waits, and a new process on the
same database and state folder finishes the work: nothing is lost, and nothing stays in the bucket that no row
accounts for.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from config.settings import Settings, load_settings
from engine.workers.recording_uploads import RecordingUploads, spool_id
from storage import call_recordings
from storage.call_recordings import RecordingStatus
from storage.organizations import create_organization
from storage.recording_stores import object_key
from storage.recordings import recording_path
from tests.fakes.server import serve
from tests.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, s3_server
from tests.test_drain_processes import engine
from tests.test_recording_deletions import keys_in, uploaded_recording
from tests.test_recording_object_storage import WAV, make_bucket, recording_file, store_for
from tests.test_repo_call_logs import open_call
from tests.test_webhook_delivery import eventually
from tests.test_webhook_fairness import fresh

__all__ = ["fresh"]  # fixture: a database per test

RETENTION_DAYS = 30
_HOP_BY_HOP = frozenset({"host", "content-length", "transfer-encoding", "expect", "connection"})


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


class HoldingS3Proxy:
    """Forwards S3 requests to the store; an object's `held` request (PUT, DELETE) reaches the store, and its answer
    is held for ever."""

    def __init__(self, store_url: str, held: str) -> None:
        self._store_url = store_url
        self._held = held
        self.store_acted = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Forward `request`; for an object's held request, signal that the store has acted and never answer."""
        headers = {name: value for name, value in request.headers.items() if name.lower() not in _HOP_BY_HOP}
        body = await request.read()
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                request.method, self._store_url + request.path_qs, headers=headers, data=body, allow_redirects=False
            ) as answer,
        ):
            status, answer_headers, answer_body = answer.status, answer.headers.copy(), await answer.read()
        bucket_and_key = request.path.strip("/").split("/", 1)
        if request.method == self._held and len(bucket_and_key) == 2 and status < 300:
            self.store_acted.set()
            await asyncio.Event().wait()  # the uploader waits for the store's answer until it is killed
        kept = {name: value for name, value in answer_headers.items() if name.lower() not in _HOP_BY_HOP}
        return web.Response(status=status, headers=kept, body=answer_body)


@asynccontextmanager
async def holding_proxy(store_url: str, held: str) -> AsyncIterator[tuple[str, HoldingS3Proxy]]:
    """A HoldingS3Proxy in front of `store_url` on loopback, holding the answers to `held`: its URL, and the proxy."""
    proxy = HoldingS3Proxy(store_url, held)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    async with serve(app) as url:
        yield url, proxy


def store_environment(settings: Settings, endpoint_url: str) -> dict[str, str]:
    """A `dialtone serve`'s settings keeping recordings in the settings' bucket, reached at `endpoint_url`."""
    assert settings.s3_bucket is not None
    return {
        "DIALTONE_RECORDING_STORE": "s3",
        "DIALTONE_S3_BUCKET": settings.s3_bucket,
        "DIALTONE_S3_ENDPOINT_URL": endpoint_url,
        "DIALTONE_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "DIALTONE_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "DIALTONE_RECORDING_UPLOAD_INTERVAL": "0.1",
        "DIALTONE_RECORDING_RETENTION_DAYS": str(RETENTION_DAYS),
    }


async def killed_after_the_store_took_it(
    database_url: str, pool: asyncpg.Pool, s3: S3Server, tmp_path: Path, *, made: datetime
) -> tuple[Settings, str, str]:
    """A call's recording (made at `made`) whose upload a `dialtone serve` was killed in, the object in the bucket
    and its row still PENDING under that upload's lease: the settings, the organization's id, the call's id."""
    settings = load_settings(state_dir=tmp_path / "state", **s3.settings(f"killed-{secrets.token_hex(3)}"))
    await make_bucket(settings)
    organization = await create_organization(pool, name="Killed", slug=f"killed-upload-{secrets.token_hex(3)}")
    call = await open_call(pool, organization.id)
    path = recording_file(settings, organization.id, call.id)
    async with store_for(settings) as store:
        uploads = RecordingUploads(pool, store, settings, spool=spool_id(settings.state_dir), clock=lambda: made)
        assert await uploads.finished(organization_id=organization.id, call_log_id=call.id, path=path, size=len(WAV))
    async with (
        holding_proxy(s3.endpoint_url, "PUT") as (proxy_url, proxy),
        engine(database_url, tmp_path, drain_seconds=1, **store_environment(settings, proxy_url)) as doomed,
    ):
        await asyncio.wait_for(proxy.store_acted.wait(), 60)
        doomed.process.kill()  # SIGKILL: the store has the object, the row does not say so
        await doomed.process.wait()
    row = await call_recordings.find_recording(pool, call_log_id=call.id)
    assert row is not None and row.status is RecordingStatus.PENDING and row.attempt_count == 1
    assert await keys_in(settings) == [settings.s3_prefix + object_key(organization.id, call.id)]
    assert path.is_file()
    return settings, organization.id, call.id


async def lease_run_out(pool: asyncpg.Pool, table: str, call_log_id: str) -> None:
    """The killed upload's lease (or a removal held for it) has ended, as it would 10 minutes on."""
    await pool.execute(
        f'UPDATE "{table}" SET "leasedUntil" = now() - interval \'1 second\', '
        f'"nextAttemptAt" = now() - interval \'1 second\' WHERE "callLogId" = $1',
        call_log_id,
    )


async def becomes(pool: asyncpg.Pool, call_log_id: str, status: RecordingStatus) -> None:
    """Wait until the call's recording row is in `status`."""

    async def reached() -> bool:
        row = await call_recordings.find_recording(pool, call_log_id=call_log_id)
        return row is not None and row.status is status

    await eventually(reached, f"the recording to be {status}")


async def test_an_upload_killed_after_the_store_took_it_is_uploaded_again_by_the_next_process(
    s3: S3Server, fresh: tuple[str, asyncpg.Pool], tmp_path: Path
) -> None:
    database_url, pool = fresh
    settings, organization_id, call_log_id = await killed_after_the_store_took_it(
        database_url, pool, s3, tmp_path, made=datetime.now(UTC)
    )
    await lease_run_out(pool, "CallRecording", call_log_id)
    async with engine(database_url, tmp_path, drain_seconds=1, **store_environment(settings, s3.endpoint_url)):
        await becomes(pool, call_log_id, RecordingStatus.STORED)
    assert await keys_in(settings) == [settings.s3_prefix + object_key(organization_id, call_log_id)]
    assert not recording_path(settings, organization_id, call_log_id).exists()


async def test_a_recording_retention_deletes_while_a_killed_upload_left_its_object_leaves_no_object_behind(
    s3: S3Server, fresh: tuple[str, asyncpg.Pool], tmp_path: Path
) -> None:
    # A backlog of uploads older than the retention (the store was failing for days): the next process, started at
    # once, finds the killed upload's lease still on, and its retention sweep deletes the recording.
    database_url, pool = fresh
    made = datetime.now(UTC) - timedelta(days=RETENTION_DAYS + 1)
    settings, organization_id, call_log_id = await killed_after_the_store_took_it(
        database_url, pool, s3, tmp_path, made=made
    )
    async with engine(database_url, tmp_path, drain_seconds=1, **store_environment(settings, s3.endpoint_url)):
        await becomes(pool, call_log_id, RecordingStatus.DELETED)  # by retention
        assert not recording_path(settings, organization_id, call_log_id).exists()
        await lease_run_out(pool, "RecordingDeletion", call_log_id)

        async def bucket_empty() -> bool:
            return await keys_in(settings) == []

        await eventually(bucket_empty, "the object the killed upload put to be removed")
    assert await pool.fetchval('SELECT count(*) FROM "RecordingDeletion" WHERE "callLogId" = $1', call_log_id) == 0


async def test_a_removal_killed_after_the_store_deleted_the_object_is_finished_by_the_next_process(
    s3: S3Server, fresh: tuple[str, asyncpg.Pool], tmp_path: Path
) -> None:
    database_url, pool = fresh
    settings = load_settings(state_dir=tmp_path / "state", **s3.settings(f"removed-{secrets.token_hex(3)}"))
    await make_bucket(settings)
    organization = await create_organization(pool, name="Removed", slug=f"killed-removal-{secrets.token_hex(3)}")
    async with store_for(settings) as store:
        call_log_id, _ = await uploaded_recording(pool, store, settings, organization.id)
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call_log_id)  # as the dashboard does; queued
    async with (
        holding_proxy(s3.endpoint_url, "DELETE") as (proxy_url, proxy),
        engine(database_url, tmp_path, drain_seconds=1, **store_environment(settings, proxy_url)) as doomed,
    ):
        await asyncio.wait_for(proxy.store_acted.wait(), 60)
        doomed.process.kill()  # SIGKILL: the object is gone, its queued removal is not
        await doomed.process.wait()
    assert await keys_in(settings) == []
    assert await pool.fetchval('SELECT count(*) FROM "RecordingDeletion" WHERE "callLogId" = $1', call_log_id) == 1
    await lease_run_out(pool, "RecordingDeletion", call_log_id)
    async with engine(database_url, tmp_path, drain_seconds=1, **store_environment(settings, s3.endpoint_url)):

        async def forgotten() -> bool:
            queued: int = await pool.fetchval(
                'SELECT count(*) FROM "RecordingDeletion" WHERE "callLogId" = $1', call_log_id
            )
            return queued == 0

        await eventually(forgotten, "the next process to finish the removal")
    assert await keys_in(settings) == []
