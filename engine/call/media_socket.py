"""The media WebSocket Twilio opens for each call: find the call, build its pipeline, run its CallSession."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from config.agent import (
    DEFAULT_TRANSFER_MINUTES,
    AgentConfiguration,
    AgentConfigurationError,
    OpenAIRealtimeConfig,
    parse_agent_configuration,
)
from engine.call.call_log_writer import CallLogDeferred, CallLogWriter, CallOutcome
from engine.call.call_outcome import call_seconds
from engine.call.caller_reads import CallerReads
from engine.call.cascade import pipeline_driver
from engine.call.driver import CallHost, ConversationDriver, DriverFactory
from engine.call.frame_socket import FrameSocket, TextFrames
from engine.call.live_events import LIVE_EVENTS, CallEvents, call_description
from engine.call.outbound_audio import SendText
from engine.call.paid_transfer import PaidTransfer
from engine.call.session import CallContext, CallSession
from engine.call.setup import PreparedCall, prepare_call
from engine.knowledge.ingestion import KNOWLEDGE_EMBEDDER
from engine.server import metrics
from engine.server.appkeys import (
    DATABASE,
    DRAIN,
    LIVE_CALLS,
    OFFLINE_WORKERS,
    PROVIDER_CLIENTS,
    RECORDING_KEY,
    SETTINGS,
    TWILIO,
)
from engine.twilio.signature import public_base_url, signature_is_valid
from engine.twilio.webhooks import CALL_LOG_PARAMETER, DIAL_PATH, callback_url
from engine.workers.call_log_replay import CALL_LOG_SPILL
from engine.workers.post_call import POST_CALL
from engine.workers.recording_io import RECORDING_IO
from engine.workers.recording_uploads import RECORDING_UPLOADS
from engine.workers.recovery import NODE_ID
from media.recording import StereoWavRecorder
from media.twilio_stream import MalformedMessage, Started, StreamProtocolError, TwilioStream
from pipelines.errors import ProviderError
from pipelines.registry import (
    PipelineUnavailable,
    RealtimePlan,
    VoiceChoice,
    build_pipeline,
    plan_realtime,
    realtime_path,
)
from storage import Pool, agents, call_logs, credit_reservations, do_not_call, transfer_legs
from storage.call_logs import CallLog
from storage.do_not_call import DoNotCallSource
from storage.end_reasons import EndReason
from storage.enums import CallStatus, CallType
from storage.errors import DATABASE_ERRORS, NotFound
from storage.recordings import recording_path, recording_url

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
    request.app[DRAIN].refuse_new_call("media stream")  # before the upgrade: the load balancer tries another engine
    settings = request.app[SETTINGS]
    if not signature_is_valid(request, settings):  # Twilio signs the upgrade: one without a signature is not its
        log.warning("media WebSocket with a missing or bad signature from %s: refused", request.remote)
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
    """The call's CallLog, taken for this stream on this node, if the stream may run it; else None (logged).

    The call must be one our voice webhook answered (or an outbound call we placed), still in progress, and not
    taken by another stream on any node: the CallSid and the CallLog id (both unguessable) have to match. Taking it
    is the call's first write (`call_logs.claim_stream`), made before the slow setup, so a caller hanging up during
    setup is this session's to record, not the status callback's.
    """
    wanted_id = started.custom_parameters.get(CALL_LOG_PARAMETER)
    call_log = None
    if wanted_id:
        call_log = await call_logs.claim_stream(
            app[DATABASE].pool, call_log_id=wanted_id, call_id=started.call_sid, node_id=app[NODE_ID]
        )
    if call_log is None:
        log.warning(
            "media stream for call %s (CallLog %s): unknown, finished, or run by another stream: closed",
            started.call_sid,
            wanted_id,
        )
    return call_log


def _drivers(
    config: AgentConfiguration, prepared: PreparedCall, *, realtime: RealtimePlan | None, can_transfer: bool
) -> tuple[DriverFactory, DriverFactory | None]:
    """The call's conversation driver and the one that takes over if it is lost: speech to speech for a realtime
    agent (its pipeline stages, if listed, as the fallback), else the stt → llm → tts pipeline."""

    def pipeline() -> DriverFactory:
        built = build_pipeline(config, paths=prepared.paths, voice=prepared.voice, context=prepared.context)
        return pipeline_driver(built, first_sentence=prepared.first_sentence)

    if realtime is None:
        return pipeline(), None
    from engine.call.realtime import realtime_driver  # speech-to-speech agents only

    driver = realtime_driver(
        client=prepared.context.clients.openai(realtime.api_key, realtime.base_url),
        realtime=realtime_voice(realtime.config, prepared.voice),
        instructions=prepared.context.instructions,
        tools=prepared.context.tools,
        first_sentence=prepared.first_sentence,
        can_transfer=can_transfer,
        path=realtime_path(prepared.paths, prepared.context),
    )
    if not config.realtime_fallback:
        return driver, None

    def fallback(host: CallHost) -> ConversationDriver:
        return pipeline()(host)  # built only if the model is lost

    return driver, fallback


def realtime_voice(entry: OpenAIRealtimeConfig, voice: VoiceChoice | None) -> OpenAIRealtimeConfig:
    """The realtime entry with the agent's Voice, when that is an OpenAI voice and the entry names none itself."""
    if "voice" in entry.model_fields_set or voice is None or voice.provider != "openai" or not voice.provider_voice_id:
        return entry
    return entry.model_copy(update={"voice": voice.provider_voice_id})


def _realtime_plan(config: AgentConfiguration, prepared: PreparedCall) -> RealtimePlan | None:
    """The speech-to-speech provider the call uses; None for a pipeline agent, or for a realtime agent whose model
    has no key here but whose fallback pipeline can run."""
    if not config.realtime:
        return None
    try:
        return plan_realtime(config, prepared.context.keys)
    except PipelineUnavailable:
        if config.realtime_fallback:
            log.warning("the agent's realtime model has no key here: its fallback pipeline takes the call")
            return None
        raise


async def _run_call(request: web.Request, ws: web.WebSocketResponse) -> None:
    app = request.app
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
    app[LIVE_CALLS].take(call_log.id)
    try:
        await _run_claimed_call(request, ws, stream, frames, started, call_log)
    except Exception as exc:
        if not app[LIVE_CALLS].starting(call_log.id):
            raise  # its session ran: the call's writer finishes its CallLog
        # Taken, so the CallLog names this node, but never set up: no status callback or recovery will close it.
        log.exception("call %s: setting the call up failed", started.call_sid)
        await _fail_setup(app, call_log, type(exc).__name__)
    finally:
        app[LIVE_CALLS].remove(call_log.id)


async def _fail_setup(app: web.Application, call_log: CallLog, detail: str) -> None:
    try:
        await call_logs.fail_unstarted(app[DATABASE].pool, call_log, EndReason.INTERNAL_ERROR, detail)
    except DATABASE_ERRORS as exc:
        log.error("call %s: could not close its CallLog after its setup failed: %s", call_log.id, exc)


async def _run_claimed_call(  # noqa: PLR0917 (the stream's parts, as `_run_call` made them)
    request: web.Request,
    ws: web.WebSocketResponse,
    stream: TwilioStream,
    frames: TextFrames,
    started: Started,
    call_log: CallLog,
) -> None:
    """Build the call's pipeline and run its session, then wrap the call up."""
    app = request.app
    settings, pool = app[SETTINGS], app[DATABASE].pool
    bundle = await _call_agent(pool, call_log)
    if bundle is None:
        log.warning("call %s: its agent was deleted before its stream started; the call ends", started.call_sid)
        await call_logs.fail_unstarted(pool, call_log, EndReason.AGENT_DELETED)
        return
    publisher = app.get(LIVE_EVENTS)
    live = CallEvents(publisher, call_log.organization_id, call_log.id)
    try:
        config = parse_agent_configuration(bundle.agent.configuration)
        prepared = await prepare_call(
            pool,
            settings=settings,
            clients=app[PROVIDER_CLIENTS],
            config=config,
            bundle=bundle,
            call_log=call_log,
            offline_work=app[OFFLINE_WORKERS],
            embedder=app.get(KNOWLEDGE_EMBEDDER),
            on_tool_call=live.tool_call,
        )
        config = prepared.config  # its goodbye and apology filled from the call's variables
        realtime = _realtime_plan(config, prepared)
        twilio = app.get(TWILIO)
        driver, fallback = _drivers(config, prepared, realtime=realtime, can_transfer=twilio is not None)
    except (AgentConfigurationError, ProviderError) as exc:
        log.error("call %s: cannot build the agent's pipeline: %s", started.call_sid, exc)
        await call_logs.fail_unstarted(pool, call_log, EndReason.PIPELINE_UNAVAILABLE, str(exc))
        return

    recorder = None
    path = recording_path(settings, call_log.organization_id, call_log.id)
    if config.recording:
        # Its folder is made where its file is opened, on the recordings' thread: no thread hop of its own per call.
        recorder = StereoWavRecorder(path, elapsed_ms=stream.elapsed_ms)
        app[RECORDING_IO].add(recorder)

    send: SendText = ws.send_str  # called directly: no coroutine of ours around each frame sent
    paid = (
        PaidTransfer(
            pool,
            twilio,
            organization_id=call_log.organization_id,
            call_log_id=call_log.id,
            max_minutes=config.transfer.max_minutes if config.transfer is not None else DEFAULT_TRANSFER_MINUTES,
            rates=settings.credit_rates,
            action_url=callback_url(public_base_url(request, settings), DIAL_PATH, call_log.id),
        )
        if twilio is not None
        else None
    )

    writer = CallLogWriter(
        app[DATABASE].call_log_pool,
        organization_id=call_log.organization_id,
        call_log_id=call_log.id,
        agent_id=bundle.agent.id,
        node_id=app[NODE_ID],
        spill=app[CALL_LOG_SPILL],
        finish_timeout=settings.call_log_finish_timeout,
    )
    session = CallSession(
        context=CallContext(
            call_log.id,
            call_log.organization_id,
            bundle.agent.id,
            started.call_sid,
            outbound=call_log.call_type is CallType.OUTBOUND,
        ),
        config=config,
        driver=driver,
        fallback=fallback,
        stream=stream,
        send=send,
        writer=writer,
        recorder=recorder,
        hang_up=twilio.hang_up if twilio is not None else None,
        transfer=paid,
        dialed=twilio.dialed_calls if twilio is not None else None,
        release_transfer=paid.release if paid is not None else None,
        extend_reservation=functools.partial(credit_reservations.extend_reservation, pool, call_log_id=call_log.id),
        opt_out=functools.partial(record_opt_out, pool, call_log),
        knowledge=prepared.knowledge.take_sources if prepared.knowledge is not None else None,
        live=live,
        reads=CallerReads(
            request.transport.get_extra_info("socket") if request.transport is not None else None,
            progress=lambda: stream.last_sequence_number,
            loop=asyncio.get_running_loop(),
        ),
    )
    app[LIVE_CALLS].add(call_log.id, session)
    live.emit("call.started", **call_description(call_log))
    metrics.CALLS_LIVE.inc()
    began = time.monotonic()
    try:
        outcome = await session.run(frames, hand_over=frames.hand_to)
    except Exception as exc:  # a bug in one call must still leave its CallLog finished, and the engine serving
        log.exception("call %s: session failed", started.call_sid)
        outcome = CallOutcome(
            status=CallStatus.FAILED,
            end_reason=EndReason.INTERNAL_ERROR,
            end_detail=type(exc).__name__,
            duration_s=time.monotonic() - began,
        )
    finally:
        app[LIVE_CALLS].remove(call_log.id)
        metrics.CALLS_LIVE.dec()
    metrics.CALLS_ENDED.labels(outcome.status.value).inc()
    # The call is over: its stream closes now (ending Twilio's call if nothing else did), while its end is told and
    # written, not once the database has answered, which may take the writer's whole patience while the database does
    # not. (Closing waits for the other side's close frame, if it ever comes: not the wrap-up's business.)
    closing = asyncio.create_task(ws.close(), name=f"close-stream-{call_log.id}")
    try:
        live.emit(
            "call.ended",
            status=outcome.status.value,
            endReason=outcome.end_reason.value,
            durationSeconds=call_seconds(outcome.duration_s),
            transfer=await _transfer_leg(pool, call_log) if live.watched else None,
        )
        await _wrap_up(request, call_log, writer, outcome, recorder)
    finally:
        await closing


async def _transfer_leg(pool: Pool, call_log: CallLog) -> dict[str, Any] | None:
    """The call's transfer leg as call.ended tells it (storage.transfer_legs.legs_of), or None: it has none, or the
    database cannot tell now (logged)."""
    try:
        legs = await transfer_legs.legs_of(pool, [call_log.id])
    except DATABASE_ERRORS as exc:
        log.warning("call %s: its transfer leg is left out of call.ended: %s", call_log.call_id, exc)
        return None
    return legs.get(call_log.id)


async def _call_agent(pool: Pool, call_log: CallLog) -> agents.AgentBundle | None:
    """The call's agent, or None once it is deleted: before the CallLog was read (its agentId is null then) or since
    (the CallLog read at the stream's start still names it)."""
    if call_log.agent_id is None:
        return None
    try:
        return await agents.load_agent_bundle(
            pool, organization_id=call_log.organization_id, agent_id=call_log.agent_id
        )
    except NotFound:
        return None


async def record_opt_out(pool: Pool, call_log: CallLog, source: DoNotCallSource, reason: str) -> None:
    """List the call's other party (the CallLog's phoneNumber) as opted out, naming the call."""
    await do_not_call.record_opt_out(
        pool, organization_id=call_log.organization_id, call_log_id=call_log.id, source=source, reason=reason
    )


async def _wrap_up(
    request: web.Request,
    call_log: CallLog,
    writer: CallLogWriter,
    outcome: CallOutcome,
    recorder: StereoWavRecorder | None,
) -> None:
    """After the session: close the recording, finish the CallLog, and queue the post-call analysis.

    Each step runs whatever the one before did: a recording that cannot be closed costs the recording, never the
    CallLog, and the analysis is queued even if the CallLog could not be finished (it waits for a finished one).
    A CallLog deleted during the call (the platform's dashboard deletes rows in SQL) has nothing left to finish or
    analyze: logged, never raised.
    """
    app = request.app
    if recorder is not None:
        try:
            outcome = await _close_recording(request, call_log, outcome, recorder)
        except Exception:
            log.exception("call %s: its recording could not be closed; the call ends without one", call_log.call_id)
    analyze = True
    try:
        await writer.finish(outcome)
    except CallLogDeferred:
        analyze = False  # kept in the spill and written later (logged); the post-call sweep finds the call then
    except NotFound:
        analyze = False
        log.warning(
            "call %s: its CallLog %s was deleted during the call; it ended (%s) with nothing left to write",
            call_log.call_id,
            call_log.id,
            outcome.end_reason.value,
        )
    finally:
        if analyze:
            app[POST_CALL].submit(call_log.id)


async def _close_recording(
    request: web.Request, call_log: CallLog, outcome: CallOutcome, recorder: StereoWavRecorder
) -> CallOutcome:
    """Finalise the call's recording file; the outcome again, with where to fetch the recording and its length."""
    app, settings = request.app, request.app[SETTINGS]
    info = await app[RECORDING_IO].close(recorder)
    await app[RECORDING_UPLOADS].finished(
        organization_id=call_log.organization_id, call_log_id=call_log.id, path=info.path, size=info.bytes
    )
    base = public_base_url(request, settings)
    url = recording_url(settings, base, call_log.id, key=app[RECORDING_KEY], now=datetime.now(UTC))
    return dataclasses.replace(
        outcome, recording_url=url, metadata={**outcome.metadata, "recordingMs": info.duration_ms}
    )
