"""/v1/live-calls/events and /v1/live-calls/{callLogId}/events: what happens in calls, as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from pydantic import Field

from engine.api.errors import ApiError
from engine.api.key_watch import until_key_lost
from engine.api.models import RequestModel
from engine.api.operations import ApiCall, Resource, Streamed
from engine.call.live_event_feed import READ_LIMIT
from engine.call.live_events import LIVE_EVENTS, call_description, utc_now
from storage import call_logs, live_call_events
from storage.call_logs import CallLog
from storage.enums import CallStatus
from storage.live_call_events import Watch
from storage.records import Queryable

resource = Resource(
    "Live call events",
    "What happens in calls in progress, as it happens, as Server-Sent Events readable from any engine process.",
)

RESUME_HEADER: Final = "Last-Event-ID"
KEEPALIVE_SECONDS: Final = 15.0
STALLED_SECONDS: Final = 2 * KEEPALIVE_SECONDS
"""A client that takes nothing of a write for this long has stopped reading (or is gone): its connection is cut, and
its stream's lease let go (it resumes with Last-Event-ID, nothing lost, once it reads again)."""
SNAPSHOT_LIMIT: Final = 500
"""At most this many calls in progress are described when a stream opens."""
MAX_EVENT_ID: Final = 2**63 - 1
"""Event ids are PostgreSQL bigints."""

STREAM = Streamed(
    "text/event-stream",
    "Server-Sent Events, one per thing that happens: `id: <increasing integer>`, `event: <type>`, "
    "`data: <JSON>` (every data has `callLogId` and `at`, an ISO-8601 UTC time). Types: call.started, call.state, "
    "caller.interim, caller.final, agent.speaking, agent.turn, turn.latency, tool.call, path.node, call.say, "
    "call.transfer, call.ended. Opened without a Last-Event-ID, the stream first sends one `call.snapshot` (no "
    "`id:`) per call in progress it covers; a `: keepalive` comment comes after any 15 s in which nothing was sent. A "
    "call's stream ends after its call.ended (or once the call is over and 15 s passed without one of its events, "
    "whatever the organization's other calls do); either stream ends once its key is "
    "revoked or expired, or its user is removed (checked every few seconds), and a client that takes nothing of it for "
    "30 s is cut off (it resumes with Last-Event-ID).",
    headers={
        RESUME_HEADER: "Resume after this event id (the last `id:` received): every later event is sent, from any "
        "engine process. Events are kept for DIALTONE_LIVE_EVENTS_RETENTION seconds."
    },
)


class EventsQuery(RequestModel):
    """Where a stream resumes, for clients that cannot set the Last-Event-ID header."""

    last_event_id: int | None = Field(
        default=None, ge=0, le=MAX_EVENT_ID, description="Resume after this event id (the Last-Event-ID header wins)."
    )


@resource.stream(
    "/live-calls/events",
    summary="Stream the events of the organization's calls",
    streamed=STREAM,
    query=EventsQuery,
)
async def stream_live_events(call: ApiCall) -> web.StreamResponse:
    """Every call of the organization, on any engine process, as it happens."""

    async def in_progress(db: Queryable) -> list[CallLog]:
        return list(
            await call_logs.list_call_logs(
                db, organization_id=call.caller.organization_id, status=CallStatus.IN_PROGRESS, limit=SNAPSHOT_LIMIT
            )
        )

    return await _stream(call, None, in_progress)


@resource.stream(
    "/live-calls/{callLogId}/events",
    summary="Stream the events of one call",
    streamed=STREAM,
    query=EventsQuery,
)
async def stream_live_call_events(call: ApiCall) -> web.StreamResponse:
    """One call, on whichever engine process holds it, as it happens; the stream ends after the call's end."""
    organization_id = call.caller.organization_id
    async with call.tenant() as db:
        log = await call_logs.get_call_log(db, organization_id=organization_id, call_log_id=call.path["callLogId"])

    async def in_progress(db: Queryable) -> list[CallLog]:
        now = await call_logs.get_call_log(db, organization_id=organization_id, call_log_id=log.id)
        return [now] if now.status is CallStatus.IN_PROGRESS else []

    return await _stream(call, log.id, in_progress)


def _resume_after(call: ApiCall) -> int | None:
    header = call.request.headers.get(RESUME_HEADER)
    if header is None:
        return call.query_as(EventsQuery).last_event_id
    value = header.strip()
    if not (value.isascii() and value.isdigit() and int(value) <= MAX_EVENT_ID):
        raise ApiError(422, "validation_error", f"{RESUME_HEADER}: expected an event id (an integer)", RESUME_HEADER)
    return int(value)


async def _stream(
    call: ApiCall, call_log_id: str | None, in_progress: Callable[[Queryable], Awaitable[list[CallLog]]]
) -> web.StreamResponse:
    """Hold a watch on the organization (or the call), send the snapshot of the calls `in_progress` finds or what
    was missed, then follow."""
    organization_id = call.caller.organization_id
    after = _resume_after(call)
    live = call.app[LIVE_EVENTS]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    async with live.watch(Watch(organization_id, call_log_id), call.tenant) as reader:
        wake = reader.wake
        snapshot: list[CallLog] = []
        if after is None:  # from now on: what happened before is the snapshot
            async with call.tenant() as db:
                after = await live_call_events.last_event_id(
                    db, organization_id=organization_id, call_log_id=call_log_id
                )
                snapshot = await in_progress(db)
        reader.position = after
        await response.prepare(call.request)
        client = _Client(call.request, response)
        key_lost = asyncio.create_task(until_key_lost(call.request))

        def end_stream(_: asyncio.Task[None]) -> None:
            wake.set()
            client.give_up()

        key_lost.add_done_callback(end_stream)
        loop = asyncio.get_running_loop()
        try:
            for log in snapshot:
                await client.send(_sse("call.snapshot", _snapshot(log)))
            # Counted from the last write, not the last wake-up: a stream may be woken with nothing for it to send.
            quiet_until = loop.time() + KEEPALIVE_SECONDS
            while not live.closing and not key_lost.done():
                wake.clear()
                events = await reader.take()
                for event in events:
                    await client.send(_sse(event.type, event.data, event_id=event.id))
                    if call_log_id is not None and event.type == "call.ended":
                        return response
                if events:
                    quiet_until = loop.time() + KEEPALIVE_SECONDS
                if len(events) == READ_LIMIT:
                    continue
                try:
                    async with asyncio.timeout_at(quiet_until):
                        await wake.wait()
                except TimeoutError:
                    if call_log_id is not None and not await _runs(call, in_progress):
                        return response  # the call is over and nothing came for a while: nothing more will
                    await client.send(b": keepalive\n\n")
                    quiet_until = loop.time() + KEEPALIVE_SECONDS
        except ConnectionResetError:  # the client went away, or was cut off
            pass
        finally:
            key_lost.cancel()
    return response


class _Client:
    """The client's end of a stream: a write it takes nothing of for STALLED_SECONDS, or one still waiting on it once
    its key is lost, cuts its connection (ConnectionResetError): nothing else ends a stream whose client stopped
    reading, which would hold its lease, and keep its organization's calls recorded, as long as its socket stays
    open."""

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        """Write `response` to the client of `request`."""
        self._request = request
        self._response = response
        self._waiting: asyncio.Timeout | None = None

    async def send(self, data: bytes) -> None:
        """Write `data`, waiting for the client to take what came before if it must (not without bound)."""
        try:
            async with asyncio.timeout(STALLED_SECONDS) as waiting:
                self._waiting = waiting
                await self._response.write(data)
        except TimeoutError:
            transport = self._request.transport
            if transport is not None:
                transport.abort()  # its unread bytes are dropped: it resumes with Last-Event-ID
            raise ConnectionResetError("the client read nothing of its event stream; cut off") from None
        finally:
            self._waiting = None

    def give_up(self) -> None:
        """A write waiting on the client ends now, cutting it off (its key is no longer allowed)."""
        if self._waiting is not None:
            self._waiting.reschedule(asyncio.get_running_loop().time())


async def _runs(call: ApiCall, in_progress: Callable[[Queryable], Awaitable[list[CallLog]]]) -> bool:
    async with call.tenant() as db:
        return bool(await in_progress(db))


def _snapshot(log: CallLog) -> dict[str, Any]:
    return {
        "callLogId": log.id,
        "status": log.status.value,
        **call_description(log),
        "startedAt": log.timestamp.isoformat(),
        "engineNode": log.metadata.get("engineNode"),
        "at": utc_now().isoformat(timespec="milliseconds"),
    }


def _sse(event_type: str, data: dict[str, Any], *, event_id: int | None = None) -> bytes:
    lines = [f"id: {event_id}"] if event_id is not None else []
    lines += [f"event: {event_type}", f"data: {json.dumps(data, separators=(',', ':'), default=str)}"]
    return ("\n".join(lines) + "\n\n").encode()
