"""Twilio's voice webhooks: answer an inbound call with a media stream, follow call status callbacks, and act on
answering-machine verdicts for outbound calls."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlencode

from aiohttp import web
from twilio.twiml.voice_response import Connect, VoiceResponse

from config.agent import AgentConfiguration, AgentConfigurationError, parse_agent_configuration
from engine.call.call_outcome import started_minutes
from engine.call.setup import provider_keys, template_variables
from engine.server.appkeys import CLOCK, DATABASE, DRAIN, LIVE_CALLS, SETTINGS, TWILIO
from engine.twilio.fields import CallStatusCallback, DialEnded, Form, IncomingCall, InvalidTwilioField, MachineVerdict
from engine.twilio.inbound_routing import choose_inbound_agent
from engine.twilio.rest import OUTBOUND_API, CallLookupFailed, TwilioCalls
from engine.twilio.signature import public_base_url, signed_form
from pipelines.llm.prompt import render_prompt
from pipelines.registry import PipelineUnavailable, check_pipeline
from storage import Pool, agents, call_logs, credit_reservations, phone_numbers, transfer_legs
from storage.call_logs import CallLog, InvalidCallTransition
from storage.call_slots import ConcurrentCallLimitReached
from storage.end_reasons import EndReason, ending
from storage.enums import CallStatus, CallType, PhoneNumberStatus
from storage.errors import DATABASE_ERRORS, AlreadyExists, NotFound
from storage.organizations import InsufficientCredits
from storage.phone_numbers import PhoneNumber

log = logging.getLogger(__name__)

MEDIA_PATH = "/twilio/media"
STATUS_PATH = "/twilio/status"
AMD_PATH = "/twilio/amd"
DIAL_PATH = "/twilio/dial"
CALL_LOG_PARAMETER = "callLogId"

NOT_IN_SERVICE = "Sorry, the number you have called is not in service. Goodbye."
NO_AGENT = "Sorry, nobody is available to take your call right now. Please try again later. Goodbye."
OUT_OF_CREDITS = "Sorry, this line cannot take calls at the moment. Please try again later. Goodbye."
MISCONFIGURED = "Sorry, this line is not set up correctly. Please try again later. Goodbye."
ALL_LINES_BUSY = "Sorry, all our lines are busy right now. Please call again in a few minutes. Goodbye."
TRANSFER_UNANSWERED = "Sorry, nobody could take your call. Please try again later. Goodbye."

_DIAL_UNANSWERED = frozenset({"busy", "no-answer", "failed"})
"""A transfer's DialCallStatus values that leave the caller on the line, unconnected."""

# Twilio's final CallStatus values and what they make of a call that is still IN_PROGRESS.
_FINAL_STATUSES = {
    "busy": (CallStatus.MISSED, EndReason.BUSY),
    "no-answer": (CallStatus.MISSED, EndReason.NO_ANSWER),
    "canceled": (CallStatus.MISSED, EndReason.CANCELED),
    "failed": (CallStatus.FAILED, EndReason.TWILIO_FAILED),
    "completed": (CallStatus.FAILED, EndReason.STREAM_NEVER_STARTED),
}
# The same for an outbound call nobody answered (a contract, see engine.twilio.outbound_calls).
_OUTBOUND_UNANSWERED = {status: _FINAL_STATUSES[status] for status in ("busy", "no-answer", "canceled", "failed")}
_ALIVE_STATUSES = frozenset({"queued", "initiated", "ringing", "in-progress"})
"""Twilio's CallStatus values of a call that has not ended."""


_Fields = TypeVar("_Fields")


async def _webhook_fields(request: web.Request, read: Callable[[Form], _Fields]) -> _Fields:
    """The webhook's fields, signed by Twilio and in their documented shapes: else 403 or 400, never a 500."""
    form = await signed_form(request, request.app[SETTINGS])
    try:
        return read(form)
    except InvalidTwilioField as exc:
        log.warning("%s from %s refused: %s", request.path, request.remote, exc)
        raise web.HTTPBadRequest(text=str(exc)) from None


def twiml(response: VoiceResponse) -> web.Response:
    """An HTTP response carrying TwiML."""
    return web.Response(text=str(response), content_type="text/xml")


def refusal(message: str) -> web.Response:
    """Say why the call cannot be taken, then hang up."""
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return twiml(response)


def media_stream_url(base_url: str) -> str:
    """The media WebSocket's URL for Twilio: the public base with a ws scheme (wss behind https)."""
    if base_url.startswith("https://"):
        return "wss://" + base_url.removeprefix("https://") + MEDIA_PATH
    return "ws://" + base_url.removeprefix("http://") + MEDIA_PATH


def stream_twiml(stream_url: str, call_log_id: str) -> str:
    """TwiML text connecting the call to our media WebSocket, naming its CallLog in a Parameter."""
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    stream.parameter(name=CALL_LOG_PARAMETER, value=call_log_id)
    response.append(connect)
    return str(response)


def connect_stream(stream_url: str, call_log_id: str) -> web.Response:
    """An HTTP response with the TwiML of `stream_twiml`."""
    return web.Response(text=stream_twiml(stream_url, call_log_id), content_type="text/xml")


def callback_url(base_url: str, path: str, call_log_id: str) -> str:
    """A callback URL for one outbound call: Twilio signs it whole, so the CallLog id in its query is authentic."""
    return f"{base_url.rstrip('/')}{path}?{urlencode({CALL_LOG_PARAMETER: call_log_id})}"


@dataclass(frozen=True, slots=True)
class _Refusal:
    """How a refused call to an organization's number ends: its CallLog's status and what the caller hears (None:
    the number's own closed message)."""

    status: CallStatus
    message: str | None

    def spoken(self, number: PhoneNumber) -> str:
        """What the caller hears before Twilio hangs up."""
        return self.message or number.closed_message


_REFUSALS: Mapping[EndReason, _Refusal] = {
    EndReason.NUMBER_DISABLED: _Refusal(CallStatus.MISSED, NOT_IN_SERVICE),
    EndReason.NO_ACTIVE_AGENT: _Refusal(CallStatus.MISSED, NO_AGENT),
    EndReason.CLOSED: _Refusal(CallStatus.MISSED, None),
    EndReason.PIPELINE_UNAVAILABLE: _Refusal(CallStatus.FAILED, MISCONFIGURED),
    EndReason.INSUFFICIENT_CREDITS: _Refusal(CallStatus.MISSED, OUT_OF_CREDITS),
    EndReason.CONCURRENT_CALL_LIMIT: _Refusal(CallStatus.MISSED, ALL_LINES_BUSY),
}
"""Each reason the voice webhook turns away a call to an organization's number: all are in its call history."""


class InboundCallRefused(Exception):
    """The voice webhook turns a call to an organization's number away for `reason` (a key of `_REFUSALS`)."""

    def __init__(
        self,
        reason: EndReason,
        *,
        agent_id: str | None = None,
        detail: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(reason.value if detail is None else f"{reason.value}: {detail}")
        self.reason = reason
        self.agent_id = agent_id
        self.detail = detail
        self.metadata = dict(metadata or {})


async def handle_voice(request: web.Request) -> web.Response:
    """POST /twilio/voice: an inbound call rings; answer with a media stream or a polite refusal.

    A call refused for the organization's own reasons (the number disabled, no active agent, closed, an agent that
    cannot run, no credits, the plan's call limit) is logged in its call history, charging nothing; a call to a
    number no organization holds is logged nowhere. A retried webhook (Twilio's, or the load balancer's) writes
    nothing more and answers as its first attempt did. A draining engine answers 503 before anything is read or
    written: the load balancer retries another engine.
    """
    request.app[DRAIN].refuse_new_call("voice webhook")
    incoming = await _webhook_fields(request, IncomingCall.read)
    pool = request.app[DATABASE].pool
    number = await phone_numbers.find_by_number(pool, number=incoming.called)
    if number is None:
        log.info("call %s to %s: number not in service", incoming.call_sid, incoming.called)
        return refusal(NOT_IN_SERVICE)
    try:
        return await _answer(request, incoming, number)
    except AlreadyExists:  # the webhook was retried: its first attempt wrote the CallLog
        return await _answer_again(request, incoming.call_sid, number)


async def _answer(request: web.Request, incoming: IncomingCall, number: PhoneNumber) -> web.Response:
    """Answer a call to the organization's `number` with a media stream, or refuse it and log why.

    AlreadyExists if the call has a CallLog already (a retried webhook), with nothing written.
    """
    pool = request.app[DATABASE].pool
    try:
        call_log = await _open_inbound_call(request.app, incoming, number)
    except InboundCallRefused as refused:
        await _record_refusal(pool, incoming, number, refused)
        return refusal(_REFUSALS[refused.reason].spoken(number))
    log.info(
        "call %s from %s answered by agent %s (CallLog %s)",
        incoming.call_sid,
        incoming.caller,
        call_log.agent_id,
        call_log.id,
    )
    return _stream(request, call_log)


async def _open_inbound_call(app: web.Application, incoming: IncomingCall, number: PhoneNumber) -> CallLog:
    """The IN_PROGRESS CallLog of a call the number's agent takes, its first minute reserved and a call slot taken.

    InboundCallRefused, with nothing written, when the call cannot be taken; AlreadyExists if it has a CallLog.
    """
    settings, pool = app[SETTINGS], app[DATABASE].pool
    call_sid, called = incoming.call_sid, incoming.called
    if number.inbound_status != PhoneNumberStatus.ENABLED:
        log.info("call %s to %s: number disabled for inbound calls", call_sid, called)
        raise InboundCallRefused(EndReason.NUMBER_DISABLED)
    candidates = await agents.list_inbound_agents(pool, phone_number_id=number.id)
    if not candidates:
        log.info("call %s to %s: no active inbound agent", call_sid, called)
        raise InboundCallRefused(EndReason.NO_ACTIVE_AGENT)
    agent = choose_inbound_agent(candidates, app[CLOCK]()).agent
    if agent is None:
        log.info("call %s to %s: outside every agent's hours, closed", call_sid, called)
        raise InboundCallRefused(EndReason.CLOSED)
    try:
        config = parse_agent_configuration(agent.configuration)
    except AgentConfigurationError as exc:
        log.error("call %s: agent %s has an invalid configuration: %s", call_sid, agent.id, exc)
        raise InboundCallRefused(
            EndReason.PIPELINE_UNAVAILABLE, agent_id=agent.id, detail=f"the agent's configuration is invalid: {exc}"
        ) from None
    bundle = await agents.load_agent_bundle(pool, organization_id=agent.organization_id, agent_id=agent.id)
    try:
        check_pipeline(config, provider_keys(settings, bundle))
    except PipelineUnavailable as exc:
        # Most often a missing API key: the caller hears an apology, the operator reads which key in the log and in
        # the organization's call history.
        log.error("call %s: agent %s cannot run: %s", call_sid, agent.id, exc)
        raise InboundCallRefused(EndReason.PIPELINE_UNAVAILABLE, agent_id=agent.id, detail=str(exc)) from None
    try:
        return await call_logs.create_call_log(
            pool,
            organization_id=agent.organization_id,
            call_type=CallType.INBOUND,
            call_id=call_sid,
            agent_id=agent.id,
            campaign_id=None,
            customer=incoming.caller_name or incoming.caller,
            phone_number=incoming.caller,
            metadata=_inbound_metadata(incoming, number),
            credit_rates=settings.credit_rates,
            call_limits=settings.concurrent_call_limits,
        )
    except InsufficientCredits as exc:
        log.info("call %s: organization %s is out of credits (%s)", call_sid, agent.organization_id, exc)
        raise InboundCallRefused(EndReason.INSUFFICIENT_CREDITS, agent_id=agent.id) from None
    except ConcurrentCallLimitReached as exc:
        log.info("call %s: %s", call_sid, exc)
        raise InboundCallRefused(
            EndReason.CONCURRENT_CALL_LIMIT, agent_id=agent.id, metadata={"planLimit": exc.limit}
        ) from None


def _inbound_metadata(incoming: IncomingCall, number: PhoneNumber) -> dict[str, Any]:
    """An inbound call's CallLog metadata from its webhook: the number called, the direction, the caller's details."""
    metadata: dict[str, Any] = {
        "to": number.phone_number,
        "direction": "inbound",
        "twilioAccountSid": incoming.account_sid or "",
    }
    for key, value in (
        ("callerName", incoming.caller_name),
        ("fromCity", incoming.from_city),
        ("fromCountry", incoming.from_country),
    ):
        if value:
            metadata[key] = value
    return metadata


async def _record_refusal(pool: Pool, incoming: IncomingCall, number: PhoneNumber, refused: InboundCallRefused) -> None:
    """Log a refused call in its organization's call history: the status `_REFUSALS` gives its reason, the reason
    and its detail, duration 0, nothing charged, call.ended queued. AlreadyExists if the call has a CallLog."""
    await call_logs.record_refused_call(
        pool,
        organization_id=number.organization_id,
        call_type=CallType.INBOUND,
        call_id=incoming.call_sid,
        reason=refused.reason,
        detail=refused.detail,
        status=_REFUSALS[refused.reason].status,
        agent_id=refused.agent_id,
        customer=incoming.caller_name or incoming.caller,
        phone_number=incoming.caller,
        metadata={**_inbound_metadata(incoming, number), **refused.metadata},
    )


async def _answer_again(request: web.Request, call_sid: str, number: PhoneNumber) -> web.Response:
    """Answer a retried voice webhook as its first attempt did, from the CallLog that attempt wrote.

    A call still IN_PROGRESS gets its media stream again (a retry may even find the plan's last call slot taken by
    its own first attempt); a refused call hears the same refusal; a call that has ended since is refused.
    """
    existing = await call_logs.get_by_call_id(request.app[DATABASE].pool, call_id=call_sid)
    if existing is None:
        return refusal(NO_AGENT)
    if existing.status == CallStatus.IN_PROGRESS:
        return _stream(request, existing)
    reason = EndReason.read(existing.metadata.get("endReason"))
    refused = _REFUSALS.get(reason) if reason is not None else None
    if refused is None or existing.status != refused.status:
        return refusal(NO_AGENT)
    return refusal(refused.spoken(number))


def _stream(request: web.Request, call_log: CallLog) -> web.Response:
    """Connect the call to this engine's media WebSocket, naming its CallLog."""
    return connect_stream(media_stream_url(public_base_url(request, request.app[SETTINGS])), call_log.id)


async def handle_status(request: web.Request) -> web.Response:
    """POST /twilio/status: Twilio's call status callbacks.

    A call whose media stream started finishes its own CallLog (its node took it, `call_logs.claim_stream`, before
    setting it up: a caller who hangs up meanwhile is that session's caller_hangup); this closes the ones that never
    got that far. Inbound: busy, no-answer and canceled become MISSED, failed becomes FAILED, and a call that
    completed without its media stream ever reaching an engine node is FAILED with that reason. Outbound calls
    (their callback URL names the CallLog) end the same way with Twilio's status as the end reason; see
    `_outbound_status`. An outbound call still alive whose CallLog no longer exists is hung up
    (`_hang_up_orphaned_call`).
    """
    callback = await _webhook_fields(request, CallStatusCallback.read)
    status = callback.status
    pool = request.app[DATABASE].pool
    call_log_id = request.query.get(CALL_LOG_PARAMETER)
    call_log = await _callback_call_log(pool, callback.call_sid, call_log_id)
    if call_log is None:
        if call_log_id and status in _ALIVE_STATUSES:
            await _hang_up_orphaned_call(request.app, callback, call_log_id)
        return web.Response(status=204)
    if call_log.call_type is CallType.OUTBOUND:
        await _outbound_status(pool, call_log, callback, request.app.get(TWILIO), request.app[SETTINGS].credit_rates)
        return web.Response(status=204)
    if call_log.status != CallStatus.IN_PROGRESS or status not in _FINAL_STATUSES:
        return web.Response(status=204)
    if status == "completed" and "engineNode" in call_log.metadata:
        return web.Response(status=204)  # its media session (or recovery, if that node died) closes it
    final, reason = _FINAL_STATUSES[status]
    await _close_unconnected(pool, call_log, final, reason, callback)
    return web.Response(status=204)


async def _callback_call_log(pool: Pool, call_sid: str, call_log_id: str | None) -> CallLog | None:
    """The CallLog a callback is about: by CallSid, or (an outbound call whose CallSid is not stored yet) by the
    CallLog id its signed URL carries."""
    call_log = await call_logs.get_by_call_id(pool, call_id=call_sid)
    if call_log is None and call_log_id:
        call_log = await call_logs.adopt_call_id(pool, call_log_id=call_log_id, call_id=call_sid)
    if call_log is not None and call_log_id and call_log.id != call_log_id:
        log.warning("callback for %s names CallLog %s, not its own %s: ignored", call_sid, call_log_id, call_log.id)
        return None
    return call_log


async def _outbound_status(
    pool: Pool,
    call_log: CallLog,
    callback: CallStatusCallback,
    twilio: TwilioCalls | None,
    credit_rates: Mapping[str, int],
) -> None:
    """Move an outbound CallLog on Twilio's status.

    busy, no-answer and canceled end it MISSED, failed FAILED, each with Twilio's status as the end reason;
    answered (`in-progress`) leaves it to the media session. `completed` closes a call whose stream never
    started (FAILED, or with its voicemail end, charged Twilio's started minutes, when an answering machine took
    it), and gives a call the media
    session finished its voicemail end reason when the session could not know it (it ran on another node), and
    charges the minutes Twilio ran it past that session's end when it left a message (`_charge_voicemail_message`).
    A call Twilio reports alive whose CallLog was closed `not_placed` is hung up (`_hang_up_late_call`).
    """
    status = callback.status
    if status in _ALIVE_STATUSES:
        if call_log.status != CallStatus.IN_PROGRESS and _closed_not_placed(call_log):
            await _hang_up_late_call(call_log, callback, twilio)
        else:
            log.debug("outbound call %s: %s", call_log.call_id, status)
        return
    voicemail = EndReason.read(call_log.metadata.get("voicemail"))
    if call_log.status != CallStatus.IN_PROGRESS:
        if status == "completed" and voicemail and EndReason.read(call_log.metadata.get("endReason")) != voicemail:
            await call_logs.merge_metadata(
                pool,
                organization_id=call_log.organization_id,
                call_log_id=call_log.id,
                metadata=ending(voicemail),
            )
        if status == "completed" and voicemail is EndReason.VOICEMAIL_LEFT:
            await _charge_voicemail_message(pool, call_log, callback, credit_rates)
        return
    minutes_charged = 0
    if status in _OUTBOUND_UNANSWERED:
        final, reason = _OUTBOUND_UNANSWERED[status]
    elif status == "completed" and "engineNode" not in call_log.metadata and voicemail:
        # A machine answered and Twilio ran the call (its message, or our hang-up) without a stream: it connected,
        # and pays every minute it started, as a call the media session ends does.
        final, reason = CallStatus.COMPLETED, voicemail
        minutes_charged = started_minutes(callback.duration_s or 0)
    elif status == "completed" and "engineNode" not in call_log.metadata:
        final, reason = CallStatus.FAILED, EndReason.STREAM_NEVER_STARTED
    else:
        return
    await _close_unconnected(pool, call_log, final, reason, callback, minutes_charged=minutes_charged)


async def _charge_voicemail_message(
    pool: Pool, call_log: CallLog, callback: CallStatusCallback, credit_rates: Mapping[str, int]
) -> None:
    """Charge the minutes Twilio ran a call past its media session's end, where it spoke the voicemail message after
    the beep: the started minutes of Twilio's `CallDuration` beyond those the call's settlement charged (its
    `minutesCharged`: the session's end, or recovery's for a call whose engine was lost). Once, however often Twilio
    sends the callback (`voicemailMinutesCharged` in the CallLog's metadata)."""
    charged = call_log.metadata.get("minutesCharged")
    if not isinstance(charged, int):  # settled before the minutes were kept, or never reserved
        charged = started_minutes(call_log.duration or 0)
    minutes = started_minutes(callback.duration_s or 0) - charged
    if await credit_reservations.charge_after_end(
        pool,
        organization_id=call_log.organization_id,
        call_log_id=call_log.id,
        minutes=minutes,
        rates=credit_rates,
        marker="voicemailMinutesCharged",
    ):
        log.info("call %s: %d more minutes charged for the voicemail message", call_log.call_id, minutes)


def _closed_not_placed(call_log: CallLog) -> bool:
    return EndReason.read(call_log.metadata.get("endReason")) is EndReason.NOT_PLACED


async def _hang_up_late_call(call_log: CallLog, callback: CallStatusCallback, twilio: TwilioCalls | None) -> None:
    """Hang up a call Twilio created after its CallLog was closed `not_placed`.

    The placement lookup found no such call once the create request could no longer be on its way, so the CallLog
    ended FAILED, its credits went back and a campaign's recipient was queued again: Twilio creating the call after
    all (a create delayed past the request's deadline) would ring the callee for a call nobody runs (its stream is
    refused) while the recipient may be dialed again. Hung up at its first callback, it usually never rings.
    """
    if twilio is None:
        log.error(
            "call %s (CallLog %s, closed not_placed) is %s at Twilio and cannot be hung up: no Twilio client",
            callback.call_sid,
            call_log.id,
            callback.status,
        )
        return
    hung_up = await twilio.hang_up(callback.call_sid)
    log.warning(
        "call %s was created by Twilio after its CallLog %s was closed not_placed: %s (it was %s)",
        callback.call_sid,
        call_log.id,
        "hung up" if hung_up else "could not be hung up",
        callback.status,
    )


async def _hang_up_orphaned_call(app: web.Application, callback: CallStatusCallback, call_log_id: str) -> None:
    """Hang up a call Twilio is making for the CallLog `call_log_id`, which no longer exists (deleted in SQL, as the
    dashboard does, before Twilio created the call or while it rang): nobody runs it, and its stream would be
    refused once the callee answered. Canceled while queued or ringing, completed once answered.

    Only a call of this engine's: the callback is signed (Twilio's signature covers the URL, whose CallLog id only
    `place_call` writes, and the CallSid in the body; an engine with no Twilio client checks no signature and hangs
    nothing up), it names this engine's Twilio account, no CallLog has the id (one that holds another CallSid is not
    this call's) nor the CallSid, and Twilio holds the call for this account as an API call still alive. Asking
    Twilio first also makes a retried callback, or one of a call hung up already, change and log nothing.
    """
    settings, twilio, pool = app[SETTINGS], app.get(TWILIO), app[DATABASE].pool
    if twilio is None or callback.account_sid != settings.twilio_account_sid:
        return
    if await call_logs.call_log_exists(pool, call_log_id=call_log_id, call_id=callback.call_sid):
        return
    try:
        call = await twilio.fetch_call(callback.call_sid)
    except CallLookupFailed as exc:
        log.warning(
            "call %s is %s for CallLog %s, which no longer exists, and cannot be hung up now (a later callback will "
            "try again): %s",
            callback.call_sid,
            callback.status,
            call_log_id,
            exc,
        )
        return
    if call is None or call.direction != OUTBOUND_API or call.status not in _ALIVE_STATUSES:
        log.debug("call %s of deleted CallLog %s: nothing to hang up (%s)", callback.call_sid, call_log_id, call)
        return
    answered = call.status == "in-progress"
    done = await (twilio.hang_up(call.sid) if answered else twilio.cancel(call.sid))
    log.warning(
        "call %s was %s for CallLog %s, which no longer exists: %s",
        call.sid,
        call.status,
        call_log_id,
        ("completed" if answered else "canceled") if done else "it could not be hung up",
    )


async def _close_unconnected(
    pool: Pool,
    call_log: CallLog,
    final: CallStatus,
    reason: EndReason,
    callback: CallStatusCallback,
    *,
    minutes_charged: int = 0,
) -> None:
    status = callback.status
    metadata = {**ending(reason), "twilioStatus": status}
    if callback.sip_response_code:
        metadata["sipResponseCode"] = callback.sip_response_code
    with contextlib.suppress(InvalidCallTransition):  # the media session may have finished it first
        await call_logs.finalize_call_log(
            pool,
            organization_id=call_log.organization_id,
            call_log_id=call_log.id,
            status=final,
            duration=callback.duration_s or 0,
            metadata=metadata,
            minutes_charged=minutes_charged,
        )
    log.info("call %s: status %s closed CallLog %s as %s", call_log.call_id, status, call_log.id, final)


async def handle_dial_ended(request: web.Request) -> web.Response:
    """POST /twilio/dial: a transfer's `<Dial>` ended (its action URL names the CallLog). Its leg is settled: the
    minutes it talked are charged, the rest of its reserved credits return (`storage.transfer_legs`); a leg whose
    CallLog was deleted during the dial is settled all the same. Then the call ends; a caller the destination never
    answered hears why first.

    A settlement the database cannot take now is left to the sweep (`engine.workers.transfer_settlement`): the
    caller's call ends all the same.
    """
    ended = await _webhook_fields(request, DialEnded.read)
    response = VoiceResponse()
    if ended.dial_status in _DIAL_UNANSWERED:
        response.say(TRANSFER_UNANSWERED)
    response.hangup()
    pool = request.app[DATABASE].pool
    call_log_id = request.query.get(CALL_LOG_PARAMETER)
    try:
        call_log = await _callback_call_log(pool, ended.call_sid, call_log_id)
        # A CallLog deleted during the dial (the dashboard deletes rows in SQL) left its leg detached, still to settle.
        leg_of = call_log.id if call_log is not None else call_log_id
        settled = None
        if leg_of:
            settled = await transfer_legs.settle_leg(
                pool,
                call_log_id=leg_of,
                dial_status=ended.dial_status,
                duration_seconds=ended.duration_s,
                call_sid=ended.call_sid,
            )
    except DATABASE_ERRORS as exc:
        log.warning("call %s: the transfer's end could not be recorded now (the sweep will): %s", ended.call_sid, exc)
        return twiml(response)
    if call_log is None and settled is None:
        log.warning("dial action for %s: no such call: ignored", ended.call_sid)
    if settled is not None:
        log.info(
            "call %s: transfer %s after %d s, %d credits charged",
            ended.call_sid,
            settled.dial_status,
            settled.duration_seconds,
            settled.credits_charged,
        )
    return twiml(response)


_MACHINE_VERDICTS = ("machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax")


async def handle_amd(request: web.Request) -> web.Response:
    """POST /twilio/amd: Twilio's asynchronous answering-machine verdict for an outbound call.

    A person (`human`, or `unknown` when Twilio could not tell) goes on talking to the agent. A machine gets
    what the agent's voicemail settings ask for: its message spoken after the beep and then a hang-up
    (`voicemail_left`), or an immediate hang-up (`voicemail_hangup`, also for a fax). The verdict is stored in
    the CallLog before Twilio is told, so whichever side closes the log (the media session, or the `completed`
    status callback) ends it with that reason.
    """
    app = request.app
    verdict = await _webhook_fields(request, MachineVerdict.read)
    call_sid, answered_by = verdict.call_sid, verdict.answered_by
    pool = app[DATABASE].pool
    call_log = await _callback_call_log(pool, call_sid, request.query.get(CALL_LOG_PARAMETER))
    if call_log is None or call_log.call_type is not CallType.OUTBOUND:
        return web.Response(status=204)
    detection: dict[str, Any] = {"answeredBy": answered_by}
    if verdict.detection_ms is not None:
        detection["machineDetectionMs"] = verdict.detection_ms
    if answered_by not in _MACHINE_VERDICTS or call_log.status != CallStatus.IN_PROGRESS:
        await call_logs.merge_metadata(
            pool, organization_id=call_log.organization_id, call_log_id=call_log.id, metadata=detection
        )
        log.info("outbound call %s answered by %s", call_sid, answered_by or "(no verdict)")
        return web.Response(status=204)

    config = await _agent_configuration(pool, call_log)
    message = _voicemail_message(config, call_log, app[CLOCK]()) if answered_by != "fax" else None
    reason = EndReason.VOICEMAIL_LEFT if message is not None else EndReason.VOICEMAIL_HANGUP
    await call_logs.merge_metadata(
        pool,
        organization_id=call_log.organization_id,
        call_log_id=call_log.id,
        metadata={**detection, "voicemail": reason},
    )
    session = app[LIVE_CALLS].get(call_log.id)
    if session is not None:
        session.end_when_twilio_stops(reason)
    twilio = app.get(TWILIO)
    if twilio is None:
        log.error("call %s reached a machine but Twilio credentials are missing: it cannot be redirected", call_sid)
        if session is not None:
            session.end_from_outside(reason)
        return web.Response(status=204)
    if message is not None:
        done = await twilio.run_twiml(call_sid, voicemail_twiml(message), action="leave a voicemail on")
    else:
        done = await twilio.hang_up(call_sid)
    if not done and message is not None:
        done = await twilio.hang_up(call_sid)  # at least stop talking to a machine
    if not done and session is not None:
        session.end_from_outside(reason)
    log.info("outbound call %s answered by %s: %s", call_sid, answered_by, reason)
    return web.Response(status=204)


def voicemail_twiml(message: str) -> str:
    """TwiML that speaks a voicemail message and hangs up."""
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response)


async def _agent_configuration(pool: Pool, call_log: CallLog) -> AgentConfiguration | None:
    """The configuration of the call's agent; None when it has none usable (the machine is then hung up on)."""
    if call_log.agent_id is None:
        return None
    try:
        agent = await agents.get_agent(pool, organization_id=call_log.organization_id, agent_id=call_log.agent_id)
        return parse_agent_configuration(agent.configuration)
    except (NotFound, AgentConfigurationError) as exc:
        log.warning("call %s: no usable voicemail settings (%s): hanging up on the machine", call_log.call_id, exc)
        return None


def _voicemail_message(config: AgentConfiguration | None, call_log: CallLog, now: datetime) -> str | None:
    """The message to leave, its placeholders filled as the call's first sentence is; None to hang up instead."""
    if config is None:
        return None
    voicemail = config.voicemail
    if voicemail.action != "leave_message" or not voicemail.message:
        return None
    rendered = render_prompt(voicemail.message, template_variables(config, call_log, now))
    return rendered.text.strip() or None
