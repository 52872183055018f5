"""Outbound calls Twilio never confirmed creating: the one rule for following the call it made, or closing the CallLog.

Every outbound CallLog is written before Twilio is asked for its call, its callId a placeholder until the CallSid is
known (call_logs.pending_call_id). A request Twilio never answered, or a process that died in between, leaves it so;
once the request can no longer be on its way, only Twilio's Calls list can tell whether the call exists. Each kind of
call leases such CallLogs to one process at a time in its own way (campaign dials: storage/campaign_placements.py;
API calls: storage/api_call_placements.py) while the engine asks Twilio (engine/twilio/placement_lookup.py); then both
settle them here: `adopt` stores the CallSid of the call Twilio made, or `close_not_placed` ends the CallLog FAILED
as NOT_PLACED through the call-finish path every end takes (its slot freed, its credits returned, call.ended queued).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from storage import call_logs
from storage.call_logs import CALL_LOG_COLUMNS, PENDING_CALL_ID_PREFIX, CallLog
from storage.end_reasons import EndReason
from storage.errors import NotFound
from storage.records import Queryable


@dataclass(frozen=True, slots=True)
class UnresolvedPlacement:
    """An outbound CallLog with no CallSid, whose call Twilio may or may not have created."""

    call_log_id: str
    organization_id: str
    to: str
    """The number dialed (E.164, as sent to Twilio)."""
    from_: str
    """The caller id it was dialed from, as sent to Twilio."""
    created_at: datetime
    """When the CallLog was written: the request, if it left, left after this."""

    def __str__(self) -> str:
        return f"CallLog {self.call_log_id}"


async def known_call_sids(db: Queryable, call_sids: list[str]) -> set[str]:
    """Which of these CallSids a CallLog already holds (those calls belong to other CallLogs)."""
    if not call_sids:
        return set()
    rows = await db.fetch('SELECT "callId" FROM "CallLog" WHERE "callId" = ANY($1::text[])', call_sids)
    return {row["callId"] for row in rows}


async def locked_call_log(db: Queryable, placement: UnresolvedPlacement) -> CallLog:
    """The placement's CallLog, locked until the transaction ends: a status callback storing a CallSid meanwhile
    waits, and then finds it closed or adopted. NotFound if it was deleted."""
    row = await db.fetchrow(
        f'SELECT {CALL_LOG_COLUMNS} FROM "CallLog" c WHERE c."id" = $1 AND c."organizationId" = $2 FOR NO KEY UPDATE',
        placement.call_log_id,
        placement.organization_id,
    )
    if row is None:
        raise NotFound("CallLog", placement.call_log_id)
    return CallLog.from_row(row)


async def adopt(db: Queryable, placement: UnresolvedPlacement, call_sid: str) -> bool:
    """Twilio made the call: store its CallSid on the CallLog, which then follows it like any placed call (its status
    callbacks and stream find it). False when a status callback stored a CallSid first: that one is followed.

    AlreadyExists if another CallLog holds that CallSid (it took the call meanwhile)."""
    return await call_logs.adopt_call_id(db, call_log_id=placement.call_log_id, call_id=call_sid) is not None


async def close_not_placed(db: Queryable, call_log: CallLog) -> bool:
    """Twilio has no call for this CallLog (locked by `locked_call_log`): end it FAILED as NOT_PLACED, as any call that
    never ran ends (call_logs.fail_unstarted: its slot freed, its credit reservation returned, call.ended queued).

    False, changing nothing, when it holds a CallSid after all (a status callback stored one: the call exists). A
    CallLog something else ended first (recovery) is left as it ended, and True: Twilio has no call for it."""
    if not call_log.call_id.startswith(PENDING_CALL_ID_PREFIX):
        return False
    await call_logs.fail_unstarted(db, call_log, EndReason.NOT_PLACED)
    return True
