"""Whole calls across three `dialtone serve` processes on one PostgreSQL behind a WebSocket-passing balancer.

Starts an embedded PostgreSQL with the demo seeded, three engine processes sharing it and the secret key, and the
loopback balancer of the tests (standing for nginx). Places N concurrent simulated calls (the Twilio simulator, in
this process) through the balancer, walking the demo path on the offline pipeline, and prints calls per second,
the most calls in progress at once across the nodes, and how the calls spread over the nodes. Asserts nothing.

Usage: python -m bench.bench_nodes [concurrent calls ...]   (default: 15 45)
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.bench_calls import SCRIPT
from engine.simulator import simulate_call
from storage.demo import DEMO_PHONE_NUMBER
from storage.embedded import start_embedded
from storage.migrate import migrate
from storage.pool import create_pool, ensure_database
from tests.fakes.engine_processes import free_port, start_engine, wait_healthy
from tests.fakes.websocket_load_balancer import websocket_load_balancer

REPO = Path(__file__).resolve().parent.parent
NODES = 3


async def _round(public_url: str, pool: asyncpg.Pool, calls: int) -> None:
    await pool.execute('UPDATE "Organization" SET "credits" = 1000000')
    since = await pool.fetchval("SELECT now()")
    began = time.perf_counter()
    running = asyncio.gather(
        *(simulate_call(public_url, to=DEMO_PHONE_NUMBER, from_="+15005550006", script=SCRIPT) for _ in range(calls))
    )
    peak = 0
    while not running.done():
        live = await pool.fetchval(
            """SELECT count(*) FROM "CallLog" WHERE "timestamp" >= $1 AND "status" = 'IN_PROGRESS'""", since
        )
        peak = max(peak, live)
        await asyncio.sleep(0.1)
    results = await running
    wall = time.perf_counter() - began
    await asyncio.sleep(1.0)  # let the last CallLogs finish
    rows = await pool.fetch('SELECT "status", "metadata" FROM "CallLog" WHERE "timestamp" >= $1', since)
    completed = sum(1 for r in rows if r["status"] == "COMPLETED" and r["metadata"].get("endReason") == "path_end")
    per_node = collections.Counter(r["metadata"].get("engineNode", "none") for r in rows)
    print(f"  {calls:3d} calls placed at once through the balancer: {completed}/{len(results)} walked the whole path")
    print(f"      {wall:5.1f} s wall, {completed / wall:5.2f} completed calls per second across the nodes")
    print(f"      most calls in progress at once: {peak}; calls per node: {sorted(per_node.values(), reverse=True)}")


async def main(rounds: list[int]) -> None:
    with tempfile.TemporaryDirectory(prefix="dialtone-bench-nodes-") as tmp:
        server = start_embedded(Path(tmp) / "db")
        await ensure_database(server.url(), "bench")
        url = server.url("bench")
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "TWILIO_", "DATABASE_URL"))}
        env |= {"DATABASE_URL": url, "DIALTONE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO),
                "DIALTONE_SECRET_KEY": "b" * 64, "DIALTONE_DISPATCH": "false",
                "DIALTONE_OFFLINE_WORKERS": "1"}  # fmt: skip
        seed = await asyncio.create_subprocess_exec(sys.executable, "-m", "engine.server.cli", "seed-demo",
                                                    env=env, stdout=asyncio.subprocess.DEVNULL)  # fmt: skip
        await seed.wait()
        ports = [free_port() for _ in range(NODES)]
        backends = [f"http://127.0.0.1:{port}" for port in ports]
        async with websocket_load_balancer(backends) as public_url:
            engines = []
            for index, port in enumerate(ports):
                node_env = {**env, "DIALTONE_PUBLIC_URL": public_url, "DIALTONE_STATE_DIR": f"{tmp}/node-{index}"}
                engines.append(await start_engine(port, node_env, Path(tmp)))
            pool = await create_pool(url)
            try:
                for backend, engine in zip(backends, engines, strict=True):
                    await wait_healthy(backend, engine)
                print(f"offline calls through {NODES} `dialtone serve` processes behind a balancer, "
                      f"{os.cpu_count()} cores:")  # fmt: skip
                await _round(public_url, pool, NODES)  # warm-up: models, caches, connections on every node
                for calls in rounds:
                    await _round(public_url, pool, calls)
            finally:
                await pool.close()
                for engine in engines:
                    if engine.returncode is None:
                        engine.send_signal(signal.SIGTERM)
                for engine in engines:
                    _, stderr = await engine.communicate()
                    if engine.returncode not in (0, -signal.SIGTERM):
                        print(f"an engine exited with {engine.returncode}:\n{stderr.decode()[-2000:]}")


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]] or [15, 45]))
