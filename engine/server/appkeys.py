"""Typed keys for what the application holds: its settings and the resources its contexts open."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from aiohttp import web

from config.settings import Settings
from engine.call.live_calls import LiveCalls
from engine.server.drain import Drain
from engine.twilio.rest import TwilioCalls
from pipelines.clients import ProviderClients
from pipelines.offline_workers import OfflineWorkers
from storage.pool import Database

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
LIVE_CALLS = web.AppKey("live_calls", LiveCalls)
DRAIN = web.AppKey("drain", Drain)
"""Whether the engine is draining before it stops (`engine.server.drain`): new calls are refused while it is."""
PROVIDER_CLIENTS = web.AppKey("provider_clients", ProviderClients)
OFFLINE_WORKERS = web.AppKey("offline_workers", OfflineWorkers)
TWILIO = web.AppKey("twilio", TwilioCalls)  # set only when Twilio credentials are configured
RECORDING_KEY = web.AppKey("recording_key", bytes)
"""The key that signs and checks recording URLs (set by engine.workers.recordings.recordings_context)."""


class Clock(Protocol):
    """Tells the current time as an aware datetime."""

    def __call__(self) -> datetime:
        """Now."""
        ...


CLOCK = web.AppKey("clock", Clock)  # what the engine reads the time of day from (inbound hours): UTC now by default
