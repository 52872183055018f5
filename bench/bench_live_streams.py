"""Open live event streams: the queries per second an engine process makes for them while nothing happens.

Serves the real engine (in this process) on an embedded PostgreSQL reached through a loopback proxy that counts the
statements executed (tests/postgres_statements.py, standing for pg_stat_statements), opens N organization streams
(`GET /v1/live-calls/events`, the keys of a few organizations taken in turn) and counts, over a window with every
stream open and idle, the statements per second: all of them, the streams' lease renewals, and their key checks.
N=0 is the engine's floor (heartbeats, workers polling). Prints figures; asserts nothing.

Usage: python -m bench.bench_live_streams [N …] [--seconds S] [--organizations K]   (default: 0 100 1000, 30 s, 3)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from pathlib import Path

import aiohttp

from config.settings import load_settings
from engine.server.app import create_app
from storage.embedded import start_embedded
from storage.migrate import migrate
from storage.pool import create_pool, ensure_database
from tests.fakes.server import serve
from tests.postgres_statements import StatementCountingProxy
from tests.sse_client import EventStream
from tests.test_api_auth import Tenant, make_tenant

RENEWAL = ('UPDATE "LiveCallWatch"',)
KEY_CHECK = ('FROM "ApiKey" k', 'JOIN "User" u')
OPENING = 100
"""Streams opened at once."""


async def _round(proxy: StatementCountingProxy, url: str, tenants: list[Tenant], streams: int, seconds: float) -> None:
    app = create_app(load_settings(database_url=proxy.url("bench"), state_dir=tempfile.mkdtemp(prefix="bench-")))
    async with (
        serve(app) as engine,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        contextlib.AsyncExitStack() as opened,
    ):
        for first in range(0, streams, OPENING):
            batch = [
                EventStream(session, f"{engine}/v1/live-calls/events", tenants[n % len(tenants)].owner_key)
                for n in range(first, min(streams, first + OPENING))
            ]
            await asyncio.gather(*(opened.enter_async_context(stream) for stream in batch))
        await asyncio.sleep(2)  # the openings' own queries are done
        before = proxy.total(), proxy.count(*RENEWAL), proxy.count(*KEY_CHECK)
        await asyncio.sleep(seconds)
        after = proxy.total(), proxy.count(*RENEWAL), proxy.count(*KEY_CHECK)
    total, renewals, key_checks = ((b - a) / seconds for a, b in zip(before, after, strict=True))
    print(f"{streams:>7} | {total:>12.1f} | {renewals:>13.1f} | {key_checks:>13.1f}", flush=True)


async def main(counts: list[int], seconds: float, organizations: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-live-streams-") as tmp:
        server = start_embedded(Path(tmp) / "db")
        await ensure_database(server.url(), "bench")
        url = server.url("bench")
        pool = await create_pool(url)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            tenants = [await make_tenant(pool, f"Bench{n}") for n in range(organizations)]
            async with StatementCountingProxy(url) as proxy:
                print(f"{seconds:.0f} s idle with N streams open, statements per second:")
                print("streams | all the engine's | lease renewals | key checks")
                for streams in counts:
                    await _round(proxy, url, tenants, streams, seconds)
        finally:
            await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("streams", nargs="*", type=int, default=[0, 100, 1000])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--organizations", type=int, default=3)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.streams, arguments.seconds, arguments.organizations))
