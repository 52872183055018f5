"""Real `dialtone serve` processes for tests and benchmarks: free ports, a load balancer in front, readiness."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.fakes.server import serve

DIALTONE = [sys.executable, "-m", "engine.server.cli"]
REPO = Path(__file__).resolve().parents[2]


def engine_environment(database_url: str, **variables: str) -> dict[str, str]:
    """The environment of a `dialtone serve` for a test: this process's, without its DIALTONE_, DATABASE_URL and
    TWILIO_ settings, with this source tree on PYTHONPATH, `database_url`, and `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_"))}
    env.update(PYTHONPATH=str(REPO), DATABASE_URL=database_url, **variables)
    return env


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def load_balancer(backends: list[str]) -> AsyncIterator[str]:
    """Forward every request to the first backend that takes the connection, rotating the starting one."""
    turn = itertools.count()
    async with aiohttp.ClientSession() as http:

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
            start = next(turn)
            for offset in range(len(backends)):
                backend = backends[(start + offset) % len(backends)]
                try:
                    async with http.request(
                        request.method, backend + request.path_qs, data=body, headers=headers
                    ) as response:
                        return web.Response(
                            status=response.status, body=await response.read(), content_type=response.content_type
                        )
                except aiohttp.ClientConnectionError:
                    continue  # that engine is gone: the next one answers
            return web.Response(status=502, text="no engine answered")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        async with serve(app) as base:
            yield base


async def wait_healthy(url: str, process: asyncio.subprocess.Process) -> None:
    """Return once the engine at `url` answers /health; RuntimeError if it exits or never answers."""
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            if process.returncode is not None:
                raise RuntimeError(f"the engine at {url} exited with {process.returncode}")
            try:
                async with http.get(url + "/health"):
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing answered at {url}")


async def start_engine(port: int, env: dict[str, str], cwd: Path) -> asyncio.subprocess.Process:
    """`dialtone serve` on `port` with `env`, its stderr piped."""
    return await asyncio.create_subprocess_exec(
        *DIALTONE, "serve", "--port", str(port), env=env, cwd=cwd, stderr=asyncio.subprocess.PIPE
    )
