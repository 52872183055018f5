"""Shared fixtures: a real PostgreSQL (embedded, or TEST_DATABASE_URL) and a fresh database per test module."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from pipelines.clients import ProviderClients
from storage.embedded import start_embedded
from tests.browser import missing_browser
from tests.databases import TestDatabases
from tests.engine_server import running_engine
from tests.fakes.twilio import FakeTwilio
from tests.test_api_auth import Api


@pytest.fixture(scope="session")
async def postgres_server_url() -> str:
    """A server the tests may create databases on: TEST_DATABASE_URL, or an embedded one in a temp folder."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    # A folder of our own, not pytest's basetemp: pytest deletes old basetemp folders, and another pytest run
    # on the machine would delete this one from under the running server. Removed at exit, after the server
    # stops (atexit runs last-registered first, and pgserver registers its stop after this).
    folder = Path(tempfile.mkdtemp(prefix="dialtone-test-pg-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    server = start_embedded(folder, stop_at_exit=True)
    conn = await asyncpg.connect(server.url())
    try:
        # Throwaway data: trade durability for speed, on this test server only.
        for setting in ("fsync = off", "synchronous_commit = off", "full_page_writes = off"):
            await conn.execute(f"ALTER SYSTEM SET {setting}")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    return server.url()


@pytest.fixture(scope="session")
async def databases(postgres_server_url: str) -> AsyncIterator[TestDatabases]:
    """Factory of fresh databases, all dropped at the end of the session."""
    factory = TestDatabases(postgres_server_url)
    yield factory
    await factory.drop_all()


@pytest.fixture(scope="module")
async def db_url(databases: TestDatabases) -> str:
    """A migrated database of this test module's own."""
    return await databases.migrated()


@pytest.fixture(scope="module")
async def pool(databases: TestDatabases, db_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this module's migrated database."""
    pool = await databases.pool(db_url)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def provider_clients() -> AsyncIterator[ProviderClients]:
    """SDK clients for providers built outside an engine (an engine makes and closes its own)."""
    clients = ProviderClients()
    yield clients
    await clients.aclose()


_browser_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Note each browser test that was skipped (on xdist, the controller sees every worker's reports)."""
    if report.skipped and "browser" in report.keywords and report.when in ("setup", "call"):
        _browser_skips.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say plainly when the browser tests did not run, so a run without Chromium is never read as a full pass."""
    if _browser_skips:
        terminalreporter.section("browser tests did not run", sep="=", red=True, bold=True)
        why = missing_browser() or "see the skip reasons below"
        terminalreporter.write_line(f"{len(_browser_skips)} browser test(s) were SKIPPED, not passed: {why}")


@pytest.fixture(scope="module")
async def twilio() -> AsyncIterator[FakeTwilio]:
    """A fake Twilio REST API on loopback for the module (a module may define its own, e.g. with an auth token)."""
    async with FakeTwilio() as fake:
        yield fake


@pytest.fixture(scope="module")
async def api(db_url: str) -> AsyncIterator[Api]:
    """The engine's /v1 API, served on this module's database (a module that needs another engine defines its own)."""
    async with running_engine(db_url) as base, aiohttp.ClientSession() as session:
        yield Api(session, base)
