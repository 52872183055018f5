"""OpenAI Realtime (GA) over the SDK's WebSocket: a phone call's session, the events it acts on, the ones it sends.

Twilio's mu-law goes in and comes out as it is (`audio/pcmu` both ways), so nothing is transcoded. Server events
are read as raw JSON and turned into the few small typed events below through a table keyed by event type (the
SDK's pydantic models cost more per audio delta than a call can spare); the rest are skipped. Client events are
sent as prebuilt JSON through the SDK connection, which owns the URL, the headers and the key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from openai import AsyncOpenAI, OpenAIError
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from config.agent import OpenAIRealtimeConfig
from pipelines.errors import RealtimeError
from pipelines.tools import FunctionSpec, realtime_tools

__all__ = [
    "AudioDelta",
    "AudioDone",
    "CallerTranscript",
    "CallerTranscriptDelta",
    "CallerTranscriptFailed",
    "FunctionCall",
    "OutputItemAdded",
    "RealtimeChannel",
    "RealtimeConnectionLost",
    "RealtimeError",
    "RealtimeEvent",
    "RealtimeResponseFailed",
    "RealtimeSessionRefused",
    "RealtimeUnavailable",
    "RealtimeUpdateRefused",
    "ResponseCreated",
    "ResponseDone",
    "ServerError",
    "SessionUpdated",
    "SpeechStarted",
    "SpeechStopped",
    "TranscriptDelta",
    "TranscriptDone",
    "open_realtime",
    "parse_event",
    "say_exactly",
    "session_update",
]

log = logging.getLogger(__name__)

MULAW: Final = {"type": "audio/pcmu"}
"""G.711 mu-law at 8 kHz, Twilio's own format, for input and output."""

CLOSE_TIMEOUT_SECONDS: Final = 2.0
"""How long closing waits for the server's close frame; the call is over either way."""

SESSION_CONFIRM_SECONDS: Final = 5.0
"""How long opening a session waits for the server to apply its `session.update` (it answers in moments)."""

CANCEL_WAIT_SECONDS: Final = 2.0
"""How long a `response.create` waits for the server to end the responses just cancelled (it ends them in moments,
and refuses a second response meanwhile: `conversation_already_has_active_response`)."""

ANSWER_WAIT_SECONDS: Final = 10.0
"""How long a `response.create` waits for the server to finish generating a response it is giving (one its VAD
started for the caller, say, while a function ran): generation runs ahead of playback, so it ends in seconds."""

_APPEND_PREFIX: Final = '{"type":"input_audio_buffer.append","audio":"'


# --------------------------------------------------------------------------------------------------- errors


class RealtimeUnavailable(RealtimeError):
    """The Realtime API could not be reached or refused the connection; the call cannot start on it."""


class RealtimeSessionRefused(RealtimeUnavailable):
    """The server refused the session's configuration (e.g. an unknown voice): it would run on its defaults instead,
    another audio format than Twilio's, so the call cannot start on it."""


class RealtimeConnectionLost(RealtimeError):
    """The Realtime connection closed during the call."""


class RealtimeResponseFailed(RealtimeConnectionLost):
    """The server failed a response (a rate limit, a server error): the session is taken for lost, like a closed one."""


class RealtimeUpdateRefused(RealtimeConnectionLost):
    """The server refused a `session.update` during the call (the path's next node, the callee's hello): the session
    no longer runs as the call needs, so it is taken for lost, like a closed one."""


def session_update(
    config: OpenAIRealtimeConfig,
    *,
    instructions: str,
    tools: Sequence[FunctionSpec] = (),
    interrupt_response: bool = True,
    create_response: bool = True,
    voice: bool = True,
) -> dict[str, Any]:
    """The GA `session.update` for a phone call: mu-law in and out, the configured turn detection, voice and tools.

    `interrupt_response` lets the server cancel its reply when the caller starts talking (barge-in enabled);
    `create_response` lets it answer each caller turn by itself (off while the engine waits for a callee's hello).
    Without `voice`, the update leaves the session's voice as it is: the API does not let it change once the model
    has spoken, so only a session's first update names it.
    """
    turn_detection: dict[str, Any] = {
        "type": config.turn_detection,
        "create_response": create_response,
        "interrupt_response": interrupt_response,
    }
    if config.turn_detection == "server_vad" and config.silence_duration_ms is not None:
        turn_detection["silence_duration_ms"] = config.silence_duration_ms
    if config.turn_detection == "semantic_vad" and config.eagerness is not None:
        turn_detection["eagerness"] = config.eagerness
    audio_input: dict[str, Any] = {"format": dict(MULAW), "turn_detection": turn_detection}
    if config.transcription_model:
        audio_input["transcription"] = {"model": config.transcription_model}
        if config.language:
            audio_input["transcription"]["language"] = config.language
    audio_output: dict[str, Any] = {"format": dict(MULAW)}
    if voice:
        audio_output["voice"] = config.voice
    if config.speed is not None:
        audio_output["speed"] = config.speed
    session: dict[str, Any] = {
        "type": "realtime",
        "model": config.model,
        "instructions": instructions,
        "output_modalities": ["audio"],
        "audio": {"input": audio_input, "output": audio_output},
    }
    if tools:
        session["tools"] = realtime_tools(tools)
        session["tool_choice"] = "auto"
    return {"type": "session.update", "session": session}


def say_exactly(sentence: str) -> str:
    """Response instructions that make the model speak `sentence` word for word (greetings, goodbyes)."""
    return f"Say exactly this sentence, word for word, and nothing else: {json.dumps(sentence, ensure_ascii=False)}"


# --------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The server's VAD heard the caller start talking; `audio_start_ms` counts from the session's first audio."""

    item_id: str
    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """The server's VAD decided the caller stopped talking (its silence included in `audio_end_ms`)."""

    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class CallerTranscript:
    """The transcription of one of the caller's turns."""

    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class CallerTranscriptDelta:
    """More of the transcription of one of the caller's turns, while it is worked out (before CallerTranscript)."""

    item_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class CallerTranscriptFailed:
    """One of the caller's turns could not be transcribed."""

    item_id: str
    message: str


@dataclass(frozen=True, slots=True)
class ResponseCreated:
    """The model started a response; `metadata` is what the `response.create` that asked for it attached (none for
    one the server's VAD started for the caller)."""

    response_id: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OutputItemAdded:
    """A response has a new output item: `message` (speech) or `function_call`."""

    response_id: str
    item_id: str
    item_type: str


@dataclass(frozen=True, slots=True)
class AudioDelta:
    """More of an assistant item's audio, mu-law 8 kHz."""

    response_id: str
    item_id: str
    audio: bytes


@dataclass(frozen=True, slots=True)
class AudioDone:
    """An assistant item's audio is complete."""

    response_id: str
    item_id: str


@dataclass(frozen=True, slots=True)
class TranscriptDelta:
    """More of the transcript of what an assistant item says."""

    response_id: str
    item_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class TranscriptDone:
    """The whole transcript of an assistant item."""

    response_id: str
    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """The model calls a function; `arguments` is JSON text (possibly invalid: models do emit that)."""

    response_id: str
    item_id: str
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ResponseDone:
    """A response ended: `completed`, `cancelled`, `failed` or `incomplete`, with its function calls (and, when it
    failed, the server's error)."""

    response_id: str
    status: str
    function_calls: tuple[FunctionCall, ...]
    error: str = ""


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    """The server applied a `session.update`."""


@dataclass(frozen=True, slots=True)
class ServerError:
    """The server refused a client event; the connection stays open.

    `event_id` names the client event refused (when it carried one), `param` the field at fault (when the server
    says).
    """

    code: str
    message: str
    event_id: str = ""
    param: str = ""

    def __str__(self) -> str:
        """The error as an operator reads it: code, message and the field at fault."""
        where = f" ({self.param})" if self.param else ""
        return f"{self.code}: {self.message}{where}"


RealtimeEvent = (
    SpeechStarted
    | SpeechStopped
    | CallerTranscript
    | CallerTranscriptDelta
    | CallerTranscriptFailed
    | ResponseCreated
    | OutputItemAdded
    | AudioDelta
    | AudioDone
    | TranscriptDelta
    | TranscriptDone
    | FunctionCall
    | ResponseDone
    | SessionUpdated
    | ServerError
)


def _text(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key)
    return value if isinstance(value, str) else ""


def _number(event: Mapping[str, Any], key: str) -> int:
    value = event.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _object(event: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = event.get(key)
    return value if isinstance(value, dict) else {}


def _audio(event: Mapping[str, Any]) -> AudioDelta:
    try:
        audio = base64.b64decode(_text(event, "delta"))
    except (binascii.Error, ValueError):
        log.warning("Realtime audio delta with invalid base64 dropped")
        audio = b""
    return AudioDelta(_text(event, "response_id"), _text(event, "item_id"), audio)


def _function_call(response_id: str, item: Mapping[str, Any]) -> FunctionCall:
    return FunctionCall(
        response_id, _text(item, "id"), _text(item, "call_id"), _text(item, "name"), _text(item, "arguments")
    )


def _response_done(event: Mapping[str, Any]) -> ResponseDone:
    response = _object(event, "response")
    response_id = _text(response, "id")
    output = response.get("output")
    items = [item for item in output if isinstance(item, dict)] if isinstance(output, list) else []
    calls = tuple(_function_call(response_id, item) for item in items if item.get("type") == "function_call")
    error = _object(_object(response, "status_details"), "error")
    code = _text(error, "code") or _text(error, "type")
    message = ": ".join(filter(None, [code, _text(error, "message")]))
    return ResponseDone(response_id, _text(response, "status"), calls, message)


def _response_created(event: Mapping[str, Any]) -> ResponseCreated:
    response = _object(event, "response")
    metadata = {key: value for key, value in _object(response, "metadata").items() if isinstance(value, str)}
    return ResponseCreated(_text(response, "id"), metadata)


def _server_error(event: Mapping[str, Any]) -> ServerError:
    error = _object(event, "error")
    return ServerError(
        _text(error, "code") or _text(error, "type"),
        _text(error, "message"),
        event_id=_text(error, "event_id"),
        param=_text(error, "param"),
    )


_PARSERS: dict[str, Callable[[Mapping[str, Any]], RealtimeEvent]] = {
    "input_audio_buffer.speech_started": lambda e: SpeechStarted(_text(e, "item_id"), _number(e, "audio_start_ms")),
    "input_audio_buffer.speech_stopped": lambda e: SpeechStopped(_text(e, "item_id"), _number(e, "audio_end_ms")),
    "conversation.item.input_audio_transcription.completed": lambda e: CallerTranscript(
        _text(e, "item_id"), _text(e, "transcript")
    ),
    "conversation.item.input_audio_transcription.delta": lambda e: CallerTranscriptDelta(
        _text(e, "item_id"), _text(e, "delta")
    ),
    "conversation.item.input_audio_transcription.failed": lambda e: CallerTranscriptFailed(
        _text(e, "item_id"), _text(_object(e, "error"), "message")
    ),
    "response.created": _response_created,
    "response.output_item.added": lambda e: OutputItemAdded(
        _text(e, "response_id"), _text(_object(e, "item"), "id"), _text(_object(e, "item"), "type")
    ),
    "response.output_audio.delta": _audio,
    "response.output_audio.done": lambda e: AudioDone(_text(e, "response_id"), _text(e, "item_id")),
    "response.output_audio_transcript.delta": lambda e: TranscriptDelta(
        _text(e, "response_id"), _text(e, "item_id"), _text(e, "delta")
    ),
    "response.output_audio_transcript.done": lambda e: TranscriptDone(
        _text(e, "response_id"), _text(e, "item_id"), _text(e, "transcript")
    ),
    "response.function_call_arguments.done": lambda e: FunctionCall(
        _text(e, "response_id"), _text(e, "item_id"), _text(e, "call_id"), _text(e, "name"), _text(e, "arguments")
    ),
    "response.done": _response_done,
    "session.updated": lambda e: SessionUpdated(),
    "error": _server_error,
}


def parse_event(data: str | bytes) -> RealtimeEvent | None:
    """One server event as a typed event, or None for the types a call does not act on (and for garbage, logged)."""
    try:
        event = json.loads(data)
    except ValueError:
        log.warning("Realtime sent a frame that is not JSON; skipped")
        return None
    if not isinstance(event, dict):
        return None
    parser = _PARSERS.get(event.get("type", ""))
    return parser(event) if parser is not None else None


# --------------------------------------------------------------------------------------------------- channel


def _host(client: AsyncOpenAI) -> str:
    url = str(client.websocket_base_url or client.base_url)
    return urlsplit(url).netloc or url


async def open_realtime(client: AsyncOpenAI, model: str) -> RealtimeChannel:
    """Open a Realtime session for `model`; RealtimeUnavailable says why not (never quoting the key)."""
    host = _host(client)
    try:
        connection = await client.realtime.connect(model=model).enter()
    except InvalidStatus as exc:
        status = exc.response.status_code
        hint = ": check the OpenAI API key the agent's realtime uses" if status in (401, 403) else ""
        raise RealtimeUnavailable(f"{host} refused the connection with HTTP {status}{hint}", provider="openai") from exc
    except (InvalidHandshake, InvalidURI, OSError, TimeoutError) as exc:
        raise RealtimeUnavailable(
            f"could not connect to {host}: {type(exc).__name__}: {exc}", provider="openai"
        ) from exc
    except OpenAIError as exc:
        raise RealtimeUnavailable(f"could not connect to {host}: {exc}", provider="openai") from exc
    return RealtimeChannel(connection, host)


class RealtimeChannel:
    """One open Realtime session: the client events a call sends and the server events it reads.

    The SDK's reconnect is not used: a new socket is a new session that has forgotten the conversation, so a drop
    surfaces as RealtimeConnectionLost and the call decides.
    """

    def __init__(self, connection: AsyncRealtimeConnection, host: str) -> None:
        """Wrap an open SDK connection to `host`."""
        self._connection = connection
        self._host = host
        self._active: set[str] = set()  # responses the server has created and not yet ended
        self._cancelled: set[str] = set()  # of those, the ones cancelled
        self._idle = asyncio.Event()  # no response under way
        self._idle.set()
        self._unseen_active = False  # a response.create was refused for a response whose response.created is to come
        self._session_updates = itertools.count(1)
        self._updates_sent: set[str] = set()  # the event ids of the session updates sent, which a refusal names

    async def send_event(self, event: Mapping[str, Any]) -> None:
        """Send any client event."""
        await self._send(json.dumps(event))

    async def update_session(self, update: Mapping[str, Any]) -> str:
        """Send a `session_update` under an event id of its own, which the server's error names if it refuses it;
        that id."""
        event_id = f"session_update_{next(self._session_updates)}"
        self._updates_sent.add(event_id)
        await self.send_event({**update, "event_id": event_id})
        return event_id

    async def configure(self, update: Mapping[str, Any]) -> None:
        """Send the session's first `session_update` and wait until the server has applied it.

        Before any other event: a refused update leaves the server's default session (24 kHz PCM, its voice, no
        instructions), which the call must never run on. RealtimeSessionRefused when the server refused it,
        RealtimeUnavailable when it did not answer within SESSION_CONFIRM_SECONDS.
        """
        event_id = await self.update_session(update)
        try:
            async with asyncio.timeout(SESSION_CONFIRM_SECONDS), contextlib.aclosing(self.events()) as events:
                async for event in events:
                    match event:
                        case SessionUpdated():
                            return
                        case ServerError(event_id=refused) if refused in (event_id, ""):
                            raise RealtimeSessionRefused(
                                f"{self._host} refused the session's configuration: {event}", provider="openai"
                            )
        except TimeoutError:
            raise RealtimeUnavailable(
                f"{self._host} did not confirm the session's configuration within {SESSION_CONFIRM_SECONDS:g} s",
                provider="openai",
            ) from None

    async def append_audio(self, ulaw: bytes) -> None:
        """Add caller audio (mu-law 8 kHz) to the input buffer; the call's hot path, so one string, no dict."""
        await self._send(_APPEND_PREFIX + base64.b64encode(ulaw).decode("ascii") + '"}')

    async def create_response(
        self, instructions: str | None = None, *, metadata: Mapping[str, str] | None = None, event_id: str = ""
    ) -> None:
        """Ask for a response, with instructions for this one only if given, once the server has ended the ones under
        way, which it would refuse it for (waiting at most CANCEL_WAIT_SECONDS when they were all cancelled, else
        ANSWER_WAIT_SECONDS).

        `metadata` comes back in its `ResponseCreated` (telling it from one the server's VAD started meanwhile);
        `event_id` names the request in the server's error if it refuses it (one of its own started meanwhile).
        """
        cancelled_only = self._active <= self._cancelled and not self._unseen_active
        wait = CANCEL_WAIT_SECONDS if cancelled_only else ANSWER_WAIT_SECONDS
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), wait)
        event: dict[str, Any] = {"type": "response.create"}
        if event_id:
            event["event_id"] = event_id
        response: dict[str, Any] = {}
        if instructions is not None:
            response["instructions"] = instructions
        if metadata:
            response["metadata"] = dict(metadata)
        if response:
            event["response"] = response
        await self.send_event(event)

    async def cancel_response(self, response_id: str | None = None) -> None:
        """Stop a response that is still generating."""
        event: dict[str, Any] = {"type": "response.cancel"}
        if response_id:
            event["response_id"] = response_id
        await self.send_event(event)
        if response_id in self._active:
            self._cancelled.add(response_id)

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """Cut an assistant item's audio (and the transcript the model remembers) at what the caller heard."""
        await self.send_event(
            {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms}
        )

    async def send_function_output(self, call_id: str, output: str) -> None:
        """Give the model a function call's result."""
        item = {"type": "function_call_output", "call_id": call_id, "output": output}
        await self.send_event({"type": "conversation.item.create", "item": item})

    async def send_history(self, role: Literal["caller", "agent"], text: str) -> None:
        """Add a turn of the conversation so far as text: a new session catching up on a call that was lost."""
        if role == "caller":
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        else:
            item = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}
        await self.send_event({"type": "conversation.item.create", "item": item})

    async def send_caller_text(self, text: str) -> None:
        """Add something the caller did that the model cannot hear (keys pressed) as a caller message."""
        await self.send_message("user", text)

    async def send_message(self, role: Literal["system", "user"], text: str) -> None:
        """Add a system or user message to the conversation, for the model's next responses."""
        item = {"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]}
        await self.send_event({"type": "conversation.item.create", "item": item})

    async def events(self) -> AsyncGenerator[RealtimeEvent, None]:
        """The server events a call acts on, until the connection closes (RealtimeConnectionLost) or, once the call
        has acted on it, the server failed a response (RealtimeResponseFailed) or refused a session update
        (RealtimeUpdateRefused)."""
        while True:
            try:
                data = await self._connection.recv_bytes()
            except ConnectionClosed as exc:
                raise self._lost(exc) from exc
            event = parse_event(data)
            if event is not None:
                self._track(event)
                yield event
                match event:
                    case ResponseDone(status="failed", error=error):
                        why = error or "no error given"
                        raise RealtimeResponseFailed(f"{self._host} failed a response ({why})", provider="openai")
                    case ServerError(event_id=event_id) if event_id in self._updates_sent:
                        raise RealtimeUpdateRefused(
                            f"{self._host} refused the session's configuration: {event}", provider="openai"
                        )

    def _track(self, event: RealtimeEvent) -> None:
        """Keep count of the responses the server has under way, and of those cancelled (for `create_response`)."""
        match event:
            case ResponseCreated(response_id=response_id):
                self._active.add(response_id)
                self._unseen_active = False
                self._idle.clear()
            case ResponseDone(response_id=response_id):
                self._active.discard(response_id)
                self._cancelled.discard(response_id)
                self._unseen_active = False
                if not self._active:
                    self._idle.set()
            case ServerError(code="conversation_already_has_active_response"):
                # The server started a response (its VAD's, for the caller) that its events have yet to announce:
                # not idle until that one is done, though none is known yet.
                self._unseen_active = True
                self._idle.clear()

    async def close(self) -> None:
        """Close the connection (the session ends with it), not waiting long for the server's goodbye."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self._connection.close()
        except TimeoutError:
            log.warning("%s did not acknowledge the close within %g s", self._host, CLOSE_TIMEOUT_SECONDS)

    async def _send(self, data: str) -> None:
        try:
            await self._connection.send_raw(data)
        except ConnectionClosed as exc:
            raise self._lost(exc) from exc

    def _lost(self, exc: ConnectionClosed) -> RealtimeConnectionLost:
        close = exc.rcvd or exc.sent
        if close is None:
            return RealtimeConnectionLost(
                f"the connection to {self._host} was lost (no close frame)", provider="openai"
            )
        reason = f": {close.reason}" if close.reason else ""
        return RealtimeConnectionLost(
            f"{self._host} closed the connection (code {close.code}{reason})", provider="openai"
        )
