"""A small loopback load balancer that also passes WebSockets, standing for nginx in front of engine processes.

Requests and WebSocket upgrades go round-robin to the backends, skipping one that refuses the connection, with their
headers (an upgrade's Twilio signature too); a WebSocket is relayed message by message both ways until either side
closes.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import WSMsgType, web

from tests.fakes.server import serve

Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
_HOP_BY_HOP = {"host", "content-length", "connection", "upgrade", "transfer-encoding", "keep-alive"}
_HANDSHAKE = {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
"""An upgrade's own headers, made afresh for the upstream one; its others (Twilio's signature) pass as nginx's do."""


@asynccontextmanager
async def websocket_load_balancer(backends: list[str]) -> AsyncIterator[str]:
    """Serve the balancer on 127.0.0.1; yield its base URL."""
    turn = itertools.count()
    async with aiohttp.ClientSession() as http:

        def order() -> list[str]:
            start = next(turn)
            return [backends[(start + offset) % len(backends)] for offset in range(len(backends))]

        async def forward(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await relay(request)
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
            for backend in order():
                try:
                    async with http.request(
                        request.method, backend + request.path_qs, data=body, headers=headers, allow_redirects=False
                    ) as response:
                        passed = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
                        return web.Response(status=response.status, body=await response.read(), headers=passed)
                except aiohttp.ClientConnectionError:
                    continue
            return web.Response(status=502, text="no engine answered")

        async def relay(request: web.Request) -> web.StreamResponse:
            for backend in order():
                try:
                    upstream = await http.ws_connect(
                        backend.replace("http", "ws", 1) + request.path_qs,
                        headers={k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP | _HANDSHAKE},
                    )
                except aiohttp.ClientConnectionError:
                    continue
                downstream = web.WebSocketResponse()
                await downstream.prepare(request)
                await asyncio.gather(pump(downstream, upstream), pump(upstream, downstream))
                return downstream
            return web.Response(status=502, text="no engine answered")

        async def pump(source: Socket, sink: Socket) -> None:
            async for message in source:
                if sink.closed:
                    break
                if message.type is WSMsgType.TEXT:
                    await sink.send_str(message.data)
                elif message.type is WSMsgType.BINARY:
                    await sink.send_bytes(message.data)
            if not sink.closed:
                await sink.close()

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        async with serve(app) as base:
            yield base
