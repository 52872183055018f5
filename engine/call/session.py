"""One phone call on the media WebSocket, from Twilio's `start` to the finished CallLog, whoever converses.

The session owns what every call has: Twilio's frames through the sans-I/O protocol, the playback clock, the
recording, the turns, the timers (max duration, silence, the callee's greeting), keys pressed, the answering-machine
verdict, hang-up and transfer, the end and its outcome. Its conversation driver (engine.call.driver) listens,
thinks and speaks: the pipeline driver or the speech-to-speech driver, and, when a speech-to-speech model is lost
for good, the pipeline the agent lists as its fallback. The audio path (one caller frame) does only cheap work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

from config.agent import AgentConfiguration
from engine.call.audio_tap import AudioTap
from engine.call.call_log_writer import CallLogWriter, CallOutcome
from engine.call.caller_reads import CallerReads
from engine.call.credit_meter import CREDIT_MINUTE_SECONDS, CreditMeter, ExtendReservation
from engine.call.driver import (
    DEFAULT_APOLOGY,
    DEFAULT_GOODBYE,
    CallContext,
    ControlRefused,
    ConversationDriver,
    ConversationUnavailable,
    DriverFactory,
)
from engine.call.live_events import CallEvents
from engine.call.outbound_audio import OutboundAudio, SendText, StreamTimeline
from engine.call.phases import CallPhase, PhaseEvent, accepts, next_phase
from engine.call.turns import TRANSCRIPTION_FAILED, TurnLog
from engine.call.twilio_control import (
    UNANSWERED_TRANSFER_WAIT_SECONDS,
    Dialed,
    HangUp,
    Release,
    Transfer,
    TwilioControl,
    TwilioRefused,
    TwilioUnanswered,
    await_twilio_stop,
)
from engine.server import metrics
from engine.twilio.rest import REQUEST_TIMEOUT_SECONDS
from media.g711 import BYTES_PER_MS
from media.recording import StereoWavRecorder
from media.twilio_stream import (
    CALLER_TRACK,
    DtmfReceived,
    InvalidState,
    MarkFlushed,
    MarkPlayed,
    MediaGap,
    MediaReceived,
    PlaybackClock,
    Stopped,
    StreamEvent,
    StreamProtocolError,
    TwilioStream,
)
from pipelines.conversation.transfer_rules import AllowedTransfer, Refusal, TransferRules
from pipelines.llm.base import MessageRole
from pipelines.tools import TRANSFER_CALL, transfer_not_done
from storage.do_not_call import DoNotCallSource
from storage.end_reasons import EndReason
from storage.enums import CallStatus

__all__ = [
    "CREDIT_MINUTE_SECONDS",
    "GREETING_WAIT_SECONDS",
    "CallContext",
    "CallSession",
    "ConversationUnavailable",
    "DriverFactory",
    "ExtendReservation",
]

log = logging.getLogger(__name__)

GREETING_WAIT_SECONDS = 3.0
"""An outbound callee who says nothing this long still hears the agent."""

RecordOptOut = Callable[[DoNotCallSource, str], Awaitable[None]]
"""List the call's other party on the organization's do-not-call list, with a source and a reason."""

HandOver = Callable[[Callable[[list[str]], None] | None], bool]
"""Ask the socket to hand text frames to a callable as they are parsed, each read's at once (None: stop); False if it
cannot."""


class CallSession:
    """Runs one call from Twilio's `start` to the finished CallLog (implements CallHost for its driver)."""

    def __init__(
        self,
        *,
        context: CallContext,
        config: AgentConfiguration,
        driver: DriverFactory,
        stream: TwilioStream,
        send: SendText,
        writer: CallLogWriter,
        recorder: StereoWavRecorder | None = None,
        hang_up: HangUp | None = None,
        transfer: Transfer | None = None,
        dialed: Dialed | None = None,
        release_transfer: Release | None = None,
        fallback: DriverFactory | None = None,
        extend_reservation: ExtendReservation | None = None,
        credit_minute_seconds: float = CREDIT_MINUTE_SECONDS,
        opt_out: RecordOptOut | None = None,
        clock: Callable[[], float] = time.monotonic,
        knowledge: Callable[[], Mapping[str, Any] | None] | None = None,
        live: CallEvents | None = None,
        reads: CallerReads | None = None,
    ) -> None:
        """Prepare a session; `stream` must already have seen Twilio's `start`. `fallback` makes the driver that
        takes over when the first one is lost for good (a speech-to-speech agent's pipeline stages).
        `extend_reservation` is called every `credit_minute_seconds` while the call runs; the call says goodbye
        (INSUFFICIENT_CREDITS) when it returns False. `opt_out` lists the other party when they opt out.
        `dialed` reads Twilio's record of the calls a transfer made, for a transfer request Twilio did not answer;
        `release_transfer` returns the credits of such a transfer when the record shows it was not made.
        `knowledge` gives the knowledge searches made since it was last asked, stored with the agent turn they were
        made for. `live` is where the call's live events go (the API's event streams). `reads` paces the reading of
        the call's socket to what the driver is listening for (`ConversationDriver.listening_closely`)."""
        self.context = context
        self.live = live or CallEvents(None, context.organization_id, context.call_log_id)
        self.config = config
        self.clock = clock
        self.timeline = StreamTimeline(clock)
        self.tap = AudioTap()
        self.audio = OutboundAudio(stream, send, self.timeline, recorder, self.tap, clock=clock)
        self.turns = TurnLog(writer, knowledge=knowledge, live=self.live)
        self.opened = asyncio.Event()
        self._stream = stream
        self._writer = writer
        writer.when_deleted(self.call_log_deleted)
        self._recorder = recorder
        self._twilio = TwilioControl(
            context.call_sid,
            hang_up=hang_up,
            transfer=transfer,
            rules=config.transfer,
            dialed=dialed,
            release=release_transfer,
        )
        self._fallback = fallback
        self._opt_out = opt_out
        self._opt_out_writes: set[asyncio.Future[None]] = set()
        self._credits = (
            None
            if extend_reservation is None
            else CreditMeter(
                context.call_sid,
                extend_reservation,
                say_goodbye=self._say_goodbye,
                hang_up=self._hang_up_unpaid,
                minute_seconds=credit_minute_seconds,
            )
        )
        awaiting = context.outbound and config.endpointing.wait_for_greeting
        self._phase = CallPhase.AWAITING_GREETING if awaiting else CallPhase.LISTENING
        self._silence_timeout = config.silence_timeout_seconds
        self._started_at = clock()
        self._ended_at: float | None = None
        """When the call was decided over: its length, and so its charge, ends there, not once its parts are shut."""
        self._last_activity = self._started_at
        self._next_utterance = 1
        self._tasks: set[asyncio.Task[None]] = set()
        self._greeting_wait: asyncio.TimerHandle | None = None
        self._ended = asyncio.Event()
        self._over = False  # _ended is set: checked for every frame, where a plain attribute is cheaper
        self._transfers_asked = 0  # transfer requests Twilio has not answered yet
        self._transfers_answered = asyncio.Event()  # set while no transfer request waits for Twilio's answer
        self._transfers_answered.set()
        self._stopped_at: float | None = None
        """When Twilio's `stop` came while a transfer request was unanswered, or after one Twilio never answered: that
        answer, or Twilio's record of the dial, says how the call ended."""
        self._unconfirmed: tuple[str | None] | None = None
        """The detail of a transfer request Twilio did not answer (it may be dialing), when there was one."""
        self._reads = reads
        self._closely = True  # what `reads` was last told
        self._ignored_tracks: set[str] = set()  # the stream's tracks other than the caller's, once logged
        self._status = CallStatus.COMPLETED
        self._ending_status = CallStatus.COMPLETED
        """The status the call ends with once its end is decided (`_wind_down`) and Twilio's `stop` comes."""
        self._reason: EndReason | None = None
        self._detail: str | None = None
        self._driver: ConversationDriver = driver(self)

    # ------------------------------------------------------------------------------------------ CallHost

    @property
    def playback(self) -> PlaybackClock:
        """Twilio's marks: what the caller has heard of each utterance."""
        return self._stream.playback

    @property
    def phase(self) -> CallPhase:
        """Where the call is."""
        return self._phase

    def move(self, event: PhaseEvent) -> None:
        """Move the call's phase along the state machine (InvalidSessionTransition if it has no such move)."""
        phase, self._phase = self._phase, next_phase(self._phase, event)
        if self._phase is not phase:
            self.live.emit("call.state", state=self._phase.value)

    def next_utterance_id(self) -> int:
        """A new id for an agent utterance."""
        utterance_id = self._next_utterance
        self._next_utterance += 1
        return utterance_id

    def activity(self) -> None:
        """Someone spoke or was heard: the silence time-out starts over."""
        self._last_activity = self.clock()

    def caller_turn_ended(self) -> bool:
        """The caller finished a turn; True when it was the callee's greeting, which opens the conversation."""
        self.activity()
        if self._phase is not CallPhase.AWAITING_GREETING:
            return False
        self._open_conversation()
        return True

    def spawn(self, work: Coroutine[Any, Any, None], role: str) -> asyncio.Task[None]:
        """Run part of the call as a task whose unexpected failure ends this call (FAILED), never the engine."""
        task = asyncio.create_task(work, name=f"call-{self.context.call_sid}-{role}")
        self._tasks.add(task)
        task.add_done_callback(self._supervise)
        return task

    async def hang_up(
        self, reason: EndReason, detail: str | None = None, *, status: CallStatus = CallStatus.COMPLETED
    ) -> None:
        """End the call from our side, `status`: through Twilio's REST API when we can, else by closing the stream.
        Twilio's hang-up would cut the caller off from a transfer it makes: a transfer request waiting for Twilio's
        answer is waited for, and a call with one Twilio never answered is ended otherwise (`_hang_up_past`)."""
        if self._ended.is_set() or self._stopped_at is not None:
            return  # ended meanwhile, for a reason of its own, or Twilio left the stream for a transfer's <Dial>
        self._wind_down(reason, detail, status)
        if self._transfers_asked:
            await self._transfers_answered.wait()
            if self._ended.is_set() or self._stopped_at is not None or self._reason is EndReason.TRANSFERRED:
                return  # Twilio took the caller to the transfer
        if self._unconfirmed is not None:
            await self._hang_up_past(*self._unconfirmed, reason=reason, detail=detail, status=status)
            return
        if await self._twilio.hang_up():
            await await_twilio_stop(self._ended)
        self._end(status, reason, detail)  # without Twilio's word, closing the stream ends the call

    @property
    def transfer_unsettled(self) -> bool:
        """Whether a transfer request of the call waits for Twilio's answer, or went unanswered (Twilio may have
        carried it out, or may yet)."""
        return bool(self._transfers_asked) or self._unconfirmed is not None

    async def _hang_up_past(
        self, transfer_detail: str | None, *, reason: EndReason, detail: str | None, status: CallStatus
    ) -> None:
        """Hang up a call with a transfer Twilio did not answer for, which it may have carried out, or may yet: its
        REST API's hang-up would then cut the caller off from whom the `<Dial>` reached. When its record shows the
        dialed call, the call ends TRANSFERRED as Twilio leaves our stream; else closing our stream ends it, which
        ends a call still on it (its TwiML has nothing after `<Connect>`) and leaves alone a `<Dial>` made meanwhile.
        When Twilio leaves the stream while its record is asked, that answer may predate the `<Dial>`: the record asked
        after the `stop` (`_end_after_stop`) ends the call instead, transferred or with this reason."""
        made = await self._twilio.dialed_known()
        if made:
            await self._transferred(transfer_detail)
        elif self._stopped_at is None:
            self._end(status, reason, detail if made is False else _transfer_unknown(detail))

    async def _hang_up_unpaid(self, reason: EndReason) -> None:
        """The credit meter's hang-up once the time paid for is over; not of a call Twilio is taking to a transfer,
        whose leg its own reservation pays for (engine/call/paid_transfer.py)."""
        if self._reason is not EndReason.TRANSFERRED:
            await self.hang_up(reason)

    async def transfer(
        self, to: str, detail: str | None = None, *, asked: Mapping[str, Any] | None = None
    ) -> bool | None:
        """Hand the caller to `to` through Twilio; False (the call goes on) when that cannot be done, None when
        Twilio neither answered in time nor shows in its record that it dialed (it may still: the call goes on
        meanwhile). A transfer the model asked for (`asked`, its `transfer_call` arguments) was told as done: what
        it came to instead is told too.

        While another transfer (the API's) waits for Twilio, this one waits for it: the caller goes where that one
        takes them (True), and only when Twilio refused it is this one asked for. Once Twilio has left the stream
        (`stop`), nobody is left to tell a failure to: its answer, or its record of the dial, ends the call (True)."""
        if self._transfers_asked:
            await self._transfers_answered.wait()
        await self._settle_unconfirmed()
        if self._ended.is_set() or self._stopped_at is not None or self._reason is EndReason.TRANSFERRED:
            return True  # handed over by another transfer, or gone: nothing to tell the caller
        # An earlier transfer whose fate Twilio's record cannot tell holds the leg: this one is not asked.
        made = await self._transfer_made(to, detail) if self._unconfirmed is None else None
        if made:
            await self._transferred(detail)
            return True
        if self._stopped_at is not None or self._ended.is_set():  # Twilio left the stream (it may have dialed)
            return True
        if asked is not None:
            self.live.tool_call(TRANSFER_CALL, asked, transfer_not_done(to, made))
        return made

    async def _transferred(self, detail: str | None) -> None:
        """Twilio took the caller to the transfer: no new turn starts, and the call ends as it leaves our stream."""
        self._wind_down(EndReason.TRANSFERRED, detail)
        await await_twilio_stop(self._ended)  # Twilio leaves our stream for the <Dial>
        self._end(CallStatus.COMPLETED, EndReason.TRANSFERRED, detail)

    async def record_opt_out(self, source: DoNotCallSource, reason: str) -> None:
        """Put the other party on the organization's do-not-call list, naming this call; a failure is logged.

        The write is shielded: a reply cancelled by barge-in while it runs does not lose the opt-out.
        """
        if self._opt_out is None:
            log.warning("call %s: an opt-out (%s) with nowhere to record it", self.context.call_sid, source.value)
            return
        write = asyncio.ensure_future(self._write_opt_out(self._opt_out, source, reason))
        self._opt_out_writes.add(write)
        write.add_done_callback(self._opt_out_writes.discard)
        await asyncio.shield(write)

    async def _write_opt_out(self, record: RecordOptOut, source: DoNotCallSource, reason: str) -> None:
        try:
            await record(source, reason)
        except Exception:  # the callee still hears the confirmation and the call still ends; the operator reads this
            log.exception("call %s: the opt-out could not be recorded", self.context.call_sid)
            return
        log.info("call %s: the other party opted out (%s)", self.context.call_sid, source.value)

    def fail(self, reason: EndReason, detail: str) -> None:
        """End the call FAILED: the conversation cannot go on."""
        if not self._ended.is_set():
            log.error("call %s: %s: %s", self.context.call_sid, reason.value, detail)
        self._end(CallStatus.FAILED, reason, detail)

    async def hand_over(self, reason: EndReason, detail: str, *, apologize: bool = True) -> None:
        """The driver is lost for good: the fallback driver takes the call over (with an apology, mid-call), or the
        call fails with `reason`."""
        factory, self._fallback = self._fallback, None
        if factory is None or self._ended.is_set():
            self.fail(reason, detail)
            return
        successor = factory(self)
        try:
            await successor.start()
        except ConversationUnavailable as exc:
            self.fail(reason, f"{detail}; the fallback could not start either: {exc}")
            return
        lost, self._driver = self._driver, successor
        log.warning("call %s: %s (%s); the agent's pipeline takes over", self.context.call_sid, reason.value, detail)
        metrics.PROVIDER_FAILOVERS.labels("realtime", "pipeline").inc()
        await lost.close()
        if self._phase is CallPhase.RESPONDING:
            self.move(PhaseEvent.YIELD)
        if apologize and self._phase is CallPhase.LISTENING:
            self.spawn(successor.say(self.config.apology_sentence or DEFAULT_APOLOGY), "apology")

    @property
    def latencies_ms(self) -> list[int]:
        """Response latencies of the agent's turns so far (caller stopped speaking → first agent audio sent)."""
        return self.turns.latencies_ms

    # ------------------------------------------------------------------------------------- live controls

    async def say_line(self, text: str, *, interrupt: bool) -> bool:
        """The agent says `text` as a turn of its own: now, cutting what it says (True when something was cut), or
        after its current reply. Before the conversation opens (an outbound call awaiting the callee's hello), there
        is nothing to cut: the line comes after the opening. ControlRefused once the call is ending."""
        self._refuse_when_ending("says nothing more")
        interrupt = interrupt and self.opened.is_set()
        self.live.emit("call.say", text=text, interrupt=interrupt)
        return await self._driver.say_line(text, interrupt=interrupt)

    async def add_message(self, content: str, role: MessageRole) -> None:
        """Add a message to the model's context for its next reply (ControlRefused if it takes none, or the call is
        ending)."""
        self._refuse_when_ending("takes no more messages")
        await self._driver.add_message(content, role)

    async def transfer_from_outside(self, to: str, detail: str) -> AllowedTransfer | Refusal:
        """Hand the caller to `to` if the agent's transfer rules allow it, the same rules as the model's
        `transfer_call` (their Refusal otherwise): the agent stops speaking, Twilio dials, and the call ends as
        TRANSFERRED. ControlRefused when the call is ending, another transfer is under way, or no Twilio account can
        transfer it; TwilioRefused when Twilio did not."""
        verdict = TransferRules.from_config(self.config.transfer).check(to)
        if isinstance(verdict, Refusal):
            return verdict
        self._refuse_when_ending("cannot be transferred")
        if not self._twilio.can_transfer:
            raise ControlRefused(
                "the engine process holding the call has no Twilio account (TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN) "
                "to transfer it with"
            )
        if self._transfers_asked:  # the model's, say: a second one would find its leg taken, and be refused
            raise ControlRefused(
                "a transfer is under way (Twilio has not answered it yet); the call is not transferred twice"
            )
        await self._settle_unconfirmed()
        if self._reason is EndReason.TRANSFERRED:
            raise ControlRefused(
                "Twilio made the call's earlier transfer (its record shows the call it dialed): the call is "
                "transferred, not transferred again"
            )
        self._refuse_when_ending("cannot be transferred")
        if self._unconfirmed is not None:
            raise ControlRefused(
                "an earlier transfer of the call is unconfirmed, and Twilio's record cannot tell now whether it was "
                "made; the call is not transferred twice: try again in a moment"
            )
        await self._driver.interrupt("a transfer through the API")
        made = await self._transfer_made(verdict.number, detail)
        if made is None and (self._stopped_at is not None or self._ended.is_set()):
            made = await self._ended_transferred()  # Twilio left the stream: its record says why
        if not made:
            if self._phase is CallPhase.RESPONDING:
                self.move(PhaseEvent.YIELD)  # the agent stopped speaking: the caller has the floor
            if made is None:  # Twilio may be dialing: the call's end will say (transferred, or not)
                raise TwilioUnanswered(
                    f"Twilio did not answer the request to transfer the call to {verdict.number} in time, nor does "
                    f"its record show the call dialed after {UNANSWERED_TRANSFER_WAIT_SECONDS:g} s more; it may still "
                    "make it: the call goes on, and its end (endReason transferred) will tell"
                )
            raise TwilioRefused(f"Twilio did not transfer the call to {verdict.number}; the call goes on")
        self.live.emit("call.transfer", to=verdict.number, detail=detail)  # the model's are told as its tool.call
        self._wind_down(EndReason.TRANSFERRED, detail)
        self.spawn(self._transferred(detail), "transfer")
        return verdict

    async def _settle_unconfirmed(self) -> None:
        """Before another transfer, settle the one Twilio left unconfirmed, if any, by its record: made, the call ends
        transferred (the caller went there); not made, its leg's credits return and it is forgotten, so that another
        may be asked; the record unreadable, it stays unconfirmed (its leg held)."""
        if self._unconfirmed is None:
            return
        made = await self._twilio.earlier_transfer_made()
        if made and self._unconfirmed is not None:
            detail = self._unconfirmed[0]
            self._wind_down(EndReason.TRANSFERRED, detail)
            self.spawn(self._transferred(detail), "transfer")
        elif made is False:
            self._unconfirmed = None

    async def _transfer_made(self, to: str, detail: str | None) -> bool | None:
        """Every transfer's one rule (the model's, a path's, the API's): ask Twilio (`_transfer_started`), and when it
        does not answer in time, ask its record of the dial for up to UNANSWERED_TRANSFER_WAIT_SECONDS more before
        anyone is told: True when Twilio took the caller, None when neither says so (it may still), else False."""
        made = await self._transfer_started(to, detail)
        if made is None and self._stopped_at is None:
            made = await self._twilio.dialed_within(UNANSWERED_TRANSFER_WAIT_SECONDS, self._ended)
        return made

    async def _ended_transferred(self) -> bool | None:
        """Twilio left the stream after a transfer request it did not answer: whether the call, once its end is
        decided from Twilio's record (`_end_after_stop`), ended transferred; None if that takes too long to tell."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), REQUEST_TIMEOUT_SECONDS)
            return self._reason is EndReason.TRANSFERRED
        return None

    async def _transfer_started(self, to: str, detail: str | None) -> bool | None:
        """Ask Twilio to take the caller to `to`, unless the call has ended meanwhile: True when Twilio took it, None
        when it did not answer in time (it may be dialing), False otherwise.

        Twilio may leave the stream for the `<Dial>` before it answers the request: a `stop` meanwhile ends the call
        here, `transferred` when Twilio took the transfer, else (it refused: the caller had hung up) `caller_hangup`.
        """
        if self._ended.is_set():
            return False
        self._transfers_asked += 1
        self._transfers_answered.clear()
        answer: bool | None = False
        try:
            answer = await self._twilio.transfer(to)
        finally:
            self._transfers_asked -= 1
            if not self._transfers_asked:
                self._transfers_answered.set()
            if answer is None and self._unconfirmed is None:
                self._unconfirmed = (detail,)
            if self._stopped_at is not None and answer:
                self._end(CallStatus.COMPLETED, EndReason.TRANSFERRED, detail)
            elif self._stopped_at is not None and not self._transfers_asked:
                self._end_after_stop()
        return answer

    def _end_after_stop(self) -> None:
        """Twilio's `stop` came and no transfer request is unanswered: the caller hung up (or the call ends as it was
        ending), unless Twilio made a transfer it did not answer for, which its record of the dial tells."""
        if self._unconfirmed is None:
            self._end_stopped()
        else:
            self.spawn(self._end_as_twilio_dialed(*self._unconfirmed), "transfer-lookup")

    async def _end_as_twilio_dialed(self, detail: str | None) -> None:
        made = await self._twilio.dialed_after_stop(self._ended)
        if made:
            self._end(CallStatus.COMPLETED, EndReason.TRANSFERRED, detail)
        else:
            self._end_stopped(unknown=made is None)

    def _end_stopped(self, *, unknown: bool = False) -> None:
        """Twilio's `stop` came, and no transfer took the caller (or, `unknown`, Twilio's record could not tell): the
        call ends as it was ending, else the caller hung up."""
        if self._phase is CallPhase.ENDING and self._reason is not None:
            self._end(self._ending_status, self._reason, _transfer_unknown(self._detail) if unknown else self._detail)
        else:
            self._end(CallStatus.COMPLETED, EndReason.CALLER_HANGUP, _transfer_unknown(None) if unknown else None)

    def _refuse_when_ending(self, what: str) -> None:
        if not accepts(self._phase, PhaseEvent.WIND_DOWN):
            raise ControlRefused(f"the call is {self._phase.value} and {what}")

    # ------------------------------------------------------------------------------------------- lifecycle

    async def run(self, frames: AsyncIterator[str], *, hand_over: HandOver | None = None) -> CallOutcome:
        """Run the call until it ends; return how it ended. `hand_over`, when the socket offers it, has frames
        given to `receive_frames` as they are parsed instead of through `frames`."""
        self._writer.start()
        self.live.emit("call.state", state=self._phase.value)
        await self._start_driver()
        if not self._ended.is_set():
            self.spawn(self._read(frames, hand_over), "read")
            if self._credits is not None:
                self.spawn(self._credits.run(elapsed=self.clock() - self._started_at), "credits")
        loop = asyncio.get_running_loop()
        max_duration = loop.call_later(self.config.max_duration_seconds, self._say_goodbye, EndReason.MAX_DURATION)
        if self._ended.is_set():
            pass
        elif self._phase is CallPhase.AWAITING_GREETING:
            # Let the callee answer first ("Hello?"); speak anyway if they stay silent.
            self._greeting_wait = loop.call_later(GREETING_WAIT_SECONDS, self._open_conversation)
        else:
            self._open_driver()
        try:
            await self._ended.wait()
        finally:
            max_duration.cancel()
            if self._greeting_wait is not None:
                self._greeting_wait.cancel()
            try:
                outcome = await self._shut_down()
            finally:
                self.tap.close()
        return outcome

    async def _start_driver(self) -> None:
        try:
            await self._driver.start()
        except ConversationUnavailable as exc:
            if self._fallback is None:
                self.fail(exc.reason, str(exc))
                await self._driver.close()
                return
            await self.hand_over(exc.reason, str(exc), apologize=False)  # nobody has heard the agent yet

    def _open_conversation(self) -> None:
        """The callee greeted (or stayed silent long enough): the agent opens."""
        if self._greeting_wait is not None:
            self._greeting_wait.cancel()
            self._greeting_wait = None
        if self._phase is CallPhase.AWAITING_GREETING:
            self.move(PhaseEvent.GREETED)
            self._open_driver()

    def _open_driver(self) -> None:
        self.opened.set()
        self._driver.open()

    def _supervise(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if self._stopped_at is not None and isinstance(exc, InvalidState):
            # Twilio left the stream for a transfer's <Dial> (or the caller hung up) while the agent spoke: the
            # transfer's answer, or Twilio's record, ends the call; its words have no one to go to.
            log.debug("call %s: %s stopped with the stream: %s", self.context.call_sid, task.get_name(), exc)
            return
        # Once the call has ended, a task failing on its way out (a send to a closed socket) is no news.
        level = logging.DEBUG if self._ended.is_set() else logging.ERROR
        log.log(level, "call %s: %s failed", self.context.call_sid, task.get_name(), exc_info=exc)
        self._end(CallStatus.FAILED, EndReason.INTERNAL_ERROR, type(exc).__name__)

    def _wind_down(self, reason: EndReason, detail: str | None, status: CallStatus = CallStatus.COMPLETED) -> None:
        """The end is decided: no new turn starts; the reason (and status) holds unless the call ends otherwise
        first."""
        if accepts(self._phase, PhaseEvent.WIND_DOWN):
            self.move(PhaseEvent.WIND_DOWN)
        self._reason, self._detail, self._ending_status = reason, detail, status

    def _end(self, status: CallStatus, reason: EndReason, detail: str | None = None) -> None:
        """Decide the call is over (first reason wins); run() then shuts everything down."""
        if self._ended.is_set():
            return
        self._status, self._reason, self._detail = status, reason, detail
        self._ended_at = self._stopped_at if self._stopped_at is not None else self.clock()
        self.move(PhaseEvent.END)
        self._over = True
        self._ended.set()
        if self._reads is not None:
            self._reads.close()

    def end_from_outside(self, reason: EndReason, *, completed: bool = False, detail: str | None = None) -> None:
        """End the call for a reason outside it: FAILED (the engine shutting down), or COMPLETED when someone
        hung it up on purpose (the API)."""
        self._end(CallStatus.COMPLETED if completed else CallStatus.FAILED, reason, detail)

    def call_log_deleted(self) -> None:
        """The call's CallLog was deleted while it ran (the platform's dashboard deletes rows in SQL): nothing more of
        the call can be kept, and its credit reservation went with the row, so hang it up now, through Twilio when
        the engine can."""
        if not accepts(self._phase, PhaseEvent.WIND_DOWN):
            return  # ending already
        log.warning(
            "call %s: its CallLog %s was deleted while the call ran: hanging up",
            self.context.call_sid,
            self.context.call_log_id,
        )
        self._wind_down(EndReason.CALL_DELETED, None)
        self.spawn(self.hang_up(EndReason.CALL_DELETED), "hang-up")

    def cut_off(self, detail: str, *, hang_up_in: float) -> bool:
        """This engine has been cut off from the database so long that the other nodes may take its calls for lost
        (FAILED, ENGINE_LOST) once `hang_up_in` seconds are over: say goodbye and hang up by then, ending the call as
        they will, so that it never runs on with nobody able to bill or see it. False if it is ending already."""
        if not accepts(self._phase, PhaseEvent.WIND_DOWN):
            return False
        self._say_goodbye(EndReason.ENGINE_LOST, detail, status=CallStatus.FAILED, within=hang_up_in)
        return True

    def end_when_twilio_stops(self, reason: EndReason) -> None:
        """Twilio is about to stop the stream for a reason decided outside the call (an answering machine took it):
        stop speaking now, and end with `reason` when Twilio's `stop` comes."""
        if not accepts(self._phase, PhaseEvent.WIND_DOWN):
            return
        self._wind_down(reason, None)
        if self._greeting_wait is not None:
            self._greeting_wait.cancel()
        self.spawn(self._driver.interrupt(reason.value), "stop-speaking")

    async def _shut_down(self) -> CallOutcome:
        while pending := [task for task in self._tasks if not task.done()]:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._driver.close()
        self.turns.close(unsettled_caller_text=TRANSCRIPTION_FAILED)
        # Unrounded: the CallLog's end rounds it up, so that a call is charged every minute it started. Up to its end,
        # not including the time its providers took to close.
        ended_at = self._ended_at if self._ended_at is not None else self.clock()
        duration_s = ended_at - self._started_at
        reason = self._reason or EndReason.INTERNAL_ERROR
        log.info("call %s ended: %s (%s, %.1f s)", self.context.call_sid, reason.value, self._status, duration_s)
        return CallOutcome(status=self._status, end_reason=reason, end_detail=self._detail, duration_s=duration_s)

    # ------------------------------------------------------------------------------------------ caller side

    async def _read(self, frames: AsyncIterator[str], hand_over: HandOver | None) -> None:
        """Feed Twilio's frames through the protocol; the call ends when they stop."""
        handed = hand_over is not None and hand_over(self.receive_frames)
        try:
            async for text in frames:
                self.receive_frame(text)
                if self._over:
                    return
            if self._stopped_at is None:  # after a `stop`, the transfer asked for ends the call
                self._end(CallStatus.FAILED, EndReason.STREAM_LOST)
        except StreamProtocolError as exc:  # a frame the socket itself refused (too large, not UTF-8)
            self._protocol_error(exc)
        finally:
            if handed and hand_over is not None:
                hand_over(None)

    def receive_frame(self, text: str) -> None:
        """One text frame from Twilio, through the protocol to the call; ignored once the call has ended."""
        self.receive_frames((text,))

    def receive_frames(self, texts: Sequence[str]) -> None:
        """Text frames from Twilio read together, in order, through the protocol to the call; ignored once the call
        has ended.

        Each caller frame goes to the driver as it is parsed; what needs no decision frame by frame (the recording,
        the listen-in, the stream's clock, how closely the socket is read, the silence timeout) is done once for
        each run of caller frames.
        """
        if self._over:
            return
        receive_media = self._stream.receive_media
        on_caller_audio = self._driver.on_caller_audio
        run: list[bytes] = []  # caller audio back to back, from run_at_ms to run_end_ms
        run_at_ms = run_end_ms = last_at_ms = 0
        try:
            for text in texts:
                media = receive_media(text)
                if media is None:
                    if run:
                        self._caller_audio_taken(run, run_at_ms, last_at_ms)
                        run = []
                    for event in self._stream.receive_text(text):
                        self._on_stream_event(event)
                else:
                    payload, at_ms = media
                    if run and at_ms != run_end_ms:  # not where the run ends: a run of its own
                        self._caller_audio_taken(run, run_at_ms, last_at_ms)
                        run = []
                    if not run:
                        run_at_ms = at_ms
                    run.append(payload)
                    last_at_ms, run_end_ms = at_ms, at_ms + len(payload) // BYTES_PER_MS
                    on_caller_audio(payload, at_ms)
                if self._over:
                    break
        except StreamProtocolError as exc:
            self._protocol_error(exc)
        if run:
            self._caller_audio_taken(run, run_at_ms, last_at_ms)

    def _protocol_error(self, exc: StreamProtocolError) -> None:
        log.warning("call %s: protocol error: %s", self.context.call_sid, exc)
        self._end(CallStatus.FAILED, EndReason.PROTOCOL_ERROR, f"{type(exc).__name__}: {exc}")

    def _on_stream_event(self, event: StreamEvent) -> None:
        match event:
            case MediaReceived(track=track, payload=payload, timestamp_ms=at_ms) if track == CALLER_TRACK:
                self._driver.on_caller_audio(payload, at_ms)
                self._caller_audio_taken([payload], at_ms, at_ms)
            case MediaReceived(track=track) if track not in self._ignored_tracks:
                # Twilio's "outbound" track (a stream started with both tracks) is the agent's own audio, already
                # recorded from our side: heard as the caller, it would make the agent interrupt itself.
                self._ignored_tracks.add(track)
                log.info("call %s: ignoring the stream's %r track (not the caller's)", self.context.call_sid, track)
            case MarkPlayed() | MarkFlushed():
                self._driver.on_mark(event)
            case DtmfReceived(digit=digit):
                self.activity()
                if accepts(self._phase, PhaseEvent.REPLY):
                    self._driver.on_caller_key(digit)
            case MediaGap(missing_ms=missing_ms):
                self._writer.note_media_gap(missing_ms)
            case Stopped():
                # After our own hang-up Twilio sends `stop` too: keep the reason the agent ended for. A call with a
                # transfer request out (or unanswered) is not hung up through Twilio: its `stop` may be the transfer's.
                if self._transfers_asked or self._unconfirmed is not None:
                    self._stopped_at = self.clock()  # the transfer's answer, or Twilio's record, ends the call
                    if not self._transfers_asked:
                        self._end_after_stop()
                else:
                    self._end_stopped()
            case _:
                pass  # start (seen by the media socket) and unknown marks carry nothing the call acts on

    def _caller_audio_taken(self, frames: list[bytes], at_ms: int, last_at_ms: int) -> None:
        """After the driver took a run of caller frames back to back, the first stamped `at_ms` by Twilio: the rest
        of the audio path, once for the run. Cheap work only."""
        now = self.clock()
        self.timeline.observe(last_at_ms, now)
        audio = frames[0] if len(frames) == 1 else b"".join(frames)
        if self._recorder is not None:
            self._recorder.write_caller(audio, at_ms)
        if self.tap.listening:
            self.tap.write_caller(audio, at_ms)
        if self._reads is not None and self._driver.listening_closely is not self._closely:
            self._closely = not self._closely
            self._reads.listen(closely=self._closely)
        if (
            now - self._last_activity > self._silence_timeout
            and self._phase is CallPhase.LISTENING
            and not self._driver.caller_speaking
        ):
            self._say_goodbye(EndReason.SILENCE_TIMEOUT)

    # ------------------------------------------------------------------------------------------- ending

    def _say_goodbye(
        self,
        reason: EndReason,
        detail: str | None = None,
        *,
        status: CallStatus = CallStatus.COMPLETED,
        within: float | None = None,
    ) -> None:
        """Stop whatever the agent was doing, say goodbye, then hang up, `status`; the goodbye is cut short once
        `within` seconds are over (None: never)."""
        if not accepts(self._phase, PhaseEvent.WIND_DOWN):
            return
        self._wind_down(reason, detail, status)
        if self._greeting_wait is not None:
            self._greeting_wait.cancel()
        self.spawn(self._goodbye(reason, detail, status, within), "goodbye")

    async def _goodbye(self, reason: EndReason, detail: str | None, status: CallStatus, within: float | None) -> None:
        try:
            async with asyncio.timeout(within):
                await self._driver.interrupt(reason.value)
                try:
                    await self._driver.say(self.config.goodbye_sentence or DEFAULT_GOODBYE)
                except Exception as exc:  # the goodbye is a courtesy: the call ends all the same
                    log.warning("call %s: the goodbye could not be said: %s", self.context.call_sid, exc)
        except TimeoutError:
            log.warning("call %s: the goodbye was cut short after %.1f s", self.context.call_sid, within)
        await self.hang_up(reason, detail, status=status)


TRANSFER_UNKNOWN = "whether Twilio made the call's unconfirmed transfer is unknown: its record could not be read"
"""The end detail (after the call's own) of a call that ended without Twilio's record telling whether a transfer
request it did not answer for was made."""


def _transfer_unknown(detail: str | None) -> str:
    return f"{detail}; {TRANSFER_UNKNOWN}" if detail else TRANSFER_UNKNOWN
