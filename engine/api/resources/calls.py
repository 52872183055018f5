"""/v1/calls: place one outbound call for an OUTBOUND agent (engine.twilio.outbound_calls does the work)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints

from engine.api.errors import ApiError, invalid_reference, unprocessable
from engine.api.models import Id, RequestModel, ResponseModel, no_built_in_names
from engine.api.operations import ApiCall, Resource
from engine.server.appkeys import SETTINGS
from engine.twilio.outbound_calls import (
    AgentNotFound,
    AgentUnavailable,
    CallNotPlaced,
    CampaignNotFound,
    DestinationRefused,
    InvalidNumber,
    NoCredits,
    NoFreeSlot,
    NumberUnavailable,
    OnDoNotCallList,
    OutboundDeps,
    OutboundUnavailable,
    PlacementUnconfirmed,
    dialable_number,
    outbound_caller_id,
    place_call,
)
from engine.twilio.signature import public_base_url
from storage.records import Queryable

resource = Resource("Calls", "Placing outbound calls.")

SLOT_RETRY_AFTER_SECONDS = 5
"""Retry-After of a call refused for the plan's concurrent-call limit: calls end at no time we can predict."""

PhoneNumberText = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[^\x00]*$")]
VariableName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")]
VariableValue = Annotated[str, StringConstraints(max_length=2000, pattern=r"^[^\x00]*$")]


class CallCreate(RequestModel):
    """One outbound call: who calls (agent and caller-id number), whom, and variables for the agent's prompt."""

    agent_id: Id
    from_number: PhoneNumberText | None = Field(
        None,
        description="One of the organization's numbers, outbound ENABLED (E.164); default: the agent's number "
        "(Agent.phoneNumberId) if outbound ENABLED, else the organization's first outbound-enabled number (oldest "
        "first), as for a campaign without a fromNumber; 422 if there is none.",
    )
    to: PhoneNumberText = Field(description="The number to dial, E.164 (e.g. +14155550100).")
    variables: Annotated[dict[VariableName, VariableValue], AfterValidator(no_built_in_names)] = Field(
        default_factory=dict,
        max_length=100,
        description="Per-call values the prompt reads as {{name}}; `name` is also the CallLog's customer. A name "
        "like a built-in prompt variable (`now`, `today`, `customer`, `call`) is refused: rename it.",
    )
    campaign_id: Id | None = None


class PlacedCallResponse(ResponseModel):
    """A call Twilio accepted; follow it through /v1/call-logs/{callLogId} or the call.* webhooks."""

    call_log_id: str
    call_sid: str
    status: Literal["IN_PROGRESS"] = "IN_PROGRESS"


async def checked_caller_id(db: Queryable, *, organization_id: str, number: str) -> str:
    """`number` in E.164 if the organization may call out from it (outbound_caller_id), else 422 at `fromNumber`."""
    try:
        return await outbound_caller_id(db, organization_id=organization_id, number=number)
    except (InvalidNumber, NumberUnavailable) as exc:
        raise unprocessable(str(exc), "fromNumber") from None


@resource.post(
    "/calls",
    summary="Place an outbound call",
    response=PlacedCallResponse,
    body=CallCreate,
    status=201,
    errors=(402, 422, 429, 502, 503, 504),
    idempotent=True,
)
async def create_call(call: ApiCall) -> PlacedCallResponse:
    """Create the CallLog (IN_PROGRESS, OUTBOUND) and ask Twilio to dial.

    422 names the field at fault (an undialable number, a number of a kind or country the organization's dial policy
    refuses, such as premium-rate, a number on the do-not-call list, an agent that is not
    an ACTIVE OUTBOUND agent, a number that may not call out, no `fromNumber` and no default one), and is an
    `invalid_reference` for an `agentId` or `campaignId` that is not the organization's; 402 when the
    organization has no credits; 502 when Twilio refuses the call (its CallLog is then FAILED with Twilio's error);
    504 when Twilio did not answer the request, which it may have received: the CallLog named follows the call,
    adopting its CallSid when Twilio's callbacks or its Calls list show it, else ending FAILED `not_placed` (its
    credits returned, its call slot freed) once Twilio, asked, has no such call;
    503 when this engine has no Twilio account or public URL. When the organization already has as many calls in
    progress as its plan allows, the request waits a little for one to end (DIALTONE_CALL_SLOT_WAIT), then answers
    429 with Retry-After. With an `Idempotency-Key`, a retry never dials twice: it gets the first request's answer.
    """
    body = call.body_as(CallCreate)
    try:
        if body.from_number is not None:  # bad input is a 422 even where no call can be placed
            dialable_number("fromNumber", body.from_number)
        dialable_number("to", body.to)
        # Twilio reaches this engine at DIALTONE_PUBLIC_URL, else where this request came in (as for webhooks).
        deps = OutboundDeps.from_app(call.app, public_url=public_base_url(call.request, call.app[SETTINGS]))
        placed = await place_call(
            deps,
            organization_id=call.caller.organization_id,
            agent_id=body.agent_id,
            from_number=body.from_number,
            to=body.to,
            variables=body.variables,
            campaign_id=body.campaign_id,
            slot_wait=call.app[SETTINGS].call_slot_wait,
        )
    except InvalidNumber as exc:
        raise unprocessable(str(exc), exc.field) from None
    except (DestinationRefused, OnDoNotCallList) as exc:
        raise unprocessable(str(exc), "to") from None
    except AgentNotFound as exc:
        raise invalid_reference("agentId", str(exc)) from None
    except AgentUnavailable as exc:
        raise unprocessable(str(exc), "agentId") from None
    except NumberUnavailable as exc:
        raise unprocessable(str(exc), "fromNumber") from None
    except CampaignNotFound:
        raise invalid_reference("campaignId", f"campaign {body.campaign_id} not found in this organization") from None
    except NoCredits as exc:
        raise ApiError(402, "no_credits", str(exc)) from None
    except NoFreeSlot as exc:
        busy = ApiError(429, "concurrent_call_limit", str(exc))
        busy.headers["Retry-After"] = str(SLOT_RETRY_AFTER_SECONDS)
        raise busy from None
    except CallNotPlaced as exc:
        raise ApiError(502, "twilio_refused", str(exc)) from None
    except PlacementUnconfirmed as exc:
        raise ApiError(504, "twilio_unconfirmed", str(exc)) from None
    except OutboundUnavailable as exc:
        raise ApiError(503, "outbound_unavailable", str(exc)) from None
    return PlacedCallResponse(call_log_id=placed.call_log_id, call_sid=placed.call_sid)
