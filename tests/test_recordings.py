"""Recordings: kept per organization on disk, linked by signed expiring URLs, served over HTTP only to a valid
signature or to an API key of the organization that owns them.
"""

from __future__ import annotations

import asyncio
import os
import stat
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from config.settings import Settings, SettingsError, load_settings
from engine.server.appkeys import DATABASE, SETTINGS
from engine.workers.recordings import RECORDING_ROUTE, handle_recording, recordings_context
from storage.api_keys import create_api_key, hash_key
from storage.enums import UserRole, UserStatus
from storage.organizations import create_organization
from storage.pool import Database
from storage.recordings import (
    load_secret_key,
    recording_path,
    recording_url,
    sign_recording_url,
    verify_recording_signature,
)
from storage.records import new_id
from storage.users import add_member, create_user
from tests.test_repo_call_logs import open_call

KEY = b"k" * 32
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
CALL_ID = "c" + "0" * 24


def settings_in(state_dir: Path, **overrides: object) -> Settings:
    """Settings whose state folder is `state_dir`."""
    return load_settings(state_dir=state_dir, **overrides)


# ----------------------------------------------------------------------------------------------- signing


def test_a_signed_url_names_the_recording_its_expiry_and_its_signature() -> None:
    url = sign_recording_url("https://engine.example/", CALL_ID, key=KEY, expires_at=NOW)
    expires = int(NOW.timestamp())
    assert url.startswith(f"https://engine.example/recordings/{CALL_ID}.wav?expires={expires}&signature=")
    signature = url.rsplit("=", 1)[1]
    assert len(signature) == 64
    assert verify_recording_signature(
        CALL_ID, expires=str(expires), signature=signature, key=KEY, now=NOW - timedelta(seconds=1)
    )


def signed(call_log_id: str = CALL_ID, *, expires_at: datetime = NOW + timedelta(days=1)) -> tuple[str, str]:
    """The expiry and signature of a URL for the recording."""
    url = sign_recording_url("http://x", call_log_id, key=KEY, expires_at=expires_at)
    query = dict(part.split("=") for part in url.split("?", 1)[1].split("&"))
    return query["expires"], query["signature"]


def test_a_signature_is_refused_for_another_recording_another_expiry_or_another_key() -> None:
    expires, signature = signed()
    assert not verify_recording_signature("d" + "0" * 24, expires=expires, signature=signature, key=KEY, now=NOW)
    assert not verify_recording_signature(CALL_ID, expires=str(int(expires) + 1), signature=signature, key=KEY, now=NOW)
    assert not verify_recording_signature(CALL_ID, expires=expires, signature=signature, key=b"x" * 32, now=NOW)
    assert not verify_recording_signature(CALL_ID, expires=expires, signature=signature.upper(), key=KEY, now=NOW)
    assert not verify_recording_signature(CALL_ID, expires="soon", signature=signature, key=KEY, now=NOW)


def test_a_signature_is_refused_once_it_has_expired() -> None:
    expires, signature = signed(expires_at=NOW)
    assert not verify_recording_signature(CALL_ID, expires=expires, signature=signature, key=KEY, now=NOW)


def test_the_stored_recording_url_lasts_the_configured_number_of_days(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, public_url="https://engine.example", recording_url_ttl_days=7)
    url = recording_url(settings, "https://engine.example", CALL_ID, key=KEY, now=NOW)
    expires = int((NOW + timedelta(days=7)).timestamp())
    assert url.startswith(f"https://engine.example/recordings/{CALL_ID}.wav?expires={expires}&signature=")


# ------------------------------------------------------------------------------------------- files and keys


def test_a_recording_lives_under_its_organization_in_the_state_folder(tmp_path: Path) -> None:
    path = recording_path(settings_in(tmp_path), "org123", CALL_ID)
    assert path == tmp_path / "recordings" / "org123" / f"{CALL_ID}.wav"


@pytest.mark.parametrize(("organization_id", "call_log_id"), [("org", "../../etc/passwd"), ("..", CALL_ID), ("o", "")])
def test_an_id_that_could_leave_the_recordings_folder_is_refused(
    tmp_path: Path, organization_id: str, call_log_id: str
) -> None:
    with pytest.raises(ValueError):
        recording_path(settings_in(tmp_path), organization_id, call_log_id)


def test_the_configured_secret_key_signs_urls(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, secret_key="s" * 40)
    assert load_secret_key(settings) == b"s" * 40
    assert not (tmp_path / "secret_key").exists()


def test_without_a_configured_key_one_is_made_once_readable_only_by_its_owner(tmp_path: Path) -> None:
    settings = settings_in(tmp_path / "state")
    first = load_secret_key(settings)
    assert len(first) == 32
    assert load_secret_key(settings) == first
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / "secret_key").st_mode)
    assert mode == 0o600
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["secret_key"]  # no temporary file left


async def test_processes_making_the_key_at_the_same_time_all_get_the_same_one(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    keys = await asyncio.gather(*(asyncio.to_thread(load_secret_key, settings) for _ in range(8)))
    assert len(set(keys)) == 1


def test_a_damaged_key_file_is_reported_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "secret_key").write_text("not a key\n")
    with pytest.raises(SettingsError, match="secret_key"):
        load_secret_key(settings_in(tmp_path))
    assert (tmp_path / "secret_key").read_text() == "not a key\n"


# -------------------------------------------------------------------------------------------------- HTTP


@dataclass
class Served:
    """A running recordings endpoint and the data behind it."""

    base_url: str
    http: aiohttp.ClientSession
    settings: Settings
    organization_id: str
    call_log_id: str
    api_key: str
    audio: bytes


def write_wav(path: Path) -> bytes:
    """A short silent WAV at `path`; its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as recording:
        recording.setnchannels(2)
        recording.setsampwidth(2)
        recording.setframerate(8000)
        recording.writeframes(b"\x00\x00\x00\x00" * 800)
    return path.read_bytes()


async def new_api_key(pool: asyncpg.Pool, organization_id: str) -> str:
    """The plaintext of a new API key of the organization, its user a VIEWER there."""
    user = await create_user(pool, email=f"dev-{new_id()}@example.com", status=UserStatus.ACTIVE)
    await add_member(pool, user_id=user.id, organization_id=organization_id, role=UserRole.VIEWER)
    created = await create_api_key(pool, organization_id=organization_id, user_id=user.id, name="ci", live=False)
    return created.plaintext


@pytest.fixture
async def served(pool: asyncpg.Pool, tmp_path: Path) -> AsyncIterator[Served]:
    """The recordings route of a small app on loopback, with one organization's recorded call."""
    settings = settings_in(tmp_path, secret_key="s" * 40)
    app = web.Application()
    app[SETTINGS] = settings
    app[DATABASE] = Database(pool=pool, location="test")
    app.cleanup_ctx.append(recordings_context)
    app.router.add_get(RECORDING_ROUTE, handle_recording)
    organization = await create_organization(pool, name="Acme", slug=f"acme-{new_id()}")
    call = await open_call(pool, organization.id)
    audio = write_wav(recording_path(settings, organization.id, call.id))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            yield Served(
                base_url=str(server.make_url("")).rstrip("/"),
                http=http,
                settings=settings,
                organization_id=organization.id,
                call_log_id=call.id,
                api_key=await new_api_key(pool, organization.id),
                audio=audio,
            )
    finally:
        await server.close()


def signed_url(served: Served, *, call_log_id: str | None = None, expires_at: datetime | None = None) -> str:
    """A URL for the served recording (or another id), signed with the app's key."""
    return sign_recording_url(
        served.base_url,
        call_log_id or served.call_log_id,
        key=load_secret_key(served.settings),
        expires_at=expires_at or datetime.now(UTC) + timedelta(hours=1),
    )


async def test_a_valid_signed_url_downloads_the_recording(served: Served) -> None:
    async with served.http.get(signed_url(served)) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "audio/wav"
        assert await response.read() == served.audio


async def test_a_signed_url_serves_byte_ranges(served: Served) -> None:
    async with served.http.get(signed_url(served), headers={"Range": "bytes=0-3"}) as response:
        assert response.status == 206
        assert await response.read() == b"RIFF"


async def test_a_tampered_signature_is_forbidden(served: Served) -> None:
    url = signed_url(served)
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    async with served.http.get(tampered) as response:
        assert response.status == 403


async def test_an_expired_signed_url_is_forbidden(served: Served) -> None:
    url = signed_url(served, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    async with served.http.get(url) as response:
        assert response.status == 403


async def test_without_signature_or_key_the_recording_needs_authentication(served: Served) -> None:
    async with served.http.get(f"{served.base_url}/recordings/{served.call_log_id}.wav") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_an_unknown_api_key_is_unauthorized(served: Served) -> None:
    headers = {"Authorization": "Bearer sk_test_" + "x" * 43}
    async with served.http.get(f"{served.base_url}/recordings/{served.call_log_id}.wav", headers=headers) as response:
        assert response.status == 401


async def test_an_api_key_of_the_owning_organization_downloads_the_recording(served: Served) -> None:
    headers = {"Authorization": f"Bearer {served.api_key}"}
    async with served.http.get(f"{served.base_url}/recordings/{served.call_log_id}.wav", headers=headers) as response:
        assert response.status == 200
        assert await response.read() == served.audio


async def test_a_key_whose_user_left_the_organization_is_unauthorized(served: Served, pool: asyncpg.Pool) -> None:
    key = await new_api_key(pool, served.organization_id)
    user_id = await pool.fetchval('SELECT "userId" FROM "ApiKey" WHERE "key" = $1', hash_key(key))
    await pool.execute('DELETE FROM "UserOrganization" WHERE "userId" = $1', user_id)
    headers = {"Authorization": f"Bearer {key}"}
    async with served.http.get(f"{served.base_url}/recordings/{served.call_log_id}.wav", headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_another_organizations_key_cannot_tell_the_recording_exists(served: Served, pool: asyncpg.Pool) -> None:
    other = await create_organization(pool, name="Other", slug=f"other-{new_id()}")
    headers = {"Authorization": f"Bearer {await new_api_key(pool, other.id)}"}
    url = f"{served.base_url}/recordings/{served.call_log_id}.wav"
    async with served.http.get(url, headers=headers) as response:
        theirs = response.status
    async with served.http.get(f"{served.base_url}/recordings/{new_id()}.wav", headers=headers) as response:
        missing = response.status
    assert theirs == missing == 404


async def test_a_call_without_a_recording_file_is_not_found(served: Served, pool: asyncpg.Pool) -> None:
    unrecorded = await open_call(pool, served.organization_id)
    async with served.http.get(signed_url(served, call_log_id=unrecorded.id)) as response:
        assert response.status == 404


@pytest.mark.parametrize("name", ["..%2F..%2Fsecret_key", "UPPERCASE0000000000000000", "short", "a" * 40])
async def test_a_name_that_is_not_a_call_log_id_is_not_found(served: Served, name: str) -> None:
    headers = {"Authorization": f"Bearer {served.api_key}"}
    async with served.http.get(f"{served.base_url}/recordings/{name}.wav", headers=headers) as response:
        assert response.status == 404
