"""Where each campaign recipient stands in its dialing, as the API shows it: state, attempts, last and next attempt.

Reads only, scoped to the organization (row-level security underneath when run as the API role). An attempt that
never reached Twilio (ABANDONED) is not an attempt: it is left out of the counts and of "last attempt".
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from storage.campaign_states import AttemptState
from storage.enums import RecipientStatus
from storage.errors import NotFound
from storage.records import Queryable, Record


class RecipientDispatch(Record):
    """A recipient and its dispatch state (`state` is the stored RecipientDispatchState value)."""

    id: str
    organization_id: str
    campaign_id: str
    name: str | None
    phone_number: str
    notes: str | None
    status: RecipientStatus
    state: str
    attempts: int
    next_attempt_at: datetime
    last_outcome: str | None
    last_reason: str | None
    last_attempt_at: datetime | None
    last_call_log_id: str | None
    created_at: datetime
    updated_at: datetime


_SELECT = f"""
    SELECT r."id", r."organizationId", r."campaignId", r."name", r."phoneNumber", r."notes", r."status",
           r."createdAt", r."updatedAt", rd."state", rd."attempts", rd."nextAttemptAt", rd."lastOutcome",
           rd."lastReason", last."startedAt" AS "lastAttemptAt", last."callLogId" AS "lastCallLogId"
    FROM "CampaignRecipient" r
    JOIN "CampaignRecipientDispatch" rd ON rd."recipientId" = r."id" AND rd."organizationId" = r."organizationId"
    LEFT JOIN LATERAL (
        SELECT a."startedAt", a."callLogId" FROM "CampaignAttempt" a
        WHERE a."recipientId" = r."id" AND a."organizationId" = r."organizationId"
          AND a."state" <> '{AttemptState.ABANDONED}'
        ORDER BY a."attemptNumber" DESC, a."startedAt" DESC LIMIT 1
    ) last ON true
"""


async def list_recipient_states(
    db: Queryable,
    *,
    organization_id: str,
    campaign_id: str,
    status: RecipientStatus | None = None,
    states: Collection[str] | None = None,
    limit: int = 100,
    after_id: str | None = None,
) -> list[RecipientDispatch]:
    """A page of the campaign's recipients in id order (optionally of one import `status`, or only in `states`);
    pass the last one's id as `after_id` for the next."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    conditions = ['r."campaignId" = $1', 'r."organizationId" = $2']
    args: list[Any] = [campaign_id, organization_id]
    if status is not None:
        args.append(status)
        conditions.append(f'r."status" = ${len(args)}')
    if states is not None:
        args.append(list(states))
        conditions.append(f'rd."state" = ANY(${len(args)}::text[])')
    if after_id is not None:
        args.append(after_id)
        conditions.append(f'r."id" > ${len(args)}')
    args.append(limit)
    rows = await db.fetch(
        f'{_SELECT} WHERE {" AND ".join(conditions)} ORDER BY r."id" LIMIT ${len(args)}',
        *args,
    )
    return RecipientDispatch.from_rows(rows)


async def get_recipient_state(
    db: Queryable, *, organization_id: str, campaign_id: str, recipient_id: str
) -> RecipientDispatch:
    """One recipient of the campaign and its dispatch state; NotFound if the organization's campaign has no such."""
    row = await db.fetchrow(
        f'{_SELECT} WHERE r."id" = $1 AND r."campaignId" = $2 AND r."organizationId" = $3',
        recipient_id,
        campaign_id,
        organization_id,
    )
    if row is None:
        raise NotFound("CampaignRecipient", recipient_id)
    return RecipientDispatch.from_row(row)
