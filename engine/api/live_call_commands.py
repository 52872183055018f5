"""A /v1/live-calls control reaching the engine process that holds the call: this one directly, another through the
control channel (engine.call.control_channel), the handler the same either way (engine.call.live_call_controls)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import ChainMapProxy, web

from engine.api.errors import ApiError, conflict
from engine.api.operations import ApiCall
from engine.call.control_channel import CONTROL, ControlChannelError
from engine.call.live_call_controls import REFUSAL, WORK_SECONDS
from engine.server.appkeys import DATABASE, LIVE_CALLS, SETTINGS
from engine.workers.recovery import NODE_ID, NODE_TIMEOUT_KEY
from storage import call_logs, engine_nodes
from storage.call_logs import CallLog
from storage.enums import CallStatus

_REFUSAL_STATUS = {
    "forbidden": (403, "forbidden"),
    "twilio": (502, "twilio_error"),
    "twilio_unanswered": (504, "twilio_unconfirmed"),
}
"""The status of a command the call refused, by the kind its handler named (otherwise 409 conflict)."""


async def live_call(call: ApiCall) -> CallLog:
    """The path's call (`callLogId`) of the caller's organization (404 for none), in progress (409 otherwise)."""
    async with call.tenant() as db:
        log = await call_logs.get_call_log(
            db, organization_id=call.caller.organization_id, call_log_id=call.path["callLogId"]
        )
    if log.status is not CallStatus.IN_PROGRESS:
        raise conflict(f"call {log.id} is {log.status}, not in progress")
    return log


async def other_holding_node(app: web.Application | ChainMapProxy, log: CallLog) -> str | None:
    """The live engine process other than this one that holds the call's media stream; None when no process holds
    it yet. 409 when the process that held it stopped (recovery closes the call as failed)."""
    node = log.metadata.get("engineNode")
    if not isinstance(node, str) or node == app[NODE_ID]:
        return None
    alive = await engine_nodes.list_alive_nodes(app[DATABASE].pool, node_timeout=app[NODE_TIMEOUT_KEY])
    if node not in {n.id for n in alive}:
        raise conflict(f"call {log.id} ran on engine process {node}, which stopped; the call is being closed as failed")
    return node


async def command_holding_node(
    call: ApiCall, log: CallLog, command: str, args: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """Carry out `command` on the engine process holding the call and return what it answers; None when no engine
    process holds the call's media stream yet.

    ApiError when it was not carried out: 409 when the holding process stopped, does not answer, or no longer has
    the call, or the call refused the command (403 when the agent's rules forbid it, 502 when Twilio did not carry
    it out, 504 `twilio_unconfirmed` when Twilio did not answer in time, nor its record show the transfer made, and
    may still make it).
    """
    app = call.app
    if log.id in app[LIVE_CALLS]:
        ack = await app[CONTROL].carry_out_here(log.id, command, args)
    else:
        node = await other_holding_node(app, log)
        if node is None:
            return None
        try:
            timeout, work_seconds = app[SETTINGS].control_timeout, WORK_SECONDS.get(command, 0.0)
            ack = await app[CONTROL].send(node, log.id, command, args, timeout=timeout, work_seconds=work_seconds)
        except ControlChannelError as exc:
            raise conflict(f"call {log.id}: {exc}") from None
    if ack.applied:
        return ack.result
    detail = ack.detail or f"call {log.id}: the engine process holding it did not carry out {command!r}"
    status, code = _REFUSAL_STATUS.get(str(ack.result.get(REFUSAL)), (409, "conflict"))
    raise ApiError(status, code, detail)
