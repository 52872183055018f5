"""/v1/live-calls/{callLogId}/listen: a call's audio as it happens, over a WebSocket, from whichever node holds it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Final

from aiohttp import ChainMapProxy, web
from pydantic import Field

from engine.api.errors import ApiError, conflict
from engine.api.key_watch import until_key_lost
from engine.api.live_call_commands import live_call, other_holding_node
from engine.api.models import RequestModel
from engine.api.operations import ApiCall, Resource
from engine.call.audio_tap import CALL_ENDED, CHUNK_MS, ListenerQueue
from engine.call.control_channel import ControlChannelError
from engine.call.listen_relay import LISTEN_RELAY, ListenRefused
from engine.server.appkeys import LIVE_CALLS, SETTINGS
from media.g711 import SAMPLE_RATE
from media.stereo import Channels, Encoding, combine
from storage.call_logs import CallLog

LISTEN_SUBPROTOCOL = "dialtone.listen"
"""The subprotocol the server answers with (a browser also offers `dialtone.key.<base64url key>` to sign in)."""
KEY_LOST: Final = "key no longer allowed"
"""The stop reason of a listener whose key was revoked or expired, or whose user lost the right to listen."""
CLOSE_SECONDS = 2.0
"""How long the stop message and the close may wait on a listener's full socket before it is cut."""
_SOCKET_BUFFER_BYTES = 16 * 1024
"""Audio aiohttp, and the kernel, hold for a listener's socket before a send waits (the kernel's own buffer would
otherwise grow to megabytes: minutes of audio); beyond it, the listener's bounded queue takes the slack."""

resource = Resource(
    "Live call audio",
    "Listening in to a call in progress: its two sides as they happen, over a WebSocket.",
)


class ListenQuery(RequestModel):
    """How the listener wants the audio."""

    channels: Channels = Field(
        Channels.STEREO,
        description="stereo: the caller on the left, the agent (as the caller heard it) on the right, interleaved; "
        "mixed: both in one channel.",
    )
    encoding: Encoding = Field(Encoding.MULAW, description="mulaw: G.711 μ-law bytes; pcm16: 16-bit little-endian.")


@resource.websocket(
    "/live-calls/{callLogId}/listen",
    summary="Listen to a call in progress (WebSocket)",
    query=ListenQuery,
    errors=(400, 409),
    writers_only="listening to a call",
)
async def listen_to_live_call(call: ApiCall) -> web.WebSocketResponse:
    """Open as a WebSocket (the key as `Authorization: Bearer`, or from a browser as the subprotocol
    `dialtone.key.<base64url(key) without padding>` offered with `dialtone.listen`, which the server answers).

    The server sends a text message `{"event": "start", "callLogId", "sampleRate": 8000, "channels": 2|1,
    "encoding": "mulaw"|"pcm16"}`, then binary messages of 100 ms of audio each, aligned like the call's recording,
    then `{"event": "stop", "reason": "call ended" | "listener too slow" | "holding node lost" |
    "key no longer allowed"}` before it closes: the last once the key is revoked or expired, or its user may listen
    no more (checked every few seconds).
    A listener that falls more than DIALTONE_LISTEN_BUFFER_MS behind is dropped; the call never waits for it.
    Hearing a caller is more sensitive than reading a transcript: a VIEWER's key gets 403, as for say or hang-up.
    400 for a plain GET; 409 if the call is not in progress or the engine process holding it cannot be reached.
    """
    request = call.request
    query = call.query_as(ListenQuery)
    ws = web.WebSocketResponse(
        protocols=(LISTEN_SUBPROTOCOL,),
        timeout=CLOSE_SECONDS,
        compress=False,
        max_msg_size=4096,
        writer_limit=_SOCKET_BUFFER_BYTES,
    )
    log = await live_call(call)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "websocket_required", "open this path as a WebSocket (a GET with 'Upgrade: websocket')")
    app = call.app
    listener = ListenerQueue(max(1, app[SETTINGS].listen_buffer_ms // CHUNK_MS))
    leave = await _attach(app, log, listener)
    try:
        await ws.prepare(request)
        _bound_send_buffer(request)
        start = {"event": "start", "callLogId": log.id, "sampleRate": SAMPLE_RATE}
        await ws.send_json({**start, "channels": query.channels.per_frame, "encoding": query.encoding.value})
        reason = await _stream(ws, listener, query, until_key_lost(request, writer=True))
        if reason is not None:
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(ws.send_json({"event": "stop", "reason": reason}), CLOSE_SECONDS)
    finally:
        leave()
    with contextlib.suppress(ConnectionError, TimeoutError):
        await asyncio.wait_for(ws.close(), CLOSE_SECONDS)
    return ws


def _bound_send_buffer(request: web.Request) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)


async def _attach(app: ChainMapProxy, log: CallLog, listener: ListenerQueue) -> Callable[[], None]:
    """Have the call's audio reach `listener`, here or from the node holding it; returns how to stop it."""
    session = app[LIVE_CALLS].get(log.id)
    if session is not None:
        session.tap.add(listener)
        return lambda: session.tap.remove(listener)
    node = await other_holding_node(app, log)
    if node is None:
        raise conflict(f"call {log.id} is not yet held by any engine process; try again in a moment")
    relay = app[LISTEN_RELAY]
    try:
        await relay.listen(node, log.id, listener)
    except (ListenRefused, ControlChannelError) as exc:
        raise conflict(f"call {log.id}: {exc}") from None
    return lambda: relay.leave(log.id, listener)


async def _stream(
    ws: web.WebSocketResponse, listener: ListenerQueue, query: ListenQuery, key_lost: Coroutine[Any, Any, None]
) -> str | None:
    """Send the listener's chunks until its audio ends or `key_lost` returns; why it ended, or None if the listener
    left first."""
    sending = asyncio.create_task(_send_audio(ws, listener, query))
    reading = asyncio.create_task(_until_closed(ws))
    dropped = asyncio.create_task(listener.dropped.wait())
    unauthorized = asyncio.create_task(key_lost)
    done, pending = await asyncio.wait({sending, reading, dropped, unauthorized}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if unauthorized in done:
        listener.end(KEY_LOST)
        return KEY_LOST
    if dropped in done or (sending in done and sending.exception() is None):
        return listener.ended or CALL_ENDED
    listener.end("listener left")
    return None


async def _send_audio(ws: web.WebSocketResponse, listener: ListenerQueue, query: ListenQuery) -> None:
    while (chunk := await listener.next()) is not None:
        await ws.send_bytes(combine(chunk.caller, chunk.agent, query.channels, query.encoding))


async def _until_closed(ws: web.WebSocketResponse) -> None:
    async for _ in ws:
        pass  # a listener has nothing to say; its messages are read only to see it leave
