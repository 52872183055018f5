"""What happens in calls, as it happens, for the API's event streams: recorded only while someone watches.

Each call emits through its `CallEvents` (`session.live.emit("caller.final", text=..., turnIndex=...)`). This
process's `LiveEvents` knows which calls and organizations are watched (the streams' leases, from the database and
announced on WATCH_CHANNEL); for any other call an emit is a set lookup and nothing more. Watched events are queued,
inserted in batches every FLUSH_SECONDS by one background task, and announced on EVENT_CHANNEL, which wakes the
streams of every engine process; they read the events from the database (through their organization's EventFeed,
one read per process for all its streams), so a stream on any process sees the events of calls held by any other,
and resumes after the last id it sent with nothing lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web

from engine.call.control_channel import CONTROL, ControlChannel
from engine.call.live_event_feed import EventFeed, FeedReader
from engine.server.appkeys import DATABASE, SETTINGS
from engine.workers.recovery import NODE_ID
from pipelines.tools import TOOL_ERROR_PREFIX
from storage import Pool, live_call_events
from storage.call_events import call_parties
from storage.call_logs import CallLog
from storage.errors import DATABASE_ERRORS, TRANSIENT_ERRORS
from storage.live_call_events import EVENT_CHANNEL, NewEvent, Watch
from storage.records import Connection

log = logging.getLogger(__name__)

WATCH_CHANNEL: Final = "dialtone_live_watch"
"""Announces a new stream: {"org": id, "call": id or null}; every process records that call's events from now on."""
FLUSH_SECONDS: Final = 0.05
REFRESH_SECONDS: Final = 5.0
"""How often each process re-reads the leases (a NOTIFY may be lost; leases expire)."""
PRUNE_SECONDS: Final = 60.0
MAX_QUEUED: Final = 10_000
"""Events waiting for the database beyond this are dropped, oldest first (logged): memory stays bounded."""
WATCH_LEASE: Final = timedelta(seconds=30)
WATCH_RENEW_SECONDS: Final = 10.0
"""How often each process renews the leases of all its open streams, in one statement."""
TOOL_RESULT_CHARS: Final = 1000
"""A tool.call event carries this much of the function's result."""
RECONNECT_GRACE: Final = timedelta(seconds=15)
"""How long a closed stream's call stays recorded, for the client's reconnection to resume with nothing lost (less
than a lease has left at any time, WATCH_LEASE - WATCH_RENEW_SECONDS: closing never extends it)."""


def utc_now() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


def call_description(call_log: CallLog) -> dict[str, Any]:
    """A call as call.started and call.snapshot describe it: direction, the two numbers, the agent."""
    parties = call_parties(call_log.call_type.value, call_log.phone_number, call_log.metadata)
    return {"direction": call_log.call_type.value.lower(), **parties, "agentId": call_log.agent_id}


class LiveEvents:
    """This process's publisher of live call events, and the wake-up of its streams."""

    def __init__(
        self, pool: Pool, *, retention: timedelta, clock: Callable[[], datetime] = utc_now, node_id: str = ""
    ) -> None:
        """Record through `pool`; prune events older than `retention`."""
        self._pool = pool
        self._retention = retention
        self._clock = clock
        self.node_id = node_id
        self._organizations: frozenset[str] = frozenset()
        self._calls: frozenset[str] = frozenset()
        self._announced: dict[Watch, datetime] = {}  # watches heard of, kept until a refresh has surely read them
        self._queue: deque[NewEvent] = deque(maxlen=MAX_QUEUED)
        self._dropped = 0
        self._queued = asyncio.Event()
        self._feeds: dict[str, EventFeed] = {}
        self._leases: set[str] = set()  # the ids of this process's open streams' leases
        self._renewing = asyncio.Lock()  # held while a renewal of them is under way
        self._renewal: asyncio.Task[None] | None = None  # renews them while there are any
        self._refresh_now = asyncio.Event()
        self._control: ControlChannel | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.closing = False
        """The engine is shutting down: streams end."""

    # ------------------------------------------------------------------------------------------ emitting

    def watching(self, organization_id: str, call_log_id: str) -> bool:
        """Whether a stream watches the call or its organization (so its events are recorded)."""
        return call_log_id in self._calls or organization_id in self._organizations

    def record(self, organization_id: str, call_log_id: str, event_type: str, data: dict[str, Any]) -> None:
        """Queue an event of a watched call for the next batch (a full queue drops its oldest)."""
        if len(self._queue) == MAX_QUEUED:
            self._dropped += 1
        self._queue.append(NewEvent.stamped(organization_id, call_log_id, event_type, data, at=self._clock()))
        self._queued.set()

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self, control: ControlChannel) -> None:
        """Follow the streams' leases and start recording (hearing announcements on `control`'s connection)."""
        self._control = control
        await control.subscribe(WATCH_CHANNEL, self._on_watch)
        await control.subscribe(EVENT_CHANNEL, self._on_events)
        with contextlib.suppress(*DATABASE_ERRORS):  # the refresh loop tries again
            await self._refresh()
        self._tasks = [
            asyncio.create_task(self._write_batches(), name="live-events-writer"),
            asyncio.create_task(self._follow_watches(), name="live-events-watches"),
        ]

    def close_streams(self) -> None:
        """The engine is shutting down: every stream of this process ends (its client reconnects elsewhere)."""
        self.closing = True
        for feed in self._feeds.values():
            feed.wake_all()

    async def stop(self) -> None:
        """Stop; events still queued are written first (bounded by the database's answer)."""
        self.close_streams()
        for feed in self._feeds.values():
            feed.stop()
        if self._control is not None:
            self._control.unsubscribe(WATCH_CHANNEL, self._on_watch)
            self._control.unsubscribe(EVENT_CHANNEL, self._on_events)
        tasks = [*self._tasks, *([self._renewal] if self._renewal is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue:
            with contextlib.suppress(*DATABASE_ERRORS, TimeoutError):
                await asyncio.wait_for(self._write(), timeout=5)

    async def _write_batches(self) -> None:
        while True:
            await self._queued.wait()
            await asyncio.sleep(FLUSH_SECONDS)  # let the batch gather
            batch = list(self._queue)
            try:
                await self._write()
            except TRANSIENT_ERRORS as exc:
                log.warning("live events: a batch could not be written (%s); retrying", type(exc).__name__)
                waiting = [*batch, *self._queue]  # written next time, before what came meanwhile
                self._dropped += max(0, len(waiting) - MAX_QUEUED)
                self._queue = deque(waiting, maxlen=MAX_QUEUED)
                self._queued.set()
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("live events: a batch of %d events could not be written; it is dropped", len(batch))
            if self._dropped:
                log.warning("live events: %d events were dropped, the database not keeping up", self._dropped)
                self._dropped = 0

    async def _write(self) -> None:
        batch = list(self._queue)
        self._queue.clear()
        self._queued.clear()
        await live_call_events.record_events(self._pool, batch)
        organizations = sorted({event.organization_id for event in batch})
        try:
            await self._publish(EVENT_CHANNEL, {"orgs": organizations})
        except DATABASE_ERRORS as exc:  # the streams find the events at their next look
            log.warning("live events: a batch could not be announced (%s)", type(exc).__name__)

    async def _publish(self, channel: str, message: dict[str, Any]) -> None:
        payload = json.dumps(message, separators=(",", ":"))
        if self._control is not None:
            await self._control.publish(channel, payload)

    # ------------------------------------------------------------------------------------------ watches

    async def _follow_watches(self) -> None:
        next_prune = 0.0
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_now.wait(), timeout=REFRESH_SECONDS)
            self._refresh_now.clear()
            try:
                await self._refresh()
                if loop.time() >= next_prune:
                    next_prune = loop.time() + PRUNE_SECONDS
                    pruned = await live_call_events.prune(self._pool, now=self._clock(), keep=self._retention)
                    if pruned:
                        log.info("live events: pruned %d events older than %s", pruned, self._retention)
            except DATABASE_ERRORS as exc:
                log.warning("live events: the streams' leases could not be read (%s)", type(exc).__name__)

    async def _refresh(self) -> None:
        now = self._clock()
        watches = await live_call_events.current_watches(self._pool, now=now)
        self._announced = {watch: until for watch, until in self._announced.items() if until > now}
        self._apply([*watches, *self._announced])

    def _apply(self, watches: list[Watch]) -> None:
        self._organizations = frozenset(w.organization_id for w in watches if w.call_log_id is None)
        self._calls = frozenset(w.call_log_id for w in watches if w.call_log_id is not None)

    def announce(self, watch: Watch) -> None:
        """A stream watches this now: record its events from now on (until the leases say otherwise)."""
        until = self._clock() + timedelta(seconds=2 * REFRESH_SECONDS)
        self._announced[watch] = until
        if watch.call_log_id is None:
            self._organizations |= {watch.organization_id}
        else:
            self._calls |= {watch.call_log_id}

    def _on_watch(self, payload: str | None) -> None:
        if payload is None:  # announcements may have been lost while the channel reconnected
            self._refresh_now.set()
            return
        try:
            message = json.loads(payload)
            self.announce(Watch(str(message["org"]), None if message["call"] is None else str(message["call"])))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("live events: ignored a malformed watch announcement (%s)", exc)

    def _on_events(self, payload: str | None) -> None:
        if payload is None:  # announcements may have been lost: every feed looks
            for feed in self._feeds.values():
                feed.stale()
            return
        try:
            organizations = json.loads(payload)["orgs"]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("live events: ignored a malformed event announcement (%s)", exc)
            return
        for organization_id in organizations:
            if (announced := self._feeds.get(str(organization_id))) is not None:
                announced.stale()

    # ------------------------------------------------------------------------------------------ streams

    @asynccontextmanager
    async def watch(
        self, watch: Watch, tenant: Callable[[], AbstractAsyncContextManager[Connection]]
    ) -> AsyncIterator[FeedReader]:
        """Hold a stream's lease while the block runs (taken and let go through `tenant` transactions, renewed with
        those of this process's other streams), announced to every process; yield the stream's reader of its
        organization's feed (its `wake` set when events for it may be new)."""
        organization_id = watch.organization_id
        async with tenant() as db:
            watch_id = await live_call_events.open_watch(
                db, watch, node=self.node_id, until=self._clock() + WATCH_LEASE
            )
        self.announce(watch)
        await self._publish(WATCH_CHANNEL, {"org": organization_id, "call": watch.call_log_id})
        if organization_id not in self._feeds:
            self._feeds[organization_id] = EventFeed(self._pool, organization_id)
        feed = self._feeds[organization_id]
        reader = feed.join(watch.call_log_id)
        self._leases.add(watch_id)
        if self._renewal is None or self._renewal.done():
            self._renewal = asyncio.create_task(self._renew_leases(), name="live-events-leases")
        try:
            yield reader
        finally:
            self._leases.discard(watch_id)
            if feed.leave(reader):
                del self._feeds[organization_id]
            async with self._renewing:  # a renewal under way may hold the lease: closing must not be undone by it
                pass
            with contextlib.suppress(*DATABASE_ERRORS):  # it expires by itself
                async with tenant() as db:
                    await live_call_events.expire_watch(
                        db, organization_id=organization_id, watch_id=watch_id, until=self._clock() + RECONNECT_GRACE
                    )

    async def _renew_leases(self) -> None:
        """Renew the leases of every open stream of this process, in one statement every WATCH_RENEW_SECONDS, until
        none is left."""
        while self._leases:
            await asyncio.sleep(WATCH_RENEW_SECONDS)
            if not self._leases:
                return
            async with self._renewing:
                leases = list(self._leases)
                try:
                    await live_call_events.renew_watches(
                        self._pool, node=self.node_id, watch_ids=leases, until=self._clock() + WATCH_LEASE
                    )
                except DATABASE_ERRORS as exc:
                    log.warning(
                        "live events: %d streams' leases could not be renewed (%s)", len(leases), type(exc).__name__
                    )
                except Exception:  # the streams' leases must not lapse for good: renew again next time
                    log.exception("live events: renewing %d streams' leases failed", len(leases))


class CallEvents:
    """One call's live events: `emit` costs a set lookup when nobody watches the call or its organization."""

    __slots__ = ("_publisher", "call_log_id", "organization_id")

    def __init__(self, publisher: LiveEvents | None, organization_id: str, call_log_id: str) -> None:
        """Emit through `publisher` (None: a call outside any engine app, whose events go nowhere)."""
        self._publisher = publisher
        self.organization_id = organization_id
        self.call_log_id = call_log_id

    @property
    def watched(self) -> bool:
        """Whether anyone watches the call or its organization now: what an event would cost a query to tell."""
        publisher = self._publisher
        return publisher is not None and publisher.watching(self.organization_id, self.call_log_id)

    def emit(self, event_type: str, **data: Any) -> None:
        """Record an event of the call (its `callLogId` and `at` are added) if anyone watches it."""
        publisher = self._publisher
        if publisher is not None and self.watched:
            publisher.record(self.organization_id, self.call_log_id, event_type, data)

    def tool_call(self, name: str, arguments: Mapping[str, Any], result: str) -> None:
        """An agent function was called (tool.call); `ok` unless its result is an error for the model."""
        self.emit(
            "tool.call",
            name=name,
            arguments=dict(arguments),
            ok=not result.startswith(TOOL_ERROR_PREFIX),
            result=result[:TOOL_RESULT_CHARS],
        )


LIVE_EVENTS = web.AppKey("live_events", LiveEvents)


async def live_events_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: this process's LiveEvents under LIVE_EVENTS (after the control channel's context)."""
    retention = timedelta(seconds=app[SETTINGS].live_events_retention)
    events = LiveEvents(app[DATABASE].pool, retention=retention, node_id=app[NODE_ID])
    app[LIVE_EVENTS] = events
    await events.start(app[CONTROL])
    try:
        yield
    finally:
        await events.stop()


async def close_live_streams(app: web.Application) -> None:
    """On shutdown: end this process's event streams, so the server need not wait for their clients."""
    events = app.get(LIVE_EVENTS)
    if events is not None:
        events.close_streams()
