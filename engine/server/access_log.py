"""The engine's access log: aiohttp's lines, with each request's path but never its query string."""

from __future__ import annotations

from aiohttp import web
from aiohttp.web_log import AccessLogger


class AccessLogWithoutQuery(AccessLogger):
    """aiohttp's access log, each request shown without its query string.

    A signed recording link carries its signature, a credential valid for days, in the query: anyone reading the
    logs could otherwise download the recording.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Write the line for `request` as aiohttp would, its URL cut at the `?`."""
        super().log(request.clone(rel_url=request.rel_url.with_query(None)), response, time)
