"""A speculative reply does nothing anyone could notice before the caller's turn is confirmed: a tool's webhook, an
opt-out and the tool.call event of a built-in function wait for the confirmation, and a discarded speculation never
does them. Real loopback HTTP for the
webhook, a real pipeline call (scripted Twilio line, fake Deepgram and OpenAI, eSpeak NG, test database) for the
opt-out."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
from aiohttp import web

from pipelines.conversation.confirmation import hold_side_effects_until, turn_confirmed
from pipelines.tools import CALL_ENDS, AgentFunction, FunctionSpec, ToolRunner
from tests.test_call_drivers import call_on
from tests.test_realtime_session import speech
from tests.test_speculative_replies import silence


async def test_turn_confirmed_returns_at_once_outside_a_speculative_reply() -> None:
    await asyncio.wait_for(turn_confirmed(), 1)


async def test_a_tool_webhook_waits_for_the_turn_and_a_discarded_reply_never_calls_it() -> None:
    hits: list[dict[str, object]] = []

    async def hook(request: web.Request) -> web.Response:
        hits.append(await request.json())
        return web.json_response({"booked": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    function = AgentFunction(
        tool_id="t1",
        spec=FunctionSpec("book_table", "Book a table.", {"type": "object"}),
        url=f"http://127.0.0.1:{port}/hook",
        method="POST",
        headers={},
        timeout_seconds=5,
    )
    try:
        async with aiohttp.ClientSession() as session:
            tools = ToolRunner([function], call={"callLogId": "c1"}, session=session, allow_private=True)

            async def speculative_reply(confirmed: asyncio.Event) -> str:
                hold_side_effects_until(confirmed)
                return await tools.run("book_table", {"people": 2})

            discarded = asyncio.create_task(speculative_reply(asyncio.Event()))
            await asyncio.sleep(0.2)
            assert not discarded.done() and hits == []  # held: the caller's turn is not confirmed
            discarded.cancel()  # the caller spoke on
            await asyncio.gather(discarded, return_exceptions=True)
            assert hits == []

            confirmed = asyncio.Event()
            used = asyncio.create_task(speculative_reply(confirmed))
            await asyncio.sleep(0.2)
            assert hits == []
            confirmed.set()
            assert '"booked"' in await asyncio.wait_for(used, 5)
            assert hits == [{"function": "book_table", "arguments": {"people": 2}, "call": {"callLogId": "c1"}}]
            # The hold belonged to those tasks only: this one runs the tool at once.
            await tools.run("book_table", {"people": 3})
            assert len(hits) == 2
    finally:
        await runner.cleanup()


async def test_a_built_in_function_is_told_once_the_turn_is_confirmed_and_never_for_a_discarded_reply() -> None:
    told: list[str] = []
    async with aiohttp.ClientSession() as session:
        tools = ToolRunner([], call={}, session=session, observe=lambda name, _arguments, _result: told.append(name))

        async def speculative_reply(confirmed: asyncio.Event) -> None:
            hold_side_effects_until(confirmed)
            await tools.carried_out("end_call", {"reason": "done"}, CALL_ENDS)

        discarded = asyncio.create_task(speculative_reply(asyncio.Event()))
        await asyncio.sleep(0.1)
        discarded.cancel()  # the caller spoke on
        await asyncio.gather(discarded, return_exceptions=True)
        assert told == []

        confirmed = asyncio.Event()
        used = asyncio.create_task(speculative_reply(confirmed))
        await asyncio.sleep(0.1)
        assert told == []  # held: the caller's turn is not confirmed
        confirmed.set()
        await asyncio.wait_for(used, 5)
        assert told == ["end_call"]


async def test_a_discarded_speculative_opt_out_lists_nobody(pool: asyncpg.Pool) -> None:
    async with call_on("pipeline", pool) as rig:
        await pool.execute('UPDATE "CallLog" SET "phoneNumber" = $2 WHERE "id" = $1', rig.log.id, "+14155550123")
        rig.openai.first_token_delay_ms = 0  # the opt-out reaches the engine before the caller goes on
        rig.reply(tool="opt_out", arguments={"reason": "asked to stop"})
        rig.reply("Four people, certainly.")
        rig.deepgram.transcripts.append("Stop. | I mean, a table for four people, please.")
        rig.line.say(speech(600) + silence(260) + speech(600))
        turns = await rig.wait_for_turns(2)
        assert [(t.speaker, t.text) for t in turns] == [
            ("caller", "Stop. I mean, a table for four people, please."),
            ("agent", "Four people, certainly."),
        ]
        listed = await pool.fetchval(
            'SELECT count(*) FROM "DoNotCallEntry" WHERE "organizationId" = $1', rig.log.organization_id
        )
        assert listed == 0
        assert len(rig.openai.requests) == 2  # the opt-out was the discarded speculation's answer
