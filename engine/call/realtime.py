"""The speech-to-speech conversation driver: OpenAI Realtime hears, thinks and speaks; the call does the rest.

Caller frames go to the model as they come (mu-law both ways) over its connection (realtime_connection, which
also reopens it once when it drops). The model's audio is queued per assistant item to a player task that paces
it to Twilio with marks (realtime_voice), so reading the model's events never waits on playback. A barge-in
clears Twilio and truncates the item where the clear cut the recording: where the caller stopped hearing it.
Function calls end the call, transfer it, press keys or call the organization's webhooks (realtime_functions). A
path's gather node takes the caller's keys, its wait for each key timed by the call (key_wait).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from dataclasses import dataclass
from typing import Final

from openai import AsyncOpenAI

from config.agent import OpenAIRealtimeConfig
from engine.call.driver import (
    CallHost,
    ControlRefused,
    ConversationUnavailable,
    DriverFactory,
)
from engine.call.key_wait import KeyWait
from engine.call.phases import CallPhase, PhaseEvent, accepts
from engine.call.realtime_connection import RealtimeConnection
from engine.call.realtime_functions import ModelFunctions
from engine.call.realtime_path import RealtimePath, offered
from engine.call.realtime_voice import RESPONSE_GRACE_SECONDS, ModelResponse, ModelVoice
from engine.call.turns import TRANSCRIPTION_FAILED, Turn
from engine.server import metrics
from media.g711 import FRAME_BYTES
from media.twilio_stream import MarkFlushed, MarkPlayed
from media.vad import VoiceActivityDetector
from pipelines.conversation.turn_taking import BargeInPolicy
from pipelines.llm.base import MessageRole
from pipelines.paths.chat import ChatPath
from pipelines.realtime.openai_realtime import (
    AudioDelta,
    AudioDone,
    CallerTranscript,
    CallerTranscriptDelta,
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
    say_exactly,
)
from pipelines.tools import ToolRunner
from storage.end_reasons import EndReason

__all__ = ["INAUDIBLE", "TRANSCRIPTION_FAILED", "UNTRANSCRIBED", "RealtimeDriver", "realtime_driver"]

log = logging.getLogger(__name__)

UNTRANSCRIBED: Final = "[speech, not transcribed]"
"""A caller turn's text when the agent has no `transcription_model`: the model heard it, nothing wrote it down."""
INAUDIBLE: Final = "[inaudible]"
"""A caller turn whose transcription is empty."""
# Errors the server answers to a cancel or truncate that raced with its own barge-in handling: expected, not news.
_RACE_ERRORS: Final = frozenset({"response_cancel_not_active", "item_truncate_invalid_item_id"})
_ACTIVE_RESPONSE: Final = "conversation_already_has_active_response"
LINE_METADATA_KEY: Final = "dialtone_line"
"""The `response.create` metadata key naming a line `say()` asked for, which its `response.created` carries back:
a response the server's VAD started for the caller meanwhile is not the line."""
SAY_ATTEMPTS: Final = 3
"""How often `say()` asks for its line when the server refuses it for a response of its own under way (the
caller's turn ended just as the line was asked for): each time once that response is over."""


@dataclass(slots=True)
class _PendingLine:
    """A line `say()` asked for: the id of its latest `response.create`, and its response once it has started (None
    when the server refused that request)."""

    request_id: str
    started: asyncio.Future[ModelResponse | None]


def realtime_driver(
    *,
    client: AsyncOpenAI,
    realtime: OpenAIRealtimeConfig,
    instructions: str,
    tools: ToolRunner | None = None,
    first_sentence: str | None = None,
    can_transfer: bool = True,
    path: ChatPath | None = None,
) -> DriverFactory:
    """A factory for the speech-to-speech driver of a call on `realtime` (the provider entry whose key was found)."""
    return functools.partial(
        RealtimeDriver,
        client=client,
        realtime=realtime,
        instructions=instructions,
        tools=tools,
        first_sentence=first_sentence,
        can_transfer=can_transfer,
        path=path,
    )


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
        path: ChatPath | None = None,
    ) -> None:
        """Converse in `host`'s call through `client` (following `path`, if given)."""
        self._host = host
        self._realtime = realtime
        self._first_sentence = first_sentence
        self._lines: dict[str, _PendingLine] = {}  # lines asked for and not started yet, by their metadata tag
        self._line_ids = itertools.count(1)
        self._voice = ModelVoice(host, on_idle=self._settle)
        self._connection = RealtimeConnection(
            host,
            client=client,
            realtime=realtime,
            instructions=lambda: self._path.instructions(instructions) if self._path else instructions,
            functions=lambda: offered(self._path, [*self._functions.builtins(), *(tools.specs if tools else [])]),
            on_lost=self._session_lost,
            on_reopened=self._reopened,
        )
        self._spawn = self._connection.spawn
        self._path = RealtimePath(host, path, say=self.say, refresh=self._connection.refresh) if path else None
        if path is not None and path.path_id is not None:
            host.turns.trace_path(path.path_id, path.engine)
        self._key_wait = (
            KeyWait(host, path.engine, caller_speaking=lambda: self._caller_speaking, timed_out=self._keys_timed_out)
            if path is not None
            else None
        )
        self._functions = ModelFunctions(
            host,
            self._voice,
            channel=lambda: self._connection.channel,
            answer=self._answer,
            spawn=self._spawn,
            spawn_ending=self._connection.spawn_lasting,
            on_idle=self._settle,
            tools=tools,
            can_transfer=can_transfer,
            say=self.say,
            path=self._path,
        )
        self._caller_turns: dict[str, Turn] = {}  # awaiting their transcript, by item id
        self._caller_words: dict[str, str] = {}  # the transcription so far of turns still being transcribed
        self._caller_started_ms: dict[str, int] = {}
        self._caller_speaking = False
        self._input_origin_ms: int | None = None  # stream time of the first audio the model got
        self._reply_to: float | None = None
        interruption = host.config.interruption
        self._barge_in = BargeInPolicy.of(
            enabled=interruption.enabled,
            threshold_ms=interruption.threshold_ms,
            min_words=interruption.min_words,
            backchannel_words=interruption.backchannel_words,
        )
        self._vad = VoiceActivityDetector()  # run only while the agent's audio plays: the overlap count
        self._callee_spoke = False
        self._messages: list[tuple[MessageRole, str]] = []  # added through the API: replayed on a reopened session
        self._queued_lines = asyncio.Lock()
        self._closed = False

    # ------------------------------------------------------------------------------------ ConversationDriver

    async def start(self) -> None:
        """Connect and configure the model; then the sender, the player and the event reader run."""
        try:
            channel = await self._connection.open()
        except (RealtimeUnavailable, RealtimeConnectionLost) as exc:
            raise ConversationUnavailable(EndReason.REALTIME_UNAVAILABLE, str(exc)) from exc
        self._voice.start_player()
        self._connection.start_sender()
        self._spawn(self._converse(channel), "realtime")

    def open(self) -> None:
        """Say the first sentence; without one the caller speaks first (or the model greets, if asked to)."""
        channel = self._connection.channel
        if channel is None or not accepts(self._host.phase, PhaseEvent.REPLY):
            return
        self._spawn(self._open(channel), "open")

    @property
    def caller_speaking(self) -> bool:
        """Whether the model's VAD hears the caller now."""
        return self._caller_speaking

    @property
    def listening_closely(self) -> bool:
        """Always: the model's own VAD ends the caller's turns, on audio it gets as it comes."""
        return True

    def on_caller_audio(self, payload: bytes, at_ms: int) -> None:
        """Queue one caller frame for the model (the sender batches what piles up)."""
        if self._input_origin_ms is None:
            self._input_origin_ms = at_ms
        self._connection.send_audio(payload)
        if not self._voice.unplayed:
            self._barge_in.reset()
        elif len(payload) == FRAME_BYTES:
            # The agent's words are playing: the engine, not the server, decides when the caller takes the floor,
            # with the agent's threshold (the server's VAD would cut at the first syllable). An ending call's last
            # words (a goodbye) are not the caller's to cut: only a reply is.
            self._vad.process_ulaw(payload)
            voiced = self._vad.last_frame_voiced
            taking_floor = self._barge_in.frame(
                voiced=voiced, caller_speaking=self._caller_speaking, agent_speaking=True
            )
            if taking_floor and self._host.phase is CallPhase.RESPONDING:
                self._barge_in.reset()
                self._spawn(self._cut_agent("caller speech", barge_in=True, model=self._connection.channel), "barge-in")

    def on_caller_key(self, digit: str) -> None:
        """A key the caller pressed: a turn of its own, told to the model as text (it cannot hear Twilio's events)."""
        self._spawn(self._caller_key(digit), "key")

    def on_mark(self, event: MarkPlayed | MarkFlushed) -> None:
        """A played mark: the item is being heard; its final one: heard through."""
        self._voice.on_mark(event)

    async def interrupt(self, why: str) -> None:
        """Stop the agent now: cancel what is generating, clear Twilio, truncate each item at what was heard."""
        await self._cut_agent(why, barge_in=False, model=self._connection.channel)

    async def say(self, text: str) -> None:
        """Have the model say `text` word for word and wait (bounded) until it was heard.

        The line's response is told from others by its metadata: a response the server's VAD starts for the caller
        meanwhile is not waited on as the line, and a request the server refuses for it is made again after it.
        """
        channel = self._connection.channel
        if channel is None:
            return
        call_sid = self._host.context.call_sid
        tag = f"line_{next(self._line_ids)}"
        response: ModelResponse | None = None
        try:
            for attempt in range(1, SAY_ATTEMPTS + 1):
                line = self._lines[tag] = _PendingLine(f"{tag}_{attempt}", asyncio.get_running_loop().create_future())
                await channel.create_response(
                    say_exactly(text), metadata={LINE_METADATA_KEY: tag}, event_id=line.request_id
                )
                try:
                    response = await asyncio.wait_for(line.started, timeout=RESPONSE_GRACE_SECONDS)
                except TimeoutError:
                    log.warning("call %s: the model did not start saying %r", call_sid, text[:40])
                    return
                if response is not None:
                    break
        finally:
            self._lines.pop(tag, None)
        if response is None:
            log.warning("call %s: the model refused %d times to say %r", call_sid, SAY_ATTEMPTS, text[:40])
            return
        await self._voice.finished(response)

    async def say_line(self, text: str, *, interrupt: bool) -> bool:
        """Have the model say `text` word for word as a response of its own: cutting what it says (True when
        something was cut) or once it is quiet, one queued line after another."""
        channel = self._open_channel()
        if not interrupt:
            self._spawn(self._say_when_quiet(text), "queued line")
            return False
        cut = self._voice.speaking
        await self._cut_agent("a line said through the API", barge_in=False, model=channel)
        self._spawn(self.say(text), "line")
        return cut

    async def add_message(self, content: str, role: MessageRole) -> None:
        """Add the message to the model's conversation (conversation.item.create), for its next responses."""
        await self._open_channel().send_message(role, content)
        self._messages.append((role, content))

    def _open_channel(self) -> RealtimeChannel:
        channel = self._connection.channel
        if channel is None:
            raise ControlRefused("the speech-to-speech model's connection is being reopened; try again shortly")
        return channel

    async def _say_when_quiet(self, text: str) -> None:
        await self._host.opened.wait()
        async with self._queued_lines:
            await self._voice.quiet()
            if accepts(self._host.phase, PhaseEvent.REPLY):
                await self.say(text)

    async def close(self) -> None:
        """Settle what was being said, then close the connection (its errors are logged, never raised)."""
        if self._closed:
            return
        self._closed = True
        self._stop_key_wait()
        await self._connection.stop_tasks()
        self._voice.close_all()
        await self._connection.close()

    # ------------------------------------------------------------------------------------------ the call

    async def _session_lost(self) -> None:
        """The model's session is gone: the agent stops, and the caller's turns it had yet to transcribe never will
        be (settled as failed, so that the conversation replayed to the next session has them, in order)."""
        await self._cut_agent("connection lost", barge_in=False, model=None)
        self._caller_speaking = False
        for item_id in list(self._caller_turns):
            await self._on_caller_event(CallerTranscriptFailed(item_id, "the Realtime session was lost"))

    async def _reopened(self, channel: RealtimeChannel) -> None:
        """Go on conversing on a reopened connection; answer the caller if they were waiting for it."""
        self._spawn(self._converse(channel), "realtime")
        if self._host.phase is CallPhase.RESPONDING:
            self._host.move(PhaseEvent.YIELD)
        for role, content in self._messages:
            await channel.send_message(role, content)
        heard = self._host.turns.heard
        if self._host.phase is CallPhase.LISTENING and heard and heard[-1][0] == "caller":
            self._reply_to = self._host.clock()  # the caller was waiting for an answer
            await channel.create_response()

    async def _open(self, channel: RealtimeChannel) -> None:
        if self._host.phase is not CallPhase.LISTENING and self._host.phase is not CallPhase.RESPONDING:
            return
        await self._connection.release_replies(channel)  # from now on the model answers the caller by itself
        opening = " ".join(filter(None, [self._first_sentence, await self._path.opening() if self._path else None]))
        if self._path is not None:
            await self._connection.refresh()  # the start node's instructions and ways
        if opening:
            await channel.create_response(say_exactly(opening))
        elif self._host.config.model_greets or self._callee_spoke:
            await channel.create_response()

    async def _caller_key(self, digit: str) -> None:
        host = self._host
        channel = self._connection.channel
        if channel is None or not accepts(host.phase, PhaseEvent.REPLY):
            return
        self._stop_key_wait()
        if host.config.interruption.enabled:
            await self._cut_agent("caller key", barge_in=True, model=channel)
        now_ms = host.timeline.stream_ms()
        host.turns.place("caller", now_ms, now_ms, text=f"[DTMF {digit}]")
        taken = await self._path.key(digit) if self._path is not None else None  # a gather node's, or the model's
        if host.caller_turn_ended():
            return
        if taken is False:
            self._arm_key_wait()  # more digits are awaited
            return
        self._reply_to = host.clock()
        if taken is None:
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
            case CallerTranscriptDelta(item_id=item_id, delta=delta):
                self._on_caller_words(item_id, delta)
            case ServerError(code=code):
                line_refused = code == _ACTIVE_RESPONSE and self._line_refused(event.event_id)
                level = logging.DEBUG if code in _RACE_ERRORS or line_refused else logging.WARNING
                log.log(level, "call %s: Realtime error %s", self._host.context.call_sid, event)
            case _:
                await self._on_agent_event(event)

    async def _on_caller_event(
        self, event: SpeechStarted | SpeechStopped | CallerTranscript | CallerTranscriptFailed
    ) -> None:
        match event:
            case SpeechStarted(item_id=item_id, audio_start_ms=start_ms):
                self._stop_key_wait()
                self._caller_speaking = True
                self._host.activity()
                self._caller_started_ms[item_id] = self._stream_ms(start_ms)
            case SpeechStopped(item_id=item_id, audio_end_ms=end_ms):
                self._on_speech_stopped(item_id, self._stream_ms(end_ms))
            case CallerTranscript(item_id=item_id, transcript=transcript):
                self._caller_words.pop(item_id, None)
                self._on_caller_transcript(item_id, transcript.strip() or INAUDIBLE)
                if self._path is not None:
                    self._path.heard(item_id, transcript.strip())
            case CallerTranscriptFailed(item_id=item_id, message=message):
                self._caller_words.pop(item_id, None)
                log.warning("call %s: the caller's turn was not transcribed: %s", self._host.context.call_sid, message)
                self._on_caller_transcript(item_id, TRANSCRIPTION_FAILED)
                if self._path is not None:
                    self._path.heard(item_id, "")

    async def _on_agent_event(self, event: RealtimeEvent) -> None:
        match event:
            case AudioDelta(response_id=response_id, item_id=item_id, audio=audio):
                self._voice.audio(response_id, item_id, audio)
            case TranscriptDelta(item_id=item_id, delta=delta):
                self._voice.transcript_delta(item_id, delta)
            case TranscriptDone(item_id=item_id, transcript=transcript):
                self._voice.transcript_done(item_id, transcript)
            case AudioDone(item_id=item_id):
                self._voice.audio_done(item_id)
            case ResponseCreated(response_id=response_id, metadata=metadata):
                self._on_response_created(response_id, metadata.get(LINE_METADATA_KEY))
            case OutputItemAdded(response_id=response_id, item_id=item_id, item_type="message"):
                self._voice.item_added(response_id, item_id)
            case FunctionCall():
                await self._functions.called(event)
            case ResponseDone():
                await self._on_response_done(event)
            case _:
                pass  # function_call output items: their arguments come complete in FunctionCall

    def _on_response_created(self, response_id: str, line_tag: str | None) -> None:
        response = self._voice.created(response_id, self._reply_to)
        self._reply_to = None
        if accepts(self._host.phase, PhaseEvent.REPLY):
            self._host.move(PhaseEvent.REPLY)
        line = self._lines.get(line_tag) if line_tag else None
        if line is not None and not line.started.done():
            line.started.set_result(response)

    def _line_refused(self, request_id: str) -> bool:
        """The server refused a line's request (a response of its own was under way): `say()` asks again."""
        for line in self._lines.values():
            if line.request_id == request_id and not line.started.done():
                line.started.set_result(None)
                return True
        return False

    async def _on_response_done(self, event: ResponseDone) -> None:
        response = self._voice.response(event.response_id)
        for call in event.function_calls:  # any whose arguments event was missed
            await self._functions.called(call)
        if event.status not in ("completed", "cancelled", "failed"):  # a failed one loses the session (the channel's)
            log.warning("call %s: a Realtime response ended %s", self._host.context.call_sid, event.status or "unknown")
        self._voice.response_done(response)
        self._settle()

    def _on_speech_stopped(self, item_id: str, end_ms: int) -> None:
        self._caller_speaking = False
        self._callee_spoke = True
        host = self._host
        self._reply_to = host.clock()
        start_ms = min(self._caller_started_ms.pop(item_id, end_ms), end_ms)
        if self._realtime.transcription_model:
            self._caller_turns[item_id] = host.turns.place("caller", start_ms, end_ms)
            if self._path is not None:
                self._path.caller_turn_ended(item_id)
        else:
            host.turns.place("caller", start_ms, end_ms, text=UNTRANSCRIBED)
        host.caller_turn_ended()

    def _on_caller_words(self, item_id: str, delta: str) -> None:
        """More of a caller turn's transcription: the words of that turn so far, as caller.interim."""
        so_far = self._caller_words.get(item_id, "") + delta
        self._caller_words[item_id] = so_far
        if so_far.strip():
            self._host.live.emit("caller.interim", text=so_far.strip())

    def _on_caller_transcript(self, item_id: str, text: str) -> None:
        turn = self._caller_turns.pop(item_id, None)
        if turn is None:  # a transcript without a speech stop: place it now
            now_ms = self._host.timeline.stream_ms()
            self._host.turns.place("caller", now_ms, now_ms, text=text)
            return
        self._host.turns.settle(turn, text)

    def _settle(self) -> None:
        """Back to listening once nothing is generating, playing or waiting for a function's result."""
        if self._host.phase is CallPhase.RESPONDING and not (self._voice.speaking or self._functions.answering):
            self._host.move(PhaseEvent.YIELD)
            self._host.activity()
            self._arm_key_wait()

    def _arm_key_wait(self) -> None:
        if self._key_wait is not None:
            self._key_wait.arm()

    def _stop_key_wait(self) -> None:
        if self._key_wait is not None:
            self._key_wait.cancel()

    def _keys_timed_out(self) -> None:
        self._spawn(self._act_on_key_timeout(), "key timeout")

    async def _act_on_key_timeout(self) -> None:
        """A gather node's wait for a key ran out: the path completes it or says it again; the model may speak."""
        channel = self._connection.channel
        if self._path is None or channel is None:
            return
        if await self._path.keys_timed_out():
            self._reply_to = self._host.clock()
            await channel.create_response()
        elif self._host.phase is CallPhase.LISTENING:
            self._arm_key_wait()  # nothing was said (a gather node without text): wait again

    async def _answer(self, reply_to: float | None) -> None:
        """Ask the model to go on (after function outputs), timing it from `reply_to`."""
        channel = self._connection.channel
        if channel is not None:
            self._reply_to = reply_to
            await channel.create_response()

    async def _cut_agent(self, why: str, *, barge_in: bool, model: RealtimeChannel | None) -> None:
        """Stop the agent where the caller stopped hearing it, and tell the model (when it is there to be told)."""
        if not self._voice.speaking:
            return
        log.info("call %s: agent cut off (%s)", self._host.context.call_sid, why)
        if barge_in:
            metrics.BARGE_INS.inc()
        cut = await self._voice.cut()
        if model is not None:
            for response in cut.responses:
                await model.cancel_response(response.response_id)
            for item, heard_ms in cut.items:
                # Audio still queued here was never heard either: the model must forget it too (truncate at 0).
                if item.item_id is not None and item.received_bytes:
                    await model.truncate(item.item_id, heard_ms)
        self._settle()
