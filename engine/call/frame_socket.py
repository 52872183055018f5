"""Twilio's text frames handed to the call as aiohttp parses them: no queue, no future, no task switch per frame.

An aiohttp `WebSocketResponse` puts every parsed message in a queue and wakes the task awaiting `receive()`:
about 5 of the 15-18 µs aiohttp spends on each message, and a call's media stream is fifty messages a second.
`FrameSocket` gives aiohttp's parser a queue whose `feed_data` gathers text frames once a callback is set, and
hands the callback all the text frames of one read of the socket at once, in order, as the parser finishes with
that read (a call reads its frames a few at a time: engine/call/caller_reads.py). Everything else (close, ping,
binary, and text that arrives while older frames still wait in the queue, so the order holds) is queued for
`receive()` as before, after the text gathered ahead of it.

A burst cannot hold the event loop: after `FRAMES_PER_TURN` frames in one turn of the loop, frames are queued
instead, where aiohttp's flow control pauses the socket, and `TextFrames` lets other calls run every
`FRAMES_PER_TURN` frames it reads.

This leans on aiohttp internals: `_post_start` (copied) and the reader's `WebSocketDataQueue` (subclassed). It
does so only where their source is the one it was written against (`CHECKED_SOURCES`); on any other aiohttp,
`FrameSocket` is an ordinary WebSocketResponse, frames go through `receive()`, and the engine logs once that it runs
the slower way.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import pkgutil
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import WebSocketError, WSCloseCode, WSMessage, WSMsgType, web

from engine.call.per_loop import PerLoop
from media.twilio_stream import MalformedMessage, MessageTooLarge, StreamProtocolError

log = logging.getLogger(__name__)

CHECKED_SOURCES: Mapping[str, str] = {
    "aiohttp.web:WebSocketResponse._post_start": "5537cb3f2ecae6ed9f4d27d6d9255adb414e81efcc4d23ede6bacd762d56ed93",
    "aiohttp._websocket.reader_py:WebSocketDataQueue": (
        "526af2531df720eec94960f1eb50889a2f3830966b5b606f73d8f9c875e91a8f"
    ),
}
"""SHA-256 of the source of what this module copies or subclasses, in the aiohttp (3.14.5) it was checked against.

The Cython `WebSocketDataQueue` in use is compiled from the pure-Python one's source, so that source stands for both.
"""


def installed_sources() -> dict[str, str | None]:
    """SHA-256 of the same sources in the installed aiohttp (None where one is missing or has no source)."""
    return {name: _source_hash(name) for name in CHECKED_SOURCES}


def _source_hash(name: str) -> str | None:
    try:
        source = inspect.getsource(pkgutil.resolve_name(name))
    except (ImportError, AttributeError, OSError, TypeError, ValueError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()


try:  # aiohttp's own names for its parser and queue (private; absent or moved on other versions)
    from aiohttp._websocket.reader import WebSocketDataQueue
    from aiohttp.helpers import DEFAULT_CHUNK_SIZE
    from aiohttp.http_websocket import WebSocketReader
except ImportError:  # pragma: no cover - depends on the installed aiohttp
    DIRECT = False
else:
    DIRECT = installed_sources() == CHECKED_SOURCES
"""Whether text frames can be handed over as they are parsed on the installed aiohttp."""

TextHandler = Callable[[list[str]], None]
"""Takes the text frames of one read of the socket, in order (at least one)."""

FRAMES_PER_TURN = 64
"""Frames one socket handles before the event loop runs everything else that is ready: about 1 ms of work at
~20 µs a frame, so a client bursting frames delays other calls by that much, while Twilio's 50 frames a second
(one or two per turn) never reach it."""


class FrameHandlerFailed(Exception):
    """The callback raised while handling a frame; raised by `receive()`'s reader in its place (see __cause__)."""


class _LoopTurns:
    """Numbers the event loop's turns in which frames are handed over: one callback a turn, for every socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._turn = 0
        self._advancing = False

    def current(self) -> int:
        """The number of the loop's present turn."""
        if not self._advancing:
            self._advancing = True
            self._loop.call_soon(self._advance)
        return self._turn

    def _advance(self) -> None:
        self._turn += 1
        self._advancing = False


_TURNS = PerLoop(_LoopTurns)


if DIRECT:

    class _HandingQueue(WebSocketDataQueue):
        """aiohttp's message queue, except that text is gathered for `on_text` when set and nothing waits before
        it; `hand_on` gives it what was gathered."""

        def __init__(self, protocol: Any, limit: int, *, loop: Any) -> None:
            super().__init__(protocol, limit, loop=loop)
            self.on_text: TextHandler | None = None
            self._gathered: list[str] = []
            self._turns = _TURNS.of(loop)
            self._turn = -1
            self._handed_this_turn = 0

        def feed_data(self, data: Any, size: int) -> None:
            turn = self._turns.current()
            if turn != self._turn:
                self._turn, self._handed_this_turn = turn, 0
            if (
                self.on_text is None
                or data.type is not WSMsgType.TEXT
                or self._buffer
                or self._handed_this_turn >= FRAMES_PER_TURN
            ):
                self.hand_on()  # the text gathered before it goes first
                super().feed_data(data, size)  # read by receive(), in order, and counted for flow control
                return
            self._handed_this_turn += 1
            self._gathered.append(data.data)

        def hand_on(self) -> None:
            """Give the text gathered so far to `on_text` (or, if it was unset meanwhile, to `receive()`)."""
            texts = self._gathered
            if not texts:
                return
            self._gathered = []
            on_text = self.on_text
            if on_text is None:
                for text in texts:
                    super().feed_data(WSMessage(WSMsgType.TEXT, text, None), len(text))
                return
            try:
                on_text(texts)
            except Exception as exc:  # never into aiohttp's data_received: the reader raises it instead
                self.on_text = None
                failure = FrameHandlerFailed(f"the frame handler raised {type(exc).__name__}: {exc}")
                failure.__cause__ = exc
                super().feed_data(WSMessage(WSMsgType.ERROR, failure, None), 0)

    class _HandingParser:
        """aiohttp's WebSocket parser, followed by the handing queue's `hand_on` once it has parsed each read."""

        def __init__(self, parser: WebSocketReader, queue: _HandingQueue) -> None:
            self._parser = parser
            self._queue = queue

        def feed_data(self, data: bytes) -> Any:
            try:
                return self._parser.feed_data(data)
            finally:
                self._queue.hand_on()

        def feed_eof(self) -> None:
            self._queue.hand_on()
            self._parser.feed_eof()


class FrameSocket(web.WebSocketResponse):
    """A server WebSocket whose text frames can be handed to a callback as they are parsed (`hand_to`)."""

    _handing: Any = None

    if DIRECT:  # elsewhere aiohttp's own _post_start runs, whatever its signature

        def _post_start(self, request: Any, protocol: str | None, writer: Any) -> None:
            # aiohttp 3.14's _post_start, with the handing queue in place of WebSocketDataQueue.
            self._ws_protocol = protocol
            self._writer = writer
            self._reset_heartbeat()
            loop = self._loop
            assert loop is not None
            self._reader = self._handing = _HandingQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=loop)
            self._parser = WebSocketReader(
                self._reader, self._max_msg_size, compress=bool(self._compress), decode_text=self._decode_text
            )
            callback = None if self._heartbeat is None else self._on_data_received
            request.protocol.set_parser(_HandingParser(self._parser, self._handing), data_received_cb=callback)
            request.protocol.keep_alive(False)

    def hand_to(self, on_text: TextHandler | None) -> bool:
        """Give text frames to `on_text` as they arrive, each read's at once, after any already queued; False where
        aiohttp cannot."""
        if self._handing is None:
            return False
        self._handing.on_text = on_text
        return True


class TextFrames:
    """The socket's text frames; a binary frame is a protocol error, a close or error ends the stream.

    An iterator over `receive()` rather than an async generator over the socket: two fewer layers of coroutine
    per frame. Once `hand_to` succeeds, text frames go to the callback instead and this iterator waits only for
    the end of the stream (or for a failure of the callback, raised here), and for the frames a burst queued.
    A frame aiohttp refuses (too large, not UTF-8, not WebSocket) is a protocol error, raised here like ours.
    """

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._receive = ws.receive
        self._read = 0

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        self._read += 1
        if self._read % FRAMES_PER_TURN == 0:
            await asyncio.sleep(0)  # receive() returns queued frames without suspending
        message = await self._receive()
        if message.type is WSMsgType.TEXT:
            return message.data  # type: ignore[no-any-return]
        if message.type is WSMsgType.BINARY:
            raise MalformedMessage("Twilio sends text frames only; got a binary frame")
        if message.type is WSMsgType.ERROR and isinstance(message.data, FrameHandlerFailed):
            raise message.data
        if message.type is WSMsgType.ERROR and isinstance(message.data, WebSocketError):
            raise _protocol_error(message.data)
        raise StopAsyncIteration

    def hand_to(self, on_text: TextHandler | None) -> bool:
        """See `FrameSocket.hand_to`; False for a plain WebSocketResponse."""
        return isinstance(self._ws, FrameSocket) and self._ws.hand_to(on_text)


def _protocol_error(error: WebSocketError) -> StreamProtocolError:
    """The stream protocol's error for a frame aiohttp's WebSocket reader refused."""
    if error.code == WSCloseCode.MESSAGE_TOO_BIG:
        return MessageTooLarge(f"frame refused by the WebSocket reader: {error}")
    return MalformedMessage(f"frame refused by the WebSocket reader: {error}")


def log_if_not_direct() -> None:
    """Say once, at start-up, when the installed aiohttp makes every frame go through `receive()`."""
    if not DIRECT:
        changed = [name for name, digest in installed_sources().items() if digest != CHECKED_SOURCES[name]]
        log.warning(
            "aiohttp %s: %s differ from what engine/call/frame_socket.py was checked against: media frames go through "
            "receive(), about 5 µs more per frame",
            aiohttp.__version__,
            ", ".join(changed),
        )
