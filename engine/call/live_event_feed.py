"""One read of an organization's new live events per engine process, shared by every stream of it there.

Each batch an engine process records wakes the streams of its organization on every process. Were each stream to
read the database itself, a thousand streams of a busy organization would make a thousand queries every 50 ms and
starve the engine's pool; instead the process's `EventFeed` of the organization reads what is new once and keeps the
last FEED_KEPT events, from which each of its streams takes its own. A stream resuming from further back than the
feed holds (or fallen that far behind) reads the database until it has caught up.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from typing import Final

from storage import Pool, live_call_events
from storage.errors import DATABASE_ERRORS
from storage.live_call_events import LiveCallEvent
from storage.tenancy import tenant_read_transaction

log = logging.getLogger(__name__)

FEED_KEPT: Final = 500
"""The newest events of an organization a feed keeps for its streams."""
READ_LIMIT: Final = 500
"""Events read at once, by a feed or by a stream catching up."""
REREAD_SECONDS: Final = 5.0
"""A feed reads at least this often, announced or not (an announcement may be lost)."""


class FeedReader:
    """One stream's place in its organization's feed: the call it follows (None: every call) and how far it has read."""

    __slots__ = ("_feed", "call_log_id", "position", "wake")

    def __init__(self, feed: EventFeed, call_log_id: str | None) -> None:
        """Follow `call_log_id` (None: every call of the organization) in `feed`, once `position` is set."""
        self._feed = feed
        self.call_log_id = call_log_id
        self.position = 0
        """The id of the last event read (the stream sets it to where it starts, before its first `take`)."""
        self.wake = asyncio.Event()
        """Set when events for this stream may be new (and when the stream is to end)."""

    def wants(self, event: LiveCallEvent) -> bool:
        """Whether the stream sends `event`."""
        return self.call_log_id is None or event.call_log_id == self.call_log_id

    async def take(self) -> list[LiveCallEvent]:
        """The stream's next events (at most READ_LIMIT), oldest first; `position` moves past them."""
        return await self._feed.take(self)


class EventFeed:
    """The events of one organization this process's streams follow, read from the database once for all of them."""

    def __init__(self, pool: Pool, organization_id: str) -> None:
        """Read `organization_id`'s events through `pool`, under row-level security as the API reads."""
        self._pool = pool
        self.organization_id = organization_id
        self._events: list[LiveCallEvent] = []  # the newest read, oldest first
        self._ids: list[int] = []
        self._kept_from = 0  # every event after this id and up to _read_up_to is in _events
        self._read_up_to: int | None = None  # None until the feed has looked
        self.readers: set[FeedReader] = set()
        self._stale = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def join(self, call_log_id: str | None) -> FeedReader:
        """A new reader of the organization's events (of one call's, if given); the feed reads while it has one."""
        reader = FeedReader(self, call_log_id)
        self.readers.add(reader)
        if self._task is None:
            self._stale.set()
            self._task = asyncio.create_task(self._follow(), name=f"live-events-feed-{self.organization_id}")
        return reader

    def leave(self, reader: FeedReader) -> bool:
        """`reader` follows no more; with no reader left the feed stops, and says so (True)."""
        self.readers.discard(reader)
        if self.readers:
            return False
        self.stop()
        return True

    def stop(self) -> None:
        """Read no more (the engine is stopping); readers still there take what the feed holds."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def stale(self) -> None:
        """The organization may have new events (an engine process announced a batch of them)."""
        self._stale.set()

    def wake_all(self) -> None:
        """Every reader looks again (the engine is shutting down, or announcements may have been lost)."""
        self._stale.set()
        for reader in self.readers:
            reader.wake.set()

    async def take(self, reader: FeedReader) -> list[LiveCallEvent]:
        """The reader's next events (at most READ_LIMIT), oldest first, moving it past them: from the feed, or from
        the database while the reader is further back than the feed holds."""
        read_up_to = self._read_up_to
        if read_up_to is None or reader.position < self._kept_from:
            async with tenant_read_transaction(self._pool, self.organization_id) as db:
                events = await live_call_events.events_after(
                    db,
                    organization_id=self.organization_id,
                    call_log_id=reader.call_log_id,
                    after=reader.position,
                    limit=READ_LIMIT,
                )
            if events:
                reader.position = events[-1].id
            if len(events) < READ_LIMIT and read_up_to is not None:
                reader.position = max(reader.position, read_up_to)  # read after the feed had, so nothing is skipped
            return events
        start = bisect.bisect_right(self._ids, reader.position)
        taken: list[LiveCallEvent] = []
        for event in self._events[start:]:
            if reader.wants(event):
                taken.append(event)
                if len(taken) == READ_LIMIT:
                    reader.position = event.id
                    return taken
        reader.position = max(reader.position, read_up_to)
        return taken

    async def _follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stale.wait(), timeout=REREAD_SECONDS)
            self._stale.clear()
            try:
                await self._read()
            except DATABASE_ERRORS as exc:
                log.warning("live events: an organization's new events could not be read (%s)", type(exc).__name__)
            except Exception:  # its streams must not go silent for good: read again
                log.exception("live events: reading an organization's new events failed")
            else:
                continue
            await asyncio.sleep(1.0)
            self._stale.set()

    async def _read(self) -> None:
        async with tenant_read_transaction(self._pool, self.organization_id) as db:
            if self._read_up_to is None:
                self._read_up_to = self._kept_from = await live_call_events.last_event_id(
                    db, organization_id=self.organization_id, call_log_id=None
                )
                for reader in self.readers:
                    reader.wake.set()
                return
            events = await live_call_events.events_after(
                db, organization_id=self.organization_id, call_log_id=None, after=self._read_up_to, limit=READ_LIMIT
            )
        if not events:
            return
        if len(events) == READ_LIMIT:
            self._stale.set()  # more to read
        previous = self._read_up_to
        self._events += events
        self._ids += [event.id for event in events]
        self._read_up_to = events[-1].id
        if len(self._events) > FEED_KEPT:
            dropped = len(self._events) - FEED_KEPT
            self._kept_from = self._ids[dropped - 1]
            del self._events[:dropped], self._ids[:dropped]
        calls = {event.call_log_id for event in events}
        for reader in self.readers:
            if reader.call_log_id is None or reader.call_log_id in calls:
                reader.wake.set()
            elif reader.position >= previous:
                reader.position = self._read_up_to  # nothing of its call: it need not look at these again
