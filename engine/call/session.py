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
from engine.call.call_log_writer import CallLogWriter, CallOutcome, TurnRecord
from engine.call.frame_socket import HandsOverFrames
from engine.call.outbound_audio import OutboundAudio, SendText, StreamTimeline
from engine.server import metrics
from media.dtmf import InvalidDigits, dtmf_audio
from media.recording import StereoWavRecorder
from media.twilio_stream import (
    DtmfReceived,
    MarkFlushed,
    MarkPlayed,
    MediaGap,
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
from pipelines.fallback import Prewarmable
from pipelines.llm.base import ConversationTurn, EndCall, LLMError, SendDtmf, TextDelta, TransferCall
from pipelines.registry import Pipeline
from pipelines.stt.base import EndOfTurn, SpeechStarted, STTError, TranscriptUpdate
from pipelines.tts.base import Alignment, TTSError
from storage.enums import CallStatus

log = logging.getLogger(__name__)

DEFAULT_GOODBYE = "Thank you for calling. Goodbye."
TRANSFER_FAILED = "I'm sorry, I couldn't transfer your call right now."
HANGUP_GRACE_SECONDS = 5.0
GREETING_WAIT_SECONDS = 3.0  # an outbound callee who says nothing this long still hears the agent
OVERLAP_RESET_MS = 240  # a pause this long between the caller's sounds starts a new count toward barge-in
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
    """Where one sentence falls in its utterance's audio, and when its characters start if the TTS said so."""

    text: str
    start_ms: int
    end_ms: int
    complete: bool = False
    aligned_chars: list[str] = field(default_factory=list)
    aligned_ms: list[int] = field(default_factory=list)  # from the span's start

    def heard_by_alignment(self, played_ms: int) -> str | None:
        """The whole words of the span started before `played_ms` (utterance time), if alignment is known."""
        if not self.aligned_chars:
            return None
        cutoff = played_ms - self.start_ms
        count = sum(1 for ms in self.aligned_ms if ms < cutoff)
        spoken = "".join(self.aligned_chars)
        heard = spoken[:count]
        if count < len(spoken) and not spoken[count].isspace():
            heard = heard.rsplit(maxsplit=1)[0] if " " in heard.strip() else ""  # drop the word cut in half
        return " ".join(self.text.split()[: len(heard.split())])


_STAGES = ("sttEndOfTurn", "llmFirstToken", "firstSentence", "ttsFirstByte", "firstFrameSent", "firstMarkEchoed")


@dataclass(slots=True)
class _Ending:
    """How the agent ends the call once its last words have played."""

    reason: str
    transfer_to: str | None = None


@dataclass(slots=True)
class _AgentUtterance:
    """One agent turn being spoken: its sentences and where each falls in the utterance's audio."""

    utterance_id: int
    reply_to_ms: float | None  # monotonic time the caller stopped speaking, for latency
    sentences: list[_Span] = field(default_factory=list)
    stage_at: dict[str, float] = field(default_factory=dict)  # monotonic time each latency stage was reached
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
                aligned = span.heard_by_alignment(played_ms)
                if aligned is not None:
                    heard.append(aligned)
                    break
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
    outbound: bool = False


HangUp = Callable[[str], Awaitable[bool]]
Transfer = Callable[[str, str], Awaitable[bool]]


async def await_twilio_stop(ended: asyncio.Event) -> None:
    """After a hang-up or transfer through Twilio's REST API, wait a little (never forever) for its `stop`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ended.wait(), timeout=HANGUP_GRACE_SECONDS)


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
        transfer: Transfer | None = None,
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
        self._transfer = transfer
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
        self._last_voiced_at: float | None = None
        self._overlap_ms = 0
        self._awaiting_greeting = False
        self._overlap_silence_ms = 0
        self._pending_caller_text: list[str] = []
        self._last_activity = clock()
        self._ended = asyncio.Event()
        self._over = False  # _ended is set: checked for every frame, where a plain attribute is cheaper
        self._end_status = CallStatus.COMPLETED
        self._end_reason = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._latencies: list[int] = []
        self._spoken_ms = 0
        self._spoken_chars = 0

    # ------------------------------------------------------------------------------------------- lifecycle

    async def run(self, frames: AsyncIterator[str]) -> CallOutcome:
        """Run the call until it ends; return how it ended (the CallLog is finished by then)."""
        tts = self._pipeline.tts
        prewarm = asyncio.ensure_future(tts.prewarm()) if isinstance(tts, Prewarmable) else None
        try:
            await self._pipeline.stt.start()
        except STTError as exc:
            self._end(CallStatus.FAILED, f"stt_unavailable: {exc}")
        if prewarm is not None:
            with contextlib.suppress(Exception):
                await prewarm  # a synthesizer that cannot connect yet fails (or falls back) on first use
        self._writer.start()
        self._tasks = [
            self._spawn(self._read(frames), "read"),
            self._spawn(self._listen(), "stt"),
        ]
        loop = asyncio.get_running_loop()
        max_duration = loop.call_later(self._config.max_duration_seconds, self._on_max_duration)
        greeting_wait = None
        if self.context.outbound and self._config.endpointing.wait_for_greeting:
            # Let the callee answer first ("Hello?"); speak anyway if they stay silent.
            self._awaiting_greeting = True
            greeting_wait = loop.call_later(GREETING_WAIT_SECONDS, self._open_conversation)
        elif not self._ended.is_set():
            self._open_conversation()
        try:
            await self._ended.wait()
        finally:
            max_duration.cancel()
            if greeting_wait is not None:
                greeting_wait.cancel()
            outcome = await self._shut_down()
        return outcome

    def _open_conversation(self) -> None:
        """Say the first sentence (and a path's opening), or let the model greet when there is none."""
        self._awaiting_greeting = False
        if self.state is not SessionState.LISTENING or self._reply is not None:
            return
        opening = [self._first_sentence] if self._first_sentence else []
        ask_model = not opening or self._pipeline.llm.scripted_opening
        self._start_reply(opening, ask_model=ask_model, reply_to=None)

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
        self._over = True
        self._ended.set()

    def end_from_outside(self, reason: str, *, completed: bool = False) -> None:
        """End the call for a reason outside it: FAILED (the engine shutting down), or COMPLETED when someone
        hung it up on purpose (the API)."""
        self._end(CallStatus.COMPLETED if completed else CallStatus.FAILED, reason)

    def end_when_twilio_stops(self, reason: str) -> None:
        """Twilio is about to stop the stream for a reason decided outside the call (an answering machine took it):
        stop speaking now, and end with `reason` when Twilio's `stop` comes."""
        if self.state in (SessionState.ENDING, SessionState.ENDED):
            return
        self._awaiting_greeting = False
        if self._current is not None:
            self._barge_in(reason)
        if self._reply is not None:
            self._reply.cancel()
            self._reply = None
        self._set_state(SessionState.ENDING)
        self._end_reason = reason

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
        """Feed Twilio's frames through the protocol; the call ends when they stop.

        A socket that can hand frames over as they are parsed (engine/call/frame_socket.py) gives them to
        `receive_frame` directly from now on; this loop then only waits for the end of the stream.
        """
        source = frames if isinstance(frames, HandsOverFrames) else None
        handed = source is not None and source.hand_to(self.receive_frame)
        try:
            async for text in frames:
                self.receive_frame(text)
                if self._ended.is_set():
                    return
            self._end(CallStatus.FAILED, "stream_lost")
        except StreamProtocolError as exc:
            self._on_protocol_error(exc)
        finally:
            if source is not None and handed:
                source.hand_to(None)

    def receive_frame(self, text: str) -> None:
        """One text frame from Twilio, through the protocol to the session; ignored once the call has ended."""
        if self._over:
            return
        media = self._stream.receive_media(text)
        if media is not None:
            self._on_caller_audio(*media)
            return
        try:
            for event in self._stream.receive_text(text):
                self._on_stream_event(event)
        except StreamProtocolError as exc:
            self._on_protocol_error(exc)

    def _on_protocol_error(self, exc: StreamProtocolError) -> None:
        log.warning("call %s: protocol error: %s", self.context.call_sid, exc)
        self._end(CallStatus.FAILED, f"protocol_error: {type(exc).__name__}: {exc}")

    def _on_stream_event(self, event: StreamEvent) -> None:
        match event:
            case MediaReceived(payload=payload, timestamp_ms=at_ms):
                self._on_caller_audio(payload, at_ms)
            case DtmfReceived(digit=digit):
                now_ms = self._timeline.stream_ms()
                self._caller_speech_ended_at = self._clock()
                self._on_caller_turn(f"[DTMF {digit}]", now_ms, now_ms)
            case MarkPlayed() | MarkFlushed():
                self._on_mark(event)
            case Stopped():
                self._end(CallStatus.COMPLETED, self._end_reason_after_stop())
            case MediaGap(missing_ms=missing_ms):
                self._writer.note_media_gap(missing_ms)
            case Started():
                pass  # seen by the media socket before the session began
            case _:
                pass  # connected and unknown marks carry nothing the session acts on

    def _end_reason_after_stop(self) -> str:
        # After our own hang-up Twilio sends `stop` too: keep the reason the agent ended for.
        if self.state is SessionState.ENDING and self._end_reason:
            return self._end_reason
        return "caller_hangup"

    def _on_caller_audio(self, payload: bytes, at_ms: int) -> None:
        """The audio path: one caller frame, stamped `at_ms` by Twilio. Cheap work only."""
        stt, vad, now = self._pipeline.stt, self._vad, self._clock()
        self._timeline.observe(at_ms, now)
        if self._recorder is not None:
            self._recorder.write_caller(payload, at_ms)
        if len(payload) != 160:
            stt.send_audio(payload)
            return  # the VAD takes 20 ms frames; Twilio sends those in practice
        vad_event = vad.process_ulaw(payload)
        voiced = vad.last_frame_voiced
        stt.send_audio(payload, voiced=voiced)
        if voiced:
            self._last_voiced_at = now
        if isinstance(vad_event, VadSpeechStarted):
            self._caller_speech_started_ms = vad_event.at_ms
        elif vad_event is not None:  # speech stopped
            self._caller_speech_ended_at = self._last_voiced_at or now
            self._last_activity = now
            if self._pending_caller_text:
                # The recognizer gave final words but no end of turn: the silence decides.
                self._take_pending_caller_turn(vad_event.at_ms)
        self._count_overlap(voiced)
        if vad.speaking:
            self._last_activity = now
            interruption = self._config.interruption
            if interruption.enabled and self._overlap_ms >= interruption.threshold_ms:
                self._barge_in("caller speech")
        elif (
            self.state is SessionState.LISTENING
            and self._reply is None
            and now - self._last_activity > self._config.silence_timeout_seconds
        ):
            self._say_goodbye("silence_timeout")

    def _count_overlap(self, voiced: bool) -> None:
        """Caller speech heard while the agent talks; the tail of the caller's own turn does not count."""
        if not self._agent_is_speaking():
            self._overlap_ms = self._overlap_silence_ms = 0
        elif voiced:
            self._overlap_ms += 20
            self._overlap_silence_ms = 0
        else:
            self._overlap_silence_ms += 20
            if self._overlap_silence_ms >= OVERLAP_RESET_MS:
                self._overlap_ms = 0

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
        if interruption.enabled and not is_final and self._agent_is_speaking():
            words = [w for w in text.lower().split() if w.strip(".,!?") not in interruption.backchannel_words]
            if len(words) >= interruption.min_words:
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
        now = self._clock()
        self._last_activity = now
        # The caller stopped speaking at their last voiced frame (the recognizer may decide before our VAD does).
        reply_to = self._last_voiced_at or self._caller_speech_ended_at or now
        reply_to = min(reply_to, now)
        self._caller_speech_ended_at = None
        self._last_voiced_at = None
        if self._awaiting_greeting:  # the callee said hello: now the agent opens
            self._open_conversation()
            return
        self._start_reply([], ask_model=True, reply_to=reply_to, turn_ended_at=now)

    def _is_backchannel(self, text: str) -> bool:
        words = [w.strip(".,!?").lower() for w in text.split()]
        return bool(words) and all(w in self._config.interruption.backchannel_words for w in words)

    # ------------------------------------------------------------------------------------------ agent side

    def _agent_is_speaking(self) -> bool:
        return self._current is not None

    def _start_reply(
        self, sentences: list[str], *, ask_model: bool, reply_to: float | None, turn_ended_at: float | None = None
    ) -> None:
        if self._reply is not None:
            self._reply.cancel()
        utterance = _AgentUtterance(self._next_utterance, reply_to)
        self._next_utterance += 1
        self._utterances[utterance.utterance_id] = utterance
        if turn_ended_at is not None:
            utterance.stage_at["sttEndOfTurn"] = turn_ended_at
        self._set_state(SessionState.RESPONDING)
        self._reply = self._spawn(self._respond(utterance, sentences, ask_model), "reply")

    async def _respond(self, utterance: _AgentUtterance, sentences: list[str], ask_model: bool) -> None:
        """Speak fixed sentences, then the model's reply sentence by sentence; end the call if it says so."""
        ending: _Ending | None = None
        try:
            chunker = SentenceChunker()
            for text in sentences:
                for sentence in [*chunker.push(text + " "), chunker.flush()]:
                    if sentence:
                        await self._speak(utterance, sentence)
            if ask_model:
                ending = await self._speak_model_reply(utterance)
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
        if ending is not None and ending.transfer_to is not None:
            await self._transfer_after_speaking(ending.transfer_to, ending.reason)
        elif ending is not None:
            await self._hang_up_after_speaking(ending.reason)
        elif self.state is SessionState.RESPONDING:
            self._set_state(SessionState.LISTENING)

    async def _speak_model_reply(self, utterance: _AgentUtterance) -> _Ending | None:
        """Speak the model's reply as its sentences complete; return how it ends the call, if it does."""
        ending: _Ending | None = None
        chunker = SentenceChunker()
        stages = utterance.stage_at
        async for event in self._pipeline.llm.respond(list(self._conversation)):
            stages.setdefault("llmFirstToken", self._clock())
            match event:
                case TextDelta(text=text):
                    for sentence in chunker.push(text):
                        stages.setdefault("firstSentence", self._clock())
                        await self._speak(utterance, sentence)
                case SendDtmf(digits=digits):
                    tail = chunker.flush()  # what was said before the keys is spoken before them
                    if tail:
                        await self._speak(utterance, tail)
                    await self._press_keys(utterance, digits)
                case EndCall(reason=reason):
                    ending = _Ending(reason)
                case TransferCall(to=to, reason=reason):
                    ending = _Ending(f"transferred: {reason}" if reason else "transferred", transfer_to=to)
        tail = chunker.flush()
        if tail:
            stages.setdefault("firstSentence", self._clock())
            await self._speak(utterance, tail)
        return ending

    async def _speak(self, utterance: _AgentUtterance, sentence: str) -> None:
        self._current = utterance
        span = _Span(sentence, utterance.audio_ms, utterance.audio_ms)
        utterance.sentences.append(span)
        async for chunk in self._pipeline.tts.synthesize(sentence):
            if isinstance(chunk, Alignment):
                span.aligned_chars.extend(chunk.chars)
                span.aligned_ms.extend(chunk.start_ms)
                continue
            await self._play(utterance, chunk)
            span.end_ms = utterance.audio_ms
        span.complete = True
        self._spoken_ms += span.end_ms - span.start_ms
        self._spoken_chars += len(sentence)

    async def _play(self, utterance: _AgentUtterance, chunk: bytes) -> None:
        if utterance.started_stream_ms is None:
            utterance.started_stream_ms = self._timeline.stream_ms()
            utterance.stage_at.setdefault("ttsFirstByte", self._clock())
        await self._out.play(utterance.utterance_id, chunk)
        utterance.audio_ms += len(chunk) // 8

    async def _press_keys(self, utterance: _AgentUtterance, digits: str) -> None:
        """Play touch tones in the agent's audio (Twilio's stream has no other way to send them)."""
        try:
            tones = dtmf_audio(digits)
        except InvalidDigits as exc:
            log.warning("call %s: %s", self.context.call_sid, exc)
            return
        self._current = utterance
        span = _Span(f"[DTMF {digits}]", utterance.audio_ms, utterance.audio_ms)
        utterance.sentences.append(span)
        await self._play(utterance, tones)
        span.end_ms = utterance.audio_ms
        span.complete = True

    def _on_mark(self, event: MarkPlayed | MarkFlushed) -> None:
        utterance = self._utterances.get(event.utterance_id)
        if utterance is None:
            return
        if isinstance(event, MarkPlayed):
            utterance.stage_at.setdefault("firstMarkEchoed", self._clock())
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
        metrics.BARGE_INS.inc()
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
        breakdown: dict[str, int] | None = None
        first_audio = self._out.first_audio_at.get(utterance.utterance_id)
        if first_audio is not None:
            utterance.stage_at.setdefault("firstFrameSent", first_audio)
        if utterance.reply_to_ms is not None and first_audio is not None:
            latency_ms = max(0, round((first_audio - utterance.reply_to_ms) * 1000))
            self._latencies.append(latency_ms)
            breakdown = {
                stage: max(0, round((utterance.stage_at[stage] - utterance.reply_to_ms) * 1000))
                for stage in _STAGES
                if stage in utterance.stage_at
            }
            metrics.observe_turn(breakdown)
        start_ms = utterance.started_stream_ms or 0
        end_ms = start_ms + (played_ms if interrupted else utterance.audio_ms)
        self._record_turn(
            "agent", text, start_ms, end_ms, interrupted=interrupted, latency_ms=latency_ms, latency=breakdown
        )
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
        latency: dict[str, int] | None = None,
    ) -> None:
        # Offsets come from different clocks (Twilio's timestamps, the recognizer's, ours); an overloaded moment can
        # make them disagree by a frame or two. A turn is never lost over that: clamp it onto the timeline.
        start_ms = max(0, start_ms)
        end_ms = max(start_ms, end_ms)
        self._writer.record_turn(
            TurnRecord(
                index=self._turn_index,
                speaker=speaker,
                text=text,
                start_ms=start_ms,
                end_ms=end_ms,
                interrupted=interrupted,
                latency_ms=latency_ms,
                latency=latency,
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

    async def _transfer_after_speaking(self, to: str, reason: str) -> None:
        """Hand the caller to `to` through Twilio; if that fails the agent says so and the call goes on."""
        if self._transfer is not None and await self._transfer(self.context.call_sid, to):
            if self.state is not SessionState.ENDED:
                self._set_state(SessionState.ENDING)
            self._end_reason = reason
            await await_twilio_stop(self._ended)  # Twilio leaves our stream for the <Dial>
            self._end(CallStatus.COMPLETED, reason)
            return
        log.warning("call %s: transfer to %s failed", self.context.call_sid, to)
        if self.state is SessionState.RESPONDING:
            self._set_state(SessionState.LISTENING)
        self._start_reply([TRANSFER_FAILED], ask_model=False, reply_to=None)

    async def _hang_up_now(self, reason: str) -> None:
        """End the call from our side: through Twilio's REST API when we can, else by closing the stream."""
        self._end_reason = reason
        if self._hang_up is not None:
            with contextlib.suppress(Exception):
                if await self._hang_up(self.context.call_sid):
                    await await_twilio_stop(self._ended)
        self._end(CallStatus.COMPLETED, reason)

    @property
    def latencies_ms(self) -> list[int]:
        """Response latencies of the agent's turns so far (caller stopped speaking → first agent audio sent)."""
        return list(self._latencies)
