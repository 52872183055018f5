"""The media WebSocket Twilio opens for each call: find the call, build its pipeline, run its CallSession."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

from config.agent import AgentConfiguration, AgentConfigurationError, parse_agent_configuration
from engine.call.call_log_writer import CallLogWriter, CallOutcome
from engine.call.frame_socket import FrameSocket, TextFrames
from engine.call.outbound_audio import SendText
from engine.call.session import CallContext, CallSession
from engine.call.setup import PreparedCall, prepare_call
from engine.server import metrics
from engine.server.appkeys import DATABASE, LIVE_CALLS, OFFLINE_WORKERS, SETTINGS, TWILIO
from engine.twilio.signature import SIGNATURE_HEADER, public_base_url, signature_is_valid
from engine.twilio.webhooks import CALL_LOG_PARAMETER
from engine.workers.post_call import POST_CALL
from engine.workers.recording_io import RECORDING_IO
from engine.workers.recordings import RECORDING_KEY, recording_url
from engine.workers.recovery import NODE_ID
from media.recording import StereoWavRecorder
from media.twilio_stream import MalformedMessage, Started, StreamProtocolError, TwilioStream
from pipelines.registry import Pipeline, PipelineUnavailable, RealtimePlan, build_pipeline, plan_realtime
from pipelines.tools import ToolConfigurationError
from storage import agents, call_logs
from storage.call_logs import CallLog, InvalidCallTransition
from storage.enums import CallStatus, CallType
from storage.recordings import recording_path

if TYPE_CHECKING:
    from engine.call.realtime_session import RealtimeCallSession

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 10.0
# aiohttp's own limit sits above the protocol's, so an oversized frame is a protocol error of that call
# (FAILED with a reason) rather than a bare connection drop.
WEBSOCKET_MAX_MESSAGE = 1 << 20


async def _await_start(stream: TwilioStream, frames: AsyncIterator[str]) -> Started:
    async with asyncio.timeout(START_TIMEOUT_SECONDS):
        async for text in frames:
            for event in stream.receive_text(text):
                if isinstance(event, Started):
                    return event
    raise MalformedMessage("the stream ended before Twilio's start message")


async def handle_media(request: web.Request) -> web.StreamResponse:
    """GET /twilio/media (WebSocket): one call's audio both ways, for as long as the call lasts."""
    settings = request.app[SETTINGS]
    if SIGNATURE_HEADER in request.headers and not signature_is_valid(request, settings):
        log.warning("media WebSocket with a bad signature from %s: refused", request.remote)
        raise web.HTTPForbidden(text="invalid Twilio signature")
    ws = FrameSocket(max_msg_size=WEBSOCKET_MAX_MESSAGE, autoping=True)
    await ws.prepare(request)
    try:
        await _run_call(request, ws)
    finally:
        if not ws.closed:
            await ws.close()
    return ws


async def _streamable_call_log(app: web.Application, started: Started) -> CallLog | None:
    """The call's CallLog if this stream may run it, else None (logged).

    The call must be one our voice webhook answered, still in progress, and not streaming already: the CallSid
    and the CallLog id (both unguessable) have to match.
    """
    pool = app[DATABASE].pool
    call_log = await call_logs.get_by_call_id(pool, call_id=started.call_sid)
    wanted_id = started.custom_parameters.get(CALL_LOG_PARAMETER)
    if call_log is None and wanted_id:
        # An outbound call answered before the code that placed it stored its CallSid: the CallLog id our TwiML
        # gave the stream gives the log its CallSid (only while it still has its placeholder).
        call_log = await call_logs.adopt_call_id(pool, call_log_id=wanted_id, call_id=started.call_sid)
    if call_log is None or call_log.id != wanted_id or call_log.status != CallStatus.IN_PROGRESS:
        log.warning("media stream for unknown or finished call %s (CallLog %s): closed", started.call_sid, wanted_id)
        return None
    if call_log.id in app[LIVE_CALLS] or "engineNode" in call_log.metadata:
        log.warning("a second media stream for call %s: closed", started.call_sid)
        return None
    return call_log


async def _fail(pool: asyncpg.Pool, call_log: CallLog, reason: str) -> None:
    """Finish a call that could not run as FAILED with `reason` (unless something finished it already)."""
    with contextlib.suppress(InvalidCallTransition):
        await call_logs.finalize_call_log(
            pool,
            organization_id=call_log.organization_id,
            call_log_id=call_log.id,
            status=CallStatus.FAILED,
            duration=0,
            metadata={"endReason": reason},
        )


def _make_session(
    app: web.Application,
    context: CallContext,
    config: AgentConfiguration,
    *,
    prepared: PreparedCall,
    realtime: RealtimePlan | None,
    pipeline: Pipeline | None,
    stream: TwilioStream,
    send: SendText,
    writer: CallLogWriter,
    recorder: StereoWavRecorder | None,
) -> CallSession | RealtimeCallSession:
    """The call's session: speech to speech for a realtime agent, else the stt → llm → tts pipeline."""
    twilio = app.get(TWILIO)
    hang_up = twilio.hang_up if twilio is not None else None
    transfer = twilio.transfer if twilio is not None else None
    if realtime is not None:
        from engine.call.realtime_session import RealtimeCallSession  # speech-to-speech agents only
        from pipelines.realtime.openai_realtime import realtime_client

        return RealtimeCallSession(
            context=context,
            config=config,
            client=realtime_client(realtime.api_key, realtime.base_url),
            instructions=prepared.context.instructions,
            stream=stream,
            send=send,
            writer=writer,
            recorder=recorder,
            hang_up=hang_up,
            transfer=transfer,
            tools=prepared.context.tools,
            first_sentence=prepared.first_sentence,
            realtime=realtime.config,
        )
    assert pipeline is not None
    return CallSession(
        context=context,
        config=config,
        pipeline=pipeline,
        stream=stream,
        send=send,
        writer=writer,
        recorder=recorder,
        hang_up=hang_up,
        transfer=transfer,
        first_sentence=prepared.first_sentence,
    )


async def _run_call(request: web.Request, ws: web.WebSocketResponse) -> None:
    app = request.app
    settings, pool = app[SETTINGS], app[DATABASE].pool
    stream = TwilioStream()
    frames = TextFrames(ws)
    try:
        started = await _await_start(stream, frames)
    except (StreamProtocolError, TimeoutError) as exc:
        log.warning("media stream from %s never started properly: %s", request.remote, exc)
        return

    call_log = await _streamable_call_log(app, started)
    if call_log is None:
        return
    if call_log.agent_id is None:
        await _fail(pool, call_log, "agent_deleted")
        return
    bundle = await agents.load_agent_bundle(pool, organization_id=call_log.organization_id, agent_id=call_log.agent_id)
    try:
        config = parse_agent_configuration(bundle.agent.configuration)
        prepared = await prepare_call(
            pool, settings=settings, config=config, bundle=bundle, call_log=call_log, offline_work=app[OFFLINE_WORKERS]
        )
        realtime = plan_realtime(config, prepared.context) if config.realtime else None
        pipeline = (
            None
            if realtime
            else build_pipeline(config, paths=prepared.paths, voice=prepared.voice, context=prepared.context)
        )
    except (AgentConfigurationError, PipelineUnavailable, ToolConfigurationError) as exc:
        log.error("call %s: cannot build the agent's pipeline: %s", started.call_sid, exc)
        await _fail(pool, call_log, f"pipeline_unavailable: {exc}")
        return

    recorder = None
    path = recording_path(settings, call_log.organization_id, call_log.id)
    if config.recording:
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        recorder = StereoWavRecorder(path)
        app[RECORDING_IO].add(recorder)

    send: SendText = ws.send_str  # called directly: no coroutine of ours around each frame sent

    writer = CallLogWriter(
        app[DATABASE].call_log_pool,
        organization_id=call_log.organization_id,
        call_log_id=call_log.id,
        agent_id=call_log.agent_id,
        node_id=app[NODE_ID],
    )
    session = _make_session(
        app,
        CallContext(
            call_log.id,
            call_log.organization_id,
            call_log.agent_id,
            started.call_sid,
            outbound=call_log.call_type is CallType.OUTBOUND,
        ),
        config,
        prepared=prepared,
        realtime=realtime,
        pipeline=pipeline,
        stream=stream,
        send=send,
        writer=writer,
        recorder=recorder,
    )
    app[LIVE_CALLS].add(call_log.id, session)
    metrics.CALLS_LIVE.inc()
    began = time.monotonic()
    try:
        outcome = await session.run(frames)
    except Exception as exc:  # a bug in one call must still leave its CallLog finished, and the engine serving
        log.exception("call %s: session failed", started.call_sid)
        outcome = CallOutcome(
            status=CallStatus.FAILED,
            end_reason=f"internal_error: {type(exc).__name__}",
            duration_s=time.monotonic() - began,
        )
    finally:
        app[LIVE_CALLS].remove(call_log.id)
        metrics.CALLS_LIVE.dec()
    metrics.CALLS_ENDED.labels(outcome.status.value).inc()
    await _wrap_up(request, call_log, writer, outcome, recorder)


async def _wrap_up(
    request: web.Request,
    call_log: CallLog,
    writer: CallLogWriter,
    outcome: CallOutcome,
    recorder: StereoWavRecorder | None,
) -> None:
    """After the session: close the recording, finish the CallLog, and queue the post-call analysis."""
    app, settings = request.app, request.app[SETTINGS]
    if recorder is not None:
        info = await app[RECORDING_IO].close(recorder)
        base = public_base_url(request, settings)
        url = recording_url(settings, base, call_log.id, key=app[RECORDING_KEY], now=datetime.now(UTC))
        outcome = dataclasses.replace(
            outcome, recording_url=url, metadata={**outcome.metadata, "recordingMs": info.duration_ms}
        )
    await writer.finish(outcome)
    app[POST_CALL].submit(call_log.id)
