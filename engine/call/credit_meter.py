"""A running call's credit meter: it extends the call's credit reservation a minute at a time, and has the call
say goodbye (INSUFFICIENT_CREDITS) when the organization cannot pay for the next one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from storage.end_reasons import EndReason

__all__ = ["CREDIT_LEAD_SECONDS", "CREDIT_MINUTE_SECONDS", "CreditMeter", "ExtendReservation"]

log = logging.getLogger(__name__)

CREDIT_MINUTE_SECONDS = 60.0
"""A call's credit reservation pays for this long at a time."""
CREDIT_LEAD_SECONDS = 10.0
"""A call extends its reservation this long before the paid time runs out, so a refused extension leaves time for
the goodbye within what was paid for."""

ExtendReservation = Callable[[], Awaitable[bool]]
"""Reserve the call's next minute of credits; False when the organization cannot pay for it."""


class CreditMeter:
    """Keeps one call paid for: reserves each next minute shortly before the paid one runs out."""

    def __init__(
        self,
        call_sid: str,
        extend: ExtendReservation,
        *,
        say_goodbye: Callable[[EndReason], None],
        minute_seconds: float = CREDIT_MINUTE_SECONDS,
    ) -> None:
        """Meter the call `call_sid` with `extend` every `minute_seconds`; out of credits, `say_goodbye`."""
        self._call_sid = call_sid
        self._extend = extend
        self._say_goodbye = say_goodbye
        self._minute = minute_seconds

    async def run(self) -> None:
        """Reserve each next minute until the call ends (cancel the task) or the credits are used up."""
        # The first minute was reserved when the call was opened.
        await asyncio.sleep(self._minute - min(CREDIT_LEAD_SECONDS, self._minute / 2))
        while True:
            try:
                extended = await self._extend()
            except Exception as exc:  # our database's trouble does not cut the caller off; the end settles it
                log.warning("call %s: its credit reservation could not be extended: %s", self._call_sid, exc)
                extended = True
            if not extended:
                log.info("call %s: the organization's credits are used up", self._call_sid)
                self._say_goodbye(EndReason.INSUFFICIENT_CREDITS)
                return
            await asyncio.sleep(self._minute)
