"""ElevenLabs streaming text-to-speech: one stream-input WebSocket per sentence, taken warm, with HTTP as fallback."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
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
from pipelines.tts.base import Alignment, TTSError

log = logging.getLogger(__name__)

OUTPUT_FORMAT = "ulaw_8000"
"""What ElevenLabs sends: μ-law 8 kHz, Twilio's own format, so nothing is transcoded."""

BYTES_PER_MS = 8
"""μ-law 8 kHz bytes per millisecond of audio."""

INACTIVITY_TIMEOUT_S = 180
"""How long ElevenLabs keeps an idle stream-input socket open (its maximum)."""

STANDBY_MAX_AGE_S = 150.0
"""A standby socket older than this is replaced before ElevenLabs' inactivity timeout closes it."""

WS_FAILURES_BEFORE_HTTP = 3
"""Consecutive WebSocket failures after which a synthesizer speaks only over HTTP."""

CONNECT_TIMEOUT_S = 5.0
"""Longest a WebSocket handshake may take."""

RECEIVE_TIMEOUT_S = 10.0
"""Longest ElevenLabs may stay silent in the middle of a sentence before it counts as failed."""

CLOSE_TIMEOUT_S = 2.0
"""Longest a socket waits for ElevenLabs' closing handshake before dropping the connection."""

HTTP_TIMEOUT = httpx.Timeout(20.0, connect=CONNECT_TIMEOUT_S)
"""Timeouts of the HTTP fallback: connecting, and each wait for the next bytes of the stream."""

_END_OF_INPUT = json.dumps({"text": ""})


class _StreamFailed(Exception):
    """A sentence's WebSocket stream failed; the message says how."""


@dataclass(frozen=True, slots=True)
class _Chunk:
    """What one stream-input message carries for us."""

    audio: bytes
    alignment: Alignment | None  # times relative to this chunk's audio
    final: bool


class ElevenLabsTTS:
    """A call's ElevenLabs synthesizer (TextToSpeech): μ-law 8 kHz with character timings, one socket per sentence.

    Each sentence goes over its own stream-input WebSocket, taken from a standby the synthesizer keeps connected
    (and initialised) in the background, so no sentence waits for a TCP or TLS handshake; cancelling a sentence
    closes its socket, so none of its audio can reach a later one. When the WebSocket fails before a sentence's
    first audio, that sentence is spoken over the HTTP streaming endpoint instead (without timings).
    """

    def __init__(
        self,
        config: ElevenLabsTTSConfig,
        *,
        api_key: str,
        url: str,
        voice_id: str,
        standby_max_age_s: float = STANDBY_MAX_AGE_S,
    ) -> None:
        """Create a synthesizer for `voice_id` at the API base `url` (http(s):// or ws(s)://); connects lazily."""
        self.config = config
        self.voice_id = voice_id
        self._api_key = api_key
        self._http_url, ws_base = _endpoints(url)
        query = {
            "model_id": config.model,
            "output_format": OUTPUT_FORMAT,
            "sync_alignment": "true",
            "auto_mode": "true",  # we send whole sentences: no chunk schedule, no buffering
            "inactivity_timeout": str(INACTIVITY_TIMEOUT_S),
            # optimize_streaming_latency is deprecated on stream-input (auto_mode replaces it): HTTP only.
        }
        self._ws_url = f"{ws_base}/v1/text-to-speech/{quote(voice_id, safe='')}/stream-input?{urlencode(query)}"
        # The environment's proxy for ElevenLabs, looked up once: websockets would read the environment again
        # for every sentence's socket.
        self._proxy = get_proxy(parse_uri(self._ws_url))
        settings = {
            "stability": config.stability,
            "similarity_boost": config.similarity_boost,
            "speed": config.speed,
        }
        self._voice_settings = {name: value for name, value in settings.items() if value is not None}
        init: dict[str, Any] = {"text": " "}
        if self._voice_settings:
            init["voice_settings"] = self._voice_settings
        self._init_message = json.dumps(init)
        self._standby_max_age_s = standby_max_age_s
        self._standby: asyncio.Task[ClientConnection | Exception] | None = None
        self._standby_timer: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[ClientConnection | Exception]] = set()
        self._sockets: set[ClientConnection] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._ws_failures = 0
        self._closed = False

    async def prewarm(self) -> None:
        """Connect the standby socket now (for a call's first sentence) and wait until it is ready; never raises."""
        self._ensure_standby()
        if self._standby is not None:
            await asyncio.wait({self._standby})

    async def synthesize(self, text: str) -> AsyncIterator[bytes | Alignment]:
        """Speak one sentence as μ-law 8 kHz chunks, each after the `Alignment` of its characters (over WebSocket).

        Raise TTSError when neither the WebSocket nor the HTTP fallback can speak it, or when the stream breaks
        after some of its audio was yielded (the caller decides what to do with a half-spoken sentence).
        """
        if self._closed:
            raise TTSError("elevenlabs: the synthesizer is closed")
        sentence = text.strip()
        if not sentence:
            return
        failure: str | None = None
        if self._ws_failures < WS_FAILURES_BEFORE_HTTP:
            opened = await self._take_socket()
            if isinstance(opened, Exception):
                self._count_ws_failure()
                failure = _describe_connect_error(opened)
            else:
                try:
                    async with aclosing(self._speak_ws(opened, sentence)) as items:
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
        """Close the standby socket and any sentence's socket, and wait for them to close; idempotent."""
        self._closed = True
        self._standby = None
        if self._standby_timer is not None:
            self._standby_timer.cancel()
            self._standby_timer = None
        for task in list(self._connecting):
            task.cancel()
        for socket in list(self._sockets):
            self._release(socket)
        # A socket cancelled mid-initialisation starts closing only when its task ends: wait until all is quiet.
        while pending := {*self._connecting, *self._closing}:
            await asyncio.wait(pending)

    # The WebSocket

    async def _speak_ws(self, socket: ClientConnection, sentence: str) -> AsyncGenerator[bytes | Alignment, None]:
        """Speak `sentence` over `socket`, then close it; raise _StreamFailed before any audio, TTSError after."""
        yielded = 0
        try:
            await _send_sentence(socket, sentence)
            while True:
                chunk = await _receive(socket)
                if chunk.alignment is not None:
                    yield _shifted(chunk.alignment, yielded // BYTES_PER_MS)
                if chunk.audio:
                    yield chunk.audio
                    yielded += len(chunk.audio)
                if chunk.final:
                    break
        except _StreamFailed as exc:
            if self._closed:
                raise TTSError("elevenlabs: the synthesizer was closed mid-sentence") from None
            self._count_ws_failure()
            if yielded:
                raise TTSError(
                    f"elevenlabs: the stream broke after {yielded // BYTES_PER_MS} ms of audio ({exc})"
                ) from None
            raise
        else:
            self._ws_failures = 0
        finally:
            self._release(socket)

    def _ensure_standby(self) -> None:
        if self._closed or self._standby is not None or self._ws_failures >= WS_FAILURES_BEFORE_HTTP:
            return
        task = asyncio.create_task(self._open_socket(), name=f"elevenlabs standby {self.voice_id}")
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        self._standby = task
        loop = asyncio.get_running_loop()
        self._standby_timer = loop.call_later(self._standby_max_age_s, self._renew_standby, task)

    def _renew_standby(self, task: asyncio.Task[ClientConnection | Exception]) -> None:
        # Before ElevenLabs' inactivity timeout closes it, an unused standby gives way to a fresh one.
        if self._standby is not task:
            return
        self._standby = None
        self._standby_timer = None
        self._discard_when_opened(task)
        self._ensure_standby()

    async def _take_socket(self) -> ClientConnection | Exception:
        """The standby socket (waiting for it if it is still connecting), and warm the next one at once."""
        outcome: ClientConnection | Exception = ConnectionError("no standby socket")
        for _ in range(2):  # a standby the server has closed meanwhile gives way to the next one
            self._ensure_standby()
            task = self._standby
            if task is None:
                break
            self._standby = None
            if self._standby_timer is not None:
                self._standby_timer.cancel()
                self._standby_timer = None
            self._ensure_standby()
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                self._discard_when_opened(task)
                raise
            if task.cancelled():
                raise TTSError("elevenlabs: the synthesizer was closed")
            outcome = task.result()
            if isinstance(outcome, Exception) or outcome.state is State.OPEN:
                return outcome
            self._release(outcome)
            outcome = ConnectionError("the standby socket was closed by the server")
        return outcome

    async def _open_socket(self) -> ClientConnection | Exception:
        """A connected, initialised stream-input socket, or why there is none."""
        try:
            socket = await connect(
                self._ws_url,
                additional_headers={"xi-api-key": self._api_key},
                open_timeout=CONNECT_TIMEOUT_S,
                close_timeout=CLOSE_TIMEOUT_S,
                compression=None,  # base64 audio barely compresses; deflate would cost CPU on every chunk
                proxy=self._proxy,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            return exc
        self._sockets.add(socket)
        try:
            await socket.send(self._init_message)
        except ConnectionClosed as exc:
            self._release(socket)
            return exc
        except BaseException:
            self._release(socket)
            raise
        return socket

    def _discard_when_opened(self, task: asyncio.Task[ClientConnection | Exception]) -> None:
        # A standby nobody will use: close its socket now, or as soon as it is connected.
        def discard(done: asyncio.Task[ClientConnection | Exception]) -> None:
            if not done.cancelled() and isinstance(socket := done.result(), ClientConnection):
                self._release(socket)

        if task.done():
            discard(task)
        else:
            task.add_done_callback(discard)

    def _release(self, socket: ClientConnection) -> None:
        # Closed in the background: neither a barge-in nor the next sentence waits for a closing handshake.
        if socket not in self._sockets:
            return
        self._sockets.discard(socket)
        task = asyncio.get_running_loop().create_task(socket.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _count_ws_failure(self) -> None:
        self._ws_failures += 1
        if self._ws_failures == WS_FAILURES_BEFORE_HTTP:
            log.warning(
                "elevenlabs: the WebSocket failed %d times in a row; this synthesizer now speaks over HTTP",
                self._ws_failures,
            )
            if self._standby is not None:
                self._discard_when_opened(self._standby)
                self._standby = None
            if self._standby_timer is not None:
                self._standby_timer.cancel()
                self._standby_timer = None

    # The HTTP fallback

    async def _speak_http(self, sentence: str, ws_failure: str) -> AsyncGenerator[bytes, None]:
        """Speak `sentence` through the HTTP streaming endpoint; raise TTSError naming both failures if it fails."""
        options: dict[str, Any] = {}
        if self._voice_settings:
            options["voice_settings"] = VoiceSettings(**self._voice_settings)
        stream = _shared_http_client(self._api_key, self._http_url).text_to_speech.stream(
            self.voice_id,
            text=sentence,
            model_id=self.config.model,
            output_format=OUTPUT_FORMAT,
            optimize_streaming_latency=self.config.optimize_streaming_latency,
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
                    raise TTSError(_describe_http_refusal(exc, ws_failure)) from None
                except httpx.HTTPError as exc:
                    raise TTSError(
                        f"elevenlabs: WebSocket failed ({ws_failure}) and HTTP streaming failed "
                        f"({type(exc).__name__}: {exc})"
                    ) from None
                if audio:
                    yield audio


_http_clients: dict[tuple[str, str], tuple[AsyncElevenLabs, httpx.AsyncClient]] = {}


def _shared_http_client(api_key: str, url: str) -> AsyncElevenLabs:
    """The process's one ElevenLabs SDK client for this key and API base (http(s)://), created on first use."""
    entry = _http_clients.get((api_key, url))
    if entry is None:
        transport = httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=True)
        entry = (AsyncElevenLabs(api_key=api_key, base_url=url, httpx_client=transport), transport)
        _http_clients[(api_key, url)] = entry
    return entry[0]


async def close_http_clients() -> None:
    """Close the shared SDK clients' connection pools (at engine shutdown); they are recreated if used again."""
    entries = list(_http_clients.values())
    _http_clients.clear()
    for _, transport in entries:
        await transport.aclose()


# The stream-input wire protocol


async def _send_sentence(socket: ClientConnection, sentence: str) -> None:
    # The sentence, spoken now (flush), then the end of input: ElevenLabs finishes, sends isFinal and closes.
    try:
        await socket.send(json.dumps({"text": sentence + " ", "flush": True}))
        await socket.send(_END_OF_INPUT)
    except ConnectionClosed as exc:
        raise _StreamFailed(f"the socket closed before the text was sent ({_close_reason(exc)})") from None


async def _receive(socket: ClientConnection) -> _Chunk:
    try:
        async with asyncio.timeout(RECEIVE_TIMEOUT_S):
            raw = await socket.recv()
    except TimeoutError:
        raise _StreamFailed(f"no message for {RECEIVE_TIMEOUT_S:g} s") from None
    except ConnectionClosed as exc:
        raise _StreamFailed(f"the socket closed before the end of the sentence ({_close_reason(exc)})") from None
    try:
        message = json.loads(raw)
    except ValueError:
        raise _StreamFailed(f"not JSON: {raw[:80]!r}") from None
    if not isinstance(message, dict):
        raise _StreamFailed(f"not a JSON object: {str(raw)[:80]!r}")
    return _parse(message)


def _parse(message: dict[str, Any]) -> _Chunk:
    """One server message: audio (base64, may be null or empty), its alignment, the end flag, or an error."""
    encoded = message.get("audio")
    if not encoded and ("error" in message or "message" in message):
        error = message.get("error") or message.get("code") or "error"
        raise _StreamFailed(f"{error}: {message.get('message', '')}".rstrip(": "))
    try:
        audio = base64.b64decode(encoded) if encoded else b""
    except ValueError:
        raise _StreamFailed("audio that is not base64") from None
    timing = message.get("alignment") or message.get("normalizedAlignment") or message.get("normalized_alignment")
    final = bool(message.get("isFinal") or message.get("is_final"))
    return _Chunk(audio=audio, alignment=_alignment(timing), final=final)


def _alignment(timing: Any) -> Alignment | None:
    # Vendor keys are camelCase; older docs and clients show snake_case. A malformed alignment is dropped, not fatal.
    if not isinstance(timing, dict):
        return None
    chars = timing.get("chars")
    starts = timing.get("charStartTimesMs", timing.get("char_start_times_ms"))
    if not isinstance(chars, list) or not isinstance(starts, list) or not chars or len(chars) != len(starts):
        return None
    try:
        return Alignment(chars="".join(chars), start_ms=tuple(round(start) for start in starts))
    except TypeError:
        return None


def _shifted(alignment: Alignment, offset_ms: int) -> Alignment:
    """`alignment` with chunk-relative times made relative to the start of the sentence's audio."""
    if not offset_ms:
        return alignment
    return Alignment(chars=alignment.chars, start_ms=tuple(start + offset_ms for start in alignment.start_ms))


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


def _endpoints(url: str) -> tuple[str, str]:
    """The API base as (http(s)://…, ws(s)://…), whichever of the two it was given as."""
    parts = urlsplit(url.rstrip("/"))
    secure = parts.scheme in ("https", "wss")
    base = parts.netloc + parts.path
    return f"{'https' if secure else 'http'}://{base}", f"{'wss' if secure else 'ws'}://{base}"
