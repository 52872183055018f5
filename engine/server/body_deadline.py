"""A deadline on reading every request's body: a client that trickles or stalls it is answered 408 and cut off."""

from __future__ import annotations

import asyncio

from aiohttp import StreamReader, web
from aiohttp.typedefs import Handler

BODY_SECONDS = 60.0
"""How long a request's whole body may take to arrive, from the handler's start. Twilio's webhooks and the API's
JSON bodies are a few KiB, sent at once; the largest body, a knowledge-base upload at `DIALTONE_KB_MAX_FILE_BYTES`'
default 10 MiB, needs about 1.4 Mbit/s to make it. Without a deadline a client that sends its headers and then
trickles (or stalls) its body holds a handler, its connection and whatever the handler holds while reading (an
`Idempotency-Key`'s claim) for ever."""


class BodyTooSlow(Exception):
    """A handler's read of the request body failed: the body did not arrive whole within `BODY_SECONDS`."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive whole within {seconds:g} s; send it at once")


@web.middleware
async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Fail the body's reads once `BODY_SECONDS` pass before it has all arrived, then close the connection.

    Only reads fail (the next one raises `BodyTooSlow`): a handler is never cancelled part-way through its work. The
    API's error middleware answers `BodyTooSlow` with its 408; elsewhere (Twilio's webhooks) it is answered here.
    """
    body = request.content
    if body.is_eof():  # no body, or all of it came with the headers
        return await handler(request)
    seconds = BODY_SECONDS
    timer = asyncio.get_running_loop().call_later(seconds, _expire, body, seconds)
    body.on_eof(timer.cancel)
    try:
        response = await handler(request)
    except BodyTooSlow as exc:
        response = web.Response(status=408, text=str(exc))
    finally:
        timer.cancel()
    if not isinstance(body.exception(), BodyTooSlow):
        return response
    # The rest of the body never comes, and aiohttp's lingering read of it would raise the same error: answer now and
    # close the connection, which cannot carry another request (the next one would start mid-body).
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


def _expire(body: StreamReader, seconds: float) -> None:
    if not body.is_eof():
        body.set_exception(BodyTooSlow(seconds))
