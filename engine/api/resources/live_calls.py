"""/v1/live-calls: the organization's calls in progress, and hanging one up."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field

from engine.api.errors import ApiError, conflict
from engine.api.models import ResponseModel
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from engine.api.resources.call_logs import by_start
from engine.call.control_channel import CONTROL, ControlChannelError
from engine.call.live_call_controls import HANG_UP, hang_up_here
from engine.server.appkeys import DATABASE, LIVE_CALLS, SETTINGS, TWILIO
from engine.workers.recovery import NODE_ID, NODE_TIMEOUT_KEY
from storage import call_logs, engine_nodes
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
    async with call.tenant() as db:
        log = await call_logs.get_call_log(
            db, organization_id=call.caller.organization_id, call_log_id=call.path["callLogId"]
        )
    if log.status is not CallStatus.IN_PROGRESS:
        raise conflict(f"call {log.id} is {log.status}, not in progress")
    app = call.app
    ended_by = await hang_up_here(app, log.id, log.call_id)
    if ended_by is not None:
        return HangUp(call_log_id=log.id, ended_by=ended_by)
    node = log.metadata.get("engineNode")
    if isinstance(node, str) and node != app[NODE_ID]:
        return await _hang_up_on(call, node, log.id, log.call_id)
    twilio = app.get(TWILIO)
    if twilio is not None:
        if await twilio.hang_up(log.call_id):
            return HangUp(call_log_id=log.id, ended_by="twilio")
        raise ApiError(502, "twilio_error", f"Twilio did not end call {log.call_id}; try again")
    raise conflict(
        f"call {log.id} is not yet held by any engine process and no Twilio account is configured here "
        "(TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN) to end it"
    )


async def _hang_up_on(call: ApiCall, node: str, call_log_id: str, call_sid: str) -> HangUp:
    """Ask the engine node holding the call to hang it up, through the command channel; 409 if it cannot."""
    app = call.app
    alive = await engine_nodes.list_alive_nodes(
        app[DATABASE].pool, now=datetime.now(UTC), node_timeout=app[NODE_TIMEOUT_KEY]
    )
    if node not in {n.id for n in alive}:
        raise conflict(
            f"call {call_log_id} ran on engine process {node}, which stopped; the call is being closed as failed"
        )
    try:
        ack = await app[CONTROL].send(
            node, call_log_id, HANG_UP, {"callSid": call_sid}, timeout=app[SETTINGS].control_timeout
        )
    except ControlChannelError as exc:
        raise conflict(f"call {call_log_id}: {exc}") from None
    ended_by = ack.result.get("endedBy")
    if not ack.applied or ended_by not in ("twilio", "engine"):
        raise conflict(ack.detail or f"call {call_log_id}: engine process {node} did not hang it up")
    return HangUp(call_log_id=call_log_id, ended_by=ended_by)
