"""The aiohttp application factory: routes in one place, resources owned by cleanup contexts."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from aiohttp import web

from config.settings import Settings
from engine.api.key_watch import key_watch_context
from engine.api.routes import add_api_routes
from engine.call import media_socket
from engine.call.control_channel import control_channel_context
from engine.call.listen_relay import listen_relay_context
from engine.call.live_call_controls import live_call_handlers
from engine.call.live_calls import LiveCalls
from engine.call.live_events import close_live_streams, live_events_context
from engine.campaigns.dispatcher import dispatcher_context
from engine.knowledge.ingestion import ingestion_context
from engine.monitor.page import add_monitor_routes
from engine.server import health, metrics
from engine.server.appkeys import (
    CLOCK,
    DATABASE,
    DRAIN,
    LIVE_CALLS,
    OFFLINE_WORKERS,
    PROVIDER_CLIENTS,
    SETTINGS,
    TWILIO,
    Clock,
)
from engine.server.body_deadline import body_deadline
from engine.server.drain import Drain
from engine.server.security_headers import add_security_headers
from engine.twilio import webhooks as twilio_webhooks
from engine.twilio.rest import TwilioCalls
from engine.workers.call_log_replay import call_log_spill_context
from engine.workers.lost_calls import lost_calls_context
from engine.workers.post_call import post_call_context
from engine.workers.recording_deletions import recording_deletions_context
from engine.workers.recording_io import recording_io_context
from engine.workers.recording_uploads import recording_uploads_context
from engine.workers.recordings import handle_recording, recordings_context
from engine.workers.recovery import recovery_context
from engine.workers.transfer_settlement import transfer_settlement_context
from engine.workers.webhook_delivery import webhook_delivery_context
from pipelines.clients import ProviderClients
from pipelines.offline_workers import OfflineWorkers
from storage.end_reasons import EndReason
from storage.migrate import migrate
from storage.pool import open_database

log = logging.getLogger(__name__)

CleanupContext = Callable[[web.Application], AsyncIterator[None]]

IDLE_CONNECTION_SECONDS = 75.0
"""How long a connection may go without a request's whole headers (a new one, or one kept alive between requests)
before it is closed: aiohttp's only bound on a client that trickles or stalls its headers (body reads have their own,
engine.server.body_deadline). aiohttp's AppRunner leaves it at 3630 s, an hour of a socket per slow client; 75 s is
`web.run_app`'s, still longer than the 60 s after which proxies (nginx, cloud load balancers) drop their idle
connections, so a proxy never sends a request down one this side is closing."""


def create_app(settings: Settings, *, apply_migrations: bool = True, clock: Clock | None = None) -> web.Application:
    """Build the engine's application; the database opens when the app starts and closes when it stops.

    `clock` tells the time of day agents' inbound hours are read at (default: the system's, in UTC).
    """
    app = web.Application(
        middlewares=[body_deadline],  # every route's: the API's and Twilio's webhooks
        handler_args={"keepalive_timeout": IDLE_CONNECTION_SECONDS},
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock or functools.partial(datetime.now, UTC)
    app[DRAIN] = Drain()  # `dialtone serve` drains it on SIGTERM (engine.server.cli)
    app.cleanup_ctx.append(_database_context(apply_migrations))
    app.cleanup_ctx.append(key_watch_context)  # the keys of the API's open streams and sockets
    app.cleanup_ctx.append(call_log_spill_context)  # before recovery: a stopped run's spilled ends come first
    app.cleanup_ctx.append(_twilio_context)  # before recovery: it asks whether lost calls' transfers were made
    app.cleanup_ctx.append(recovery_context)
    app.cleanup_ctx.append(webhook_delivery_context)
    # Contexts clean up in reverse order: the clients close after the calls and their post-call analyses.
    app.cleanup_ctx.append(_provider_clients_context)
    app.cleanup_ctx.append(ingestion_context)  # knowledge-base documents, read, indexed and embedded in the background
    app.cleanup_ctx.append(post_call_context)
    app.cleanup_ctx.append(recordings_context)
    app.cleanup_ctx.append(recording_io_context)
    app.cleanup_ctx.append(recording_uploads_context)  # before _calls_context: calls' ends record theirs
    app.cleanup_ctx.append(recording_deletions_context)  # through the uploads' store, which closes after it
    app.cleanup_ctx.append(_offline_workers_context)  # before _calls_context: calls end before the workers stop
    app.cleanup_ctx.append(_calls_context)
    app.cleanup_ctx.append(lost_calls_context)  # calls recovery closed while this node was taken for dead end here
    app.cleanup_ctx.append(transfer_settlement_context)  # after _twilio_context: it asks the app's Twilio client
    app.cleanup_ctx.append(control_channel_context(live_call_handlers))  # commands for calls held here
    app.cleanup_ctx.append(listen_relay_context)  # listen-in audio across nodes, on the command channel
    app.cleanup_ctx.append(live_events_context)  # on the control channel's connection
    app.cleanup_ctx.append(dispatcher_context)  # after _twilio_context: it dials through the app's Twilio client
    # Before connections close at shutdown, running calls end and their CallLogs are finished.
    app.on_shutdown.append(_end_live_calls)
    app.on_shutdown.append(close_live_streams)
    app.on_response_prepare.append(add_security_headers)

    app.router.add_get("/health", health.handle_health)
    app.router.add_get("/metrics", metrics.handle_metrics)
    app.router.add_post("/twilio/voice", twilio_webhooks.handle_voice)
    app.router.add_post(twilio_webhooks.STATUS_PATH, twilio_webhooks.handle_status)
    app.router.add_post(twilio_webhooks.AMD_PATH, twilio_webhooks.handle_amd)
    app.router.add_post(twilio_webhooks.DIAL_PATH, twilio_webhooks.handle_dial_ended)
    app.router.add_get(twilio_webhooks.MEDIA_PATH, media_socket.handle_media)
    app.router.add_get("/recordings/{call_log_id}.wav", handle_recording)
    add_api_routes(app)
    add_monitor_routes(app)
    return app


async def _twilio_context(app: web.Application) -> AsyncIterator[None]:
    """Twilio's REST client under TWILIO when the settings hold credentials; closed after everything that uses it."""
    settings = app[SETTINGS]
    twilio = TwilioCalls.from_settings(settings)
    if twilio is not None:
        app[TWILIO] = twilio
    if settings.twilio_auth_token is None:
        log.warning("TWILIO_AUTH_TOKEN is unset: Twilio webhook signatures are NOT checked")
    if twilio is None:
        log.info("no Twilio credentials: calls the agent ends are ended by closing their media stream")
    try:
        yield
    finally:
        if twilio is not None:
            await twilio.close()


async def _calls_context(app: web.Application) -> AsyncIterator[None]:
    app[LIVE_CALLS] = LiveCalls()
    try:
        yield
    finally:
        await app[LIVE_CALLS].end_all(EndReason.ENGINE_SHUTDOWN)


async def _provider_clients_context(app: web.Application) -> AsyncIterator[None]:
    """The SDK clients the calls, their functions and post-call analysis share (see `pipelines.clients`)."""
    clients = app[PROVIDER_CLIENTS] = ProviderClients()
    try:
        yield
    finally:
        await clients.aclose()


async def _offline_workers_context(app: web.Application) -> AsyncIterator[None]:
    """Worker processes for offline recognition and synthesis, shared by every call (`pipelines.offline_workers`)."""
    async with OfflineWorkers(app[SETTINGS].offline_workers) as workers:
        app[OFFLINE_WORKERS] = workers
        yield


async def _end_live_calls(app: web.Application) -> None:
    await app[LIVE_CALLS].end_all(EndReason.ENGINE_SHUTDOWN)


def _database_context(apply_migrations: bool) -> CleanupContext:
    async def database_context(app: web.Application) -> AsyncIterator[None]:
        db = await open_database(app[SETTINGS])
        try:
            if apply_migrations:
                async with db.pool.acquire() as conn:
                    applied = await migrate(conn)
                if applied:
                    log.info("schema migrated to version %d", applied[-1].version)
            app[DATABASE] = db
            log.info("database ready at %s", db.location)
            yield
        finally:
            await db.close()

    return database_context
