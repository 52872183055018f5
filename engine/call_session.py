"""One phone call on the media WebSocket: listen, take turns, speak, handle barge-in, end cleanly.

The session is driven by Twilio's frames (parsed by media.twilio_stream) and by its pipeline's events. Its
state machine has named states; the audio path (one caller frame) does only cheap work: decode, VAD, hand
the frame to the recognizer and the recorder. Replies run as one cancellable task at a time; database
writes go through the per-call CallLogWriter, never awaited on the audio path.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from config.agent import AgentConfiguration
from engine.call_log_writer import CallLogWriter, CallOutcome, TurnRecord
from engine.outbound_audio import OutboundAudio, SendText, StreamTimeline
from media.g711 import ulaw_to_pcm16
from media.recording import StereoWavRecorder
from media.twilio_stream import (
    DtmfReceived,
    MarkFlushed,
    MarkPlayed,
    MediaReceived,
    Started,
    Stopped,
    StreamEvent,
    StreamProtocolError,
    TwilioStream,
)
from media.vad import SpeechStarted as VadSpeechStarted
from media.vad import VoiceActivityDetector
from pipelines.chunker import SentenceChunker
from pipelines.llm.base import ConversationTurn, EndCall, LLMError, TextDelta
from pipelines.registry import Pipeline
from pipelines.stt.base import EndOfTurn, SpeechStarted, STTError, TranscriptUpdate
from pipelines.tts.base import TTSError
from storage.enums import CallStatus

log = logging.getLogger(__name__)

DEFAULT_GOODBYE = "Thank you for calling. Goodbye."
HANGUP_GRACE_SECONDS = 5.0
DEFAULT_MS_PER_CHAR = 65.0  # about 170 words a minute, until the call's own speech says otherwise


class SessionState(enum.Enum):
    """Where a call session is."""

    LISTENING = "listening"  # the caller has the floor
    RESPONDING = "responding"  # the agent is thinking or speaking
    ENDING = "ending"  # the end is decided; the last words may still be playing
    ENDED = "ended"


class InvalidSessionTransition(RuntimeError):
    """A session state change the state machine does not allow."""


_ALLOWED = {
    SessionState.LISTENING: {SessionState.RESPONDING, SessionState.ENDING, SessionState.ENDED},
    SessionState.RESPONDING: {SessionState.LISTENING, SessionState.ENDING, SessionState.ENDED},
    SessionState.ENDING: {SessionState.ENDED},
    SessionState.ENDED: set(),
}


@dataclass(slots=True)
class _Span:
    """Where one sentence falls in its utterance's audio."""

    text: str
    start_ms: int
    end_ms: int
    complete: bool = False


@dataclass(slots=True)
class _AgentUtterance:
    """One agent turn being spoken: its sentences and where each falls in the utterance's audio."""

    utterance_id: int
    reply_to_ms: float | None  # monotonic time the caller's turn ended, for latency
    sentences: list[_Span] = field(default_factory=list)
    audio_ms: int = 0
    started_stream_ms: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    recorded: bool = False

    def heard_text(self, played_ms: int, ms_per_char: float) -> str:
        """The words the caller heard when playback stopped at `played_ms` of this utterance.

        A sentence still being synthesized has no known end yet: it is taken to last `ms_per_char` per character
        (this call's speaking rate so far), or as long as its audio already sent, whichever is longer.
        """
        heard: list[str] = []
        for span in self.sentences:
            end = span.end_ms if span.complete else max(span.end_ms, span.start_ms + len(span.text) * ms_per_char)
            if end <= played_ms:
                heard.append(span.text)
                continue
            if span.start_ms < played_ms:
                words = span.text.split()
                share = (played_ms - span.start_ms) / max(1.0, end - span.start_ms)
                heard.append(" ".join(words[: int(len(words) * share)]))
            break
        return " ".join(h for h in heard if h).strip()


@dataclass(frozen=True, slots=True)
class CallContext:
    """What the session needs to know about its call."""

    call_log_id: str
    organization_id: str
    agent_id: str
    call_sid: str


HangUp = Callable[[str], Awaitable[bool]]


class CallSession:
    """Runs one call from Twilio's `start` to the finished CallLog."""

    def __init__(
        self,
        *,
        context: CallContext,
        config: AgentConfiguration,
        pipeline: Pipeline,
        stream: TwilioStream,
        send: SendText,
        writer: CallLogWriter,
        recorder: StereoWavRecorder | None = None,
        hang_up: HangUp | None = None,
        first_sentence: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Prepare a session; `stream` must already have seen Twilio's `start`."""
        self.context = context
        self._config = config
        self._pipeline = pipeline
        self._stream = stream
        self._send = send
        self._writer = writer
        self._recorder = recorder
        self._hang_up = hang_up
        self._first_sentence = first_sentence if first_sentence is not None else config.first_sentence
        self._clock = clock
        self._timeline = StreamTimeline(clock)
        self._out = OutboundAudio(stream, send, self._timeline, recorder, clock=clock)
        self._vad = VoiceActivityDetector(stop_ms=config.endpointing.silence_ms)
        self.state = SessionState.LISTENING
        self._started_at = clock()
        self._turn_index = 0
        self._next_utterance = 1
        self._conversation: list[ConversationTurn] = []
        self._utterances: dict[int, _AgentUtterance] = {}
        self._reply: asyncio.Task[None] | None = None
        self._current: _AgentUtterance | None = None
        self._caller_speech_started_ms: int | None = None
        self._caller_speech_ended_at: float | None = None
        self._pending_caller_text: list[str] = []
        self._last_activity = clock()
        self._ended = asyncio.Event()
        self._end_status = CallStatus.COMPLETED
        self._end_reason = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._latencies: list[int] = []
        self._spoken_ms = 0
        self._spoken_chars = 0

    # ------------------------------------------------------------------------------------------- lifecycle

    async def run(self, frames: AsyncIterator[str]) -> CallOutcome:
        """Run the call until it ends; return how it ended (the CallLog is finished by then)."""
        try:
            await self._pipeline.stt.start()
        except STTError as exc:
            self._end(CallStatus.FAILED, f"stt_unavailable: {exc}")
        self._writer.start()
        self._tasks = [
            self._spawn(self._read(frames), "read"),
            self._spawn(self._listen(), "stt"),
        ]
        loop = asyncio.get_running_loop()
        max_duration = loop.call_later(self._config.max_duration_seconds, self._on_max_duration)
        if not self._ended.is_set():
            opening = [self._first_sentence] if self._first_sentence else []
            self._start_reply(opening, ask_model=True, reply_to=None)
        try:
            await self._ended.wait()
        finally:
            max_duration.cancel()
            outcome = await self._shut_down()
        return outcome

    def _spawn(self, work: Coroutine[Any, Any, None], role: str) -> asyncio.Task[None]:
        """Run part of the call as a task whose unexpected failure ends this call (FAILED), never the engine."""
        task = asyncio.create_task(work, name=f"call-{self.context.call_sid}-{role}")
        task.add_done_callback(self._supervise)
        return task

    def _supervise(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("call %s: %s failed", self.context.call_sid, task.get_name(), exc_info=exc)
        self._end(CallStatus.FAILED, f"internal_error: {type(exc).__name__}")

    def _end(self, status: CallStatus, reason: str) -> None:
        """Decide the call is over (first reason wins); run() then shuts everything down."""
        if self._ended.is_set():
            return
        self._end_status, self._end_reason = status, reason
        self.state = SessionState.ENDED
        self._ended.set()

    def end_from_outside(self, reason: str) -> None:
        """End the call for a reason outside it (e.g. the engine shutting down)."""
        self._end(CallStatus.FAILED, reason)

    async def _shut_down(self) -> CallOutcome:
        if self._reply is not None:
            self._reply.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reply
        if self._current is not None:
            self._record_agent_turn(self._current, interrupted=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for closer in (self._pipeline.stt.close, self._pipeline.llm.close, self._pipeline.tts.close):
            try:
                await closer()
            except Exception:  # a provider failing to close must not stop the CallLog being finished
                log.exception("call %s: closing a provider failed", self.context.call_sid)
        duration_s = round(self._clock() - self._started_at)
        outcome = CallOutcome(
            status=self._end_status,
            end_reason=self._end_reason,
            duration_s=duration_s,
            recording_url=None,
        )
        log.info("call %s ended: %s (%s, %d s)", self.context.call_sid, self._end_reason, self._end_status, duration_s)
        return outcome

    def _set_state(self, new: SessionState) -> None:
        if self.state is new:
            return
        if new not in _ALLOWED[self.state]:
            raise InvalidSessionTransition(f"{self.state.value} -> {new.value}")
        self.state = new

    # ------------------------------------------------------------------------------------------ caller side

    async def _read(self, frames: AsyncIterator[str]) -> None:
        """Feed Twilio's frames through the protocol; the call ends when they stop."""
        try:
            async for text in frames:
                for event in self._stream.receive_text(text):
                    self._on_stream_event(event)
                if self._ended.is_set():
                    return
        except StreamProtocolError as exc:
            log.warning("call %s: protocol error: %s", self.context.call_sid, exc)
            self._end(CallStatus.FAILED, f"protocol_error: {type(exc).__name__}: {exc}")
            return
        self._end(CallStatus.FAILED, "stream_lost")

    def _on_stream_event(self, event: StreamEvent) -> None:
        match event:
            case MediaReceived():
                self._on_caller_audio(event)
            case DtmfReceived(digit=digit):
                now_ms = self._timeline.stream_ms()
                self._caller_speech_ended_at = self._clock()
                self._on_caller_turn(f"[DTMF {digit}]", now_ms, now_ms)
            case MarkPlayed() | MarkFlushed():
                self._on_mark(event)
            case Stopped():
                self._end(CallStatus.COMPLETED, self._end_reason_after_stop())
            case Started():
                pass  # seen by the media socket before the session began
            case _:
                pass  # connected, gaps and unknown marks carry nothing the session acts on

    def _end_reason_after_stop(self) -> str:
        # After our own hang-up Twilio sends `stop` too: keep the reason the agent ended for.
        if self.state is SessionState.ENDING and self._end_reason:
            return self._end_reason
        return "caller_hangup"

    def _on_caller_audio(self, media: MediaReceived) -> None:
        """The audio path: one caller frame. Cheap work only."""
        self._timeline.observe(media.timestamp_ms)
        self._pipeline.stt.send_audio(media.payload)
        if self._recorder is not None:
            self._recorder.write_caller(media.payload, media.timestamp_ms)
        if len(media.payload) != 160:
            return  # the VAD takes 20 ms frames; Twilio sends those in practice
        vad_event = self._vad.process(ulaw_to_pcm16(media.payload).tobytes())
        now = self._clock()
        if isinstance(vad_event, VadSpeechStarted):
            self._caller_speech_started_ms = vad_event.at_ms
        elif vad_event is not None:  # speech stopped
            self._caller_speech_ended_at = now - self._config.endpointing.silence_ms / 1000
            self._last_activity = now
            if self._pending_caller_text:
                # The recognizer gave final words but no end of turn: the silence decides.
                self._take_pending_caller_turn(vad_event.at_ms)
        if self._vad.speaking:
            self._last_activity = now
            interruption = self._config.interruption
            if interruption.enabled and self._agent_is_speaking() and self._vad.speech_ms >= interruption.threshold_ms:
                self._barge_in("caller speech")
        elif (
            self.state is SessionState.LISTENING
            and self._reply is None
            and now - self._last_activity > self._config.silence_timeout_seconds
        ):
            self._say_goodbye("silence_timeout")

    async def _listen(self) -> None:
        """Consume the recognizer's events."""
        try:
            async for event in self._pipeline.stt.events():
                match event:
                    case SpeechStarted():
                        self._last_activity = self._clock()
                    case TranscriptUpdate(text=text, is_final=is_final):
                        self._on_transcript(text, is_final)
                    case EndOfTurn(text=text, at_ms=at_ms):
                        if text.strip():  # the whole turn's words, replacing the finals gathered so far
                            self._pending_caller_text = [text.strip()]
                        self._take_pending_caller_turn(at_ms)
        except STTError as exc:
            log.error("call %s: speech recognition failed: %s", self.context.call_sid, exc)
            self._end(CallStatus.FAILED, f"stt_failed: {exc}")

    def _on_transcript(self, text: str, is_final: bool) -> None:
        if is_final and text.strip():
            self._pending_caller_text.append(text.strip())
        interruption = self._config.interruption
        words = [w for w in text.lower().split() if w.strip(".,!?") not in interruption.backchannel_words]
        if interruption.enabled and not is_final and self._agent_is_speaking() and len(words) >= interruption.min_words:
            self._barge_in("caller words")

    def _take_pending_caller_turn(self, end_ms: int) -> None:
        text = " ".join(self._pending_caller_text).strip()
        self._pending_caller_text.clear()
        if not text:
            return
        start_ms = self._caller_speech_started_ms if self._caller_speech_started_ms is not None else end_ms
        self._on_caller_turn(text, start_ms, end_ms)

    def _on_caller_turn(self, text: str, start_ms: int, end_ms: int) -> None:
        """The caller finished saying something (or pressed a key): record it and answer."""
        if self.state in (SessionState.ENDING, SessionState.ENDED):
            return
        if self._agent_is_speaking():
            if self._is_backchannel(text):
                return  # "uh-huh" while the agent talks is not a turn
            self._barge_in("caller turn")
        self._record_turn("caller", text, start_ms, end_ms, interrupted=False, latency_ms=None)
        self._conversation.append(ConversationTurn(role="caller", text=text))
        self._caller_speech_started_ms = None
        self._last_activity = self._clock()
        reply_to = self._caller_speech_ended_at or self._clock()
        self._caller_speech_ended_at = None
        self._start_reply([], ask_model=True, reply_to=reply_to)

    def _is_backchannel(self, text: str) -> bool:
        words = [w.strip(".,!?").lower() for w in text.split()]
        return bool(words) and all(w in self._config.interruption.backchannel_words for w in words)

    # ------------------------------------------------------------------------------------------ agent side

    def _agent_is_speaking(self) -> bool:
        return self._current is not None

    def _start_reply(self, sentences: list[str], *, ask_model: bool, reply_to: float | None) -> None:
        if self._reply is not None:
            self._reply.cancel()
        utterance = _AgentUtterance(self._next_utterance, reply_to)
        self._next_utterance += 1
        self._utterances[utterance.utterance_id] = utterance
        self._set_state(SessionState.RESPONDING)
        self._reply = self._spawn(self._respond(utterance, sentences, ask_model), "reply")

    async def _respond(self, utterance: _AgentUtterance, sentences: list[str], ask_model: bool) -> None:
        """Speak fixed sentences, then the model's reply sentence by sentence; end the call if it says so."""
        end_reason: str | None = None
        try:
            chunker = SentenceChunker()
            for text in sentences:
                for sentence in [*chunker.push(text + " "), chunker.flush()]:
                    if sentence:
                        await self._speak(utterance, sentence)
            if ask_model:
                end_reason = await self._speak_model_reply(utterance)
            if utterance.audio_ms:
                await self._out.finish(utterance.utterance_id)
                await utterance.done.wait()  # the final mark came back: the caller heard it all
                self._record_agent_turn(utterance, interrupted=False)
            else:
                self._current = None
        except (LLMError, TTSError) as exc:
            log.error("call %s: reply failed: %s", self.context.call_sid, exc)
            self._end(CallStatus.FAILED, f"{'llm' if isinstance(exc, LLMError) else 'tts'}_failed: {exc}")
            return
        finally:
            if self._reply is asyncio.current_task():
                self._reply = None
        self._last_activity = self._clock()
        if end_reason is not None:
            await self._hang_up_after_speaking(end_reason)
        elif self.state is SessionState.RESPONDING:
            self._set_state(SessionState.LISTENING)

    async def _speak_model_reply(self, utterance: _AgentUtterance) -> str | None:
        """Speak the model's reply as its sentences complete; return why it ends the call, if it does."""
        end_reason: str | None = None
        chunker = SentenceChunker()
        async for event in self._pipeline.llm.respond(list(self._conversation)):
            match event:
                case TextDelta(text=text):
                    for sentence in chunker.push(text):
                        await self._speak(utterance, sentence)
                case EndCall(reason=reason):
                    end_reason = reason
        tail = chunker.flush()
        if tail:
            await self._speak(utterance, tail)
        return end_reason

    async def _speak(self, utterance: _AgentUtterance, sentence: str) -> None:
        self._current = utterance
        span = _Span(sentence, utterance.audio_ms, utterance.audio_ms)
        utterance.sentences.append(span)
        async for chunk in self._pipeline.tts.synthesize(sentence):
            if utterance.started_stream_ms is None:
                utterance.started_stream_ms = self._timeline.stream_ms()
            await self._out.play(utterance.utterance_id, chunk)
            utterance.audio_ms += len(chunk) // 8
            span.end_ms = utterance.audio_ms
        span.complete = True
        self._spoken_ms += span.end_ms - span.start_ms
        self._spoken_chars += len(sentence)

    def _on_mark(self, event: MarkPlayed | MarkFlushed) -> None:
        utterance = self._utterances.get(event.utterance_id)
        if utterance is None:
            return
        if isinstance(event, MarkPlayed) and event.final:
            utterance.done.set()
            if self._current is utterance:
                self._current = None

    def _barge_in(self, why: str) -> None:
        """The caller talks over the agent: stop the reply, clear Twilio's buffer, keep what was heard."""
        utterance = self._current
        if utterance is None or self.state is not SessionState.RESPONDING:
            return
        log.info("call %s: barge-in (%s)", self.context.call_sid, why)
        if self._reply is not None:
            self._reply.cancel()
            self._reply = None
        self._current = None
        self._tasks.append(self._spawn(self._out.clear(), "clear"))
        self._record_agent_turn(utterance, interrupted=True)
        self._set_state(SessionState.LISTENING)

    def _record_agent_turn(self, utterance: _AgentUtterance, *, interrupted: bool) -> None:
        if utterance.recorded:
            return
        utterance.recorded = True
        if self._current is utterance:
            self._current = None
        played_ms = self._stream.playback.utterance(utterance.utterance_id).played_ms
        ms_per_char = self._spoken_ms / self._spoken_chars if self._spoken_chars else DEFAULT_MS_PER_CHAR
        text = (
            utterance.heard_text(played_ms, ms_per_char)
            if interrupted
            else " ".join(span.text for span in utterance.sentences)
        )
        if not text and not interrupted:
            return
        latency_ms = None
        first_audio = self._out.first_audio_at.get(utterance.utterance_id)
        if utterance.reply_to_ms is not None and first_audio is not None:
            latency_ms = max(0, round((first_audio - utterance.reply_to_ms) * 1000))
            self._latencies.append(latency_ms)
        start_ms = utterance.started_stream_ms or 0
        end_ms = start_ms + (played_ms if interrupted else utterance.audio_ms)
        self._record_turn("agent", text, start_ms, end_ms, interrupted=interrupted, latency_ms=latency_ms)
        if text:
            self._conversation.append(ConversationTurn(role="agent", text=text))

    def _record_turn(
        self,
        speaker: Literal["caller", "agent"],
        text: str,
        start_ms: int,
        end_ms: int,
        *,
        interrupted: bool,
        latency_ms: int | None,
    ) -> None:
        self._writer.record_turn(
            TurnRecord(
                index=self._turn_index,
                speaker=speaker,
                text=text,
                start_ms=start_ms,
                end_ms=end_ms,
                interrupted=interrupted,
                latency_ms=latency_ms,
            )
        )
        self._turn_index += 1

    # ------------------------------------------------------------------------------------------- ending

    def _on_max_duration(self) -> None:
        self._say_goodbye("max_duration")

    def _say_goodbye(self, reason: str) -> None:
        """Stop whatever the agent was doing, say goodbye, then hang up."""
        if self.state in (SessionState.ENDING, SessionState.ENDED):
            return
        if self._current is not None:
            self._barge_in(reason)
        if self._reply is not None:
            self._reply.cancel()
            self._reply = None
        goodbye = self._config.goodbye_sentence or DEFAULT_GOODBYE
        utterance = _AgentUtterance(self._next_utterance, None)
        self._next_utterance += 1
        self._utterances[utterance.utterance_id] = utterance
        self._set_state(SessionState.ENDING)
        self._reply = self._spawn(self._goodbye(utterance, goodbye, reason), "goodbye")

    async def _goodbye(self, utterance: _AgentUtterance, text: str, reason: str) -> None:
        try:
            await self._speak(utterance, text)
            await self._out.finish(utterance.utterance_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(utterance.done.wait(), timeout=utterance.audio_ms / 1000 + HANGUP_GRACE_SECONDS)
            self._record_agent_turn(utterance, interrupted=not utterance.done.is_set())
        except TTSError as exc:
            log.error("call %s: goodbye failed: %s", self.context.call_sid, exc)
        await self._hang_up_now(reason)

    async def _hang_up_after_speaking(self, reason: str) -> None:
        if self.state is not SessionState.ENDED:
            self._set_state(SessionState.ENDING)
        await self._hang_up_now(reason)

    async def _hang_up_now(self, reason: str) -> None:
        """End the call from our side: through Twilio's REST API when we can, else by closing the stream."""
        self._end_reason = reason
        if self._hang_up is not None:
            with contextlib.suppress(Exception):
                if await self._hang_up(self.context.call_sid):
                    # Twilio hangs up and then sends `stop`; wait a little for it, but not forever.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._ended.wait(), timeout=HANGUP_GRACE_SECONDS)
        self._end(CallStatus.COMPLETED, reason)

    @property
    def latencies_ms(self) -> list[int]:
        """Response latencies of the agent's turns so far (caller stopped speaking → first agent audio sent)."""
        return list(self._latencies)
