"""Conversation paths in real calls: the session on a scripted Twilio line, the providers' fakes (Deepgram, OpenAI
chat, Realtime), the agent's webhook Tool on loopback, and the path, agent, campaign and turns in the database.

The call is prepared as the media socket prepares it (`prepare_call`: the campaign's path, else the agent's
default; the agent's Tools), so which path a call follows is decided by the stored rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from config.agent import parse_agent_configuration
from config.settings import load_settings
from engine.call.call_log_writer import CallLogWriter, CallOutcome
from engine.call.cascade import pipeline_driver
from engine.call.driver import DriverFactory
from engine.call.realtime import realtime_driver
from engine.call.session import CallContext, CallSession
from engine.call.setup import prepare_call
from engine.server import metrics
from pipelines.clients import ProviderClients
from pipelines.registry import build_pipeline, realtime_path
from storage import agents, call_logs, campaigns, conversation_paths, tools
from storage.call_logs import CallLog
from storage.call_turns import CallTurn, list_turns
from storage.end_reasons import EndReason
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.openai_chat import FakeOpenAI, ToolCall
from tests.fakes.openai_realtime import FakeRealtime
from tests.fakes.server import serve
from tests.paths import (
    ANSWER_FALLBACK,
    ASK_ACCOUNT,
    EVERY_TYPE_EDGES,
    EVERY_TYPE_NODES,
    GOODBYE,
    GREETING,
    HUMAN,
    ORDER,
    TRANSFER_TO,
)
from tests.test_call_log_writer import new_call, writer_for
from tests.test_realtime_session import TwilioLine, speech

OPENAI_KEY = "sk-paths"
BALANCE = "Your balance is twelve dollars."


@dataclass
class AccountService:
    """The agent's account-lookup webhook: answers every POST with `reply` (or `status`), keeps what it was sent."""

    reply: dict[str, Any] = field(default_factory=lambda: {"balance": "$12"})
    status: int = 200
    received: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        """One call of the lookup_account function."""
        self.received.append(await request.json())
        return web.json_response(self.reply, status=self.status)


@dataclass
class PathRig:
    """One call on a path: its line, CallLog, fakes and what Twilio was asked to do."""

    line: TwilioLine
    log: CallLog
    task: asyncio.Task[CallOutcome]
    pool: asyncpg.Pool
    openai: FakeOpenAI
    deepgram: FakeDeepgram
    realtime: FakeRealtime
    accounts: AccountService
    writer: CallLogWriter
    path_id: str
    hang_ups: list[str] = field(default_factory=list)
    transfers: list[tuple[str, str]] = field(default_factory=list)

    def caller_says(self, transcript: str, ms: int = 600) -> None:
        """The caller speaks; the recognizer hears `transcript`."""
        self.deepgram.transcripts.append(transcript)
        self.line.say(speech(ms))

    async def turns(self) -> list[CallTurn]:
        """The call's turns as stored now."""
        return await list_turns(self.pool, organization_id=self.log.organization_id, call_log_id=self.log.id)

    async def wait_for_turns(self, count: int, timeout: float = 15.0) -> list[CallTurn]:
        """At least `count` turns, stored while the call runs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(turns := await self.turns()) < count:
            assert loop.time() < deadline, f"only {len(turns)} of {count} turns were recorded: {turns}"
            await asyncio.sleep(0.05)
        return turns

    async def outcome(self, timeout: float = 20.0) -> CallOutcome:
        """How the call ended."""
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def stored(self) -> CallLog:
        """The CallLog as stored now."""
        return await call_logs.get_call_log(
            self.pool, organization_id=self.log.organization_id, call_log_id=self.log.id
        )


def trace(turns: list[CallTurn]) -> list[tuple[str, str, str | None, str | None]]:
    """Each turn's speaker, text, node and edge."""
    return [(turn.speaker, turn.text, turn.path_node_id, turn.path_edge_id) for turn in turns]


@asynccontextmanager
async def path_call(
    pool: asyncpg.Pool,
    llm: dict[str, Any],
    *,
    campaign_path: bool = False,
    accounts: AccountService | None = None,
) -> AsyncIterator[PathRig]:
    """A call of an agent whose default path has a node of every type (with `campaign_path`, the agent's default
    is a decoy and the call's campaign names the real path); the llm stage is `llm`."""
    accounts = accounts or AccountService()
    async with AsyncExitStack() as stack:
        deepgram = await stack.enter_async_context(FakeDeepgram(api_key="dg"))
        openai = await stack.enter_async_context(FakeOpenAI(api_key=OPENAI_KEY))
        realtime = await stack.enter_async_context(FakeRealtime(api_key=OPENAI_KEY))
        stages: dict[str, Any] = {"stt": {"provider": "deepgram", "endpointing": 300}, "llm": llm}
        if llm.get("provider") == "realtime":
            stages = {
                "realtime": {"provider": "openai", "silence_duration_ms": 300, "transcription_model": "whisper-1"}
            }
        app = web.Application()
        app.router.add_post("/lookup", accounts.handle)
        service_url = await stack.enter_async_context(serve(app))
        config = parse_agent_configuration(
            {
                **stages,
                **({} if "realtime" in stages else {"tts": {"provider": "espeak"}}),
                "prompt": "You are Acme's front desk.",
                "transfer": {"destinations": [{"number": TRANSFER_TO, "label": "A person"}]},
            }
        )
        log, agent_id = await new_call(pool)
        organization_id = log.organization_id
        await agents.update_agent_configuration(
            pool, organization_id=organization_id, agent_id=agent_id, configuration=config.to_json()
        )
        path = await conversation_paths.create_conversation_path(
            pool,
            organization_id=organization_id,
            name="Every node",
            agent_speech="Warm and brief.",
            nodes=EVERY_TYPE_NODES,
            edges=EVERY_TYPE_EDGES,
        )
        decoy = await conversation_paths.create_conversation_path(
            pool,
            organization_id=organization_id,
            name="Decoy",
            nodes=[{"id": "decoy", "type": "end", "data": {"isStart": True, "text": "Wrong path."}}],
        )
        await agents.link_conversation_path(
            pool, organization_id=organization_id, agent_id=agent_id, conversation_path_id=decoy.id
        )
        await agents.link_conversation_path(
            pool, organization_id=organization_id, agent_id=agent_id, conversation_path_id=path.id
        )
        default = decoy.id if campaign_path else path.id
        await agents.set_default_conversation_path(
            pool, organization_id=organization_id, agent_id=agent_id, conversation_path_id=default
        )
        if campaign_path:
            campaign = await campaigns.create_campaign(
                pool,
                organization_id=organization_id,
                batch_name="Renewals",
                agent_id=agent_id,
                conversation_path_id=path.id,
            )
            await pool.execute('UPDATE "CallLog" SET "campaignId" = $1 WHERE "id" = $2', campaign.id, log.id)
            log = await call_logs.get_call_log(pool, organization_id=organization_id, call_log_id=log.id)
        tool = await tools.create_tool(
            pool,
            organization_id=organization_id,
            name="Accounts",
            is_connected=True,
            configuration={
                "function": {"name": "lookup_account", "description": "Look an account up"},
                "webhook": {"url": service_url + "/lookup"},
            },
        )
        await agents.link_tool(pool, organization_id=organization_id, agent_id=agent_id, tool_id=tool.id)
        settings = load_settings(
            deepgram_api_key="dg",
            openai_api_key=OPENAI_KEY,
            deepgram_url=deepgram.url,
            openai_base_url=openai.base_url,
            allow_private_tool_urls=True,
        )
        clients = ProviderClients()
        stack.push_async_callback(clients.aclose)
        bundle = await agents.load_agent_bundle(pool, organization_id=organization_id, agent_id=agent_id)
        prepared = await prepare_call(
            pool,
            settings=settings,
            clients=clients,
            config=config,
            bundle=bundle,
            call_log=log,
            offline_work=prepared_inline(),
        )
        driver: DriverFactory
        if config.realtime:
            driver = realtime_driver(
                client=clients.openai(OPENAI_KEY, realtime.base_url),
                realtime=config.realtime[0],
                instructions=prepared.context.instructions,
                tools=prepared.context.tools,
                path=realtime_path(prepared.paths, prepared.context),
            )
        else:
            pipeline = build_pipeline(config, context=prepared.context, paths=prepared.paths, voice=prepared.voice)
            driver = pipeline_driver(pipeline, first_sentence=None)
        line = TwilioLine()
        writer = writer_for(pool, log)
        hang_ups: list[str] = []
        transfers: list[tuple[str, str]] = []

        async def hang_up(call_sid: str) -> bool:
            hang_ups.append(call_sid)
            line.hang_up()
            return True

        async def transfer(call_sid: str, to: str) -> bool:
            transfers.append((call_sid, to))
            line.hang_up()
            return True

        session = CallSession(
            context=CallContext(log.id, organization_id, agent_id, line.call_sid),
            config=config,
            driver=driver,
            stream=line.stream(),
            send=line.send,
            writer=writer,
            hang_up=hang_up,
            transfer=transfer,
        )
        line.start()
        task = asyncio.create_task(session.run(line.frames()))
        rig = PathRig(line, log, task, pool, openai, deepgram, realtime, accounts, writer, path.id, hang_ups, transfers)
        try:
            yield rig
        finally:
            line.hang_up()
            outcome = await rig.outcome()
            await line.stop()
            await writer.finish(outcome)


def prepared_inline() -> Any:
    """Offline providers decode inline (this test's providers are the cloud fakes and eSpeak)."""
    from pipelines.offline_workers import INLINE

    return INLINE


def node_calls(path_id: str, node: str) -> float:
    """How many calls reached `node` of the path, from the engine's metrics."""
    value = metrics.REGISTRY.get_sample_value("dialtone_path_node_calls_total", {"path": path_id, "node": node})
    return value or 0.0


def edge_calls(path_id: str, edge: str) -> float:
    """How many calls took `edge` of the path, from the engine's metrics."""
    value = metrics.REGISTRY.get_sample_value("dialtone_path_edge_calls_total", {"path": path_id, "edge": edge})
    return value or 0.0


def follow(way: str, **variables: str) -> ToolCall:
    """The model calls follow_path."""
    arguments: dict[str, Any] = {"way": way}
    if variables:
        arguments["variables"] = variables
    return ToolCall("follow_path", arguments)


# --------------------------------------------------------------------------------------------------- OpenAI


async def test_openai_walks_speak_gather_webhook_prompt_and_end_with_the_trace_stored_as_it_goes(
    pool: asyncpg.Pool,
) -> None:
    async with path_call(pool, {"provider": "openai"}) as rig:
        turns = await rig.wait_for_turns(1)
        assert trace(turns) == [("agent", GREETING, "greet", None)]  # said verbatim, no completion asked
        assert rig.openai.requests == []

        rig.openai.replies.append([follow("to-billing")])
        rig.caller_says("It's about my bill.")
        turns = await rig.wait_for_turns(3)
        assert trace(turns)[1:] == [
            ("caller", "It's about my bill.", "greet", None),
            ("agent", ASK_ACCOUNT, "account", "to-billing"),
        ]
        request = rig.openai.requests[0]
        system = request["messages"][0]["content"]
        assert "You are Acme's front desk." in system and "Warm and brief." in system and "'greet'" in system
        (offered,) = [tool for tool in request["tools"] if tool["function"]["name"] == "follow_path"]
        assert offered["function"]["parameters"]["properties"]["way"]["enum"] == [
            "to-billing",
            "to-order",
            "global:human",
        ]
        assert "Billing" in offered["function"]["description"]

        rig.openai.replies.append(BALANCE)  # the prompt node: the model speaks from its instructions
        for key in "1234":
            rig.line.press(key)
        turns = await rig.wait_for_turns(8)
        assert rig.accounts.received[0]["function"] == "lookup_account"
        assert rig.accounts.received[0]["arguments"] == {"account": "1234"}
        assert trace(turns)[3:8] == [
            ("caller", "[DTMF 1]", "account", None),
            ("caller", "[DTMF 2]", "account", None),
            ("caller", "[DTMF 3]", "account", None),
            ("caller", "[DTMF 4]", "account", None),
            ("agent", BALANCE, "billing", "found"),
        ]
        assert len(rig.openai.requests) == 2  # no completion for the keys: the gather node collected them
        system = rig.openai.requests[1]["messages"][0]["content"]
        assert "Tell the caller their balance" in system and '{"balance": "$12"}' in system
        stored = await rig.stored()
        assert stored.metadata["conversationPath"]["id"] == rig.path_id
        assert stored.metadata["conversationPath"]["node"] == "billing"

        rig.openai.replies.append(["Glad to help.", follow("billing-done")])
        rig.caller_says("Thanks, bye.")
        outcome = await rig.outcome()

    turns = await rig.turns()
    assert trace(turns)[-1] == ("agent", f"Glad to help. {GOODBYE}", "goodbye", "billing-done")
    assert outcome.end_reason == EndReason.PATH_END and rig.hang_ups == [rig.line.call_sid]
    stored = await rig.stored()
    assert stored.metadata["conversationPath"] == {
        "id": rig.path_id,
        "node": "goodbye",
        "variables": {"account": "1234", "balance": '{"balance": "$12"}'},
    }
    assert node_calls(rig.path_id, "lookup") == 1 and edge_calls(rig.path_id, "found") == 1


async def test_a_failing_webhook_routes_on_failure_and_ends_the_call(pool: asyncpg.Pool) -> None:
    async with path_call(pool, {"provider": "openai"}, accounts=AccountService(status=500)) as rig:
        await rig.wait_for_turns(1)
        rig.openai.replies.append([follow("to-billing")])
        rig.caller_says("billing.")
        await rig.wait_for_turns(3)
        for key in "42#":
            rig.line.press(key)
        outcome = await rig.outcome()
    turns = await rig.turns()
    assert trace(turns)[-1] == ("agent", "Sorry, our system is down. " + GOODBYE, "lookup-failed", "not-found")
    assert outcome.end_reason == EndReason.PATH_END


@pytest.mark.parametrize("arguments", [{"way": "to-nowhere"}, {}])
async def test_a_wrong_or_missing_way_is_explained_to_the_model_and_the_call_goes_on(
    pool: asyncpg.Pool, arguments: dict[str, Any]
) -> None:
    async with path_call(pool, {"provider": "openai"}) as rig:
        await rig.wait_for_turns(1)
        rig.openai.replies.extend([[ToolCall("follow_path", arguments)], "Sorry, was that billing or an order?"])
        rig.caller_says("Something else.")
        turns = await rig.wait_for_turns(3)
        assert trace(turns)[2] == ("agent", "Sorry, was that billing or an order?", "greet", None)
        told = [m["content"] for m in rig.openai.requests[-1]["messages"] if m["role"] == "tool"]
        assert len(told) == 1 and told[0].startswith("error: there is no way")
        assert "to-billing, to-order, global:human" in told[0]

        rig.openai.replies.append([follow("to-order")])
        rig.caller_says("An order.")
        rig.openai.replies.append("Which order is it?")  # the prompt node: the model speaks
        turns = await rig.wait_for_turns(5)
        assert trace(turns)[4] == ("agent", "Which order is it?", "order", "to-order")
        (offered,) = [t for t in rig.openai.requests[-1]["tools"] if t["function"]["name"] == "follow_path"]
        asked = offered["function"]["parameters"]["properties"]["variables"]["properties"]
        assert asked == {"order_number": {"type": "string", "description": "The order's number"}}

        rig.openai.replies.append(["Noted.", follow("order-named", order_number="A-42")])  # moves and extracts
        rig.caller_says("It is order A 42.")
        turns = await rig.wait_for_turns(7)
        assert trace(turns)[6] == ("agent", "Noted.", "listen", "order-named")  # the wait node says nothing more
    stored = await rig.stored()  # the caller hung up at the wait node: the trace kept where the call ended
    assert stored.metadata["conversationPath"] == {
        "id": rig.path_id,
        "node": "listen",
        "variables": {"order_number": "A-42"},
    }


async def test_a_global_node_reached_by_the_model_transfers_to_the_allowed_number(pool: asyncpg.Pool) -> None:
    async with path_call(pool, {"provider": "openai"}) as rig:
        await rig.wait_for_turns(1)
        rig.openai.replies.append([follow("global:human")])
        rig.caller_says("Can I talk to a human?")
        outcome = await rig.outcome()
    turns = await rig.turns()
    assert trace(turns)[-1] == ("agent", HUMAN, "transfer", "to-person")
    assert outcome.end_reason == EndReason.TRANSFERRED
    assert rig.transfers == [(rig.line.call_sid, TRANSFER_TO)]
    assert edge_calls(rig.path_id, "global:human") >= 1


# --------------------------------------------------------------------------------------------------- offline


async def test_the_offline_model_walks_prompt_wait_knowledge_and_press_digits(pool: asyncpg.Pool) -> None:
    async with path_call(pool, {"provider": "conversation_path"}) as rig:
        await rig.wait_for_turns(1)
        rig.caller_says("I am calling about an order.")
        await rig.wait_for_turns(3)
        rig.caller_says("It is order seven.")  # the wait node: nothing said
        await rig.wait_for_turns(4)  # its turn ended (a caller speaking on sooner would continue it)
        rig.caller_says("When will it arrive.")
        turns = await rig.wait_for_turns(6)
        assert trace(turns) == [
            ("agent", GREETING, "greet", None),
            ("caller", "I am calling about an order.", "greet", None),
            ("agent", ORDER, "order", "to-order"),
            ("caller", "It is order seven.", "order", None),
            ("caller", "When will it arrive.", "listen", None),
            ("agent", ANSWER_FALLBACK, "kb", "heard"),  # no knowledge bases yet: the fallback line
        ]
        heard_before = rig.line.agent_bytes_received
        rig.caller_says("Take me to the menu.")
        outcome = await rig.outcome()
    turns = await rig.turns()
    assert trace(turns)[-1] == ("agent", f"[DTMF 1w2] {GOODBYE}", "goodbye", "menu-done")  # the tones, then goodbye
    assert outcome.end_reason == EndReason.PATH_END
    assert node_calls(rig.path_id, "menu") >= 1  # the press-digits node was passed through
    assert rig.line.agent_bytes_received - heard_before > 8 * 700  # two tones, a half-second pause, the goodbye
    assert rig.openai.requests == []


async def test_a_campaigns_path_overrides_the_agents_default(pool: asyncpg.Pool) -> None:
    async with path_call(pool, {"provider": "conversation_path"}, campaign_path=True) as rig:
        turns = await rig.wait_for_turns(1)
        assert trace(turns) == [("agent", GREETING, "greet", None)]
    async with path_call(pool, {"provider": "conversation_path"}) as rig:
        turns = await rig.wait_for_turns(1)
        assert trace(turns) == [("agent", GREETING, "greet", None)]


# --------------------------------------------------------------------------------------------------- Realtime


async def test_the_realtime_model_follows_the_path_through_session_updates(pool: asyncpg.Pool) -> None:
    async with path_call(pool, {"provider": "realtime"}) as rig:
        fake = rig.realtime
        fake.reply(GREETING)  # the start node's words, said exactly
        turns = await rig.wait_for_turns(1)
        assert trace(turns) == [("agent", GREETING, "greet", None)]
        update = fake.of_type("session.update")[-1]["session"]
        assert "'greet'" in update["instructions"] and "Warm and brief." in update["instructions"]
        assert "follow_path" in {tool["name"] for tool in update["tools"]}

        fake.reply_tool("follow_path", {"way": "to-billing"})
        fake.reply(ASK_ACCOUNT)  # the gather node's words, said exactly
        fake.caller_says("It's about billing")
        rig.line.say(speech(600))
        turns = await rig.wait_for_turns(3)
        assert trace(turns)[2][1:3] == (ASK_ACCOUNT, "account")
        assert "'account'" in fake.of_type("session.update")[-1]["session"]["instructions"]

        fake.reply(BALANCE)  # the prompt node: the model speaks from the new instructions
        for key in "1234":
            rig.line.press(key)
        turns = await rig.wait_for_turns(8)
        assert rig.accounts.received[0]["arguments"] == {"account": "1234"}
        assert trace(turns)[7][1:3] == (BALANCE, "billing")
        assert "Tell the caller their balance" in fake.of_type("session.update")[-1]["session"]["instructions"]
        assert not any("pressed" in str(item) for item in fake.of_type("conversation.item.create"))

        fake.reply_tool("follow_path", {"way": "billing-done"})
        fake.reply(GOODBYE)
        fake.caller_says("Thanks, bye")
        rig.line.say(speech(600))
        outcome = await rig.outcome()
    assert outcome.end_reason == EndReason.PATH_END
    assert (await rig.turns())[-1].text == GOODBYE
