"""Outbound calls end to end: `place_call` → the twilio SDK → a fake Twilio that dials, rings and answers by opening
the real engine's media stream; status and answering-machine callbacks move the CallLog. Real PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from twilio.request_validator import RequestValidator

from config.agent import parse_agent_configuration
from config.settings import load_settings
from engine.server.appkeys import SETTINGS
from engine.simulator import Pause, Say
from engine.twilio.outbound_calls import (
    AgentUnavailable,
    CallNotPlaced,
    CampaignNotFound,
    InvalidNumber,
    NoCredits,
    NumberUnavailable,
    OutboundDeps,
    OutboundUnavailable,
    PlacedCall,
    place_call,
)
from engine.twilio.rest import TwilioCalls
from storage import agents, call_logs, conversation_paths, organizations, phone_numbers
from storage.call_logs import CallLog
from storage.demo import DEMO_PATH_EDGES, DEMO_PATH_NODES
from storage.enums import AgentStatus, CallerType, CallStatus, CallType, PhoneNumberStatus, Plan
from storage.events import create_event
from tests.engine_server import running_engine
from tests.fakes.twilio import Answer, Busy, Fail, FakeCall, FakeTwilio, Machine, NoAnswer, Refuse

OFFLINE = {"stt": {"provider": "sphinx"}, "llm": {"provider": "conversation_path"}, "tts": {"provider": "espeak"}}
_numbers = itertools.count(100)


def callee() -> str:
    """A fresh destination number: New York's +1 646 555 range (fictional, yet a fixed-line-or-mobile number by the
    numbering plan, so the dial policy lets it be dialed as it would a customer's)."""
    return f"+1646555{next(_numbers):04d}"


@pytest.fixture(scope="module")
async def twilio() -> AsyncIterator[FakeTwilio]:
    """The fake Twilio account every test of this module dials through."""
    async with FakeTwilio() as fake:
        yield fake


@pytest.fixture(scope="module")
async def engine(db_url: str, twilio: FakeTwilio) -> AsyncIterator[str]:
    """The engine on loopback with the fake's credentials: it checks the fake's signatures, and updates calls on it."""
    async with running_engine(
        db_url,
        twilio_auth_token=twilio.auth_token,
        twilio_account_sid=twilio.account_sid,
        twilio_api_base=twilio.api_base,
    ) as base:
        yield base


@pytest.fixture(scope="module")
async def deps(db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, engine: str) -> AsyncIterator[OutboundDeps]:
    """What place_call needs, built outside the app as a campaign dispatcher or a script would."""
    settings = load_settings(
        database_url=db_url,
        twilio_auth_token=twilio.auth_token,
        twilio_account_sid=twilio.account_sid,
        twilio_api_base=twilio.api_base,
    )
    client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
    try:
        yield OutboundDeps(pool=pool, settings=settings, twilio=client, public_url=engine)
    finally:
        await client.close()


@pytest.fixture(scope="module")
async def organization_id(pool: asyncpg.Pool) -> str:
    """An organization with credits."""
    return (await organizations.create_organization(pool, name="Outbound", slug="outbound", credits=500)).id


@pytest.fixture(scope="module")
async def caller_id(pool: asyncpg.Pool, organization_id: str) -> str:
    """The organization's number that may call out."""
    number = await phone_numbers.create_phone_number(pool, organization_id=organization_id, phone_number="+15550199001")
    return number.phone_number


async def make_agent(
    pool: asyncpg.Pool,
    organization_id: str,
    *,
    caller_type: CallerType = CallerType.OUTBOUND,
    status: AgentStatus = AgentStatus.ACTIVE,
    **behaviour: Any,
) -> str:
    """An offline agent following the demo booking path; returns its id."""
    agent = await agents.create_agent(
        pool,
        organization_id=organization_id,
        name="caller",
        status=status,
        caller_type=caller_type,
        configuration=parse_agent_configuration({**OFFLINE, **behaviour}).to_json(),
    )
    path = await conversation_paths.create_conversation_path(
        pool, organization_id=organization_id, name="path", nodes=DEMO_PATH_NODES, edges=DEMO_PATH_EDGES
    )
    await agents.link_conversation_path(
        pool, organization_id=organization_id, agent_id=agent.id, conversation_path_id=path.id
    )
    return agent.id


async def finished_log(pool: asyncpg.Pool, call_log_id: str) -> asyncpg.Record:
    """The CallLog once it has left IN_PROGRESS."""
    for _ in range(300):
        row = await call_log_row(pool, call_log_id)
        if row["status"] != "IN_PROGRESS":
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"CallLog {call_log_id} never finished")


async def call_log_row(pool: asyncpg.Pool, call_log_id: str) -> asyncpg.Record:
    """The CallLog as it is now."""
    row = await pool.fetchrow('SELECT * FROM "CallLog" WHERE "id" = $1', call_log_id)
    assert row is not None
    return row


async def call_log_count(pool: asyncpg.Pool, organization_id: str) -> int:
    """How many CallLogs the organization has."""
    count: int = await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "organizationId" = $1', organization_id)
    return count


# ------------------------------------------------------------------------------------------------ answered


async def test_an_answered_call_runs_a_real_session_and_ends_completed_with_its_turns(
    deps: OutboundDeps, twilio: FakeTwilio, pool: asyncpg.Pool, organization_id: str, caller_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, firstSentence="Hi, this is the clinic.", ringTimeoutSeconds=25)
    to = callee()
    twilio.behave(to, Answer(greeting="Hello?", script=[Say("I would like to book an appointment")]))

    placed = await place_call(
        deps,
        organization_id=organization_id,
        agent_id=agent_id,
        from_number=caller_id,
        to=to,
        variables={"name": "Ann"},
    )

    assert isinstance(placed, PlacedCall) and placed.call_sid.startswith("CA")
    call = await twilio.finished(placed.call_sid)
    log = await finished_log(pool, placed.call_log_id)
    assert log["status"] == "COMPLETED", log["metadata"]
    assert (log["callType"], log["callId"], log["phoneNumber"]) == ("OUTBOUND", placed.call_sid, to)
    assert log["metadata"]["variables"] == {"name": "Ann"}
    assert log["metadata"]["from"] == caller_id
    turns = await pool.fetch('SELECT * FROM "CallTurn" WHERE "callLogId" = $1 ORDER BY "index"', log["id"])
    assert {"agent", "caller"} <= {t["speaker"] for t in turns}
    assert any("book" in t["text"] for t in turns if t["speaker"] == "caller")
    # What Twilio was asked for: the media stream naming the CallLog, every status event, the agent's ring timeout.
    assert call.param("Timeout") == "25"
    assert call.params["StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
    assert call.param("StatusCallback") == f"{deps.public_url}/twilio/status?callLogId={log['id']}"
    assert call.stream is not None and call.stream.custom_parameters == {"callLogId": log["id"]}
    assert call.param("MachineDetection") is None
    assert call.statuses_posted == ["initiated", "ringing", "in-progress", "completed"]
    assert set(call.callback_responses) == {204}


# ------------------------------------------------------------------------------------------------ unanswered


@pytest.mark.parametrize(
    ("behaviour", "status", "end_reason"),
    [
        (Busy(), "MISSED", "busy"),
        (NoAnswer(), "MISSED", "no-answer"),
        (Fail(), "FAILED", "failed"),
    ],
)
async def test_a_call_nobody_answers_ends_with_twilios_status_as_its_reason(
    *,
    deps: OutboundDeps,
    twilio: FakeTwilio,
    pool: asyncpg.Pool,
    organization_id: str,
    caller_id: str,
    behaviour: Any,
    status: str,
    end_reason: str,
) -> None:
    agent_id = await make_agent(pool, organization_id)
    to = callee()
    twilio.behave(to, behaviour)

    placed = await place_call(deps, organization_id=organization_id, agent_id=agent_id, from_number=caller_id, to=to)

    await twilio.finished(placed.call_sid)
    log = await finished_log(pool, placed.call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == (status, end_reason)
    assert log["metadata"]["twilioStatus"] == end_reason
    assert log["metadata"]["sipResponseCode"]
    assert log["duration"] == 0


async def test_a_call_twilio_refuses_to_create_ends_failed_with_twilios_error(
    deps: OutboundDeps, twilio: FakeTwilio, pool: asyncpg.Pool, organization_id: str, caller_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id)
    to = callee()
    twilio.behave(to, Refuse(code=21215, message="Account not authorized to call this number."))

    with pytest.raises(CallNotPlaced) as refused:
        await place_call(deps, organization_id=organization_id, agent_id=agent_id, from_number=caller_id, to=to)

    assert refused.value.code == 21215
    log = await call_log_row(pool, refused.value.call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "twilio_refused")
    assert log["metadata"]["twilioErrorCode"] == 21215
    assert log["metadata"]["twilioErrorMessage"].endswith("Account not authorized to call this number.")
    assert twilio.creates[to] == 1


async def test_the_log_of_a_refused_call_masks_the_number_twilios_message_repeats(  # noqa: PLR0917 (fixtures)
    deps: OutboundDeps,
    twilio: FakeTwilio,
    pool: asyncpg.Pool,
    organization_id: str,
    caller_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent_id = await make_agent(pool, organization_id)
    to = callee()
    twilio.behave(
        to,
        Refuse(
            code=21215,
            message=f"Account not authorized to call {to}. Perhaps you need to enable some international permissions.",
        ),
    )
    caplog.set_level("DEBUG")

    with pytest.raises(CallNotPlaced):
        await place_call(deps, organization_id=organization_id, agent_id=agent_id, from_number=caller_id, to=to)

    assert f"Account not authorized to call {to[:-4]}****." in caplog.text
    assert to not in caplog.text


async def test_twilio_unreachable_ends_the_call_log_failed_and_says_so(
    deps: OutboundDeps, pool: asyncpg.Pool, organization_id: str, caller_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id)
    nowhere = TwilioCalls("AC" + "0" * 32, "token", api_base="http://127.0.0.1:9")  # the discard port: refused
    try:
        with pytest.raises(CallNotPlaced) as refused:
            await place_call(
                OutboundDeps(pool=deps.pool, settings=deps.settings, twilio=nowhere, public_url=deps.public_url),
                organization_id=organization_id,
                agent_id=agent_id,
                from_number=caller_id,
                to=callee(),
            )
    finally:
        await nowhere.close()
    assert refused.value.code is None
    log = await call_log_row(pool, refused.value.call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "twilio_unreachable")


async def test_a_placement_cancelled_while_twilio_has_the_request_is_the_call_twilio_makes(
    deps: OutboundDeps, twilio: FakeTwilio, pool: asyncpg.Pool
) -> None:
    # The engine stops mid-request; Twilio had the request and makes the call, its CallSid arriving by callback.
    org = await organizations.create_organization(pool, name="Interrupted", slug="interrupted", credits=10)
    caller = await phone_numbers.create_phone_number(pool, organization_id=org.id, phone_number="+15550199006")
    await create_event(pool, organization_id=org.id, name="call.started", webhook_url="https://hooks.example.com/s")
    await create_event(pool, organization_id=org.id, name="call.ended", webhook_url="https://hooks.example.com/e")
    agent_id = await make_agent(pool, org.id, firstSentence="Hi, this is the clinic.")
    to = callee()
    twilio.behave(to, Answer(greeting="Hello?", script=[Say("I would like to book an appointment")]))
    held = twilio.hold_create(to)
    placing = asyncio.create_task(
        place_call(deps, organization_id=org.id, agent_id=agent_id, from_number=caller.phone_number, to=to)
    )
    await asyncio.wait_for(held.arrived.wait(), 10)
    placing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await placing
    [call_log_id] = await pool.fetchval('SELECT array_agg("id") FROM "CallLog" WHERE "phoneNumber" = $1', to)

    held.release(create=True)
    await asyncio.wait_for(held.settled.wait(), 10)
    [call] = twilio.calls_to(to)
    await twilio.finished(call.sid)
    log = await finished_log(pool, call_log_id)

    assert (log["callId"], log["status"]) == (call.sid, "COMPLETED"), log["metadata"]
    turns = await pool.fetch('SELECT "speaker", "text" FROM "CallTurn" WHERE "callLogId" = $1', call_log_id)
    assert any("book" in turn["text"] for turn in turns if turn["speaker"] == "caller")  # the callee had the agent
    charged = log["metadata"]["minutesCharged"]
    assert charged >= 1
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org.id) == 10 - charged
    events = await pool.fetch(
        """
        SELECT "event" FROM "WebhookDelivery" WHERE "payload"->'data'->>'callLogId' = $1 ORDER BY "event"
        """,
        call_log_id,
    )
    assert [event["event"] for event in events] == ["call.ended", "call.started"]


# ------------------------------------------------------------------------------------------------ voicemail


async def _machine_answers_for_sam(  # noqa: PLR0917 (fixtures)
    deps: OutboundDeps,
    twilio: FakeTwilio,
    pool: asyncpg.Pool,
    organization_id: str,
    caller_id: str,
    message: str,
    **behaviour: Any,
) -> tuple[PlacedCall, FakeCall]:
    """Call Sam (variable `name`) for an agent leaving `message`; a machine answers and beeps. The finished call."""
    agent_id = await make_agent(
        pool, organization_id, voicemail={"detect": True, "action": "leave_message", "message": message}, **behaviour
    )
    to = callee()
    twilio.behave(to, Machine(answered_by="machine_end_beep"))
    placed = await place_call(
        deps,
        organization_id=organization_id,
        agent_id=agent_id,
        from_number=caller_id,
        to=to,
        variables={"name": "Sam"},
    )
    return placed, await twilio.finished(placed.call_sid)


async def test_a_machine_gets_the_voicemail_message_after_the_beep(
    deps: OutboundDeps, twilio: FakeTwilio, pool: asyncpg.Pool, organization_id: str, caller_id: str
) -> None:
    message = "Hi {{name}}, this is the clinic calling about your appointment. Please call us back."
    placed, call = await _machine_answers_for_sam(deps, twilio, pool, organization_id, caller_id, message)

    assert (call.param("MachineDetection"), call.param("AsyncAmd")) == ("DetectMessageEnd", "true")
    assert call.param("AsyncAmdStatusCallback") == f"{deps.public_url}/twilio/amd?callLogId={placed.call_log_id}"
    assert call.spoken_after_update == [
        "Hi Sam, this is the clinic calling about your appointment. Please call us back."
    ]
    assert call.update_twiml is not None and "<Hangup />" in call.update_twiml
    log = await finished_log(pool, placed.call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "voicemail_left")
    assert log["metadata"]["answeredBy"] == "machine_end_beep"


async def test_the_voicemail_message_is_filled_like_the_first_sentence_from_the_agents_and_the_calls_variables(
    deps: OutboundDeps, twilio: FakeTwilio, pool: asyncpg.Pool, organization_id: str, caller_id: str
) -> None:
    message = "Hi {{customer.name}}, {{clinic}} calling on {{call.direction}} business. Please call us back."
    _, call = await _machine_answers_for_sam(
        deps, twilio, pool, organization_id, caller_id, message, variables={"clinic": "Elm Street Clinic"}
    )

    assert call.spoken_after_update == ["Hi Sam, Elm Street Clinic calling on outbound business. Please call us back."]


async def test_a_machine_is_hung_up_on_when_the_agent_leaves_no_message(
    deps: OutboundDeps, twilio: FakeTwilio, pool: asyncpg.Pool, organization_id: str, caller_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, voicemail={"detect": True, "action": "hang_up"})
    to = callee()
    twilio.behave(to, Machine(answered_by="machine_start"))

    placed = await place_call(deps, organization_id=organization_id, agent_id=agent_id, from_number=caller_id, to=to)

    call = await twilio.finished(placed.call_sid)
    assert call.param("MachineDetection") == "Enable"
    assert call.updates == [{"Status": "completed"}]
    assert call.spoken_after_update == []
    log = await finished_log(pool, placed.call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "voicemail_hangup")
    assert log["metadata"]["answeredBy"] == "machine_start"


async def test_a_person_answering_with_detection_on_talks_to_the_agent(
    deps: OutboundDeps, twilio: FakeTwilio, pool: asyncpg.Pool, organization_id: str, caller_id: str
) -> None:
    agent_id = await make_agent(
        pool, organization_id, voicemail={"detect": True, "action": "leave_message", "message": "Call us back."}
    )
    to = callee()
    twilio.behave(
        to, Answer(greeting="Hello?", script=[Say("I would like to book an appointment")], verdict_after_ms=500)
    )

    placed = await place_call(deps, organization_id=organization_id, agent_id=agent_id, from_number=caller_id, to=to)

    call = await twilio.finished(placed.call_sid)
    assert call.amd_posted == "human"
    assert call.updates == []
    log = await finished_log(pool, placed.call_log_id)
    assert log["status"] == "COMPLETED"
    assert log["metadata"]["endReason"] not in ("voicemail_left", "voicemail_hangup")
    assert log["metadata"]["answeredBy"] == "human"


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("5550100", "no country code"),
        ("+1555", "too short"),
        ("+1 555 0100 99999999", "too long"),
        ("call me maybe", "not a phone number"),
    ],
)
async def test_an_undialable_number_is_refused_with_the_reason_and_nothing_is_written(
    *,
    deps: OutboundDeps,
    twilio: FakeTwilio,
    pool: asyncpg.Pool,
    organization_id: str,
    caller_id: str,
    number: str,
    reason: str,
) -> None:
    agent_id = await make_agent(pool, organization_id)
    before, creates = await call_log_count(pool, organization_id), sum(twilio.creates.values())

    with pytest.raises(InvalidNumber) as refused:
        await place_call(deps, organization_id=organization_id, agent_id=agent_id, from_number=caller_id, to=number)

    assert reason in str(refused.value) and refused.value.field == "to"
    assert await call_log_count(pool, organization_id) == before
    assert sum(twilio.creates.values()) == creates


async def test_only_an_active_outbound_agent_of_the_organization_places_calls(
    deps: OutboundDeps, pool: asyncpg.Pool, organization_id: str, caller_id: str
) -> None:
    inbound = await make_agent(pool, organization_id, caller_type=CallerType.INBOUND)
    inactive = await make_agent(pool, organization_id, status=AgentStatus.INACTIVE)
    other_org = await organizations.create_organization(pool, name="Other", slug="other-agents", credits=10)
    foreign = await make_agent(pool, other_org.id)
    before = await call_log_count(pool, organization_id)

    for agent_id, reason in ((inbound, "INBOUND"), (inactive, "INACTIVE"), (foreign, "no such agent")):
        with pytest.raises(AgentUnavailable, match=reason):
            await place_call(
                deps, organization_id=organization_id, agent_id=agent_id, from_number=caller_id, to=callee()
            )
    assert await call_log_count(pool, organization_id) == before


async def test_the_caller_id_must_be_an_outbound_enabled_number_of_the_organization(
    deps: OutboundDeps, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id)
    disabled = await phone_numbers.create_phone_number(
        pool, organization_id=organization_id, phone_number="+15550199002", outbound_status=PhoneNumberStatus.DISABLED
    )
    other_org = await organizations.create_organization(pool, name="Other", slug="other-numbers", credits=10)
    foreign = await phone_numbers.create_phone_number(pool, organization_id=other_org.id, phone_number="+15550199003")

    with pytest.raises(NumberUnavailable, match="disabled"):
        await place_call(
            deps, organization_id=organization_id, agent_id=agent_id, from_number=disabled.phone_number, to=callee()
        )
    for number in (foreign.phone_number, "+15550199999"):
        with pytest.raises(NumberUnavailable, match="not a phone number of this organization"):
            await place_call(deps, organization_id=organization_id, agent_id=agent_id, from_number=number, to=callee())


async def test_an_organization_without_credits_cannot_place_calls(
    deps: OutboundDeps, twilio: FakeTwilio, pool: asyncpg.Pool
) -> None:
    broke = await organizations.create_organization(pool, name="Broke", slug="broke", credits=0)
    number = await phone_numbers.create_phone_number(pool, organization_id=broke.id, phone_number="+15550199004")
    agent_id = await make_agent(pool, broke.id)
    creates = sum(twilio.creates.values())

    with pytest.raises(NoCredits):
        await place_call(
            deps, organization_id=broke.id, agent_id=agent_id, from_number=number.phone_number, to=callee()
        )

    assert await call_log_count(pool, broke.id) == 0
    assert sum(twilio.creates.values()) == creates


async def test_twenty_calls_placed_at_once_for_three_minutes_of_credit_place_three_and_charge_the_plans_rate(
    deps: OutboundDeps, twilio: FakeTwilio, pool: asyncpg.Pool
) -> None:
    pro = dataclasses.replace(deps, settings=deps.settings.model_copy(update={"credits_per_minute_pro": 2}))
    org = await organizations.create_organization(pool, name="Racing", slug="racing", plan=Plan.PRO, credits=7)
    number = await phone_numbers.create_phone_number(pool, organization_id=org.id, phone_number="+15550199005")
    agent_id = await make_agent(pool, org.id)
    destinations = [callee() for _ in range(20)]
    for to in destinations:
        twilio.behave(to, Answer(greeting=None, script=[Pause(1500)]))  # a short call: one started minute

    results = await asyncio.gather(
        *(
            place_call(pro, organization_id=org.id, agent_id=agent_id, from_number=number.phone_number, to=to)
            for to in destinations
        ),
        return_exceptions=True,
    )

    placed = [result for result in results if isinstance(result, PlacedCall)]
    refused = [result for result in results if isinstance(result, NoCredits)]
    assert (len(placed), len(refused)) == (3, 17)
    assert "not enough for the first minute of a call (2)" in str(refused[0])
    ended = [await finished_log(pool, call.call_log_id) for call in placed]
    assert [row["status"] for row in ended] == ["COMPLETED"] * 3
    assert all(0 < row["duration"] <= 60 for row in ended)
    assert (await organizations.get_organization(pool, organization_id=org.id)).credits == 7 - 3 * 2


async def test_a_campaign_of_another_organization_is_refused(
    deps: OutboundDeps, pool: asyncpg.Pool, organization_id: str, caller_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id)
    with pytest.raises(CampaignNotFound):
        await place_call(
            deps,
            organization_id=organization_id,
            agent_id=agent_id,
            from_number=caller_id,
            to=callee(),
            campaign_id="not-a-campaign",
        )


# ------------------------------------------------------------------------------------------------ callbacks


async def test_status_and_amd_callbacks_without_twilios_signature_are_refused_and_change_nothing(
    *, deps: OutboundDeps, twilio: FakeTwilio, engine: str, pool: asyncpg.Pool, organization_id: str, caller_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id)
    to = callee()
    twilio.behave(to, NoAnswer(ring_ms=3000))
    placed = await place_call(deps, organization_id=organization_id, agent_id=agent_id, from_number=caller_id, to=to)
    forged = {"CallSid": placed.call_sid, "CallStatus": "busy", "AnsweredBy": "machine_start", "AccountSid": "AC1"}

    async with aiohttp.ClientSession() as http:
        for path in ("/twilio/status", "/twilio/amd"):
            url = f"{engine}{path}?callLogId={placed.call_log_id}"
            async with http.post(url, data=forged, headers={"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}) as response:
                assert response.status == 403
            async with http.post(url, data=forged) as response:
                assert response.status == 403

    row = await call_log_row(pool, placed.call_log_id)
    assert row["status"] == "IN_PROGRESS" and "answeredBy" not in row["metadata"]
    await twilio.finished(placed.call_sid)
    log = await finished_log(pool, placed.call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("MISSED", "no-answer")


async def post_status(engine: str, twilio: FakeTwilio, call_log_id: str, fields: dict[str, str]) -> int:
    """Post a status callback signed with the fake account's token, as Twilio would; return the HTTP status."""
    url = f"{engine}/twilio/status?callLogId={call_log_id}"
    signature = RequestValidator(twilio.auth_token).compute_signature(url, fields)
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=fields, headers={"X-Twilio-Signature": signature}) as response,
    ):
        return response.status


@pytest.mark.parametrize(
    ("session_ran", "expected"),
    [
        # The media session ended the call on another node, not knowing about the machine: the reason is corrected.
        (True, ("COMPLETED", "voicemail_left")),
        # The stream never started (the machine verdict came first): the completed callback closes it.
        (False, ("COMPLETED", "voicemail_left")),
    ],
)
async def test_the_completed_callback_gives_a_voicemail_call_its_end_reason_whoever_closed_it(
    *,
    engine: str,
    twilio: FakeTwilio,
    pool: asyncpg.Pool,
    organization_id: str,
    session_ran: bool,
    expected: tuple[str, str],
) -> None:
    agent_id = await make_agent(pool, organization_id)
    call_sid = "CA" + secrets.token_hex(16)
    log = await call_logs.create_call_log(
        pool,
        organization_id=organization_id,
        call_type=CallType.OUTBOUND,
        call_id=call_sid,
        agent_id=agent_id,
        metadata={"voicemail": "voicemail_left", "answeredBy": "machine_end_beep"},
    )
    if session_ran:
        await call_logs.finalize_call_log(
            pool,
            organization_id=organization_id,
            call_log_id=log.id,
            status=CallStatus.COMPLETED,
            duration=12,
            metadata={"endReason": "caller_hangup", "engineNode": "elsewhere"},
        )
    fields = {"CallSid": call_sid, "CallStatus": "completed", "CallDuration": "21", "AccountSid": twilio.account_sid}

    assert await post_status(engine, twilio, log.id, fields) == 204

    row = await call_log_row(pool, log.id)
    assert (row["status"], row["metadata"]["endReason"]) == expected
    assert row["duration"] == (12 if session_ran else 21)


async def voicemail_call(
    pool: asyncpg.Pool, slug: str, *, rate: int = 1, **metadata: str
) -> tuple[organizations.Organization, CallLog]:
    """An outbound call of a new organization with 10 credits at `rate` a minute, on which a machine took a message."""
    org = await organizations.create_organization(pool, name=slug, slug=slug, credits=10)
    log = await call_logs.create_call_log(
        pool,
        organization_id=org.id,
        call_type=CallType.OUTBOUND,
        call_id="CA" + secrets.token_hex(16),
        agent_id=await make_agent(pool, org.id),
        metadata={"voicemail": "voicemail_left", "answeredBy": "machine_end_beep", **metadata},
        credit_rates={"free": rate, "pro": rate, "enterprise": rate},
    )
    return org, log


async def test_a_voicemail_left_without_a_media_stream_pays_the_minutes_twilio_ran_it(
    engine: str, twilio: FakeTwilio, pool: asyncpg.Pool
) -> None:
    # The machine's verdict came before the stream started: Twilio spoke the message and hung up, 75 s in all.
    org, log = await voicemail_call(pool, "voicemail-charge")
    fields = {"CallSid": log.call_id, "CallStatus": "completed", "CallDuration": "75", "AccountSid": twilio.account_sid}

    assert await post_status(engine, twilio, log.id, fields) == 204
    assert await post_status(engine, twilio, log.id, fields) == 204  # Twilio retries: charged once

    row = await call_log_row(pool, log.id)
    assert (row["status"], row["metadata"]["endReason"], row["duration"]) == ("COMPLETED", "voicemail_left", 75)
    balance = await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org.id)
    assert balance == 8  # two started minutes at one credit a minute


@pytest.mark.parametrize("rate", [1, 3])
async def test_a_voicemail_message_spoken_after_the_session_pays_the_minutes_twilio_ran_it_past_the_session(
    engine: str, twilio: FakeTwilio, pool: asyncpg.Pool, rate: int
) -> None:
    # The media session heard the machine, ended at 50 s (one minute charged), and Twilio spoke the message after the
    # beep: 95 s in all by Twilio's clock, so a second minute was started. It is charged at the rate the call paid,
    # also when that is no longer the engine's rate for the plan (1 credit a minute here).
    org, log = await voicemail_call(pool, f"voicemail-after-{rate}", rate=rate, engineNode="node-a")
    await call_logs.finalize_call_log(
        pool,
        organization_id=org.id,
        call_log_id=log.id,
        status=CallStatus.COMPLETED,
        duration=50,
        metadata={"endReason": "voicemail_left"},
        minutes_charged=1,
    )
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org.id) == 10 - rate
    fields = {"CallSid": log.call_id, "CallStatus": "completed", "CallDuration": "95", "AccountSid": twilio.account_sid}

    assert await post_status(engine, twilio, log.id, fields) == 204
    assert await post_status(engine, twilio, log.id, fields) == 204  # Twilio retries: charged once

    row = await call_log_row(pool, log.id)
    assert (row["status"], row["duration"], row["metadata"]["voicemailMinutesCharged"]) == ("COMPLETED", 50, 1)
    assert row["metadata"]["creditsPerMinute"] == rate
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org.id) == 10 - 2 * rate


async def test_a_voicemail_message_of_a_call_recovery_closed_pays_only_the_minutes_recovery_did_not(
    engine: str, twilio: FakeTwilio, pool: asyncpg.Pool
) -> None:
    # The engine running the call was lost: recovery closed it and charged the one minute it surely started. Twilio's
    # callback then says the call, voicemail message included, ran 95 s: two minutes, one of them paid already.
    org, log = await voicemail_call(pool, "voicemail-recovered", engineNode="node-lost")
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            f"""UPDATE "CallLog" c SET "status" = 'FAILED',
                "metadata" = c."metadata" || '{{"endReason": "engine_lost"}}'
            WHERE c."id" = $1 RETURNING {call_logs.CALL_LOG_COLUMNS}""",
            log.id,
        )
        await call_logs.after_bulk_ending(conn, rows)
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org.id) == 9
    fields = {"CallSid": log.call_id, "CallStatus": "completed", "CallDuration": "95", "AccountSid": twilio.account_sid}

    assert await post_status(engine, twilio, log.id, fields) == 204

    row = await call_log_row(pool, log.id)
    assert (row["metadata"]["minutesCharged"], row["metadata"]["voicemailMinutesCharged"]) == (1, 1)
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org.id) == 8


async def test_many_concurrent_calls_are_each_dialed_once(
    deps: OutboundDeps, twilio: FakeTwilio, pool: asyncpg.Pool, organization_id: str, caller_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id)
    numbers = [callee() for _ in range(8)]
    for i, number in enumerate(numbers):
        twilio.behave(number, Busy() if i % 2 else NoAnswer(ring_ms=300))

    placed = await asyncio.gather(
        *(
            place_call(deps, organization_id=organization_id, agent_id=agent_id, from_number=caller_id, to=number)
            for number in numbers
        )
    )

    assert [twilio.creates[number] for number in numbers] == [1] * len(numbers)
    assert len({call.call_sid for call in placed}) == len(numbers)
    for call in placed:
        await twilio.finished(call.call_sid)
        log = await finished_log(pool, call.call_log_id)
        assert log["status"] == "MISSED"


async def test_deps_from_an_app_without_twilio_credentials_say_what_to_set(db_url: str) -> None:
    app = web.Application()
    app[SETTINGS] = load_settings(database_url=db_url)

    with pytest.raises(OutboundUnavailable, match="TWILIO_ACCOUNT_SID"):
        OutboundDeps.from_app(app)


async def test_a_status_callback_that_beats_place_call_to_the_call_sid_still_finds_its_call(
    engine: str, twilio: FakeTwilio, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id)
    log = await call_logs.create_call_log(
        pool,
        organization_id=organization_id,
        call_type=CallType.OUTBOUND,
        call_id=call_logs.pending_call_id(),
        agent_id=agent_id,
    )
    call_sid = "CA" + secrets.token_hex(16)
    fields = {"CallSid": call_sid, "CallStatus": "busy", "SipResponseCode": "486", "AccountSid": twilio.account_sid}

    assert await post_status(engine, twilio, log.id, fields) == 204
    assert await post_status(engine, twilio, log.id, fields) == 204  # Twilio retrying changes nothing

    row = await call_log_row(pool, log.id)
    assert (row["callId"], row["status"], row["metadata"]["endReason"]) == (call_sid, "MISSED", "busy")
    other = {**fields, "CallSid": "CA" + secrets.token_hex(16)}  # another call cannot take this log over
    assert await post_status(engine, twilio, log.id, other) == 204
    assert (await call_log_row(pool, log.id))["callId"] == call_sid
