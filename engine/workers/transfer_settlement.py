"""Settling the transfer legs whose `<Dial>` action request never came (the engine was down, the request failed).

Every minute (DIALTONE_RECOVERY_INTERVAL), the legs whose time limit ran out a while ago are settled from Twilio's
own record of the call their dial made: its length is charged; a leg Twilio made no call for (the transfer request
never reached it, or the engine died before asking) returns all its credits. A leg Twilio cannot be asked about is
tried again next time. Any engine with Twilio credentials sweeps; settling twice charges once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from aiohttp import web

from engine.server.appkeys import DATABASE, SETTINGS, TWILIO
from engine.twilio.rest import CallLookupFailed, TwilioCalls
from storage import Pool, transfer_legs
from storage.errors import DATABASE_ERRORS

log = logging.getLogger(__name__)

SETTLEMENT_GRACE = timedelta(minutes=5)
"""How long after a leg's time limit its action request may still come before the sweep settles it."""

_ENDED = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})
"""Twilio's statuses of a call that has ended."""


async def settle_overdue_legs(
    pool: Pool, twilio: TwilioCalls, *, now: datetime, grace: timedelta = SETTLEMENT_GRACE
) -> int:
    """Settle the legs overdue at `now` from Twilio's record of their dialed calls; how many were settled."""
    settled = 0
    for leg in await transfer_legs.overdue_legs(pool, now=now, grace=grace):
        try:
            dialed = await twilio.dialed_calls(leg.call_sid)
        except CallLookupFailed as exc:
            log.warning("transfer of call %s: not settled yet: %s", leg.call_sid, exc)
            continue
        if any(call.status not in _ENDED for call in dialed):
            continue  # still talking past its time limit: Twilio ends it, and the next sweep settles it
        longest = max(dialed, key=lambda call: call.duration_seconds, default=None)
        done = await transfer_legs.settle_leg(
            pool,
            call_log_id=leg.call_log_id,
            dial_status=longest.status if longest is not None else transfer_legs.NOT_DIALED,
            duration_seconds=longest.duration_seconds if longest is not None else 0,
        )
        if done is not None:
            settled += 1
            log.info(
                "transfer of call %s settled by the sweep: %s, %d s, %d credits charged",
                leg.call_sid,
                done.dial_status,
                done.duration_seconds,
                done.credits_charged,
            )
    return settled


async def transfer_settlement_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: sweep overdue transfer legs while the app runs, when it has Twilio credentials."""
    twilio = app.get(TWILIO)
    if twilio is None:
        yield
        return
    interval = app[SETTINGS].recovery_interval
    task = asyncio.create_task(_sweep(app[DATABASE].pool, twilio, interval), name="transfer-settlement")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _sweep(pool: Pool, twilio: TwilioCalls, interval: float) -> None:
    while True:
        try:
            await settle_overdue_legs(pool, twilio, now=datetime.now(UTC))
        except DATABASE_ERRORS as exc:
            log.warning("transfer settlement sweep: the database could not be reached: %s", exc)
        except Exception:  # a bug here must not stop the next sweep, nor the engine
            log.exception("transfer settlement sweep failed")
        await asyncio.sleep(interval)
