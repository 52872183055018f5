"""/v1/call-logs: the organization's call history, newest first, filtered as the dashboard filters it (read-only)."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field, model_validator

from engine.api.models import Id, Timestamp
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from storage import call_logs
from storage.call_logs import CallLogEntry
from storage.enums import CallStatus, CallType

resource = Resource("Call logs", "Every call, with its agent's name and type and its campaign's name. Read-only.")


class CallLogQuery(PageQuery):
    """Which calls to list; `since` and `until` bound the call's start time, inclusively."""

    call_type: CallType | None = Field(None, description="INBOUND or OUTBOUND.")
    status: CallStatus | None = Field(None, description="Only calls in this status.")
    agent_id: Id | None = Field(None, description="Only this agent's calls.")
    campaign_id: Id | None = Field(None, description="Only this campaign's calls.")
    since: Timestamp | None = Field(None, description="Calls that started at or after this time (ISO 8601).")
    until: Timestamp | None = Field(None, description="Calls that started at or before this time (ISO 8601).")

    @model_validator(mode="after")
    def _range(self) -> CallLogQuery:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since is after until: no call can match")
        return self


def by_start(entry: CallLogEntry) -> tuple[datetime, str]:
    """Call logs page by the call's start time."""
    return entry.timestamp, entry.id


@resource.get("/call-logs", summary="List call logs", response=Page[CallLogEntry], query=CallLogQuery)
async def list_call_logs(call: ApiCall) -> Page[CallLogEntry]:
    """The organization's calls, newest first."""
    query = call.query_as(CallLogQuery)
    async with call.tenant() as db:
        rows = await call_logs.list_call_logs(
            db,
            organization_id=call.caller.organization_id,
            call_type=query.call_type,
            status=query.status,
            agent_id=query.agent_id,
            campaign_id=query.campaign_id,
            since=query.since,
            until=query.until,
            limit=query.fetch_limit,
            before=query.position(),
        )
    return to_page(Page[CallLogEntry], rows, query, by_start)


@resource.get("/call-logs/{callLogId}", summary="Get a call log", response=CallLogEntry)
async def get_call_log(call: ApiCall) -> CallLogEntry:
    """One call, with its transcript, recording URL and metadata."""
    async with call.tenant() as db:
        return await call_logs.get_call_log_entry(
            db, organization_id=call.caller.organization_id, call_log_id=call.path["callLogId"]
        )
