"""Recordings in S3-compatible object storage: uploaded at the call's end with retries, the local file removed only
once the store confirmed it, served by a redirect to a short-lived presigned URL, and deleted after retention.

The store is moto's S3 server on loopback, spoken to by the engine's real aiobotocore client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import operator
import signal
import wave
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from config.settings import Settings, SettingsError, load_settings
from engine.simulator import Pause
from engine.workers import recording_uploads
from engine.workers.recording_uploads import RecordingUploads, spool_id
from storage import call_logs, call_recordings
from storage.call_recordings import RecordingStatus
from storage.end_reasons import EndReason
from storage.organizations import create_organization
from storage.recording_stores import (
    LocalFile,
    ObjectRecordingStore,
    RecordingStore,
    RemoteLink,
    object_key,
    open_recording_store,
)
from storage.recordings import recording_path
from tests.databases import TestDatabases
from tests.engine_server import running_engine
from tests.s3_server import S3Server, s3_server
from tests.test_api_auth import make_tenant
from tests.test_calls_e2e import TOKEN, call, call_log, finished_call_log, make_line
from tests.test_drain_processes import engine, held_call, line
from tests.test_repo_call_logs import open_call

WAV = b"RIFF" + b"\x00" * 40 + b"recorded audio"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@contextlib.asynccontextmanager
async def store_for(settings: Settings) -> AsyncIterator[RecordingStore]:
    store = await open_recording_store(settings)
    try:
        yield store
    finally:
        await store.aclose()


async def make_bucket(settings: Settings) -> None:
    async with store_for(settings) as store:
        assert isinstance(store, ObjectRecordingStore)
        await store._client.create_bucket(Bucket=settings.s3_bucket)


async def fetch(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, allow_redirects=False) as response:
        return response.status, await response.read()


def recording_file(settings: Settings, organization_id: str, call_log_id: str) -> Path:
    path = recording_path(settings, organization_id, call_log_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(WAV)
    return path


async def closed_an_hour_ago(pool: asyncpg.Pool, call_log_id: str) -> None:
    """Recovery closed the call, and the post-call sweep had its say, long enough ago (the touch trigger would say
    now)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute('ALTER TABLE "CallLog" DISABLE TRIGGER "CallLog_touch_updatedAt"')
        await conn.execute(
            """
            UPDATE "CallLog" SET "updatedAt" = now() - interval '1 hour',
                                 "metadata" = "metadata" || '{"analysis": {"skipped": "the call did not connect"}}'
            WHERE "id" = $1
            """,
            call_log_id,
        )
        await conn.execute('ALTER TABLE "CallLog" ENABLE TRIGGER "CallLog_touch_updatedAt"')


def test_object_storage_without_a_bucket_is_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="DIALTONE_S3_BUCKET"):
        load_settings(state_dir=tmp_path, recording_store="s3")


async def test_an_object_store_keeps_a_file_and_hands_out_a_presigned_link_to_it(s3: S3Server, tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, **s3.settings("links"))
    await make_bucket(settings)
    source = tmp_path / "a.wav"
    source.write_bytes(WAV)
    async with store_for(settings) as store:
        await store.put("org/a.wav", source)
        link = await store.locate("org/a.wav", expires_in=60)
        assert isinstance(link, RemoteLink)
        assert "X-Amz-Expires=60" in link.url
        assert await fetch(link.url) == (200, WAV)
        await store.delete("org/a.wav")
        assert (await fetch(link.url))[0] in (403, 404)  # S3 answers 403 when the key is gone


async def test_a_failed_upload_is_retried_later_and_the_local_file_kept_until_the_store_confirms(
    s3: S3Server, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    settings = load_settings(state_dir=tmp_path, **s3.settings("retried", recording_upload_retry_initial=0.01))
    organization = await create_organization(pool, name="Uploads", slug="uploads-retry")
    log = await open_call(pool, organization.id)
    path = recording_file(settings, organization.id, log.id)
    async with store_for(settings) as store:
        uploads = RecordingUploads(pool, store, settings, spool=spool_id(tmp_path))
        await uploads.finished(organization_id=organization.id, call_log_id=log.id, path=path, size=len(WAV))
        assert await uploads.upload_due() == 0  # the bucket does not exist yet: the upload fails
        row = await call_recordings.find_recording(pool, call_log_id=log.id)
        assert row is not None and row.status is RecordingStatus.PENDING
        assert row.last_error is not None and "NoSuchBucket" in row.last_error
        assert path.is_file()

        await make_bucket(settings)
        await asyncio.sleep(0.02)  # the retry's wait
        assert await uploads.upload_due() == 1
        row = await call_recordings.find_recording(pool, call_log_id=log.id)
        assert row is not None and row.status is RecordingStatus.STORED and row.attempt_count == 2
        assert not path.exists()
        link = await store.locate(object_key(organization.id, log.id), expires_in=60)
        assert isinstance(link, RemoteLink)
        assert await fetch(link.url) == (200, WAV)


async def test_uploads_of_another_spool_are_left_to_the_processes_that_have_its_files(
    s3: S3Server, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    settings = load_settings(state_dir=tmp_path / "a", **s3.settings("spools"))
    await make_bucket(settings)
    organization = await create_organization(pool, name="Spools", slug="uploads-spools")
    log = await open_call(pool, organization.id)
    path = recording_file(settings, organization.id, log.id)
    async with store_for(settings) as store:
        mine = RecordingUploads(pool, store, settings, spool=spool_id(tmp_path / "a"))
        other = RecordingUploads(pool, store, settings, spool=spool_id(tmp_path / "b"))
        await mine.finished(organization_id=organization.id, call_log_id=log.id, path=path, size=len(WAV))
        assert await other.upload_due() == 0
        assert await mine.upload_due() == 1


async def test_a_recording_left_by_a_process_killed_mid_call_is_uploaded_once_recovery_has_closed_its_call(
    s3: S3Server, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    settings = load_settings(state_dir=tmp_path, **s3.settings("left-behind"))
    await make_bucket(settings)
    organization = await create_organization(pool, name="Left behind", slug="uploads-left-behind")
    closed = await open_call(pool, organization.id)
    running = await open_call(pool, organization.id)
    closed_file = recording_file(settings, organization.id, closed.id)
    running_file = recording_file(settings, organization.id, running.id)
    # Its process was killed mid-call: recovery closed the call, and no recording row was ever written.
    await call_logs.fail_unstarted(pool, closed, EndReason.ENGINE_LOST)
    async with store_for(settings) as store:
        uploads = RecordingUploads(pool, store, settings, spool=spool_id(tmp_path))
        assert await uploads.adopt_left_behind() == 0, "closed a moment ago: a live process may be about to record it"

        assert await uploads.adopt_left_behind(after=timedelta(0)) == 1
        assert await uploads.upload_due() == 1
        assert await uploads.adopt_left_behind(after=timedelta(0)) == 0

        row = await call_recordings.find_recording(pool, call_log_id=closed.id)
        assert row is not None and row.status is RecordingStatus.STORED and row.bytes == len(WAV)
        assert not closed_file.exists()
        link = await store.locate(object_key(organization.id, closed.id), expires_in=60)
        assert isinstance(link, RemoteLink)
        assert await fetch(link.url) == (200, WAV)
        # A call still in progress is its process's to record.
        assert await call_recordings.find_recording(pool, call_log_id=running.id) is None
        assert running_file.is_file()


async def test_a_local_copy_left_by_a_process_killed_after_its_upload_is_removed_by_the_next_start(
    s3: S3Server, pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    overrides: dict[str, Any] = s3.settings("left-after-upload")
    settings = load_settings(state_dir=tmp_path, **overrides)
    await make_bucket(settings)
    organization = await create_organization(pool, name="Uploaded", slug="uploads-left-after-upload")
    uploaded, waiting = await open_call(pool, organization.id), await open_call(pool, organization.id)
    async with store_for(settings) as store:
        uploads = RecordingUploads(pool, store, settings, spool=spool_id(tmp_path))
        path = recording_file(settings, organization.id, uploaded.id)
        await uploads.finished(organization_id=organization.id, call_log_id=uploaded.id, path=path, size=len(WAV))
        assert await uploads.upload_due() == 1
    # Its process was killed once the store's confirmation was recorded, before it removed the file.
    left = recording_file(settings, organization.id, uploaded.id)
    # Another file waits for an upload that fails: its row stays PENDING, and the file is kept.
    other = recording_file(settings, organization.id, waiting.id)
    await call_recordings.add_recording(
        pool,
        organization_id=organization.id,
        call_log_id=waiting.id,
        store="s3",
        object_key=object_key(organization.id, waiting.id),
        spool=spool_id(tmp_path),
        local_path=str(other),
        size=len(WAV),
        stored=False,
        now=datetime.now(UTC) + timedelta(days=1),
    )
    async with running_engine(db_url, state_dir=tmp_path, **overrides):
        for _ in range(200):  # the upload worker looks at the state folder as it starts
            if not left.exists():
                break
            await asyncio.sleep(0.05)
        assert not left.exists(), "the local copy of an uploaded recording is still on disk"
    assert other.is_file()
    row = await call_recordings.find_recording(pool, call_log_id=uploaded.id)
    assert row is not None and row.status is RecordingStatus.STORED


async def test_a_recording_left_by_a_process_killed_mid_call_gets_its_calls_link_as_a_finished_call_does(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    public_url = "https://engine.example"
    settings = load_settings(state_dir=tmp_path, public_url=public_url)
    organization = await create_organization(pool, name="Linked", slug="uploads-left-behind-linked")
    crashed = await open_call(pool, organization.id)
    recording_file(settings, organization.id, crashed.id)
    await call_logs.fail_unstarted(pool, crashed, EndReason.ENGINE_LOST)
    await closed_an_hour_ago(pool, crashed.id)
    async with running_engine(db_url, state_dir=tmp_path, public_url=public_url) as engine:
        link = None
        for _ in range(200):  # the upload worker adopts recordings left behind as it starts
            link = await pool.fetchval('SELECT "recordingUrl" FROM "CallLog" WHERE "id" = $1', crashed.id)
            if link is not None:
                break
            await asyncio.sleep(0.05)
        assert link is not None, "the adopted recording's call has no recordingUrl"
        # The link a finished call gets: this engine's public address, signed; the engine serves the file on it.
        assert link.startswith(f"{public_url}/recordings/{crashed.id}.wav?expires=")
        async with aiohttp.ClientSession() as http, http.get(engine + link.removeprefix(public_url)) as response:
            assert response.status == 200
            assert await response.read() == WAV


async def test_the_recording_of_a_call_whose_engine_was_killed_plays_all_the_audio_its_file_holds(
    databases: TestDatabases, tmp_path: Path
) -> None:
    database_url = await databases.migrated()
    own_pool = await databases.pool(database_url)
    public_url = "https://engine.example"
    try:
        number = await line(own_pool)
        organization_id = await own_pool.fetchval(
            'SELECT "organizationId" FROM "PhoneNumber" WHERE "phoneNumber" = $1', number
        )
        (tmp_path / "killed").mkdir()
        (tmp_path / "next").mkdir()
        async with engine(database_url, tmp_path / "killed", drain_seconds=20) as doomed:
            caller = asyncio.create_task(call(doomed.url, number, Pause(60_000)))
            call_log_id = await held_call(own_pool, number)
            settings = load_settings(state_dir=tmp_path / "killed" / "state", public_url=public_url)
            path = recording_path(settings, organization_id, call_log_id)
            # Killed once more than one piece of the call's audio has reached the file (a piece is 5 s).
            for _ in range(600):
                if path.is_file() and path.stat().st_size > 44 + 6 * 32_000:
                    break
                await asyncio.sleep(0.05)
            doomed.process.send_signal(signal.SIGKILL)
            await doomed.process.wait()
            await asyncio.gather(caller, return_exceptions=True)
        async with engine(database_url, tmp_path / "next", drain_seconds=1):
            await finished_call_log(own_pool, call_log_id)  # closed engine_lost by its recovery at start
        await closed_an_hour_ago(own_pool, call_log_id)
        kept = path.stat().st_size
        async with running_engine(database_url, state_dir=settings.state_dir, public_url=public_url) as base:
            link = None
            for _ in range(200):  # adopted as the upload worker starts
                link = await own_pool.fetchval('SELECT "recordingUrl" FROM "CallLog" WHERE "id" = $1', call_log_id)
                if link is not None:
                    break
                await asyncio.sleep(0.05)
            assert link is not None
            async with aiohttp.ClientSession() as http, http.get(base + link.removeprefix(public_url)) as response:
                assert response.status == 200
                body = await response.read()
        with wave.open(io.BytesIO(body)) as wav:
            frames = wav.getnframes()
        assert frames * 4 == len(body) - 44 == (kept - 44) // 4 * 4, "the WAV header does not cover the audio kept"
        assert frames >= 10 * 8000
    finally:
        await own_pool.close()


async def test_recordings_older_than_the_retention_are_deleted_and_unlinked_from_their_call(
    s3: S3Server, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    settings = load_settings(state_dir=tmp_path, **s3.settings("retention", recording_retention_days=30))
    await make_bucket(settings)
    organization = await create_organization(pool, name="Retention", slug="uploads-retention")
    old, recent = await open_call(pool, organization.id), await open_call(pool, organization.id)
    now = datetime.now(UTC)
    async with store_for(settings) as store:
        for log, age in ((old, timedelta(days=31)), (recent, timedelta(days=29))):
            await pool.execute('UPDATE "CallLog" SET "recordingUrl" = $2 WHERE "id" = $1', log.id, "https://x/r.wav")
            path = recording_file(settings, organization.id, log.id)
            clock = functools.partial(operator.sub, now, age)  # the recording was made `age` ago
            uploads = RecordingUploads(pool, store, settings, spool="retention", clock=clock)
            await uploads.finished(organization_id=organization.id, call_log_id=log.id, path=path, size=len(WAV))
            assert await uploads.upload_due() == 1
        sweeper = RecordingUploads(pool, store, settings, spool="retention", clock=lambda: now)
        assert await sweeper.expire() == 1
        old_link = await store.locate(object_key(organization.id, old.id), expires_in=60)
        recent_link = await store.locate(object_key(organization.id, recent.id), expires_in=60)
        assert isinstance(old_link, RemoteLink) and isinstance(recent_link, RemoteLink)
        assert (await fetch(old_link.url))[0] in (403, 404)
        assert (await fetch(recent_link.url))[0] == 200
    rows = {
        row["id"]: row["recordingUrl"]
        for row in await pool.fetch(
            'SELECT "id", "recordingUrl" FROM "CallLog" WHERE "id" = ANY($1)', [old.id, recent.id]
        )
    }
    assert rows == {old.id: None, recent.id: "https://x/r.wav"}
    old_row = await call_recordings.find_recording(pool, call_log_id=old.id)
    assert old_row is not None and old_row.status is RecordingStatus.DELETED


async def test_one_sweep_deletes_every_expired_recording_past_those_left_to_other_processes(
    s3: S3Server, pool: asyncpg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recording_uploads, "RETENTION_BATCH", 2)  # what a sweep reads at once: more rows than that
    settings = load_settings(state_dir=tmp_path, **s3.settings("retention-backlog", recording_retention_days=30))
    await make_bucket(settings)
    organization = await create_organization(pool, name="Backlog", slug="uploads-retention-backlog")
    now = datetime.now(UTC)
    async with store_for(settings) as store:
        # The oldest are waiting for an upload from another state folder: only a process using it can delete them.
        elsewhere = RecordingUploads(pool, store, settings, spool="elsewhere", clock=lambda: now - timedelta(days=400))
        theirs = [await open_call(pool, organization.id) for _ in range(2)]
        for log in theirs:
            path = recording_file(settings, organization.id, log.id)
            await elsewhere.finished(organization_id=organization.id, call_log_id=log.id, path=path, size=len(WAV))
        here = RecordingUploads(pool, store, settings, spool="here", clock=lambda: now - timedelta(days=300))
        mine = [await open_call(pool, organization.id) for _ in range(3)]
        for log in mine:
            path = recording_file(settings, organization.id, log.id)
            await here.finished(organization_id=organization.id, call_log_id=log.id, path=path, size=len(WAV))
        assert await here.upload_due() == 3

        sweeper = RecordingUploads(pool, store, settings, spool="here", clock=lambda: now)
        assert await sweeper.expire() == 3

    statuses = {
        row["callLogId"]: row["status"]
        for row in await pool.fetch(
            'SELECT "callLogId", "status" FROM "CallRecording" WHERE "organizationId" = $1', organization.id
        )
    }
    assert statuses == {log.id: "PENDING" for log in theirs} | {log.id: "DELETED" for log in mine}


async def test_a_local_store_serves_the_file_the_call_wrote(pool: asyncpg.Pool, tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    organization = await create_organization(pool, name="Local", slug="uploads-local")
    log = await open_call(pool, organization.id)
    path = recording_file(settings, organization.id, log.id)
    async with store_for(settings) as store:
        uploads = RecordingUploads(pool, store, settings, spool="local")
        await uploads.finished(organization_id=organization.id, call_log_id=log.id, path=path, size=len(WAV))
        row = await call_recordings.find_recording(pool, call_log_id=log.id)
        assert row is not None and (row.store, row.status) == ("local", RecordingStatus.STORED)
        assert await store.locate(row.object_key, expires_in=60) == LocalFile(path)


async def test_a_calls_recording_is_uploaded_and_served_by_a_redirect_to_object_storage(
    s3: S3Server, pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    overrides: dict[str, Any] = s3.settings("calls", recording_upload_interval=0.05)
    await make_bucket(load_settings(state_dir=tmp_path, **overrides))
    tenant = await make_tenant(pool, "Recorded")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="This call is recorded.")
    async with running_engine(db_url, twilio_auth_token=TOKEN, state_dir=tmp_path, **overrides) as engine:
        result = await call(engine, number)
        log = await call_log(pool, result)
        row = None
        for _ in range(200):
            row = await call_recordings.find_recording(pool, call_log_id=log["id"])
            # Stored first, then its local copy removed (never the other way round).
            stored = row is not None and row.status is RecordingStatus.STORED
            if stored and row is not None and not await asyncio.to_thread(Path(row.local_path).exists):
                break
            await asyncio.sleep(0.05)
        assert row is not None and row.status is RecordingStatus.STORED
        assert not await asyncio.to_thread(Path(row.local_path).exists)
        async with aiohttp.ClientSession() as http:
            async with http.get(log["recordingUrl"], allow_redirects=False) as response:
                assert response.status == 302
                location = response.headers["Location"]
            assert location.startswith(s3.endpoint_url)
            async with http.get(location) as response:
                assert response.status == 200
                audio = await response.read()
    assert audio[:4] == b"RIFF" and len(audio) == row.bytes


async def test_links_are_signed_for_the_public_endpoint_when_one_is_set(s3: S3Server, tmp_path: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path, **s3.settings("public", s3_public_endpoint_url="https://recordings.example.com")
    )
    async with store_for(settings) as store:
        link = await store.locate("org/a.wav", expires_in=60)
    assert isinstance(link, RemoteLink)
    assert link.url.startswith("https://recordings.example.com/public/recordings/org/a.wav?")


async def test_a_large_recording_is_uploaded_in_parts_and_arrives_whole(s3: S3Server, tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, **s3.settings("parts"))
    await make_bucket(settings)
    audio = bytes(range(256)) * (6 * 1024 * 4)  # 6 MiB: one 5 MiB part (S3's smallest) and the rest
    source = tmp_path / "long.wav"
    source.write_bytes(audio)
    async with store_for(settings) as opened:
        assert isinstance(opened, ObjectRecordingStore)
        store = ObjectRecordingStore(
            opened._client,
            bucket="parts",
            prefix="",
            exit_stack=contextlib.AsyncExitStack(),
            part_bytes=5 * 1024 * 1024,
        )
        await store.put("org/long.wav", source)
        link = await store.locate("org/long.wav", expires_in=60)
        uploads = await opened._client.list_multipart_uploads(Bucket="parts")
        head = await opened._client.head_object(Bucket="parts", Key="org/long.wav")
    assert head["ETag"].strip('"').endswith("-2")  # S3 tags an object made of two parts so
    assert uploads.get("Uploads", []) == []  # completed, none left open
    assert await fetch(link.url) == (200, audio)


async def test_recordings_are_encrypted_at_rest_when_asked(s3: S3Server, tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, **s3.settings("sealed", s3_server_side_encryption="AES256"))
    await make_bucket(settings)
    source = tmp_path / "a.wav"
    source.write_bytes(WAV)
    async with store_for(settings) as store:
        await store.put("org/a.wav", source)
        assert isinstance(store, ObjectRecordingStore)
        head = await store._client.head_object(Bucket="sealed", Key="recordings/org/a.wav")
    assert head["ServerSideEncryption"] == "AES256"


def test_a_kms_key_without_kms_encryption_is_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="DIALTONE_S3_KMS_KEY_ID"):
        load_settings(state_dir=tmp_path, recording_store="s3", s3_bucket="b", s3_kms_key_id="key")


async def test_a_recording_waiting_for_its_upload_is_served_by_the_node_that_has_it_and_gone_once_deleted(
    s3: S3Server, pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    overrides: dict[str, Any] = s3.settings("waiting", recording_upload_interval=3600)
    settings = load_settings(state_dir=tmp_path / "holder", **overrides)  # no bucket: uploads cannot succeed
    tenant = await make_tenant(pool, "Waiting")
    log = await open_call(pool, tenant.organization_id)
    path = recording_file(settings, tenant.organization_id, log.id)
    async with store_for(settings) as store:
        uploads = RecordingUploads(pool, store, settings, spool=spool_id(tmp_path / "holder"))
        await uploads.finished(organization_id=tenant.organization_id, call_log_id=log.id, path=path, size=len(WAV))
    headers = {"Authorization": f"Bearer {tenant.owner_key}"}
    async with (
        running_engine(db_url, state_dir=tmp_path / "holder", **overrides) as holder,
        running_engine(db_url, state_dir=tmp_path / "other", **overrides) as other,
        aiohttp.ClientSession(headers=headers) as http,
    ):
        async with http.get(f"{holder}/recordings/{log.id}.wav") as response:
            assert (response.status, await response.read()) == (200, WAV)
        async with http.get(f"{other}/recordings/{log.id}.wav") as response:
            assert response.status == 404
        row = await call_recordings.find_recording(pool, call_log_id=log.id)
        assert row is not None
        await call_recordings.mark_deleted(pool, row, now=datetime.now(UTC), object_removed=False)
        async with http.get(f"{holder}/recordings/{log.id}.wav") as response:
            assert response.status == 404
