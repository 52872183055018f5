"""Reading a bounded part of an HTTP reply from the outside (a Tool's webhook, a crawled web page)."""

from __future__ import annotations

import aiohttp

from config.text import storable_text

__all__ = ["decoded", "read_at_most"]


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The first `limit` bytes of `response`'s body, or all of it when shorter; the rest is never read.

    aiohttp's `content.read(n)` gives only what has arrived so far (one network chunk, often 64 KiB), not n bytes:
    a caller reading once would silently cut every larger body short.
    """
    body = bytearray()
    while len(body) < limit and (chunk := await response.content.read(limit - len(body))):
        body += chunk
    return bytes(body)


def decoded(body: bytes, charset: str | None) -> str:
    """`body` as text in the `charset` its reply declared (UTF-8 when it declares none, or one Python does not know);
    bytes that do not decode become U+FFFD, so a reply of garbage is read rather than refused.

    The text is `storable_text`: a charset such as UTF-7 decodes to lone surrogates, which would fail the model's
    next request (a tool's reply) or the passage's row (a crawled page)."""
    try:
        text = body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = body.decode("utf-8", errors="replace")
    return storable_text(text)
