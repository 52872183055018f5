"""ElevenLabs streaming text-to-speech: one multi-stream-input WebSocket per call, a context per sentence, HTTP as
fallback."""

from __future__ import annotations

import asyncio
import binascii
import functools
import hashlib
import itertools
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx
from elevenlabs import VoiceSettings
from elevenlabs.client import AsyncElevenLabs
from elevenlabs.core.api_error import ApiError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.protocol import State
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

from config.agent import ElevenLabsTTSConfig
from media.g711 import BYTES_PER_MS
from pipelines.clients import CloseClient, ProviderClients
from pipelines.tts.base import Alignment, TTSError

log = logging.getLogger(__name__)

API_KEY_HEADER = "xi-api-key"


class _MaskApiKeyHeader(logging.Filter):
    """websockets logs each handshake header at DEBUG ("> %s: %s"): the API key's value is shown masked.

    The Deepgram SDK masks `Authorization` on the same logger, but ElevenLabs' key travels in its own header.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask the record's header value if it is the API key's; never drop a record."""
        if isinstance(record.args, tuple) and len(record.args) == 2 and record.args[0] == API_KEY_HEADER:
            record.args = (API_KEY_HEADER, "[REDACTED]")
        return True


logging.getLogger("websockets.client").addFilter(_MaskApiKeyHeader())

OUTPUT_FORMAT = "ulaw_8000"
"""What ElevenLabs sends: μ-law 8 kHz, Twilio's own format, so nothing is transcoded."""

INACTIVITY_TIMEOUT_S = 180
"""How long ElevenLabs keeps an idle context open (its maximum)."""

STANDBY_MAX_AGE_S = 150.0
"""A call's socket left unused this long is replaced before ElevenLabs' inactivity timeout closes it."""

WS_FAILURES_BEFORE_HTTP = 3
"""Consecutive WebSocket failures after which a synthesizer speaks only over HTTP."""

ZOMBIES_BEFORE_NEW_SOCKET = 4
"""Cut contexts still flushing on the call's socket at which the next sentence takes a fresh socket.

ElevenLabs allows five open contexts per socket and refuses a sixth by closing the socket; a context cut by a
barge-in stays open until its isFinal arrives.
"""

CONNECT_TIMEOUT_S = 5.0
"""Longest a WebSocket handshake may take."""

RECEIVE_TIMEOUT_S = 10.0
"""Longest ElevenLabs may stay silent in the middle of a sentence before it counts as failed."""

CLOSE_TIMEOUT_S = 2.0
"""Longest a socket waits for ElevenLabs' closing handshake before dropping the connection."""

HTTP_TIMEOUT = httpx.Timeout(20.0, connect=CONNECT_TIMEOUT_S)
"""Timeouts of the HTTP fallback: connecting, and each wait for the next bytes of the stream."""

_CLOSE_SOCKET = json.dumps({"close_socket": True})


class _StreamFailed(Exception):
    """A sentence's WebSocket stream failed; the message says how."""


class _SilenceWatch:
    """Drops a socket that ElevenLabs leaves silent for `limit` seconds while a sentence waits on it.

    Only waiting counts: the time the caller holds a chunk is not ElevenLabs' silence. One timer per `limit`
    seconds of waiting, however many messages arrive: an asyncio.timeout moved at each message would cancel and
    schedule a timer twice per message. Dropping the connection makes the pending read raise ConnectionClosed,
    with `expired` set; the sentence's socket is retired on any failure anyway.
    """

    def __init__(self, socket: ClientConnection, limit: float) -> None:
        self._socket = socket
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None  # waiting since then; None while not waiting
        self._timer: asyncio.TimerHandle | None = None
        self.expired = False

    def waiting(self) -> None:
        """The sentence now waits for ElevenLabs' next message."""
        self._since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self._limit, self._check)

    def heard(self) -> None:
        """A message came; the sentence is not waiting until `waiting` is called again."""
        self._since = None

    def stop(self) -> None:
        """The sentence is over: nothing more is timed."""
        self._since = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._since is None:
            return  # not waiting: the next wait arms a timer again
        due = self._since + self._limit
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self.expired = True
        self._socket.transport.abort()


@dataclass(eq=False, slots=True)
class _Connection:
    """The call's multi-stream-input socket (connected in the background) and the cut contexts still open on it."""

    opening: asyncio.Task[ClientConnection | Exception]
    zombies: set[str] = field(default_factory=set)
    """Contexts of sentences cut short whose isFinal was not read yet: ElevenLabs still counts them as open."""
    used: bool = False
    """A context was opened on the socket (its first message must open one: no goodbye on an unused socket)."""


class ElevenLabsTTS:
    """A call's ElevenLabs synthesizer (TextToSpeech): μ-law 8 kHz with character timings, one socket per call.

    The synthesizer keeps one multi-stream-input WebSocket, connected in the background, and speaks each sentence as
    a context of its own on it (opened, flushed and closed at once), so no sentence waits for a TCP or TLS
    handshake. A sentence cut short (barge-in) leaves its context flushing on the server; a sentence reads only the
    messages of its own context, so no audio of a cut sentence reaches a later one. When the WebSocket fails before
    a sentence's first audio, that sentence is spoken over the HTTP streaming endpoint instead (without timings) and
    a fresh socket is connected for the next one. Sentences are spoken one at a time.
    """

    def __init__(
        self,
        config: ElevenLabsTTSConfig,
        *,
        clients: ProviderClients,
        api_key: str,
        url: str,
        voice_id: str,
        standby_max_age_s: float = STANDBY_MAX_AGE_S,
    ) -> None:
        """Create a synthesizer for `voice_id` at the API base `url` (http(s):// or ws(s)://); connects lazily.

        The HTTP fallback goes through the engine's ElevenLabs client from `clients`.

        `standby_max_age_s` is how long the call's socket may stay unused before it is replaced.
        """
        self.config = config
        self.voice_id = voice_id
        self._clients = clients
        self._api_key = api_key
        self._http_url, ws_base = _endpoints(url)
        query = {
            "model_id": config.model,
            "output_format": OUTPUT_FORMAT,
            "sync_alignment": "true",
            "auto_mode": "true",  # we send whole sentences: no chunk schedule, no buffering
            "inactivity_timeout": str(INACTIVITY_TIMEOUT_S),
            # optimize_streaming_latency is deprecated on the WebSocket (auto_mode replaces it): HTTP only.
        }
        if config.language_code:
            query["language_code"] = config.language_code
        voice = quote(voice_id, safe="")
        self._ws_url = f"{ws_base}/v1/text-to-speech/{voice}/multi-stream-input?{urlencode(query)}"
        self._proxy = _environment_proxy(ws_base)
        settings = {
            "stability": config.stability,
            "similarity_boost": config.similarity_boost,
            "speed": config.speed,
        }
        self._voice_settings = {name: value for name, value in settings.items() if value is not None}
        account = hashlib.sha256(api_key.encode()).hexdigest()[:16]  # accounts never share audio
        self._voice_key = f"elevenlabs {account} {self._ws_url} {json.dumps(self._voice_settings, sort_keys=True)}"
        self._standby_max_age_s = standby_max_age_s
        self._connection: _Connection | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._context_numbers = itertools.count(1)
        self._speaking = False
        self._connecting: set[asyncio.Task[ClientConnection | Exception]] = set()
        self._sockets: set[ClientConnection] = set()
        self._background: set[asyncio.Task[None]] = set()  # sockets closing, messages of cut sentences
        self._ws_failures = 0
        self._closed = False

    @property
    def voice_key(self) -> str:
        """The account (its key's hash), voice, model, format, language and voice settings (`VoiceIdentity`)."""
        return self._voice_key

    async def prewarm(self) -> None:
        """Connect the call's socket now (for its first sentence) and wait until it is open; never raises."""
        connection = self._ensure_connection()
        if connection is not None:
            await asyncio.wait({connection.opening})

    async def synthesize(self, text: str) -> AsyncIterator[bytes | Alignment]:
        """Speak one sentence as μ-law 8 kHz chunks, each after the `Alignment` of its characters (over WebSocket).

        Raise TTSError when neither the WebSocket nor the HTTP fallback can speak it, or when the stream breaks
        after some of its audio was yielded (the caller decides what to do with a half-spoken sentence).
        """
        if self._closed:
            raise TTSError("elevenlabs: the synthesizer is closed", provider="elevenlabs")
        sentence = text.strip()
        if not sentence:
            return
        failure: str | None = None
        if self._ws_failures < WS_FAILURES_BEFORE_HTTP:
            try:
                async with aclosing(self._speak_ws(sentence)) as items:
                    async for item in items:
                        yield item
                return
            except _StreamFailed as exc:
                failure = str(exc)
        if failure is not None:
            log.warning("elevenlabs: WebSocket unavailable (%s); speaking the sentence over HTTP", failure)
        async with aclosing(self._speak_http(sentence, failure or "off after repeated failures")) as chunks:
            async for audio in chunks:
                yield audio

    async def close(self) -> None:
        """Close the call's socket (telling ElevenLabs first) and any socket still closing, and wait; idempotent."""
        self._closed = True
        self._stop_idle_timer()
        connection, self._connection = self._connection, None
        for task in list(self._connecting):
            task.cancel()
        socket = _opened(connection) if connection is not None and connection.used else None
        if socket is not None and socket.state is State.OPEN:
            with suppress(ConnectionClosed):
                await socket.send(_CLOSE_SOCKET)
        for socket in list(self._sockets):
            self._release(socket)
        # A socket cancelled mid-handshake starts closing only when its task ends: wait until all is quiet.
        while pending := {*self._connecting, *self._background}:
            await asyncio.wait(pending)

    # The WebSocket

    async def _speak_ws(self, sentence: str) -> AsyncGenerator[bytes | Alignment, None]:
        """Speak `sentence` in a context of its own; raise _StreamFailed before any audio, TTSError after."""
        self._speaking = True
        self._stop_idle_timer()
        try:
            connection, socket, context = await self._open_context(sentence)
            zombies = connection.zombies
            yielded = 0
            finished = failed = False
            silence = _SilenceWatch(socket, RECEIVE_TIMEOUT_S)
            try:
                while not finished:
                    silence.waiting()
                    message = _decoded(await socket.recv())
                    tag = message.get("contextId")
                    if tag is None:
                        tag = message.get("context_id")
                    if tag != context:
                        # Audio of a sentence cut before this one may still be in flight: never ours.
                        _check_foreign(message, tag, zombies)
                        continue
                    encoded = message.get("audio")
                    if encoded:
                        try:
                            audio = binascii.a2b_base64(encoded)
                        except binascii.Error:
                            raise _StreamFailed("audio that is not base64") from None
                        timing = message.get("alignment") or message.get("normalizedAlignment")
                        alignment = _alignment(timing, yielded // BYTES_PER_MS)
                        silence.heard()  # the caller may hold the chunk a while: that is not ElevenLabs' silence
                        if alignment is not None:
                            yield alignment
                        yield audio
                        yielded += len(audio)
                    elif _is_error(message):
                        raise _StreamFailed(_describe_error(message))
                    finished = _is_final(message)
            except (_StreamFailed, ConnectionClosed) as exc:
                failed = True
                problem = f"no message for {RECEIVE_TIMEOUT_S:g} s" if silence.expired else _describe_break(exc)
                raise self._stream_broke(connection, problem, yielded) from None
            finally:
                silence.stop()
                if not finished and not failed:
                    # Cut short: ElevenLabs finishes the context anyway, and its isFinal will retire it.
                    zombies.add(context)
            self._ws_failures = 0
        finally:
            self._speaking = False
            self._start_idle_timer()

    async def _open_context(self, sentence: str) -> tuple[_Connection, ClientConnection, str]:
        """Open a context speaking `sentence` on the call's socket, waiting for the socket if it is connecting.

        A socket found closed (ElevenLabs closes idle ones) is replaced once before it counts as a failure. A socket
        with too many cut contexts still open is replaced before ElevenLabs would refuse a new one.
        """
        replaced = False
        while True:
            connection = self._ensure_connection()
            if connection is None:
                raise TTSError("elevenlabs: the synthesizer was closed", provider="elevenlabs")
            if len(connection.zombies) >= ZOMBIES_BEFORE_NEW_SOCKET:
                self._retire(connection)
                continue
            await asyncio.wait({connection.opening})
            if connection.opening.cancelled():
                raise TTSError("elevenlabs: the synthesizer was closed", provider="elevenlabs")
            socket = connection.opening.result()
            if isinstance(socket, Exception):
                self._retire(connection)
                raise self._ws_failed(_describe_connect_error(socket))
            if socket.state is State.OPEN:
                context = f"s{next(self._context_numbers)}"
                try:
                    await self._send_context(connection, socket, context, sentence)
                    return connection, socket, context
                except ConnectionClosed as exc:
                    problem = f"the socket closed before the text was sent ({_close_reason(exc)})"
            else:
                problem = "the socket was closed by the server"
            self._retire(connection)
            if replaced:
                raise self._ws_failed(problem)
            replaced = True

    async def _send_context(
        self, connection: _Connection, socket: ClientConnection, context: str, sentence: str
    ) -> None:
        """Open `context` with `sentence`, flushed, and close it: ElevenLabs speaks it now, then sends its isFinal."""
        init: dict[str, Any] = {"text": " ", "context_id": context}
        if self._voice_settings:
            init["voice_settings"] = self._voice_settings
        close = json.dumps({"context_id": context, "close_context": True})
        messages = (json.dumps(init), json.dumps({"text": sentence + " ", "context_id": context, "flush": True}), close)
        connection.used = True
        sent = 0
        try:
            for message in messages:
                await socket.send(message)
                sent += 1
        except asyncio.CancelledError:
            # websockets queues a frame before it waits to drain: the context is open on the server all the same.
            connection.zombies.add(context)
            if sent < len(messages) - 1:
                self._send_in_background(socket, close)
            raise

    def _ensure_connection(self) -> _Connection | None:
        """The call's connection, started in the background if there is none; None once closed or HTTP only."""
        if self._connection is None and not self._closed and self._ws_failures < WS_FAILURES_BEFORE_HTTP:
            task = asyncio.create_task(self._open_socket(), name=f"elevenlabs socket {self.voice_id}")
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
            self._connection = _Connection(task)
            self._start_idle_timer()
        return self._connection

    async def _open_socket(self) -> ClientConnection | Exception:
        """A connected multi-stream-input socket, or why there is none."""
        try:
            socket = await connect(
                self._ws_url,
                additional_headers={API_KEY_HEADER: self._api_key},
                open_timeout=CONNECT_TIMEOUT_S,
                close_timeout=CLOSE_TIMEOUT_S,
                compression=None,  # base64 audio barely compresses; deflate would cost CPU on every chunk
                proxy=self._proxy,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            return exc
        self._sockets.add(socket)
        return socket

    def _start_idle_timer(self) -> None:
        # ElevenLabs closes a socket left idle for its inactivity timeout: an unused one is replaced a little before.
        self._stop_idle_timer()
        if self._connection is not None and not self._speaking:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self._standby_max_age_s, self._renew_idle, self._connection)

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _renew_idle(self, connection: _Connection) -> None:
        self._idle_timer = None
        if self._connection is connection and not self._speaking:
            self._retire(connection)
            self._ensure_connection()

    def _retire(self, connection: _Connection) -> None:
        """Stop using `connection`: the next sentence gets a fresh socket, and this one closes in the background."""
        if self._connection is connection:
            self._connection = None
            self._stop_idle_timer()

        def discard(_: asyncio.Task[ClientConnection | Exception]) -> None:
            if (socket := _opened(connection)) is not None:
                self._release(socket)

        if connection.opening.done():
            discard(connection.opening)
        else:
            connection.opening.add_done_callback(discard)

    def _release(self, socket: ClientConnection) -> None:
        # Closed in the background: no sentence waits for a closing handshake.
        if socket not in self._sockets:
            return
        self._sockets.discard(socket)
        self._track(socket.close())

    def _send_in_background(self, socket: ClientConnection, message: str) -> None:
        async def send() -> None:
            with suppress(ConnectionClosed):
                await socket.send(message)

        self._track(send())

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _ws_failed(self, problem: str) -> _StreamFailed:
        """Count a WebSocket failure and connect a fresh socket for the next sentence (until HTTP takes over)."""
        self._ws_failures += 1
        if self._ws_failures == WS_FAILURES_BEFORE_HTTP:
            log.warning(
                "elevenlabs: the WebSocket failed %d times in a row; this synthesizer now speaks over HTTP",
                self._ws_failures,
            )
        self._ensure_connection()
        return _StreamFailed(problem)

    def _stream_broke(self, connection: _Connection, problem: str, yielded: int) -> Exception:
        """Drop the broken socket; what to raise: _StreamFailed before any audio (HTTP takes over), TTSError after."""
        self._retire(connection)
        if self._closed:
            return TTSError("elevenlabs: the synthesizer was closed mid-sentence", provider="elevenlabs")
        failed = self._ws_failed(problem)
        if yielded:
            return TTSError(
                f"elevenlabs: the stream broke after {yielded // BYTES_PER_MS} ms of audio ({problem})",
                provider="elevenlabs",
            )
        return failed

    # The HTTP fallback

    async def _speak_http(self, sentence: str, ws_failure: str) -> AsyncGenerator[bytes, None]:
        """Speak `sentence` through the HTTP streaming endpoint; raise TTSError naming both failures if it fails."""
        options: dict[str, Any] = {}
        if self._voice_settings:
            options["voice_settings"] = VoiceSettings(**self._voice_settings)
        stream = self._clients.elevenlabs(self._api_key, self._http_url).text_to_speech.stream(
            self.voice_id,
            text=sentence,
            model_id=self.config.model,
            output_format=OUTPUT_FORMAT,
            optimize_streaming_latency=self.config.optimize_streaming_latency,
            language_code=self.config.language_code,
            request_options={"max_retries": 0},
            **options,
        )
        async with aclosing(stream) as chunks:
            while True:
                try:
                    audio = await anext(chunks)
                except StopAsyncIteration:
                    return
                except ApiError as exc:
                    raise TTSError(_describe_http_refusal(exc, ws_failure), provider="elevenlabs") from None
                except httpx.HTTPError as exc:
                    raise TTSError(
                        f"elevenlabs: WebSocket failed ({ws_failure}) and HTTP streaming failed "
                        f"({type(exc).__name__}: {exc})",
                        provider="elevenlabs",
                    ) from None
                if audio:
                    yield audio


def new_http_client(api_key: str, url: str) -> tuple[AsyncElevenLabs, CloseClient]:
    """A new SDK client for this key and API base (http(s)://), and how to close it (`ProviderClients` keeps one)."""
    transport = httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=True)
    return AsyncElevenLabs(api_key=api_key, base_url=url, httpx_client=transport), transport.aclose


# The multi-stream-input wire protocol


def _opened(connection: _Connection) -> ClientConnection | None:
    """The connection's socket once its handshake succeeded."""
    opening = connection.opening
    if not opening.done() or opening.cancelled():
        return None
    socket = opening.result()
    return socket if isinstance(socket, ClientConnection) else None


def _decoded(raw: str | bytes) -> dict[str, Any]:
    """One server message as a JSON object."""
    try:
        message = json.loads(raw)
    except ValueError:
        raise _StreamFailed(f"not JSON: {raw[:80]!r}") from None
    if not isinstance(message, dict):
        raise _StreamFailed(f"not a JSON object: {str(raw)[:80]!r}")
    return message


def _check_foreign(message: dict[str, Any], tag: str | None, zombies: set[str]) -> None:
    """A message not of the sentence being read: an untagged error fails it; a cut context's isFinal retires it."""
    if tag is None:
        if _is_error(message):
            raise _StreamFailed(_describe_error(message))
    elif tag in zombies and _is_final(message):
        zombies.discard(tag)


def _is_final(message: dict[str, Any]) -> bool:
    # The server says isFinal; some clients look for is_final too, and a tolerant parser costs nothing.
    return bool(message.get("isFinal") or message.get("is_final"))


def _is_error(message: dict[str, Any]) -> bool:
    return "error" in message or "message" in message


def _describe_error(message: dict[str, Any]) -> str:
    error = message.get("error") or message.get("code") or "error"
    return f"{error}: {message.get('message', '')}".rstrip(": ")


def _describe_break(exc: Exception) -> str:
    if isinstance(exc, ConnectionClosed):
        return f"the socket closed before the end of the sentence ({_close_reason(exc)})"
    return str(exc)


def _alignment(timing: Any, offset_ms: int) -> Alignment | None:
    """A chunk's alignment with its times made relative to the start of the sentence's audio (`offset_ms` before).

    Vendor keys are camelCase; older docs and clients show snake_case. A malformed alignment is dropped, not fatal.
    """
    if not isinstance(timing, dict):
        return None
    chars = timing.get("chars")
    starts = timing.get("charStartTimesMs")
    if starts is None:
        starts = timing.get("char_start_times_ms")
    if not isinstance(chars, list) or not isinstance(starts, list) or not chars or len(chars) != len(starts):
        return None
    try:
        return Alignment(chars="".join(chars), start_ms=tuple([round(start) + offset_ms for start in starts]))
    except TypeError:
        return None


def _close_reason(exc: ConnectionClosed) -> str:
    close = exc.rcvd or exc.sent
    if close is None:
        return "connection lost"
    return f"code {close.code}" + (f": {close.reason}" if close.reason else "")


def _describe_connect_error(exc: Exception) -> str:
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status in (401, 403):
            return f"handshake refused with HTTP {status}: the API key was refused"
        return f"handshake refused with HTTP {status}"
    if isinstance(exc, ConnectionClosed):
        return f"the socket closed while opening ({_close_reason(exc)})"
    return f"could not connect ({type(exc).__name__}: {exc})"


def _describe_http_refusal(exc: ApiError, ws_failure: str) -> str:
    status = exc.status_code
    if status in (401, 403):
        return f"elevenlabs refused the API key (HTTP {status}); check ELEVENLABS_API_KEY or the agent's api_key_ref"
    detail = exc.body
    if isinstance(detail, dict):
        detail = detail.get("detail", detail)
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
    return f"elevenlabs: WebSocket failed ({ws_failure}) and HTTP streaming was refused (HTTP {status}: {detail})"


@functools.cache
def _environment_proxy(ws_base: str) -> str | None:
    """The environment's proxy for the WebSocket API at `ws_base`, looked up once per engine process.

    websockets would read the environment again for every socket, and even once per call the lookup (every
    environment variable scanned twice) cost about 1 ms of event-loop time under cProfile.
    """
    return get_proxy(parse_uri(ws_base))


def _endpoints(url: str) -> tuple[str, str]:
    """The API base as (http(s)://…, ws(s)://…), whichever of the two it was given as."""
    parts = urlsplit(url.rstrip("/"))
    secure = parts.scheme in ("https", "wss")
    base = parts.netloc + parts.path
    return f"{'https' if secure else 'http'}://{base}", f"{'wss' if secure else 'ws'}://{base}"
