"""Live call events of cloud calls (Deepgram, OpenAI and ElevenLabs fakes): the model's calls of the organization's
webhook Tools, one answering and one failing, as tool.call events; an agent turn the caller cut, with what was said
and what was heard of it; a speech-to-speech call's turns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from config.agent import parse_agent_configuration
from engine.simulator import Pause, Say
from pipelines.tools import CALL_ENDS, DTMF_SENT
from storage import agents, phone_numbers, tools
from storage.enums import AgentStatus, CallerType
from tests.engine_server import running_engine
from tests.fakes.openai_chat import ToolCall
from tests.fakes.openai_realtime import FakeRealtime
from tests.fakes.server import serve
from tests.sse_client import EventStream
from tests.test_api_auth import make_tenant
from tests.test_calls_e2e import call_log
from tests.test_cloud_calls_e2e import OPENAI_KEY, TOKEN, Fakes, call, engine, fakes, make_line

__all__ = ["engine", "fakes"]  # that module's fixtures: one engine on the three fakes


def without_time(data: dict[str, Any]) -> dict[str, Any]:
    """An event's data without its `at`."""
    return {key: value for key, value in data.items() if key != "at"}


def webhook_tool(name: str, url: str) -> dict[str, Any]:
    return {
        "function": {"name": name, "parameters": {"type": "object", "properties": {"day": {"type": "string"}}}},
        "webhook": {"url": url},
    }


async def test_each_function_the_model_calls_is_an_event_with_its_outcome(
    engine: str, fakes: Fakes, pool: asyncpg.Pool
) -> None:
    async def availability(_request: web.Request) -> web.Response:
        return web.json_response({"slots": ["Tuesday 10:00"]})

    async def booking(_request: web.Request) -> web.Response:
        return web.Response(status=500, text="calendar down")

    hooks = web.Application()
    hooks.router.add_post("/availability", availability)
    hooks.router.add_post("/booking", booking)
    tenant = await make_tenant(pool, "Tools")
    async with serve(hooks) as hook, aiohttp.ClientSession() as session:
        number, agent_id = await make_line(pool, tenant.organization_id, firstSentence="Hi.")
        for name, path in (("check_availability", "availability"), ("book_slot", "booking")):
            tool = await tools.create_tool(
                pool,
                organization_id=tenant.organization_id,
                name=name,
                is_connected=True,
                configuration=webhook_tool(name, f"{hook}/{path}"),
            )
            await agents.link_tool(pool, organization_id=tenant.organization_id, agent_id=agent_id, tool_id=tool.id)
        fakes.deepgram.transcripts.extend(["Book me on Tuesday."])
        fakes.openai.replies.extend(
            [
                [ToolCall("check_availability", {"day": "Tuesday"})],
                [ToolCall("book_slot", {"day": "Tuesday"})],
                "Sorry, I could not book it.",
            ]
        )
        async with EventStream(session, f"{engine}/v1/live-calls/events", tenant.owner_key) as stream:
            result = await call(engine, number, Say("book me on tuesday"), Pause(300))
            await stream.until(lambda e: e.type == "call.ended")
    log = await call_log(pool, result)
    told = [without_time(event.data) for event in stream.of_type("tool.call")]
    assert told == [
        {
            "callLogId": log["id"],
            "name": "check_availability",
            "arguments": {"day": "Tuesday"},
            "ok": True,
            "result": '{"slots": ["Tuesday 10:00"]}',
        },
        {
            "callLogId": log["id"],
            "name": "book_slot",
            "arguments": {"day": "Tuesday"},
            "ok": False,
            "result": "error: the book_slot service answered HTTP 500: calendar down",
        },
    ]
    assert stream.of_type("agent.turn")[-1].data["text"] == "Sorry, I could not book it."


async def test_the_built_in_functions_the_model_calls_are_events_refused_or_done(
    engine: str, fakes: Fakes, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Built-ins")
    billing = {"number": "+14155550199", "label": "Billing"}
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hi.", transfer={"destinations": [billing]})
    fakes.deepgram.transcripts.extend(["Put me through to nine hundred, then press one and hang up."])
    fakes.openai.replies.extend(
        [
            [ToolCall("transfer_call", {"phone_number": "+19005550100"})],
            [ToolCall("send_dtmf", {"digits": "1"})],
            ["Goodbye!", ToolCall("end_call", {"reason": "the caller is done"})],
        ]
    )
    async with (
        aiohttp.ClientSession() as session,
        EventStream(session, f"{engine}/v1/live-calls/events", tenant.owner_key) as stream,
    ):
        result = await call(engine, number, Say("put me through then press one and hang up"), Pause(4000))
        await stream.until(lambda e: e.type == "call.ended")
    log = await call_log(pool, result)
    assert log["metadata"]["endReason"] == "agent_hangup"
    told = [without_time(event.data) for event in stream.of_type("tool.call")]
    assert [(event["name"], event["arguments"], event["ok"]) for event in told] == [
        ("transfer_call", {"phone_number": "+19005550100"}, False),
        ("send_dtmf", {"digits": "1"}, True),
        ("end_call", {"reason": "the caller is done"}, True),
    ]
    assert told[0]["result"].startswith("error: +19005550100 is not a number this agent may transfer to.")
    assert [event["result"] for event in told[1:]] == [DTMF_SENT, CALL_ENDS]
    assert all(event["callLogId"] == log["id"] for event in told)


async def test_an_agent_turn_cut_by_the_caller_says_what_was_said_and_what_was_heard(
    engine: str, fakes: Fakes, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Cut")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hi.")
    long_reply = (
        "We are open every weekday from eight in the morning until six in the evening, and on Saturdays "
        "from nine until one, except on public holidays when the whole clinic stays closed all day long."
    )
    fakes.deepgram.transcripts.extend(["What are your hours?", "Thanks, that's all."])
    fakes.openai.replies.extend([long_reply, "You're welcome."])
    async with (
        aiohttp.ClientSession() as session,
        EventStream(session, f"{engine}/v1/live-calls/events", tenant.owner_key) as stream,
    ):
        await call(
            engine, number, Say("What are your hours"), Say("thanks that is all", barge_in_after_ms=2500), Pause(300)
        )
        await stream.until(lambda e: e.type == "call.ended")
    cut = [event.data for event in stream.of_type("agent.turn") if event.data["interrupted"]]
    assert len(cut) == 1
    assert cut[0]["text"] == long_reply
    assert long_reply.startswith(cut[0]["spokenText"]) and len(cut[0]["spokenText"]) < len(long_reply) // 2
    speaking = [event.data["text"] for event in stream.of_type("agent.speaking")]
    assert speaking[0] == "Hi." and long_reply.startswith(speaking[1])  # each piece as it starts playing


async def realtime_line(pool: asyncpg.Pool, organization_id: str, number: str, **configuration: Any) -> str:
    """`number` answered by a new speech-to-speech agent that has the caller's turns transcribed (and the rest of its
    `configuration`, e.g. transfer rules)."""
    line = await phone_numbers.create_phone_number(pool, organization_id=organization_id, phone_number=number)
    await agents.create_agent(
        pool,
        organization_id=organization_id,
        name=f"realtime agent {number}",
        status=AgentStatus.ACTIVE,
        caller_type=CallerType.INBOUND,
        phone_number_id=line.id,
        configuration=parse_agent_configuration(
            {"realtime": {"provider": "openai", "transcription_model": "gpt-4o-mini-transcribe"}, **configuration}
        ).to_json(),
    )
    return line.phone_number


@asynccontextmanager
async def realtime_engine(db_url: str, realtime: FakeRealtime) -> AsyncIterator[str]:
    """An engine whose speech-to-speech agents talk to the Realtime fake."""
    async with running_engine(
        db_url, twilio_auth_token=TOKEN, openai_api_key=OPENAI_KEY, openai_base_url=realtime.base_url
    ) as base:
        yield base


async def test_a_speech_to_speech_call_streams_its_turns_and_the_callers_words_as_they_come(
    db_url: str, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Realtime")
    number = await realtime_line(pool, tenant.organization_id, "+15555579001")
    async with FakeRealtime(api_key=OPENAI_KEY) as realtime:
        realtime.caller_says("What time do you open?")
        realtime.reply("We open at nine.")
        async with (
            realtime_engine(db_url, realtime) as base,
            aiohttp.ClientSession() as session,
            EventStream(session, f"{base}/v1/live-calls/events", tenant.owner_key) as stream,
        ):
            await call(base, number, Say("what time do you open"), Pause(300))
            await stream.until(lambda e: e.type == "call.ended")
    told = [
        (event.type, event.data["turnIndex"], event.data["text"])
        for event in stream.events
        if event.type in ("caller.final", "agent.speaking", "agent.turn")
    ]
    assert told == [
        ("caller.final", 0, "What time do you open?"),
        ("agent.speaking", 1, "We open at nine."),
        ("agent.turn", 1, "We open at nine."),
    ]
    assert [event.data["turnIndex"] for event in stream.of_type("turn.latency")] == [1]
    # The caller's words as the transcription's deltas bring them, before the final.
    spoken = [event.type for event in stream.events if event.type in ("caller.interim", "caller.final")]
    assert spoken == ["caller.interim"] * 5 + ["caller.final"]
    assert [event.data["text"] for event in stream.of_type("caller.interim")] == [
        "What",
        "What time",
        "What time do",
        "What time do you",
        "What time do you open?",
    ]


async def test_the_built_in_functions_a_speech_to_speech_model_calls_are_events(
    db_url: str, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Realtime functions")
    number = await realtime_line(pool, tenant.organization_id, "+15555579003")
    async with FakeRealtime(api_key=OPENAI_KEY) as realtime:
        realtime.caller_says("Press one for me, then hang up.")
        realtime.reply_tool("send_dtmf", {"digits": "1"})
        realtime.reply_tool("end_call", {"reason": "the caller is done"}, text="Goodbye.")
        async with (
            realtime_engine(db_url, realtime) as base,
            aiohttp.ClientSession() as session,
            EventStream(session, f"{base}/v1/live-calls/events", tenant.owner_key) as stream,
        ):
            result = await call(base, number, Say("press one then hang up"), Pause(3000))
            await stream.until(lambda e: e.type == "call.ended")
    log = await call_log(pool, result)
    assert log["metadata"]["endReason"] == "agent_hangup"
    assert [without_time(event.data) for event in stream.of_type("tool.call")] == [
        {"callLogId": log["id"], "name": "send_dtmf", "arguments": {"digits": "1"}, "ok": True, "result": DTMF_SENT},
        {
            "callLogId": log["id"],
            "name": "end_call",
            "arguments": {"reason": "the caller is done"},
            "ok": True,
            "result": CALL_ENDS,
        },
    ]
