"""/v1/live-calls: the organization's calls in progress, and hanging one up."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.api.errors import ApiError, conflict
from engine.api.live_call_commands import command_holding_node, live_call
from engine.api.models import ResponseModel
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from engine.api.resources.call_logs import by_start
from engine.call.live_call_controls import HANG_UP
from engine.server.appkeys import LIVE_CALLS, TWILIO
from storage import call_logs
from storage.call_logs import CallLogEntry
from storage.enums import CallStatus

resource = Resource("Live calls", "Calls in progress right now, on any engine process, and hanging them up.")


class LiveCall(CallLogEntry):
    """A call in progress; `runsHere` says whether this engine process is the one running its media."""

    runs_here: bool


class HangUp(ResponseModel):
    """A hang-up that was accepted; the call log is finished as the call's media stream closes."""

    call_log_id: str
    ended_by: Literal["twilio", "engine"] = Field(
        description="twilio: Twilio was told to end the call; engine: the engine process holding the call ended it."
    )


@resource.get("/live-calls", summary="List calls in progress", response=Page[LiveCall], query=PageQuery)
async def list_live_calls(call: ApiCall) -> Page[LiveCall]:
    """The organization's IN_PROGRESS calls, newest first."""
    query = call.query_as(PageQuery)
    async with call.tenant() as db:
        rows = await call_logs.list_call_logs(
            db,
            organization_id=call.caller.organization_id,
            status=CallStatus.IN_PROGRESS,
            limit=query.fetch_limit,
            before=query.position(),
        )
    running = call.app[LIVE_CALLS]
    live = [LiveCall(**row.model_dump(), runs_here=row.id in running) for row in rows]
    return to_page(Page[LiveCall], live, query, by_start)


@resource.post(
    "/live-calls/{callLogId}/hangup",
    summary="Hang up a call in progress",
    response=HangUp,
    status=202,
    errors=(409, 502),
)
async def hang_up_live_call(call: ApiCall) -> HangUp:
    """End the call on the engine process that holds it, whichever that is, reached through the database.

    The holding process ends it through Twilio when it has credentials, else by closing the media stream. A call
    whose media stream no process holds yet is ended through Twilio. 409 if the call is no longer in progress, its
    process does not answer, or nothing can reach it; 502 if Twilio refuses.
    """
    log = await live_call(call)
    ended = await command_holding_node(call, log, HANG_UP, {"callSid": log.call_id})
    if ended is not None:
        ended_by = ended.get("endedBy")
        if ended_by not in ("twilio", "engine"):
            raise conflict(f"call {log.id}: the engine process holding it did not say how it was hung up")
        return HangUp(call_log_id=log.id, ended_by=ended_by)
    twilio = call.app.get(TWILIO)
    if twilio is not None:
        if await twilio.hang_up(log.call_id):
            return HangUp(call_log_id=log.id, ended_by="twilio")
        raise ApiError(502, "twilio_error", f"Twilio did not end call {log.call_id}; try again")
    raise conflict(
        f"call {log.id} is not yet held by any engine process and no Twilio account is configured here "
        "(TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN) to end it"
    )
