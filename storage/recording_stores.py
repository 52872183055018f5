"""Where finished recordings are kept, behind one small interface: the local folder, or S3-compatible storage.

A recording is written to a local file during the call (`storage.recordings.recording_path`); the store then keeps
it under a key "{organizationId}/{callLogId}.wav". The local store keeps the file where it is; the object store
uploads it (multipart for large files, read a part at a time off the event loop) and hands out short-lived
presigned GET URLs, so every host can serve every recording.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from config.settings import Settings
from storage.recordings import recording_path

PART_BYTES = 8 * 1024 * 1024
"""Uploads larger than this go in parts of this size (S3's minimum part is 5 MiB)."""


def object_key(organization_id: str, call_log_id: str) -> str:
    """The key of a call's recording inside a store (without the object store's prefix)."""
    return f"{organization_id}/{call_log_id}.wav"


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A recording this host serves from its disk."""

    path: Path


@dataclass(frozen=True, slots=True)
class RemoteLink:
    """A recording the client fetches from object storage at a short-lived presigned URL."""

    url: str


class RecordingStoreError(Exception):
    """The store could not keep, find or delete a recording; the message names the store and the key."""


class RecordingStore(Protocol):
    """Keeps finished recordings and tells how to fetch them."""

    name: str
    """What "CallRecording"."store" records: local or s3."""

    @property
    def uploads(self) -> bool:
        """Whether a finished recording must be uploaded (else it is in the store once written)."""
        ...

    async def put(self, key: str, source: Path) -> None:
        """Keep the file at `source` under `key`; returns once the store has confirmed it."""
        ...

    async def locate(self, key: str, *, expires_in: int) -> LocalFile | RemoteLink | None:
        """How to fetch the recording under `key`, or None if the store has no such file."""
        ...

    async def delete(self, key: str) -> None:
        """Delete the recording under `key` (nothing if it is already gone)."""
        ...

    async def aclose(self) -> None:
        """Release the store's connections."""
        ...


class LocalRecordingStore:
    """Recordings in the state folder of this host (`{state_dir}/recordings/{organizationId}/{callLogId}.wav`)."""

    name = "local"

    def __init__(self, settings: Settings) -> None:
        """Keep recordings under the settings' state folder."""
        self._settings = settings

    @property
    def uploads(self) -> bool:
        """The file is written in place: nothing to upload."""
        return False

    def _path(self, key: str) -> Path:
        organization_id, _, file_name = key.partition("/")
        return recording_path(self._settings, organization_id, file_name.removesuffix(".wav"))

    async def put(self, key: str, source: Path) -> None:
        """Move the file into place (a no-op for the file the call wrote, which is already there)."""
        target = self._path(key)
        if source != target:
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(source.replace, target)

    async def locate(self, key: str, *, expires_in: int) -> LocalFile | None:
        """The file, if this host has it."""
        path = self._path(key)
        return LocalFile(path) if await asyncio.to_thread(path.is_file) else None

    async def delete(self, key: str) -> None:
        """Remove the file."""
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def aclose(self) -> None:
        """Nothing to release."""


class ObjectRecordingStore:
    """Recordings in an S3-compatible bucket, through aiobotocore's async client."""

    name = "s3"

    def __init__(
        self,
        client: Any,
        *,
        bucket: str,
        prefix: str,
        exit_stack: contextlib.AsyncExitStack,
        presigner: Any | None = None,
        part_bytes: int = PART_BYTES,
        encryption: dict[str, str] | None = None,
    ) -> None:
        """Use an open aiobotocore S3 client (and `presigner`, one for the public endpoint, to sign links); the
        `exit_stack` closes them. Build one with `open_recording_store`."""
        self._client = client
        self._presigner = presigner or client
        self._part_bytes = part_bytes
        self._encryption = encryption or {}
        self._bucket = bucket
        self._prefix = prefix
        self._exit_stack = exit_stack

    @property
    def uploads(self) -> bool:
        """Finished recordings are uploaded by the upload worker."""
        return True

    def _key(self, key: str) -> str:
        return f"{self._prefix}{key}"

    async def put(self, key: str, source: Path) -> None:
        """Upload the file: in one request when small, else in parts read one at a time off the event loop."""
        size = (await asyncio.to_thread(source.stat)).st_size
        full_key = self._key(key)
        try:
            if size <= self._part_bytes:
                body = await asyncio.to_thread(source.read_bytes)
                await self._client.put_object(
                    Bucket=self._bucket, Key=full_key, Body=body, ContentType="audio/wav", **self._encryption
                )
                return
            await self._put_in_parts(full_key, source)
        except RecordingStoreError:
            raise
        except Exception as exc:
            raise RecordingStoreError(f"s3://{self._bucket}/{full_key}: upload failed ({_describe(exc)})") from exc

    async def _put_in_parts(self, full_key: str, source: Path) -> None:
        created = await self._client.create_multipart_upload(
            Bucket=self._bucket, Key=full_key, ContentType="audio/wav", **self._encryption
        )
        upload_id = created["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            with source.open("rb") as file:  # opening is cheap; the reads are the blocking part
                number = 1
                while chunk := await asyncio.to_thread(file.read, self._part_bytes):
                    answer = await self._client.upload_part(
                        Bucket=self._bucket, Key=full_key, UploadId=upload_id, PartNumber=number, Body=chunk
                    )
                    parts.append({"ETag": answer["ETag"], "PartNumber": number})
                    number += 1
            await self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=full_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self._client.abort_multipart_upload(Bucket=self._bucket, Key=full_key, UploadId=upload_id)
            raise

    async def locate(self, key: str, *, expires_in: int) -> RemoteLink:
        """A presigned GET URL valid for `expires_in` seconds (the row in the database says the object exists)."""
        url: str = await self._presigner.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._bucket, "Key": self._key(key), "ResponseContentType": "audio/wav"},
            ExpiresIn=expires_in,
        )
        return RemoteLink(url)

    async def delete(self, key: str) -> None:
        """Delete the object (S3 answers success for a key that is already gone)."""
        try:
            await self._client.delete_object(Bucket=self._bucket, Key=self._key(key))
        except Exception as exc:
            raise RecordingStoreError(
                f"s3://{self._bucket}/{self._key(key)}: delete failed ({_describe(exc)})"
            ) from exc

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self._exit_stack.aclose()


async def remove_recording(store: RecordingStore, *, key: str | None, local_file: Path | None) -> None:
    """Remove a recording from where it is kept: the object under `key` in `store` (None when it was never uploaded)
    and the file `local_file` on this disk (None when it is not kept there). What is already gone counts as removed;
    RecordingStoreError when the store or the disk refuses, so the caller can try again later."""
    if local_file is not None:
        try:
            await asyncio.to_thread(local_file.unlink, missing_ok=True)
        except OSError as exc:
            raise RecordingStoreError(f"{local_file}: could not remove the recording ({exc.strerror or exc})") from exc
    if key is not None:
        await store.delete(key)


def _describe(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


async def open_recording_store(settings: Settings) -> RecordingStore:
    """The store the settings choose: DIALTONE_RECORDING_STORE=local (the default) or s3."""
    if settings.recording_store == "local":
        return LocalRecordingStore(settings)
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    assert settings.s3_bucket is not None  # the settings refuse s3 without a bucket
    credentials: dict[str, str] = {}
    if settings.s3_access_key_id is not None and settings.s3_secret_access_key is not None:
        credentials = {
            "aws_access_key_id": settings.s3_access_key_id.get_secret_value(),
            "aws_secret_access_key": settings.s3_secret_access_key.get_secret_value(),
        }
    config = AioConfig(
        signature_version="s3v4",
        # Path-style addressing works with every S3-compatible service (MinIO, R2) and with AWS itself.
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    exit_stack = contextlib.AsyncExitStack()
    session = get_session()

    async def client(endpoint: str | None) -> Any:
        made = session.create_client(
            "s3", region_name=settings.s3_region, endpoint_url=endpoint, config=config, **credentials
        )
        return await exit_stack.enter_async_context(made)

    try:
        main = await client(settings.s3_endpoint_url)
        public = await client(settings.s3_public_endpoint_url) if settings.s3_public_endpoint_url else None
    except BaseException:
        await exit_stack.aclose()
        raise
    encryption: dict[str, str] = {}
    if settings.s3_server_side_encryption is not None:
        encryption["ServerSideEncryption"] = settings.s3_server_side_encryption
    if settings.s3_kms_key_id is not None:
        encryption["SSEKMSKeyId"] = settings.s3_kms_key_id
    return ObjectRecordingStore(
        main,
        bucket=settings.s3_bucket,
        prefix=settings.s3_prefix,
        exit_stack=exit_stack,
        presigner=public,
        encryption=encryption,
    )
