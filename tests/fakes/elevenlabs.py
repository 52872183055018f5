"""A fake ElevenLabs text-to-speech service: the stream-input WebSocket and the HTTP streaming endpoint, on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import zlib
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, NamedTuple

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from media.g711 import pcm16_to_ulaw
from tests.fakes.server import serve

SAMPLE_RATE = 8000
BYTES_PER_MS = 8
DEFAULT_INACTIVITY_TIMEOUT_S = 20.0
"""ElevenLabs' inactivity timeout when the query names none."""

_INVALID_KEY = {"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}


class Spoken(NamedTuple):
    """A text the fake synthesized, and over which transport."""

    transport: Literal["ws", "http"]
    text: str


@dataclass
class FakeSocket:
    """One stream-input connection, as the fake saw it."""

    voice_id: str
    query: dict[str, str]
    init: dict[str, Any] | None = None
    """The first message (`{"text": " ", ...}`)."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    """Every message after the first, in order."""
    audio_bytes_sent: int = 0
    open: bool = True
    close_code: int | None = None


@dataclass(frozen=True)
class _Failure:
    after_chunks: int
    error: str
    message: str
    code: int


class FakeElevenLabs:
    """ElevenLabs on 127.0.0.1: `async with FakeElevenLabs(api_key="el-test") as fake:`, then talk to `fake.url`.

    Speech is a μ-law sine tone whose pitch depends on the text (so one text's audio is told from another's),
    lasting `ms_per_char` per character, sent in `chunk_ms` chunks faster than real time with each chunk's
    alignment relative to the chunk, as the real service does.
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
        """Every accepted stream-input connection, in order."""
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
        app.router.add_get("/v1/text-to-speech/{voice_id}/stream-input", self._stream_input)
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
        """Stream-input connections accepted so far."""
        return len(self.sockets)

    @property
    def open_sockets(self) -> int:
        """Stream-input connections open now."""
        return sum(socket.open for socket in self.sockets)

    @property
    def queries(self) -> list[dict[str, str]]:
        """The query parameters of each accepted stream-input connection."""
        return [socket.query for socket in self.sockets]

    def fail_next_ws_stream(
        self,
        *,
        after_chunks: int = 0,
        error: str = "internal_error",
        message: str = "An internal error occurred.",
        code: int = WSCloseCode.INTERNAL_ERROR,
    ) -> None:
        """Make the next WebSocket synthesis send `after_chunks` audio chunks, then an error message, then close."""
        self._failures.append(_Failure(after_chunks, error, message, code))

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

    # The stream-input WebSocket

    async def _stream_input(self, request: web.Request) -> web.StreamResponse:
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
        speaking: asyncio.Queue[str | None] = asyncio.Queue()
        speaker_closing = asyncio.Event()
        speaker = asyncio.create_task(self._speak_queue(ws, socket, speaking, speaker_closing))
        try:
            await self._read(ws, socket, speaking)
            if speaker_closing.is_set():
                await speaker  # let it finish the closing handshake it started (after isFinal or an error)
        finally:
            if not speaker.done():
                speaker.cancel()
                await asyncio.wait({speaker})
            await ws.close()
            self._server_sockets.discard(ws)
            socket.open = False
            socket.close_code = ws.close_code
        return ws

    async def _read(self, ws: web.WebSocketResponse, socket: FakeSocket, speaking: asyncio.Queue[str | None]) -> None:
        """Read client messages, queueing texts to speak, until the socket closes or stays idle too long."""
        inactivity = float(socket.query.get("inactivity_timeout", DEFAULT_INACTIVITY_TIMEOUT_S))
        if self.max_inactivity_s is not None:
            inactivity = min(inactivity, self.max_inactivity_s)
        auto_mode = socket.query.get("auto_mode") == "true"
        buffer = ""
        while True:
            try:
                msg = await ws.receive(timeout=inactivity)
            except TimeoutError:
                await _fail(
                    ws,
                    "input_timeout_exceeded",
                    f"Have not received a new text input within the timeout of {inactivity:g} seconds.",
                    WSCloseCode.POLICY_VIOLATION,
                )
                return
            if msg.type is not WSMsgType.TEXT:
                return
            message = json.loads(msg.data)
            text = message.get("text")
            if socket.init is None:
                if text != " ":
                    await _fail(ws, "invalid_request", "The first message must be a single space.", 1008)
                    return
                socket.init = message
                continue
            socket.messages.append(message)
            if text == "":
                if buffer.strip():
                    speaking.put_nowait(buffer)
                speaking.put_nowait(None)
                buffer = ""
                continue
            buffer += text or ""
            if (message.get("flush") or auto_mode) and buffer.strip():
                speaking.put_nowait(buffer)
                buffer = ""

    async def _speak_queue(
        self,
        ws: web.WebSocketResponse,
        socket: FakeSocket,
        speaking: asyncio.Queue[str | None],
        closing: asyncio.Event,
    ) -> None:
        """Synthesize queued texts in order; at the end of input send isFinal and close 1000."""
        try:
            while (text := await speaking.get()) is not None:
                failure = await self._speak_ws(ws, socket, text.strip())
                if failure is not None:
                    await ws.send_json({"message": failure.message, "error": failure.error, "code": failure.code})
                    closing.set()
                    await ws.close(code=failure.code)
                    return
            await ws.send_json({"isFinal": True})
            closing.set()
            await ws.close(code=WSCloseCode.OK)
        except ConnectionError:
            return  # the client went away mid-sentence

    async def _speak_ws(self, ws: web.WebSocketResponse, socket: FakeSocket, text: str) -> _Failure | None:
        """Send the audio of `text`; return the failure to report instead of finishing it, if one was asked for."""
        self.texts.append(Spoken("ws", text))
        failure = self._failures.pop(0) if self._failures else None
        await asyncio.sleep(self.first_byte_delay_ms / 1000)
        for index, (audio, alignment) in enumerate(self.chunks_for(text)):
            if failure is not None and index == failure.after_chunks:
                break
            message = {
                "audio": base64.b64encode(audio).decode(),
                "isFinal": None,
                "normalizedAlignment": alignment,
                "alignment": alignment,
            }
            await ws.send_json(message)
            socket.audio_bytes_sent += len(audio)
            await asyncio.sleep(self.chunk_interval_ms / 1000)
        return failure

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


async def _fail(ws: web.WebSocketResponse, error: str, message: str, code: int) -> None:
    """Send ElevenLabs' error message, then close with `code`."""
    try:
        await ws.send_json({"message": message, "error": error, "code": code})
    except ConnectionError:
        return
    await ws.close(code=code)
