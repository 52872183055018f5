"""Draining: a stopping engine takes no new calls and lets the ones it holds end by themselves, for a while."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from engine.call.live_calls import LiveCalls

log = logging.getLogger(__name__)


class Drain:
    """Whether this engine is draining, and what stops taking new work when it starts.

    Draining, the engine refuses new calls with 503 (its health check, the voice webhook, new media streams) so the
    load balancer sends them to another engine, while the calls it holds carry on as before.
    """

    def __init__(self) -> None:
        """Not draining; nothing to tell yet."""
        self._draining = False
        self._on_start: list[Callable[[], None]] = []

    @property
    def draining(self) -> bool:
        """Whether the engine has started draining (it never stops draining: the process is stopping)."""
        return self._draining

    def on_start(self, stop_taking_work: Callable[[], None]) -> None:
        """Have `stop_taking_work` called when draining starts (a background worker that starts new things)."""
        self._on_start.append(stop_taking_work)

    def refuse_new_call(self, what: str) -> None:
        """Raise 503 when draining, so the load balancer tries another engine with `what` (a new call's request)."""
        if self._draining:
            log.info("draining: %s refused with 503", what)
            raise web.HTTPServiceUnavailable(text="this engine is draining before it stops: try another engine")

    def start(self) -> None:
        """Start draining: refuse new calls from now on, and tell the background workers (once)."""
        if self._draining:
            return
        self._draining = True
        for stop_taking_work in self._on_start:
            stop_taking_work()


async def drain_live_calls(drain: Drain, calls: LiveCalls, *, seconds: float, stop_now: asyncio.Event) -> None:
    """Drain for up to `seconds`: return when no call is held any more, the time is up, or `stop_now` is set.

    The calls still held on return are the caller's to end (the application's shutdown ends them as
    `engine_shutdown`). With `seconds` 0, or no call held, it returns at once without draining.
    """
    held = calls.held
    if seconds <= 0 or not held:
        return
    drain.start()
    log.info(
        "draining: refusing new calls, waiting up to %g s for %d live call(s) to end "
        "(Ctrl-C or SIGTERM again to end them now)",
        seconds,
        held,
    )
    none_held = asyncio.ensure_future(calls.wait_until_none_held())
    stop_asked = asyncio.ensure_future(stop_now.wait())
    try:
        await asyncio.wait({none_held, stop_asked}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        none_held.cancel()
        stop_asked.cancel()
    if not calls.held:
        log.info("drained: every live call has ended")
    elif stop_now.is_set():
        log.warning("drain cut short by a second signal: ending %d live call(s) now", calls.held)
    else:
        log.warning("drain time (%g s) is up: ending %d live call(s) still running", seconds, calls.held)
