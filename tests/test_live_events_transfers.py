"""A transfer the model started that Twilio then refuses, in both conversation drivers (the pipeline's chat model and
the speech-to-speech model): its tool.call event told it as done, and a second tool.call event of the same function
tells that it did not go through; the call goes on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.call.driver import TRANSFER_FAILED
from engine.simulator import CallResult, Pause, Say
from pipelines.tools import transfer_failed, transferring
from tests.engine_server import running_engine
from tests.fakes.openai_chat import ToolCall
from tests.fakes.openai_realtime import FakeRealtime
from tests.fakes.twilio import Refuse, call_updates, dialed_number
from tests.sse_client import EventStream
from tests.test_api_auth import make_tenant
from tests.test_calls_e2e import call_log, turns
from tests.test_cloud_calls_e2e import OPENAI_KEY, TOKEN, call, make_line, running_fakes
from tests.test_live_events_cloud import realtime_line

ACCOUNT = "AC" + "3" * 32
BILLING = "+14155550199"
TRANSFERS = {"destinations": [{"number": BILLING, "label": "Billing"}]}
ASKED = {"phone_number": "+1 (415) 555-0199", "reason": "billing"}
"""The model's `transfer_call` arguments, as it gives them (not yet in E.164)."""
NOT_IN_PROGRESS = Refuse(code=21220, message="Call is not in-progress. Cannot redirect.", status=400)


@pytest.fixture
async def refusing_twilio() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """Twilio's REST API refusing every update of a call (its base URL, and the updates asked of it)."""
    async with call_updates(refuse=NOT_IN_PROGRESS) as rest:
        yield rest


def twilio_settings(api_base: str) -> dict[str, Any]:
    """An engine's settings for Twilio's REST API at `api_base` (so that it can transfer calls)."""
    return {"twilio_auth_token": TOKEN, "twilio_account_sid": ACCOUNT, "twilio_api_base": api_base}


def transfer_events(stream: EventStream) -> list[tuple[str, dict[str, Any], bool, str]]:
    """The stream's tool.call events: (function, arguments, ok, result)."""
    return [
        (event.data["name"], event.data["arguments"], event.data["ok"], event.data["result"])
        for event in stream.of_type("tool.call")
    ]


TOLD = [
    ("transfer_call", ASKED, True, transferring(BILLING)),
    ("transfer_call", ASKED, False, transfer_failed(BILLING)),
]
"""What the events tell of the refused transfer: started, then not gone through."""


async def told_refused_and_went_on(
    pool: asyncpg.Pool, result: CallResult, updates: list[dict[str, str]], stream: EventStream
) -> list[str]:
    """Check that Twilio was asked for the transfer once, that the events told it started and then refused, and that
    the call did not end transferred; what the agent said in the call."""
    log = await call_log(pool, result)
    assert [update["sid"] for update in updates] == [result.call_sid]
    assert dialed_number(updates[0]["Twiml"]) == BILLING
    assert transfer_events(stream) == TOLD
    assert log["metadata"]["endReason"] != "transferred"
    return [row["text"] for row in await turns(pool, log["id"]) if row["speaker"] == "agent"]


async def chat_model_transfer(
    db_url: str, pool: asyncpg.Pool, api_base: str, name: str
) -> tuple[CallResult, EventStream]:
    """A call of a new organization `name` whose chat model transfers the caller to billing, through an engine whose
    Twilio REST API is at `api_base`; the organization's live event stream, read until the call's call.ended."""
    tenant = await make_tenant(pool, name)
    async with (
        running_fakes() as fakes,
        running_engine(db_url, **twilio_settings(api_base), **fakes.settings()) as base,
    ):
        number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hi.", transfer=TRANSFERS)
        fakes.deepgram.transcripts.extend(["Put me through to billing."])
        fakes.openai.replies.extend([["One moment.", ToolCall("transfer_call", ASKED)]])
        async with (
            aiohttp.ClientSession() as session,
            EventStream(session, f"{base}/v1/live-calls/events", tenant.owner_key) as stream,
        ):
            result = await call(base, number, Say("put me through to billing"), Pause(5000))
            await stream.until(lambda e: e.type == "call.ended")
    return result, stream


async def test_a_transfer_twilio_refuses_after_the_chat_model_started_it_is_told_and_the_call_goes_on(
    db_url: str, pool: asyncpg.Pool, refusing_twilio: tuple[str, list[dict[str, str]]]
) -> None:
    api_base, updates = refusing_twilio
    result, stream = await chat_model_transfer(db_url, pool, api_base, "Refused transfer (pipeline)")
    agent_said = await told_refused_and_went_on(pool, result, updates, stream)
    assert agent_said[-2:] == ["One moment.", TRANSFER_FAILED]


async def test_call_ended_of_a_transferred_call_names_its_leg(db_url: str, pool: asyncpg.Pool) -> None:
    async with call_updates() as (api_base, updates):
        result, stream = await chat_model_transfer(db_url, pool, api_base, "Transferred (live)")
    assert [update["sid"] for update in updates] == [result.call_sid]
    [ended] = stream.of_type("call.ended")
    assert ended.data["endReason"] == "transferred"
    leg = ended.data["transfer"]  # the leg runs on: its settlement is the transfer.ended webhook's
    assert (leg["to"], leg["dialStatus"], leg["durationSeconds"], leg["creditsCharged"]) == (BILLING, None, None, None)
    assert leg["timeLimitSeconds"] > 0


async def test_a_transfer_twilio_refuses_after_the_speech_to_speech_model_started_it_is_told_and_the_call_goes_on(
    db_url: str, pool: asyncpg.Pool, refusing_twilio: tuple[str, list[dict[str, str]]]
) -> None:
    api_base, updates = refusing_twilio
    tenant = await make_tenant(pool, "Refused transfer (realtime)")
    number = await realtime_line(pool, tenant.organization_id, "+15555579101", transfer=TRANSFERS)
    async with FakeRealtime(api_key=OPENAI_KEY) as realtime:
        realtime.caller_says("Put me through to billing.")
        realtime.reply_tool("transfer_call", ASKED, text="One moment.")
        realtime.reply("Sorry, the transfer did not go through.")
        settings: dict[str, Any] = {"openai_api_key": OPENAI_KEY, "openai_base_url": realtime.base_url}
        async with (
            running_engine(db_url, **twilio_settings(api_base), **settings) as base,
            aiohttp.ClientSession() as session,
            EventStream(session, f"{base}/v1/live-calls/events", tenant.owner_key) as stream,
        ):
            result = await call(base, number, Say("put me through to billing"), Pause(4000))
            await stream.until(lambda e: e.type == "call.ended")
    agent_said = await told_refused_and_went_on(pool, result, updates, stream)
    outputs = [event["item"]["output"] for event in realtime.of_type("conversation.item.create")]
    assert outputs[-1] == f"{transfer_failed(BILLING)}; tell the caller"  # the model hears it and tells the caller
    assert agent_said[-1] == "Sorry, the transfer did not go through."
