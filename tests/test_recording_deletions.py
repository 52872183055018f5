"""Recordings go with their call, however the call is deleted: a CallLog or a whole organization deleted in SQL (as
the dashboard does), outside the engine, has its recording removed from object storage and from the disk.

The store is moto's S3 server on loopback, spoken to by the engine's real aiobotocore client.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from config.settings import Settings, load_settings
from engine.simulator import Pause
from engine.workers import recording_uploads
from engine.workers.recording_deletions import RecordingDeletions
from engine.workers.recording_uploads import RecordingUploads, spool_id
from storage import agents, call_recordings
from storage.call_recordings import RecordingStatus
from storage.errors import DATABASE_ERRORS
from storage.organizations import create_organization, delete_organization
from storage.recording_stores import ObjectRecordingStore, RecordingStore, object_key
from storage.recordings import recording_path
from storage.tenancy import tenant_transaction
from tests.databases import TestDatabases
from tests.engine_server import running_engine
from tests.s3_server import S3Server, s3_server
from tests.test_api_auth import make_tenant
from tests.test_call_log_writer import OnOffProxy, proxied_pool, proxy  # noqa: F401 (fixtures)
from tests.test_calls_e2e import TOKEN, call, call_log, make_line
from tests.test_drain_processes import held_call
from tests.test_recording_object_storage import WAV, make_bucket, recording_file, store_for
from tests.test_repo_call_logs import open_call
from tests.test_webhook_delivery import eventually


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


async def keys_in(settings: Settings) -> list[str]:
    """The keys of the objects in the settings' bucket."""
    async with store_for(settings) as store:
        assert isinstance(store, ObjectRecordingStore)
        listed = await store._client.list_objects_v2(Bucket=settings.s3_bucket)
    return [item["Key"] for item in listed.get("Contents", [])]


async def queued(pool: asyncpg.Pool, organization_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        'SELECT * FROM "RecordingDeletion" WHERE "organizationId" = $1 ORDER BY "createdAt"', organization_id
    )


async def uploaded_recording(
    pool: asyncpg.Pool, store: RecordingStore, settings: Settings, organization_id: str
) -> tuple[str, Path]:
    """A call whose recording is in the store (its local file removed by the upload); its id and that file's path."""
    log = await open_call(pool, organization_id)
    path = recording_file(settings, organization_id, log.id)
    uploads = RecordingUploads(pool, store, settings, spool=spool_id(Path(settings.state_dir)))
    await uploads.finished(organization_id=organization_id, call_log_id=log.id, path=path, size=len(WAV))
    assert await uploads.upload_due() == 1
    return log.id, path


async def waiting_recording(pool: asyncpg.Pool, settings: Settings, organization_id: str) -> tuple[str, Path]:
    """A call whose recording waits for its upload to object storage (not due for a day): its only copy is the local
    file. Its id and that file's path."""
    log = await open_call(pool, organization_id)
    path = recording_file(settings, organization_id, log.id)
    await call_recordings.add_recording(
        pool,
        organization_id=organization_id,
        call_log_id=log.id,
        store="s3",
        object_key=object_key(organization_id, log.id),
        spool=spool_id(Path(settings.state_dir)),
        local_path=str(path),
        size=len(WAV),
        stored=False,
        now=datetime.now(UTC) + timedelta(days=1),
    )
    return log.id, path


def deletions(pool: asyncpg.Pool, store: RecordingStore, settings: Settings, **kwargs: Any) -> RecordingDeletions:
    return RecordingDeletions(pool, store, settings, spool=spool_id(Path(settings.state_dir)), **kwargs)


def closed_port() -> int:
    """A loopback port nothing listens on: a store there is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize("deletion", ['DELETE FROM "CallLog" WHERE "id" = $1', 'TRUNCATE "CallLog" CASCADE'])
async def test_a_call_log_deleted_in_sql_has_its_recording_removed_from_object_storage(
    s3: S3Server, databases: TestDatabases, tmp_path: Path, deletion: str
) -> None:
    # Its own database: TRUNCATE empties the tables the module's other tests use.
    overrides: dict[str, Any] = s3.settings(f"deleted-call-{secrets.token_hex(3)}", recording_upload_interval=0.05)
    settings = load_settings(state_dir=tmp_path, **overrides)
    await make_bucket(settings)
    url = await databases.migrated()
    pool = await databases.pool(url)
    try:
        tenant = await make_tenant(pool, "Deleted")
        number, _ = await make_line(pool, tenant.organization_id, firstSentence="This call is recorded.")
        async with running_engine(url, twilio_auth_token=TOKEN, state_dir=tmp_path, **overrides) as engine:
            log = await call_log(pool, await call(engine, number))
            key = f"recordings/{object_key(tenant.organization_id, log['id'])}"

            async def in_bucket() -> bool:
                return key in await keys_in(settings)

            await eventually(in_bucket, "the call's recording in the bucket")

            await pool.execute(deletion, *([log["id"]] if "$1" in deletion else []))

            async def gone() -> bool:
                return not await in_bucket()

            await eventually(gone, "the deleted call's recording gone from the bucket")
            assert await queued(pool, tenant.organization_id) == []
    finally:
        await pool.close()


async def test_a_call_log_deleted_in_sql_has_its_recording_file_removed_from_the_local_store(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    tenant = await make_tenant(pool, "DeletedLocal")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="This call is recorded.")
    async with running_engine(
        db_url, twilio_auth_token=TOKEN, state_dir=tmp_path, recording_upload_interval=0.05
    ) as engine:
        log = await call_log(pool, await call(engine, number))
        recording = await call_recordings.find_recording(pool, call_log_id=log["id"])
        assert recording is not None and recording.status is RecordingStatus.STORED
        path = Path(recording.local_path)
        assert await asyncio.to_thread(path.is_file)

        await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', log["id"])

        async def gone() -> bool:
            return not await asyncio.to_thread(path.exists)

        await eventually(gone, "the deleted call's recording gone from the disk")
        assert await queued(pool, tenant.organization_id) == []


async def test_deleting_an_organization_removes_the_recordings_of_all_its_calls(
    s3: S3Server, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    settings = load_settings(state_dir=tmp_path, **s3.settings("deleted-organization"))
    await make_bucket(settings)
    organization = await create_organization(pool, name="Leaving", slug="recordings-leaving")
    async with store_for(settings) as store:
        uploaded = [await uploaded_recording(pool, store, settings, organization.id) for _ in range(2)]
        _, waiting_file = await waiting_recording(pool, settings, organization.id)
        assert len(await keys_in(settings)) == 2

        await delete_organization(pool, organization_id=organization.id)
        assert len(await queued(pool, organization.id)) == 3  # the cascades fired the trigger for every recording

        assert await deletions(pool, store, settings).delete_due() == 3
    assert await keys_in(settings) == []
    assert not waiting_file.exists()
    assert all(not path.exists() for _, path in uploaded)
    assert await queued(pool, organization.id) == []


async def test_a_recording_is_removed_once_its_store_is_back_and_the_delete_never_waits_for_it(
    s3: S3Server, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    overrides: dict[str, Any] = s3.settings("outage", recording_upload_retry_initial=0.01)
    settings = load_settings(state_dir=tmp_path, **overrides)
    down = load_settings(state_dir=tmp_path, **overrides | {"s3_endpoint_url": f"http://127.0.0.1:{closed_port()}"})
    await make_bucket(settings)
    organization = await create_organization(pool, name="Outage", slug="recordings-outage")
    async with store_for(settings) as store:
        call_log_id, _ = await uploaded_recording(pool, store, settings, organization.id)
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call_log_id)

    async with store_for(down) as unreachable:
        assert await deletions(pool, unreachable, down).delete_due() == 0
    [row] = await queued(pool, organization.id)
    assert row["attemptCount"] == 1 and row["lastError"] is not None and "delete failed" in row["lastError"]
    assert len(await keys_in(settings)) == 1

    await asyncio.sleep(0.05)  # the retry's wait
    async with store_for(settings) as store:
        assert await deletions(pool, store, settings).delete_due() == 1
    assert await keys_in(settings) == []
    assert await queued(pool, organization.id) == []


async def test_a_recording_already_gone_from_its_store_counts_as_removed(
    s3: S3Server, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    settings = load_settings(state_dir=tmp_path, **s3.settings("already-gone"))
    await make_bucket(settings)
    organization = await create_organization(pool, name="Gone", slug="recordings-already-gone")
    async with store_for(settings) as store:
        call_log_id, _ = await uploaded_recording(pool, store, settings, organization.id)
        await store.delete(object_key(organization.id, call_log_id))
        await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call_log_id)
        assert await deletions(pool, store, settings).delete_due() == 1
    assert await queued(pool, organization.id) == []


@pytest.mark.parametrize("outage", [False, True], ids=["database-up", "database-down-as-it-lands"])
async def test_a_recording_deleted_while_it_was_uploaded_is_removed_once_the_upload_lands(  # noqa: PLR0917 (fixtures and parameters)
    s3: S3Server,
    pool: asyncpg.Pool,
    proxy: OnOffProxy,  # noqa: F811
    proxied_pool: asyncpg.Pool,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    outage: bool,
) -> None:
    # The removal waits for the end of the upload's lease, within which the upload lands: ten minutes in production,
    # ten seconds here.
    monkeypatch.setattr(recording_uploads, "UPLOAD_LEASE", timedelta(seconds=10))
    bucket = f"mid-upload-{secrets.token_hex(3)}"
    settings = load_settings(state_dir=tmp_path, **s3.settings(bucket))
    await make_bucket(settings)
    organization = await create_organization(pool, name="Mid upload", slug=f"recordings-{bucket}")
    log = await open_call(pool, organization.id)
    path = recording_file(settings, organization.id, log.id)
    async with store_for(settings) as opened:
        assert isinstance(opened, ObjectRecordingStore)

        class DeletedDuringUpload(ObjectRecordingStore):
            """The real store; the dashboard deletes the call while the file goes up, and the engine's deletion worker
            passes meanwhile; with `outage`, the database goes as the object lands."""

            async def put(self, key: str, source: Path) -> None:
                in_flight = tmp_path / "in-flight.wav"  # the bytes already read, on their way to the bucket
                await asyncio.to_thread(in_flight.write_bytes, await asyncio.to_thread(source.read_bytes))
                await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', log.id)
                await deletions(pool, opened, settings).delete_due()  # nothing in the bucket yet
                await super().put(key, in_flight)
                if outage:
                    await proxy.down()

        store = DeletedDuringUpload(
            opened._client, bucket=bucket, prefix="recordings/", exit_stack=contextlib.AsyncExitStack()
        )
        uploads = RecordingUploads(proxied_pool, store, settings, spool=spool_id(tmp_path))
        await uploads.finished(organization_id=organization.id, call_log_id=log.id, path=path, size=len(WAV))
        if outage:
            with pytest.raises(DATABASE_ERRORS):  # the upload can tell no one its row is gone
                await uploads.upload_due()
            assert len(await keys_in(settings)) == 1  # it landed after its call was deleted
        else:
            assert await uploads.upload_due() == 0
            assert len(await keys_in(settings)) == 1  # it landed after its call was deleted
            assert await deletions(pool, opened, settings).delete_due() == 1  # the upload queued it, due at once
            assert await keys_in(settings) == []

        async def removed() -> bool:
            await deletions(pool, opened, settings).delete_due()
            return await keys_in(settings) == [] and await queued(pool, organization.id) == []

        await eventually(removed, "the recording of the call deleted mid-upload removed")
    assert not path.exists()


async def test_a_call_log_deleted_by_the_api_role_queues_its_recording_under_row_level_security(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    settings = load_settings(state_dir=tmp_path)
    organization = await create_organization(pool, name="Tenant delete", slug="recordings-tenant-delete")
    log = await open_call(pool, organization.id)
    path = recording_file(settings, organization.id, log.id)
    async with store_for(settings) as store:
        uploads = RecordingUploads(pool, store, settings, spool=spool_id(tmp_path))
        await uploads.finished(organization_id=organization.id, call_log_id=log.id, path=path, size=len(WAV))
        async with tenant_transaction(pool, organization.id) as conn:
            await conn.execute('DELETE FROM "CallLog" WHERE "id" = $1', log.id)
        assert await deletions(pool, store, settings).delete_due() == 1
    assert not path.exists()


async def test_a_recording_row_pointed_elsewhere_by_the_api_role_removes_only_its_own_call_s_recording(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # Code running with the API role (a bug, or SQL) rewrites its organization's recording row to name another
    # organization's file, then deletes the call: the worker removes the call's own recording, never that file.
    settings = load_settings(state_dir=tmp_path)
    mine, theirs = [
        await create_organization(pool, name=name, slug=f"recordings-{name}-{secrets.token_hex(3)}")
        for name in ("pointing", "pointed-at")
    ]
    paths = {}
    async with store_for(settings) as store:
        uploads = RecordingUploads(pool, store, settings, spool=spool_id(tmp_path))
        for organization in (mine, theirs):
            log = await open_call(pool, organization.id)
            paths[organization.id] = (log.id, recording_file(settings, organization.id, log.id))
            await uploads.finished(
                organization_id=organization.id, call_log_id=log.id, path=paths[organization.id][1], size=len(WAV)
            )
        my_call, my_file = paths[mine.id]
        async with tenant_transaction(pool, mine.id) as conn:
            await conn.execute(
                'UPDATE "CallRecording" SET "localPath" = $2, "objectKey" = $3 WHERE "callLogId" = $1',
                my_call,
                str(paths[theirs.id][1]),
                object_key(theirs.id, paths[theirs.id][0]),
            )
            await conn.execute('DELETE FROM "CallLog" WHERE "id" = $1', my_call)
        assert await deletions(pool, store, settings).delete_due() == 1
    assert not my_file.exists()
    assert paths[theirs.id][1].is_file()


async def test_deleting_an_agent_keeps_its_calls_recordings(s3: S3Server, pool: asyncpg.Pool, tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    tenant = await make_tenant(pool, "Agent gone")
    _, agent_id = await make_line(pool, tenant.organization_id)
    log = await open_call(pool, tenant.organization_id, agent_id=agent_id)
    path = recording_file(settings, tenant.organization_id, log.id)
    async with store_for(settings) as store:
        uploads = RecordingUploads(pool, store, settings, spool=spool_id(tmp_path))
        await uploads.finished(organization_id=tenant.organization_id, call_log_id=log.id, path=path, size=len(WAV))
        await agents.delete_agent(pool, organization_id=tenant.organization_id, agent_id=agent_id)
        assert await deletions(pool, store, settings).delete_due() == 0
    assert path.is_file()
    assert await call_recordings.find_recording(pool, call_log_id=log.id) is not None


async def test_the_recording_of_a_call_deleted_while_it_ran_is_removed_from_the_disk(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    tenant = await make_tenant(pool, "DeletedMidCall")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="This call is recorded.")
    settings = load_settings(state_dir=tmp_path)
    async with running_engine(db_url, twilio_auth_token=TOKEN, state_dir=tmp_path) as engine:
        caller = asyncio.create_task(call(engine, number, Pause(3_000)))
        call_log_id = await held_call(pool, number)
        path = recording_path(settings, tenant.organization_id, call_log_id)
        await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call_log_id)
        await caller
    # The call's end could not record a recording of a call gone: no row, no queued removal; the file alone is left.
    assert await call_recordings.find_recording(pool, call_log_id=call_log_id) is None
    async with running_engine(db_url, twilio_auth_token=TOKEN, state_dir=tmp_path):

        async def gone() -> bool:
            return not await asyncio.to_thread(path.exists)

        await eventually(gone, "the recording of the deleted call gone from the disk")


@pytest.mark.parametrize(
    ("rights", "deletion"),
    [("SELECT, DELETE", 'DELETE FROM "CallRecording"'), ("TRUNCATE", 'TRUNCATE "CallRecording"')],
)
async def test_a_role_with_no_rights_on_the_queue_still_deletes_a_recording_and_queues_its_removal(
    pool: asyncpg.Pool, tmp_path: Path, rights: str, deletion: str
) -> None:
    # A dashboard may connect as a role of its own, granted what it deletes and nothing of the engine's tables.
    settings = load_settings(state_dir=tmp_path)
    organization = await create_organization(
        pool, name="Dashboard role", slug=f"recordings-dashboard-role-{rights[0].lower()}"
    )
    log = await open_call(pool, organization.id)
    path = recording_file(settings, organization.id, log.id)
    async with store_for(settings) as store:
        uploads = RecordingUploads(pool, store, settings, spool=spool_id(tmp_path))
        await uploads.finished(organization_id=organization.id, call_log_id=log.id, path=path, size=len(WAV))
    role = f"dialtone_dashboard_{secrets.token_hex(3)}"
    async with pool.acquire() as conn:
        rolled_back = conn.transaction()  # the role and all it did go at the end
        await rolled_back.start()
        try:
            await conn.execute(f"CREATE ROLE {role} NOLOGIN")
            await conn.execute(f'GRANT {rights} ON "CallRecording" TO {role}')
            await conn.execute(f"SET LOCAL ROLE {role}")
            await conn.execute("SELECT set_config('app.organization_id', $1, true)", organization.id)  # its policy
            await conn.execute(deletion)  # rolled back below, with the other tests' rows a TRUNCATE empties
            await conn.execute("RESET ROLE")
            assert await conn.fetchval('SELECT count(*) FROM "CallRecording" WHERE "callLogId" = $1', log.id) == 0
            queued_paths = await conn.fetch(
                'SELECT "localPath" FROM "RecordingDeletion" WHERE "organizationId" = $1', organization.id
            )
        finally:
            await rolled_back.rollback()
    assert [row["localPath"] for row in queued_paths] == [str(path)]


@pytest.mark.parametrize(
    "truncate", ['TRUNCATE "CallLog" CASCADE', 'TRUNCATE "CallRecording"', 'TRUNCATE "Organization" CASCADE']
)
async def test_truncated_calls_have_their_recordings_removed_from_object_storage_and_the_disk(
    s3: S3Server, databases: TestDatabases, tmp_path: Path, truncate: str
) -> None:
    # TRUNCATE fires no row trigger; a statement-level one queues what it is about to empty, cascades included. Its
    # own database: it empties tables the module's other tests use.
    settings = load_settings(state_dir=tmp_path, **s3.settings(f"truncated-{secrets.token_hex(3)}"))
    await make_bucket(settings)
    pool = await databases.pool(await databases.migrated())
    try:
        organizations = [
            await create_organization(pool, name=name, slug=f"recordings-truncated-{name}") for name in ("a", "b")
        ]
        async with store_for(settings) as store:
            uploaded = [await uploaded_recording(pool, store, settings, o.id) for o in organizations]
            expired_call, _ = await uploaded_recording(pool, store, settings, organizations[0].id)
            expired = await call_recordings.find_recording(pool, call_log_id=expired_call)
            assert expired is not None
            await store.delete(object_key(organizations[0].id, expired_call))
            await call_recordings.mark_deleted(pool, expired, now=datetime.now(UTC), object_removed=True)
            waiting, waiting_file = await waiting_recording(pool, settings, organizations[1].id)
            assert len(await keys_in(settings)) == 2

            await pool.execute(truncate)
            assert await pool.fetchval('SELECT count(*) FROM "CallRecording"') == 0
            rows = await pool.fetch('SELECT "callLogId", "onDisk" FROM "RecordingDeletion" ORDER BY "onDisk"')
            assert {row["callLogId"]: row["onDisk"] for row in rows} == {
                **{call_log_id: False for call_log_id, _ in uploaded},
                waiting: True,
            }

            assert await deletions(pool, store, settings).delete_due() == 3
        assert await keys_in(settings) == []
        assert not waiting_file.exists()
        assert await pool.fetchval('SELECT count(*) FROM "RecordingDeletion"') == 0
    finally:
        await pool.close()
