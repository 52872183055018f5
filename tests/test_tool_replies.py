"""What the model is given when an agent's Tool webhook answers with a body it cannot use as it is: bytes that are not
text, or a body that never ends. Real loopback HTTP through a real aiohttp session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from pipelines.tools import MAX_RESULT_CHARS, AgentFunction, FunctionSpec, ToolRunner
from tests.fakes.server import serve


@asynccontextmanager
async def tool_answering(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[ToolRunner]:
    """A ToolRunner whose one function, `lookup`, POSTs to `handler` on loopback (waiting 5 s at most)."""
    app = web.Application()
    app.router.add_post("/hook", handler)
    async with serve(app) as base, aiohttp.ClientSession() as session:
        function = AgentFunction(
            tool_id="t1",
            spec=FunctionSpec("lookup", "Look a customer up.", {"type": "object"}),
            url=f"{base}/hook",
            method="POST",
            headers={},
            timeout_seconds=5,
        )
        yield ToolRunner([function], call={}, session=session, allow_private=True)


async def test_a_reply_that_is_not_valid_utf8_reaches_the_model_with_the_bad_bytes_replaced() -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=b'{"name": "\xff\xfeAda"}', content_type="application/json")

    async with tool_answering(garbage) as tools:
        result = await tools.run("lookup", {})
    assert result == '{"name": "\ufffd\ufffdAda"}'


async def test_a_body_that_never_ends_gives_the_model_its_start_without_waiting_for_the_rest() -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        while True:
            await response.write(b"x" * 1024)
            await asyncio.sleep(0.001)

    async with tool_answering(endless) as tools:
        result = await tools.run("lookup", {})
    assert result == "x" * MAX_RESULT_CHARS
