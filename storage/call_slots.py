"""Concurrent-call slots: an organization may have at most its plan's number of calls in progress at once.

The slots are the organization's IN_PROGRESS CallLogs, so a call frees its slot the moment its log ends, whoever
ends it (its media session, a status callback, or recovery closing the calls of an engine that died). A new call
takes a slot inside the transaction that creates its CallLog: the organization's row is locked first, then its
calls are counted, so of several calls racing for the last slot, on any number of engine processes, one wins.
"""

from __future__ import annotations

from collections.abc import Mapping

from storage.enums import Plan
from storage.errors import NotFound, StorageError
from storage.records import Connection

UNLIMITED = 0
"""A plan limit of 0 means no limit."""


class ConcurrentCallLimitReached(StorageError):
    """The organization already has as many calls in progress as its plan allows; nothing was written."""

    def __init__(self, organization_id: str, plan: Plan, limit: int) -> None:
        super().__init__(
            f"organization {organization_id} already has {limit} calls in progress, the most its {plan} plan "
            "allows at once; try again when one ends"
        )
        self.organization_id = organization_id
        self.plan = plan
        self.limit = limit


def check_limits(limits: Mapping[str, int]) -> None:
    """ValueError unless `limits` gives every plan a limit of 0 (none) or more."""
    missing = {plan.value for plan in Plan} - set(limits)
    if missing or any(limit < 0 for limit in limits.values()):
        raise ValueError(f"concurrent-call limits must give every plan 0 (no limit) or more, got {dict(limits)}")


async def take_call_slot(conn: Connection, *, organization_id: str, limits: Mapping[str, int]) -> None:
    """Hold the organization's row until the caller's transaction ends, and check it has a free call slot.

    Call it inside the transaction that creates the call's IN_PROGRESS CallLog, before the insert. Raises
    ConcurrentCallLimitReached when the plan's limit (`limits` by plan name; 0 = none) is reached.
    """
    check_limits(limits)
    # FOR NO KEY UPDATE: the lock the credit reservation's UPDATE takes anyway; it does not block rows that merely
    # reference the organization (their foreign-key checks take KEY SHARE).
    plan_name = await conn.fetchval(
        'SELECT "plan"::text FROM "Organization" WHERE "id" = $1 FOR NO KEY UPDATE', organization_id
    )
    if plan_name is None:
        raise NotFound("Organization", organization_id)
    plan = Plan(plan_name)
    limit = limits[plan.value]
    if limit == UNLIMITED:
        return
    # A statement of its own, after the lock: under READ COMMITTED it sees every call the lock's previous holders
    # committed.
    in_progress: int = await conn.fetchval(
        """
        SELECT count(*) FROM "CallLog"
        WHERE "organizationId" = $1 AND "status" = 'IN_PROGRESS'
        """,
        organization_id,
    )
    if in_progress >= limit:
        raise ConcurrentCallLimitReached(organization_id, plan, limit)
