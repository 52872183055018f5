"""/v1/call-logs: the organization's call history, newest first, filtered as the dashboard filters it (read-only)."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field, model_validator

from engine.api.models import Id, ResponseModel, Timestamp
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from storage import call_logs, call_turns
from storage.call_logs import CallLogEntry
from storage.call_turns import CallTurn
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


class CallTurns(ResponseModel):
    """A call's turns in the order they were spoken."""

    data: list[CallTurn]


@resource.get("/call-logs/{callLogId}/turns", summary="List a call's turns", response=CallTurns)
async def list_call_turns(call: ApiCall) -> CallTurns:
    """Each finished turn of the call: who spoke, what was heard, when (ms from the call's start), where it was cut,
    and an agent turn's latency stages; written while the call runs."""
    organization_id, call_log_id = call.caller.organization_id, call.path["callLogId"]
    async with call.tenant() as db:
        await call_logs.get_call_log(db, organization_id=organization_id, call_log_id=call_log_id)  # 404 if not ours
        turns = await call_turns.list_turns(db, organization_id=organization_id, call_log_id=call_log_id)
    return CallTurns(data=turns)
