"""GET /health: is the engine taking calls (not draining), is the database reachable, and is its schema the one this
engine expects."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

from aiohttp import web

from engine.server.appkeys import DATABASE, DRAIN, LIVE_CALLS
from storage.errors import DATABASE_ERRORS
from storage.migrate import migration_status

HEALTH_TIMEOUT_SECONDS = 2.0


def engine_version() -> str:
    """The installed distribution's version."""
    try:
        return version("dialtone")
    except PackageNotFoundError:
        return "unknown"


async def handle_health(request: web.Request) -> web.Response:
    """200 with the database's state when all is well; 503 with the reason when it is not.

    A draining engine answers 503 `draining` at once, so load balancers and readiness probes send new calls elsewhere.
    """
    if request.app[DRAIN].draining:
        body = {"status": "draining", "version": engine_version(), "liveCalls": request.app[LIVE_CALLS].held}
        return web.json_response(body, status=503)
    db = request.app[DATABASE]
    began = time.perf_counter()
    database: dict[str, object] = {"location": db.location, "embedded": db.embedded is not None}
    try:
        async with db.pool.acquire(timeout=HEALTH_TIMEOUT_SECONDS) as conn:
            await conn.fetchval("SELECT 1", timeout=HEALTH_TIMEOUT_SECONDS)
            status = await migration_status(conn)
    except DATABASE_ERRORS as exc:
        database |= {"reachable": False, "error": f"{type(exc).__name__}: {exc}".rstrip(": ")}
        return web.json_response(
            {"status": "unavailable", "version": engine_version(), "database": database}, status=503
        )
    database |= {
        "reachable": True,
        "latencyMs": round((time.perf_counter() - began) * 1000, 2),
        "schemaVersion": status.current_version,
        "pendingMigrations": [m.label for m in status.pending],
    }
    healthy = not status.pending
    body = {"status": "ok" if healthy else "schema-outdated", "version": engine_version(), "database": database}
    return web.json_response(body, status=200 if healthy else 503)
