"""The aiohttp application factory: routes in one place, resources owned by cleanup contexts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from config.settings import Settings
from engine import health
from engine.appkeys import DATABASE, SETTINGS
from storage.migrate import migrate
from storage.pool import open_database

log = logging.getLogger(__name__)

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def create_app(settings: Settings, *, apply_migrations: bool = True) -> web.Application:
    """Build the engine's application; the database opens when the app starts and closes when it stops."""
    app = web.Application()
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_database_context(apply_migrations))
    app.router.add_get("/health", health.handle_health)
    return app


def _database_context(apply_migrations: bool) -> CleanupContext:
    async def database_context(app: web.Application) -> AsyncIterator[None]:
        db = await open_database(app[SETTINGS])
        try:
            if apply_migrations:
                async with db.pool.acquire() as conn:
                    applied = await migrate(conn)
                if applied:
                    log.info("schema migrated to version %d", applied[-1].version)
            app[DATABASE] = db
            log.info("database ready at %s", db.location)
            yield
        finally:
            await db.close()

    return database_context
