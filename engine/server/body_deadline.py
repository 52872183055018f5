"""A deadline on reading every request's body: a client that trickles or stalls it is answered 408 and cut off."""

from __future__ import annotations

import asyncio

from aiohttp import StreamReader, web
from aiohttp.typedefs import Handler

BODY_SECONDS = 60.0
"""How long a request's body may take to arrive, from the handler's start, beyond the time its bytes earn at
`BODY_MIN_BYTES_PER_SECOND`. Twilio's webhooks and the API's JSON bodies are a few KiB, sent at once. Without a
deadline a client that sends its headers and then trickles (or stalls) its body holds a handler and its connection
for ever."""
BODY_MIN_BYTES_PER_SECOND = 8192
"""The least rate a body arriving for longer than `BODY_SECONDS` must keep: every byte received gives it
1/8192 s more. A large body on a slow link keeps coming (a knowledge-base upload at `DIALTONE_KB_MAX_FILE_BYTES`'
default 10 MiB takes 84 s at 1 Mbit/s); one trickled below 64 kbit/s is cut off, its time earned used up."""


class BodyTooSlow(Exception):
    """A handler's read of the request body failed: the body did not arrive whole in the time it had."""

    def __init__(self, seconds: float, min_rate: int) -> None:
        super().__init__(
            f"the request body did not arrive whole within {seconds:g} s, or then kept under {min_rate} bytes/s; "
            "send it at once"
        )


@web.middleware
async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Fail the body's reads once it has not all arrived in `BODY_SECONDS` and the time its bytes received so far
    earn at `BODY_MIN_BYTES_PER_SECOND`, then close the connection.

    Only reads fail (the next one raises `BodyTooSlow`): a handler is never cancelled part-way through its work. The
    API's error middleware answers `BodyTooSlow` with its 408; elsewhere (Twilio's webhooks) it is answered here.
    """
    body = request.content
    if body.is_eof():  # no body, or all of it came with the headers
        return await handler(request)
    deadline = _BodyDeadline(body, BODY_SECONDS, BODY_MIN_BYTES_PER_SECOND)
    body.on_eof(deadline.cancel)
    try:
        response = await handler(request)
    except BodyTooSlow as exc:
        response = web.Response(status=408, text=str(exc))
    finally:
        deadline.cancel()
    if not isinstance(body.exception(), BodyTooSlow):
        return response
    # The rest of the body never comes, and aiohttp's lingering read of it would raise the same error: answer now and
    # close the connection, which cannot carry another request (the next one would start mid-body).
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


class _BodyDeadline:
    """The timer of one body: when it fires, a body that earned more time since (bytes received) is given it; one
    that did not gets `BodyTooSlow` on its next read. One timer per body, never a callback per chunk received."""

    def __init__(self, body: StreamReader, seconds: float, min_rate: int) -> None:
        self._body, self._seconds, self._min_rate = body, seconds, min_rate
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()
        self._timer = self._loop.call_at(self._start + seconds, self._expire)

    def _expire(self) -> None:
        if self._body.is_eof():
            return
        until = self._start + self._seconds + self._body.total_bytes / self._min_rate
        if self._loop.time() < until:
            self._timer = self._loop.call_at(until, self._expire)
        else:
            self._body.set_exception(BodyTooSlow(self._seconds, self._min_rate))

    def cancel(self) -> None:
        self._timer.cancel()
