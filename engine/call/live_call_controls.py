"""The live-call controls a node carries out on the calls it holds, whoever asked: this process's API or another's.

Hang-up goes through Twilio's REST API when the engine has credentials (Twilio then stops the stream), else the
node closes the call's media stream itself. Listen (engine.call.listen_relay) publishes the call's audio while the
asking process's lease lives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from aiohttp import ChainMapProxy, web

from engine.call.control_channel import Acknowledgement, Handler
from engine.call.listen_relay import LEASE_SECONDS, LISTEN, LISTEN_RELAY
from engine.server.appkeys import LIVE_CALLS, TWILIO
from storage.end_reasons import EndReason

HANG_UP = "hangup"
"""The command name of a hang-up."""

EndedBy = Literal["twilio", "engine"]


async def hang_up_here(app: web.Application | ChainMapProxy, call_log_id: str, call_sid: str | None) -> EndedBy | None:
    """End the call if this process holds it: through Twilio when it can, else by closing the stream; None if the
    call does not run here."""
    session = app[LIVE_CALLS].get(call_log_id)
    if session is None:
        return None
    twilio = app.get(TWILIO)
    if twilio is not None and call_sid and await twilio.hang_up(call_sid):
        return "twilio"
    session.end_from_outside(EndReason.API_HANGUP, completed=True)
    return "engine"


def live_call_handlers(app: web.Application) -> Mapping[str, Handler]:
    """The commands this node answers on the command channel, by name."""

    async def hang_up(call_log_id: str, args: Mapping[str, Any]) -> Acknowledgement:
        call_sid = args.get("callSid")
        ended_by = await hang_up_here(app, call_log_id, call_sid if isinstance(call_sid, str) else None)
        if ended_by is None:
            return Acknowledgement(applied=False, detail=f"call {call_log_id} no longer runs on that engine node")
        return Acknowledgement(applied=True, result={"endedBy": ended_by})

    async def listen(call_log_id: str, args: Mapping[str, Any]) -> Acknowledgement:
        lease, seconds = args.get("lease"), args.get("seconds", LEASE_SECONDS)
        if not isinstance(lease, str) or not lease or not isinstance(seconds, int | float):
            return Acknowledgement(applied=False, detail="listen needs a lease id and its seconds")
        session = app[LIVE_CALLS].get(call_log_id)
        if session is None:
            return Acknowledgement(applied=False, detail=f"call {call_log_id} no longer runs on that engine node")
        app[LISTEN_RELAY].lease(call_log_id, session.tap, lease, min(float(seconds), LEASE_SECONDS))
        return Acknowledgement(applied=True)

    return {HANG_UP: hang_up, LISTEN: listen}
