"""The API's one error shape, `{"error": {"code", "message", "field"}}`, and the middleware that answers with it."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from engine.api.models import ResponseModel
from engine.server.body_deadline import BodyTooSlow
from storage.errors import (
    TRANSIENT_ERRORS,
    AlreadyExists,
    ConstraintViolation,
    InvalidReference,
    NotFound,
    StorageError,
)

log = logging.getLogger(__name__)


class ErrorBody(ResponseModel):
    """What went wrong: a stable code for programs, a message for people, and the JSON path of the bad field."""

    code: str
    message: str
    field: str | None = None


class ErrorResponse(ResponseModel):
    """Every error the API returns has this shape."""

    error: ErrorBody


class ApiError(Exception):
    """An error to answer with: its HTTP status and the error body."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(code=code, message=message, field=field)
        self.headers: dict[str, str] = {}

    def response(self) -> web.Response:
        """The JSON response for this error."""
        return web.json_response(
            ErrorResponse(error=self.body).model_dump(mode="json"), status=self.status, headers=self.headers
        )


def not_found(message: str) -> ApiError:
    """404: nothing by that id in the caller's organization (never saying whether another has it)."""
    return ApiError(404, "not_found", message)


def unprocessable(message: str, field: str | None = None) -> ApiError:
    """422: the request is well-formed but a value cannot be used."""
    return ApiError(422, "invalid_value", message, field)


def invalid_reference(field: str, message: str) -> ApiError:
    """422 `invalid_reference` at `field`: the body names by id a row the caller's organization does not have (none,
    or another organization's: never told apart). The one answer to every id in a body; an id in the path is a 404."""
    return ApiError(422, "invalid_reference", f"body {field}: {message}", field)


def reference_field(entity: str) -> str:
    """The body field that names a row of the table `entity` by id: "PhoneNumber" -> "phoneNumberId"."""
    return f"{entity[0].lower()}{entity[1:]}Id"


def conflict(message: str, field: str | None = None) -> ApiError:
    """409: the request clashes with the resource's current state."""
    return ApiError(409, "conflict", message, field)


def validation_error(exc: ValidationError, *, location: str) -> ApiError:
    """422 naming the first bad field, by its JSON path in the body (`a.b[0]`) or its query parameter name."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path = json_path(first["loc"])
    message = _message(first)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(422, "validation_error", f"{location} {path or 'value'}: {message}", path or None)


def json_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a JSON path: ("nodes", 0, "id") -> "nodes[0].id"."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else part
    return path


def _message(error: ErrorDetails) -> str:
    if error["type"] == "missing":
        return "is required"
    if error["type"] == "extra_forbidden":
        return "is not a field of this request"
    if error["type"] == "string_pattern_mismatch":
        return "contains characters that are not allowed"
    return str(error["msg"]).removeprefix("Value error, ")


# Storage errors that are the caller's to fix: (status, code).
_STORAGE_ERRORS: list[tuple[type[StorageError], int, str]] = [
    (NotFound, 404, "not_found"),
    (InvalidReference, 422, "invalid_reference"),
    (ConstraintViolation, 422, "invalid_value"),
]


def storage_error_status(kind: type[StorageError]) -> int:
    """The status error_middleware answers a storage error of this kind with (503 for those not the caller's)."""
    if issubclass(kind, AlreadyExists):
        return 409
    return next((status for error, status, _ in _STORAGE_ERRORS if issubclass(kind, error)), 503)


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure under /v1 in the one error shape; log (without request data) what is ours to fix."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except BodyTooSlow as exc:  # (engine.server.body_deadline closes the connection after this answer)
        return ApiError(408, "request_timeout", str(exc)).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = {
            404: f"no such resource: {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the request body is larger than {request.client_max_size} bytes, the most one request may carry; "
            "send it in smaller requests",
        }
        error = ApiError(exc.status, code, message.get(exc.status, exc.reason))
        response = error.response()
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except StorageError as exc:
        refused = storage_refusal(exc)
        if refused is not None:
            return refused.response()
        log.exception("storage error on %s %s", request.method, request.path)
        return ApiError(503, "unavailable", "the database could not complete the request; try again").response()
    except TRANSIENT_ERRORS:
        log.exception("database unavailable on %s %s", request.method, request.path)
        return ApiError(503, "unavailable", "the database cannot be reached right now; try again").response()
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return ApiError(500, "internal_error", "the server failed to handle this request").response()


def storage_refusal(exc: StorageError) -> ApiError | None:
    """The caller's error (404, 409, 422) a storage error stands for; None for one that is not the caller's to fix."""
    if isinstance(exc, AlreadyExists):
        return _already_exists(exc)
    if isinstance(exc, InvalidReference) and exc.entity is not None:
        return invalid_reference(reference_field(exc.entity), str(exc))
    return next(
        (ApiError(status, code, str(exc)) for kind, status, code in _STORAGE_ERRORS if isinstance(exc, kind)), None
    )


def _already_exists(exc: AlreadyExists) -> ApiError:
    # Under row-level security PostgreSQL withholds the clashing key's detail, leaving the constraint's name
    # ("PhoneNumber_phoneNumber_key"): name the field from it, and never echo another tenant's value.
    match = re.fullmatch(rf"{re.escape(exc.entity)}_(?P<field>\w+?)_key", exc.field)
    field = match["field"] if match else exc.field
    return ApiError(409, "already_exists", f"a {exc.entity} with this {field} already exists", field)
