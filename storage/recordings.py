"""Call recordings on disk, the key that signs their URLs, and the signed URLs themselves.

A recording lives at `{state_dir}/recordings/{organizationId}/{callLogId}.wav`. Its URL carries an expiry and an
HMAC-SHA256 signature over the file name and that expiry, so a link can be handed out without an API key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from config.settings import Settings, SettingsError
from storage.records import Queryable

log = logging.getLogger(__name__)

RECORDING_ID = re.compile(r"[a-z0-9]{20,32}")
"""What a call log id in a recording's path must look like (a CUID): nothing else ever names a file."""

SIGNING_KEY_FILENAME = "secret_key"
"""The file in the state folder holding the generated signing key when DIALTONE_SECRET_KEY is unset."""

_warned: set[Path] = set()  # key files already warned about, so a per-call load logs once
_KEY_FILE_FORMAT = re.compile(r"[0-9a-f]{64}")
_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def recording_path(settings: Settings, organization_id: str, call_log_id: str) -> Path:
    """Where the organization's recording of a call is kept; ValueError for an id that could escape the folder."""
    if not RECORDING_ID.fullmatch(call_log_id):
        raise ValueError(f"{call_log_id!r} is not a call log id")
    if not _SAFE_SEGMENT.fullmatch(organization_id):
        raise ValueError(f"{organization_id!r} is not an organization id")
    return _recordings_folder(settings) / organization_id / f"{call_log_id}.wav"


def recording_files(settings: Settings) -> list[tuple[str, str, Path]]:
    """(organization id, call log id, path) of every recording file in the state folder. Blocking."""
    found: list[tuple[str, str, Path]] = []
    folder = _recordings_folder(settings)
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*/*.wav")):
        organization_id, call_log_id = path.parent.name, path.stem
        if _SAFE_SEGMENT.fullmatch(organization_id) and RECORDING_ID.fullmatch(call_log_id):
            found.append((organization_id, call_log_id, path))
    return found


def _recordings_folder(settings: Settings) -> Path:
    return Path(settings.state_dir) / "recordings"


def load_secret_key(settings: Settings) -> bytes:
    """The key that signs recording URLs: DIALTONE_SECRET_KEY, else one made once and kept in the state folder.

    The generated key is created atomically (mode 0600), so processes sharing the folder all use the same one.
    """
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    path = (Path(settings.state_dir) / SIGNING_KEY_FILENAME).resolve()
    if not path.exists():
        _create_key_file(path)
    if path not in _warned:
        _warned.add(path)
        log.warning(
            "DIALTONE_SECRET_KEY is not set: recording URLs are signed with the key in %s; "
            "multi-host deployments must set DIALTONE_SECRET_KEY to the same value on every host",
            path,
        )
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not _KEY_FILE_FORMAT.fullmatch(text):
        raise SettingsError(
            f"{path}: not a signing key (expected 64 hex digits); delete it to make a new one, "
            "or set DIALTONE_SECRET_KEY"
        )
    return bytes.fromhex(text)


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole under a temporary name, then linked into place: a reader never sees half a key, and when two
    # processes race, the first link wins and the other adopts its key.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{SIGNING_KEY_FILENAME}.")  # mode 0600
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(secrets.token_hex(32) + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        else:
            log.info("made a new recording URL signing key in %s", path)
    finally:
        os.unlink(temporary)


def recording_signature(call_log_id: str, expires: int, *, key: bytes) -> str:
    """HMAC-SHA256, in hex, of "{id}.wav:{expires}" under the signing key."""
    return hmac.new(key, f"{call_log_id}.wav:{expires}".encode(), hashlib.sha256).hexdigest()


def sign_recording_url(base_url: str, call_log_id: str, *, key: bytes, expires_at: datetime) -> str:
    """`{base_url}/recordings/{id}.wav?expires=<unix seconds>&signature=<hex>`, valid until `expires_at`."""
    if not RECORDING_ID.fullmatch(call_log_id):
        raise ValueError(f"{call_log_id!r} is not a call log id")
    expires = int(expires_at.timestamp())
    signature = recording_signature(call_log_id, expires, key=key)
    return f"{base_url.rstrip('/')}/recordings/{call_log_id}.wav?expires={expires}&signature={signature}"


def recording_url(settings: Settings, base_url: str, call_log_id: str, *, key: bytes, now: datetime) -> str:
    """The signed URL to store in CallLog.recordingUrl, valid for DIALTONE_RECORDING_URL_TTL_DAYS from `now`.

    `base_url` is where this engine is reached from outside (see engine.twilio.signature.public_base_url).
    """
    expires_at = now + timedelta(days=settings.recording_url_ttl_days)
    return sign_recording_url(base_url, call_log_id, key=key, expires_at=expires_at)


def verify_recording_signature(call_log_id: str, *, expires: str, signature: str, key: bytes, now: datetime) -> bool:
    """Whether a URL's expiry and signature are ours for this recording and the expiry is still ahead of `now`."""
    if not expires.isascii() or not expires.isdigit() or len(expires) > 12:
        return False
    expected = recording_signature(call_log_id, int(expires), key=key)
    # Constant time: the comparison must not tell how much of a forged signature was right.
    valid = hmac.compare_digest(expected.encode(), signature.encode("ascii", errors="replace"))
    return valid and int(expires) > now.timestamp()


async def recording_owner(db: Queryable, *, call_log_id: str) -> str | None:
    """The organization whose call log has that id, or None.

    Unscoped by design: a signed recording URL names only the call.
    """
    owner: str | None = await db.fetchval('SELECT "organizationId" FROM "CallLog" WHERE "id" = $1', call_log_id)
    return owner
