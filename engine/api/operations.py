"""The route table: each operation's method, path, models and handler, from which both the aiohttp routes and
the OpenAPI document are made."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.helpers import ChainMapProxy
from pydantic import BaseModel, ValidationError

from engine.api.auth import CALLER, READ_METHODS, Caller, require_writer, writer_refusal
from engine.api.errors import ApiError, not_found, validation_error
from engine.api.idempotency import IDEMPOTENCY_HEADER, idempotent
from engine.api.models import ID_PATTERN, RequestModel
from engine.server.appkeys import DATABASE
from storage.records import Connection
from storage.tenancy import tenant_transaction

M = TypeVar("M", bound=BaseModel)

_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One authenticated request as a handler sees it: the caller, path ids, and the validated query and body."""

    request: web.Request
    caller: Caller
    path: Mapping[str, str]
    query: BaseModel | None
    body: BaseModel | None

    def query_as(self, model: type[M]) -> M:
        """The validated query parameters, as the operation's query model."""
        assert isinstance(self.query, model), f"operation declares no query model {model.__name__}"
        return self.query

    def body_as(self, model: type[M]) -> M:
        """The validated JSON body, as the operation's body model."""
        assert isinstance(self.body, model), f"operation declares no body model {model.__name__}"
        return self.body

    def tenant(self) -> AbstractAsyncContextManager[Connection]:
        """A transaction that sees only the caller's organization (row-level security): every query goes here."""
        return tenant_transaction(self.request.config_dict[DATABASE].pool, self.caller.organization_id)

    @property
    def app(self) -> ChainMapProxy:
        """The engine's application resources (live calls, Twilio), looked up through /v1 to the main app."""
        return self.request.config_dict


Handler = Callable[[ApiCall], Awaitable[BaseModel | web.StreamResponse | None]]
"""What handles an operation: the call in, a response model (or None for 204) out; a WebSocket or streamed
operation's handler writes its own response (the finished WebSocketResponse, the StreamResponse) and returns it."""

Declaration = Callable[[Handler], Handler]
"""A decorator that adds its handler to a resource's operations."""


@dataclass(frozen=True, slots=True)
class Streamed:
    """A response written as it happens (e.g. Server-Sent Events), as the OpenAPI document describes it."""

    media_type: str
    description: str
    headers: Mapping[str, str] = field(default_factory=dict)
    """Request headers the operation reads, by name, with what each means."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One method on one path: what it takes, what it answers, and who handles it."""

    method: str
    path: str
    handler: Handler
    tag: str
    summary: str
    response: type[BaseModel] | None
    status: int
    body: type[RequestModel] | None
    query: type[RequestModel] | None
    errors: tuple[int, ...]
    """Error statuses beyond those every operation of its kind may answer (e.g. 409)."""
    idempotent: bool = False
    """Whether it honours an `Idempotency-Key` header (engine.api.idempotency)."""
    form: type[RequestModel] | None = None
    """A multipart/form-data body: these fields and a `file` part, which the handler reads (engine.api.uploads)."""
    streamed: Streamed | None = None
    """A response the handler streams itself instead of a JSON model."""
    writers_only: str | None = None
    """A read as sensitive as a write, and what it does (e.g. "listening to a call"): a VIEWER's key is refused."""

    @property
    def for_writers(self) -> bool:
        """Whether only an OWNER's or ADMIN's key may call it (a VIEWER's gets 403): every write, and `writers_only`."""
        return self.method not in READ_METHODS or self.writers_only is not None

    def refusal(self, caller: Caller) -> str | None:
        """Why `caller`'s key may not call this operation (the message of the 403 it would get), None if it may."""
        return writer_refusal(caller, self.writers_only) if self.for_writers else None

    @property
    def operation_id(self) -> str:
        """The handler's name, unique across the API."""
        return self.handler.__name__

    @property
    def path_params(self) -> list[str]:
        """The names of the path's {parameters}, in order."""
        return [part[1:-1] for part in self.path.split("/") if part.startswith("{") and part.endswith("}")]


@dataclass
class Resource:
    """A group of operations on one kind of thing (a tag in the OpenAPI document), declared with decorators."""

    tag: str
    description: str
    operations: list[Operation] = field(default_factory=list)

    def operation_of(self, handler: Handler) -> Operation:
        """The operation `handler` was declared for (LookupError if it was declared on no operation here)."""
        for operation in self.operations:
            if operation.handler is handler:
                return operation
        raise LookupError(f"{handler.__name__} is no operation of the {self.tag} resource")

    def get(
        self,
        path: str,
        *,
        summary: str,
        response: type[BaseModel],
        query: type[RequestModel] | None = None,
        errors: tuple[int, ...] = (),
    ) -> Declaration:
        """Declare a read."""
        return self._declare("GET", path, summary, response, 200, None, query, errors)

    def post(
        self,
        path: str,
        *,
        summary: str,
        response: type[BaseModel] | None,
        body: type[RequestModel] | None = None,
        status: int = 201,
        errors: tuple[int, ...] = (),
        idempotent: bool = False,
        form: type[RequestModel] | None = None,
    ) -> Declaration:
        """Declare a creation or an action; `idempotent` ones take an `Idempotency-Key` header; `form` instead of
        `body` for a file upload (multipart/form-data)."""
        return self._declare(
            "POST",
            path,
            summary,
            response,
            status if response else 204,
            body,
            None,
            errors,
            form,
            idempotent=idempotent,
        )

    def stream(
        self,
        path: str,
        *,
        summary: str,
        streamed: Streamed,
        query: type[RequestModel] | None = None,
        errors: tuple[int, ...] = (),
    ) -> Declaration:
        """Declare a read whose handler streams its response (`streamed` says what it is)."""
        return self._declare("GET", path, summary, None, 200, None, query, errors, streamed=streamed)

    def patch(
        self,
        path: str,
        *,
        summary: str,
        response: type[BaseModel],
        body: type[RequestModel],
        errors: tuple[int, ...] = (),
    ) -> Declaration:
        """Declare a partial update: fields left out of the body are left as they are."""
        return self._declare("PATCH", path, summary, response, 200, body, None, errors)

    def put(self, path: str, *, summary: str, errors: tuple[int, ...] = ()) -> Declaration:
        """Declare an idempotent link (no body, 204)."""
        return self._declare("PUT", path, summary, None, 204, None, None, errors)

    def delete(self, path: str, *, summary: str, errors: tuple[int, ...] = ()) -> Declaration:
        """Declare a deletion (204)."""
        return self._declare("DELETE", path, summary, None, 204, None, None, errors)

    def websocket(
        self,
        path: str,
        *,
        summary: str,
        query: type[RequestModel] | None = None,
        errors: tuple[int, ...] = (),
        writers_only: str | None = None,
    ) -> Declaration:
        """Declare a GET upgraded to a WebSocket (101); refusals before the upgrade answer like any GET. With
        `writers_only` (what it does), a VIEWER's key is refused as for a write."""
        return self._declare("GET", path, summary, None, 101, None, query, errors, writers_only=writers_only)

    def _declare(  # noqa: PLR0917 (positional: one line per HTTP method above reads as a table)
        self,
        method: str,
        path: str,
        summary: str,
        response: type[BaseModel] | None,
        status: int,
        body: type[RequestModel] | None,
        query: type[RequestModel] | None,
        errors: tuple[int, ...],
        form: type[RequestModel] | None = None,
        *,
        idempotent: bool = False,
        streamed: Streamed | None = None,
        writers_only: str | None = None,
    ) -> Declaration:
        def register(handler: Handler) -> Handler:
            self.operations.append(
                Operation(
                    method,
                    path,
                    handler,
                    self.tag,
                    summary,
                    response,
                    status,
                    body,
                    query,
                    errors,
                    idempotent,
                    form,
                    streamed,
                    writers_only,
                )
            )
            return handler

        return register


def aiohttp_handler(operation: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler for an operation: checks path ids, validates query and body, answers JSON."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if operation.idempotent and IDEMPOTENCY_HEADER in request.headers:
            return await idempotent(request, operation.operation_id, lambda: respond_json(request))
        return await respond(request)

    async def respond_json(request: web.Request) -> web.Response:
        response = await respond(request)
        assert isinstance(response, web.Response), "an idempotent operation answers JSON, never a stream or socket"
        return response

    async def respond(request: web.Request) -> web.StreamResponse:
        path = dict(request.match_info)
        for name, value in path.items():
            if not _ID.fullmatch(value):
                raise not_found(f"no {name} {value!r}: ids are letters, digits, '_' and '-'")
        if operation.writers_only is not None:  # (writes were refused to VIEWERs before routing)
            require_writer(request[CALLER], operation.writers_only)
        query = _validate(operation.query, dict(request.query), "query") if operation.query else None
        body = _validate_json(operation.body, await _json_body(request)) if operation.body else None
        result = await operation.handler(ApiCall(request, request[CALLER], path, query, body))
        if isinstance(result, web.StreamResponse):
            return result
        if result is None:
            return web.Response(status=204)
        return web.json_response(result.model_dump(mode="json", by_alias=True), status=operation.status)

    handle.__name__ = operation.operation_id
    return handle


def _validate(model: type[RequestModel], data: Any, location: str) -> RequestModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, location=location) from None


def _validate_json(model: type[RequestModel], text: str) -> RequestModel:
    # Strict: a JSON value of another type is refused rather than converted (0 for false, "5" for 5).
    try:
        return model.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise validation_error(exc, location="body") from None


async def _json_body(request: web.Request) -> str:
    """The request's JSON text, once it is known to parse and to hold only storable strings."""
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "invalid_json", "send a JSON object as the request body")
    try:
        text = raw.decode("utf-8")
        strings = list(
            _strings(json.loads(text, parse_int=_integer, parse_float=_finite, parse_constant=_constant), "")
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON ({exc})") from None
    except _NotJsonNumber as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # arrays or objects nested about a thousand deep: the client's error, not a 500
        raise ApiError(400, "invalid_json", "the request body's JSON is nested too deeply") from None
    for path, value in strings:
        if "\x00" in value or not _encodable(value):
            raise ApiError(
                422, "validation_error", f"body {path or 'value'}: contains characters that cannot be stored", path
            )
    return text


class _NotJsonNumber(ValueError):
    """A number Python's json module reads but JSON (RFC 8259) or the API's values cannot hold."""


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # past Python's 4,300 digits: far past any value the API takes
        raise _NotJsonNumber(f"the number {text[:20]}... has {len(text)} digits") from None


def _finite(text: str) -> float:
    # 1e400 reads as infinity, which no JSON value (nor a PostgreSQL json column) holds.
    value = float(text)
    if not math.isfinite(value):
        raise _NotJsonNumber(f"the number {text[:40]} is beyond the range of a 64-bit floating-point number")
    return value


def _constant(name: str) -> Any:
    raise _NotJsonNumber(f"{name} is not a JSON value; send a number or null")


def _strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string in a JSON document (object keys included), with its JSON path."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            yield child, key
            yield from _strings(value, child)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{path}[{index}]")


def _encodable(text: str) -> bool:
    # JSON may carry lone surrogates ("\ud800"), which no database text column can hold.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
