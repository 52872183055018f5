"""Campaigns: batches of outbound calls, their recipients, and a lifecycle that moves only along allowed edges.

DRAFT -> PLANNED -> CONTINUING -> COMPLETED, any unfinished state -> STOPPED, and PLANNED -> DRAFT to unschedule.
`start_campaign` schedules (PLANNED); the dispatcher moves it on (storage/campaign_dispatch.py). Pausing is a flag
beside the status, with a reason. Each campaign's dialing rules (timezone, days, concurrency, pace, retry policy)
live in "CampaignDispatch"; each recipient's dispatch state and CSV variables in "CampaignRecipientDispatch".
totalCalls counts the READY recipients and completedCalls those finished (reached, or failed for good).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from pydantic import Field

from storage.campaign_states import RETRYABLE_OUTCOMES, AttemptOutcome, RecipientDispatchState
from storage.enums import CampaignStatus, RecipientStatus
from storage.errors import ConstraintViolation, InvalidReference, NotFound, StorageError, translate_errors
from storage.records import Connection, Queryable, Record, new_id, new_ids, transaction

_COLUMNS = (
    '"id", "organizationId", "batchName", "status", "progress", "totalCalls", "completedCalls", "agentId", '
    '"conversationPathId", "firstSentence", "taskPrompt", "postCallSummary", "startDate", "startTime", '
    '"callStartTime", "callEndTime", "createdAt", "updatedAt"'
)
_RECIPIENT_COLUMNS = (
    '"id", "organizationId", "campaignId", "name", "phoneNumber", "notes", "status", "createdAt", "updatedAt"'
)
_STAGED_COLUMNS = ("line", "id", "name", "phoneNumber", "notes", "status", "errorReason", "timezone", "variables")
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
    """A recipient to import into a campaign: ERROR ones carry the reason, extra columns become variables."""

    phone_number: str
    name: str | None = None
    notes: str | None = None
    status: RecipientStatus = RecipientStatus.READY
    error_reason: str | None = None
    variables: dict[str, str] = Field(default_factory=dict)
    timezone: str | None = None
    """The recipient's own IANA timezone when their number tells it; None means the campaign's."""


def recipient_variables(*, name: str | None, notes: str | None, variables: Mapping[str, str]) -> dict[str, str]:
    """What a recipient's calls fill `{{...}}` placeholders with: its extra columns, and its name and notes as
    `{{name}}` and `{{notes}}` unless a column of that name says otherwise."""
    return ({"name": name} if name else {}) | ({"notes": notes} if notes else {}) | dict(variables)


class ImportSummary(Record):
    """What an import did with the rows it was given."""

    rows: int
    """Rows read."""
    imported: int
    """New callable recipients."""
    merged: int
    """Rows folded into another row of the same number (in this import or already in the campaign)."""
    errors: int
    """Rows kept as ERROR recipients, never dialed."""


_DIALING_COLUMNS = (
    '"campaignId", "fromNumber", "timezone", "daysOfWeek", "maxConcurrentCalls", "callsPerSecond", "maxAttempts", '
    '"retryOn", "retryDelaysSeconds", "paused", "pausedReason", "startedAt", "finishedAt"'
)


class CampaignRetryPolicy(Record):
    """How often to call a recipient: at most `max_attempts` dials, retrying only the `retry_on` outcomes.

    The n-th retry waits `delays_seconds[n - 1]` after the previous call ended (the last delay repeats).
    """

    max_attempts: int = 1
    retry_on: frozenset[str] = frozenset({AttemptOutcome.BUSY, AttemptOutcome.NO_ANSWER, AttemptOutcome.FAILED})
    delays_seconds: tuple[int, ...] = (3600,)

    def retry_at(self, outcome: AttemptOutcome, attempts_made: int, ended_at: datetime) -> datetime | None:
        """When to dial again after an attempt ended with `outcome`, or None if the recipient is finished."""
        if outcome not in self.retry_on or attempts_made >= self.max_attempts:
            return None
        delay = self.delays_seconds[min(attempts_made, len(self.delays_seconds)) - 1]
        return ended_at + timedelta(seconds=delay)


class DialingRules(Record):
    """How a campaign dials, beyond the seed's fields: caller id, timezone, days, concurrency, pace, retries."""

    from_number: str | None = None
    """The caller id (E.164); None: the default caller id when dialing (storage.phone_numbers.default_caller_id)."""
    timezone: str = "UTC"
    """Where callStartTime/callEndTime and startDate/startTime are read when a recipient's own zone is unknown."""
    days_of_week: frozenset[int] = frozenset(range(1, 8))
    """ISO weekdays the window opens on: Monday = 1 ... Sunday = 7."""
    max_concurrent_calls: int = 1
    calls_per_second: float = 1.0
    retry: CampaignRetryPolicy = Field(default_factory=CampaignRetryPolicy)

    def check(self) -> None:
        """ConstraintViolation naming the first unusable setting."""
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConstraintViolation(
                f"timezone {self.timezone!r} is not an IANA timezone (for example Europe/Paris)"
            ) from None
        if not self.days_of_week or not self.days_of_week <= frozenset(range(1, 8)):
            raise ConstraintViolation(
                f"days of week {sorted(self.days_of_week)} must be a non-empty subset of 1 (Monday) .. 7 (Sunday)"
            )
        if self.max_concurrent_calls < 1:
            raise ConstraintViolation(f"max concurrent calls must be at least 1, got {self.max_concurrent_calls}")
        if not 0 < self.calls_per_second <= 1000:
            raise ConstraintViolation(f"calls per second must be above 0 and at most 1000, got {self.calls_per_second}")
        if self.retry.max_attempts < 1:
            raise ConstraintViolation(f"max attempts must be at least 1, got {self.retry.max_attempts}")
        if unknown := self.retry.retry_on - RETRYABLE_OUTCOMES:
            raise ConstraintViolation(
                f"cannot retry on {', '.join(sorted(unknown))}; retryable outcomes are "
                + ", ".join(sorted(RETRYABLE_OUTCOMES))
            )
        if not self.retry.delays_seconds or min(self.retry.delays_seconds) < 0:
            raise ConstraintViolation(f"retry delays must be one or more seconds >= 0, got {self.retry.delays_seconds}")


class CampaignDispatchState(Record):
    """A campaign's dialing rules and where its dispatch stands (paused and why, when it started and finished)."""

    campaign_id: str
    rules: DialingRules
    paused: bool
    paused_reason: str | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_dispatch_row(cls, row: Mapping[str, Any] | asyncpg.Record) -> CampaignDispatchState:
        """Build it from a "CampaignDispatch" row."""
        rules = DialingRules(
            from_number=row["fromNumber"],
            timezone=row["timezone"],
            days_of_week=frozenset(row["daysOfWeek"]),
            max_concurrent_calls=row["maxConcurrentCalls"],
            calls_per_second=row["callsPerSecond"],
            retry=CampaignRetryPolicy(
                max_attempts=row["maxAttempts"],
                retry_on=frozenset(row["retryOn"]),
                delays_seconds=tuple(row["retryDelaysSeconds"]),
            ),
        )
        return cls(
            campaign_id=row["campaignId"],
            rules=rules,
            paused=row["paused"],
            paused_reason=row["pausedReason"],
            started_at=row["startedAt"],
            finished_at=row["finishedAt"],
        )


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
    rules: DialingRules | None = None,
) -> Campaign:
    """Create a DRAFT campaign, with its dialing rules (defaults: UTC, every day, one call at a time, no retry).

    ConstraintViolation if a time is not HH:MM or a rule is unusable; InvalidReference if the agent or
    conversation path is not the organization's.
    """
    _check_time_of_day("startTime", start_time)
    _check_time_of_day("callStartTime", call_start_time)
    _check_time_of_day("callEndTime", call_end_time)
    rules = rules if rules is not None else DialingRules()
    rules.check()
    # Two statements in one transaction, not one with a CTE: CampaignDispatch's row-level security policy looks
    # the campaign up, and a statement does not see the rows its own CTE inserts.
    async with transaction(db) as conn:
        with translate_errors():
            row = await conn.fetchrow(
                f"""
                INSERT INTO "Campaign"
                    ("id", "organizationId", "batchName", "agentId", "conversationPathId", "firstSentence",
                     "taskPrompt", "postCallSummary", "startDate", "startTime", "callStartTime", "callEndTime")
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
            if row is not None:
                await conn.execute(
                    """
                    INSERT INTO "CampaignDispatch"
                        ("campaignId", "organizationId", "fromNumber", "timezone", "daysOfWeek", "maxConcurrentCalls",
                         "callsPerSecond", "maxAttempts", "retryOn", "retryDelaysSeconds")
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                    """,
                    row["id"],
                    organization_id,
                    rules.from_number,
                    rules.timezone,
                    sorted(rules.days_of_week),
                    rules.max_concurrent_calls,
                    rules.calls_per_second,
                    rules.retry.max_attempts,
                    sorted(rules.retry.retry_on),
                    list(rules.retry.delays_seconds),
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
        return InvalidReference(
            f"Agent {agent_id} does not exist in organization {organization_id}", entity="Agent", key=agent_id
        )
    return InvalidReference(
        f"ConversationPath {conversation_path_id} does not exist in organization {organization_id}",
        entity="ConversationPath",
        key=conversation_path_id,
    )


async def get_campaign(db: Queryable, *, organization_id: str, campaign_id: str) -> Campaign:
    """The organization's campaign with that id; NotFound otherwise."""
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "Campaign" WHERE "id" = $1 AND "organizationId" = $2', campaign_id, organization_id
    )
    if row is None:
        raise NotFound("Campaign", campaign_id)
    return Campaign.from_row(row)


async def find_call_campaign(db: Queryable, *, organization_id: str, campaign_id: str | None) -> Campaign | None:
    """The campaign a call was placed for (its CallLog's `campaignId`), or None when it has none or the campaign has
    been deleted since the CallLog was read: its calls stay, unlinked, and go on as calls of their agent alone."""
    if campaign_id is None:
        return None
    try:
        return await get_campaign(db, organization_id=organization_id, campaign_id=campaign_id)
    except NotFound:
        return None


async def list_campaigns(
    db: Queryable,
    *,
    organization_id: str,
    status: CampaignStatus | None = None,
    limit: int | None = None,
    before: tuple[datetime, str] | None = None,
) -> list[Campaign]:
    """The organization's campaigns, newest first, optionally only those in one status.

    For pages: at most `limit`, those created before `before` = (createdAt, id) of the previous page's last.
    """
    conditions = ['"organizationId" = $1']
    args: list[Any] = [organization_id]
    if status is not None:
        args.append(status)
        conditions.append(f'"status" = ${len(args)}')
    if before is not None:
        args.extend(before)
        conditions.append(f'("createdAt", "id") < (${len(args) - 1}, ${len(args)})')
    limit_clause = ""
    if limit is not None:
        args.append(limit)
        limit_clause = f"LIMIT ${len(args)}"
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "Campaign"
        WHERE {" AND ".join(conditions)}
        ORDER BY "createdAt" DESC, "id" DESC
        {limit_clause}
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
    async with transaction(db) as conn:
        # The cascade reaches the dispatch row after the campaign's: lock it first, as every writer does.
        await _lock_dispatch(conn, organization_id, campaign_id)
        with translate_errors():
            deleted = await conn.fetchval(
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
    """Bulk-import recipients as given (no merging) with COPY, then set the campaign's totalCalls.

    Needs a connection (one is taken from a pool if given one). Returns how many were imported;
    NotFound if the campaign is not the organization's.
    """
    async with transaction(db) as conn:
        await _lock_for_import(conn, organization_id, campaign_id)
        await _stage(conn, organization_id, campaign_id, recipients)
        imported = await conn.fetchval(
            """
            WITH inserted AS (
                INSERT INTO "CampaignRecipient"
                    ("id", "organizationId", "campaignId", "name", "phoneNumber", "notes", "status")
                SELECT "id", $1, $2, "name", "phoneNumber", "notes", "status"::"RecipientStatus"
                FROM "_staged_recipient" ORDER BY "line"
                RETURNING 1
            )
            SELECT count(*)::int FROM inserted
            """,
            organization_id,
            campaign_id,
        )
        await _insert_dispatch_rows(conn, organization_id, campaign_id, merged=False)
        await _recount(conn, organization_id, campaign_id)
    return int(imported)


async def import_recipients(
    db: asyncpg.Pool | Connection,
    *,
    organization_id: str,
    campaign_id: str,
    recipients: Iterable[NewRecipient] | AsyncIterable[NewRecipient],
) -> ImportSummary:
    """Import a file's recipients with COPY, merging duplicates: one recipient per E.164 number.

    Rows of one number become one recipient (the first non-empty name and notes, variables merged, earlier
    rows winning); a number the campaign already has is not added again. ERROR rows are all kept, with their
    reasons. All or nothing, in one transaction. NotFound if the campaign is not the organization's;
    ConstraintViolation if it is finished.
    """
    async with transaction(db) as conn:
        campaign = await _lock_for_import(conn, organization_id, campaign_id)
        if campaign.status in (CampaignStatus.COMPLETED, CampaignStatus.STOPPED):
            raise ConstraintViolation(f"Campaign {campaign_id} is {campaign.status}: recipients can no longer be added")
        rows = await _stage(conn, organization_id, campaign_id, recipients)
        counts = await conn.fetchrow(
            """
            WITH ready AS (
                SELECT s.*, EXISTS (
                    SELECT 1 FROM "CampaignRecipient" r
                    WHERE r."campaignId" = $2 AND r."phoneNumber" = s."phoneNumber" AND r."status" = 'READY'
                ) AS "known"
                FROM "_staged_recipient" s WHERE s."status" = 'READY'
            ),
            grouped AS (
                SELECT
                    "phoneNumber",
                    (array_agg("id" ORDER BY "line"))[1] AS "id",
                    (array_agg("name" ORDER BY "line") FILTER (WHERE "name" IS NOT NULL))[1] AS "name",
                    (array_agg("notes" ORDER BY "line") FILTER (WHERE "notes" IS NOT NULL))[1] AS "notes"
                FROM ready WHERE NOT "known" GROUP BY "phoneNumber"
            ),
            inserted AS (
                INSERT INTO "CampaignRecipient"
                    ("id", "organizationId", "campaignId", "name", "phoneNumber", "notes", "status")
                SELECT "id", $1, $2, "name", "phoneNumber", "notes", 'READY'::"RecipientStatus" FROM grouped
                UNION ALL
                SELECT "id", $1, $2, "name", "phoneNumber", "notes", 'ERROR'::"RecipientStatus"
                FROM "_staged_recipient" WHERE "status" = 'ERROR'
                RETURNING "status"
            )
            SELECT
                count(*) FILTER (WHERE "status" = 'READY')::int AS "imported",
                count(*) FILTER (WHERE "status" = 'ERROR')::int AS "errors"
            FROM inserted
            """,
            organization_id,
            campaign_id,
        )
        await _insert_dispatch_rows(conn, organization_id, campaign_id, merged=True)
        await _recount(conn, organization_id, campaign_id)
    assert counts is not None
    imported, errors = int(counts["imported"]), int(counts["errors"])
    return ImportSummary(rows=rows, imported=imported, merged=rows - imported - errors, errors=errors)


async def _lock_for_import(conn: Connection, organization_id: str, campaign_id: str) -> Campaign:
    # The row lock makes concurrent imports into one campaign see each other's recipients.
    row = await conn.fetchrow(
        f'SELECT {_COLUMNS} FROM "Campaign" WHERE "id" = $1 AND "organizationId" = $2 FOR NO KEY UPDATE',
        campaign_id,
        organization_id,
    )
    if row is None:
        raise NotFound("Campaign", campaign_id)
    return Campaign.from_row(row)


async def _stage(
    conn: Connection,
    organization_id: str,
    campaign_id: str,
    recipients: Iterable[NewRecipient] | AsyncIterable[NewRecipient],
) -> int:
    """COPY the rows into a temporary table dropped at commit; return how many."""
    # Two imports inside one caller's transaction would otherwise meet the first one's table.
    await conn.execute('DROP TABLE IF EXISTS pg_temp."_staged_recipient"')
    await conn.execute(
        """
        CREATE TEMPORARY TABLE "_staged_recipient" (
            "line" INTEGER NOT NULL,
            "id" TEXT NOT NULL,
            "name" TEXT,
            "phoneNumber" TEXT NOT NULL,
            "notes" TEXT,
            "status" TEXT NOT NULL,
            "errorReason" TEXT,
            "timezone" TEXT,
            "variables" TEXT NOT NULL
        ) ON COMMIT DROP
        """
    )
    with translate_errors():
        status = await conn.copy_records_to_table(
            "_staged_recipient", columns=_STAGED_COLUMNS, records=_staged_rows(recipients)
        )
    return int(status.rsplit(" ", 1)[1])


async def _staged_rows(
    recipients: Iterable[NewRecipient] | AsyncIterable[NewRecipient],
) -> AsyncIterator[tuple[Any, ...]]:
    line = 0
    ids: list[str] = []
    if isinstance(recipients, AsyncIterable):
        async for recipient in recipients:
            line += 1
            ids = ids or new_ids(_ROWS_PER_SLICE)
            yield _staged_row(line, ids.pop(), recipient)
        return
    for recipient in recipients:
        line += 1
        ids = ids or new_ids(_ROWS_PER_SLICE)
        yield _staged_row(line, ids.pop(), recipient)
        if line % _ROWS_PER_SLICE == 0:
            await asyncio.sleep(0)


def _staged_row(line: int, id: str, recipient: NewRecipient) -> tuple[Any, ...]:
    return (
        line,
        id,
        recipient.name,
        recipient.phone_number,
        recipient.notes,
        recipient.status.value,
        recipient.error_reason,
        recipient.timezone,
        json.dumps(recipient.variables, ensure_ascii=False),
    )


async def _insert_dispatch_rows(conn: Connection, organization_id: str, campaign_id: str, *, merged: bool) -> None:
    """Give each staged recipient that was inserted its dispatch row: QUEUED to dial, or INVALID with the reason.

    Merged imports fold the variables of every row of a number into the recipient that row group became,
    earlier rows winning a key.
    """
    variables = (
        """
        SELECT s2."phoneNumber", jsonb_object_agg(kv.key, kv.value ORDER BY s2."line" DESC) AS "variables"
        FROM "_staged_recipient" s2, jsonb_each(s2."variables"::jsonb) kv
        WHERE s2."status" = 'READY'
        GROUP BY s2."phoneNumber"
        """
        if merged
        else 'SELECT NULL::text AS "phoneNumber", NULL::jsonb AS "variables" WHERE false'
    )
    await conn.execute(
        f"""
        INSERT INTO "CampaignRecipientDispatch"
            ("recipientId", "organizationId", "campaignId", "timezone", "variables", "state", "lastReason")
        SELECT
            s."id", $1, $2, s."timezone",
            COALESCE(v."variables", s."variables"::jsonb),
            CASE WHEN s."status" = 'READY' THEN '{RecipientDispatchState.QUEUED}'
                 ELSE '{RecipientDispatchState.INVALID}' END,
            s."errorReason"
        FROM "_staged_recipient" s
        JOIN "CampaignRecipient" r ON r."id" = s."id"
        LEFT JOIN ({variables}) v ON s."status" = 'READY' AND v."phoneNumber" = s."phoneNumber"
        """,
        organization_id,
        campaign_id,
    )


async def _recount(conn: Connection, organization_id: str, campaign_id: str) -> None:
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


async def get_dispatch_state(db: Queryable, *, organization_id: str, campaign_id: str) -> CampaignDispatchState:
    """The organization's campaign's dialing rules and pause state; NotFound otherwise."""
    row = await db.fetchrow(
        f'SELECT {_DIALING_COLUMNS} FROM "CampaignDispatch" WHERE "campaignId" = $1 AND "organizationId" = $2',
        campaign_id,
        organization_id,
    )
    if row is None:
        raise NotFound("Campaign", campaign_id)
    return CampaignDispatchState.from_dispatch_row(row)


async def start_campaign(db: asyncpg.Pool | Connection, *, organization_id: str, campaign_id: str) -> Campaign:
    """Schedule a DRAFT campaign (PLANNED): the dispatcher starts it at its startDate/startTime, or at once.

    ConstraintViolation if it has no recipient to call; InvalidCampaignTransition if it is not a DRAFT.
    """
    async with transaction(db) as conn:
        ready = await conn.fetchval(
            f"""
            SELECT count(*) FROM "CampaignRecipientDispatch"
            WHERE "campaignId" = $1 AND "organizationId" = $2 AND "state" = '{RecipientDispatchState.QUEUED}'
            """,
            campaign_id,
            organization_id,
        )
        if not ready:
            current = await get_campaign(conn, organization_id=organization_id, campaign_id=campaign_id)  # NotFound
            if current.status is not CampaignStatus.DRAFT:  # a finished campaign: the transition is what is wrong
                raise InvalidCampaignTransition(campaign_id, current.status, CampaignStatus.PLANNED)
            raise ConstraintViolation(f"Campaign {campaign_id} has no valid recipient to call; import some first")
        await _lock_dispatch(conn, organization_id, campaign_id)
        campaign = await transition_campaign(
            conn, organization_id=organization_id, campaign_id=campaign_id, status=CampaignStatus.PLANNED
        )
        # Due from now on, whatever the clock of the process that looks first.
        await conn.execute(
            """UPDATE "CampaignDispatch" SET "nextDialAt" = 'epoch' WHERE "campaignId" = $1""", campaign_id
        )
    return campaign


async def _lock_dispatch(conn: Connection, organization_id: str, campaign_id: str) -> None:
    # Every writer locks a campaign's "CampaignDispatch" row before its "Campaign" row: never a deadlock.
    await conn.execute(
        'SELECT 1 FROM "CampaignDispatch" WHERE "campaignId" = $1 AND "organizationId" = $2 FOR UPDATE',
        campaign_id,
        organization_id,
    )


async def pause_campaign(
    db: Queryable, *, organization_id: str, campaign_id: str, reason: str = "paused by request"
) -> CampaignDispatchState:
    """Stop new dials until resumed (calls in progress go on); a finished campaign cannot be paused."""
    return await _set_paused(db, organization_id, campaign_id, paused=True, reason=reason)


async def resume_campaign(db: Queryable, *, organization_id: str, campaign_id: str) -> CampaignDispatchState:
    """Let a paused campaign dial again (after a pause by request, or once credits were added)."""
    return await _set_paused(db, organization_id, campaign_id, paused=False, reason=None)


async def _set_paused(
    db: Queryable, organization_id: str, campaign_id: str, *, paused: bool, reason: str | None
) -> CampaignDispatchState:
    row = await db.fetchrow(
        f"""
        UPDATE "CampaignDispatch" d SET "paused" = $3, "pausedReason" = $4
        FROM "Campaign" c
        WHERE d."campaignId" = $1 AND d."organizationId" = $2 AND c."id" = d."campaignId"
          AND c."status" NOT IN ('COMPLETED', 'STOPPED')
        RETURNING {", ".join(f"d.{column.strip()}" for column in _DIALING_COLUMNS.split(","))}
        """,
        campaign_id,
        organization_id,
        paused,
        reason,
    )
    if row is not None:
        return CampaignDispatchState.from_dispatch_row(row)
    campaign = await get_campaign(db, organization_id=organization_id, campaign_id=campaign_id)
    raise InvalidCampaignTransition(campaign.id, campaign.status, campaign.status)


STOPPED_REASON = "campaign stopped"
"""The `lastReason` of a recipient CANCELED because its campaign was stopped."""


async def stop_campaign(db: asyncpg.Pool | Connection, *, organization_id: str, campaign_id: str) -> Campaign:
    """Stop a campaign for good: nobody is dialed any more; calls in progress end and are still recorded.

    Recipients still waiting become CANCELED. InvalidCampaignTransition if it has already finished.
    """
    async with transaction(db) as conn:
        # A claim holds this row while it leases recipients: wait for it, so the stop sees what it leased.
        await _lock_dispatch(conn, organization_id, campaign_id)
        campaign = await transition_campaign(
            conn, organization_id=organization_id, campaign_id=campaign_id, status=CampaignStatus.STOPPED
        )
        await conn.execute(
            f"""
            UPDATE "CampaignRecipientDispatch"
            SET "state" = '{RecipientDispatchState.CANCELED}', "lastReason" = $3
            WHERE "campaignId" = $1 AND "organizationId" = $2 AND "state" = '{RecipientDispatchState.QUEUED}'
            """,
            campaign_id,
            organization_id,
            STOPPED_REASON,
        )
        await conn.execute(
            'UPDATE "CampaignDispatch" SET "finishedAt" = CURRENT_TIMESTAMP WHERE "campaignId" = $1', campaign_id
        )
    return campaign
