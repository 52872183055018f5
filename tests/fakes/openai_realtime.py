"""A fake OpenAI Realtime API (GA) on loopback: mu-law in and out, an energy VAD, scripted replies and tool calls.

`async with FakeRealtime() as fake:` serves `ws://127.0.0.1:<port>/v1/realtime?model=…`; point
`AsyncOpenAI(base_url=fake.base_url)` at it. The fake hears caller audio (`input_audio_buffer.append`, mu-law
base64) with a VAD on audio time, answers each caller turn, or each `response.create`, with the next scripted
`Reply` (a sine tone lasting `ms_per_char` per character, each reply in the next pitch of `VOICE_HZ`, sent in
chunks faster than real time, with its transcript), transcribes the caller's turns word by word
(`conversation.item.input_audio_transcription.delta`, then `.completed`) when the session asks for transcription,
cancels a reply the caller talks over, refuses a `session.update` naming a voice the API does not know (an `error`
naming the update's event id and the field, the session left as it was) and one naming the voice once the model
has spoken (the API does not let it change then; whether it lets the same voice be named again is not documented,
so the fake does not), applies an update after `confirm_delay_ms`, and records every client event in `received`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
from collections import deque
from collections.abc import Coroutine, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from media.g711 import BYTES_PER_MS, FRAME_MS, SAMPLE_RATE, pcm16_to_ulaw, ulaw_to_pcm16
from tests.fakes.server import serve

DEFAULT_SILENCE_MS = 500
"""server_vad's silence_duration_ms when the session names none."""
VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"})
"""The voices the API knows; a `session.update` naming another is refused (`invalid_value`) and not applied."""
RATE_LIMITS = [
    {"name": "requests", "limit": 1000, "remaining": 999, "reset_seconds": 0.06},
    {"name": "tokens", "limit": 40000, "remaining": 39000, "reset_seconds": 1.5},
]
"""What `rate_limits.updated` says after each response (the API sends it then; a call has nothing to do with it)."""
VOICE_HZ = (440, 550, 660)
"""The pitches of the model's voice, one reply after the other: a test can tell replies apart in what was heard."""


@dataclass(frozen=True)
class Reply:
    """What the model says next: `text` (spoken), then its function `calls` (name, arguments) in order; arguments
    given as a string are sent as they are (the model's JSON, which may be malformed)."""

    text: str | None = None
    calls: tuple[tuple[str, Mapping[str, Any] | str], ...] = ()
    failure: Mapping[str, str] | None = None
    """The reply fails instead (`response.done` with status `failed` and this error: type, code, message)."""


@dataclass
class Truncation:
    """A `conversation.item.truncate` as the fake judged it: where the client cut, and how much audio the item had."""

    item_id: str
    audio_end_ms: int
    item_audio_ms: int
    accepted: bool


@dataclass
class _Vad:
    """Energy VAD on audio time: speech after `min_speech_ms` loud, over after `silence_ms` quiet."""

    threshold: float
    min_speech_ms: int
    audio_ms: int = 0
    speaking: bool = False
    loud_ms: int = 0
    quiet_ms: int = 0

    def process(self, ulaw: bytes, silence_ms: int) -> list[tuple[str, int]]:
        """Feed audio; return ("start", audio_start_ms) and ("stop", audio_end_ms) as they happen."""
        events: list[tuple[str, int]] = []
        pcm = ulaw_to_pcm16(ulaw).astype(np.int32)
        step = FRAME_MS * SAMPLE_RATE // 1000
        for start in range(0, len(pcm), step):
            frame = pcm[start : start + step]
            ms = len(frame) * 1000 // SAMPLE_RATE
            self.audio_ms += ms
            loud = float(np.abs(frame).mean()) > self.threshold
            if not self.speaking:
                self.loud_ms = self.loud_ms + ms if loud else 0
                if self.loud_ms >= self.min_speech_ms:
                    self.speaking, self.quiet_ms = True, 0
                    events.append(("start", self.audio_ms - self.loud_ms))
            else:
                self.quiet_ms = 0 if loud else self.quiet_ms + ms
                if self.quiet_ms >= silence_ms:
                    self.speaking, self.loud_ms = False, 0
                    events.append(("stop", self.audio_ms))
        return events


class FakeRealtime:
    """OpenAI Realtime on 127.0.0.1, driven by scripted replies (`reply`, `reply_tool`) and caller transcripts."""

    def __init__(
        self,
        *,
        api_key: str = "sk-fake-realtime",
        ms_per_char: int = 25,
        first_audio_delay_ms: int = 50,
        chunk_ms: int = 100,
        speedup: float = 5.0,
        in_flight_deltas: int = 0,
        transcription_delay_ms: int = 30,
        default_reply: str = "How can I help?",
        vad_threshold: float = 500.0,
        min_speech_ms: int = 60,
    ) -> None:
        """Create the fake.

        Audio is sent `speedup` times faster than real time. After a cancel, `in_flight_deltas` more audio deltas of
        the cancelled reply still go out (they were on the wire already), as a real server's may.
        """
        self.api_key = api_key
        self.ms_per_char = ms_per_char
        self.first_audio_delay_ms = first_audio_delay_ms
        self.chunk_ms = chunk_ms
        self.speedup = speedup
        self.in_flight_deltas = in_flight_deltas
        self.transcription_delay_ms = transcription_delay_ms
        self.default_reply = default_reply
        self.vad_threshold = vad_threshold
        self.min_speech_ms = min_speech_ms
        self.base_url = ""
        """`http://127.0.0.1:<port>/v1`, set on entering; the SDK derives `ws://…/v1/realtime` from it."""
        self.received: list[dict[str, Any]] = []
        """Every client event, in order (audio appends included)."""
        self.models: list[str] = []
        """The `model` of each accepted connection."""
        self.refused = 0
        """Connections refused for a wrong or missing key."""
        self.sent: list[dict[str, Any]] = []
        """Every server event sent, in order (audio deltas included)."""
        self.truncations: list[Truncation] = []
        self.confirm_delay_ms = 0
        """How long the server takes to apply a `session.update` (and answer `session.updated`)."""
        self.response_created_delay_ms = 0
        """How long a response the server started reaches the client as `response.created` (the network's latency):
        a `response.create` that comes meanwhile is refused, a response being under way already."""
        self.refused_update: Mapping[str, str] | None = None
        """When set, every `session.update` is refused with this error (code, message, param), as the API refuses
        one it finds invalid."""
        self._replies: deque[Reply] = deque()
        self._transcripts: deque[str] = deque()
        self._sockets: set[web.WebSocketResponse] = set()
        self._transports: set[asyncio.Transport] = set()
        self._ids = itertools.count(1)
        self._pitches = itertools.cycle(VOICE_HZ)
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> FakeRealtime:
        """Start serving."""
        app = web.Application()
        app.router.add_get("/v1/realtime", self._realtime)
        self.base_url = await self._stack.enter_async_context(serve(app)) + "/v1"
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Close the sockets still open (1001) and stop serving."""
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY)
        await self._stack.aclose()

    # Script

    def reply(self, text: str) -> None:
        """The model's next reply says `text`."""
        self._replies.append(Reply(text=text))

    def reply_tool(self, name: str, arguments: Mapping[str, Any] | str, *, text: str | None = None) -> None:
        """The model's next reply (after saying `text`, if given) calls function `name`."""
        self._replies.append(Reply(text=text, calls=((name, arguments),)))

    def reply_tools(self, *calls: tuple[str, Mapping[str, Any] | str], text: str | None = None) -> None:
        """The model's next reply (after saying `text`, if given) calls these functions, one after the other."""
        self._replies.append(Reply(text=text, calls=calls))

    def reply_fails(self, code: str = "server_error", message: str = "The server had an error.") -> None:
        """The model's next reply fails before it says anything (as on a rate limit or a server error)."""
        self._replies.append(Reply(failure={"type": code, "code": code, "message": message}))

    def caller_says(self, transcript: str) -> None:
        """The transcript of the caller's next turn (default "hello")."""
        self._transcripts.append(transcript)

    # What happened

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        """The client events of one type, in order."""
        return [event for event in self.received if event.get("type") == event_type]

    def sent_of_type(self, event_type: str) -> list[dict[str, Any]]:
        """The server events of one type, in order."""
        return [event for event in self.sent if event.get("type") == event_type]

    def audio_ms(self, event_type: str = "response.output_audio.delta") -> int:
        """Milliseconds of reply audio sent so far."""
        return sum(len(base64.b64decode(event["delta"])) for event in self.sent_of_type(event_type)) // BYTES_PER_MS

    def duration_ms(self, text: str) -> int:
        """How long the fake's speech of `text` lasts."""
        return self.ms_per_char * len(text)

    @property
    def open_sessions(self) -> int:
        """Connections still open."""
        return len(self._sockets)

    async def drop_all(self) -> None:
        """Drop every open connection abruptly: no close frame, as when the network fails."""
        for transport in list(self._transports):
            transport.abort()

    # The WebSocket

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            self.refused += 1
            error = {"type": "invalid_request_error", "code": "invalid_api_key", "message": "Incorrect API key."}
            return web.json_response({"error": error}, status=401)
        self.models.append(request.query.get("model", ""))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.add(ws)
        transport = request.transport
        if isinstance(transport, asyncio.Transport):
            self._transports.add(transport)
        connection = _Connection(self, ws)
        try:
            await connection.run()
        finally:
            await connection.stop()
            self._sockets.discard(ws)
            if isinstance(transport, asyncio.Transport):
                self._transports.discard(transport)
        return ws

    def next_id(self, prefix: str) -> str:
        """A new id such as `item_7`."""
        return f"{prefix}_{next(self._ids)}"

    def next_reply(self) -> Reply:
        """The next scripted reply, or the default one."""
        return self._replies.popleft() if self._replies else Reply(text=self.default_reply)

    def next_transcript(self) -> str:
        """The next scripted caller transcript, or "hello"."""
        return self._transcripts.popleft() if self._transcripts else "hello"

    def tone(self, ms: int) -> bytes:
        """A tone of `ms` milliseconds in mu-law, in the next pitch: the model's voice saying one reply."""
        samples = np.arange(ms * SAMPLE_RATE // 1000)
        hz = next(self._pitches)
        return pcm16_to_ulaw((6000 * np.sin(2 * np.pi * hz * samples / SAMPLE_RATE)).astype(np.int16))


class _Connection:
    """One Realtime session of the fake."""

    def __init__(self, fake: FakeRealtime, ws: web.WebSocketResponse) -> None:
        self.fake = fake
        self.ws = ws
        self.session: dict[str, Any] = {"type": "realtime", "audio": {"input": {}, "output": {}}}
        self.vad = _Vad(fake.vad_threshold, fake.min_speech_ms)
        self.item_audio_ms: dict[str, int] = {}
        self.speech_item: str | None = None
        self.response: asyncio.Task[None] | None = None
        self.cancelling = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.lock = asyncio.Lock()

    async def run(self) -> None:
        await self.send({"type": "session.created", "session": self.session})
        async for message in self.ws:
            if message.type is not WSMsgType.TEXT:
                return
            event = json.loads(message.data)
            self.fake.received.append(event)
            await self.handle(event)

    async def stop(self) -> None:
        tasks = [*self.tasks, *([self.response] if self.response else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def send(self, event: dict[str, Any]) -> None:
        event = {"event_id": self.fake.next_id("event"), **event}
        self.fake.sent.append(event)
        async with self.lock:
            await self.ws.send_str(json.dumps(event))

    async def error(self, code: str, message: str, event: Mapping[str, Any], *, param: str | None = None) -> None:
        await self.send(
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "code": code,
                    "message": message,
                    "param": param,
                    "event_id": event.get("event_id"),
                },
            }
        )

    # Client events

    async def handle(self, event: dict[str, Any]) -> None:
        match event.get("type"):
            case "session.update" if self.fake.confirm_delay_ms:
                self.spawn(self.update_session(event, delay_ms=self.fake.confirm_delay_ms))
            case "session.update":
                await self.update_session(event)
            case "input_audio_buffer.append":
                await self.hear(base64.b64decode(event["audio"]))
            case "response.create":
                if self.generating:
                    await self.error("conversation_already_has_active_response", "A response is in progress.", event)
                else:
                    self.start_response(event.get("response") or {})
            case "response.cancel":
                if self.generating and not self.cancelling:
                    self.cancelling = True
                else:
                    await self.error("response_cancel_not_active", "There is no active response to cancel.", event)
            case "conversation.item.create":
                item = dict(event.get("item") or {})
                item.setdefault("id", self.fake.next_id("item"))
                await self.send({"type": "conversation.item.added", "item": item})
            case "conversation.item.truncate":
                await self.truncate(event)
            case other:
                await self.error("unknown_event", f"Unknown client event {other!r}.", event)

    async def update_session(self, event: dict[str, Any], *, delay_ms: int = 0) -> None:
        """Apply a `session.update` after `delay_ms` (reading on meanwhile), or refuse a voice the API doesn't know."""
        await asyncio.sleep(delay_ms / 1000)
        if self.fake.refused_update is not None:
            refusal = self.fake.refused_update
            await self.error(refusal["code"], refusal["message"], event, param=refusal.get("param"))
            return
        session = event.get("session") or {}
        voice = ((session.get("audio") or {}).get("output") or {}).get("voice")
        if voice is not None and voice not in VOICES:
            supported = ", ".join(f"'{name}'" for name in sorted(VOICES))
            message = f"Invalid value: '{voice}'. Supported values are: {supported}."
            await self.error("invalid_value", message, event, param="session.audio.output.voice")
            return
        if voice is not None and any(self.item_audio_ms.values()):
            message = "Cannot update a conversation's voice if assistant audio is present."
            await self.error("cannot_update_voice", message, event, param="session.audio.output.voice")
            return
        self.session.update(session)
        await self.send({"type": "session.updated", "session": self.session})

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run part of the session's work beside the reading of client events (cancelled when the session ends)."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def truncate(self, event: dict[str, Any]) -> None:
        item_id, audio_end_ms = str(event.get("item_id")), int(event.get("audio_end_ms", 0))
        item_ms = self.item_audio_ms.get(item_id)
        accepted = item_ms is not None and 0 <= audio_end_ms <= item_ms
        self.fake.truncations.append(Truncation(item_id, audio_end_ms, item_ms or 0, accepted))
        if item_ms is None:
            await self.error("item_truncate_invalid_item_id", f"No assistant item {item_id!r}.", event)
        elif not accepted:
            message = f"audio_end_ms {audio_end_ms} is longer than the item's audio ({item_ms} ms)."
            await self.error("invalid_value", message, event)
        else:
            await self.send(
                {
                    "type": "conversation.item.truncated",
                    "item_id": item_id,
                    "content_index": 0,
                    "audio_end_ms": audio_end_ms,
                }
            )

    # Turn detection

    @property
    def generating(self) -> bool:
        return self.response is not None and not self.response.done()

    @property
    def input(self) -> dict[str, Any]:
        audio = self.session.get("audio") or {}
        return dict(audio.get("input") or {})

    @property
    def turn_detection(self) -> dict[str, Any]:
        return dict(self.input.get("turn_detection") or {})

    async def hear(self, ulaw: bytes) -> None:
        detection = self.turn_detection
        silence_ms = int(detection.get("silence_duration_ms", DEFAULT_SILENCE_MS))
        for kind, at_ms in self.vad.process(ulaw, silence_ms):
            if kind == "start":
                self.speech_item = self.fake.next_id("item")
                await self.send(
                    {"type": "input_audio_buffer.speech_started", "audio_start_ms": at_ms, "item_id": self.speech_item}
                )
                if self.generating and detection.get("interrupt_response", True):
                    self.cancelling = True
            else:
                await self.caller_turn_ended(at_ms, detection)

    async def caller_turn_ended(self, at_ms: int, detection: Mapping[str, Any]) -> None:
        item_id = self.speech_item or self.fake.next_id("item")
        self.speech_item = None
        await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": at_ms, "item_id": item_id})
        await self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": None})
        item = {"id": item_id, "type": "message", "role": "user", "content": [{"type": "input_audio"}]}
        await self.send({"type": "conversation.item.added", "item": item})
        if self.input.get("transcription"):
            self.spawn(self.transcribe(item_id))
        if detection.get("create_response", True) and not self.generating:
            self.start_response()

    async def transcribe(self, item_id: str) -> None:
        """The turn's transcript word by word (`.delta`, as the API streams it), then whole (`.completed`)."""
        transcript = self.fake.next_transcript()
        words = re.findall(r"\s*\S+", transcript)
        step = self.fake.transcription_delay_ms / 1000 / (len(words) + 1)
        for word in words:
            await asyncio.sleep(step)
            await self.send(
                {
                    "type": "conversation.item.input_audio_transcription.delta",
                    "item_id": item_id,
                    "content_index": 0,
                    "delta": word,
                }
            )
        await asyncio.sleep(step)
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item_id,
                "content_index": 0,
                "transcript": transcript,
            }
        )

    # Responses

    def start_response(self, asked: Mapping[str, Any] | None = None) -> None:
        """Start a response: the server VAD's for a caller's turn, or the one a `response.create` asked for (its
        `metadata` comes back in the response, as the API's does)."""
        self.cancelling = False
        metadata = dict((asked or {}).get("metadata") or {})
        self.response = asyncio.create_task(self.respond(self.fake.next_id("resp"), metadata))

    async def respond(self, response_id: str, metadata: Mapping[str, Any]) -> None:
        reply = self.fake.next_reply()
        await asyncio.sleep(self.fake.response_created_delay_ms / 1000)
        created = {"id": response_id, "status": "in_progress", "metadata": dict(metadata) or None}
        await self.send({"type": "response.created", "response": created})
        output: list[dict[str, Any]] = []
        status = "completed"
        if reply.failure is not None:
            details = {"type": "failed", "error": dict(reply.failure)}
            response = {"id": response_id, "object": "realtime.response", "status": "failed", "output": output}
            await self.send({"type": "response.done", "response": {**response, "status_details": details}})
            return
        if reply.text:
            item = await self.speak(response_id, reply.text)
            output.append(item)
            if item["status"] == "incomplete":
                status = "cancelled"
        for name, arguments in reply.calls if status == "completed" else ():
            output.append(await self.call(response_id, len(output), name, arguments))
        response = {"id": response_id, "object": "realtime.response", "status": status, "output": output}
        await self.send({"type": "response.done", "response": response})
        await self.send({"type": "rate_limits.updated", "rate_limits": RATE_LIMITS})

    async def speak(self, response_id: str, text: str) -> dict[str, Any]:
        fake = self.fake
        item_id = fake.next_id("item")
        self.item_audio_ms[item_id] = 0
        item: dict[str, Any] = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress"}
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        await self.send({"type": "response.output_item.added", "response_id": response_id, "item": item})
        await asyncio.sleep(fake.first_audio_delay_ms / 1000)
        audio = fake.tone(fake.duration_ms(text))
        step = fake.chunk_ms * BYTES_PER_MS
        chunks = [audio[start : start + step] for start in range(0, len(audio), step)]
        words = text.split(" ")
        said_words = 0
        in_flight = fake.in_flight_deltas
        for index, chunk in enumerate(chunks):
            if self.cancelling:
                if in_flight == 0:
                    break
                in_flight -= 1
            await self.send({"type": "response.output_audio.delta", **where, "delta": base64.b64encode(chunk).decode()})
            self.item_audio_ms[item_id] += len(chunk) // BYTES_PER_MS
            upto = round((index + 1) / len(chunks) * len(words))
            if upto > said_words:
                delta = " ".join(words[said_words:upto]) + (" " if upto < len(words) else "")
                await self.send({"type": "response.output_audio_transcript.delta", **where, "delta": delta})
                said_words = upto
            await asyncio.sleep(fake.chunk_ms / fake.speedup / 1000)
        transcript = " ".join(words[:said_words])
        item["status"] = "incomplete" if self.cancelling else "completed"
        item["content"] = [{"type": "output_audio", "transcript": transcript}]
        await self.send({"type": "response.output_audio.done", **where})
        await self.send({"type": "response.output_audio_transcript.done", **where, "transcript": transcript})
        await self.send({"type": "response.output_item.done", "response_id": response_id, "item": item})
        return item

    async def call(
        self, response_id: str, output_index: int, name: str, given: Mapping[str, Any] | str
    ) -> dict[str, Any]:
        """A function call: its item, its arguments streamed in pieces (`.delta`), then whole (`.done`)."""
        item_id, call_id = self.fake.next_id("item"), self.fake.next_id("call")
        arguments = given if isinstance(given, str) else json.dumps(dict(given))
        item = {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": ""}
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": response_id,
                "output_index": output_index,
                "item": item,
            }
        )
        where = {"response_id": response_id, "item_id": item_id, "output_index": output_index, "call_id": call_id}
        for start in range(0, len(arguments), 8):
            piece = arguments[start : start + 8]
            await self.send({"type": "response.function_call_arguments.delta", **where, "delta": piece})
        await self.send(
            {"type": "response.function_call_arguments.done", **where, "name": name, "arguments": arguments}
        )
        item = {**item, "arguments": arguments, "status": "completed"}
        await self.send({"type": "response.output_item.done", "response_id": response_id, "item": item})
        return item
