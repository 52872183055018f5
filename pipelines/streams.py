"""Closing a provider's stream as soon as its reader stops, not when the garbage collector finds it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

__all__ = ["closing_stream"]

_T = TypeVar("_T")


@contextlib.asynccontextmanager
async def closing_stream(stream: AsyncIterator[_T]) -> AsyncIterator[AsyncIterator[_T]]:
    """Yield `stream`; on leaving (finished, failed or cancelled), close it if it can be closed.

    The seams type streams as `AsyncIterator` (which has no `aclose`); the providers' are async generators, and
    closing one ends its request (an HTTP stream, a synthesizer's context) at once: a reply cancelled by a barge-in
    or a discarded speculation leaves nothing running.
    """
    try:
        yield stream
    finally:
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()
