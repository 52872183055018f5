"""Deepgram live speech-to-text: the caller's μ-law streamed over the SDK's WebSocket, reconnecting with a replay.

One `DeepgramSTT` per call. Audio goes out as it arrives (μ-law 8 kHz, no transcoding) from one sender task;
results come back through one receiver task. Every `at_ms` is on the caller's stream timeline: when the socket
drops, the audio that no final result has covered yet is sent again on a new socket, and that socket's times are
shifted by where the replay starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.socket_client import AsyncV1SocketClient
from websockets.exceptions import ConnectionClosed, WebSocketException

from config.agent import DeepgramSTTConfig
from media.g711 import BYTES_PER_MS, SAMPLE_RATE
from pipelines.clients import CloseClient, ProviderClients
from pipelines.loop_waits import SingleWaiterQueue, Wakeup
from pipelines.stt.base import MAX_REPLAY_MS, EndOfTurn, SpeechStarted, STTError, STTEvent, TranscriptUpdate

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 60.0
"""The SDK's own default for its REST requests (live streaming does not use them)."""
CLOSE_GRACE_SECONDS = 1.0
"""How long `close()` waits for Deepgram to send its last results and close the socket."""
QUIET_BATCH_MS = 200
"""Silence after speech goes out this much at a time outside the hot windows below (10x fewer socket writes than
frame by frame), until past the last of them."""
SPEECH_BATCH_MS = 200
"""Mid-speech, voiced frames go out this much at a time (within the 20-250 ms Deepgram suggests): no end of turn can
come before the speech stops; interim results, and a barge-in on the caller's words, may come up to this much later.
The local VAD's barge-in on sustained speech waits on nothing sent here."""
FAR_QUIET_BATCH_MS = 500
"""Silence past every hot window below (the caller listening to the agent, or thinking) goes out this much at a
time: nothing waits on it, Deepgram takes any chunk size, and it is most of a call's audio."""
HOT_LEAD_MS = 100
"""Silent frames go out one by one from this long before Deepgram's endpointing (or UtteranceEnd) gap is complete
after the last voiced frame, for a recognizer whose idea of the end of speech leads ours; everything held goes out
with the first of them."""
HOT_MARGIN_MS = 100
"""... until this long after it, for one whose idea lags ours."""
STABLE_SOCKET_SECONDS = 30.0
"""A socket that served this long before it closed was a working one even if it never had to answer (the caller
listened to the agent throughout): its drop starts the reconnect attempts afresh, so drops spread over a long call
do not add up to a failure."""
SILENT_SOCKETS_TO_FAIL = 2
"""Sockets in a row dropped for leaving the caller's speech unanswered before reconnecting stops: the second one
heard the first one's unanswered speech again and said nothing either, so the caller has already waited two
`silent_socket_seconds` and a third socket would most likely be as silent."""
UNANSWERED_SPEECH_MS = 1000
"""Voiced caller audio sent since Deepgram's last message (of any kind) before its silence counts against the socket:
with interim results Deepgram answers speech about every second; to less speech, or to silence, it may say nothing."""

# The control messages as the SDK's send_finalize() and the like write them (json.dumps of the message model's
# dict), written once: the SDK builds a pydantic model, its dict and its JSON for each (about 10 µs when warm).
_FINALIZE = json.dumps({"type": "Finalize"})
_CLOSE_STREAM = json.dumps({"type": "CloseStream"})
_KEEP_ALIVE = json.dumps({"type": "KeepAlive"})

_SCHEMES = {"ws": ("ws", "http"), "http": ("ws", "http"), "wss": ("wss", "https"), "https": ("wss", "https")}


def deepgram_environment(url: str) -> DeepgramClientEnvironment:
    """The SDK's endpoints for a Deepgram base URL given as http(s):// or ws(s):// (e.g. `wss://api.deepgram.com`)."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.netloc:
        raise ValueError(f"DEEPGRAM_URL: {url!r} is not an http(s):// or ws(s):// URL with a host")
    ws_scheme, http_scheme = _SCHEMES[parts.scheme]
    rest = f"{parts.netloc}{parts.path.rstrip('/')}"
    return DeepgramClientEnvironment(
        base=f"{http_scheme}://{rest}",
        production=f"{ws_scheme}://{rest}",
        agent=f"{ws_scheme}://{rest}",
        agent_rest=f"{http_scheme}://{rest}",
    )


def new_client(api_key: str, url: str) -> tuple[AsyncDeepgramClient, CloseClient]:
    """A new SDK client for this key and base URL, and how to close it (`ProviderClients` keeps one per pair)."""
    # Our own HTTP pool, so that it can be closed: the one the SDK makes for itself never is.
    transport = httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, follow_redirects=True)
    client = AsyncDeepgramClient(
        api_key=api_key, environment=deepgram_environment(url), httpx_client=transport, timeout=HTTP_TIMEOUT_S
    )
    _make_headers_once(client)
    return client, transport.aclose


def _make_headers_once(client: AsyncDeepgramClient) -> None:
    """Have the client's sockets reuse the request headers it makes now, rather than make them for each socket.

    The SDK makes them anew for every `listen.v1.connect`, looking its own version up in the installed packages'
    metadata each time (a scan of every sys.path entry: about 2 ms of event-loop time per call under cProfile, as
    much as the socket's handshake). Nothing in them changes for a client: its key, session id and version are
    fixed. Each socket still gets a copy of its own, as the SDK's connect adds to them.
    """
    wrapper = client._client_wrapper
    headers = wrapper.get_headers()
    wrapper.get_headers = lambda: dict(headers)  # type: ignore[method-assign]


def listen_parameters(config: DeepgramSTTConfig) -> dict[str, Any]:
    """The `/v1/listen` query for a call's configuration: Twilio's μ-law 8 kHz mono as it arrives."""
    params: dict[str, Any] = {
        "model": config.model,
        "language": config.language or "en-US",  # the registry fills in the agent's language
        "encoding": "mulaw",
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
        "interim_results": config.interim_results,
        "endpointing": config.endpointing,
        "vad_events": config.vad_events,
        "smart_format": config.smart_format,
    }
    if config.utterance_end_ms is not None:
        params["utterance_end_ms"] = config.utterance_end_ms
    if config.keywords:
        # Nova-3 takes `keyterm` and rejects the older `keywords`; one query parameter per term either way.
        params["keyterm" if config.model.startswith("nova-3") else "keywords"] = list(config.keywords)
    return params


_CLOSED = object()


class DeepgramSTT:
    """A call's Deepgram live recognizer (SpeechToText), reconnecting and replaying unconfirmed audio on a drop."""

    def __init__(
        self,
        config: DeepgramSTTConfig,
        *,
        clients: ProviderClients,
        api_key: str,
        url: str,
        reconnect_delays: Sequence[float] = (0.1, 0.3, 1.0),
        max_replay_ms: int = MAX_REPLAY_MS,
        keepalive_seconds: float = 3.0,
        silent_socket_seconds: float = 5.0,
        stable_socket_seconds: float = STABLE_SOCKET_SECONDS,
        on_replay_lost: Callable[[int], None] | None = None,
    ) -> None:
        """Create a recognizer for `config` at Deepgram base `url`; nothing connects until `start()`.

        It connects through the engine's Deepgram client from `clients`.

        After a drop it reconnects after each of `reconnect_delays` in turn, replaying at most the last
        `max_replay_ms` of audio no final result has covered; `KeepAlive` goes out after `keepalive_seconds`
        without audio. A socket that stays open but sends nothing at all for `silent_socket_seconds` once
        `UNANSWERED_SPEECH_MS` of the caller's voiced audio has gone out since its last message is dropped as dead
        (with interim results on, as they are by default: without them Deepgram may rightly say nothing until the
        caller pauses); reconnecting stops after `SILENT_SOCKETS_TO_FAIL` such sockets in a row. The attempts start
        afresh once a socket has said something or served `stable_socket_seconds`.

        A new socket that cannot hear some of that audio again (no final result for longer than `max_replay_ms`)
        logs how much, and tells `on_replay_lost(ms)`.
        """
        self._client = clients.deepgram(api_key, url)
        self._host = urlsplit(url).netloc
        self._params = listen_parameters(config)
        self._reconnect_delays = tuple(reconnect_delays)
        self._max_replay_bytes = max_replay_ms * BYTES_PER_MS
        self._keepalive_seconds = keepalive_seconds
        # The caller's audio not yet covered by a final result; `_audio_start` is where it begins on the stream,
        # in bytes since the stream began. `_sent_to` is how far the current socket has been sent, `_origin`
        # where that socket's own timeline starts, `_replayed_to` where its replay ends.
        self._audio = bytearray()
        self._audio_start = 0
        self._final_to = 0  # where the last final result ends on the stream, in bytes: audio before it is heard
        self._on_replay_lost = on_replay_lost
        self._sent_to = 0
        self._origin = 0
        self._replayed_to = 0
        # Deepgram needs promptly only the silence that completes its endpointing or UtteranceEnd gap after speech;
        # the speech before it and the rest of the silence go out in batches (see send_audio).
        self._quiet_bytes = 0
        self._endpointing_window = _hot_window(config.endpointing or None)
        self._utterance_end_window = _hot_window(config.utterance_end_ms)
        self._far_quiet_bytes = max(self._endpointing_window[1], self._utterance_end_window[1])
        self._wake = Wakeup()
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._last_sent = 0.0
        # The caller's voiced audio since Deepgram's last message, counted on the audio path; past the limit, one
        # timer watches for the socket's answer (see _watch_for_an_answer).
        self._unanswered_bytes = 0
        self._unanswered_limit = UNANSWERED_SPEECH_MS * BYTES_PER_MS if config.interim_results else sys.maxsize
        self._silent_socket_seconds = silent_socket_seconds
        self._stable_socket_seconds = stable_socket_seconds
        self._answer_timer: asyncio.TimerHandle | None = None
        self._answered = False  # the current socket has sent something
        self._silent_cause: str | None = None  # why the current socket was dropped as dead, if it was
        self._events: SingleWaiterQueue[STTEvent | STTError | object] = SingleWaiterQueue()
        self._turn: list[str] = []
        self._heard_to_ms = 0
        self._last_speech_start_ms: int | None = None
        self._socket: AsyncV1SocketClient | None = None
        self._opened: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self._punctuates = config.smart_format
        self._finalize_requested = False

    @property
    def punctuates(self) -> bool:
        """Deepgram punctuates with `smart_format`."""
        return self._punctuates

    @property
    def prompt_silence_ms(self) -> tuple[int, int]:
        """From the start of the first hot window to the end of the last (see send_audio)."""
        starts = [start for start, end in (self._endpointing_window, self._utterance_end_window) if end]
        return (min(starts, default=0) // BYTES_PER_MS, self._far_quiet_bytes // BYTES_PER_MS)

    def finalize_now(self) -> None:
        """Send `Finalize` (with everything held back before it): Deepgram finalizes the audio sent so far."""
        if self._closing or self._socket is None:
            return
        self._finalize_requested = True
        self._wake.set()

    async def start(self) -> None:
        """Open the socket; raise STTError naming the cause (refused key, unreachable host) if it cannot."""
        if self._runner is not None:
            raise RuntimeError("DeepgramSTT.start() was already called")
        self._opened = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(), name=f"deepgram-stt {self._host}")
        try:
            await asyncio.shield(self._opened)
        except asyncio.CancelledError:
            self._opened.cancel()
            self._runner.cancel()
            raise

    def send_audio(self, ulaw: bytes, *, voiced: bool = True) -> None:
        """Queue one chunk of caller audio for the sender task; cheap enough for every 20 ms frame.

        Only the silence that completes Deepgram's endpointing gap after speech is time-critical, and the one that
        completes its UtteranceEnd gap while final words wait for an end of turn: from `HOT_LEAD_MS` before such a
        gap is complete to `HOT_MARGIN_MS` after it, frames go out one by one, the first taking along everything
        held. Voiced frames go out `SPEECH_BATCH_MS` at a time, the rest of the silence `QUIET_BATCH_MS` at a time
        until past the last hot window, then `FAR_QUIET_BATCH_MS` at a time.
        So Deepgram never ends a turn later than it would if it got every frame as it came.
        """
        if self._closing:
            return
        audio = self._audio
        audio += ulaw
        excess = len(audio) - self._max_replay_bytes
        if excess > 0:
            # bytearray drops its head without copying the rest.
            del audio[:excess]
            self._audio_start += excess
        pending = self._audio_start + len(audio) - self._sent_to
        if voiced:
            self._quiet_bytes = 0
            due = pending >= SPEECH_BATCH_MS * BYTES_PER_MS
            self._unanswered_bytes += len(ulaw)
            if self._unanswered_bytes >= self._unanswered_limit and self._answer_timer is None:
                self._watch_for_an_answer()
        else:
            quiet = self._quiet_bytes = self._quiet_bytes + len(ulaw)
            start, end = self._endpointing_window
            batch = QUIET_BATCH_MS if quiet <= self._far_quiet_bytes else FAR_QUIET_BATCH_MS
            due = pending >= batch * BYTES_PER_MS or start < quiet <= end
            if self._turn and not due:  # words wait for UtteranceEnd to end the turn
                start, end = self._utterance_end_window
                due = start < quiet <= end
        if due:
            self._wake.set()

    def replay_audio(self) -> bytes:
        """The caller's recent audio that no final result has covered (at most `max_replay_ms`), for a fallback."""
        return bytes(self._audio)

    async def events(self) -> AsyncIterator[STTEvent]:
        """Speech starts, transcripts and ends of turn, in order; raises STTError once reconnecting has failed."""
        while True:
            event = await self._events.get()
            if event is _CLOSED:
                self._events.put_nowait(_CLOSED)  # later readers end too
                return
            if isinstance(event, STTError):
                self._events.put_nowait(event)  # and later readers fail too
                raise event
            assert isinstance(event, SpeechStarted | TranscriptUpdate | EndOfTurn)
            yield event

    async def close(self) -> None:
        """Send the rest of the audio, `Finalize` and `CloseStream`; wait briefly for the last results; idempotent."""
        if self._closing:
            return
        self._closing = True
        runner = self._runner
        if runner is None:
            self._events.put_nowait(_CLOSED)
            return
        if self._socket is not None:
            self._wake.set()
            await asyncio.wait({runner}, timeout=CLOSE_GRACE_SECONDS)
        if not runner.done():
            # Reconnecting, or the server never closed: stop here. The websockets library finishes any close
            # handshake in the background with its own timeouts.
            runner.cancel()
            await asyncio.wait({runner}, timeout=0.1)
            self._events.put_nowait(_CLOSED)

    # ------------------------------------------------------------------------------------------- connection

    async def _run(self) -> None:
        """Own the connection until closed; end the events with STTError if it is lost for good."""
        failure: STTError | None = None
        try:
            failure = await self._connect_and_serve()
        except Exception as exc:  # a bug or a reply we cannot read must end the events, not leave the call hanging
            log.exception("deepgram at %s: the recognizer failed", self._host)
            failure = STTError(f"deepgram at {self._host}: the recognizer failed ({exc!r})", provider="deepgram")
        finally:
            if self._opened is not None and not self._opened.done():
                self._opened.set_exception(
                    failure or STTError(f"closed before deepgram at {self._host} answered", provider="deepgram")
                )
            if failure is not None:
                self._events.put_nowait(failure)
            else:
                self._end_turn(self._heard_to_ms)  # words the last results left without an end of turn
                self._events.put_nowait(_CLOSED)

    async def _connect_and_serve(self) -> STTError | None:
        """Connect, serve the socket, and after a drop reconnect with backoff; the failure that ended it, if any."""
        loop = asyncio.get_running_loop()
        attempt = silent_sockets = 0
        while not self._closing:
            try:
                async with self._client.listen.v1.connect(**self._params) as socket:
                    opened_at = loop.time()
                    cause = await self._stream(socket)
                    if self._silent_cause is not None:
                        silent_sockets += 1
                    elif self._answered or loop.time() - opened_at >= self._stable_socket_seconds:
                        # Reconnected for good only once the socket has said something, or served a while: one
                        # that opens and then closes, or stays silent, at once each time is not a working Deepgram.
                        attempt = silent_sockets = 0
            except (ApiError, OSError, WebSocketException) as exc:
                # TimeoutError (the handshake's own timeout) is an OSError.
                cause = self._connect_failure(exc)
                if self._opened is not None and not self._opened.done():
                    return STTError(cause, provider="deepgram")
            if self._closing:
                break
            if silent_sockets == SILENT_SOCKETS_TO_FAIL:
                return STTError(f"{cause}; the socket before it was silent too", provider="deepgram")
            if attempt == len(self._reconnect_delays):
                return STTError(f"{cause}; could not reconnect after {attempt} attempts", provider="deepgram")
            delay = self._reconnect_delays[attempt]
            attempt += 1
            log.warning("%s; reconnecting in %g s (attempt %d)", cause, delay, attempt)
            await asyncio.sleep(delay)
        return None

    async def _stream(self, socket: AsyncV1SocketClient) -> str:
        """Serve one socket until it closes; return why it closed."""
        # A new socket hears the unconfirmed audio again from its beginning: its time zero is there.
        if self._opened is not None and self._opened.done() and self._audio_start > self._final_to:
            lost_ms = (self._audio_start - self._final_to) // BYTES_PER_MS
            log.warning(
                "deepgram at %s: the new socket hears again only the last %d ms of the caller's audio that no final "
                "result covered; the %d ms before it are lost (no final result for over %d ms)",
                self._host,
                len(self._audio) // BYTES_PER_MS,
                lost_ms,
                self._max_replay_bytes // BYTES_PER_MS,
            )
            if self._on_replay_lost is not None:
                self._on_replay_lost(lost_ms)
            self._final_to = self._audio_start  # told once
        self._origin = self._sent_to = self._audio_start
        self._replayed_to = self._audio_start + len(self._audio)
        self._socket = socket
        self._answered = False
        self._silent_cause = None
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(None)
        if self._unanswered_bytes >= self._unanswered_limit:
            self._watch_for_an_answer()  # the replay carries the speech the last socket never answered
        self._wake.set()
        sender = asyncio.create_task(self._send(socket), name=f"deepgram-stt sender {self._host}")
        try:
            return await self._receive(socket)
        finally:
            self._socket = None
            sender.cancel()
            await asyncio.wait({sender})
            if self._keepalive_timer is not None:
                self._keepalive_timer.cancel()
                self._keepalive_timer = None
            if self._answer_timer is not None:
                self._answer_timer.cancel()
                self._answer_timer = None

    async def _send(self, socket: AsyncV1SocketClient) -> None:
        """The one sender: whatever audio is pending as one message, `KeepAlive` when idle, the close messages.

        Messages go straight to the SDK's own connection, as `_receive` reads them (see `_FINALIZE`).
        """
        websocket = socket._websocket  # deepgram-sdk 7.x: the connection `listen.v1.connect` opened
        loop = asyncio.get_running_loop()
        self._last_sent = loop.time()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                end = self._audio_start + len(self._audio)
                if self._sent_to < end:
                    skipped = self._audio_start - self._sent_to
                    if skipped > 0:
                        log.warning("deepgram at %s: %d ms of audio dropped unsent", self._host, skipped // 8)
                        # Deepgram's clock runs on the audio it gets: what it never got moves its origin on ours.
                        self._origin += skipped
                    chunk = bytes(self._audio[max(-skipped, 0) :])
                    self._sent_to = end
                    await websocket.send(chunk)
                    self._last_sent = loop.time()
                if self._finalize_requested and not self._closing:
                    self._finalize_requested = False
                    await websocket.send(_FINALIZE)
                    self._last_sent = loop.time()
                if self._closing:
                    await websocket.send(_FINALIZE)
                    await websocket.send(_CLOSE_STREAM)
                    return
                if loop.time() - self._last_sent >= self._keepalive_seconds:
                    await websocket.send(_KEEP_ALIVE)
                    self._last_sent = loop.time()
                if self._keepalive_timer is None:
                    self._keepalive_timer = loop.call_at(self._last_sent + self._keepalive_seconds, self._keepalive_due)
        except ConnectionClosed:
            return  # the receiver sees it too and reports why

    def _keepalive_due(self) -> None:
        self._keepalive_timer = None
        self._wake.set()

    def _watch_for_an_answer(self) -> None:
        """Drop the socket if it sends nothing within `silent_socket_seconds` (the caller's speech went unanswered).

        One timer per recognizer, set when the unanswered speech passes its limit and cancelled by any message: a
        healthy socket hearing speech sends interim results about every second, so this never fires on one. Silence
        and KeepAlive periods add nothing to the count, and a Finalize's answer is not waited for (Deepgram sends
        none when it holds no audio to finalize).
        """
        if self._socket is None or self._closing:
            return  # a new socket starts the watch again with its replay
        loop = asyncio.get_running_loop()
        self._answer_timer = loop.call_later(self._silent_socket_seconds, self._socket_silent)

    def _socket_silent(self) -> None:
        self._answer_timer = None
        socket = self._socket
        if socket is None or self._closing:
            return
        self._silent_cause = (
            f"deepgram at {self._host} sent nothing for {self._silent_socket_seconds:g} s"
            f" while the caller spoke ({self._unanswered_bytes // BYTES_PER_MS} ms of speech unanswered)"
        )
        # Aborted, not closed: a close handshake would wait on a server that answers nothing. The receiver sees the
        # connection lost and the socket is replaced like any dropped one.
        socket._websocket.transport.abort()

    async def _receive(self, socket: AsyncV1SocketClient) -> str:
        """Turn Deepgram's messages into events until the socket closes; return why it closed.

        Messages are read as the JSON they are from the SDK's own connection: its `recv()` would build the SDK's
        models for each, about 100 µs for a Results message with its words (eight times json.loads) on the loop
        every call's audio shares, for the few fields read here.
        """
        websocket = socket._websocket  # deepgram-sdk 7.x: the connection `listen.v1.connect` opened
        while True:
            try:
                data = await websocket.recv()
            except ConnectionClosed as exc:
                return self._silent_cause or self._close_cause(exc)
            self._answered = True
            self._unanswered_bytes = 0
            if self._answer_timer is not None:
                self._answer_timer.cancel()
                self._answer_timer = None
            try:
                message = json.loads(data)
            except ValueError:
                log.warning("deepgram at %s sent a message that is not JSON; skipped", self._host)
                continue
            try:
                self._handle(message)
            except (KeyError, TypeError, IndexError, ValueError) as exc:
                log.warning("deepgram at %s sent a message it could not read; skipped (%r)", self._host, exc)

    def _handle(self, message: object) -> None:
        if not isinstance(message, dict):
            raise TypeError(f"a JSON {type(message).__name__}, not an object")
        match message.get("type"):
            case "Results":
                self._on_results(message)
            case "SpeechStarted":
                self._on_speech_started(self._socket_ms(_seconds(message["timestamp"])))
            case "UtteranceEnd":
                # The fallback when endpointing never fires (noisy lines): the words stopped a while ago.
                self._end_turn(self._socket_ms(_seconds(message["last_word_end"])))
            case "Error":
                log.warning(
                    "deepgram at %s reported an error: %s (%s)",
                    self._host,
                    message.get("description"),
                    message.get("variant"),
                )
            case _:
                pass  # Metadata at the end of the stream, Configure replies

    # ------------------------------------------------------------------------------------------- results

    def _socket_ms(self, seconds: float) -> int:
        """A time on the current socket's timeline (seconds) as milliseconds on the stream's timeline."""
        return self._origin // BYTES_PER_MS + round(seconds * 1000)

    def _on_results(self, result: dict[str, Any]) -> None:
        alternatives = result["channel"]["alternatives"]
        transcript = alternatives[0]["transcript"] if alternatives else ""
        if not isinstance(transcript, str):
            raise TypeError(f"transcript is a {type(transcript).__name__}")
        text = transcript.strip()
        end = _seconds(result["start"]) + _seconds(result["duration"])
        at_ms = self._socket_ms(end)
        if result.get("is_final") is not True:
            if text:
                self._events.put_nowait(TranscriptUpdate(text=text, is_final=False, at_ms=at_ms))
            return
        self._heard_to_ms = at_ms
        self._confirm(self._origin + round(end * SAMPLE_RATE))
        finalized = result.get("from_finalize") is True and not self._closing  # not the Finalize of close()
        if text:
            self._turn.append(text)
        if text or finalized:
            self._events.put_nowait(TranscriptUpdate(text=text, is_final=True, at_ms=at_ms, finalized=finalized))
        if result.get("speech_final") is True:
            self._end_turn(at_ms)

    def _confirm(self, through: int) -> None:
        """Forget the audio up to stream offset `through`: a final result covers it, it will never be replayed."""
        self._final_to = max(self._final_to, through)
        drop = min(through - self._audio_start, len(self._audio))
        if drop > 0:
            del self._audio[:drop]
            self._audio_start += drop

    def _on_speech_started(self, at_ms: int) -> None:
        replaying = at_ms < self._replayed_to // BYTES_PER_MS
        if (
            replaying
            and self._last_speech_start_ms is not None
            and self._last_speech_start_ms >= self._origin // BYTES_PER_MS
        ):
            return  # the previous socket already announced this speech
        self._last_speech_start_ms = at_ms
        self._events.put_nowait(SpeechStarted(at_ms=at_ms))

    def _end_turn(self, at_ms: int) -> None:
        if self._turn:
            self._events.put_nowait(EndOfTurn(text=" ".join(self._turn), at_ms=at_ms))
            self._turn.clear()

    def _close_cause(self, exc: ConnectionClosed) -> str:
        frame = exc.rcvd
        if frame is None:
            return f"the connection to deepgram at {self._host} was lost (no close frame)"
        reason = f" ({frame.reason})" if frame.reason else ""
        return f"deepgram at {self._host} closed the connection with code {frame.code}{reason}"

    def _connect_failure(self, exc: Exception) -> str:
        # Never the exception's text for ApiError: it carries the request headers (redacted, but still).
        match exc:
            case ApiError(status_code=401 | 403 as status):
                return f"deepgram refused the API key (HTTP {status}); check the key configured for Deepgram"
            case ApiError(status_code=status):
                return f"deepgram at {self._host} refused the connection (HTTP {status})"
            case TimeoutError():
                return f"could not reach deepgram at {self._host}: the connection timed out"
            case OSError():
                return f"could not reach deepgram at {self._host}: {exc.strerror or exc}"
            case _:
                return f"deepgram at {self._host}: the WebSocket handshake failed ({exc})"


def _hot_window(gap_ms: int | None) -> tuple[int, int]:
    """The silence, in bytes after the last voiced frame, that goes out frame by frame for a gap of `gap_ms`."""
    if gap_ms is None:
        return (0, 0)
    return (max(0, gap_ms - HOT_LEAD_MS) * BYTES_PER_MS, (gap_ms + HOT_MARGIN_MS) * BYTES_PER_MS)


def _seconds(value: object) -> float:
    """A time in one of Deepgram's messages: seconds as a JSON number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected seconds as a number, got {value!r}")
    return float(value)
