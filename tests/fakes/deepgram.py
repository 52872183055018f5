"""A local Deepgram live-transcription server (`/v1/listen`) that hears speech by its energy and answers from a script.

async with FakeDeepgram(api_key="dg-test", transcripts=["book an appointment"]) as fake:
    stt = DeepgramSTT(config, clients=clients, api_key="dg-test", url=fake.url)

What it says and when is decided by audio time (bytes received, 8 per ms), never by the wall clock: the same
audio always gets the same messages with the same timestamps, however fast it is sent. Only *when they leave* can
be held back on purpose, to play a server of known speed: `final_delay_ms` after each endpointing decision (the
final with `speech_final`), `finalize_delay_ms` after each `Finalize`, `result_delay_ms` on every Results message.

Mid-sentence pauses: a scripted transcript may hold ` | ` ("I would like to | book a table for two."). The text
before the bar is what the fake recognizes for the speech before the first pause the endpointing ends (sent as a
final with `speech_final`, no terminal punctuation of its own, as Deepgram would), the text after it for the speech
after that pause, and so on for further bars. A `Finalize` in a pause finalizes the part in progress the same way
(with `from_finalize`); when the endpointing silence is then reached with nothing new said, an empty final with
`speech_final` follows (Deepgram's "empty transcript that still carries speech_final").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import numpy as np
from aiohttp import WSMsgType, web

from media.g711 import FRAME_BYTES, FRAME_MS, ulaw_to_pcm16
from tests.fakes.server import serve

__all__ = ["DEFAULT_TRANSCRIPT", "FakeDeepgram", "FakeListenConnection"]

DEFAULT_TRANSCRIPT = "hello"

SPEECH_RMS = 500.0
"""A 20 ms window louder than this (16-bit RMS) is speech."""

MIN_SPEECH_MS = 100
"""Shorter bursts of sound are noise: no SpeechStarted, no transcript."""

INTERIM_EVERY_MS = 300
"""Speech between two interim results."""

UNENDPOINTED_FINAL_MS = 200
"""With `endpointing=false`, silence after which the words are still finalized (without `speech_final`)."""

DEFAULT_ENDPOINTING_MS = 10


@dataclass
class FakeListenConnection:
    """What one accepted `/v1/listen` socket asked for and received."""

    query: dict[str, str]
    """The query parameters (the first value of a repeated one, such as `keyterm`; `query_lists` has them all)."""
    query_lists: dict[str, list[str]]
    headers: dict[str, str] = field(default_factory=dict)
    """The handshake's request headers."""
    bytes_received: int = 0
    audio_messages: int = 0
    controls: list[str] = field(default_factory=list)
    """The `type` of every text message from the client, in order (`KeepAlive`, `Finalize`, `CloseStream`, …)."""
    sent: list[dict[str, Any]] = field(default_factory=list)
    """Every message the fake sent on this socket, in order."""
    close_code: int | None = None
    """The close code the fake sent (1000 after CloseStream, 1011 when idle); None if it never closed it itself."""


class FakeDeepgram:
    """`/v1/listen` WebSockets on 127.0.0.1, transcribing caller speech as the next scripted transcript.

    Controls: `transcripts` (FIFO: each final result takes the next, then `default_transcript`), `refuse` (new
    handshakes fail with HTTP 503 while true), `drop_all()` (cut every live socket like a network failure), `mute`
    (while true, every socket, new ones too, stays open and takes audio and control messages but sends nothing: a
    service stuck behind an open socket; what it would have said is dropped, not delayed),
    `result_delay_ms` (each Results message goes out this much later), `final_delay_ms` and `finalize_delay_ms`
    (see `__init__`), `garbage` (raw text frames sent, one each,
    before the next Results messages: broken JSON, wrong shapes). Observations: `listens` (one
    `FakeListenConnection` per accepted socket) and the counters `connections`, `keepalives`, `closed_cleanly`,
    `queries`, `bytes_received`, `refused`.
    """

    def __init__(
        self,
        *,
        api_key: str = "dg-test",
        transcripts: Iterable[str] = (),
        default_transcript: str = DEFAULT_TRANSCRIPT,
        result_delay_ms: float = 0,
        final_delay_ms: int = 0,
        finalize_delay_ms: int = 0,
        idle_timeout_seconds: float = 10.0,
    ) -> None:
        """Accept `Authorization: Token <api_key>` only; close sockets silent for `idle_timeout_seconds` (1011).

        `final_delay_ms`: wall-clock delay between the audio-time endpointing decision and sending its final result;
        `finalize_delay_ms`: wall-clock delay between receiving `Finalize` and sending the finalized result.
        """
        self.api_key = api_key
        self.final_delay_ms = final_delay_ms
        self.finalize_delay_ms = finalize_delay_ms
        self.transcripts: deque[str] = deque(transcripts)
        self.default_transcript = default_transcript
        self.result_delay_ms = result_delay_ms
        self.idle_timeout_seconds = idle_timeout_seconds
        self.refuse = False
        self.refused = 0
        self.mute = False
        self.garbage: deque[str] = deque()
        self.listens: list[FakeListenConnection] = []
        self.url = ""
        self._live: dict[web.WebSocketResponse, asyncio.Transport | None] = {}
        self._exit_stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/v1/listen", self._listen)
        base = await self._exit_stack.enter_async_context(serve(app))
        self.url = base.replace("http://", "ws://", 1)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.drop_all()
        await self._exit_stack.aclose()

    @property
    def connections(self) -> int:
        """Sockets accepted so far."""
        return len(self.listens)

    @property
    def keepalives(self) -> int:
        """`KeepAlive` messages received on all sockets."""
        return sum(listen.controls.count("KeepAlive") for listen in self.listens)

    @property
    def closed_cleanly(self) -> int:
        """Sockets whose client sent `CloseStream`."""
        return sum("CloseStream" in listen.controls for listen in self.listens)

    @property
    def queries(self) -> list[dict[str, str]]:
        """Each accepted socket's query parameters, in order."""
        return [listen.query for listen in self.listens]

    @property
    def bytes_received(self) -> list[int]:
        """Audio bytes received on each accepted socket, in order."""
        return [listen.bytes_received for listen in self.listens]

    async def drop_all(self) -> None:
        """Cut every live socket without a close handshake, as a network failure would."""
        for ws, transport in list(self._live.items()):
            if transport is not None:
                transport.abort()
            else:
                await ws.close(code=1011, message=b"NET-0000")
        await asyncio.sleep(0)

    # ------------------------------------------------------------------------------------------- the route

    async def _listen(self, request: web.Request) -> web.StreamResponse:
        if self.refuse:
            self.refused += 1
            return web.Response(status=503, text="Service Unavailable")
        if request.headers.get("Authorization") != f"Token {self.api_key}":
            self.refused += 1
            return web.json_response(
                {"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials.", "request_id": str(uuid.uuid4())},
                status=401,
            )
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        listen = FakeListenConnection(
            query={key: request.query[key] for key in request.query},
            query_lists={key: request.query.getall(key) for key in request.query},
            headers=dict(request.headers),
        )
        self.listens.append(listen)
        self._live[ws] = request.transport
        recognizer = _Recognizer(listen.query, peek=self._peek_transcript, take=self._take_transcript)
        outbox: asyncio.Queue[_Outgoing] = asyncio.Queue()
        writer = asyncio.create_task(self._write(ws, listen, outbox))
        ended_by_us = False
        try:
            while not ended_by_us:
                try:
                    message = await ws.receive(timeout=self.idle_timeout_seconds)
                except TimeoutError:
                    outbox.put_nowait(_Close(1011, "NET-0001"))  # Deepgram's idle timeout
                    ended_by_us = True
                    break
                if message.type == WSMsgType.BINARY:
                    listen.bytes_received += len(message.data)
                    listen.audio_messages += 1
                    self._post(outbox, recognizer.hear(message.data))
                elif message.type == WSMsgType.TEXT:
                    ended_by_us = self._control(message.data, listen, recognizer, outbox)
                else:
                    break  # closed by the client, or cut
        finally:
            self._live.pop(ws, None)
            if ended_by_us:
                await writer
            else:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
        return ws

    def _control(
        self, text: str, listen: FakeListenConnection, recognizer: _Recognizer, outbox: asyncio.Queue[_Outgoing]
    ) -> bool:
        """Handle one text message; True when the socket is to be closed."""
        try:
            kind = str(json.loads(text).get("type"))
        except (ValueError, AttributeError):
            kind = "<not JSON>"
        listen.controls.append(kind)
        match kind:
            case "Finalize":
                self._post(outbox, [recognizer.finalize(from_finalize=True)], extra_ms=self.finalize_delay_ms)
            case "CloseStream":
                self._post(outbox, [*recognizer.finish(), recognizer.metadata()])
                outbox.put_nowait(_Close(1000, ""))
                return True
            case "KeepAlive":
                pass
            case _:
                error = {"type": "Error", "variant": "SchemaError", "description": f"unknown message type {kind!r}"}
                self._post(outbox, [error])
        return False

    def _post(self, outbox: asyncio.Queue[_Outgoing], messages: list[dict[str, Any]], *, extra_ms: int = 0) -> None:
        now = asyncio.get_running_loop().time()
        for message in messages:
            results = message["type"] == "Results"
            endpointed = results and message["is_final"] and not message["from_finalize"] and extra_ms == 0
            delay_ms = extra_ms + (self.result_delay_ms if results else 0) + (self.final_delay_ms if endpointed else 0)
            delay = delay_ms / 1000
            if message["type"] == "Results" and self.garbage:
                outbox.put_nowait(_Message(now + delay, self.garbage.popleft()))
            outbox.put_nowait(_Message(now + delay, message))

    async def _write(
        self, ws: web.WebSocketResponse, listen: FakeListenConnection, outbox: asyncio.Queue[_Outgoing]
    ) -> None:
        # One writer keeps the order; a delayed Results holds back what follows it, as a slow server would.
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionError):
            while True:
                item = await outbox.get()
                if isinstance(item, _Close):
                    listen.close_code = item.code
                    await ws.close(code=item.code, message=item.reason.encode())
                    return
                if (wait := item.due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if self.mute:
                    continue
                if isinstance(item.payload, str):
                    await ws.send_str(item.payload)  # garbage, as it is
                    continue
                listen.sent.append(item.payload)
                await ws.send_str(json.dumps(item.payload))

    def _peek_transcript(self) -> str:
        return self.transcripts[0] if self.transcripts else self.default_transcript

    def _take_transcript(self) -> str:
        return self.transcripts.popleft() if self.transcripts else self.default_transcript


@dataclass(frozen=True, slots=True)
class _Message:
    due: float
    payload: dict[str, Any] | str


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


_Outgoing = _Message | _Close


class _Recognizer:
    """One socket's listener: an energy detector on 20 ms windows, and the messages Deepgram would send (sans I/O)."""

    def __init__(self, query: dict[str, str], *, peek: Callable[[], str], take: Callable[[], str]) -> None:
        endpointing = query.get("endpointing", str(DEFAULT_ENDPOINTING_MS))
        self._endpointing_ms = None if endpointing == "false" else int(endpointing)
        self._interim = query.get("interim_results") == "true"
        self._vad_events = query.get("vad_events") == "true"
        utterance_end = query.get("utterance_end_ms")
        self._utterance_end_ms = int(utterance_end) if utterance_end and self._interim else None
        self._model = query.get("model", "nova-3")
        self._peek = peek
        self._take = take
        self._request_id = str(uuid.uuid4())
        self._pending = bytearray()
        self._cursor_ms = 0  # audio heard on this socket
        self._segment_start_ms = 0  # where the next final result's span begins
        self._speech_start_ms: int | None = None  # in speech since then
        self._speech_end_ms = 0
        self._announced = False
        self._interims = 0
        self._last_word_end_ms: int | None = None  # words finalized, UtteranceEnd not sent yet
        self._parts: deque[str] = deque()  # the rest of a scripted transcript with ` | ` pauses
        self._finalized_at_ms: int | None = None  # speech end a `Finalize` covered, speech_final not sent yet

    def hear(self, ulaw: bytes) -> list[dict[str, Any]]:
        """Take audio; return what Deepgram would say about each 20 ms window it completes."""
        self._pending += ulaw
        whole = len(self._pending) - len(self._pending) % FRAME_BYTES
        if whole == 0:
            return []
        windows = ulaw_to_pcm16(self._pending[:whole]).astype(np.float64).reshape(-1, FRAME_BYTES)
        del self._pending[:whole]
        loud = (windows**2).mean(axis=1) > SPEECH_RMS**2
        out: list[dict[str, Any]] = []
        for voiced in loud.tolist():
            self._window(bool(voiced), out)
        return out

    def _window(self, voiced: bool, out: list[dict[str, Any]]) -> None:
        start = self._cursor_ms
        self._cursor_ms = now = start + FRAME_MS
        if voiced:
            if self._speech_start_ms is None:
                self._speech_start_ms = start
                self._announced = False
                self._interims = 0
                self._finalized_at_ms = None
            self._speech_end_ms = now
            speech_ms = now - self._speech_start_ms
            if speech_ms >= MIN_SPEECH_MS and not self._announced:
                self._announced = True
                self._last_word_end_ms = None  # the caller went on: no UtteranceEnd for the words before
                if self._vad_events:
                    out.append({"type": "SpeechStarted", "channel": [0, 1], "timestamp": self._speech_start_ms / 1000})
            if self._interim and speech_ms >= INTERIM_EVERY_MS * (self._interims + 1):
                self._interims += 1
                words = self._next_text(peek=True).split()[: self._interims]
                out.append(self._results(" ".join(words), [], is_final=False))
            return
        if self._speech_start_ms is not None:
            quiet_ms = now - self._speech_end_ms
            if quiet_ms >= (self._endpointing_ms or UNENDPOINTED_FINAL_MS):
                if self._speech_end_ms - self._speech_start_ms < MIN_SPEECH_MS:
                    self._speech_start_ms = None  # a click or a cough: nothing to say
                else:
                    out.append(self._final(speech_final=self._endpointing_ms is not None))
        finalized_at = self._finalized_at_ms
        if finalized_at is not None and self._endpointing_ms is not None and now - finalized_at >= self._endpointing_ms:
            self._finalized_at_ms = None  # the pause a Finalize cut short is now an endpoint too
            out.append(self._results("", [], is_final=True, speech_final=True))
            self._segment_start_ms = self._cursor_ms
        last_word_end = self._last_word_end_ms
        if last_word_end is not None and self._utterance_end_ms and now - last_word_end >= self._utterance_end_ms:
            out.append({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": last_word_end / 1000})
            self._last_word_end_ms = None

    def finalize(self, *, from_finalize: bool) -> dict[str, Any]:
        """The final result for the speech in progress (empty if none), as after a `Finalize`."""
        if self._speech_start_ms is not None and self._speech_end_ms - self._speech_start_ms >= MIN_SPEECH_MS:
            self._finalized_at_ms = self._speech_end_ms
            return self._final(speech_final=False, from_finalize=from_finalize)
        self._speech_start_ms = None
        result = self._results("", [], is_final=True, from_finalize=from_finalize)
        self._segment_start_ms = self._cursor_ms
        return result

    def finish(self) -> list[dict[str, Any]]:
        """What is left to say at `CloseStream`: the final result for speech in progress, if any."""
        if self._speech_start_ms is not None and self._speech_end_ms - self._speech_start_ms >= MIN_SPEECH_MS:
            return [self._final(speech_final=False)]
        return []

    def _next_text(self, *, peek: bool) -> str:
        """The words of the speech in progress: the next part of a transcript with ` | ` pauses, or the next one."""
        if self._parts:
            return self._parts[0] if peek else self._parts.popleft()
        if peek:
            return self._peek().split(" | ")[0].strip()
        first, *rest = (part.strip() for part in self._take().split(" | "))
        self._parts.extend(rest)
        return first

    def metadata(self) -> dict[str, Any]:
        """The `Metadata` message Deepgram sends before it closes the stream."""
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self._request_id,
            "sha256": "0" * 64,
            "created": datetime.now(UTC).isoformat(),
            "duration": self._cursor_ms / 1000,
            "channels": 1,
        }

    def _final(self, *, speech_final: bool, from_finalize: bool = False) -> dict[str, Any]:
        assert self._speech_start_ms is not None
        text = self._next_text(peek=False)
        words = text.split()
        start, end = self._speech_start_ms, self._speech_end_ms
        step = (end - start) / max(len(words), 1)
        timed = [
            {
                "word": word.lower().strip(".,!?"),
                "start": (start + i * step) / 1000,
                "end": (start + (i + 1) * step) / 1000,
                "confidence": 0.99,
                "punctuated_word": word,
            }
            for i, word in enumerate(words)
        ]
        result = self._results(text, timed, is_final=True, speech_final=speech_final, from_finalize=from_finalize)
        self._segment_start_ms = self._cursor_ms
        self._speech_start_ms = None
        self._last_word_end_ms = end
        return result

    def _results(
        self,
        text: str,
        words: list[dict[str, Any]],
        *,
        is_final: bool,
        speech_final: bool = False,
        from_finalize: bool = False,
    ) -> dict[str, Any]:
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": (self._cursor_ms - self._segment_start_ms) / 1000,
            "start": self._segment_start_ms / 1000,
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {"alternatives": [{"transcript": text, "confidence": 0.99 if text else 0.0, "words": words}]},
            "metadata": {
                "request_id": self._request_id,
                "model_info": {"name": f"general-{self._model}", "version": "2024-01-01.0", "arch": self._model},
                "model_uuid": str(uuid.UUID(int=0)),
            },
        }
