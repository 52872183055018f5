"""/v1/campaigns: outbound calling campaigns, their recipients and their lifecycle (the dispatcher dials them)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from engine.api.errors import conflict, unprocessable
from engine.api.models import Id, LongText, Name, Region, RequestModel, ResponseModel, no_built_in_names
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from engine.api.path_transfers import refuse_unmakeable_transfers
from engine.api.resources.calls import checked_caller_id
from engine.campaigns.recipients_csv import RecipientsFileError, make_recipient, read_recipients
from engine.server.appkeys import SETTINGS
from engine.twilio.outbound_calls import AgentUnavailable, usable_agent
from storage import campaigns, dial_policies
from storage.campaigns import (
    Campaign,
    CampaignDispatchState,
    CampaignRetryPolicy,
    DialingRules,
    ImportSummary,
    InvalidCampaignTransition,
    NewRecipient,
)
from storage.dial_policies import OutboundDialPolicy
from storage.enums import CampaignStatus
from storage.records import Connection

resource = Resource(
    "Campaigns",
    "Outbound calling campaigns: recipients called inside a daily window in their own timezone, with a concurrency "
    "cap, a pace and a retry policy. DRAFT -> PLANNED (start) -> CONTINUING -> COMPLETED, or STOPPED.",
)

TimeOfDay = Annotated[str, StringConstraints(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
PhoneText = Annotated[str, StringConstraints(max_length=64, pattern=r"^[^\x00]*$")]
ShortValue = Annotated[str, StringConstraints(max_length=2000, pattern=r"^[^\x00]*$")]
VariableName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")]
Outcome = Literal["busy", "no-answer", "failed", "voicemail"]
_DEFAULT_RETRY_ON: tuple[Outcome, ...] = ("busy", "no-answer", "failed")


class RetryRequest(RequestModel):
    """How often to call one recipient and after which outcomes to try again."""

    max_attempts: int = Field(1, ge=1, le=10)
    retry_on: list[Outcome] = Field(default_factory=lambda: list(_DEFAULT_RETRY_ON), max_length=4)
    delays_seconds: list[Annotated[int, Field(ge=0, le=30 * 86400)]] = Field(
        default_factory=lambda: [3600], min_length=1, max_length=10, description="Before each retry; the last repeats."
    )


class CampaignCreate(RequestModel):
    """A DRAFT campaign: who calls, what it says, when and how fast it may dial."""

    batch_name: Name
    agent_id: Id
    conversation_path_id: Id | None = None
    first_sentence: LongText | None = None
    task_prompt: LongText | None = None
    post_call_summary: LongText | None = None
    start_date: date | None = Field(None, description="Not before this day (in the campaign's timezone).")
    start_time: TimeOfDay | None = None
    call_start_time: TimeOfDay | None = Field(None, description="Daily window start, in each recipient's timezone.")
    call_end_time: TimeOfDay | None = Field(None, description="Daily window end (may be past midnight).")
    from_number: PhoneText | None = Field(
        None,
        description="Caller id: one of the organization's numbers, outbound ENABLED (E.164); "
        "default: the agent's number (Agent.phoneNumberId) if outbound ENABLED, else the organization's first "
        "outbound-enabled number (oldest first), as for POST /v1/calls without a fromNumber.",
    )
    timezone: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "UTC"
    days_of_week: list[Annotated[int, Field(ge=1, le=7)]] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5, 6, 7], min_length=1, max_length=7, description="ISO: Monday = 1."
    )
    max_concurrent_calls: int = Field(1, ge=1, le=1000)
    calls_per_second: float = Field(1.0, gt=0, le=1000)
    retry: RetryRequest = Field(default_factory=RetryRequest)

    @model_validator(mode="after")
    def _window(self) -> CampaignCreate:
        if (self.call_start_time is None) != (self.call_end_time is None):
            raise ValueError("callStartTime and callEndTime come together (or neither, for no daily window)")
        return self

    def rules(self, from_number: str | None) -> DialingRules:
        """The dialing rules the storage layer keeps, with the caller id as checked (E.164)."""
        return DialingRules(
            from_number=from_number,
            timezone=self.timezone,
            days_of_week=frozenset(self.days_of_week),
            max_concurrent_calls=self.max_concurrent_calls,
            calls_per_second=self.calls_per_second,
            retry=CampaignRetryPolicy(
                max_attempts=self.retry.max_attempts,
                retry_on=frozenset(self.retry.retry_on),
                delays_seconds=tuple(self.retry.delays_seconds),
            ),
        )


class CampaignView(Campaign):
    """A campaign with its dialing rules and dispatch state (paused and why, started, finished)."""

    rules: DialingRules
    paused: bool
    paused_reason: str | None
    started_at: datetime | None
    finished_at: datetime | None


class RecipientIn(RequestModel):
    """One recipient; columns beyond these go into `variables` for the prompt ({{name}})."""

    phone_number: PhoneText
    name: ShortValue | None = None
    notes: ShortValue | None = None
    variables: Annotated[dict[VariableName, ShortValue], AfterValidator(no_built_in_names)] = Field(
        default_factory=dict, max_length=50
    )


class RecipientsImport(RequestModel):
    """Recipients as a list, or as the text of a CSV file (header row; `;`, `,` or tab; a BOM is fine)."""

    recipients: list[RecipientIn] | None = Field(None, max_length=10_000)
    csv: Annotated[str, StringConstraints(max_length=5_000_000)] | None = None
    default_region: Region | None = Field(None, description="Region (e.g. US) for numbers without a +country code.")

    @model_validator(mode="after")
    def _one_source(self) -> RecipientsImport:
        if (self.recipients is None) == (self.csv is None):
            raise ValueError("give either recipients or csv")
        return self


class PauseRequest(RequestModel):
    """Why the campaign is paused (shown in its state)."""

    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)] = "paused by request"


class ImportResult(ResponseModel):
    """What an import did; ERROR rows are kept (never dialed) with their reason."""

    rows: int
    imported: int
    merged: int
    errors: int


async def _view(db: Connection, organization_id: str, campaign: Campaign) -> CampaignView:
    state: CampaignDispatchState = await campaigns.get_dispatch_state(
        db, organization_id=organization_id, campaign_id=campaign.id
    )
    return CampaignView(
        **campaign.model_dump(),
        rules=state.rules,
        paused=state.paused,
        paused_reason=state.paused_reason,
        started_at=state.started_at,
        finished_at=state.finished_at,
    )


@contextmanager
def _lifecycle() -> Iterator[None]:
    try:
        yield
    except InvalidCampaignTransition as exc:
        raise conflict(str(exc)) from None


@resource.post(
    "/campaigns",
    summary="Create a campaign",
    response=CampaignView,
    body=CampaignCreate,
    errors=(404,),
    idempotent=True,
)
async def create_campaign(call: ApiCall) -> CampaignView:
    """Create a DRAFT campaign; add recipients, then start it. 422 if `fromNumber` may not call out, or if the agent's
    transfer rules refuse a transfer node of the conversation path."""
    body = call.body_as(CampaignCreate)
    organization_id = call.caller.organization_id
    async with call.tenant() as db:
        from_number = body.from_number
        if from_number is not None:
            from_number = await checked_caller_id(db, organization_id=organization_id, number=from_number)
        campaign = await campaigns.create_campaign(
            db,
            organization_id=organization_id,
            batch_name=body.batch_name,
            agent_id=body.agent_id,
            conversation_path_id=body.conversation_path_id,
            first_sentence=body.first_sentence,
            task_prompt=body.task_prompt,
            post_call_summary=body.post_call_summary,
            start_date=body.start_date,
            start_time=body.start_time,
            call_start_time=body.call_start_time,
            call_end_time=body.call_end_time,
            rules=body.rules(from_number),
        )
        if campaign.conversation_path_id is not None:
            await refuse_unmakeable_transfers(
                db,
                organization_id=organization_id,
                agent_id=campaign.agent_id,
                conversation_path_id=campaign.conversation_path_id,
                field="conversationPathId",
            )
        return await _view(db, organization_id, campaign)


@resource.get("/campaigns", summary="List campaigns", response=Page[Campaign], query=PageQuery)
async def list_campaigns(call: ApiCall) -> Page[Campaign]:
    """The organization's campaigns, newest first, with progress, totalCalls and completedCalls."""
    query = call.query_as(PageQuery)
    async with call.tenant() as db:
        rows = await campaigns.list_campaigns(
            db, organization_id=call.caller.organization_id, limit=query.fetch_limit, before=query.position()
        )
    return to_page(Page[Campaign], rows, query)


@resource.get("/campaigns/{campaignId}", summary="Get a campaign", response=CampaignView)
async def get_campaign(call: ApiCall) -> CampaignView:
    """One campaign, its rules and where its dispatch stands."""
    organization_id = call.caller.organization_id
    async with call.tenant() as db:
        campaign_id = call.path["campaignId"]
        campaign = await campaigns.get_campaign(db, organization_id=organization_id, campaign_id=campaign_id)
        return await _view(db, organization_id, campaign)


@resource.delete("/campaigns/{campaignId}", summary="Delete a campaign")
async def delete_campaign(call: ApiCall) -> None:
    """Delete a campaign and its recipients; its calls stay in the call logs."""
    async with call.tenant() as db:
        await campaigns.delete_campaign(
            db, organization_id=call.caller.organization_id, campaign_id=call.path["campaignId"]
        )


@resource.post(
    "/campaigns/{campaignId}/recipients",
    summary="Add recipients",
    response=ImportResult,
    body=RecipientsImport,
    status=200,
)
async def import_recipients(call: ApiCall) -> ImportResult:
    """Add recipients: every number checked to E.164 and by the organization's dial policy (ERROR rows kept with
    their reason), duplicates merged."""
    body = call.body_as(RecipientsImport)
    async with call.tenant() as db:
        policy = await dial_policies.get_policy(db, organization_id=call.caller.organization_id)
    try:
        # Reading every number is CPU work (about 3 s for a megabyte of CSV): off the event loop the calls share.
        rows = await asyncio.to_thread(_new_recipients, body, policy)
    except RecipientsFileError as exc:
        raise unprocessable(str(exc), "csv") from None
    async with call.tenant() as db:
        summary: ImportSummary = await campaigns.import_recipients(
            db, organization_id=call.caller.organization_id, campaign_id=call.path["campaignId"], recipients=rows
        )
    return ImportResult(rows=summary.rows, imported=summary.imported, merged=summary.merged, errors=summary.errors)


def _new_recipients(body: RecipientsImport, policy: OutboundDialPolicy) -> list[NewRecipient]:
    """The recipients of an import's CSV text or list, each checked (ERROR rows with their reason)."""
    if body.csv is not None:
        return [
            row.recipient
            for row in read_recipients(io.StringIO(body.csv), policy=policy, default_region=body.default_region)
        ]
    return [
        make_recipient(
            f"recipients[{index}]",
            given.phone_number,
            name=given.name,
            notes=given.notes,
            variables=given.variables,
            policy=policy,
            default_region=body.default_region,
        )
        for index, given in enumerate(body.recipients or ())
    ]


@resource.post(
    "/campaigns/{campaignId}/start", summary="Start a campaign", response=CampaignView, status=200, errors=(409, 422)
)
async def start_campaign(call: ApiCall) -> CampaignView:
    """DRAFT -> PLANNED: dialing begins at startDate/startTime (or now), inside the window.

    409 if not a DRAFT; 422 if it has no valid recipient to call, or if its agent may not place calls (at `agentId`,
    as POST /v1/calls refuses it: not an ACTIVE OUTBOUND agent, or a configuration that cannot run).
    """
    organization_id = call.caller.organization_id
    with _lifecycle():
        async with call.tenant() as db:
            campaign = await campaigns.start_campaign(
                db, organization_id=organization_id, campaign_id=call.path["campaignId"]
            )
            try:  # the start is undone with the transaction
                await usable_agent(db, call.app[SETTINGS], organization_id=organization_id, agent_id=campaign.agent_id)
            except AgentUnavailable as exc:
                raise unprocessable(str(exc), "agentId") from None
            return await _view(db, organization_id, campaign)


@resource.post(
    "/campaigns/{campaignId}/pause",
    summary="Pause a campaign",
    response=CampaignView,
    body=PauseRequest,
    status=200,
    errors=(409,),
)
async def pause_campaign(call: ApiCall) -> CampaignView:
    """No new dials until resumed; calls in progress go on. 409 if the campaign has finished."""
    return await _set_paused(call, paused=True)


@resource.post(
    "/campaigns/{campaignId}/resume", summary="Resume a campaign", response=CampaignView, status=200, errors=(409,)
)
async def resume_campaign(call: ApiCall) -> CampaignView:
    """Dial again after a pause (by request, or for credits that have since been added)."""
    return await _set_paused(call, paused=False)


async def _set_paused(call: ApiCall, *, paused: bool) -> CampaignView:
    organization_id, campaign_id = call.caller.organization_id, call.path["campaignId"]
    async with call.tenant() as db:
        campaign = await campaigns.get_campaign(db, organization_id=organization_id, campaign_id=campaign_id)
        if campaign.status in {CampaignStatus.COMPLETED, CampaignStatus.STOPPED}:
            raise conflict(f"campaign {campaign_id} is {campaign.status}: it can no longer be paused or resumed")
        if paused:
            reason = call.body_as(PauseRequest).reason
            await campaigns.pause_campaign(db, organization_id=organization_id, campaign_id=campaign_id, reason=reason)
        else:
            await campaigns.resume_campaign(db, organization_id=organization_id, campaign_id=campaign_id)
        return await _view(db, organization_id, campaign)


@resource.post(
    "/campaigns/{campaignId}/stop", summary="Stop a campaign", response=CampaignView, status=200, errors=(409,)
)
async def stop_campaign(call: ApiCall) -> CampaignView:
    """Stop for good: nobody new is dialed, waiting recipients are CANCELED, calls in progress are still recorded."""
    organization_id = call.caller.organization_id
    with _lifecycle():
        async with call.tenant() as db:
            campaign = await campaigns.stop_campaign(
                db, organization_id=organization_id, campaign_id=call.path["campaignId"]
            )
            return await _view(db, organization_id, campaign)
