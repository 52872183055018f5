"""Asking Twilio whether an outbound call it never confirmed exists: adopt the call it created, or close the CallLog.

Every outbound CallLog is written before the create-call request; a request Twilio never answered, or a process that
died in between (or after Twilio created the call but before the CallSid was stored), leaves a CallLog with no
CallSid. Once that request can no longer be on its way (`REQUEST_SETTLED`), one process takes the CallLog (a campaign
dial when its lease expires, storage/campaign_placements.py; an API call, storage/api_call_placements.py) and lists
Twilio's calls to the number from the caller id, created since the CallLog was written. A call no CallLog holds yet is
this one's (one dial at a time reaches a recipient; an API call nobody else placed took it): its CallSid is adopted and
the call is followed, its status callbacks and stream work as usual. No such call: the CallLog is closed FAILED as
`not_placed`, its call slot and credits released (a campaign's attempt does not count and its recipient is queued
again). Twilio unreachable: nothing is decided, and the lookup is tried again once its lease expires.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from engine.twilio.rest import REQUEST_TIMEOUT_SECONDS, CallLookupFailed, TwilioCall
from storage import Pool, api_call_placements, campaign_placements, placements
from storage.errors import AlreadyExists, NotFound
from storage.placements import UnresolvedPlacement

log = logging.getLogger(__name__)

CLOCK_SKEW = timedelta(minutes=1)
"""How far Twilio's `date_created` may run behind the database's clock: calls this much older still match."""
REQUEST_SETTLED = timedelta(seconds=REQUEST_TIMEOUT_SECONDS + 5)
"""How long after its CallLog a create request can no longer be on its way to Twilio (its client gave up): only
then does finding no call mean there will be none. A slow but live dialer is not judged before."""
LOOKUP_LEASE = timedelta(seconds=30)
"""How long one process holds an unresolved placement while it asks Twilio; then anyone may ask again."""

P = TypeVar("P", bound=UnresolvedPlacement)


class CallFinder(Protocol):
    """Lists the calls Twilio created between two numbers (engine.twilio.rest.TwilioCalls)."""

    async def calls_between(self, *, to: str, from_: str, limit: int = 50) -> list[TwilioCall]:
        """The most recent calls to `to` from `from_`; CallLookupFailed when Twilio cannot answer."""
        ...


class UnresolvedPlacements(Protocol[P]):
    """How one kind of call leases its unresolved placements and settles them (a module of storage)."""

    async def take_unresolved(
        self, pool: Pool, *, now: datetime, owner: str, hold_for: timedelta, written_before: datetime
    ) -> list[P]:
        """Lease to `owner` for `hold_for` the placements written before `written_before` nobody holds."""
        ...

    async def adopt_placement(self, pool: Pool, placement: P, *, owner: str, call_sid: str) -> bool:
        """Follow the call Twilio created; False if `owner` lost the lease. AlreadyExists if another holds it."""
        ...

    async def close_never_placed(self, pool: Pool, placement: P, *, owner: str) -> bool:
        """Close the CallLog as not placed; False if `owner` lost the lease or the CallLog has a CallSid."""
        ...


KINDS: tuple[UnresolvedPlacements[Any], ...] = (campaign_placements, api_call_placements)
"""Every kind of outbound call whose placement Twilio may leave unconfirmed: campaign dials and API calls."""


class PlacementLookup:
    """Settles the outbound CallLogs that never got a CallSid (campaign dials and API calls) by asking Twilio."""

    def __init__(self, pool: Pool, twilio: CallFinder, *, hold_for: timedelta = LOOKUP_LEASE) -> None:
        """Look up through `twilio`; each lookup holds its placement for `hold_for`."""
        self._pool = pool
        self._twilio = twilio
        self._hold_for = hold_for

    async def settle(self, *, now: datetime, owner: str) -> tuple[int, int]:
        """Take the unresolved placements of every kind and settle each; return (adopted, closed as not placed).
        Those Twilio cannot be asked about count in neither."""
        adopted = closed = 0
        for kind in KINDS:
            kind_adopted, kind_closed = await self._settle(kind, now=now, owner=owner)
            adopted += kind_adopted
            closed += kind_closed
        return adopted, closed

    async def _settle(self, kind: UnresolvedPlacements[P], *, now: datetime, owner: str) -> tuple[int, int]:
        taken = await kind.take_unresolved(
            self._pool, now=now, owner=owner, hold_for=self._hold_for, written_before=now - REQUEST_SETTLED
        )
        adopted = closed = 0
        for placement in taken:
            try:
                call_sid = await self.find_call(placement)
            except CallLookupFailed as exc:
                log.warning("%s: whether Twilio placed the call is unknown, asking again later: %s", placement, exc)
                continue
            try:
                if call_sid is not None:
                    if await kind.adopt_placement(self._pool, placement, owner=owner, call_sid=call_sid):
                        adopted += 1
                        log.warning("%s: Twilio placed call %s after all; the CallLog follows it", placement, call_sid)
                elif await kind.close_never_placed(self._pool, placement, owner=owner):
                    closed += 1
                    log.warning("%s: Twilio has no such call; the CallLog is closed as not placed", placement)
            except AlreadyExists:
                # Another CallLog took that call meanwhile: look again once the lookup lease expires.
                log.warning("%s: call %s was adopted by another CallLog", placement, call_sid)
            except NotFound:
                log.info("%s: the CallLog was deleted before its lookup settled it", placement)
        return adopted, closed

    async def find_call(self, placement: UnresolvedPlacement) -> str | None:
        """The CallSid of the call Twilio created for this placement, or None when it created none."""
        since = placement.created_at - CLOCK_SKEW
        calls = await self._twilio.calls_between(to=placement.to, from_=placement.from_)
        candidates = sorted((c for c in calls if c.created_at >= since), key=lambda c: (c.created_at, c.sid))
        if not candidates:
            return None
        known = await placements.known_call_sids(self._pool, [c.sid for c in candidates])
        unclaimed = [c for c in candidates if c.sid not in known]
        return unclaimed[0].sid if unclaimed else None
