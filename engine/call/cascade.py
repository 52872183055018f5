"""The pipeline conversation driver: the caller's speech to text, the model's reply, its text to speech.

Caller frames go to the VAD and the recognizer; an end of turn (the recognizer's, or the VAD's silence after final
words) starts a reply: the model's text is cut into pieces as it streams (the first clause, then sentences), each
synthesized and played in turn, while the caller may barge in (pipelines.conversation.turn_taking). Words that are
clearly unfinished (pipelines.conversation.end_of_turn) end a turn only after a longer silence. After a short silence
the reply may start speculatively, its audio held until the turn is confirmed (engine.call.speculation). An agent
turn is written with what the caller heard of it (pipelines.conversation.heard). A model or synthesizer that fails
in the middle of a reply hands over to the next provider of its chain, and the caller hears a short apology instead
of silence. At a gather node of the call's path, the wait for each key is timed (engine.call.key_wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from config.text import storable_text
from engine.call.caller_reads import LATEST_FRAME_MS
from engine.call.caller_words import CallerWords
from engine.call.driver import (
    DEFAULT_APOLOGY,
    HANGUP_GRACE_SECONDS,
    CallHost,
    ControlRefused,
    ConversationUnavailable,
    DriverFactory,
    end_call_reason,
    opt_out_source,
    transfer_not_made,
)
from engine.call.key_wait import KeyWait
from engine.call.phases import CallPhase, PhaseEvent, accepts
from engine.call.pipeline_speech import AgentSpeech, Utterance
from engine.call.speculation import CallerPause, SpeculativeReply
from engine.server import metrics
from media.g711 import FRAME_BYTES, FRAME_MS
from media.twilio_stream import MarkFlushed, MarkPlayed
from media.vad import SpeechStarted as VadSpeechStarted
from media.vad import VoiceActivityDetector
from pipelines.conversation.chunking import SentenceChunker
from pipelines.conversation.confirmation import hold_side_effects_until, turn_confirmed
from pipelines.conversation.end_of_turn import looks_finished, same_words
from pipelines.conversation.turn_taking import BargeInPolicy
from pipelines.fallback import FailsOver, FallbackSTT, Prewarmable
from pipelines.llm.base import (
    ConversationTurn,
    EndCall,
    LLMError,
    MessageRole,
    OptOut,
    Rewinds,
    SendDtmf,
    TakesMessages,
    TextDelta,
    TransferCall,
)
from pipelines.registry import Pipeline
from pipelines.streams import closing_stream
from pipelines.stt.base import EndOfTurn, FinalizesEarly, PromptSilence, SpeechStarted, STTError, TranscriptUpdate
from pipelines.tools import OPT_OUT_CONFIRMATION
from pipelines.tts.base import TTSError
from storage.end_reasons import EndReason

__all__ = ["PipelineDriver", "ending_of", "pipeline_driver"]

log = logging.getLogger(__name__)

CLOSE_MARGIN_MS = 200
"""The caller's frames stay read one by one this long past the last silence a rule decides on."""


@dataclass(frozen=True, slots=True)
class _Ending:
    """How the agent ends the call once its last words have played."""

    reason: EndReason
    detail: str | None = None
    transfer_to: str | None = None
    asked: Mapping[str, Any] | None = None
    """The arguments of the model's `transfer_call` (`TransferCall.asked`), when the model asked for the transfer."""


def ending_of(event: EndCall | TransferCall) -> _Ending:
    """How a model's end-call or transfer request ends the call: a path's end, or the agent's hang-up with its
    words as the detail, or a transfer."""
    if isinstance(event, TransferCall):
        return _Ending(EndReason.TRANSFERRED, event.reason or None, transfer_to=event.to, asked=event.asked)
    return _Ending(*end_call_reason(event))


def pipeline_driver(pipeline: Pipeline, *, first_sentence: str | None) -> DriverFactory:
    """A factory for the pipeline driver of a call on `pipeline`, opening with `first_sentence`."""
    return functools.partial(PipelineDriver, pipeline=pipeline, first_sentence=first_sentence)


class PipelineDriver:
    """Converses through speech-to-text, a language model and text-to-speech (a ConversationDriver)."""

    def __init__(self, host: CallHost, pipeline: Pipeline, *, first_sentence: str | None) -> None:
        """Converse in `host`'s call on `pipeline`'s providers."""
        config = host.config
        self._host = host
        self._pipeline = pipeline
        self._first_sentence = first_sentence
        self._vad = VoiceActivityDetector(stop_ms=config.endpointing.silence_ms)
        interruption = config.interruption
        self._barge_in = BargeInPolicy.of(
            enabled=interruption.enabled,
            threshold_ms=interruption.threshold_ms,
            min_words=interruption.min_words,
            backchannel_words=interruption.backchannel_words,
        )
        # A barge-in decided within a batch's worth of frames of the caller's first sound: listen closely whenever
        # the agent speaks.
        self._barge_in_at_once = interruption.enabled and interruption.threshold_ms <= LATEST_FRAME_MS
        self._speech = AgentSpeech(host, pipeline.tts, phrases=pipeline.phrases)
        if pipeline.path is not None and pipeline.path_id is not None:
            host.turns.trace_path(pipeline.path_id, pipeline.path)
        self._key_wait = (
            KeyWait(host, pipeline.path, caller_speaking=lambda: self._vad.speaking, timed_out=self._keys_timed_out)
            if pipeline.path is not None
            else None
        )
        self._reply: asyncio.Task[None] | None = None
        self._caller_speech_started_ms: int | None = None
        self._caller_speech_ended_at: float | None = None
        self._last_voiced_at: float | None = None
        self._caller_words = CallerWords()
        self._pause = CallerPause()
        self._turn_open = False  # the caller has spoken since their last turn was taken
        endpointing = config.endpointing
        # The silence after speech that the agent's own rules decide on, first to last; the listening recognizer's
        # rules join them (`_follow_recognizer`), and change with it when a fallback takes over.
        rules = [endpointing.silence_ms, endpointing.incomplete_silence_ms]
        if endpointing.speculate:
            rules.append(endpointing.speculate_after_ms)
        self._own_silence_rules_ms = (min(rules), max(rules))
        stt = pipeline.stt
        self._prompt_silence = stt if isinstance(stt, PromptSilence) else None
        if isinstance(stt, FallbackSTT):
            stt.when_switched(self._on_recognizer_switched)
        self._close_from_ms, self._close_until_ms = self._closely_between(*self._own_silence_rules_ms)
        self._finalize_asked = False  # the recognizer was asked for its final words in this pause
        self._speculation: SpeculativeReply | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------ ConversationDriver

    async def start(self) -> None:
        """Start the recognizer (and warm the synthesizer's connection meanwhile)."""
        tts = self._pipeline.tts
        prewarm = asyncio.ensure_future(tts.prewarm()) if isinstance(tts, Prewarmable) else None
        try:
            await self._pipeline.stt.start()
        except STTError as exc:
            if prewarm is not None:
                prewarm.cancel()
            raise ConversationUnavailable(EndReason.STT_UNAVAILABLE, str(exc)) from exc
        self._follow_recognizer()
        if prewarm is not None:
            try:
                await prewarm
            except Exception as exc:  # a synthesizer that cannot connect yet fails (or falls back) on first use
                log.info("call %s: the synthesizer could not warm up: %s", self._host.context.call_sid, exc)
        self._host.spawn(self._listen(), "stt")

    def open(self) -> None:
        """Say the first sentence (and a path's opening); with neither, the caller speaks first, unless the agent
        asks the model to greet."""
        if not accepts(self._host.phase, PhaseEvent.REPLY) or self._reply is not None:
            return
        opening = [self._first_sentence] if self._first_sentence else []
        scripted = self._pipeline.llm.scripted_opening
        ask_model = scripted or (not opening and self._host.config.model_greets)
        if opening or ask_model:
            # A path opens at its start node, whatever the callee said to pick up: their "Hello?" answers nothing.
            self._start_reply(opening, ask_model=ask_model, reply_to=None, conversation=[] if scripted else None)

    @property
    def caller_speaking(self) -> bool:
        """Whether the VAD hears the caller now."""
        return self._vad.speaking

    @property
    def listening_closely(self) -> bool:
        """In the silence after the caller's speech, until their turn is taken or every rule that could take it
        (speculation, the VAD's and the recognizer's ends of turn, an unfinished sentence's longer wait) is past;
        and while the caller's speech over the agent counts toward a barge-in.

        From a batch's worth of frames before the first of those rules: the frame that starts it may be read up to
        `LATEST_FRAME_MS` late, and the frames after it are read as they land. A barge-in's count starts on the
        caller's first voiced frame over the agent, so the frame that completes it is read as it lands; an agent
        that yields within a batch's worth of frames is listened to closely whenever it speaks."""
        if self._barge_in.enabled and self._barge_in.overlap_ms:
            return True
        if self._barge_in_at_once and self._speech.current is not None:
            return True
        return self._turn_open and self._close_from_ms <= self._pause.quiet_ms <= self._close_until_ms

    def _on_recognizer_switched(self) -> None:
        """A fallback recognizer took over mid-call: follow its silence rules, and take its words for the audio it
        hears again in place of the failed one's."""
        self._caller_words.recognizer_switched()
        self._follow_recognizer()

    def _follow_recognizer(self) -> None:
        """Read frame by frame where the listening recognizer wants it too: from its start, and from the moment a
        fallback recognizer takes over mid-call (`FallbackSTT.when_switched`), with that one's silence rules (or
        none)."""
        if self._prompt_silence is None:
            return
        first, last = self._prompt_silence.prompt_silence_ms
        own_first, own_last = self._own_silence_rules_ms
        rules = (min(first, own_first), max(last, own_last)) if last else (own_first, own_last)
        self._close_from_ms, self._close_until_ms = self._closely_between(*rules)

    @staticmethod
    def _closely_between(first_ms: int, last_ms: int) -> tuple[int, int]:
        """The silence to read frame by frame when rules decide on it from `first_ms` to `last_ms`: from 0, the
        caller's speech as well, when the first rule comes within a batch's worth of frames of its first silent
        frame (which may itself be read up to `LATEST_FRAME_MS` late)."""
        start = first_ms - LATEST_FRAME_MS - FRAME_MS
        return (start if start >= FRAME_MS else 0), last_ms + CLOSE_MARGIN_MS

    def on_caller_audio(self, payload: bytes, at_ms: int) -> None:
        """One caller frame to the recognizer and the VAD; the VAD's verdict feeds barge-in."""
        stt, vad = self._pipeline.stt, self._vad
        if len(payload) != FRAME_BYTES:
            stt.send_audio(payload)
            return  # the VAD takes 20 ms frames; Twilio sends those in practice
        vad_event = vad.process_ulaw(payload)
        voiced = vad.last_frame_voiced
        stt.send_audio(payload, voiced=voiced)
        if voiced:
            self._last_voiced_at = self._host.clock()
            self._turn_open = True
        self._on_pause_frame(voiced)
        if isinstance(vad_event, VadSpeechStarted):
            self._caller_speech_started_ms = vad_event.at_ms
            self._stop_key_wait()
        elif vad_event is not None:  # speech stopped
            self._caller_speech_ended_at = self._last_voiced_at or self._host.clock()
            self._host.activity()
            if self._caller_words.waiting:
                # The recognizer gave final words but no end of turn: the silence decides.
                self._end_turn_if_finished(vad_event.at_ms, by_recognizer=False)
        if self._barge_in.frame(
            voiced=voiced, caller_speaking=vad.speaking, agent_speaking=self._speech.current is not None
        ):
            self._cut("caller speech")

    def on_caller_key(self, digit: str) -> None:
        """A key is a caller turn of its own."""
        now_ms = self._host.timeline.stream_ms()
        self._caller_speech_ended_at = self._host.clock()
        self._on_caller_turn(f"[DTMF {digit}]", now_ms, now_ms)

    def on_mark(self, event: MarkPlayed | MarkFlushed) -> None:
        """A played mark: the caller hears the utterance; its final one: they heard all of it."""
        self._speech.on_mark(event)

    async def interrupt(self, why: str) -> None:
        """Stop the reply and what is playing now; the transcript keeps what was heard."""
        self._stop_key_wait()
        self._discard_speculation(why)
        reply, self._reply = self._reply, None
        if reply is not None and reply is not asyncio.current_task():
            reply.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reply
        utterance = self._speech.take_current()
        if utterance is not None:
            log.info("call %s: agent stopped (%s)", self._host.context.call_sid, why)
            dropped = await self._host.audio.clear()
            self._speech.settle(utterance, interrupted=True, dropped=dropped)

    async def say(self, text: str) -> None:
        """Speak `text` and wait (bounded by its length) until the caller heard it."""
        utterance = self._speech.new_utterance(None)
        try:
            await self._speech.speak(utterance, text, scripted=True)
            await self._host.audio.finish(utterance.utterance_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(utterance.done.wait(), timeout=utterance.audio_ms / 1000 + HANGUP_GRACE_SECONDS)
        finally:
            self._speech.settle(utterance, interrupted=not utterance.done.is_set())

    async def say_line(self, text: str, *, interrupt: bool) -> bool:
        """Speak `text` as a reply of its own: cutting the reply in progress as a barge-in does (True when one was
        cut), or once it (and any reply that follows it) is over."""
        if not interrupt:
            self._host.spawn(self._say_when_quiet(text), "queued line")
            return False
        cut = self._reply is not None or self._speech.current is not None
        await self.interrupt("a line said through the API")
        if accepts(self._host.phase, PhaseEvent.REPLY):
            self._start_reply([text], ask_model=False, reply_to=None, scripted=False)
        return cut

    async def add_message(self, content: str, role: MessageRole) -> None:
        """Add the message to the model's context after the turns heard so far; a speculative reply, started
        without it, is dropped."""
        llm = self._pipeline.llm
        after_turns = len(self._host.turns.heard)
        if not (isinstance(llm, TakesMessages) and llm.add_message(role, content, after_turns=after_turns)):
            raise ControlRefused(
                "this agent's model takes no messages: a conversation path is followed as written; messages go to "
                "a chat model (llm provider openai) or a speech-to-speech model"
            )
        self._discard_speculation("a message was added")

    async def _say_when_quiet(self, text: str) -> None:
        """Wait until the conversation has opened and the agent has no reply in progress, then say `text` (unless
        the call is ending by then)."""
        await self._host.opened.wait()  # a line sent as the call starts comes after its opening
        while (reply := self._reply) is not None:
            await asyncio.wait({reply})
        if accepts(self._host.phase, PhaseEvent.REPLY):
            self._start_reply([text], ask_model=False, reply_to=None, scripted=False)

    async def close(self) -> None:
        """Settle what was being said, then close the providers (their errors are logged, never raised)."""
        if self._closed:
            return
        self._closed = True
        self._stop_key_wait()
        self._discard_speculation("the call ended")
        reply, self._reply = self._reply, None
        if reply is not None:
            reply.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reply
        if self._speech.current is not None:
            self._speech.settle(self._speech.current, interrupted=True)
        for closer in (self._pipeline.stt.close, self._pipeline.llm.close, self._pipeline.tts.close):
            try:
                await closer()
            except Exception:  # a provider failing to close must not stop the CallLog being finished
                log.exception("call %s: closing a provider failed", self._host.context.call_sid)

    # ------------------------------------------------------------------------------------------ caller side

    async def _listen(self) -> None:
        """Consume the recognizer's events; a recognizer lost with no fallback left fails the call.

        Here the recognizer's words enter the call: a NUL or a lone surrogate (half an emoji, which its JSON can carry)
        becomes U+FFFD once, before the model's history, the live events, webhooks and stored turns, whose UTF-8
        bodies and text columns cannot hold them.
        """
        try:
            async for event in self._pipeline.stt.events():
                match event:
                    case SpeechStarted():
                        self._host.activity()
                    case TranscriptUpdate(text=text, is_final=is_final, finalized=finalized):
                        text = storable_text(text)
                        self._on_transcript(text, is_final)
                        if finalized:
                            self._maybe_speculate("" if is_final else text)
                    case EndOfTurn(text=text, at_ms=at_ms):
                        self._caller_words.recognizer_ended(storable_text(text))
                        self._end_turn_if_finished(at_ms, by_recognizer=True)
        except STTError as exc:
            self._host.fail(EndReason.STT_FAILED, str(exc))

    def _on_transcript(self, text: str, is_final: bool) -> None:
        if is_final and text.strip():
            self._caller_words.final(text)
        elif not is_final and self._speech.current is not None and self._barge_in.words_interrupt(text):
            self._cut("caller words")
        so_far = self._caller_words.so_far("" if is_final else text)
        if so_far:
            self._host.live.emit("caller.interim", text=so_far)  # the words of the turn so far

    # --------------------------------------------------------------------------- end of turn and speculation

    @property
    def _punctuated(self) -> bool:
        stt = self._pipeline.stt
        return isinstance(stt, FinalizesEarly) and stt.punctuates

    def _end_turn_if_finished(self, end_ms: int, *, by_recognizer: bool) -> None:
        """An end of turn (the recognizer's, or the VAD's silence): take it, unless the words so far are clearly
        unfinished and the pause is still shorter than the agent's "incomplete sentence" silence."""
        unfinished = not self._caller_words.finished(punctuated=self._punctuated)
        if unfinished and self._pause.quiet_ms < self._host.config.endpointing.incomplete_silence_ms:
            self._caller_words.hold(end_ms)
            self._discard_speculation("unfinished words")
            return
        self._take_pending_caller_turn(end_ms, by_recognizer=by_recognizer)

    def _on_pause_frame(self, voiced: bool) -> None:
        """Count the caller's pause: speaking on drops a speculation; a long enough silence ends a held turn, a
        short one asks the recognizer for its final words (to speculate on)."""
        pause = self._pause
        if pause.frame(voiced=voiced):
            self._finalize_asked = False  # held unfinished words stay: the next end of turn carries them on
            self._discard_speculation("the caller spoke on")
            return
        if voiced:
            return
        endpointing = self._host.config.endpointing
        held_end_ms = self._caller_words.held_end_ms
        if held_end_ms is not None and pause.quiet_ms >= endpointing.incomplete_silence_ms:
            self._take_pending_caller_turn(held_end_ms, by_recognizer=False)
            return
        stt = self._pipeline.stt
        if (  # cheapest first: this runs for every silent frame
            not self._finalize_asked
            and self._vad.speaking
            and endpointing.speculate
            and pause.quiet_ms >= endpointing.speculate_after_ms
            and self._reply is None
            and self._speculation is None
            and self._speech.current is None
            and isinstance(stt, FinalizesEarly)
            and self._host.phase in (CallPhase.LISTENING, CallPhase.RESPONDING)  # not a callee's hello
        ):
            self._finalize_asked = True
            stt.finalize_now()

    def _maybe_speculate(self, provisional: str) -> None:
        """The recognizer's final words so far came (plus `provisional` ones it will say again): if the caller is
        still silent and they read as finished, start the reply on them, its audio held."""
        if not self._finalize_asked or self._pause.quiet_ms == 0 or self._speculation is not None:
            return
        if self._reply is not None or self._speech.current is not None:
            return
        text = self._caller_words.so_far(provisional)
        if not text or not looks_finished(text, punctuated=self._punctuated):
            return
        llm = self._pipeline.llm
        checkpoint = llm.checkpoint() if isinstance(llm, Rewinds) else None
        utterance = self._speech.new_utterance(None)
        utterance.gate = asyncio.Event()
        conversation = [*self._conversation(), ConversationTurn(role="caller", text=text)]
        task = self._host.spawn(self._respond(utterance, [], True, conversation), "speculative reply")
        self._speculation = SpeculativeReply(text, utterance, task, checkpoint, self._host.turns.path_node())
        metrics.SPECULATIVE_REPLIES.labels("started").inc()

    def _discard_speculation(self, why: str) -> None:
        speculation, self._speculation = self._speculation, None
        self._drop(speculation, why)

    def _drop(self, speculation: SpeculativeReply | None, why: str) -> None:
        """Discard `speculation` (if any): nothing of it plays, is written, or stays in the model's state."""
        if speculation is not None:
            log.debug("call %s: speculative reply discarded (%s)", self._host.context.call_sid, why)
            self._speech.release(speculation.utterance)
            speculation.discard(self._pipeline.llm)

    def _take_pending_caller_turn(self, end_ms: int, *, by_recognizer: bool) -> None:
        text = self._caller_words.take(by_recognizer=by_recognizer)
        self._finalize_asked = False
        if not text:
            return
        stt = self._pipeline.stt
        if isinstance(stt, FallbackSTT):
            stt.turn_taken()  # a recognizer taking over mid-call does not hear these words again as a new turn
        start_ms = self._caller_speech_started_ms if self._caller_speech_started_ms is not None else end_ms
        self._on_caller_turn(text, start_ms, end_ms)

    def _on_caller_turn(self, text: str, start_ms: int, end_ms: int) -> None:
        """The caller finished saying something (or pressed a key): record it and answer (with the speculative
        reply, if one was started on the same words)."""
        host = self._host
        self._turn_open = False
        speculation, self._speculation = self._speculation, None
        if speculation is not None and not same_words(speculation.text, text):
            self._drop(speculation, "the final words differ")
            speculation = None
        if not accepts(host.phase, PhaseEvent.REPLY):
            self._drop(speculation, "the call is ending")
            return  # the call is ending
        if self._speech.current is not None:
            if self._barge_in.is_backchannel(text):
                self._drop(speculation, "a backchannel")
                return  # "uh-huh" while the agent talks is not a turn
            self._cut("caller turn")
        host.turns.place(
            "caller", start_ms, end_ms, text=text, path_node=speculation.path_node if speculation else None
        )
        self._caller_speech_started_ms = None
        now = host.clock()
        # The caller stopped speaking at their last voiced frame (the recognizer may decide before our VAD does).
        reply_to = min(self._last_voiced_at or self._caller_speech_ended_at or now, now)
        self._caller_speech_ended_at = self._last_voiced_at = None
        if host.caller_turn_ended():
            self._drop(speculation, "the callee's greeting")
            return  # the callee's hello: the agent opens instead
        if speculation is None:
            self._start_reply([], ask_model=True, reply_to=reply_to, turn_ended_at=now)
            return
        if self._reply is not None:
            self._reply.cancel()
        self._host.move(PhaseEvent.REPLY)
        self._reply = speculation.task
        speculation.use(reply_to, now)
        host.turns.tell_path_steps()  # the moves it made on the path are the call's now

    def _cut(self, why: str) -> None:
        """The caller talks over the agent: stop the reply, clear Twilio's buffer, keep what was heard."""
        utterance = self._speech.current
        if utterance is None or self._host.phase is not CallPhase.RESPONDING:
            return
        log.info("call %s: barge-in (%s)", self._host.context.call_sid, why)
        metrics.BARGE_INS.inc()
        if self._reply is not None:
            self._reply.cancel()
            self._reply = None
        self._speech.release(utterance)
        # Cut where the caller's playback has reached now, on the caller-frame path: the recording and the turn end
        # there, and the turn takes its place before the caller's. Twilio is told without holding that path up.
        dropped = self._host.audio.cut()
        self._host.spawn(self._host.audio.send_clear(), "clear")
        self._speech.settle(utterance, interrupted=True, dropped=dropped)
        self._host.move(PhaseEvent.YIELD)

    # ------------------------------------------------------------------------------------------ agent side

    def _conversation(self) -> list[ConversationTurn]:
        return [ConversationTurn(role=speaker, text=text) for speaker, text in self._host.turns.heard]

    def _start_reply(
        self,
        sentences: list[str],
        *,
        ask_model: bool,
        reply_to: float | None,
        turn_ended_at: float | None = None,
        conversation: list[ConversationTurn] | None = None,
        scripted: bool = True,
        then: _Ending | None = None,
    ) -> None:
        """Start a reply: `sentences` said first (the agent's own text unless not `scripted`: a line sent through
        the API is said once, never kept as a phrase), then the model's reply if `ask_model`; `then` ends the call
        once it was heard."""
        self._stop_key_wait()
        if self._reply is not None:
            self._reply.cancel()
        utterance = self._speech.new_utterance(reply_to)
        if turn_ended_at is not None:
            utterance.stage_at["sttEndOfTurn"] = turn_ended_at
        self._host.move(PhaseEvent.REPLY)
        reply = self._respond(utterance, sentences, ask_model, conversation, scripted=scripted, then=then)
        self._reply = self._host.spawn(reply, "reply")

    async def _respond(
        self,
        utterance: Utterance,
        sentences: list[str],
        ask_model: bool,
        conversation: list[ConversationTurn] | None = None,
        *,
        scripted: bool = True,
        then: _Ending | None = None,
    ) -> None:
        """Speak fixed sentences, then the model's reply piece by piece; end the call if it says so (or `then`).

        A speculative reply (its utterance gated) answers `conversation`, and does nothing the caller could notice
        (play, recover, hang up, transfer) before its turn is confirmed.
        """
        if utterance.gate is not None:
            hold_side_effects_until(utterance.gate)
        try:
            ending = await self._say_reply(utterance, sentences, ask_model, conversation, scripted=scripted) or then
        except (LLMError, TTSError) as exc:
            if utterance.gate is not None:
                await utterance.gate.wait()  # a discarded speculation is cancelled here
            if self._reply is asyncio.current_task():
                self._reply = None
            await self._recover(utterance, exc)
            return
        finally:
            if self._reply is asyncio.current_task():
                self._reply = None
        self._host.activity()
        if ending is not None and ending.transfer_to is not None:
            await self._transfer(ending)
        elif ending is not None:
            await self._host.hang_up(ending.reason, ending.detail)
        elif self._host.phase is CallPhase.RESPONDING:
            self._host.move(PhaseEvent.YIELD)
        if ending is None and self._reply is None and self._key_wait is not None:
            self._key_wait.arm()  # at a gather node, the wait for the next key starts now

    def _stop_key_wait(self) -> None:
        if self._key_wait is not None:
            self._key_wait.cancel()

    def _keys_timed_out(self) -> None:
        """A gather node's wait for a key ran out: the model's next reply has the path act on it."""
        if self._reply is None and accepts(self._host.phase, PhaseEvent.REPLY):
            self._start_reply([], ask_model=True, reply_to=None)

    async def _say_reply(
        self,
        utterance: Utterance,
        sentences: list[str],
        ask_model: bool,
        conversation: list[ConversationTurn] | None = None,
        *,
        scripted: bool = True,
    ) -> _Ending | None:
        """Speak the reply and wait until it was heard through; how it ends the call, if it does."""
        chunker = SentenceChunker()
        for text in sentences:
            for sentence in [*chunker.push(text + " "), chunker.flush()]:
                if sentence:
                    await self._speech.speak(utterance, sentence, scripted=scripted)
        ending = await self._speak_model_reply(utterance, conversation) if ask_model else None
        if utterance.gate is not None:
            await utterance.gate.wait()  # a speculative reply with nothing to say still waits for its turn
        if utterance.audio_ms:
            await self._host.audio.finish(utterance.utterance_id)
            await utterance.done.wait()  # the final mark came back: the caller heard it all
            self._speech.settle(utterance, interrupted=False)
        else:
            self._speech.release(utterance)
        return ending

    async def _speak_model_reply(
        self, utterance: Utterance, conversation: list[ConversationTurn] | None = None
    ) -> _Ending | None:
        """Speak the model's reply as its first clause and then its sentences complete; return how it ends the
        call, if it does. Cancelled, the model's stream is closed at once."""
        ending: _Ending | None = None
        first_clause = self._host.config.first_clause
        chunker = SentenceChunker(
            first_clause_min_words=first_clause.min_words if first_clause.enabled else None,
            clause_marks=first_clause.marks,
        )
        stages, clock = utterance.stage_at, self._host.clock
        reply = self._pipeline.llm.respond(self._conversation() if conversation is None else conversation)
        async with closing_stream(reply) as events:
            async for event in events:
                stages.setdefault("llmFirstToken", clock())
                match event:
                    case TextDelta(text=text):
                        for sentence in chunker.push(text):
                            stages.setdefault("firstSentence", clock())
                            await self._speech.speak(utterance, sentence)
                    case SendDtmf(digits=digits):
                        tail = chunker.flush()  # what was said before the keys is spoken before them
                        if tail:
                            await self._speech.speak(utterance, tail)
                        await self._speech.press_keys(utterance, digits)
                    case EndCall() | TransferCall():
                        ending = ending_of(event)
                    case OptOut(reason=reason):
                        await turn_confirmed()  # never listed on a speculation the caller did not confirm
                        await self._host.record_opt_out(opt_out_source(event), reason)
                        for sentence in chunker.push(" " + OPT_OUT_CONFIRMATION):
                            await self._speech.speak(utterance, sentence)
                        ending = _Ending(EndReason.AGENT_HANGUP, f"opted out: {reason}")
        tail = chunker.flush()
        if tail:
            stages.setdefault("firstSentence", clock())
            await self._speech.speak(utterance, tail)
        return ending

    async def _recover(self, utterance: Utterance, exc: LLMError | TTSError) -> None:
        """A provider failed mid-reply: keep what was heard, move to the next provider and apologize; or, with
        none left, end the call FAILED naming the provider."""
        host = self._host
        if host.phase in (CallPhase.ENDING, CallPhase.ENDED):
            log.debug("call %s: reply stopped as the call ended: %s", host.context.call_sid, exc)
            return
        stage, provider = ("llm", self._pipeline.llm) if isinstance(exc, LLMError) else ("tts", self._pipeline.tts)
        dropped = None
        if self._speech.current is utterance:
            self._speech.release(utterance)
            if host.playback.utterance(utterance.utterance_id).sent_ms:
                dropped = await host.audio.clear()
        if utterance.audio_ms:
            self._speech.settle(utterance, interrupted=True, dropped=dropped)
        else:
            utterance.settled = True  # nothing of it was said
        following = provider.fail_over() if isinstance(provider, FailsOver) else None
        if following is None:
            host.fail(EndReason.LLM_FAILED if stage == "llm" else EndReason.TTS_FAILED, str(exc))
            return
        log.warning("call %s: %s failed mid-reply (%s); %s takes over", host.context.call_sid, stage, exc, following)
        self._start_reply([host.config.apology_sentence or DEFAULT_APOLOGY], ask_model=False, reply_to=None)

    async def _transfer(self, ending: _Ending) -> None:
        """Hand the caller over; if that fails the agent says so and the call goes on (`transfer_not_made`)."""
        assert ending.transfer_to is not None
        made = await self._host.transfer(ending.transfer_to, ending.detail, asked=ending.asked)
        if made:
            return
        if self._host.phase is CallPhase.RESPONDING:
            self._host.move(PhaseEvent.YIELD)
        after = transfer_not_made(self._host.config, self._pipeline.path, unconfirmed=made is None)
        then = _Ending(EndReason.PATH_END) if after.ends_call else None
        self._start_reply([after.words], ask_model=False, reply_to=None, then=then)
