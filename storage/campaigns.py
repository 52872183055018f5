"""Campaigns: batches of outbound calls, their recipients, and a lifecycle that moves only along allowed edges.

DRAFT -> PLANNED -> CONTINUING -> COMPLETED, any unfinished state -> STOPPED, and PLANNED -> DRAFT to unschedule.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import date, datetime
from typing import Any

import asyncpg

from storage.enums import CampaignStatus, RecipientStatus
from storage.errors import ConstraintViolation, InvalidReference, NotFound, StorageError, translate_errors
from storage.records import Connection, Queryable, Record, new_id, transaction

_COLUMNS = (
    '"id", "organizationId", "batchName", "status", "progress", "totalCalls", "completedCalls", "agentId", '
    '"conversationPathId", "firstSentence", "taskPrompt", "postCallSummary", "startDate", "startTime", '
    '"callStartTime", "callEndTime", "createdAt", "updatedAt"'
)
_RECIPIENT_COLUMNS = (
    '"id", "organizationId", "campaignId", "name", "phoneNumber", "notes", "status", "createdAt", "updatedAt"'
)
_COPIED_RECIPIENT_COLUMNS = ("id", "organizationId", "campaignId", "name", "phoneNumber", "notes", "status")
_TIME_OF_DAY = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
# Building COPY rows (a CUID each) is CPU work: let other tasks run between slices of this many rows.
_ROWS_PER_SLICE = 100

CAMPAIGN_TRANSITIONS: Mapping[CampaignStatus, frozenset[CampaignStatus]] = {
    CampaignStatus.DRAFT: frozenset({CampaignStatus.PLANNED, CampaignStatus.STOPPED}),
    CampaignStatus.PLANNED: frozenset({CampaignStatus.CONTINUING, CampaignStatus.DRAFT, CampaignStatus.STOPPED}),
    CampaignStatus.CONTINUING: frozenset({CampaignStatus.COMPLETED, CampaignStatus.STOPPED}),
    CampaignStatus.COMPLETED: frozenset(),
    CampaignStatus.STOPPED: frozenset(),
}
"""The statuses each campaign status may move to; COMPLETED and STOPPED are final."""


class Campaign(Record):
    """A batch of outbound calls by one agent: what to say, when to call, and how far it has got."""

    id: str
    organization_id: str
    batch_name: str
    status: CampaignStatus
    progress: int
    total_calls: int
    completed_calls: int
    agent_id: str
    conversation_path_id: str | None
    first_sentence: str | None
    task_prompt: str | None
    post_call_summary: str | None
    start_date: date | None
    start_time: str | None
    call_start_time: str | None
    call_end_time: str | None
    created_at: datetime
    updated_at: datetime


class CampaignRecipient(Record):
    """Someone a campaign calls; ERROR recipients (e.g. an invalid number) are never dialed."""

    id: str
    organization_id: str
    campaign_id: str
    name: str | None
    phone_number: str
    notes: str | None
    status: RecipientStatus
    created_at: datetime
    updated_at: datetime


class NewRecipient(Record):
    """A recipient to import into a campaign."""

    phone_number: str
    name: str | None = None
    notes: str | None = None
    status: RecipientStatus = RecipientStatus.READY


class InvalidCampaignTransition(StorageError):
    """A campaign was asked to move to a status its current status does not lead to; nothing changed."""

    def __init__(self, campaign_id: str, current: CampaignStatus, requested: CampaignStatus) -> None:
        allowed = ", ".join(sorted(CAMPAIGN_TRANSITIONS[current])) or "nothing (it is finished)"
        super().__init__(f"Campaign {campaign_id} is {current}; it cannot become {requested} (it may become {allowed})")
        self.campaign_id = campaign_id
        self.current = current
        self.requested = requested


def _check_time_of_day(field: str, value: str | None) -> None:
    if value is not None and not _TIME_OF_DAY.fullmatch(value):
        raise ConstraintViolation(f"Campaign.{field} {value!r} is not a time of day as HH:MM (00:00 to 23:59)")


async def create_campaign(
    db: Queryable,
    *,
    organization_id: str,
    batch_name: str,
    agent_id: str,
    conversation_path_id: str | None = None,
    first_sentence: str | None = None,
    task_prompt: str | None = None,
    post_call_summary: str | None = None,
    start_date: date | None = None,
    start_time: str | None = None,
    call_start_time: str | None = None,
    call_end_time: str | None = None,
) -> Campaign:
    """Create a DRAFT campaign.

    ConstraintViolation if a time is not HH:MM; InvalidReference if the agent or conversation path is not
    the organization's.
    """
    _check_time_of_day("startTime", start_time)
    _check_time_of_day("callStartTime", call_start_time)
    _check_time_of_day("callEndTime", call_end_time)
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "Campaign"
                ("id", "organizationId", "batchName", "agentId", "conversationPathId", "firstSentence", "taskPrompt",
                 "postCallSummary", "startDate", "startTime", "callStartTime", "callEndTime")
            SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12
            WHERE EXISTS (SELECT 1 FROM "Agent" WHERE "id" = $4 AND "organizationId" = $2)
              AND ($5::text IS NULL OR EXISTS (
                    SELECT 1 FROM "ConversationPath" WHERE "id" = $5 AND "organizationId" = $2))
            RETURNING {_COLUMNS}
            """,
            new_id(),
            organization_id,
            batch_name,
            agent_id,
            conversation_path_id,
            first_sentence,
            task_prompt,
            post_call_summary,
            start_date,
            start_time,
            call_start_time,
            call_end_time,
        )
    if row is None:
        raise await _foreign_reference(db, organization_id, agent_id, conversation_path_id)
    return Campaign.from_row(row)


async def _foreign_reference(
    db: Queryable, organization_id: str, agent_id: str, conversation_path_id: str | None
) -> InvalidReference:
    # Only reached when the guarded INSERT refused a reference: name which one.
    if not await db.fetchval(
        'SELECT EXISTS (SELECT 1 FROM "Agent" WHERE "id" = $1 AND "organizationId" = $2)', agent_id, organization_id
    ):
        return InvalidReference(f"Agent {agent_id} does not exist in organization {organization_id}")
    return InvalidReference(f"ConversationPath {conversation_path_id} does not exist in organization {organization_id}")


async def get_campaign(db: Queryable, *, organization_id: str, campaign_id: str) -> Campaign:
    """The organization's campaign with that id; NotFound otherwise."""
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "Campaign" WHERE "id" = $1 AND "organizationId" = $2', campaign_id, organization_id
    )
    if row is None:
        raise NotFound("Campaign", campaign_id)
    return Campaign.from_row(row)


async def list_campaigns(
    db: Queryable, *, organization_id: str, status: CampaignStatus | None = None
) -> list[Campaign]:
    """The organization's campaigns, newest first, optionally only those in one status."""
    conditions = ['"organizationId" = $1']
    args: list[Any] = [organization_id]
    if status is not None:
        args.append(status)
        conditions.append(f'"status" = ${len(args)}')
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "Campaign"
        WHERE {" AND ".join(conditions)}
        ORDER BY "createdAt" DESC, "id" DESC
        """,
        *args,
    )
    return Campaign.from_rows(rows)


async def transition_campaign(
    db: Queryable, *, organization_id: str, campaign_id: str, status: CampaignStatus
) -> Campaign:
    """Move a campaign to `status` along an allowed edge, in one conditional UPDATE.

    InvalidCampaignTransition (and no change) if its current status does not lead there.
    """
    sources = [source for source, targets in CAMPAIGN_TRANSITIONS.items() if status in targets]
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "Campaign" SET "status" = $3
            WHERE "id" = $1 AND "organizationId" = $2 AND "status"::text = ANY($4::text[])
            RETURNING {_COLUMNS}
            """,
            campaign_id,
            organization_id,
            status,
            sources,
        )
    if row is not None:
        return Campaign.from_row(row)
    current = await get_campaign(db, organization_id=organization_id, campaign_id=campaign_id)
    raise InvalidCampaignTransition(campaign_id, current.status, status)


async def delete_campaign(db: Queryable, *, organization_id: str, campaign_id: str) -> None:
    """Delete a campaign and its recipients; its CallLogs stay, no longer linked to it."""
    with translate_errors():
        deleted = await db.fetchval(
            'DELETE FROM "Campaign" WHERE "id" = $1 AND "organizationId" = $2 RETURNING "id"',
            campaign_id,
            organization_id,
        )
    if deleted is None:
        raise NotFound("Campaign", campaign_id)


async def add_recipients(
    db: asyncpg.Pool | Connection,
    *,
    organization_id: str,
    campaign_id: str,
    recipients: Iterable[NewRecipient],
) -> int:
    """Bulk-import recipients with COPY, then set the campaign's totalCalls to its READY recipients.

    Needs a connection (one is taken from a pool if given one). Returns how many were imported;
    NotFound if the campaign is not the organization's.
    """
    async with transaction(db) as conn:
        # The row lock makes concurrent imports into one campaign count each other's recipients.
        found = await conn.fetchval(
            'SELECT 1 FROM "Campaign" WHERE "id" = $1 AND "organizationId" = $2 FOR NO KEY UPDATE',
            campaign_id,
            organization_id,
        )
        if found is None:
            raise NotFound("Campaign", campaign_id)
        with translate_errors():
            status = await conn.copy_records_to_table(
                "CampaignRecipient",
                columns=_COPIED_RECIPIENT_COLUMNS,
                records=_recipient_rows(organization_id, campaign_id, recipients),
            )
            await conn.execute(
                """
                UPDATE "Campaign" c SET
                    "totalCalls" = ready.n,
                    "progress" = CASE WHEN ready.n > 0 THEN LEAST(100, c."completedCalls" * 100 / ready.n) ELSE 0 END
                FROM (
                    SELECT count(*)::int AS n FROM "CampaignRecipient"
                    WHERE "campaignId" = $1 AND "organizationId" = $2 AND "status" = 'READY'
                ) ready
                WHERE c."id" = $1 AND c."organizationId" = $2
                """,
                campaign_id,
                organization_id,
            )
    return int(status.rsplit(" ", 1)[1])


async def _recipient_rows(
    organization_id: str, campaign_id: str, recipients: Iterable[NewRecipient]
) -> AsyncIterator[tuple[str, str, str, str | None, str, str | None, str]]:
    for index, recipient in enumerate(recipients, 1):
        yield (
            new_id(),
            organization_id,
            campaign_id,
            recipient.name,
            recipient.phone_number,
            recipient.notes,
            recipient.status,
        )
        if index % _ROWS_PER_SLICE == 0:
            await asyncio.sleep(0)


async def list_recipients(
    db: Queryable,
    *,
    organization_id: str,
    campaign_id: str,
    status: RecipientStatus | None = None,
    limit: int = 100,
    after_id: str | None = None,
) -> list[CampaignRecipient]:
    """A page of a campaign's recipients in id order; pass the last one's id as `after_id` for the next."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    conditions = ['"campaignId" = $1', '"organizationId" = $2']
    args: list[Any] = [campaign_id, organization_id]
    if status is not None:
        args.append(status)
        conditions.append(f'"status" = ${len(args)}')
    if after_id is not None:
        args.append(after_id)
        conditions.append(f'"id" > ${len(args)}')
    args.append(limit)
    rows = await db.fetch(
        f"""
        SELECT {_RECIPIENT_COLUMNS} FROM "CampaignRecipient"
        WHERE {" AND ".join(conditions)}
        ORDER BY "id"
        LIMIT ${len(args)}
        """,
        *args,
    )
    return CampaignRecipient.from_rows(rows)


async def record_completed_call(db: Queryable, *, organization_id: str, campaign_id: str) -> Campaign:
    """Count one more completed call and recompute progress (floor of the percentage, at most 100) in one UPDATE."""
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "Campaign" SET
                "completedCalls" = "completedCalls" + 1,
                "progress" = CASE WHEN "totalCalls" > 0
                                  THEN LEAST(100, ("completedCalls" + 1) * 100 / "totalCalls") ELSE 0 END
            WHERE "id" = $1 AND "organizationId" = $2
            RETURNING {_COLUMNS}
            """,
            campaign_id,
            organization_id,
        )
    if row is None:
        raise NotFound("Campaign", campaign_id)
    return Campaign.from_row(row)
