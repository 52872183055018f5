"""The live-call controls a node carries out on the calls it holds, whoever asked: this process's API or another's.

Hang-up goes through Twilio's REST API when the engine has credentials (Twilio then stops the stream), else the
node closes the call's media stream itself. A line to say, a message for the model and a transfer go to the call's
session. A command the call cannot carry out is acknowledged as not applied, its result's `REFUSAL` saying why.
Listen (engine.call.listen_relay) publishes the call's audio while the asking process's lease lives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal

from aiohttp import ChainMapProxy, web

from engine.call.control_channel import Acknowledgement, Handler
from engine.call.driver import HANGUP_GRACE_SECONDS, ControlRefused
from engine.call.listen_relay import LEASE_SECONDS, LISTEN, LISTEN_RELAY
from engine.call.live_calls import LiveCall
from engine.call.twilio_control import (
    DIALED_LOOKUP_RETRY_SECONDS,
    UNANSWERED_TRANSFER_WAIT_SECONDS,
    TwilioRefused,
    TwilioUnanswered,
)
from engine.server.appkeys import LIVE_CALLS, TWILIO
from engine.twilio.rest import REQUEST_TIMEOUT_SECONDS
from pipelines.conversation.transfer_rules import Refusal
from storage.end_reasons import EndReason

HANG_UP: Final = "hangup"
"""The command name of a hang-up."""
SAY: Final = "say"
"""The command name of a line for the agent to say: args `text`, `interrupt`; result `interrupted`."""
MESSAGE: Final = "message"
"""The command name of a message for the model's context: args `content`, `role`."""
TRANSFER: Final = "transfer"
"""The command name of a transfer within the agent's rules: args `to`; result `to`, the number dialled."""

WORK_SECONDS: Final[Mapping[str, float]] = {
    # A call with a transfer request out: its answer, Twilio's record (asked again while it cannot be read), then the
    # `stop` it shows (CallSession.hang_up).
    HANG_UP: REQUEST_TIMEOUT_SECONDS + DIALED_LOOKUP_RETRY_SECONDS + HANGUP_GRACE_SECONDS,
    # Twilio's record of an earlier transfer left unconfirmed, Twilio's answer; unanswered, its record asked again,
    # or, once it left the stream, asked about the call's end.
    TRANSFER: 3 * REQUEST_TIMEOUT_SECONDS + UNANSWERED_TRANSFER_WAIT_SECONDS,
}
"""How long a command's own work may take on the node holding the call, by name, when it waits on a request to
Twilio's REST API: its sender waits that much longer for the acknowledgement (engine.call.control_channel), so that
it never answers as failed a hang-up or transfer Twilio then carries out. Other commands' work is quick."""

REFUSAL: Final = "refusal"
"""The result key of a command not applied because the call refused it: `Refused`. Without it, the call was gone."""
Refused = Literal["conflict", "forbidden", "twilio", "twilio_unanswered"]
"""conflict: the call cannot do it now (it is ending, its model takes no messages...); forbidden: the agent's rules
do not allow it (a transfer to a number they do not list); twilio: Twilio's REST API did not carry it out;
twilio_unanswered: Twilio's REST API did not answer in time, nor its record show it carried out (a transfer), and
may still carry it out."""

EndedBy = Literal["twilio", "engine"]

SessionCommand = Callable[[LiveCall, Mapping[str, Any]], Awaitable[Acknowledgement]]


async def hang_up_here(app: web.Application | ChainMapProxy, call_log_id: str, call_sid: str | None) -> EndedBy | None:
    """End the call if this process holds it: through Twilio when it can, else by closing the stream, or, while a
    transfer request of it waits for Twilio's answer or went unanswered, as CallSession.hang_up does; None if the
    call does not run here (or, without Twilio, is still being set up here)."""
    session = app[LIVE_CALLS].get(call_log_id)
    twilio = app.get(TWILIO)
    if session is None:
        if app[LIVE_CALLS].starting(call_log_id) and twilio is not None and call_sid and await twilio.hang_up(call_sid):
            return "twilio"  # its session, once set up, reads Twilio's stop
        return None
    if session.transfer_unsettled:  # Twilio's hang-up would cut the caller off from a transfer it makes
        await session.hang_up(EndReason.API_HANGUP)
        return "engine"
    if twilio is not None and call_sid and await twilio.hang_up(call_sid):
        return "twilio"
    session.end_from_outside(EndReason.API_HANGUP, completed=True)
    return "engine"


def refused(kind: Refused, detail: str) -> Acknowledgement:
    """A command the call refused, and why."""
    return Acknowledgement(applied=False, detail=detail, result={REFUSAL: kind})


def _gone(call_log_id: str) -> Acknowledgement:
    return Acknowledgement(applied=False, detail=f"call {call_log_id} no longer runs on that engine node")


def _on_session(app: web.Application, command: SessionCommand) -> Handler:
    """A handler carrying out `command` on the call's session here; a call that refuses says why."""

    async def handler(call_log_id: str, args: Mapping[str, Any]) -> Acknowledgement:
        session = app[LIVE_CALLS].get(call_log_id)
        if session is None:
            return _gone(call_log_id)
        try:
            return await command(session, args)
        except TwilioUnanswered as exc:
            return refused("twilio_unanswered", f"call {call_log_id}: {exc}")
        except TwilioRefused as exc:
            return refused("twilio", f"call {call_log_id}: {exc}")
        except ControlRefused as exc:
            return refused("conflict", f"call {call_log_id}: {exc}")

    return handler


async def _say(session: LiveCall, args: Mapping[str, Any]) -> Acknowledgement:
    interrupted = await session.say_line(str(args["text"]), interrupt=args.get("interrupt") is True)
    return Acknowledgement(applied=True, result={"interrupted": interrupted})


async def _message(session: LiveCall, args: Mapping[str, Any]) -> Acknowledgement:
    role = args.get("role")
    await session.add_message(str(args["content"]), "user" if role == "user" else "system")
    return Acknowledgement(applied=True)


async def _transfer(session: LiveCall, args: Mapping[str, Any]) -> Acknowledgement:
    verdict = await session.transfer_from_outside(str(args["to"]), "transferred through the API")
    if isinstance(verdict, Refusal):
        return refused("forbidden", verdict.message.removeprefix("error: "))
    return Acknowledgement(applied=True, result={"to": verdict.number})


def live_call_handlers(app: web.Application) -> Mapping[str, Handler]:
    """The commands this node answers on the command channel, by name."""

    async def hang_up(call_log_id: str, args: Mapping[str, Any]) -> Acknowledgement:
        call_sid = args.get("callSid")
        ended_by = await hang_up_here(app, call_log_id, call_sid if isinstance(call_sid, str) else None)
        if ended_by is None:
            return _gone(call_log_id)
        return Acknowledgement(applied=True, result={"endedBy": ended_by})

    async def listen(call_log_id: str, args: Mapping[str, Any]) -> Acknowledgement:
        lease, seconds = args.get("lease"), args.get("seconds", LEASE_SECONDS)
        if not isinstance(lease, str) or not lease or not isinstance(seconds, int | float):
            return Acknowledgement(applied=False, detail="listen needs a lease id and its seconds")
        session = app[LIVE_CALLS].get(call_log_id)
        if session is None:
            return _gone(call_log_id)
        app[LISTEN_RELAY].lease(call_log_id, session.tap, lease, min(float(seconds), LEASE_SECONDS))
        return Acknowledgement(applied=True)

    return {
        HANG_UP: hang_up,
        LISTEN: listen,
        SAY: _on_session(app, _say),
        MESSAGE: _on_session(app, _message),
        TRANSFER: _on_session(app, _transfer),
    }
