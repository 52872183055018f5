"""A fake ElevenLabs text-to-speech service: the multi-stream-input WebSocket and the HTTP streaming endpoint, on
loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import zlib
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, NamedTuple

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from media.g711 import BYTES_PER_MS, SAMPLE_RATE, pcm16_to_ulaw
from tests.fakes.server import serve

DEFAULT_INACTIVITY_TIMEOUT_S = 20.0
"""ElevenLabs' inactivity timeout when the query names none."""
MAX_CONTEXTS = 5
"""Contexts ElevenLabs lets a socket have open at once; one more and it closes the socket."""

_INVALID_KEY = {"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}


class Spoken(NamedTuple):
    """A text the fake synthesized, and over which transport."""

    transport: Literal["ws", "http"]
    text: str


@dataclass
class FakeSocket:
    """One multi-stream-input connection, as the fake saw it."""

    voice_id: str
    query: dict[str, str]
    init: dict[str, Any] | None = None
    """The first message (`{"text": " ", "context_id": ..., ...}`)."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    """Every message, in order."""
    contexts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """The messages naming each context, in order, by context id (contexts in the order they were opened)."""
    closed_contexts: list[str] = field(default_factory=list)
    """The contexts the client closed (`close_context`), in order."""
    finished_contexts: list[str] = field(default_factory=list)
    """The contexts whose isFinal the fake sent, in order."""
    audio_sent: dict[str, int] = field(default_factory=dict)
    """μ-law bytes sent per context."""
    audio_bytes_sent: int = 0
    errors: list[str] = field(default_factory=list)
    """The `error` of each error message the fake sent (`max_active_conversations`, `input_timeout_exceeded`, …)."""
    open: bool = True
    close_code: int | None = None


@dataclass(frozen=True)
class _Failure:
    after_chunks: int
    error: str
    message: str
    code: int
    tagged: bool


class FakeElevenLabs:
    """ElevenLabs on 127.0.0.1: `async with FakeElevenLabs(api_key="el-test") as fake:`, then talk to `fake.url`.

    Speech is a μ-law sine tone whose pitch depends on the text (so one text's audio is told from another's),
    lasting `ms_per_char` per character, sent in `chunk_ms` chunks faster than real time with each chunk's
    alignment relative to the chunk, as the real service does. On a socket, flushed texts are spoken one at a
    time in the order they were flushed, whichever their contexts.
    """

    def __init__(
        self,
        *,
        api_key: str = "el-test",
        first_byte_delay_ms: int = 0,
        chunk_ms: int = 100,
        ms_per_char: int = 60,
        chunk_interval_ms: int = 0,
        max_inactivity_s: float | None = None,
    ) -> None:
        """Create the fake; `chunk_interval_ms` paces chunks; `max_inactivity_s` caps the inactivity_timeout."""
        self.api_key = api_key
        self.first_byte_delay_ms = first_byte_delay_ms
        self.chunk_ms = chunk_ms
        self.ms_per_char = ms_per_char
        self.chunk_interval_ms = chunk_interval_ms
        self.max_inactivity_s = max_inactivity_s
        self.refuse_websocket = False
        """WebSocket handshakes fail with HTTP 503."""
        self.fail_http = False
        """The HTTP streaming endpoint answers HTTP 500."""
        self.texts: list[Spoken] = []
        """Every text synthesized, in order."""
        self.sockets: list[FakeSocket] = []
        """Every accepted multi-stream-input connection, in order."""
        self.refused_handshakes = 0
        self.http_requests: list[dict[str, Any]] = []
        """Each HTTP streaming request: `voice_id`, `query` and JSON `body`."""
        self.url = ""
        """The base URL (`http://127.0.0.1:<port>`), set on entering."""
        self._failures: list[_Failure] = []
        self._server_sockets: set[web.WebSocketResponse] = set()
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> FakeElevenLabs:
        """Start serving."""
        app = web.Application()
        app.router.add_get("/v1/text-to-speech/{voice_id}/multi-stream-input", self._multi_stream_input)
        app.router.add_post("/v1/text-to-speech/{voice_id}/stream", self._stream_http)
        self.url = await self._stack.enter_async_context(serve(app))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Close the sockets still open (1001) and stop serving."""
        for ws in list(self._server_sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY)
        await self._stack.aclose()

    @property
    def ws_connections(self) -> int:
        """Multi-stream-input connections accepted so far."""
        return len(self.sockets)

    @property
    def open_sockets(self) -> int:
        """Multi-stream-input connections open now."""
        return sum(socket.open for socket in self.sockets)

    @property
    def queries(self) -> list[dict[str, str]]:
        """The query parameters of each accepted multi-stream-input connection."""
        return [socket.query for socket in self.sockets]

    def fail_next_ws_stream(
        self,
        *,
        after_chunks: int = 0,
        error: str = "internal_error",
        message: str = "An internal error occurred.",
        code: int = WSCloseCode.INTERNAL_ERROR,
        tagged: bool = False,
    ) -> None:
        """Make the next context synthesized send `after_chunks` audio chunks, then an error message, then close.

        The error names the context (`contextId`) when `tagged`, and none otherwise.
        """
        self._failures.append(_Failure(after_chunks, error, message, code, tagged))

    def duration_ms(self, text: str) -> int:
        """How long the fake's speech of `text` lasts."""
        return self.ms_per_char * len(text)

    def audio_for(self, text: str) -> bytes:
        """The μ-law audio the fake speaks for `text`: a tone between 300 and 800 Hz at about -12 dBFS."""
        frequency = 300 + zlib.crc32(text.encode()) % 500
        samples = np.arange(self.duration_ms(text) * SAMPLE_RATE // 1000)
        tone = 8000 * np.sin(2 * np.pi * frequency * samples / SAMPLE_RATE)
        return pcm16_to_ulaw(tone.astype(np.int16))

    def chunks_for(self, text: str) -> list[tuple[bytes, dict[str, Any]]]:
        """The audio of `text` in `chunk_ms` chunks, each with its alignment (times relative to the chunk)."""
        audio = self.audio_for(text)
        step = self.chunk_ms * BYTES_PER_MS
        chunks = []
        for start in range(0, len(audio), step):
            chunk_start_ms, chunk_end_ms = start // BYTES_PER_MS, (start + step) // BYTES_PER_MS
            spoken = [i for i in range(len(text)) if chunk_start_ms <= i * self.ms_per_char < chunk_end_ms]
            alignment = {
                "chars": [text[i] for i in spoken],
                "charStartTimesMs": [i * self.ms_per_char - chunk_start_ms for i in spoken],
                "charDurationsMs": [self.ms_per_char for _ in spoken],
            }
            chunks.append((audio[start : start + step], alignment))
        return chunks

    # The multi-stream-input WebSocket

    async def _multi_stream_input(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_websocket:
            self.refused_handshakes += 1
            return web.json_response({"detail": {"status": "unavailable", "message": "refused"}}, status=503)
        if request.headers.get("xi-api-key") != self.api_key:
            self.refused_handshakes += 1
            return web.json_response(_INVALID_KEY, status=401)
        socket = FakeSocket(voice_id=request.match_info["voice_id"], query=dict(request.query))
        self.sockets.append(socket)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._server_sockets.add(ws)
        try:
            await _MultiStreamSession(self, ws, socket).run()
        finally:
            await ws.close()
            self._server_sockets.discard(ws)
            socket.open = False
            socket.close_code = ws.close_code
        return ws

    def _take_failure(self) -> _Failure | None:
        return self._failures.pop(0) if self._failures else None

    # The HTTP streaming endpoint

    async def _stream_http(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("xi-api-key") != self.api_key:
            return web.json_response(_INVALID_KEY, status=401)
        if self.fail_http:
            return web.json_response({"detail": {"status": "internal_error", "message": "fake failure"}}, status=500)
        body = await request.json()
        self.http_requests.append(
            {"voice_id": request.match_info["voice_id"], "query": dict(request.query), "body": body}
        )
        text = str(body["text"]).strip()
        self.texts.append(Spoken("http", text))
        response = web.StreamResponse(headers={"Content-Type": "audio/basic"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await asyncio.sleep(self.first_byte_delay_ms / 1000)
        try:
            for audio, _ in self.chunks_for(text):
                await response.write(audio)
                await asyncio.sleep(self.chunk_interval_ms / 1000)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away mid-sentence
        return response


@dataclass
class _Context:
    """A context open on a fake socket: from its first message until its isFinal."""

    buffer: str = ""
    """Text received and not flushed yet."""
    pending: int = 0
    """Flushed texts not spoken yet."""
    closing: bool = False
    """The client closed it: its isFinal follows its last pending text."""


class _MultiStreamSession:
    """One multi-stream-input connection: the client's messages are read here, flushed texts are spoken in order."""

    def __init__(self, fake: FakeElevenLabs, ws: web.WebSocketResponse, socket: FakeSocket) -> None:
        self.fake = fake
        self.ws = ws
        self.socket = socket
        inactivity = float(socket.query.get("inactivity_timeout", DEFAULT_INACTIVITY_TIMEOUT_S))
        if fake.max_inactivity_s is not None:
            inactivity = min(inactivity, fake.max_inactivity_s)
        self.inactivity = inactivity
        self.auto_mode = socket.query.get("auto_mode") == "true"
        self.contexts: dict[str, _Context] = {}
        self.speaking: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()  # None: close the socket
        self.speaker_closing = False
        self.socket_closing = False  # close_socket received
        self.loop = asyncio.get_running_loop()
        self.idle_since = self.loop.time()

    async def run(self) -> None:
        """Serve the connection until it closes."""
        speaker = asyncio.create_task(self._speak_queue())
        try:
            await self._read()
            if self.speaker_closing:
                await speaker  # let it finish the closing handshake it started
        finally:
            if not speaker.done():
                speaker.cancel()
                await asyncio.wait({speaker})

    async def _read(self) -> None:
        """Read client messages until the socket closes, the client breaks a rule, or it stays idle too long."""
        while True:
            left = None if self.contexts else self.idle_since + self.inactivity - self.loop.time()
            if left is not None and left <= 0:
                await self._fail(
                    "input_timeout_exceeded",
                    f"Have not received a new text input within the timeout of {self.inactivity:g} seconds.",
                    WSCloseCode.POLICY_VIOLATION,
                )
                return
            try:
                # While contexts are open the socket is not idle; look again every so often all the same.
                msg = await self.ws.receive(timeout=self.inactivity if left is None else left)
            except TimeoutError:
                continue
            if msg.type is not WSMsgType.TEXT:
                return
            self.idle_since = self.loop.time()
            message = json.loads(msg.data)
            self.socket.messages.append(message)
            if self.socket.init is None:
                if message.get("text") != " ":
                    await self._fail("invalid_request", "The first message must be a single space.", 1008)
                    return
                self.socket.init = message
            if self.socket_closing:
                continue
            if message.get("close_socket"):
                await self._close_socket()
            elif not isinstance(context_id := message.get("context_id"), str):
                await self._fail("invalid_request", "The fake needs a context_id in every message.", 1008)
                return
            elif not await self._on_context_message(context_id, message):
                return

    async def _on_context_message(self, context_id: str, message: dict[str, Any]) -> bool:
        """Handle a message naming a context; False when it broke the connection."""
        self.socket.contexts.setdefault(context_id, []).append(message)
        context = self.contexts.get(context_id)
        if context is None:
            if message.get("close_context"):
                self.socket.closed_contexts.append(context_id)
                return True  # already finished (or never opened): nothing to close
            if len(self.contexts) >= MAX_CONTEXTS:
                await self._fail(
                    "max_active_conversations",
                    f"Maximum of {MAX_CONTEXTS} concurrent contexts per connection exceeded.",
                    WSCloseCode.POLICY_VIOLATION,
                )
                return False
            context = self.contexts[context_id] = _Context()
        context.buffer += message.get("text") or ""
        if (message.get("flush") or self.auto_mode) and context.buffer.strip():
            self.speaking.put_nowait((context_id, context.buffer.strip()))
            context.pending += 1
            context.buffer = ""
        if message.get("close_context"):
            # A flushed context goes on flushing; text never flushed is dropped.
            self.socket.closed_contexts.append(context_id)
            context.closing = True
            if not context.pending:
                await self._finish(context_id)
        return True

    async def _close_socket(self) -> None:
        """close_socket: every context closes once its flushed texts are spoken, then the socket closes (1000)."""
        self.socket_closing = True
        for context_id, context in list(self.contexts.items()):
            context.closing = True
            if not context.pending:
                await self._finish(context_id)
        self.speaking.put_nowait(None)

    async def _speak_queue(self) -> None:
        """Speak flushed texts one at a time; after a context's last one, its isFinal if it was closed."""
        try:
            while (item := await self.speaking.get()) is not None:
                context_id, text = item
                failure = await self._speak(context_id, text)
                if failure is not None:
                    self.speaker_closing = True
                    await self._fail(
                        failure.error, failure.message, failure.code, context_id if failure.tagged else None
                    )
                    return
                context = self.contexts[context_id]
                context.pending -= 1
                if context.closing and not context.pending:
                    await self._finish(context_id)
            self.speaker_closing = True
            await self.ws.close(code=WSCloseCode.OK)
        except ConnectionError:
            return  # the client went away

    async def _speak(self, context_id: str, text: str) -> _Failure | None:
        """Send the audio of `text`; return the failure to report instead of finishing it, if one was asked for."""
        fake = self.fake
        fake.texts.append(Spoken("ws", text))
        failure = fake._take_failure()
        await asyncio.sleep(fake.first_byte_delay_ms / 1000)
        for index, (audio, alignment) in enumerate(fake.chunks_for(text)):
            if failure is not None and index == failure.after_chunks:
                break
            message = {
                "audio": base64.b64encode(audio).decode(),
                "normalizedAlignment": alignment,
                "alignment": alignment,
                "contextId": context_id,
            }
            await self.ws.send_json(message)
            self.socket.audio_bytes_sent += len(audio)
            self.socket.audio_sent[context_id] = self.socket.audio_sent.get(context_id, 0) + len(audio)
            await asyncio.sleep(fake.chunk_interval_ms / 1000)
        return failure

    async def _finish(self, context_id: str) -> None:
        del self.contexts[context_id]
        self.socket.finished_contexts.append(context_id)
        self.idle_since = self.loop.time()
        with suppress(ConnectionError):  # the client went away
            await self.ws.send_json({"isFinal": True, "contextId": context_id})

    async def _fail(self, error: str, message: str, code: int, context_id: str | None = None) -> None:
        """Send ElevenLabs' error message, then close with `code`."""
        self.socket.errors.append(error)
        payload: dict[str, Any] = {"message": message, "error": error, "code": code}
        if context_id is not None:
            payload["contextId"] = context_id
        try:
            await self.ws.send_json(payload)
        except ConnectionError:
            return
        await self.ws.close(code=code)
