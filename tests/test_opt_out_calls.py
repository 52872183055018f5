"""A callee who asks not to be called again, in whole calls through the real server (Twilio's side played by the
simulator, real PostgreSQL): by the OpenAI model calling the built-in `opt_out` (the Deepgram and OpenAI fakes
behind their real SDKs), and on the offline pipeline by the caller saying so (eSpeak's voice heard by PocketSphinx).
Either way the number lands on the do-not-call list naming the call, the caller hears the confirmation, the call
ends, and the next campaign does not dial them."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from config.agent import parse_agent_configuration
from engine.simulator import Pause, Say, simulate_call
from engine.twilio.outbound_calls import OutboundDeps
from pipelines.tools import OPT_OUT_CONFIRMATION
from storage import agents, conversation_paths, do_not_call, organizations, phone_numbers
from storage.demo import DEMO_PATH_EDGES, DEMO_PATH_NODES
from storage.enums import AgentStatus, CallerType
from tests.engine_server import running_engine
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.openai_chat import FakeOpenAI, ToolCall
from tests.fakes.openai_realtime import FakeRealtime
from tests.fakes.twilio import FakeTwilio
from tests.test_calls_e2e import call_log, turns
from tests.test_dispatch_do_not_call import (
    dispatch_states,
    dispatcher_for,
    outbound_deps,
    run_to_completion,
    started_campaign,
    twilio_settings,
)

DG_KEY, OPENAI_KEY = "dg-key-opt-out", "sk-key-opt-out"
OFFLINE = {"stt": {"provider": "sphinx"}, "llm": {"provider": "conversation_path"}, "tts": {"provider": "espeak"}}
CLOUD = {
    "stt": {"provider": "deepgram", "endpointing": 300},
    "llm": {"provider": "openai"},
    "tts": {"provider": "espeak"},
}
_numbers = itertools.count(1)


@pytest.fixture(scope="module")
async def deepgram() -> AsyncIterator[FakeDeepgram]:
    async with FakeDeepgram(api_key=DG_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
async def openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
async def engine(db_url: str, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI) -> AsyncIterator[str]:
    async with running_engine(
        db_url,
        dispatch_enabled=False,
        deepgram_api_key=DG_KEY,
        openai_api_key=OPENAI_KEY,
        deepgram_url=deepgram.url,
        openai_base_url=openai.base_url,
        **twilio_settings(twilio),
    ) as base:
        yield base


@pytest.fixture(scope="module")
async def deps(db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, engine: str) -> AsyncIterator[OutboundDeps]:
    async with outbound_deps(db_url, pool, twilio, engine) as made:
        yield made


async def inbound_line(pool: asyncpg.Pool, **configuration: Any) -> tuple[str, str]:
    """A new organization whose number is answered by an INBOUND agent; returns (organization id, number)."""
    n = next(_numbers)
    org = (await organizations.create_organization(pool, name=f"Opt {n}", slug=f"opt-out-{n}", credits=500)).id
    number = await phone_numbers.create_phone_number(pool, organization_id=org, phone_number=f"+1555557{n:04d}")
    agent = await agents.create_agent(
        pool,
        organization_id=org,
        name="front desk",
        status=AgentStatus.ACTIVE,
        caller_type=CallerType.INBOUND,
        phone_number_id=number.id,
        configuration=parse_agent_configuration(configuration).to_json(),
    )
    path = await conversation_paths.create_conversation_path(
        pool, organization_id=org, name="booking", nodes=DEMO_PATH_NODES, edges=DEMO_PATH_EDGES
    )
    await agents.link_conversation_path(pool, organization_id=org, agent_id=agent.id, conversation_path_id=path.id)
    return org, number.phone_number


async def call_from(engine: str, twilio: FakeTwilio, caller: str, to: str, *steps: Any) -> Any:
    return await simulate_call(engine, to=to, from_=caller, script=steps, auth_token=twilio.auth_token, timeout_s=90)


async def assert_next_campaign_skips(
    pool: asyncpg.Pool, deps: OutboundDeps, twilio: FakeTwilio, org: str, number: str
) -> None:
    campaign = await started_campaign(pool, org, [number])
    dispatcher = dispatcher_for(pool, deps)
    dispatcher.start()
    try:
        await run_to_completion(pool, campaign.id)
    finally:
        await dispatcher.close()
    state, reason = (await dispatch_states(pool, campaign.id))[number]
    assert state == "DO_NOT_CALL" and reason is not None and reason.startswith("do not call: ")
    assert twilio.creates[number] == 0


async def test_the_model_calling_opt_out_lists_the_caller_confirms_and_ends_the_call(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    caller = "+14155550161"
    org, number = await inbound_line(pool, **CLOUD, firstSentence="Hello, this is the clinic.")
    deepgram.transcripts.append("Please stop calling me.")
    openai.replies.append([ToolCall("opt_out", {"reason": "asked us to stop calling"})])
    result = await call_from(deps.public_url, twilio, caller, number, Say("please stop calling me"), Pause(8000))

    log = await call_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    assert log["metadata"]["endReason"] == "agent_hangup"
    entry = await do_not_call.listed_entry(pool, organization_id=org, phone_number=caller)
    assert entry is not None
    assert (entry.source, entry.call_log_id, entry.reason) == ("OPT_OUT_MODEL", log["id"], "asked us to stop calling")
    said = [row["text"] for row in await turns(pool, log["id"]) if row["speaker"] == "agent"]
    assert said[-1] == OPT_OUT_CONFIRMATION
    assert "opt_out" in {tool["function"]["name"] for tool in openai.requests[-1]["tools"]}

    await assert_next_campaign_skips(pool, deps, twilio, org, caller)


async def test_an_offline_caller_saying_stop_calling_me_is_listed_and_the_call_ends(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    caller = "+14155550162"
    org, number = await inbound_line(pool, **OFFLINE, firstSentence="Hello, this is the clinic.")
    result = await call_from(
        deps.public_url, twilio, caller, number, Pause(500), Say("please stop calling me"), Pause(8000)
    )

    log = await call_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    entry = await do_not_call.listed_entry(pool, organization_id=org, phone_number=caller)
    assert entry is not None, [(r["speaker"], r["text"]) for r in await turns(pool, log["id"])]
    assert (entry.source, entry.call_log_id) == ("OPT_OUT_PHRASE", log["id"])
    said = [row["text"] for row in await turns(pool, log["id"]) if row["speaker"] == "agent"]
    assert said[-1] == OPT_OUT_CONFIRMATION
    assert log["metadata"]["endReason"] == "agent_hangup"

    await assert_next_campaign_skips(pool, deps, twilio, org, caller)


async def test_a_realtime_model_calling_opt_out_lists_the_caller_and_says_the_confirmation(
    db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    caller = "+14155550163"
    org, number = await inbound_line(
        pool, realtime={"provider": "openai", "transcription_model": "gpt-4o-mini-transcribe"}
    )
    async with FakeRealtime(api_key=OPENAI_KEY) as realtime:
        realtime.caller_says("Take me off your list.")
        realtime.reply_tool("opt_out", {"reason": "take me off your list"}, text="Of course.")
        realtime.reply(OPT_OUT_CONFIRMATION)  # the engine has the model say the confirmation word for word
        settings = {"openai_api_key": OPENAI_KEY, "openai_base_url": realtime.base_url, **twilio_settings(twilio)}
        async with running_engine(db_url, dispatch_enabled=False, **settings) as base:
            result = await call_from(base, twilio, caller, number, Say("take me off your list"), Pause(8000))
        asked = [event["response"] for event in realtime.of_type("response.create") if "response" in event]

    log = await call_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    assert log["metadata"]["endReason"] == "agent_hangup"
    entry = await do_not_call.listed_entry(pool, organization_id=org, phone_number=caller)
    assert entry is not None
    assert (entry.source, entry.call_log_id, entry.reason) == ("OPT_OUT_MODEL", log["id"], "take me off your list")
    assert any(OPT_OUT_CONFIRMATION in str(response.get("instructions")) for response in asked)
    said = [row["text"] for row in await turns(pool, log["id"]) if row["speaker"] == "agent"]
    assert said[-1] == OPT_OUT_CONFIRMATION
