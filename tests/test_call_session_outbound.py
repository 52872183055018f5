"""Outbound turn-taking: with wait-for-greeting the agent lets the callee answer first ("Hello?"), and still speaks
if they stay silent. Driven directly on a CallSession with a scripted Twilio line and the cloud fakes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from config.agent import parse_agent_configuration
from config.settings import load_settings
from engine.call.cascade import pipeline_driver
from engine.call.session import GREETING_WAIT_SECONDS, CallContext, CallSession
from pipelines.clients import ProviderClients
from pipelines.registry import ProviderContext, ProviderKeys, build_pipeline
from storage.call_turns import CallTurn, list_turns
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.openai_chat import FakeOpenAI
from tests.test_call_log_writer import new_call, writer_for
from tests.test_realtime_session import TwilioLine, speech, until

FIRST = "Hi, this is Dana from Acme Dental about your appointment."


@asynccontextmanager
async def outbound_call(pool: asyncpg.Pool, **behaviour: Any) -> AsyncIterator[tuple[TwilioLine, FakeOpenAI, Any]]:
    """An outbound CallSession on Deepgram + OpenAI fakes and eSpeak; yields (line, fake OpenAI, turns getter)."""
    async with FakeDeepgram(api_key="dg", transcripts=["Hello?"]) as deepgram, FakeOpenAI(api_key="sk") as openai:
        settings = load_settings(
            deepgram_api_key="dg", openai_api_key="sk", deepgram_url=deepgram.url, openai_base_url=openai.base_url
        )
        config = parse_agent_configuration(
            {
                "stt": {"provider": "deepgram", "endpointing": 300},
                "llm": {"provider": "openai"},
                "tts": {"provider": "espeak"},
                "firstSentence": FIRST,
                **behaviour,
            }
        )
        clients = ProviderClients()
        pipeline = build_pipeline(
            config, context=ProviderContext(keys=ProviderKeys(settings, organization_id=None), clients=clients)
        )
        line = TwilioLine()
        log, agent_id = await new_call(pool)
        writer = writer_for(pool, log)
        session = CallSession(
            context=CallContext(log.id, log.organization_id, agent_id, line.call_sid, outbound=True),
            config=config,
            driver=pipeline_driver(pipeline, first_sentence=config.first_sentence),
            stream=line.stream(),
            send=line.send,
            writer=writer,
        )
        line.start()
        task = asyncio.create_task(session.run(line.frames()))

        async def turns() -> list[CallTurn]:
            return await list_turns(pool, organization_id=log.organization_id, call_log_id=log.id)

        try:
            yield line, openai, turns
        finally:
            line.hang_up()
            outcome = await asyncio.wait_for(task, 15)
            await line.stop()
            await writer.finish(outcome)
            await clients.aclose()


async def test_the_agent_waits_for_the_callees_hello_then_says_its_first_sentence(pool: asyncpg.Pool) -> None:
    async with outbound_call(pool) as (line, openai, turns):
        await asyncio.sleep(1.0)
        assert line.agent_bytes_received == 0, "the agent spoke before the callee answered"
        line.say(speech(600))
        await until(lambda: line.agent_bytes_received > 0)
        await until(lambda: line.playback.queued_bytes == 0 and line.heard > 0, timeout=15)
        await asyncio.sleep(0.3)
        recorded = [(t.speaker, t.text) for t in await turns()]
    assert recorded == [("caller", "Hello?"), ("agent", FIRST)]
    assert openai.requests == []  # a first sentence is said as written, not asked of the model


async def test_a_silent_callee_still_hears_the_agent(pool: asyncpg.Pool) -> None:
    async with outbound_call(pool) as (line, _, turns):
        await until(lambda: line.agent_bytes_received > 0, timeout=GREETING_WAIT_SECONDS + 5)
        await until(lambda: line.playback.queued_bytes == 0, timeout=15)
        await asyncio.sleep(0.3)
        recorded = [(t.speaker, t.text) for t in await turns()]
    assert recorded == [("agent", FIRST)]


async def test_without_wait_for_greeting_the_agent_speaks_first(pool: asyncpg.Pool) -> None:
    async with outbound_call(pool, endpointing={"waitForGreeting": False}) as (line, _, _turns):
        await until(lambda: line.agent_bytes_received > 0, timeout=2.5)
