"""The speech-to-speech conversation driver: OpenAI Realtime hears, thinks and speaks; the call does the rest.

Caller frames go to the model as they come (mu-law both ways), batched by a sender task so the audio path never
waits on the socket. The model's audio is queued per assistant item to a player task that paces it to Twilio with
marks, so reading the model's events never waits on playback. A barge-in clears Twilio and truncates the item
where the marks say the caller stopped hearing it. Function calls end the call, transfer it, press keys or call
the organization's webhooks. A dropped connection is reopened once, with the conversation so far replayed as text;
if that fails too, the call hands over to the agent's fallback pipeline, or fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import phonenumbers
from openai import AsyncOpenAI

from config.agent import OpenAIRealtimeConfig
from engine.call.driver import (
    HANGUP_GRACE_SECONDS,
    CallHost,
    ConversationUnavailable,
    DriverFactory,
)
from engine.call.phases import CallPhase, PhaseEvent, accepts
from engine.call.turns import Turn
from engine.server import metrics
from media.dtmf import InvalidDigits, dtmf_audio
from media.g711 import BYTES_PER_MS
from media.twilio_stream import MarkFlushed, MarkPlayed
from media.vad import VoiceActivityDetector
from pipelines.conversation.heard import share_of_words
from pipelines.conversation.turn_taking import BargeInPolicy
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
from pipelines.tools import BUILTIN_FUNCTIONS, END_CALL, SEND_DTMF, TRANSFER_CALL, ToolRunner, parse_arguments
from storage.end_reasons import EndReason

__all__ = ["INAUDIBLE", "TRANSCRIPTION_FAILED", "UNTRANSCRIBED", "RealtimeDriver", "realtime_driver"]

log = logging.getLogger(__name__)

UNTRANSCRIBED: Final = "[speech, not transcribed]"
"""A caller turn's text when the agent has no `transcription_model`: the model heard it, nothing wrote it down."""
TRANSCRIPTION_FAILED: Final = "[speech, transcription failed]"
"""A caller turn's text when its transcription failed or never came."""
INAUDIBLE: Final = "[inaudible]"
"""A caller turn whose transcription is empty."""
RESPONSE_GRACE_SECONDS: Final = 10.0
"""How long an ending waits for the model to finish the response it is speaking (or to start the goodbye)."""
RECONNECTS: Final = 1
"""How many times a lost connection is reopened (with the conversation replayed) before the call hands over."""
DTMF_SENT: Final = "sent"
"""What the model is told once its keypresses are queued into the call."""
# Errors the server answers to a cancel or truncate that raced with its own barge-in handling: expected, not news.
_RACE_ERRORS: Final = frozenset({"response_cancel_not_active", "item_truncate_invalid_item_id"})


@dataclass(slots=True)
class _Response:
    """One response of the model, and what the driver still owes it (function outputs)."""

    response_id: str
    reply_to: float | None  # clock time the caller stopped speaking, for latency
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    spoke: bool = False
    items: list[_AgentItem] = field(default_factory=list)
    outputs: list[tuple[str, Callable[[], Awaitable[str]]]] = field(default_factory=list)


@dataclass(slots=True)
class _AgentItem:
    """One thing the agent says, played as one utterance: an assistant item's audio, or tones the driver plays."""

    utterance_id: int
    item_id: str | None  # None for tones the driver plays itself (no conversation item to truncate)
    response: _Response | None
    turn: Turn
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
        return share_of_words(self.text(), played_ms, self.received_ms)


def _e164(number: str) -> str | None:
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _short(value: object, limit: int = 200) -> str:
    return " ".join(str(value or "").split())[:limit]


def _constant(text: str) -> Callable[[], Awaitable[str]]:
    async def result() -> str:
        return text

    return result


def realtime_driver(
    *,
    client: AsyncOpenAI,
    realtime: OpenAIRealtimeConfig,
    instructions: str,
    tools: ToolRunner | None = None,
    first_sentence: str | None = None,
    can_transfer: bool = True,
) -> DriverFactory:
    """A factory for the speech-to-speech driver of a call on `realtime` (the provider entry whose key was found)."""

    def make(host: CallHost) -> RealtimeDriver:
        return RealtimeDriver(
            host,
            client=client,
            realtime=realtime,
            instructions=instructions,
            tools=tools,
            first_sentence=first_sentence,
            can_transfer=can_transfer,
        )

    return make


class RealtimeDriver:
    """Converses through OpenAI Realtime, speech to speech (a ConversationDriver)."""

    def __init__(
        self,
        host: CallHost,
        *,
        client: AsyncOpenAI,
        realtime: OpenAIRealtimeConfig,
        instructions: str,
        tools: ToolRunner | None,
        first_sentence: str | None,
        can_transfer: bool,
    ) -> None:
        """Converse in `host`'s call through `client`."""
        self._host = host
        self._client = client
        self._realtime = realtime
        self._instructions = instructions
        self._tools = tools
        self._first_sentence = first_sentence
        self._can_transfer = can_transfer
        self._channel: RealtimeChannel | None = None
        self._reconnects = 0
        self._reconnecting: asyncio.Task[None] | None = None
        self._audio_out = bytearray()  # caller audio the sender has yet to send
        self._audio_ready = asyncio.Event()
        self._queue: asyncio.Queue[tuple[_AgentItem, bytes | None]] = asyncio.Queue()
        self._player: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ending: asyncio.Task[None] | None = None
        self._said: asyncio.Future[_Response] | None = None
        self._responses: dict[str, _Response] = {}
        self._open_responses: dict[str, _Response] = {}
        self._items: dict[str, _AgentItem] = {}  # by assistant item id
        self._utterances: dict[int, _AgentItem] = {}
        self._unplayed: dict[int, _AgentItem] = {}  # audio still to be heard, by utterance id
        self._caller_turns: dict[str, Turn] = {}  # awaiting their transcript, by item id
        self._caller_started_ms: dict[str, int] = {}
        self._caller_speaking = False
        self._input_origin_ms: int | None = None  # stream time of the first audio the model got
        self._reply_to: float | None = None
        self._answering = 0
        self._calls_seen: set[str] = set()
        interruption = host.config.interruption
        self._barge_in = BargeInPolicy.of(
            enabled=interruption.enabled,
            threshold_ms=interruption.threshold_ms,
            min_words=interruption.min_words,
            backchannel_words=interruption.backchannel_words,
        )
        self._vad = VoiceActivityDetector()  # run only while the agent's audio plays: the overlap count
        self._holding_replies = False  # the model was told not to answer by itself (awaiting a callee's hello)
        self._callee_spoke = False
        self._closed = False

    # ------------------------------------------------------------------------------------ ConversationDriver

    async def start(self) -> None:
        """Connect and configure the model; then the sender, the player and the event reader run."""
        try:
            self._channel = await self._connect()
        except (RealtimeUnavailable, RealtimeConnectionLost) as exc:
            raise ConversationUnavailable(EndReason.REALTIME_UNAVAILABLE, str(exc)) from exc
        self._player = self._spawn(self._play(self._queue), "player")
        self._spawn(self._send_audio(), "realtime-audio")
        self._spawn(self._converse(self._channel), "realtime")

    def open(self) -> None:
        """Say the first sentence; without one the caller speaks first (or the model greets, if asked to)."""
        channel = self._channel
        if channel is None or not accepts(self._host.phase, PhaseEvent.REPLY):
            return
        self._spawn(self._open(channel), "open")

    @property
    def caller_speaking(self) -> bool:
        """Whether the model's VAD hears the caller now."""
        return self._caller_speaking

    def on_caller_audio(self, payload: bytes, at_ms: int) -> None:
        """Queue one caller frame for the model (the sender batches what piles up)."""
        if self._input_origin_ms is None:
            self._input_origin_ms = at_ms
        self._audio_out += payload
        self._audio_ready.set()
        if not self._unplayed:
            self._barge_in.reset()
        elif len(payload) == 160:
            # The agent's words are playing: the engine, not the server, decides when the caller takes the floor,
            # with the agent's threshold (the server's VAD would cut at the first syllable).
            self._vad.process_ulaw(payload)
            voiced = self._vad.last_frame_voiced
            if self._barge_in.frame(voiced=voiced, caller_speaking=self._caller_speaking, agent_speaking=True):
                self._barge_in.reset()
                self._spawn(self._cut_agent("caller speech", barge_in=True, model=self._channel), "barge-in")

    def on_caller_key(self, digit: str) -> None:
        """A key the caller pressed: a turn of its own, told to the model as text (it cannot hear Twilio's events)."""
        self._spawn(self._caller_key(digit), "key")

    def on_mark(self, event: MarkPlayed | MarkFlushed) -> None:
        """A played mark: the item is being heard; its final one: heard through."""
        item = self._utterances.get(event.utterance_id)
        if item is None or item.cancelled or not isinstance(event, MarkPlayed):
            return  # a cut item's turn is settled by the cut, from what the marks said before it
        if item.first_mark_at is None:
            item.first_mark_at = self._host.clock()
        if event.final:
            self._played_through(item)

    async def interrupt(self, why: str) -> None:
        """Stop the agent now: cancel what is generating, clear Twilio, truncate each item at what was heard."""
        await self._cut_agent(why, barge_in=False, model=self._channel)

    async def say(self, text: str) -> None:
        """Have the model say `text` word for word and wait (bounded) until it was heard."""
        channel = self._channel
        if channel is None:
            return
        said: asyncio.Future[_Response] = asyncio.get_running_loop().create_future()
        self._said = said
        await channel.create_response(say_exactly(text))
        try:
            response = await asyncio.wait_for(said, timeout=RESPONSE_GRACE_SECONDS)
        except TimeoutError:
            log.warning("call %s: the model did not start saying %r", self._host.context.call_sid, text[:40])
            return
        await self._agent_finished(response)

    async def close(self) -> None:
        """Settle what was being said, then close the connection (its errors are logged, never raised)."""
        if self._closed:
            return
        self._closed = True
        while pending := [task for task in self._tasks if not task.done()]:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        playback = self._host.playback
        for item in list(self._utterances.values()):
            if not item.closed:
                played = min(playback.utterance(item.utterance_id).played_ms, item.received_ms)
                self._close(item, interrupted=not item.played_through, played_ms=played)
        if self._channel is not None:
            try:
                await self._channel.close()
            except Exception:  # a connection failing to close must not stop the CallLog being finished
                log.exception("call %s: closing the Realtime connection failed", self._host.context.call_sid)

    # ------------------------------------------------------------------------------------------ connection

    def _spawn(self, work: Any, role: str) -> asyncio.Task[None]:
        task = self._host.spawn(self._guarded(work), role)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guarded(self, work: Any) -> None:
        """Run a task of the driver; a lost connection leads to one reconnect (then a hand-over), not a crash."""
        try:
            await work
        except RealtimeConnectionLost as exc:
            self._connection_lost(exc)

    async def _connect(self) -> RealtimeChannel:
        channel = await open_realtime(self._client, self._realtime.model)
        try:
            await channel.send_event(self._session_update())
        except RealtimeConnectionLost:
            await channel.close()
            raise
        return channel

    def _session_update(self) -> dict[str, Any]:
        # While a callee may still say hello, the engine decides when the model speaks.
        self._holding_replies = self._host.phase is CallPhase.AWAITING_GREETING
        specs = [spec for spec in BUILTIN_FUNCTIONS if spec.name != TRANSFER_CALL or self._can_transfer]
        if self._tools is not None:
            specs.extend(self._tools.specs)
        return session_update(
            self._realtime,
            instructions=self._instructions,
            tools=specs,
            interrupt_response=False,  # barge-in is the engine's (on_caller_audio), by the agent's threshold
            create_response=not self._holding_replies,
        )

    def _connection_lost(self, exc: RealtimeConnectionLost) -> None:
        if self._closed or self._reconnecting is not None or self._host.phase is CallPhase.ENDED:
            return
        log.warning("call %s: the Realtime connection dropped: %s", self._host.context.call_sid, exc)
        metrics.PROVIDER_ERRORS.labels("realtime", self._realtime.provider).inc()
        self._reconnecting = self._host.spawn(self._reconnect(str(exc)), "realtime-reconnect")

    async def _reconnect(self, why: str) -> None:
        """Reopen the model's session once, replaying the conversation so far; else hand the call over."""
        lost = self._channel
        self._channel = None
        for task in [task for task in self._tasks if not task.done() and task is not asyncio.current_task()]:
            task.cancel()
        await self._cut_agent("connection lost", barge_in=False, model=None)
        if lost is not None:
            with contextlib.suppress(Exception):
                await lost.close()
        channel: RealtimeChannel | None = None
        if self._reconnects < RECONNECTS:
            self._reconnects += 1
            try:
                channel = await self._connect()
                for speaker, text in self._host.turns.heard:
                    await channel.send_history(speaker, text)
            except (RealtimeUnavailable, RealtimeConnectionLost) as exc:
                why = f"{why}; reconnecting failed: {exc}"
                channel = None
        if channel is None:
            self._reconnecting = None
            await self._host.hand_over(EndReason.REALTIME_FAILED, why)
            return
        log.info("call %s: the Realtime session was reopened", self._host.context.call_sid)
        self._channel = channel
        self._queue = asyncio.Queue()
        self._player = self._spawn(self._play(self._queue), "player")
        self._spawn(self._send_audio(), "realtime-audio")
        self._spawn(self._converse(channel), "realtime")
        self._reconnecting = None
        if self._host.phase is CallPhase.RESPONDING:
            self._host.move(PhaseEvent.YIELD)
        heard = self._host.turns.heard
        if self._host.phase is CallPhase.LISTENING and heard and heard[-1][0] == "caller":
            self._reply_to = self._host.clock()  # the caller was waiting for an answer
            await channel.create_response()

    async def _send_audio(self) -> None:
        """Send the caller's audio as it piles up: one message per wake-up, however many frames came."""
        while True:
            await self._audio_ready.wait()
            self._audio_ready.clear()
            channel = self._channel
            if channel is None or not self._audio_out:
                continue
            chunk = bytes(self._audio_out)
            self._audio_out.clear()
            await channel.append_audio(chunk)

    async def _open(self, channel: RealtimeChannel) -> None:
        if self._host.phase is not CallPhase.LISTENING and self._host.phase is not CallPhase.RESPONDING:
            return
        if self._holding_replies:  # from now on the model answers the caller by itself
            await channel.send_event(self._session_update())
        if self._first_sentence:
            await channel.create_response(say_exactly(self._first_sentence))
        elif self._host.config.model_greets or self._callee_spoke:
            await channel.create_response()

    async def _caller_key(self, digit: str) -> None:
        host = self._host
        channel = self._channel
        if channel is None or not accepts(host.phase, PhaseEvent.REPLY):
            return
        if host.config.interruption.enabled:
            await self._cut_agent("caller key", barge_in=True, model=channel)
        now_ms = host.timeline.stream_ms()
        host.turns.place("caller", now_ms, now_ms, text=f"[DTMF {digit}]")
        if host.caller_turn_ended():
            return
        self._reply_to = host.clock()
        await channel.send_caller_text(f"[The caller pressed {digit} on the keypad]")
        await channel.create_response()

    def _stream_ms(self, audio_ms: int) -> int:
        """Stream time of a point in the model's input audio (which began with the first frame forwarded)."""
        return (self._input_origin_ms or 0) + audio_ms

    # ------------------------------------------------------------------------------------------ the model

    async def _converse(self, channel: RealtimeChannel) -> None:
        """Act on the model's events until the call ends."""
        async for event in channel.events():
            await self._on_event(event, channel)

    async def _on_event(self, event: RealtimeEvent, channel: RealtimeChannel) -> None:
        match event:
            case SpeechStarted() | SpeechStopped() | CallerTranscript() | CallerTranscriptFailed():
                await self._on_caller_event(event)
            case ServerError(code=code, message=message):
                level = logging.DEBUG if code in _RACE_ERRORS else logging.WARNING
                log.log(level, "call %s: Realtime error %s: %s", self._host.context.call_sid, code, message)
            case _:
                await self._on_agent_event(event, channel)

    async def _on_caller_event(
        self, event: SpeechStarted | SpeechStopped | CallerTranscript | CallerTranscriptFailed
    ) -> None:
        match event:
            case SpeechStarted(item_id=item_id, audio_start_ms=start_ms):
                self._caller_speaking = True
                self._host.activity()
                self._caller_started_ms[item_id] = self._stream_ms(start_ms)
            case SpeechStopped(item_id=item_id, audio_end_ms=end_ms):
                self._on_speech_stopped(item_id, self._stream_ms(end_ms))
            case CallerTranscript(item_id=item_id, transcript=transcript):
                self._on_caller_transcript(item_id, transcript.strip() or INAUDIBLE)
            case CallerTranscriptFailed(item_id=item_id, message=message):
                log.warning("call %s: the caller's turn was not transcribed: %s", self._host.context.call_sid, message)
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
        if accepts(self._host.phase, PhaseEvent.REPLY):
            self._host.move(PhaseEvent.REPLY)
        if self._said is not None and not self._said.done():
            self._said.set_result(response)

    def _new_item(self, item_id: str | None, response: _Response | None) -> _AgentItem:
        turn = self._host.turns.place("agent")
        item = _AgentItem(self._host.next_utterance_id(), item_id, response, turn)
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
            item.first_delta_at = self._host.clock()
        response.spoke = True
        item.received_bytes += len(delta.audio)
        self._queue.put_nowait((item, delta.audio))

    async def _on_response_done(self, event: ResponseDone, channel: RealtimeChannel) -> None:
        response = self._response(event.response_id)
        for call in event.function_calls:  # any whose arguments event was missed
            await self._on_function_call(call, channel)
        if event.status not in ("completed", "cancelled"):
            log.warning("call %s: a Realtime response ended %s", self._host.context.call_sid, event.status or "unknown")
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
        self._callee_spoke = True
        host = self._host
        self._reply_to = host.clock()
        start_ms = min(self._caller_started_ms.pop(item_id, end_ms), end_ms)
        if self._realtime.transcription_model:
            self._caller_turns[item_id] = host.turns.place("caller", start_ms, end_ms)
        else:
            host.turns.place("caller", start_ms, end_ms, text=UNTRANSCRIBED)
        host.caller_turn_ended()

    def _on_caller_transcript(self, item_id: str, text: str) -> None:
        turn = self._caller_turns.pop(item_id, None)
        if turn is None:  # a transcript without a speech stop: place it now
            now_ms = self._host.timeline.stream_ms()
            self._host.turns.place("caller", now_ms, now_ms, text=text)
            return
        self._host.turns.settle(turn, text)

    def _settle(self) -> None:
        """Back to listening once nothing is generating, playing or waiting for a function's result."""
        if self._host.phase is CallPhase.RESPONDING and not (self._open_responses or self._unplayed or self._answering):
            self._host.move(PhaseEvent.YIELD)
            self._host.activity()

    # ------------------------------------------------------------------------------------------ playback

    async def _play(self, queue: asyncio.Queue[tuple[_AgentItem, bytes | None]]) -> None:
        """Send queued agent audio to Twilio, paced, item after item; `None` ends an item with its final mark."""
        audio_out, playback = self._host.audio, self._host.playback
        while True:
            item, audio = await queue.get()
            if item.cancelled:
                continue
            if audio is None:
                if playback.utterance(item.utterance_id).sent_ms:
                    await audio_out.finish(item.utterance_id)
                else:
                    self._played_through(item)
                continue
            if item.started_stream_ms is None:
                item.started_stream_ms = self._host.timeline.stream_ms()
            await audio_out.play(item.utterance_id, audio)

    def _played_through(self, item: _AgentItem) -> None:
        item.played_through = True
        self._unplayed.pop(item.utterance_id, None)
        item.finished.set()
        self._host.activity()
        self._close_if_heard(item)
        self._settle()

    def _close_if_heard(self, item: _AgentItem) -> None:
        if item.played_through and item.transcript_done:
            self._close(item, interrupted=False)

    async def _restart_player(self) -> None:
        """Drop the audio queued for the player (and stop what it is sending) before a clear."""
        old, self._queue = self._player, asyncio.Queue()
        if old is not None and old is not asyncio.current_task():
            old.cancel()
            await asyncio.wait({old})
        self._player = self._spawn(self._play(self._queue), "player")

    async def _cut_agent(self, why: str, *, barge_in: bool, model: RealtimeChannel | None) -> None:
        """Stop the agent: cancel what is generating, clear Twilio, truncate each item at what was heard (and tell
        the model, when it is still there to be told)."""
        responses = list(self._open_responses.values())
        items = list(self._unplayed.values())
        if not (responses or items):
            return
        log.info("call %s: agent cut off (%s)", self._host.context.call_sid, why)
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
        if model is not None:
            await self._restart_player()
        playback = self._host.playback
        # What the marks confirmed: a lower bound on what the caller heard, never past it, nor past what came.
        heard = {i.utterance_id: min(playback.utterance(i.utterance_id).played_ms, i.received_ms) for i in items}
        if any(playback.utterance(item.utterance_id).sent_ms for item in items):
            await self._host.audio.clear()
        if model is not None:
            for response in responses:
                await model.cancel_response(response.response_id)
        for item in items:
            # Audio still queued here was never heard either: the model must forget it too (truncate at 0).
            if model is not None and item.item_id is not None and item.received_bytes:
                await model.truncate(item.item_id, heard[item.utterance_id])
            self._close(item, interrupted=True, played_ms=heard[item.utterance_id])
        self._settle()

    # ------------------------------------------------------------------------------------------ turns

    def _close(self, item: _AgentItem, *, interrupted: bool, played_ms: int = 0) -> None:
        """Settle an agent item's turn: what was heard of it, when, and how long the caller waited for it."""
        if item.closed:
            return
        item.closed = True
        item.finished.set()
        turns, turn = self._host.turns, item.turn
        sent_ms = self._host.playback.utterance(item.utterance_id).sent_ms
        if not sent_ms:
            turns.drop(turn)  # nothing reached the caller
            return
        heard_ms = played_ms if interrupted else sent_ms
        turn.start_ms = item.started_stream_ms or 0
        turn.end_ms = turn.start_ms + heard_ms
        turn.interrupted = interrupted
        response = item.response
        if response is not None and response.reply_to is not None:
            stages = {
                "modelFirstAudio": item.first_delta_at,
                "firstFrameSent": self._host.audio.first_audio_at.get(item.utterance_id),
                "firstMarkEchoed": item.first_mark_at,
            }
            turns.time(turn, response.reply_to, stages)
            if turn.latency is not None:
                response.reply_to = None  # one latency per response: its first item
        turns.settle(turn, item.heard_text(played_ms) if interrupted else item.text())

    # ------------------------------------------------------------------------------------------ functions

    async def _on_function_call(self, call: FunctionCall, channel: RealtimeChannel) -> None:
        if call.call_id in self._calls_seen:
            return
        self._calls_seen.add(call.call_id)
        response = self._response(call.response_id)
        if response.cancelled:
            log.info("call %s: %s from a cut-off response ignored", self._host.context.call_sid, call.name)
            return
        arguments = parse_arguments(call.arguments)
        log.info("call %s: the model calls %s", self._host.context.call_sid, call.name)
        if call.name == END_CALL:
            self._end_after_speaking(response, _short(arguments.get("reason")) or None)
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
            if response.cancelled or self._ending is not None or self._host.phase is not CallPhase.RESPONDING:
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
            return f"error: {exc}; use 1 to 32 of 0-9, *, # and w"
        item = self._new_item(None, None)
        item.transcript = [f"[DTMF {digits}]"]
        item.transcript_done = True
        item.received_bytes = len(tones)
        self._queue.put_nowait((item, tones))
        self._end_item(item)
        if accepts(self._host.phase, PhaseEvent.REPLY):
            self._host.move(PhaseEvent.REPLY)
        return DTMF_SENT

    def _transfer_or_refuse(self, response: _Response, call_id: str, arguments: dict[str, Any]) -> str | None:
        """Start a transfer once the agent's words have played; or the reason it cannot be done, for the model."""
        given = _short(arguments.get("phone_number"), 40)
        if not self._can_transfer:
            return "error: this line cannot transfer calls; tell the caller and offer to help otherwise"
        number = _e164(given)
        if number is None:
            return (
                f"error: {given!r} is not a valid phone number, so the call was not transferred; ask the caller for "
                "the full number with its country code, or tell them you cannot transfer"
            )
        reason = _short(arguments.get("reason")) or None
        self._end_after_speaking(response, reason, transfer_to=number, call_id=call_id)
        return None

    # ------------------------------------------------------------------------------------------- ending

    def _end_after_speaking(
        self, response: _Response, detail: str | None, *, transfer_to: str | None = None, call_id: str = ""
    ) -> None:
        if self._ending is not None or not accepts(self._host.phase, PhaseEvent.WIND_DOWN):
            return
        if transfer_to is None:
            self._host.move(PhaseEvent.WIND_DOWN)  # no barge-in on the last words; a transfer may still fail
        self._ending = self._spawn(self._finish_then_end(response, detail, transfer_to, call_id), "ending")

    async def _finish_then_end(
        self, response: _Response, detail: str | None, transfer_to: str | None, call_id: str
    ) -> None:
        await self._agent_finished(response)
        if transfer_to is None:
            await self._host.hang_up(EndReason.AGENT_HANGUP, detail)
            return
        if await self._host.transfer(transfer_to, detail):
            return
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
        playback = self._host.playback
        remaining_ms = sum(max(0, i.received_ms - playback.utterance(i.utterance_id).played_ms) for i in pending)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(item.finished.wait() for item in pending)),
                timeout=remaining_ms / 1000 + HANGUP_GRACE_SECONDS,
            )
