"""The OpenAPI 3.1 document, generated from the route table and the pydantic models (never written by hand)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from engine.api.errors import ErrorResponse
from engine.api.idempotency import IDEMPOTENCY_HEADER, MAX_KEY_CHARS, key_description
from engine.api.models import ID_PATTERN
from engine.api.operations import Operation, Resource
from engine.server.body_deadline import BODY_MIN_BYTES_PER_SECOND, BODY_SECONDS

_REF = "#/components/schemas/{model}"

_ERROR_DESCRIPTIONS = {
    400: "The body is not a JSON document.",
    401: "No API key, or one that is unknown, revoked or expired.",
    402: "The organization has no credits left.",
    403: "The key's user is a VIEWER and the operation changes something (or is as sensitive: listening to a call).",
    404: "Nothing with that id in the caller's organization.",
    408: (
        f"The body did not arrive whole within {BODY_SECONDS:g} s plus 1 s for every {BODY_MIN_BYTES_PER_SECOND} bytes "
        "of it received; the connection is closed."
    ),
    409: "The request clashes with the resource's current state.",
    413: "The body is too large.",
    415: "The body is not of the media type the operation takes (multipart/form-data for uploads).",
    422: "A value is invalid; `field` is its JSON path (or the query parameter's name).",
    429: "Too many requests: the API key's rate limit (DIALTONE_API_RATE_LIMIT_PER_MINUTE), or for POST /v1/calls "
    "the plan's concurrent calls; `Retry-After` gives the seconds to wait.",
    502: "Twilio refused the request or could not be reached.",
    503: "The database is briefly unavailable, or this engine cannot do this (e.g. no Twilio account); try again.",
    504: "Twilio did not answer in time, and may have carried the request out: the CallLog named follows what it did.",
}


def openapi_document(resources: Sequence[Resource], *, prefix: str, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for the resources' operations, served under `prefix`."""
    operations = [operation for resource in resources for operation in resource.operations]
    schemas = _component_schemas(operations)
    paths: dict[str, dict[str, Any]] = {}
    for operation in operations:
        paths.setdefault(prefix + operation.path, {})[operation.method.lower()] = _operation(operation, schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "sk_live_… or sk_test_…"}
            },
        },
        "security": [{"apiKey": []}],
        "tags": [{"name": resource.tag, "description": resource.description} for resource in resources],
    }


def _component_schemas(operations: Sequence[Operation]) -> dict[str, Any]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorResponse, "serialization")]
    for operation in operations:
        if operation.response is not None:
            models.append((operation.response, "serialization"))
        if operation.body is not None:
            models.append((operation.body, "validation"))
        if operation.query is not None:
            models.append((operation.query, "validation"))
        if operation.form is not None:
            models.append((operation.form, "validation"))
    _, document = models_json_schema(list(dict.fromkeys(models)), ref_template=_REF)
    return dict(document.get("$defs", {}))


def _ref(model: type[BaseModel], mode: JsonSchemaMode, schemas: dict[str, Any]) -> dict[str, Any]:
    # pydantic names a model's schema after the model, suffixed -Input/-Output when the two modes differ.
    name = model.__name__
    candidates = [name, f"{name}-{'Input' if mode == 'validation' else 'Output'}"]
    for candidate in candidates:
        if candidate in schemas:
            return {"$ref": _REF.format(model=candidate)}
    title = model.model_json_schema(mode=mode)["title"]
    for schema_name, schema in schemas.items():
        if schema.get("title") == title:
            return {"$ref": _REF.format(model=schema_name)}
    raise LookupError(f"no component schema for {name}")


def _operation(operation: Operation, schemas: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "tags": [operation.tag],
    }
    if operation.handler.__doc__:
        spec["description"] = operation.handler.__doc__.strip()
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": ID_PATTERN}}
        for name in operation.path_params
    ]
    if operation.query is not None:
        parameters += _query_parameters(operation.query, schemas)
    if operation.streamed is not None:
        parameters += [
            {"name": name, "in": "header", "required": False, "description": meaning, "schema": {"type": "string"}}
            for name, meaning in operation.streamed.headers.items()
        ]
    if operation.idempotent:
        parameters.append(
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": False,
                "description": key_description(),
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS, "pattern": "^[\\x21-\\x7e]+$"},
            }
        )
    if parameters:
        spec["parameters"] = parameters
    if operation.body is not None:
        spec["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(operation.body, "validation", schemas)}},
        }
    if operation.form is not None:
        form = _form(operation.form, schemas)
        spec["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": form}}}
    responses: dict[str, Any] = {}
    if operation.streamed is not None:
        streamed = operation.streamed
        responses[str(operation.status)] = {
            "description": streamed.description,
            "content": {streamed.media_type: {"schema": {"type": "string"}}},
        }
    elif operation.status == 101:
        responses["101"] = {"description": "Switching Protocols: the connection is now the WebSocket described above."}
    elif operation.response is None:
        responses[str(operation.status)] = {"description": "Done; no content."}
    else:
        responses[str(operation.status)] = {
            "description": "OK",
            "content": {"application/json": {"schema": _ref(operation.response, "serialization", schemas)}},
        }
    for status in _error_statuses(operation):
        responses[str(status)] = {
            "description": _ERROR_DESCRIPTIONS[status],
            "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}},
        }
    spec["responses"] = responses
    return spec


def _form(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """A multipart form's schema: the model's fields, and the uploaded `file`."""
    fields = _resolve(_ref(model, "validation", schemas), schemas)
    return {
        "type": "object",
        "properties": {**fields.get("properties", {}), "file": {"type": "string", "format": "binary"}},
        "required": [*fields.get("required", []), "file"],
    }


def _error_statuses(operation: Operation) -> list[int]:
    statuses = {401, 429, 503}  # 429: every request counts against its key's rate limit
    if operation.for_writers:
        statuses.add(403)
    if operation.path_params:
        statuses.add(404)
    if operation.body is not None:
        statuses |= {400, 408, 413, 422}
    if operation.query is not None:
        statuses.add(422)
    if operation.idempotent:
        statuses |= {409, 422}  # a key still in flight; a key used with another body
    if operation.form is not None:
        statuses |= {400, 408, 413, 415, 422}
    statuses.update(operation.errors)
    return sorted(statuses)


def _query_parameters(model: type[BaseModel], schemas: dict[str, Any]) -> list[dict[str, Any]]:
    schema = _resolve(_ref(model, "validation", schemas), schemas)
    required = set(schema.get("required", ()))
    parameters = []
    for name, original in schema.get("properties", {}).items():
        prop = dict(original)
        description = prop.pop("description", None)
        prop.pop("title", None)
        parameter: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": _no_null(prop),
        }
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _resolve(ref: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    name = ref["$ref"].rsplit("/", 1)[1]
    resolved: dict[str, Any] = schemas[name]
    return resolved


def _no_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent rather than null: drop null from `anyOf`, and a null default."""
    options = [option for option in schema.get("anyOf", ()) if option != {"type": "null"}]
    if "anyOf" in schema:
        rest = {key: value for key, value in schema.items() if key not in {"anyOf", "default"}}
        if schema.get("default") is not None:
            rest["default"] = schema["default"]
        return {**options[0], **rest} if len(options) == 1 else {"anyOf": options, **rest}
    return schema
