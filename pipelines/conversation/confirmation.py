"""What a reply does that others can notice waits until the caller's turn is confirmed.

A speculative reply runs ahead of the end of the caller's turn and may be thrown away (the caller spoke on, the
final words differ). Its audio is held by the call; its side effects must be held too: a tool's webhook (a booking,
a charge), an opt-out written to the do-not-call list, what a supervisor watching the call is told. The reply's own
task names the gate that opens when its turn is confirmed with `hold_side_effects_until`; code about to act calls
`await turn_confirmed()`, which returns at once outside a speculative reply, and code that cannot wait asks
`turn_pending()` and leaves the telling to whoever opens the gate. A discarded reply is cancelled while it waits,
so what it would have done never happens.

The gate lives in a context variable: it belongs to the task that set it (and to what that task awaits: the model's
stream and the tools it calls), never to another call's or another turn's task.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Final

__all__ = ["hold_side_effects_until", "turn_confirmed", "turn_pending"]

_CONFIRMATION: Final[ContextVar[asyncio.Event | None]] = ContextVar("dialtone_turn_confirmation", default=None)


def hold_side_effects_until(confirmed: asyncio.Event) -> None:
    """In the reply's own task: side effects from here on wait until `confirmed` is set (the turn is confirmed)."""
    _CONFIRMATION.set(confirmed)


async def turn_confirmed() -> None:
    """Return once the caller's turn this reply answers is confirmed; at once when the reply is not speculative."""
    confirmed = _CONFIRMATION.get()
    if confirmed is not None:
        await confirmed.wait()


def turn_pending() -> bool:
    """Whether this runs in a speculative reply whose caller's turn is not confirmed yet."""
    confirmed = _CONFIRMATION.get()
    return confirmed is not None and not confirmed.is_set()
