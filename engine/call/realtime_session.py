"""One phone call on OpenAI Realtime (speech to speech): the caller's audio in, the model's voice out, with marks.

CallSession's job for an agent whose configuration has `realtime`: the model hears, thinks and speaks, so the
session does the telephony around it. Caller frames go to the model as they come (mu-law both ways). The model's
audio is queued per assistant item to a player task that paces it to Twilio with marks, so reading the model's
events never waits on playback. A barge-in clears Twilio and truncates the item where the marks say the caller
stopped hearing it. Function calls end the call, transfer it, press keys or call the organization's webhooks.
Turns reach the CallLogWriter in conversation order, a caller's turn waiting for its transcript if it comes late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from openai import AsyncOpenAI

from config.agent import AgentConfiguration, OpenAIRealtimeConfig
from config.phone import InvalidPhoneNumber, e164
from engine.call.call_log_writer import CallLogWriter, CallOutcome, TurnRecord
from engine.call.outbound_audio import OutboundAudio, SendText, StreamTimeline
from engine.call.session import (
    DEFAULT_GOODBYE,
    HANGUP_GRACE_SECONDS,
    CallContext,
    HangUp,
    SessionState,
    Transfer,
    await_twilio_stop,
)
from engine.server import metrics
from media.dtmf import DIGITS_HELP, InvalidDigits, dtmf_audio
from media.g711 import BYTES_PER_MS
from media.recording import StereoWavRecorder
from media.twilio_stream import (
    DtmfReceived,
    MarkFlushed,
    MarkPlayed,
    MediaReceived,
    Stopped,
    StreamEvent,
    StreamProtocolError,
    TwilioStream,
)
from pipelines.realtime.openai_realtime import (
    AudioDelta,
    AudioDone,
    CallerTranscript,
    CallerTranscriptFailed,
    FunctionCall,
    OutputItemAdded,
    RealtimeChannel,
    RealtimeConnectionLost,
    RealtimeEvent,
    RealtimeUnavailable,
    ResponseCreated,
    ResponseDone,
    ServerError,
    SpeechStarted,
    SpeechStopped,
    TranscriptDelta,
    TranscriptDone,
    open_realtime,
    say_exactly,
    session_update,
)
from pipelines.tools import (
    BUILTIN_FUNCTIONS,
    DTMF_SENT,
    END_CALL,
    SEND_DTMF,
    TRANSFER_CALL,
    ToolRunner,
    parse_arguments,
)
from storage.enums import CallStatus

__all__ = ["INAUDIBLE", "TRANSCRIPTION_FAILED", "UNTRANSCRIBED", "RealtimeCallSession"]

log = logging.getLogger(__name__)

UNTRANSCRIBED: Final = "[speech, not transcribed]"
"""A caller turn's text when the agent has no `transcription_model`: the model heard it, nothing wrote it down."""
TRANSCRIPTION_FAILED: Final = "[speech, transcription failed]"
"""A caller turn's text when its transcription failed or never came."""
INAUDIBLE: Final = "[inaudible]"
"""A caller turn whose transcription is empty."""
RESPONSE_GRACE_SECONDS: Final = 10.0
"""How long an ending waits for the model to finish the response it is speaking (or to start the goodbye)."""
# Errors the server answers to a cancel or truncate that raced with its own barge-in handling: expected, not news.
_RACE_ERRORS: Final = frozenset({"response_cancel_not_active", "item_truncate_invalid_item_id"})


@dataclass(slots=True)
class _Turn:
    """A turn in conversation order; written once its text is known."""

    speaker: Literal["caller", "agent"]
    start_ms: int = 0
    end_ms: int = 0
    text: str | None = None
    interrupted: bool = False
    latency_ms: int | None = None
    latency: dict[str, int] | None = None
    dropped: bool = False  # nothing of it reached the caller: not written

    @property
    def ready(self) -> bool:
        return self.dropped or self.text is not None


@dataclass(slots=True)
class _Response:
    """One response of the model, and what the session still owes it (function outputs)."""

    response_id: str
    reply_to: float | None  # monotonic time the caller stopped speaking, for latency
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    spoke: bool = False
    items: list[_AgentItem] = field(default_factory=list)
    outputs: list[tuple[str, Callable[[], Awaitable[str]]]] = field(default_factory=list)


@dataclass(slots=True)
class _AgentItem:
    """One thing the agent says, played as one utterance: an assistant item's audio, or tones the session plays."""

    utterance_id: int
    item_id: str | None  # None for tones the session plays itself (no conversation item to truncate)
    response: _Response | None
    turn: _Turn
    transcript: list[str] = field(default_factory=list)
    transcript_done: bool = False
    received_bytes: int = 0
    first_delta_at: float | None = None
    first_mark_at: float | None = None
    started_stream_ms: int | None = None
    end_queued: bool = False
    played_through: bool = False
    cancelled: bool = False
    closed: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # played through, or cut

    @property
    def received_ms(self) -> int:
        return self.received_bytes // BYTES_PER_MS

    def text(self) -> str:
        return "".join(self.transcript).strip()

    def heard_text(self, played_ms: int) -> str:
        """The words heard when playback stopped at `played_ms`: the transcript's share of the audio played."""
        if self.item_id is None:  # tones: heard or not
            return self.text() if played_ms > 0 else ""
        words = self.text().split()
        share = min(1.0, played_ms / self.received_ms) if self.received_ms else 0.0
        return " ".join(words[: int(len(words) * share)])


def _short(value: object, limit: int = 200) -> str:
    return " ".join(str(value or "").split())[:limit]


def _constant(text: str) -> Callable[[], Awaitable[str]]:
    async def result() -> str:
        return text

    return result


class RealtimeCallSession:
    """Runs one call on OpenAI Realtime from Twilio's `start` to the finished CallLog (CallSession's interface)."""

    def __init__(
        self,
        *,
        context: CallContext,
        config: AgentConfiguration,
        client: AsyncOpenAI,
        instructions: str,
        stream: TwilioStream,
        send: SendText,
        writer: CallLogWriter,
        recorder: StereoWavRecorder | None = None,
        hang_up: HangUp | None = None,
        transfer: Transfer | None = None,
        tools: ToolRunner | None = None,
        first_sentence: str | None = None,
        realtime: OpenAIRealtimeConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Prepare a session; `stream` must already have seen Twilio's `start`.

        `realtime` is the provider entry the call uses (the one whose key was found); default: the configuration's
        first `realtime` entry.
        """
        if realtime is None:
            if not config.realtime:
                raise ValueError("RealtimeCallSession needs an agent configuration with `realtime`")
            realtime = config.realtime[0]
        self.context = context
        self._config = config
        self._realtime = realtime
        self._client = client
        self._instructions = instructions
        self._stream = stream
        self._writer = writer
        self._recorder = recorder
        self._hang_up = hang_up
        self._transfer = transfer
        self._tools = tools
        self._first_sentence = first_sentence if first_sentence is not None else config.first_sentence
        self._clock = clock
        self._timeline = StreamTimeline(clock)
        self._out = OutboundAudio(stream, send, self._timeline, recorder, clock=clock)
        self.state = SessionState.LISTENING
        self._started_at = clock()
        self._channel: RealtimeChannel | None = None
        self._queue: asyncio.Queue[tuple[_AgentItem, bytes | None]] = asyncio.Queue()
        self._player: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ending: asyncio.Task[None] | None = None
        self._goodbye_response: asyncio.Future[_Response] | None = None
        # The conversation as the session tracks it.
        self._responses: dict[str, _Response] = {}
        self._open_responses: dict[str, _Response] = {}
        self._items: dict[str, _AgentItem] = {}  # by assistant item id
        self._utterances: dict[int, _AgentItem] = {}
        self._unplayed: dict[int, _AgentItem] = {}  # audio still to be heard, by utterance id
        self._next_utterance = 1
        self._turns: deque[_Turn] = deque()
        self._turn_index = 0
        self._caller_turns: dict[str, _Turn] = {}  # awaiting their transcript, by item id
        self._caller_started_ms: dict[str, int] = {}
        self._caller_speaking = False
        self._input_origin_ms: int | None = None  # stream time of the first audio the model got
        self._reply_to: float | None = None
        self._answering = 0
        self._calls_seen: set[str] = set()
        self._last_activity = clock()
        self._latencies: list[int] = []
        self._ended = asyncio.Event()
        self._end_status = CallStatus.COMPLETED
        self._end_reason = ""

    # ------------------------------------------------------------------------------------------- lifecycle

    async def run(self, frames: AsyncIterator[str]) -> CallOutcome:
        """Run the call until it ends; return how it ended (the caller then finishes the CallLog with it)."""
        self._writer.start()
        self._spawn(self._open(frames), "open")
        loop = asyncio.get_running_loop()
        max_duration = loop.call_later(self._config.max_duration_seconds, self._say_goodbye, "max_duration")
        try:
            await self._ended.wait()
        finally:
            max_duration.cancel()
            outcome = await self._shut_down()
        return outcome

    def end_from_outside(self, reason: str, *, completed: bool = False) -> None:
        """End the call for a reason outside it: FAILED (the engine shutting down), or COMPLETED when someone
        hung it up on purpose (the API)."""
        self._end(CallStatus.COMPLETED if completed else CallStatus.FAILED, reason)

    @property
    def latencies_ms(self) -> list[int]:
        """Response latencies of the agent's turns so far (caller's speech stop reported → first agent audio sent)."""
        return list(self._latencies)

    async def _open(self, frames: AsyncIterator[str]) -> None:
        """Connect and configure the model, then run the call's tasks; ask for the greeting if there is one."""
        try:
            channel = await open_realtime(self._client, self._realtime.model)
        except RealtimeUnavailable as exc:
            log.error("call %s: %s", self.context.call_sid, exc)
            self._end(CallStatus.FAILED, f"realtime_unavailable: {exc}")
            return
        self._channel = channel
        try:
            await channel.send_event(self._session_update())
        except RealtimeConnectionLost as exc:
            self._end(CallStatus.FAILED, f"realtime_unavailable: {exc}")
            return
        if self._ended.is_set():
            return
        self._player = self._spawn(self._play(self._queue), "player")
        self._spawn(self._read(frames, channel), "read")
        self._spawn(self._converse(channel), "realtime")
        if self._first_sentence:
            await channel.create_response(say_exactly(self._first_sentence))

    def _session_update(self) -> dict[str, Any]:
        specs = [spec for spec in BUILTIN_FUNCTIONS if spec.name != TRANSFER_CALL or self._transfer is not None]
        if self._tools is not None:
            specs.extend(self._tools.specs)
        return session_update(
            self._realtime,
            instructions=self._instructions,
            tools=specs,
            interrupt_response=self._config.interruption.enabled,
        )

    def _spawn(self, work: Coroutine[Any, Any, None], role: str) -> asyncio.Task[None]:
        """Run part of the call as a task whose unexpected failure ends this call (FAILED), never the engine."""
        task = asyncio.create_task(work, name=f"call-{self.context.call_sid}-{role}")
        self._tasks.add(task)
        task.add_done_callback(self._supervise)
        return task

    def _supervise(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if isinstance(exc, RealtimeConnectionLost):
            if not self._ended.is_set():  # the reader and the sender both see a drop: say it once
                log.error("call %s: the Realtime connection dropped: %s", self.context.call_sid, exc)
            self._end(CallStatus.FAILED, f"realtime_failed: {exc}")
            return
        # Once the call has ended, a task failing on its way out (a send to a closed socket) is no news.
        level = logging.DEBUG if self._ended.is_set() else logging.ERROR
        log.log(level, "call %s: %s failed", self.context.call_sid, task.get_name(), exc_info=exc)
        self._end(CallStatus.FAILED, f"internal_error: {type(exc).__name__}")

    def _end(self, status: CallStatus, reason: str) -> None:
        """Decide the call is over (first reason wins); run() then shuts everything down."""
        if self._ended.is_set():
            return
        self._end_status, self._end_reason = status, reason
        self.state = SessionState.ENDED
        self._ended.set()

    def _set_state(self, new: SessionState) -> None:
        # LISTENING and RESPONDING alternate freely; ENDING and ENDED are never left.
        if self.state in (SessionState.ENDING, SessionState.ENDED) and new is not SessionState.ENDED:
            return
        self.state = new

    async def _shut_down(self) -> CallOutcome:
        while pending := [task for task in self._tasks if not task.done()]:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for item in list(self._utterances.values()):
            if not item.closed:
                played = min(self._stream.playback.utterance(item.utterance_id).played_ms, item.received_ms)
                self._close(item, interrupted=not item.played_through, played_ms=played)
        for turn in self._turns:
            if not turn.ready:
                turn.text = TRANSCRIPTION_FAILED if turn.speaker == "caller" else ""
        self._flush_turns()
        if self._channel is not None:
            try:
                await self._channel.close()
            except Exception:  # a connection failing to close must not stop the CallLog being finished
                log.exception("call %s: closing the Realtime connection failed", self.context.call_sid)
        duration_s = round(self._clock() - self._started_at)
        log.info("call %s ended: %s (%s, %d s)", self.context.call_sid, self._end_reason, self._end_status, duration_s)
        return CallOutcome(status=self._end_status, end_reason=self._end_reason, duration_s=duration_s)

    # ------------------------------------------------------------------------------------------ caller side

    async def _read(self, frames: AsyncIterator[str], channel: RealtimeChannel) -> None:
        """Feed Twilio's frames through the protocol; the call ends when they stop."""
        try:
            async for text in frames:
                for event in self._stream.receive_text(text):
                    await self._on_stream_event(event, channel)
                if self._ended.is_set():
                    return
        except StreamProtocolError as exc:
            log.warning("call %s: protocol error: %s", self.context.call_sid, exc)
            self._end(CallStatus.FAILED, f"protocol_error: {type(exc).__name__}: {exc}")
            return
        self._end(CallStatus.FAILED, "stream_lost")

    async def _on_stream_event(self, event: StreamEvent, channel: RealtimeChannel) -> None:
        match event:
            case MediaReceived():
                await self._on_caller_audio(event, channel)
            case MarkPlayed() | MarkFlushed():
                self._on_mark(event)
            case DtmfReceived(digit=digit):
                await self._on_caller_key(digit, channel)
            case Stopped():
                # After our own hang-up Twilio sends `stop` too: keep the reason the agent ended for.
                ending = self.state is SessionState.ENDING and bool(self._end_reason)
                self._end(CallStatus.COMPLETED, self._end_reason if ending else "caller_hangup")
            case _:
                pass  # start (seen by the media socket), gaps and unknown marks carry nothing the session acts on

    async def _on_caller_audio(self, media: MediaReceived, channel: RealtimeChannel) -> None:
        """The audio path: one caller frame. Cheap work only; the model does the listening."""
        self._timeline.observe(media.timestamp_ms)
        if self._input_origin_ms is None:
            self._input_origin_ms = media.timestamp_ms
        if self._recorder is not None:
            self._recorder.write_caller(media.payload, media.timestamp_ms)
        await channel.append_audio(media.payload)
        if (
            self.state is SessionState.LISTENING
            and not self._caller_speaking
            and self._clock() - self._last_activity > self._config.silence_timeout_seconds
        ):
            self._say_goodbye("silence_timeout")

    async def _on_caller_key(self, digit: str, channel: RealtimeChannel) -> None:
        """A key the caller pressed: a turn of its own, told to the model as text (it cannot hear Twilio's events)."""
        if self.state in (SessionState.ENDING, SessionState.ENDED):
            return
        if self._config.interruption.enabled:
            await self._cut_agent("caller key", barge_in=True)
        now_ms = self._timeline.stream_ms()
        self._turns.append(_Turn("caller", now_ms, now_ms, text=f"[DTMF {digit}]"))
        self._flush_turns()
        self._reply_to = self._clock()
        self._last_activity = self._clock()
        await channel.send_caller_text(f"[The caller pressed {digit} on the keypad]")
        await channel.create_response()

    def _stream_ms(self, audio_ms: int) -> int:
        """Stream time of a point in the model's input audio (which began with the first frame forwarded)."""
        return (self._input_origin_ms or 0) + audio_ms

    # ------------------------------------------------------------------------------------------ the model

    async def _converse(self, channel: RealtimeChannel) -> None:
        """Act on the model's events until the call ends; a dropped connection fails the call (see _supervise)."""
        async for event in channel.events():
            await self._on_event(event, channel)

    async def _on_event(self, event: RealtimeEvent, channel: RealtimeChannel) -> None:
        match event:
            case SpeechStarted() | SpeechStopped() | CallerTranscript() | CallerTranscriptFailed():
                await self._on_caller_event(event)
            case ServerError(code=code, message=message):
                level = logging.DEBUG if code in _RACE_ERRORS else logging.WARNING
                log.log(level, "call %s: Realtime error %s: %s", self.context.call_sid, code, message)
            case _:
                await self._on_agent_event(event, channel)

    async def _on_caller_event(
        self, event: SpeechStarted | SpeechStopped | CallerTranscript | CallerTranscriptFailed
    ) -> None:
        match event:
            case SpeechStarted(item_id=item_id, audio_start_ms=start_ms):
                self._caller_speaking = True
                self._last_activity = self._clock()
                self._caller_started_ms[item_id] = self._stream_ms(start_ms)
                if self._config.interruption.enabled and self.state is SessionState.RESPONDING:
                    await self._cut_agent("caller speech", barge_in=True)
            case SpeechStopped(item_id=item_id, audio_end_ms=end_ms):
                self._on_speech_stopped(item_id, self._stream_ms(end_ms))
            case CallerTranscript(item_id=item_id, transcript=transcript):
                self._on_caller_transcript(item_id, transcript.strip() or INAUDIBLE)
            case CallerTranscriptFailed(item_id=item_id, message=message):
                log.warning("call %s: the caller's turn was not transcribed: %s", self.context.call_sid, message)
                self._on_caller_transcript(item_id, TRANSCRIPTION_FAILED)

    async def _on_agent_event(self, event: RealtimeEvent, channel: RealtimeChannel) -> None:
        match event:
            case AudioDelta():
                self._on_audio(event)
            case TranscriptDelta(item_id=item_id, delta=delta):
                item = self._items.get(item_id)
                if item is not None and not item.transcript_done:
                    item.transcript.append(delta)
            case TranscriptDone(item_id=item_id, transcript=transcript):
                self._on_transcript_done(item_id, transcript)
            case AudioDone(item_id=item_id):
                item = self._items.get(item_id)
                if item is not None:
                    self._end_item(item)
            case ResponseCreated(response_id=response_id):
                self._on_response_created(response_id)
            case OutputItemAdded(response_id=response_id, item_id=item_id, item_type="message"):
                response = self._response(response_id)
                if not response.cancelled and item_id not in self._items:
                    self._new_item(item_id, response)
            case FunctionCall():
                await self._on_function_call(event, channel)
            case ResponseDone():
                await self._on_response_done(event, channel)
            case _:
                pass  # function_call output items: their arguments come complete in FunctionCall

    def _on_transcript_done(self, item_id: str, transcript: str) -> None:
        item = self._items.get(item_id)
        if item is not None:
            item.transcript = [transcript]
            item.transcript_done = True
            self._close_if_heard(item)

    def _response(self, response_id: str) -> _Response:
        response = self._responses.get(response_id)
        if response is None:
            response = self._responses[response_id] = _Response(response_id, None)
        return response

    def _on_response_created(self, response_id: str) -> None:
        response = self._responses[response_id] = _Response(response_id, self._reply_to)
        self._reply_to = None
        self._open_responses[response_id] = response
        self._set_state(SessionState.RESPONDING)
        if self._goodbye_response is not None and not self._goodbye_response.done():
            self._goodbye_response.set_result(response)

    def _new_item(self, item_id: str | None, response: _Response | None) -> _AgentItem:
        turn = _Turn("agent")
        self._turns.append(turn)
        item = _AgentItem(self._next_utterance, item_id, response, turn)
        self._next_utterance += 1
        if item_id is not None:
            self._items[item_id] = item
        if response is not None:
            response.items.append(item)
        self._utterances[item.utterance_id] = item
        self._unplayed[item.utterance_id] = item
        return item

    def _on_audio(self, delta: AudioDelta) -> None:
        """Queue a chunk of the model's voice for the player; audio of a cut response is dropped."""
        response = self._response(delta.response_id)
        if response.cancelled:
            return
        item = self._items.get(delta.item_id) or self._new_item(delta.item_id, response)
        if item.cancelled or not delta.audio:
            return
        if item.first_delta_at is None:
            item.first_delta_at = self._clock()
        response.spoke = True
        item.received_bytes += len(delta.audio)
        self._queue.put_nowait((item, delta.audio))

    async def _on_response_done(self, event: ResponseDone, channel: RealtimeChannel) -> None:
        response = self._response(event.response_id)
        for call in event.function_calls:  # any whose arguments event was missed
            await self._on_function_call(call, channel)
        if event.status not in ("completed", "cancelled"):
            log.warning("call %s: a Realtime response ended %s", self.context.call_sid, event.status or "unknown")
        self._open_responses.pop(event.response_id, None)
        for item in response.items:
            item.transcript_done = True  # what came is all there will be
            self._end_item(item)
            self._close_if_heard(item)
        response.done.set()
        self._settle()

    def _end_item(self, item: _AgentItem) -> None:
        """Queue the end of an item's audio: the player sends its final mark after the last chunk."""
        if not item.end_queued and not item.cancelled:
            item.end_queued = True
            self._queue.put_nowait((item, None))

    def _on_speech_stopped(self, item_id: str, end_ms: int) -> None:
        self._caller_speaking = False
        now = self._clock()
        self._last_activity = now
        self._reply_to = now
        start_ms = min(self._caller_started_ms.pop(item_id, end_ms), end_ms)
        turn = _Turn("caller", start_ms, end_ms)
        if self._realtime.transcription_model:
            self._caller_turns[item_id] = turn
        else:
            turn.text = UNTRANSCRIBED
        self._turns.append(turn)
        self._flush_turns()

    def _on_caller_transcript(self, item_id: str, text: str) -> None:
        turn = self._caller_turns.pop(item_id, None)
        if turn is None:  # a transcript without a speech stop: place it now
            now_ms = self._timeline.stream_ms()
            turn = _Turn("caller", now_ms, now_ms)
            self._turns.append(turn)
        turn.text = text
        self._flush_turns()

    def _settle(self) -> None:
        """Back to listening once nothing is generating, playing or waiting for a function's result."""
        if self.state is SessionState.RESPONDING and not (self._open_responses or self._unplayed or self._answering):
            self._set_state(SessionState.LISTENING)
            self._last_activity = self._clock()

    # ------------------------------------------------------------------------------------------ playback

    async def _play(self, queue: asyncio.Queue[tuple[_AgentItem, bytes | None]]) -> None:
        """Send queued agent audio to Twilio, paced, item after item; `None` ends an item with its final mark."""
        while True:
            item, audio = await queue.get()
            if item.cancelled:
                continue
            if audio is None:
                if self._stream.playback.utterance(item.utterance_id).sent_ms:
                    await self._out.finish(item.utterance_id)
                else:
                    self._played_through(item)
                continue
            if item.started_stream_ms is None:
                item.started_stream_ms = self._timeline.stream_ms()
            await self._out.play(item.utterance_id, audio)

    def _on_mark(self, event: MarkPlayed | MarkFlushed) -> None:
        item = self._utterances.get(event.utterance_id)
        if item is None or item.cancelled or not isinstance(event, MarkPlayed):
            return  # a cut item's turn is settled by the cut, from what the marks said before it
        if item.first_mark_at is None:
            item.first_mark_at = self._clock()
        if event.final:
            self._played_through(item)

    def _played_through(self, item: _AgentItem) -> None:
        item.played_through = True
        self._unplayed.pop(item.utterance_id, None)
        item.finished.set()
        self._last_activity = self._clock()
        self._close_if_heard(item)
        self._settle()

    def _close_if_heard(self, item: _AgentItem) -> None:
        if item.played_through and item.transcript_done:
            self._close(item, interrupted=False)

    async def _restart_player(self) -> None:
        """Drop the audio queued for the player (and stop what it is sending) before a clear."""
        old, self._queue = self._player, asyncio.Queue()
        if old is not None:
            old.cancel()
            await asyncio.wait({old})
        self._player = self._spawn(self._play(self._queue), "player")

    async def _cut_agent(self, why: str, *, barge_in: bool) -> None:
        """Stop the agent: cancel what is generating, clear Twilio, truncate each item at what was heard."""
        channel = self._channel
        responses = list(self._open_responses.values())
        items = list(self._unplayed.values())
        if channel is None or not (responses or items):
            return
        log.info("call %s: agent cut off (%s)", self.context.call_sid, why)
        if barge_in:
            metrics.BARGE_INS.inc()
        # Marked first, before any await: deltas still arriving for these are dropped from here on.
        for response in responses:
            response.cancelled = True
            self._open_responses.pop(response.response_id, None)
            response.done.set()
        for item in items:
            item.cancelled = True
            self._unplayed.pop(item.utterance_id, None)
            item.finished.set()
        await self._restart_player()
        playback = self._stream.playback
        # What the marks confirmed: a lower bound on what the caller heard, never past it, nor past what came.
        heard = {i.utterance_id: min(playback.utterance(i.utterance_id).played_ms, i.received_ms) for i in items}
        if any(playback.utterance(item.utterance_id).sent_ms for item in items):
            await self._out.clear()
        for response in responses:
            await channel.cancel_response(response.response_id)
        for item in items:
            # Audio still queued here was never heard either: the model must forget it too (truncate at 0).
            if item.item_id is not None and item.received_bytes:
                await channel.truncate(item.item_id, heard[item.utterance_id])
            self._close(item, interrupted=True, played_ms=heard[item.utterance_id])
        self._settle()

    # ------------------------------------------------------------------------------------------ turns

    def _close(self, item: _AgentItem, *, interrupted: bool, played_ms: int = 0) -> None:
        """Settle an agent item's turn: what was heard of it, when, and how long the caller waited for it."""
        if item.closed:
            return
        item.closed = True
        item.finished.set()
        turn = item.turn
        sent_ms = self._stream.playback.utterance(item.utterance_id).sent_ms
        if not sent_ms:
            turn.dropped = True  # nothing reached the caller
            self._flush_turns()
            return
        heard_ms = played_ms if interrupted else sent_ms
        turn.start_ms = item.started_stream_ms or 0
        turn.end_ms = turn.start_ms + heard_ms
        turn.text = item.heard_text(played_ms) if interrupted else item.text()
        turn.interrupted = interrupted
        response = item.response
        first_frame = self._out.first_audio_at.get(item.utterance_id)
        if response is not None and response.reply_to is not None and first_frame is not None:
            reply_to = response.reply_to
            response.reply_to = None  # one latency per response: its first item
            stages = {
                "modelFirstAudio": item.first_delta_at,
                "firstFrameSent": first_frame,
                "firstMarkEchoed": item.first_mark_at,
            }
            turn.latency = {
                stage: max(0, round((at - reply_to) * 1000)) for stage, at in stages.items() if at is not None
            }
            turn.latency_ms = turn.latency["firstFrameSent"]
            self._latencies.append(turn.latency_ms)
            metrics.observe_turn(turn.latency)
        self._flush_turns()

    def _flush_turns(self) -> None:
        """Write the turns whose text is known, in conversation order, up to the first still waiting."""
        while self._turns and self._turns[0].ready:
            turn = self._turns.popleft()
            if turn.dropped:
                continue
            self._writer.record_turn(
                TurnRecord(
                    index=self._turn_index,
                    speaker=turn.speaker,
                    text=turn.text or "",
                    start_ms=turn.start_ms,
                    end_ms=turn.end_ms,
                    interrupted=turn.interrupted,
                    latency_ms=turn.latency_ms,
                    latency=turn.latency,
                )
            )
            self._turn_index += 1

    # ------------------------------------------------------------------------------------------ functions

    async def _on_function_call(self, call: FunctionCall, channel: RealtimeChannel) -> None:
        if call.call_id in self._calls_seen:
            return
        self._calls_seen.add(call.call_id)
        response = self._response(call.response_id)
        if response.cancelled:
            log.info("call %s: %s from a cut-off response ignored", self.context.call_sid, call.name)
            return
        arguments = parse_arguments(call.arguments)
        log.info("call %s: the model calls %s", self.context.call_sid, call.name)
        if call.name == END_CALL:
            reason = _short(arguments.get("reason"))
            self._end_after_speaking(response, f"agent_hangup: {reason}" if reason else "agent_hangup")
        elif call.name == TRANSFER_CALL:
            refusal = self._transfer_or_refuse(response, call.call_id, arguments)
            if refusal is not None:
                self._owe(response, call.call_id, _constant(refusal))
        elif call.name == SEND_DTMF:
            digits = _short(arguments.get("digits"), 64).replace(" ", "")
            self._owe(response, call.call_id, _constant(self._press_keys(digits)))
        elif self._tools is None:
            self._owe(response, call.call_id, _constant(f"error: there is no function named {call.name!r}"))
        else:
            tools, name = self._tools, call.name
            self._owe(response, call.call_id, lambda: tools.run(name, arguments))

    def _owe(self, response: _Response, call_id: str, output: Callable[[], Awaitable[str]]) -> None:
        """Remember a function output to give the model once its response is done (the first schedules the answer)."""
        response.outputs.append((call_id, output))
        if len(response.outputs) == 1:
            self._answering += 1
            self._spawn(self._answer(response), "function")

    async def _answer(self, response: _Response) -> None:
        """Once the response is done (all its calls known), run its functions, give the results, and continue."""
        try:
            await response.done.wait()
            outputs = await asyncio.gather(*(run() for _, run in response.outputs))
            channel = self._channel
            if channel is None:
                return
            for (call_id, _), output in zip(response.outputs, outputs, strict=True):
                await channel.send_function_output(call_id, output)
            if response.cancelled or self._ending is not None or self.state is not SessionState.RESPONDING:
                return  # the caller took the floor, or the call is ending: no reply of the model's own
            # A response that only called functions hands its caller's turn on to the one that answers.
            self._reply_to = None if response.spoke else response.reply_to
            await channel.create_response()
        finally:
            self._answering -= 1
            self._settle()

    def _press_keys(self, digits: str) -> str:
        """Play touch tones as agent audio (Twilio's stream has no other way to send them); the model's result."""
        try:
            tones = dtmf_audio(digits)
        except InvalidDigits as exc:
            return f"error: {exc}; {DIGITS_HELP}"
        item = self._new_item(None, None)
        item.transcript = [f"[DTMF {digits}]"]
        item.transcript_done = True
        item.received_bytes = len(tones)
        self._queue.put_nowait((item, tones))
        self._end_item(item)
        self._set_state(SessionState.RESPONDING)
        return DTMF_SENT

    def _transfer_or_refuse(self, response: _Response, call_id: str, arguments: dict[str, Any]) -> str | None:
        """Start a transfer once the agent's words have played; or the reason it cannot be done, for the model."""
        given = _short(arguments.get("phone_number"), 40)
        if self._transfer is None:
            return "error: this line cannot transfer calls; tell the caller and offer to help otherwise"
        try:
            number = e164(given)
        except InvalidPhoneNumber as exc:
            return (
                f"error: {exc}, so the call was not transferred; ask the caller for "
                "the full number with its country code, or tell them you cannot transfer"
            )
        reason = _short(arguments.get("reason"))
        self._end_after_speaking(
            response, f"transferred: {reason}" if reason else "transferred", transfer_to=number, call_id=call_id
        )
        return None

    # ------------------------------------------------------------------------------------------- ending

    def _end_after_speaking(
        self, response: _Response, reason: str, *, transfer_to: str | None = None, call_id: str = ""
    ) -> None:
        if self._ending is not None or self.state in (SessionState.ENDING, SessionState.ENDED):
            return
        if transfer_to is None:
            self._set_state(SessionState.ENDING)  # no barge-in on the last words; a transfer may still fail
        self._ending = self._spawn(self._finish_then_end(response, reason, transfer_to, call_id), "ending")

    async def _finish_then_end(self, response: _Response, reason: str, transfer_to: str | None, call_id: str) -> None:
        await self._agent_finished(response)
        if transfer_to is None:
            await self._hang_up_now(reason)
            return
        transferred = False
        if self._transfer is not None:
            try:
                transferred = await self._transfer(self.context.call_sid, transfer_to)
            except Exception:
                log.exception("call %s: the transfer to %s failed", self.context.call_sid, transfer_to)
        if transferred and not self._ended.is_set():
            self._set_state(SessionState.ENDING)
            self._end_reason = reason
            await await_twilio_stop(self._ended)  # Twilio leaves our stream for the <Dial>
            self._end(CallStatus.COMPLETED, reason)
            return
        log.warning("call %s: transfer to %s failed", self.context.call_sid, transfer_to)
        self._ending = None
        if self._channel is not None:
            await self._channel.send_function_output(
                call_id, f"error: the transfer to {transfer_to} did not go through; tell the caller"
            )
            await self._channel.create_response()

    async def _agent_finished(self, response: _Response) -> None:
        """Wait (bounded) until `response` is done and every word queued so far has been heard."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(response.done.wait(), timeout=RESPONSE_GRACE_SECONDS)
        pending = list(self._unplayed.values())
        if not pending:
            return
        playback = self._stream.playback
        remaining_ms = sum(max(0, i.received_ms - playback.utterance(i.utterance_id).played_ms) for i in pending)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(item.finished.wait() for item in pending)),
                timeout=remaining_ms / 1000 + HANGUP_GRACE_SECONDS,
            )

    def _say_goodbye(self, reason: str) -> None:
        """Stop whatever the agent was doing, have the model say the goodbye sentence, then hang up."""
        if self._ending is not None or self.state in (SessionState.ENDING, SessionState.ENDED):
            return
        self._set_state(SessionState.ENDING)
        self._ending = self._spawn(self._goodbye(reason), "goodbye")

    async def _goodbye(self, reason: str) -> None:
        channel = self._channel
        if channel is not None:
            await self._cut_agent(reason, barge_in=False)
            created: asyncio.Future[_Response] = asyncio.get_running_loop().create_future()
            self._goodbye_response = created
            await channel.create_response(say_exactly(self._config.goodbye_sentence or DEFAULT_GOODBYE))
            try:
                response = await asyncio.wait_for(created, timeout=RESPONSE_GRACE_SECONDS)
            except TimeoutError:
                log.warning("call %s: the model did not start the goodbye", self.context.call_sid)
            else:
                await self._agent_finished(response)
        await self._hang_up_now(reason)

    async def _hang_up_now(self, reason: str) -> None:
        """End the call from our side: through Twilio's REST API when we can, else by closing the stream."""
        if self._ended.is_set():
            return  # ended meanwhile, for a reason of its own
        self._set_state(SessionState.ENDING)
        self._end_reason = reason
        if self._hang_up is not None:
            with contextlib.suppress(Exception):
                if await self._hang_up(self.context.call_sid):
                    await await_twilio_stop(self._ended)
        self._end(CallStatus.COMPLETED, reason)
