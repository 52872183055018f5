"""Steering a call in progress through /v1/live-calls/{id}/say, /message and /transfer, each sent to another engine
process than the one holding the call (two engines' apps on one database): the line is spoken and recorded as an
agent turn, queued or cutting the agent; the message reaches the chat model's next request; the transfer goes
through Twilio within the agent's transfer rules, and is refused outside them."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from config.agent import parse_agent_configuration
from engine.simulator import CallEnding, CallResult, Pause, Say
from storage import agents, phone_numbers
from storage.enums import AgentStatus, CallerType
from tests.engine_server import running_engine
from tests.fakes.openai_realtime import FakeRealtime
from tests.fakes.twilio import call_updates, dialed_number
from tests.sse_client import EventStream
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_calls_e2e import TOKEN, call, call_log, make_line, turns
from tests.test_cloud_calls_e2e import OPENAI_KEY, Fakes, running_fakes
from tests.test_cloud_calls_e2e import make_line as make_cloud_line
from tests.test_live_call_control_channel import held_by_a_node
from tests.test_repo_call_logs import open_call

ACCOUNT = "AC" + "2" * 32
_numbers = itertools.count(1)
BILLING = "+14155550199"
LINE = "This is a line from the operator."


@pytest.fixture(scope="module")
async def fakes() -> AsyncIterator[Fakes]:
    async with running_fakes() as running:
        yield running


@pytest.fixture(scope="module")
async def twilio_updates() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """Twilio's REST API for call updates (hang-ups, transfers): records each update's form."""
    async with call_updates() as rest:
        yield rest


@pytest.fixture(scope="module")
async def engines(
    db_url: str, fakes: Fakes, twilio_updates: tuple[str, list[dict[str, str]]]
) -> AsyncIterator[dict[str, str]]:
    """`holder` runs the calls (no Twilio account: a hang-up closes the stream); `twilio` runs calls with Twilio's
    REST API (so it can transfer); `other` gets every control request and reaches them through the database."""
    twilio: dict[str, Any] = {"twilio_account_sid": ACCOUNT, "twilio_api_base": twilio_updates[0]}
    async with (
        running_engine(db_url, twilio_auth_token=TOKEN, **fakes.settings()) as holder,
        running_engine(db_url, twilio_auth_token=TOKEN, **twilio, **fakes.settings()) as with_twilio,
        running_engine(db_url, twilio_auth_token=TOKEN) as other,
    ):
        yield {"holder": holder, "twilio": with_twilio, "other": other}


@pytest.fixture
async def api(engines: dict[str, str]) -> AsyncIterator[Api]:
    """The /v1 API of the engine that holds no call."""
    async with aiohttp.ClientSession() as session:
        yield Api(session, engines["other"])


async def agent_turns(pool: asyncpg.Pool, call_log_id: str, count: int) -> list[asyncpg.Record]:
    """The call's agent turns once at least `count` are written."""
    for _ in range(200):
        rows = [row for row in await turns(pool, call_log_id) if row["speaker"] == "agent"]
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"call {call_log_id} never had {count} agent turns")


async def hang_up(api: Api, tenant: Tenant, call_log_id: str, running: asyncio.Task[CallResult]) -> CallResult:
    status, _ = await api.call("POST", f"/live-calls/{call_log_id}/hangup", tenant.owner_key)
    assert status == 202
    return await running


async def test_queued_lines_are_said_after_the_agents_reply_in_order_as_turns_of_their_own(
    engines: dict[str, str], api: Api, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Queued")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello, you have reached the clinic.")
    running = asyncio.create_task(call(engines["holder"], number, Pause(60_000)))
    call_log_id = await held_by_a_node(pool, tenant.organization_id)
    for text in (LINE, "And a second one."):
        status, body = await api.call("POST", f"/live-calls/{call_log_id}/say", tenant.owner_key, json={"text": text})
        assert (status, body) == (202, {"callLogId": call_log_id, "interrupted": False})
    opening, line, second = (await agent_turns(pool, call_log_id, 3))[-3:]
    result = await hang_up(api, tenant, call_log_id, running)
    assert opening["text"].startswith("Hello, you have reached the clinic.") and not opening["interrupted"]
    assert [(t["text"], t["interrupted"]) for t in (line, second)] == [(LINE, False), ("And a second one.", False)]
    assert opening["index"] < line["index"] < second["index"]
    assert line["startMs"] < line["endMs"]  # its audio was played to the caller
    assert not result.clears  # nothing was cut


async def test_an_interrupting_line_cuts_the_agent_where_the_caller_stopped_hearing_it(
    engines: dict[str, str], api: Api, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Interrupting")
    long_opening = (
        "Hello, you have reached the clinic, where we are open from eight in the morning until six in the "
        "evening on every weekday, and from nine until noon on saturdays, except on public holidays."
    )
    number, _ = await make_line(pool, tenant.organization_id, firstSentence=long_opening)
    running = asyncio.create_task(call(engines["holder"], number, Pause(60_000)))
    call_log_id = await held_by_a_node(pool, tenant.organization_id)
    await asyncio.sleep(1.0)  # the caller is hearing the opening
    status, body = await api.call(
        "POST", f"/live-calls/{call_log_id}/say", tenant.owner_key, json={"text": LINE, "interrupt": True}
    )
    assert (status, body) == (202, {"callLogId": call_log_id, "interrupted": True})
    cut, line = await agent_turns(pool, call_log_id, 2)
    result = await hang_up(api, tenant, call_log_id, running)
    assert cut["interrupted"] and long_opening.startswith(cut["text"]) and len(cut["text"]) < len(long_opening)
    assert (line["text"], line["interrupted"]) == (LINE, False)
    assert result.clears  # Twilio was told to drop the rest of the opening


async def test_a_line_said_through_the_api_is_synthesized_each_time_never_kept_as_a_phrase(
    engines: dict[str, str], api: Api, pool: asyncpg.Pool, fakes: Fakes
) -> None:
    tenant = await make_tenant(pool, "LiveLine")
    line = "An operator line for this caller only."
    number, _ = await make_cloud_line(pool, tenant.organization_id, firstSentence="Hello.")
    running = asyncio.create_task(call(engines["holder"], number, Pause(60_000)))
    call_log_id = await held_by_a_node(pool, tenant.organization_id)
    for _ in range(2):
        status, _ = await api.call("POST", f"/live-calls/{call_log_id}/say", tenant.owner_key, json={"text": line})
        assert status == 202
    said = await agent_turns(pool, call_log_id, 3)
    await hang_up(api, tenant, call_log_id, running)
    assert [turn["text"] for turn in said[-2:]] == [line, line]
    # The agent's own first sentence is a phrase the engine keeps; a supervisor's live line is said once each time.
    assert [spoken.text for spoken in fakes.elevenlabs.texts].count(line) == 2


async def test_a_message_reaches_the_chat_models_next_request(
    engines: dict[str, str], api: Api, pool: asyncpg.Pool, fakes: Fakes
) -> None:
    tenant = await make_tenant(pool, "Message")
    number, _ = await make_cloud_line(pool, tenant.organization_id, firstSentence="Hello.")
    fakes.deepgram.transcripts.extend(["What are your hours?"])
    fakes.openai.replies.extend(["We open at nine."])
    asked = len(fakes.openai.requests)
    running = asyncio.create_task(call(engines["holder"], number, Pause(1500), Say("what are your hours"), Pause(500)))
    call_log_id = await held_by_a_node(pool, tenant.organization_id)
    path = f"/live-calls/{call_log_id}/message"
    status, body = await api.call("POST", path, tenant.owner_key, json={"content": "The caller is a VIP."})
    assert (status, body) == (202, {"callLogId": call_log_id})
    status, _ = await api.call("POST", path, tenant.owner_key, json={"content": "Be brief.", "role": "user"})
    assert status == 202
    result = await running
    assert result.ending is CallEnding.CALLER_HUNG_UP
    messages = fakes.openai.requests[asked]["messages"]
    added = [
        messages.index({"role": "system", "content": "The caller is a VIP."}),
        messages.index({"role": "user", "content": "Be brief."}),
    ]
    assert added[0] < added[1] < messages.index({"role": "user", "content": "What are your hours?"})


async def test_a_message_for_a_conversation_path_model_is_refused_with_the_reason(
    engines: dict[str, str], api: Api, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "PathMessage")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello.")
    running = asyncio.create_task(call(engines["holder"], number, Pause(60_000)))
    call_log_id = await held_by_a_node(pool, tenant.organization_id)
    status, body = await api.call(
        "POST", f"/live-calls/{call_log_id}/message", tenant.owner_key, json={"content": "Be brief."}
    )
    await hang_up(api, tenant, call_log_id, running)
    assert status == 409
    assert "takes no messages" in body["error"]["message"]


async def test_a_transfer_the_agents_rules_allow_goes_through_twilio(
    engines: dict[str, str], api: Api, pool: asyncpg.Pool, twilio_updates: tuple[str, list[dict[str, str]]]
) -> None:
    tenant = await make_tenant(pool, "Transfer")
    number, _ = await make_line(
        pool,
        tenant.organization_id,
        firstSentence="Hello.",
        transfer={"destinations": [{"number": BILLING, "label": "Billing"}]},
    )
    async with EventStream(api.session, f"{engines['other']}/v1/live-calls/events", tenant.owner_key) as stream:
        running = asyncio.create_task(call(engines["twilio"], number, Pause(60_000)))
        call_log_id = await held_by_a_node(pool, tenant.organization_id)
        await stream.until(lambda event: event.type == "call.started")  # its node records the organization's events
        status, body = await api.call(
            "POST", f"/live-calls/{call_log_id}/transfer", tenant.owner_key, json={"to": BILLING}
        )
        assert (status, body) == (202, {"callLogId": call_log_id, "to": BILLING})
        told = await stream.until(lambda event: event.type == "call.transfer")
    assert (told.data["callLogId"], told.data["to"]) == (call_log_id, BILLING)
    result = await running  # Twilio would leave the stream for the <Dial>; without its stop, the engine closes it
    _, updates = twilio_updates
    update = next(u for u in updates if u["sid"] == result.call_sid)
    assert dialed_number(update["Twiml"]) == BILLING
    log = await call_log(pool, result)
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred")


async def test_a_transfer_on_an_engine_without_a_twilio_account_is_a_conflict(
    engines: dict[str, str], api: Api, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "NoTwilio")
    rules = {"destinations": [{"number": BILLING, "label": "Billing"}]}
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello.", transfer=rules)
    running = asyncio.create_task(call(engines["holder"], number, Pause(60_000)))
    call_log_id = await held_by_a_node(pool, tenant.organization_id)
    status, body = await api.call("POST", f"/live-calls/{call_log_id}/transfer", tenant.owner_key, json={"to": BILLING})
    result = await hang_up(api, tenant, call_log_id, running)
    assert status == 409
    assert "no Twilio account" in body["error"]["message"]
    assert (await call_log(pool, result))["metadata"]["endReason"] == "api_hangup"


@pytest.mark.parametrize(
    ("transfer", "refusal"),
    [
        ({"destinations": [{"number": BILLING, "label": "Billing"}]}, "is not a number this agent may transfer to"),
        (None, "this agent cannot transfer calls"),
    ],
)
async def test_a_transfer_outside_the_agents_rules_is_refused_and_the_call_goes_on(
    *,
    engines: dict[str, str],
    api: Api,
    pool: asyncpg.Pool,
    twilio_updates: tuple[str, list[dict[str, str]]],
    transfer: dict[str, Any] | None,
    refusal: str,
) -> None:
    tenant = await make_tenant(pool, "Refused")
    rules: dict[str, Any] = {"transfer": transfer} if transfer is not None else {}
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello.", **rules)
    running = asyncio.create_task(call(engines["twilio"], number, Pause(1500)))
    call_log_id = await held_by_a_node(pool, tenant.organization_id)
    status, body = await api.call(
        "POST", f"/live-calls/{call_log_id}/transfer", tenant.owner_key, json={"to": "+14155550123"}
    )
    assert status == 403
    assert refusal in body["error"]["message"]
    result = await running
    _, updates = twilio_updates
    assert not [u for u in updates if u["sid"] == result.call_sid]
    log = await call_log(pool, result)
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "caller_hangup")


async def test_a_transfer_the_agent_lists_but_the_dial_policy_refuses_is_refused_and_the_call_goes_on(
    engines: dict[str, str], api: Api, pool: asyncpg.Pool, twilio_updates: tuple[str, list[dict[str, str]]]
) -> None:
    premium = "+449012345678"  # a UK premium-rate number, listed exactly: the agent's rules allow it
    tenant = await make_tenant(pool, "PremiumDesk")
    number, _ = await make_line(
        pool,
        tenant.organization_id,
        firstSentence="Hello.",
        transfer={"destinations": [{"number": premium, "label": "Premium desk"}]},
    )
    running = asyncio.create_task(call(engines["twilio"], number, Pause(1500)))
    call_log_id = await held_by_a_node(pool, tenant.organization_id)
    status, body = await api.call("POST", f"/live-calls/{call_log_id}/transfer", tenant.owner_key, json={"to": premium})
    assert status == 403, body
    assert "is a premium-rate number; this organization does not dial premium-rate numbers" in body["error"]["message"]
    result = await running
    _, updates = twilio_updates
    assert not [u for u in updates if u["sid"] == result.call_sid]
    log = await call_log(pool, result)
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "caller_hangup")


CONTROLS = [
    ("say", {"text": LINE}),
    ("message", {"content": "Be brief."}),
    ("transfer", {"to": BILLING}),
]


@pytest.mark.parametrize(("control", "body"), CONTROLS)
async def test_another_organizations_call_is_not_found(
    api: Api, pool: asyncpg.Pool, control: str, body: dict[str, Any]
) -> None:
    owner = await make_tenant(pool, "Owner")
    stranger = await make_tenant(pool, "Stranger")
    log = await open_call(pool, owner.organization_id)
    status, answer = await api.call("POST", f"/live-calls/{log.id}/{control}", stranger.owner_key, json=body)
    assert (status, answer["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize(
    ("control", "body"),
    [
        ("say", {}),
        ("say", {"text": ""}),
        ("say", {"text": "x" * 1001}),
        ("say", {"text": LINE, "interrupt": "yes"}),
        ("say", {"text": LINE, "voice": "loud"}),
        ("message", {"content": ""}),
        ("message", {"content": "x" * 4001}),
        ("message", {"content": "Be brief.", "role": "assistant"}),
        ("transfer", {}),
        ("transfer", {"to": "4155550199"}),
        ("transfer", {"to": "Billing"}),
    ],
)
async def test_a_bad_body_is_unprocessable(api: Api, pool: asyncpg.Pool, control: str, body: dict[str, Any]) -> None:
    tenant = await make_tenant(pool, "BadBody")
    log = await open_call(pool, tenant.organization_id)
    status, answer = await api.call("POST", f"/live-calls/{log.id}/{control}", tenant.owner_key, json=body)
    assert status == 422, answer


@pytest.mark.parametrize(("control", "body"), CONTROLS)
async def test_a_call_no_engine_process_holds_yet_is_a_conflict(
    api: Api, pool: asyncpg.Pool, control: str, body: dict[str, Any]
) -> None:
    tenant = await make_tenant(pool, "Unheld")
    await phone_numbers.create_phone_number(  # a US number: by default the organization dials BILLING's country
        pool, organization_id=tenant.organization_id, phone_number=f"+1555557{next(_numbers):04d}"
    )
    log = await open_call(pool, tenant.organization_id)
    status, answer = await api.call("POST", f"/live-calls/{log.id}/{control}", tenant.owner_key, json=body)
    assert status == 409
    assert "not yet held by any engine process" in answer["error"]["message"]


async def test_a_speech_to_speech_model_gets_the_message_and_says_the_line_word_for_word(
    db_url: str, api: Api, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Realtime")
    async with FakeRealtime(api_key=OPENAI_KEY) as realtime:
        realtime.reply(LINE)
        settings: dict[str, Any] = {"openai_api_key": OPENAI_KEY, "openai_base_url": realtime.base_url}
        async with running_engine(db_url, twilio_auth_token=TOKEN, **settings) as holder:
            number = await phone_numbers.create_phone_number(
                pool, organization_id=tenant.organization_id, phone_number=f"+1555557{next(_numbers):04d}"
            )
            await agents.create_agent(
                pool,
                organization_id=tenant.organization_id,
                name="realtime agent",
                status=AgentStatus.ACTIVE,
                caller_type=CallerType.INBOUND,
                phone_number_id=number.id,
                configuration=parse_agent_configuration({"realtime": {"provider": "openai"}}).to_json(),
            )
            running = asyncio.create_task(call(holder, number.phone_number, Pause(60_000)))
            call_log_id = await held_by_a_node(pool, tenant.organization_id)
            status, _ = await api.call(
                "POST", f"/live-calls/{call_log_id}/message", tenant.owner_key, json={"content": "Be brief."}
            )
            assert status == 202
            status, _ = await api.call("POST", f"/live-calls/{call_log_id}/say", tenant.owner_key, json={"text": LINE})
            assert status == 202
            (line,) = await agent_turns(pool, call_log_id, 1)
            await hang_up(api, tenant, call_log_id, running)
    items = [event["item"] for event in realtime.of_type("conversation.item.create")]
    assert {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Be brief."}]} in items
    (said,) = realtime.of_type("response.create")
    assert json.dumps(LINE) in said["response"]["instructions"]
    assert (line["text"], line["interrupted"]) == (LINE, False)
