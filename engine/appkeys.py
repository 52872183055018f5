"""Typed keys for what the application holds: its settings and the resources its contexts open."""

from __future__ import annotations

from aiohttp import web

from config.settings import Settings
from storage.pool import Database

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
