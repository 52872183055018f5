"""Twilio's voice webhooks: answer an inbound call with a media stream, and follow call status callbacks."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from aiohttp import web
from twilio.twiml.voice_response import Connect, VoiceResponse

from config.agent import AgentConfigurationError, parse_agent_configuration
from engine.appkeys import DATABASE, SETTINGS
from engine.call_setup import provider_context
from engine.twilio_signature import public_base_url, signature_is_valid
from pipelines.registry import PipelineUnavailable, check_pipeline
from storage import agents, call_logs, organizations, phone_numbers
from storage.call_logs import InvalidCallTransition
from storage.enums import CallStatus, CallType, PhoneNumberStatus
from storage.errors import AlreadyExists

log = logging.getLogger(__name__)

MEDIA_PATH = "/twilio/media"
CALL_LOG_PARAMETER = "callLogId"

NOT_IN_SERVICE = "Sorry, the number you have called is not in service. Goodbye."
NO_AGENT = "Sorry, nobody is available to take your call right now. Please try again later. Goodbye."
OUT_OF_CREDITS = "Sorry, this line cannot take calls at the moment. Please try again later. Goodbye."
MISCONFIGURED = "Sorry, this line is not set up correctly. Please try again later. Goodbye."

# Twilio's final CallStatus values and what they make of a call that is still IN_PROGRESS.
_FINAL_STATUSES = {
    "busy": (CallStatus.MISSED, "busy"),
    "no-answer": (CallStatus.MISSED, "no_answer"),
    "canceled": (CallStatus.MISSED, "canceled"),
    "failed": (CallStatus.FAILED, "twilio_failed"),
    "completed": (CallStatus.FAILED, "stream_never_started"),
}


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


def connect_stream(stream_url: str, call_log_id: str) -> web.Response:
    """TwiML connecting the call to our media WebSocket, naming its CallLog in a Parameter."""
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    stream.parameter(name=CALL_LOG_PARAMETER, value=call_log_id)
    response.append(connect)
    return twiml(response)


async def handle_voice(request: web.Request) -> web.Response:
    """POST /twilio/voice: an inbound call rings; answer with a media stream or a polite refusal."""
    settings = request.app[SETTINGS]
    form = await request.post()
    if not signature_is_valid(request, settings, form):  # type: ignore[arg-type]
        log.warning("voice webhook with a bad signature from %s: refused", request.remote)
        raise web.HTTPForbidden(text="invalid Twilio signature")
    call_sid, caller, called = str(form.get("CallSid", "")), str(form.get("From", "")), str(form.get("To", ""))
    if not call_sid.startswith("CA"):
        raise web.HTTPBadRequest(text="CallSid missing or malformed")

    pool = request.app[DATABASE].pool
    number = await phone_numbers.find_by_number(pool, number=called)
    if number is None or number.inbound_status != PhoneNumberStatus.ENABLED:
        log.info("call %s to %s: number not in service", call_sid, called)
        return refusal(NOT_IN_SERVICE)
    agent = await agents.find_inbound_agent(pool, phone_number_id=number.id)
    if agent is None:
        log.info("call %s to %s: no active inbound agent", call_sid, called)
        return refusal(NO_AGENT)
    try:
        config = parse_agent_configuration(agent.configuration)
    except AgentConfigurationError as exc:
        log.error("call %s: agent %s has an invalid configuration: %s", call_sid, agent.id, exc)
        return refusal(MISCONFIGURED)
    bundle = await agents.load_agent_bundle(pool, organization_id=agent.organization_id, agent_id=agent.id)
    try:
        check_pipeline(config, provider_context(settings, bundle))
    except PipelineUnavailable as exc:
        # Most often a missing API key: the caller hears an apology, the operator reads which key in the log.
        log.error("call %s: agent %s cannot run: %s", call_sid, agent.id, exc)
        return refusal(MISCONFIGURED)
    if not await organizations.has_credits(pool, organization_id=agent.organization_id):
        log.info("call %s: organization %s is out of credits", call_sid, agent.organization_id)
        return refusal(OUT_OF_CREDITS)

    metadata: dict[str, Any] = {
        "to": number.phone_number,
        "direction": "inbound",
        "twilioAccountSid": str(form.get("AccountSid", "")),
    }
    for field, key in (("CallerName", "callerName"), ("FromCity", "fromCity"), ("FromCountry", "fromCountry")):
        if form.get(field):
            metadata[key] = str(form[field])
    try:
        call_log = await call_logs.create_call_log(
            pool,
            organization_id=agent.organization_id,
            call_type=CallType.INBOUND,
            call_id=call_sid,
            agent_id=agent.id,
            campaign_id=None,
            customer=str(form.get("CallerName") or caller) or None,
            phone_number=caller or None,
            metadata=metadata,
        )
    except AlreadyExists:
        # Twilio retried the webhook: answer the same way, with the CallLog the first attempt created.
        existing = await call_logs.get_by_call_id(pool, call_id=call_sid)
        if existing is None or existing.status != CallStatus.IN_PROGRESS:
            return refusal(NO_AGENT)
        call_log = existing
    log.info("call %s from %s answered by agent %s (CallLog %s)", call_sid, caller, agent.id, call_log.id)
    return connect_stream(media_stream_url(public_base_url(request, settings)), call_log.id)


async def handle_status(request: web.Request) -> web.Response:
    """POST /twilio/status: Twilio's call status callbacks.

    A call whose media session runs finishes its own CallLog; this closes the ones that never got that far:
    busy, no-answer and canceled become MISSED, failed becomes FAILED, and a call that completed without its
    media stream ever starting is FAILED with that reason.
    """
    settings = request.app[SETTINGS]
    form = await request.post()
    if not signature_is_valid(request, settings, form):  # type: ignore[arg-type]
        raise web.HTTPForbidden(text="invalid Twilio signature")
    call_sid, status = str(form.get("CallSid", "")), str(form.get("CallStatus", ""))
    pool = request.app[DATABASE].pool
    call_log = await call_logs.get_by_call_id(pool, call_id=call_sid)
    if call_log is None or call_log.status != CallStatus.IN_PROGRESS or status not in _FINAL_STATUSES:
        return web.Response(status=204)
    if status == "completed" and "engineNode" in call_log.metadata:
        return web.Response(status=204)  # its media session (or recovery, if that node died) closes it
    final, reason = _FINAL_STATUSES[status]
    duration = form.get("CallDuration")
    metadata = {"endReason": reason, "twilioStatus": status}
    if form.get("SipResponseCode"):
        metadata["sipResponseCode"] = str(form["SipResponseCode"])
    with contextlib.suppress(InvalidCallTransition):  # the media session may have finished it first
        await call_logs.finalize_call_log(
            pool,
            organization_id=call_log.organization_id,
            call_log_id=call_log.id,
            status=final,
            duration=int(str(duration)) if duration and str(duration).isdigit() else 0,
            metadata=metadata,
        )
    log.info("call %s: status %s closed CallLog %s as %s", call_sid, status, call_log.id, final)
    return web.Response(status=204)
