"""Whether the keys of this process's open streams and sockets may still be used: one query a period for them all.

Keys are checked as a request starts; a live event stream or a listen-in socket stays open for hours, so it waits in
`until_key_lost` alongside its work and ends when that returns, so that revoking a key ends what it has open. Were
each to ask the database every few seconds, a thousand open streams would make two hundred queries a second on the
pool the calls need; instead this process's `KeyWatch` asks once every KEY_RECHECK_SECONDS about every distinct key
they hold, and ends the waits of those now refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Final

from aiohttp import web

from engine.api.auth import LAST_USED_RESOLUTION, accepted_caller, presented_key
from engine.api.errors import ApiError
from engine.server.appkeys import DATABASE
from storage import Pool
from storage.api_keys import authenticate_holders, hash_key
from storage.errors import DATABASE_ERRORS

log = logging.getLogger(__name__)

KEY_RECHECK_SECONDS: Final = 5.0
"""How often the keys of streams and sockets that outlive their requests are asked about again."""


class KeyWatch:
    """This process's open streams' and sockets' keys, asked about together every KEY_RECHECK_SECONDS."""

    def __init__(self, pool: Pool) -> None:
        """Ask through `pool`."""
        self._pool = pool
        self._waiting: dict[str, dict[asyncio.Future[None], bool]] = {}  # key's stored form -> its waits -> writer?
        self._task: asyncio.Task[None] | None = None  # asks while anything waits

    async def stop(self) -> None:
        """Ask no more (waits still open go on until their streams end)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def until_lost(self, plaintext: str, *, writer: bool = False) -> None:
        """Return once the key `plaintext` would be refused if presented now (revoked, expired, its user gone or not
        ACTIVE; with `writer`, its user no longer an OWNER or ADMIN). A database that cannot answer for a moment
        ends nothing."""
        key = hash_key(plaintext)
        lost = asyncio.get_running_loop().create_future()
        waits = self._waiting.setdefault(key, {})
        waits[lost] = writer
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._follow(), name="api-key-watch")
        try:
            await lost
        finally:
            del waits[lost]
            if not waits:
                del self._waiting[key]

    async def _follow(self) -> None:
        while self._waiting:
            await asyncio.sleep(KEY_RECHECK_SECONDS)
            if not self._waiting:
                return
            try:
                await self._check()
            except DATABASE_ERRORS as exc:
                log.warning("API keys of open streams could not be checked (%s)", type(exc).__name__)
            except Exception:  # streams must not outlive their keys for good: ask again next time
                log.exception("checking the API keys of open streams failed")

    async def _check(self) -> None:
        keys = list(self._waiting)
        holders = await authenticate_holders(
            self._pool, key_hashes=keys, now=datetime.now(UTC), touch_interval=LAST_USED_RESOLUTION
        )
        for key in keys:
            try:
                writes = accepted_caller(holders.get(key)).can_write
            except ApiError:
                writes = None  # refused: every wait on the key ends
            for lost, writer in self._waiting.get(key, {}).items():
                if not lost.done() and (writes is None or (writer and not writes)):
                    lost.set_result(None)


KEY_WATCH = web.AppKey("key_watch", KeyWatch)


async def key_watch_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: this process's KeyWatch under KEY_WATCH (after the database's context)."""
    watch = app[KEY_WATCH] = KeyWatch(app[DATABASE].pool)
    try:
        yield
    finally:
        await watch.stop()


async def until_key_lost(request: web.Request, *, writer: bool = False) -> None:
    """Return once the key the request was authenticated with would be refused now (`KeyWatch.until_lost`), found
    within KEY_RECHECK_SECONDS (and the database's answer)."""
    plaintext = presented_key(request)
    if plaintext is None:  # it was authenticated: never, but then nothing allows it
        return
    await request.config_dict[KEY_WATCH].until_lost(plaintext, writer=writer)
