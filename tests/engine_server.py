"""The real engine application served on a free loopback port, for tests that speak HTTP to it."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from config.settings import load_settings
from engine.server.app import create_app
from tests.fakes.server import serve


@asynccontextmanager
async def running_engine(database_url: str, *, apply_migrations: bool = True, **settings: Any) -> AsyncIterator[str]:
    """Serve the engine on 127.0.0.1 with a port the OS picks; yield its base URL.

    Its state (recordings, signing key) goes to a temporary folder unless `state_dir` is given.
    """
    with tempfile.TemporaryDirectory(prefix="dialtone-engine-") as scratch:
        settings.setdefault("state_dir", scratch)
        async with _serve(database_url, apply_migrations, settings) as base:
            yield base


@asynccontextmanager
async def _serve(database_url: str, apply_migrations: bool, settings: dict[str, Any]) -> AsyncIterator[str]:
    app = create_app(load_settings(database_url=database_url, **settings), apply_migrations=apply_migrations)
    async with serve(app) as base:
        yield base
