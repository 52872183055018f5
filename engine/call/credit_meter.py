"""A running call's credit meter: it extends the call's credit reservation a minute at a time, and has the call
say goodbye (INSUFFICIENT_CREDITS) when the organization cannot pay for the next one, then hangs it up when the paid
time runs out, whether the goodbye is over or not (it may be long, or the call may be ending for a reason of its own).

When the database cannot be asked, the call goes on unpaid for at most `UNPAID_MINUTES` minutes in a row (the
call's end charges them, as far as the balance holds), then says goodbye (INTERNAL_ERROR): an outage does not cut
every caller off at once, and does not let calls run unpaid until their maximum duration either. A database that
does not answer at all (a network partition: no error, ever) counts the same: an extension has until the paid minute
runs out to be answered. A call whose CallLog is gone (deleted while it ran, its reservation with it) is hung up at
once, without a goodbye: nothing pays for it any more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from storage.end_reasons import EndReason
from storage.errors import NotFound

__all__ = [
    "CREDIT_LEAD_SECONDS",
    "CREDIT_MINUTE_SECONDS",
    "HANG_UP_MARGIN_SECONDS",
    "UNPAID_MINUTES",
    "CreditMeter",
    "ExtendReservation",
]

log = logging.getLogger(__name__)

CREDIT_MINUTE_SECONDS = 60.0
"""A call's credit reservation pays for this long at a time."""
CREDIT_LEAD_SECONDS = 10.0
"""A call extends its reservation this long before the paid time runs out, so a refused extension leaves time for
the goodbye within what was paid for."""
HANG_UP_MARGIN_SECONDS = 2.0
"""A call out of credits is hung up this long before its paid time is over: Twilio's hang-up and its stop reaching
the stream take a moment, and a call that ends a moment into a minute is charged that minute, which its organization
could not pay for."""
UNPAID_MINUTES = 2
"""Minutes in a row a call may go on whose reservation could not be extended (the database unreachable)."""

ExtendReservation = Callable[[], Awaitable[bool]]
"""Reserve the call's next minute of credits; False when the organization cannot pay for it, NotFound when the call's
CallLog is gone."""


class CreditMeter:
    """Keeps one call paid for: reserves each next minute shortly before the paid one runs out."""

    def __init__(
        self,
        call_sid: str,
        extend: ExtendReservation,
        *,
        say_goodbye: Callable[[EndReason], None],
        hang_up: Callable[[EndReason], Awaitable[None]],
        minute_seconds: float = CREDIT_MINUTE_SECONDS,
        unpaid_minutes: int = UNPAID_MINUTES,
    ) -> None:
        """Meter the call `call_sid` with `extend` every `minute_seconds`; out of credits, or after `unpaid_minutes`
        failed extensions in a row, `say_goodbye`, and `hang_up` once the time paid for is over."""
        self._call_sid = call_sid
        self._extend = extend
        self._say_goodbye = say_goodbye
        self._hang_up = hang_up
        self._minute = minute_seconds
        self._unpaid_minutes = unpaid_minutes

    async def run(self, *, elapsed: float = 0.0) -> None:
        """Reserve each next minute until the call ends (cancel the task) or the credits are used up, then end it;
        `elapsed` seconds of the call went by before the meter started (its conversation driver connecting)."""
        loop = asyncio.get_running_loop()
        lead = min(CREDIT_LEAD_SECONDS, self._minute / 2)
        reason, paid_until = await self._paid_minutes(loop.time() - elapsed, lead)
        if reason is EndReason.CALL_DELETED:
            await self._hang_up(reason)
            return
        self._say_goodbye(reason)
        # Out of credits, the call is cut off so that it ends within its paid time; ended because its minutes could
        # not be reserved (unpaid already), its goodbye has the lead.
        if reason is EndReason.INSUFFICIENT_CREDITS:
            end_at = paid_until - min(HANG_UP_MARGIN_SECONDS, lead / 4)
        else:
            end_at = loop.time() + lead
        await asyncio.sleep(max(end_at - loop.time(), 0.0))
        await self._hang_up(reason)

    async def _paid_minutes(self, started: float, lead: float) -> tuple[EndReason, float]:
        """Reserve each next minute `lead` seconds before the paid one runs out, until one cannot be: why not, and
        when (on the loop's clock) the time paid for runs out.

        Each minute is due at a fixed time from the call's `started`, so extensions slow to be answered never push
        the next ones late: a meter that slipped by each answer's wait would leave a long call running unpaid.
        """
        loop = asyncio.get_running_loop()
        paid_until = started + self._minute  # the first minute was reserved when the call was opened
        unpaid = 0
        attempt: asyncio.Future[bool] | None = None
        try:
            while True:
                await asyncio.sleep(max(paid_until - lead - loop.time(), 0.0))
                if attempt is None or attempt.done():  # one still waiting for the database is waited on again
                    attempt = asyncio.ensure_future(self._extend())
                try:
                    extended = await asyncio.wait_for(asyncio.shield(attempt), max(paid_until - loop.time(), 0.0))
                except NotFound:
                    log.warning("call %s: its CallLog was deleted, its credit reservation with it", self._call_sid)
                    return EndReason.CALL_DELETED, paid_until
                except Exception as exc:  # our database's trouble: the call goes on a while, the end settles it
                    why = str(exc) or "no answer before the paid minute ran out"
                    unpaid += 1
                    if unpaid > self._unpaid_minutes:
                        log.error(
                            "call %s: its credits could not be reserved for %d minutes in a row (%s): ending it",
                            self._call_sid,
                            unpaid,
                            why,
                        )
                        return EndReason.INTERNAL_ERROR, paid_until
                    log.warning("call %s: its credit reservation could not be extended: %s", self._call_sid, why)
                    extended = True
                else:
                    unpaid = 0
                if not extended:
                    log.info("call %s: the organization's credits are used up", self._call_sid)
                    return EndReason.INSUFFICIENT_CREDITS, paid_until
                paid_until += self._minute
        finally:
            if attempt is not None:
                attempt.cancel()  # the call is over: an extension still waiting is of no use
