"""Headers every answer of the engine carries, whatever route made it.

`nosniff` on all: a browser must never read an answer as another type than it says (an error page echoing a path
as text/plain would otherwise be a candidate for HTML). `no-store` on the API's: they hold tenants' data and
secrets shown once (a new API key, a webhook signing secret) that no cache on the way may keep. A route that sets
its own Cache-Control (the live event stream, recordings, the monitor page) keeps it.
"""

from __future__ import annotations

from aiohttp import web

from engine.api.routes import PREFIX


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare of the root app (it runs for every sub-application's answers too)."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.path.startswith(f"{PREFIX}/"):
        response.headers.setdefault("Cache-Control", "no-store")
