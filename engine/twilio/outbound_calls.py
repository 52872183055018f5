"""Placing one outbound call: check the agent, the number and the credits, open the CallLog, ask Twilio to dial.

`place_call` is the one way the API (`POST /v1/calls`) and the campaign dispatcher start a call. The CallLog
exists before Twilio is asked, so every dial attempt leaves a record; from then on the call ends in one of
these `metadata.endReason` values (`storage.end_reasons.EndReason`; a contract: retry policies map them):

- `busy`, `no-answer`, `canceled`, `failed`: Twilio's final CallStatus for a call nobody answered (MISSED, or
  FAILED for `failed`), written by the status callback;
- `voicemail_left`, `voicemail_hangup`: an answering machine took the call and the agent left its message or hung
  up (COMPLETED), see `engine.twilio.webhooks.handle_amd`;
- `twilio_refused`, `twilio_unreachable`: Twilio did not create the call (FAILED, with `twilioErrorCode` and
  `twilioErrorMessage`), and `place_call` raises CallNotPlaced;
- `not_placed`: a call (a campaign dial or an API call) whose process died before its request reached Twilio, or
  whose request Twilio never answered, and Twilio has no such call (FAILED; found out by listing Twilio's calls once
  the request can no longer be on its way, see engine/twilio/placement_lookup.py). A request Twilio did not answer
  raises PlacementUnconfirmed and leaves the CallLog IN_PROGRESS, waiting for the CallSid: the call's status
  callbacks, or that lookup, adopt it if Twilio created it. A placement cancelled while its request is with Twilio
  (the engine stopping) leaves it so too;
- otherwise whatever the media session ended with (`path_end`, `caller_hangup`, ...), as for inbound calls.

A number the organization's dial policy refuses (storage/dial_policies.py: premium-rate and the like, against toll
fraud) raises DestinationRefused before anything is written, whoever places the call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.helpers import ChainMapProxy

from config.agent import AgentConfiguration, AgentConfigurationError, parse_agent_configuration
from config.phone import InvalidPhoneNumber, e164
from config.settings import Settings
from engine.call.setup import provider_keys
from engine.server.appkeys import DATABASE, SETTINGS, TWILIO
from engine.twilio.rest import CallRefused, CallUnconfirmed, MachineDetection, TwilioCalls
from engine.twilio.webhooks import (
    AMD_PATH,
    STATUS_PATH,
    callback_url,
    media_stream_url,
    stream_twiml,
)
from pipelines.registry import PipelineUnavailable, check_pipeline
from storage import Pool, agents, call_logs, campaign_dispatch, dial_policies, do_not_call, phone_numbers
from storage.call_logs import CallLog
from storage.call_slots import ConcurrentCallLimitReached
from storage.campaign_dispatch import RECIPIENT_METADATA_KEY, Claim
from storage.end_reasons import EndReason
from storage.enums import AgentStatus, CallerType, CallType, PhoneNumberStatus
from storage.errors import InvalidReference, NotFound
from storage.organizations import InsufficientCredits
from storage.records import Queryable, transaction

log = logging.getLogger(__name__)

STATUS_EVENTS: Final = ("initiated", "ringing", "answered", "completed")
"""Every call-progress event Twilio can report; the status callback gets them all."""
MAX_VARIABLES: Final = 100
MAX_VARIABLE_CHARS: Final = 2000
SLOT_POLL_SECONDS: Final = (0.05, 0.1, 0.2, 0.5, 1.0)
"""How often a call waiting for a free slot looks again: soon at first, then once a second."""

__all__ = [
    "AgentNotFound",
    "AgentUnavailable",
    "CallNotPlaced",
    "CampaignNotFound",
    "DestinationRefused",
    "InvalidNumber",
    "InvalidVariables",
    "NoCredits",
    "NoFreeSlot",
    "NumberUnavailable",
    "OnDoNotCallList",
    "OutboundCallError",
    "OutboundDeps",
    "OutboundUnavailable",
    "PlacedCall",
    "checked_variables",
    "outbound_caller_id",
    "place_call",
    "usable_agent",
]


# --------------------------------------------------------------------------------------------------- errors


class OutboundCallError(Exception):
    """A call that was not placed; the message names what is wrong and what to do."""


class OutboundUnavailable(OutboundCallError):
    """This engine cannot place calls at all (no Twilio credentials, or no public URL for Twilio to call back)."""


class InvalidNumber(OutboundCallError, InvalidPhoneNumber):
    """A number that cannot be dialed (config.phone's rule), and the request `field` that gave it."""

    def __init__(self, field: str, number: str, reason: str) -> None:
        InvalidPhoneNumber.__init__(self, number, reason)
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {super().__str__()}"


class InvalidVariables(OutboundCallError):
    """A call's `variables` that break the limits (how many, how long, a name): they belong to whoever gave them, so
    the same variables are refused every time."""


class AgentUnavailable(OutboundCallError):
    """The agent does not exist in the organization, is not an ACTIVE OUTBOUND agent, or cannot run."""

    def __init__(self, agent_id: str, reason: str) -> None:
        super().__init__(f"Agent {agent_id} cannot place calls: {reason}")
        self.agent_id = agent_id
        self.reason = reason


class AgentNotFound(AgentUnavailable):
    """The agent does not exist in the organization (or is another organization's)."""


class NumberUnavailable(OutboundCallError):
    """The caller-id number is not one of the organization's, or may not place outbound calls (or none is given and
    there is no default)."""

    def __init__(self, number: str | None, reason: str) -> None:
        super().__init__(f"fromNumber {number}: {reason}" if number else f"fromNumber: {reason}")
        self.number = number
        self.reason = reason


class DestinationRefused(OutboundCallError):
    """The number to dial is of a kind or a country the organization's dial policy does not dial (storage.dial_policies,
    against toll fraud); `reason` names which, and who may allow it."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"to: {reason}")
        self.reason = reason


class OnDoNotCallList(OutboundCallError):
    """The number to dial is on the organization's do-not-call list (storage.do_not_call): it is never called."""


class CampaignNotFound(OutboundCallError):
    """The campaign named for the call is not the organization's."""


class NoCredits(OutboundCallError):
    """The organization's credit balance is used up."""


class NoFreeSlot(OutboundCallError):
    """The organization has as many calls in progress as its plan allows, and none ended within the wait."""

    def __init__(self, limit: int, waited: float) -> None:
        super().__init__(
            f"the organization already has {limit} calls in progress, the most its plan allows at once"
            + (f", and none ended within {waited:g} s" if waited > 0 else "")
            + "; try again when a call ends"
        )
        self.limit = limit
        self.waited = waited


class CallNotPlaced(OutboundCallError):
    """Twilio refused the call or could not be reached; its CallLog is FAILED with Twilio's code and message."""

    def __init__(self, call_log_id: str, code: int | None, message: str) -> None:
        what = f"Twilio refused the call (error {code}: {message})" if code is not None else message
        super().__init__(f"{what}; CallLog {call_log_id} is FAILED")
        self.call_log_id = call_log_id
        self.code = code
        self.message = message


class PlacementUnconfirmed(OutboundCallError):
    """Twilio did not answer the request to create the call, which it may have received: the CallLog stays
    IN_PROGRESS until the call's status callbacks, or Twilio's Calls list (engine/twilio/placement_lookup.py), tell
    whether it exists."""

    def __init__(self, call_log_id: str, message: str) -> None:
        super().__init__(
            f"{message}; the call may have been placed: CallLog {call_log_id} follows it (IN_PROGRESS until Twilio "
            "tells: its CallSid once found, or FAILED not_placed, its credits returned, if Twilio has no such call)"
        )
        self.call_log_id = call_log_id


# --------------------------------------------------------------------------------------------------- the call


@dataclass(frozen=True, slots=True)
class OutboundDeps:
    """What placing a call needs: the database, the settings, Twilio, and where Twilio reaches this engine."""

    pool: Pool
    settings: Settings
    twilio: TwilioCalls
    public_url: str
    """Base URL Twilio posts status callbacks to and opens the media stream on (e.g. `https://calls.example`)."""

    @classmethod
    def from_app(cls, app: web.Application | ChainMapProxy, *, public_url: str | None = None) -> OutboundDeps:
        """The running engine's resources; `public_url` defaults to the DIALTONE_PUBLIC_URL setting."""
        settings = app[SETTINGS]
        twilio = app.get(TWILIO)
        if twilio is None:
            raise OutboundUnavailable(
                "outbound calls need Twilio credentials: set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN"
            )
        base = public_url or settings.public_url
        if not base:
            raise OutboundUnavailable(
                "outbound calls need the URL Twilio reaches this engine at: set DIALTONE_PUBLIC_URL"
            )
        return cls(pool=app[DATABASE].pool, settings=settings, twilio=twilio, public_url=base.rstrip("/"))


@dataclass(frozen=True, slots=True)
class PlacedCall:
    """A call Twilio accepted: its CallLog (IN_PROGRESS until the call ends) and Twilio's CallSid."""

    call_log_id: str
    call_sid: str


def dialable_number(field: str, number: str) -> str:
    """The E.164 form of the international `number` given as `field`, or InvalidNumber with config.phone's reason."""
    try:
        return e164(number)
    except InvalidPhoneNumber as exc:
        raise InvalidNumber(field, exc.number, exc.reason) from None


def machine_detection(config: AgentConfiguration, callback: str) -> MachineDetection | None:
    """Twilio's answering-machine detection for the agent's voicemail settings, or None when it is off.

    Always asynchronous AMD: Twilio connects the call, and so our media stream, the moment it is answered and
    posts its verdict later. Synchronous AMD would hold the TwiML (the stream) back until detection ends,
    seconds of dead air for every person who answers; with async AMD a person hears the agent as soon as they
    speak, and only machines pay the wait. The mode follows the action: leaving a message needs the end of the
    greeting (`DetectMessageEnd`, the verdict comes with the beep); hanging up only needs to know it is a
    machine (`Enable`, the quickest verdict).
    """
    voicemail = config.voicemail
    if not voicemail.detect:
        return None
    mode = "DetectMessageEnd" if voicemail.action == "leave_message" else "Enable"
    return MachineDetection(mode=mode, callback_url=callback, timeout_seconds=voicemail.detection_timeout_seconds)


async def place_call(
    deps: OutboundDeps,
    *,
    organization_id: str,
    agent_id: str,
    from_number: str | None,
    to: str,
    variables: Mapping[str, str] | None = None,
    campaign_id: str | None = None,
    claim: Claim | None = None,
    slot_wait: float = 0.0,
) -> PlacedCall:
    """Dial `to` from the organization's number `from_number` (None: the default caller id, see
    storage.phone_numbers.default_caller_id) for an ACTIVE OUTBOUND agent.

    The CallLog is created IN_PROGRESS first (per-call `variables` in metadata.variables, `campaign_id` as its
    campaignId), taking one of the organization's call slots, then Twilio is asked for the call. With every slot
    of the plan taken, it waits up to `slot_wait` seconds for one to free. Raises InvalidNumber, DestinationRefused,
    OnDoNotCallList, AgentUnavailable, NumberUnavailable, CampaignNotFound, NoCredits or NoFreeSlot before anything
    is written; for a campaign's `claim`, storage.campaign_dispatch's LeaseLost or CalleeInCall (the organization is
    in a call with `to` already) before anything is written too; CallNotPlaced (CallLog FAILED) if Twilio refuses.
    """
    callee = dialable_number("to", to)
    per_call = checked_variables(variables)
    pool = deps.pool
    policy = await dial_policies.get_policy(pool, organization_id=organization_id)
    refusal = policy.refusal(callee)
    if refusal is not None:
        raise DestinationRefused(refusal)
    listed = await do_not_call.listed_entry(pool, organization_id=organization_id, phone_number=callee)
    if listed is not None:
        raise OnDoNotCallList(f"to: {do_not_call.describe(listed)}; it is never called")
    if from_number is not None:
        caller_id = await outbound_caller_id(pool, organization_id=organization_id, number=from_number)
        config = await usable_agent(deps.pool, deps.settings, organization_id=organization_id, agent_id=agent_id)
    else:
        config = await usable_agent(deps.pool, deps.settings, organization_id=organization_id, agent_id=agent_id)
        default = await phone_numbers.default_caller_id(pool, organization_id=organization_id, agent_id=agent_id)
        if default is None:
            raise NumberUnavailable(
                None,
                f"not given, and neither agent {agent_id} nor its organization has a number with outbound calls "
                "ENABLED; set fromNumber, or enable outbound calls on the agent's number or another of the "
                "organization's numbers",
            )
        caller_id = await outbound_caller_id(pool, organization_id=organization_id, number=default)

    metadata: dict[str, Any] = {"direction": "outbound", "from": caller_id, "variables": per_call}
    if claim is not None:
        metadata[RECIPIENT_METADATA_KEY] = claim.recipient_id
    waited = 0.0
    for pause in _slot_polls(slot_wait):
        try:
            call_log = await _open_call_log(
                deps,
                organization_id=organization_id,
                agent_id=agent_id,
                campaign_id=campaign_id,
                customer=per_call.get("name") or None,
                callee=callee,
                metadata=metadata,
                claim=claim,
            )
            break
        except ConcurrentCallLimitReached as exc:
            if pause is None:
                raise NoFreeSlot(exc.limit, waited) from None
            await asyncio.sleep(pause)
            waited += pause

    base = deps.public_url.rstrip("/")
    try:
        call_sid = await deps.twilio.place_call(
            to=callee,
            from_=caller_id,
            twiml=stream_twiml(media_stream_url(base), call_log.id),
            status_callback=callback_url(base, STATUS_PATH, call_log.id),
            status_events=STATUS_EVENTS,
            ring_timeout_seconds=config.ring_timeout_seconds,
            machine_detection=machine_detection(config, callback_url(base, AMD_PATH, call_log.id)),
        )
    except CallUnconfirmed as exc:
        # Closing the CallLog now could hide a call that rings: it waits for Twilio's word instead.
        log.warning("outbound call %s to %s unconfirmed: %s", call_log.id, _masked(callee), _masked_in(exc, callee))
        raise PlacementUnconfirmed(call_log.id, str(exc)) from None
    except CallRefused as exc:
        reason = EndReason.TWILIO_REFUSED if exc.code is not None else EndReason.TWILIO_UNREACHABLE
        await call_logs.fail_unstarted(
            pool, call_log, reason, metadata={"twilioErrorCode": exc.code, "twilioErrorMessage": exc.message}
        )
        log.warning("outbound call %s to %s not placed: %s", call_log.id, _masked(callee), _masked_in(exc, callee))
        raise CallNotPlaced(call_log.id, exc.code, exc.message) from None
    except asyncio.CancelledError:
        # The request may have reached Twilio, as an unanswered one may: failing the CallLog now would leave the call
        # Twilio makes to a FAILED row whose stream is refused. It waits, IN_PROGRESS, for Twilio's word instead.
        log.warning("outbound call %s to %s interrupted while Twilio was asked", call_log.id, _masked(callee))
        raise
    # A status callback may have stored the CallSid already (it knows the CallLog id from its URL).
    await call_logs.adopt_call_id(pool, call_log_id=call_log.id, call_id=call_sid)
    log.info("outbound call %s to %s placed (CallLog %s)", call_sid, _masked(callee), call_log.id)
    return PlacedCall(call_log_id=call_log.id, call_sid=call_sid)


def _slot_polls(wait: float) -> list[float | None]:
    """The pauses between tries for a call slot within `wait` seconds, then None: no more tries."""
    pauses: list[float | None] = []
    left = wait
    for step in (*SLOT_POLL_SECONDS, *[SLOT_POLL_SECONDS[-1]] * int(wait)):
        if left <= 0:
            break
        pause = min(step, left)
        pauses.append(pause)
        left -= pause
    return [*pauses, None]


async def _open_call_log(
    deps: OutboundDeps,
    *,
    organization_id: str,
    agent_id: str,
    campaign_id: str | None,
    customer: str | None,
    callee: str,
    metadata: dict[str, Any],
    claim: Claim | None,
) -> CallLog:
    """The call's IN_PROGRESS CallLog, its call slot taken and its first minute's credits reserved; for a campaign's
    `claim`, only while it holds its lease (LeaseLost otherwise) and its number is in no other call of the
    organization (CalleeInCall otherwise)."""
    try:
        async with transaction(deps.pool) as conn:
            if claim is not None:
                await campaign_dispatch.hold_lease(conn, claim)
                await campaign_dispatch.hold_callee(conn, claim)
            return await call_logs.create_call_log(
                conn,
                organization_id=organization_id,
                call_type=CallType.OUTBOUND,
                call_id=call_logs.pending_call_id(),
                agent_id=agent_id,
                campaign_id=campaign_id,
                customer=customer,
                phone_number=callee,
                metadata=metadata,
                credit_rates=deps.settings.credit_rates,
                call_limits=deps.settings.concurrent_call_limits,
            )
    except InvalidReference as exc:
        raise CampaignNotFound(str(exc)) from None
    except InsufficientCredits as exc:
        raise NoCredits(
            f"organization {organization_id} has {exc.balance} credits, not enough for the first minute of a call "
            f"({exc.amount}); add credits to place calls"
        ) from None


def checked_variables(variables: Mapping[str, str] | None) -> dict[str, str]:
    """A call's per-call variables as a dict, or InvalidVariables naming the first one over the limits.

    The one rule for what a call may carry: `place_call` applies it, and a campaign's import applies it to each
    recipient's variables (storage.campaigns.recipient_variables), so a recipient it would refuse is never queued.
    """
    if variables is None:
        return {}
    if len(variables) > MAX_VARIABLES:
        raise InvalidVariables(f"variables: at most {MAX_VARIABLES} per call, got {len(variables)}")
    checked: dict[str, str] = {}
    for name, value in variables.items():
        if not isinstance(name, str) or not name.strip():
            raise InvalidVariables(f"variables: names must be non-empty strings, got {name!r}")
        if not isinstance(value, str):
            raise InvalidVariables(f"variables.{name}: must be a string, got {type(value).__name__}")
        if len(value) > MAX_VARIABLE_CHARS:
            raise InvalidVariables(f"variables.{name}: at most {MAX_VARIABLE_CHARS} characters, got {len(value):,}")
        checked[name] = value
    return checked


async def outbound_caller_id(db: Queryable, *, organization_id: str, number: str) -> str:
    """`number` in E.164 if it may be the caller id of the organization's outbound calls, campaigns' included.

    The one rule for a caller id: one of the organization's own numbers with outbound calls ENABLED. Raises
    InvalidNumber (field `from_number`) or NumberUnavailable.
    """
    caller_id = dialable_number("fromNumber", number)
    found = await phone_numbers.find_by_number(db, number=caller_id)
    if found is None or found.organization_id != organization_id:
        raise NumberUnavailable(caller_id, "not a phone number of this organization")
    if found.outbound_status != PhoneNumberStatus.ENABLED:
        raise NumberUnavailable(caller_id, "outbound calls are disabled for this number; enable them first")
    return caller_id


async def usable_agent(db: Queryable, settings: Settings, *, organization_id: str, agent_id: str) -> AgentConfiguration:
    """The agent's configuration, if it may place calls: one of the organization's, an ACTIVE OUTBOUND agent whose
    configuration runs with this engine's keys. AgentNotFound or AgentUnavailable (naming why) otherwise.

    The one rule for an agent that calls out: a call placed through the API, a campaign's start, each of its dials.
    """
    try:
        bundle = await agents.load_agent_bundle(db, organization_id=organization_id, agent_id=agent_id)
    except NotFound:
        raise AgentNotFound(agent_id, "no such agent in this organization") from None
    agent = bundle.agent
    if agent.caller_type != CallerType.OUTBOUND:
        raise AgentUnavailable(agent_id, f"it is an {agent.caller_type} agent; only OUTBOUND agents place calls")
    if agent.status != AgentStatus.ACTIVE:
        raise AgentUnavailable(agent_id, "it is INACTIVE; activate it first")
    try:
        config = parse_agent_configuration(agent.configuration)
        check_pipeline(config, provider_keys(settings, bundle))
    except (AgentConfigurationError, PipelineUnavailable) as exc:
        raise AgentUnavailable(agent_id, f"its configuration cannot run: {exc}") from None
    return config


def _masked(number: str) -> str:
    # Logs keep enough to tell calls apart, not a callee's full number.
    return number[:-4] + "****" if len(number) > 6 else "****"


def _masked_in(error: Exception, number: str) -> str:
    """The error's text with `number` masked: Twilio's messages repeat the number dialed ("not authorized to call
    +1...")."""
    return str(error).replace(number, _masked(number))
