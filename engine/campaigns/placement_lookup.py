"""Asking Twilio whether a dial whose process died was placed: adopt the call it created, or requeue the recipient.

A dial's CallLog is written before the create-call request; a process that dies in between, or after Twilio
created the call but before the CallSid was stored, leaves a DIALING attempt whose CallLog has no CallSid. When
that lease expires, one process takes the attempt (storage/campaign_placements.py) and lists Twilio's calls to
the recipient's number from the campaign's caller id, created since the CallLog was written. A call no CallLog
holds yet is this attempt's (a recipient is leased to one dial at a time): its CallSid is adopted and the call is
followed, its status callbacks and stream work as usual. No such call: the CallLog is closed as `not_placed`, the
attempt does not count and the recipient is queued again. Twilio unreachable: nothing is decided, and the lookup
is tried again once its lease expires.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Protocol

from engine.twilio.rest import REQUEST_TIMEOUT_SECONDS, CallLookupFailed, TwilioCall
from storage import Pool, campaign_placements
from storage.campaign_placements import UnresolvedPlacement
from storage.errors import AlreadyExists

log = logging.getLogger(__name__)

CLOCK_SKEW = timedelta(minutes=1)
"""How far Twilio's `date_created` may run behind the database's clock: calls this much older still match."""
REQUEST_SETTLED = timedelta(seconds=REQUEST_TIMEOUT_SECONDS + 5)
"""How long after its CallLog a create request can no longer be on its way to Twilio (its client gave up): only
then does finding no call mean there will be none. A slow but live dialer is not judged before."""
LOOKUP_LEASE = timedelta(seconds=30)
"""How long one process holds an unresolved attempt while it asks Twilio; then anyone may ask again."""


class CallFinder(Protocol):
    """Lists the calls Twilio created between two numbers (engine.twilio.rest.TwilioCalls)."""

    async def calls_between(self, *, to: str, from_: str, limit: int = 50) -> list[TwilioCall]:
        """The most recent calls to `to` from `from_`; CallLookupFailed when Twilio cannot answer."""
        ...


class PlacementLookup:
    """Settles expired dials whose CallLog never got a CallSid, by asking Twilio."""

    def __init__(self, pool: Pool, twilio: CallFinder, *, hold_for: timedelta = LOOKUP_LEASE) -> None:
        """Look up through `twilio`; each lookup holds its attempt for `hold_for`."""
        self._pool = pool
        self._twilio = twilio
        self._hold_for = hold_for

    async def settle(self, *, now: datetime, owner: str) -> tuple[int, int]:
        """Take the unresolved expired dials and settle each; return (adopted, requeued). Unreachable: neither."""
        placements = await campaign_placements.take_unresolved(
            self._pool, now=now, owner=owner, hold_for=self._hold_for, written_before=now - REQUEST_SETTLED
        )
        adopted = requeued = 0
        for placement in placements:
            try:
                call_sid = await self.find_call(placement)
            except CallLookupFailed as exc:
                log.warning(
                    "attempt %s (CallLog %s): whether Twilio placed the call is unknown, asking again later: %s",
                    placement.attempt_id,
                    placement.call_log_id,
                    exc,
                )
                continue
            if call_sid is not None:
                try:
                    took = await campaign_placements.adopt_placement(
                        self._pool, placement, owner=owner, call_sid=call_sid
                    )
                except AlreadyExists:
                    # Another CallLog took that call meanwhile: look again once the lookup lease expires.
                    log.warning("attempt %s: call %s was adopted by another CallLog", placement.attempt_id, call_sid)
                    continue
                if took:
                    adopted += 1
                    log.warning(
                        "attempt %s: Twilio placed call %s though its dialer died; CallLog %s follows it",
                        placement.attempt_id,
                        call_sid,
                        placement.call_log_id,
                    )
            elif await campaign_placements.close_never_placed(self._pool, placement, owner=owner):
                requeued += 1
                log.warning(
                    "attempt %s: its dialer died before Twilio was asked; CallLog %s closed as not placed, "
                    "recipient %s queued again",
                    placement.attempt_id,
                    placement.call_log_id,
                    placement.recipient_id,
                )
        return adopted, requeued

    async def find_call(self, placement: UnresolvedPlacement) -> str | None:
        """The CallSid of the call Twilio created for this attempt, or None when it created none."""
        since = placement.created_at - CLOCK_SKEW
        calls = await self._twilio.calls_between(to=placement.to, from_=placement.from_)
        candidates = sorted((c for c in calls if c.created_at >= since), key=lambda c: (c.created_at, c.sid))
        if not candidates:
            return None
        known = await campaign_placements.known_call_sids(self._pool, [c.sid for c in candidates])
        unclaimed = [c for c in candidates if c.sid not in known]
        return unclaimed[0].sid if unclaimed else None
