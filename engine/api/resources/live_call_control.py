"""/v1/live-calls/{id}/say, /message and /transfer: steering a call in progress on whichever engine process holds it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from config.phone import InvalidPhoneNumber, e164
from engine.api.errors import ApiError, conflict, unprocessable
from engine.api.live_call_commands import command_holding_node, live_call
from engine.api.models import RequestModel, ResponseModel
from engine.api.operations import ApiCall, Resource
from engine.api.resources.calls import PhoneNumberText
from engine.call.live_call_controls import MESSAGE, SAY, TRANSFER
from storage import dial_policies
from storage.call_logs import CallLog

resource = Resource(
    "Live call control",
    "Steer a call in progress: a line for the agent to say, a message for its model, a transfer within the agent's "
    "rules. Each reaches the engine process holding the call.",
)

_NOT_HELD = "is not yet held by any engine process (its media stream has not started); try again in a moment"


class SayRequest(RequestModel):
    """A line for the agent to say."""

    text: Annotated[str, StringConstraints(min_length=1, max_length=1000, pattern=r"\S")]
    interrupt: bool = Field(
        False, description="true: cut what the agent is saying and say the line now; false: say it after that."
    )


class SayAccepted(ResponseModel):
    """A line the agent says now or after its current reply, recorded as an agent turn."""

    call_log_id: str
    interrupted: bool = Field(description="Whether the agent was cut off to say it.")


class MessageRequest(RequestModel):
    """A message for the model's context."""

    content: Annotated[str, StringConstraints(min_length=1, max_length=4000, pattern=r"\S")]
    role: Literal["system", "user"] = Field("system", description="Who the message speaks as in the model's context.")


class MessageAccepted(ResponseModel):
    """A message the model has in its context from its next reply on."""

    call_log_id: str


class TransferRequest(RequestModel):
    """Where to hand the caller."""

    to: PhoneNumberText = Field(description="An E.164 number (e.g. +14155550100) the agent's transfer rules allow.")


class TransferAccepted(ResponseModel):
    """A transfer Twilio is making; the call ends TRANSFERRED as the caller leaves the stream."""

    call_log_id: str
    to: str


async def _command(call: ApiCall, log: CallLog, command: str, args: dict[str, object]) -> dict[str, object]:
    result = await command_holding_node(call, log, command, args)
    if result is None:
        raise conflict(f"call {log.id} {_NOT_HELD}")
    return dict(result)


@resource.post(
    "/live-calls/{callLogId}/say",
    summary="Have the agent say a line",
    response=SayAccepted,
    status=202,
    body=SayRequest,
    errors=(409,),
)
async def say_on_live_call(call: ApiCall) -> SayAccepted:
    """The agent says the line through the call's voice, as a turn of its own: now, cutting what it is saying, or
    after its current reply. 409 if the call is not in progress, is ending, or its engine process cannot be reached.
    """
    body = call.body_as(SayRequest)
    log = await live_call(call)
    result = await _command(call, log, SAY, {"text": body.text, "interrupt": body.interrupt})
    return SayAccepted(call_log_id=log.id, interrupted=result.get("interrupted") is True)


@resource.post(
    "/live-calls/{callLogId}/message",
    summary="Add a message to the model's context",
    response=MessageAccepted,
    status=202,
    body=MessageRequest,
    errors=(409,),
)
async def message_live_call(call: ApiCall) -> MessageAccepted:
    """The model has the message in its context from its next reply on (a chat model's history, or the
    speech-to-speech conversation). 409 for a model that takes no messages (a conversation path followed offline),
    a call not in progress or ending, or an engine process that cannot be reached."""
    body = call.body_as(MessageRequest)
    log = await live_call(call)
    await _command(call, log, MESSAGE, {"content": body.content, "role": body.role})
    return MessageAccepted(call_log_id=log.id)


@resource.post(
    "/live-calls/{callLogId}/transfer",
    summary="Transfer a call in progress",
    response=TransferAccepted,
    status=202,
    body=TransferRequest,
    errors=(403, 409, 502, 504),
)
async def transfer_live_call(call: ApiCall) -> TransferAccepted:
    """Hand the caller to a number the agent's transfer rules allow, the rules its model's `transfer_call` obeys:
    the agent stops speaking and Twilio dials it. 422 for a number that is not E.164; 403 when the rules, or the
    organization's dial policy (GET /v1/organization/dial-policy), do not allow it; 409 when the call is
    not in progress or ending, the engine process holding it has no Twilio account to transfer with, or an earlier
    transfer Twilio left unconfirmed was made after all (or its record cannot tell yet); 502 when
    Twilio did not make the transfer (the call goes on). Twilio's request unanswered in time, the transfer follows
    the rule of the agent's own: Twilio's record of the calls the transfer dialed is asked for 5 s more, and a
    dialed call is a transfer made (202); else 504 `twilio_unconfirmed`: Twilio may still make it, the call goes
    on meanwhile, and its end says whether it did (`endReason` `transferred`)."""
    body = call.body_as(TransferRequest)
    log = await live_call(call)
    try:
        to = e164(body.to)
    except InvalidPhoneNumber as exc:
        raise unprocessable(f"{exc}; give the number in E.164, with its country code (+14155550100)", "to") from None
    async with call.tenant() as db:
        policy = await dial_policies.get_policy(db, organization_id=call.caller.organization_id)
    refusal = policy.refusal(to)
    if refusal is not None:  # the engine holding the call refuses it too (engine.call.paid_transfer), less clearly
        raise ApiError(403, "forbidden", f"to: {refusal}")
    result = await _command(call, log, TRANSFER, {"to": to})
    return TransferAccepted(call_log_id=log.id, to=str(result.get("to", to)))
