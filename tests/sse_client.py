"""A Server-Sent Events client for tests: reads an engine's event stream in the background, as a browser would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One event as received: its id (None for a snapshot), type and JSON data."""

    id: int | None
    type: str
    data: dict[str, Any]


class EventStream:
    """An open event stream; `events` grows as they arrive, `until` waits for one."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str, *, last_event_id: int | None = None) -> None:
        """Read `url` with API key `key`, resuming after `last_event_id` when given."""
        self._session = session
        self._url = url
        self._headers = {"Authorization": f"Bearer {key}"}
        if last_event_id is not None:
            self._headers["Last-Event-ID"] = str(last_event_id)
        self.events: list[SseEvent] = []
        self.keepalives = 0
        self.ended = False
        self._arrived = asyncio.Event()
        self._response: aiohttp.ClientResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventStream:
        """Open the stream (its headers have arrived: the server watches from now on)."""
        self._response = await self._session.get(self._url, headers=self._headers)
        assert self._response.status == 200, await self._response.text()
        assert self._response.content_type == "text/event-stream"
        self._reader = asyncio.create_task(self._read(self._response))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Disconnect."""
        await self.close()

    async def close(self) -> None:
        """Disconnect now, as a client that goes away."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._response is not None:
            self._response.close()

    async def until(self, matches: Callable[[SseEvent], bool], *, timeout: float = 60) -> SseEvent:
        """The first event (received or to come) that `matches`."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events:
                    if matches(event):
                        return event
                if self.ended:
                    raise AssertionError(f"the stream ended without it; received {self.events}")
                self._arrived.clear()
                await self._arrived.wait()

    async def until_ended(self, *, timeout: float = 30) -> None:
        """Wait until the server ends the stream."""
        async with asyncio.timeout(timeout):
            while not self.ended:
                self._arrived.clear()
                await self._arrived.wait()

    def of_type(self, event_type: str) -> list[SseEvent]:
        """The events of one type received so far."""
        return [event for event in self.events if event.type == event_type]

    async def _read(self, response: aiohttp.ClientResponse) -> None:
        fields: dict[str, str] = {}
        try:
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    self.keepalives += 1
                elif line:
                    name, _, value = line.partition(": ")
                    fields[name] = value
                elif fields:
                    event_id = fields.get("id")
                    self.events.append(
                        SseEvent(int(event_id) if event_id else None, fields["event"], json.loads(fields["data"]))
                    )
                    fields = {}
                    self._arrived.set()
        finally:
            self.ended = True
            self._arrived.set()
