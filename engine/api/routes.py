"""Every /v1 route, registered from one function: the resources' operations and the OpenAPI document."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from engine.api.auth import add_rate_limit_headers, auth_middleware
from engine.api.errors import error_middleware
from engine.api.openapi import openapi_document
from engine.api.operations import Resource, aiohttp_handler
from engine.api.resources import (
    agents,
    api_keys,
    call_logs,
    calls,
    campaign_recipients,
    campaigns,
    conversation_paths,
    do_not_call,
    events,
    knowledge_bases,
    live_call_control,
    live_call_events,
    live_call_listen,
    live_calls,
    me,
    organization,
    phone_numbers,
    tools,
    voices,
)

PREFIX = "/v1"
OPENAPI_PATH = f"{PREFIX}/openapi.json"

RESOURCES: tuple[Resource, ...] = (
    organization.resource,
    agents.resource,
    phone_numbers.resource,
    voices.resource,
    knowledge_bases.resource,
    conversation_paths.resource,
    tools.resource,
    events.resource,
    call_logs.resource,
    calls.resource,
    campaigns.resource,
    campaign_recipients.resource,
    do_not_call.resource,
    live_calls.resource,
    live_call_listen.resource,
    live_call_control.resource,
    live_call_events.resource,
    api_keys.resource,
    me.resource,
)
"""The API's resources, in the order the OpenAPI document lists them."""

OPENAPI_DOCUMENT = web.AppKey("openapi_document", dict[str, Any])


def add_api_routes(app: web.Application, resources: tuple[Resource, ...] = RESOURCES) -> None:
    """Mount the API under /v1: its own middlewares (one error shape, Bearer keys) apply to /v1 only."""
    api = web.Application(middlewares=[error_middleware, auth_middleware(frozenset({OPENAPI_PATH}))])
    api.on_response_prepare.append(add_rate_limit_headers)
    for resource in resources:
        for operation in resource.operations:
            api.router.add_route(operation.method, operation.path, aiohttp_handler(operation))
    api[OPENAPI_DOCUMENT] = openapi_document(resources, prefix=PREFIX, title="Dialtone API", version=_version())
    api.router.add_get("/openapi.json", _handle_openapi)
    app.add_subapp(PREFIX, api)


async def _handle_openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API (no key needed)."""
    return web.json_response(request.app[OPENAPI_DOCUMENT])


def _version() -> str:
    try:
        return version("dialtone")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0"
