"""Whole calls on the offline pipeline: engine CPU per call-minute, memory per call, response latency.

Starts `dialtone serve` as its own process on an embedded PostgreSQL, seeds the demo, then places N
concurrent simulated calls (the Twilio simulator, in this process, so its own CPU is not counted) that walk
the demo path. Prints figures; asserts nothing.

Usage: python bench/bench_calls.py [concurrent calls ...]   (default: 1 10 25)
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import psutil

from engine.simulator import Say, simulate_call
from storage.demo import DEMO_PHONE_NUMBER
from storage.embedded import start_embedded
from storage.migrate import migrate
from storage.pool import create_pool, ensure_database

REPO = Path(__file__).resolve().parent.parent
SCRIPT = [Say("I would like to book an appointment"), Say("tuesday please")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _wait_healthy(base: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(f"{base}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the engine did not become healthy")


def _p95(values: list[int]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else float(values[0])


async def _round(base: str, pool: asyncpg.Pool, engine: psutil.Process, calls: int) -> None:
    # Credits and a plan without a concurrent-call limit, so the round measures the engine, not the plan.
    await pool.execute('UPDATE "Organization" SET "credits" = 1000000, "plan" = \'enterprise\'')
    since = await pool.fetchval("SELECT now()")
    cpu_before = sum(engine.cpu_times()[:2])
    rss_idle = engine.memory_info().rss
    peak_rss = rss_idle
    began = time.perf_counter()
    running = asyncio.gather(
        *(simulate_call(base, to=DEMO_PHONE_NUMBER, from_="+15005550006", script=SCRIPT) for _ in range(calls))
    )
    while not running.done():
        peak_rss = max(peak_rss, engine.memory_info().rss)
        await asyncio.sleep(0.2)
    results = await running
    wall = time.perf_counter() - began
    await asyncio.sleep(1.0)  # let the last CallLogs finish
    cpu = sum(engine.cpu_times()[:2]) - cpu_before
    rows = await pool.fetch(
        'SELECT "id", "status", "duration", "metadata" FROM "CallLog" WHERE "timestamp" >= $1', since
    )
    latencies = [
        r["latencyMs"]
        for r in await pool.fetch(
            'SELECT t."latencyMs" FROM "CallTurn" t JOIN "CallLog" l ON l."id" = t."callLogId"'
            ' WHERE l."timestamp" >= $1 AND t."latencyMs" IS NOT NULL',
            since,
        )
    ]
    completed = sum(1 for r in rows if r["status"] == "COMPLETED" and r["metadata"].get("endReason") == "path_end")
    call_minutes = sum(r["duration"] or 0 for r in rows) / 60
    print(f"  {calls:3d} concurrent calls, {wall:5.1f} s wall, {completed}/{len(results)} walked the whole path")
    print(f"      engine CPU: {cpu:6.2f} s in all, {cpu / call_minutes:5.2f} CPU-s per call-minute")
    print(f"      engine memory: {rss_idle / 2**20:6.1f} MB idle, peak {peak_rss / 2**20:6.1f} MB,"
          f" {(peak_rss - rss_idle) / 2**20 / calls:5.2f} MB per concurrent call")  # fmt: skip
    if latencies:
        print(
            f"      response latency (caller stops speaking → first agent audio sent, includes the 700 ms "
            f"end-of-turn silence): median {statistics.median(latencies):.0f} ms, "
            f"p95 {_p95(latencies):.0f} ms, max {max(latencies)} ms, n={len(latencies)}"
        )


@asynccontextmanager
async def dialtone_serve(**env: str) -> AsyncIterator[tuple[str, str, int]]:
    """`dialtone serve` as its own process on a fresh embedded PostgreSQL with the demo seeded, healthy.

    `env` adds to its environment (e.g. TWILIO_AUTH_TOKEN). Yields the engine's base URL, the database URL and
    the engine's pid; stops both at the end.
    """
    with tempfile.TemporaryDirectory(prefix="dialtone-bench-") as tmp:
        server = start_embedded(Path(tmp) / "db")
        await ensure_database(server.url(), "bench")
        url = server.url("bench")
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        port = _free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "TWILIO_"))}
        environment |= {"DATABASE_URL": url, "DIALTONE_PORT": str(port), "DIALTONE_STATE_DIR": str(Path(tmp) / "state"),
                        "DIALTONE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO), **env}  # fmt: skip
        seed = await asyncio.create_subprocess_exec(sys.executable, "-m", "engine.server.cli", "seed-demo",
                                                    env=environment, stdout=asyncio.subprocess.DEVNULL)  # fmt: skip
        await seed.wait()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.server.cli", "serve", env=environment
        )
        base = f"http://127.0.0.1:{port}"
        try:
            await _wait_healthy(base)
            yield base, url, process.pid
        finally:
            process.send_signal(signal.SIGTERM)
            await process.wait()


async def main(rounds: list[int]) -> None:
    async with dialtone_serve() as (base, url, pid):
        pool = await create_pool(url)
        try:
            engine = psutil.Process(pid)
            print(f"offline calls through `dialtone serve` (pid {pid}), {os.cpu_count()} cores:")
            await _round(base, pool, engine, 1)  # warm-up: models, caches, connections
            for calls in rounds:
                await _round(base, pool, engine, calls)
        finally:
            await pool.close()


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]] or [1, 10, 25]))
