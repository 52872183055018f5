"""File uploads: a multipart/form-data body's fields, validated by the operation's form model, and its `file`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import ValidationError

from config.text import storable_text
from engine.api.errors import ApiError, validation_error
from engine.api.models import RequestModel

M = TypeVar("M", bound=RequestModel)

FILE_PART = "file"
_MAX_FIELDS_BYTES = 64 * 1024
"""The form's fields together, names and values: held in memory, and a multipart body escapes the JSON body limit."""


@dataclass(frozen=True, slots=True)
class Upload:
    """An uploaded file: the name the client gave it, and its bytes."""

    filename: str
    data: bytes


async def _read(part: BodyPartReader, limit: int, too_large: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, "payload_too_large", too_large)
    return bytes(data)


async def read_upload(request: web.Request, form: type[M], *, max_bytes: int, limit_name: str) -> tuple[M, Upload]:
    """The form's fields (validated by `form`) and its `file` part, at most `max_bytes` (the `limit_name` setting).

    415 for a body that is not multipart/form-data, 400 for a malformed one, 413 for a file (or fields) too large,
    422 for a missing file or invalid fields.
    """
    if request.content_type != "multipart/form-data":
        given = request.content_type
        raise ApiError(
            415, "unsupported_media_type", f"send multipart/form-data with a `{FILE_PART}` part, not {given}"
        )
    fields: dict[str, str] = {}
    fields_left = _MAX_FIELDS_BYTES
    fields_too_large = f"the form's fields are larger than {_MAX_FIELDS_BYTES} bytes together"
    upload: Upload | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "bad_request", "nested multipart bodies are not accepted")
            if part.name == FILE_PART:
                too_large = f"the file is larger than {max_bytes} bytes ({limit_name})"
                # Bytes of the name that were not UTF-8 (a Latin-1 name, say) reach here as lone surrogates.
                name = storable_text(part.filename or "upload")
                upload = Upload(name, await _read(part, max_bytes, too_large))
            elif part.name:
                fields_left -= len(part.name)
                raw = await _read(part, fields_left, fields_too_large)
                fields_left -= len(raw)
                if fields_left < 0:
                    raise ApiError(413, "payload_too_large", fields_too_large)
                fields[part.name] = raw.decode("utf-8", errors="replace")
    except (ValueError, AssertionError, HttpProcessingError) as exc:  # aiohttp's reader on a malformed body
        raise ApiError(400, "bad_request", f"the multipart body cannot be read ({exc})") from None
    if upload is None:
        raise ApiError(422, "validation_error", f"the form has no `{FILE_PART}` part", FILE_PART)
    try:
        return form.model_validate(fields), upload
    except ValidationError as exc:
        raise validation_error(exc, location="form") from None
