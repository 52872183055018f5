"""The engine's access log: aiohttp's lines, with each request's path but never its query string."""

from __future__ import annotations

from typing import Any, cast

from aiohttp import web
from aiohttp.web_log import AccessLogger


class _WithoutQuery:
    """A request as the access log reads it, its `path_qs` (the request line's URL) cut at the `?`.

    Not `request.clone(rel_url=...)`: aiohttp refuses to clone a request whose body was read, which every form
    webhook's is, and logged an error for each of them instead of its line.
    """

    __slots__ = ("_request",)

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request

    @property
    def path_qs(self) -> str:
        return self._request.path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


class AccessLogWithoutQuery(AccessLogger):
    """aiohttp's access log, each request shown without its query string.

    A signed recording link carries its signature, a credential valid for days, in the query: anyone reading the
    logs could otherwise download the recording.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Write the line for `request` as aiohttp would, its URL cut at the `?`."""
        super().log(cast(web.BaseRequest, _WithoutQuery(request)), response, time)
