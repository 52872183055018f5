"""Reading a bounded part of an HTTP reply from the outside (a Tool's webhook, a crawled web page)."""

from __future__ import annotations

import aiohttp

__all__ = ["read_at_most"]


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The first `limit` bytes of `response`'s body, or all of it when shorter; the rest is never read.

    aiohttp's `content.read(n)` gives only what has arrived so far (one network chunk, often 64 KiB), not n bytes:
    a caller reading once would silently cut every larger body short.
    """
    body = bytearray()
    while len(body) < limit and (chunk := await response.content.read(limit - len(body))):
        body += chunk
    return bytes(body)
