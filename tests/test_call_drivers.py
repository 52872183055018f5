"""The same call behaviours through both conversation drivers: the pipeline (Deepgram → OpenAI → eSpeak fakes) and
speech to speech (the Realtime fake), each on one CallSession with a scripted Twilio line in real time and the
CallLog in the test database. Whatever the driver, a call behaves the same to the caller and in its record.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from config.agent import AgentConfiguration, parse_agent_configuration
from config.settings import load_settings
from engine.call import caller_reads
from engine.call.call_log_writer import CallLogWriter, CallOutcome
from engine.call.caller_reads import RELAXED_LOW_WATER, CallerReads
from engine.call.cascade import pipeline_driver
from engine.call.driver import CallHost, ConversationDriver, DriverFactory
from engine.call.media_socket import record_opt_out
from engine.call.realtime import realtime_driver
from engine.call.session import CREDIT_MINUTE_SECONDS, GREETING_WAIT_SECONDS, CallContext, CallSession
from engine.workers.post_call import PostCallDeps, analyze_call
from media.g711 import BYTES_PER_MS, FRAME_MS
from pipelines.clients import ProviderClients
from pipelines.registry import ProviderContext, ProviderKeys, build_pipeline
from pipelines.tools import ToolRunner
from storage import agents, credit_reservations, organizations
from storage.call_logs import CallLog
from storage.call_turns import CallTurn, list_turns
from storage.end_reasons import EndReason
from storage.enums import CallStatus
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.openai_chat import FakeOpenAI, ToolCall
from tests.fakes.openai_realtime import FakeRealtime
from tests.fakes.server import serve
from tests.test_call_log_writer import new_call, writer_for
from tests.test_realtime_session import TwilioLine, speech, until, webhook_tools

DRIVERS = ["pipeline", "realtime"]
OPENAI_KEY = "sk-drivers"
LONG_ANSWER = (
    "We are open from nine in the morning to five in the evening on weekdays, "
    "from ten to four on Saturdays, and we are closed on Sundays and public holidays."
)
FIRST = "Hi, this is Dana from Acme Dental."
TRANSFERS = {
    "destinations": [
        {"number": "+14155550199", "label": "Billing"},
        {"pattern": "+44909*******", "label": "UK lines"},
    ]
}
"""Billing by its number, and a pattern that matches only UK premium-rate numbers (which no pattern reaches)."""


@dataclass
class Rig:
    """One call under test on either driver: its Twilio line, session, CallLog, and what Twilio was asked."""

    kind: str
    line: TwilioLine
    session: CallSession
    log: CallLog
    task: asyncio.Task[CallOutcome]
    pool: asyncpg.Pool
    openai: FakeOpenAI
    realtime: FakeRealtime
    deepgram: FakeDeepgram
    writer: CallLogWriter
    hang_ups: list[str] = field(default_factory=list)
    transfers: list[tuple[str, str]] = field(default_factory=list)
    extensions_at: list[float] = field(default_factory=list)
    """When the call asked to extend its credit reservation, in seconds of the call."""
    finished: CallLog | None = None

    async def finish(self) -> CallLog:
        """The caller hangs up (if the call still runs) and the CallLog is finished with the outcome."""
        if self.finished is None:
            self.line.hang_up()
            outcome = await self.outcome()
            await self.line.stop()
            self.finished = await self.writer.finish(outcome)
        return self.finished

    def reply(self, text: str | None = None, *, tool: str | None = None, arguments: Mapping[str, Any] = {}) -> None:
        """Script the agent's next reply: words, then a function call, either or both."""
        if self.kind == "realtime":
            if tool is None:
                self.realtime.reply(text or "")
            else:
                self.realtime.reply_tool(tool, arguments, text=text)
            return
        steps: list[str | ToolCall] = [text] if text else []
        if tool is not None:
            steps.append(ToolCall(tool, dict(arguments)))
        self.openai.replies.append(steps)

    def offered_functions(self) -> set[str]:
        """The names of the functions the model was offered."""
        if self.kind == "realtime":
            return {tool["name"] for tool in self.realtime.of_type("session.update")[0]["session"]["tools"]}
        return {tool["function"]["name"] for tool in self.openai.requests[0]["tools"]}

    def function_results(self) -> list[str]:
        """What the model was told its function calls gave, in order."""
        if self.kind == "realtime":
            items = [event["item"] for event in self.realtime.of_type("conversation.item.create")]
            return [item["output"] for item in items if item["type"] == "function_call_output"]
        messages = self.openai.requests[-1]["messages"]
        return [message["content"] for message in messages if message["role"] == "tool"]

    def expect_line(self, text: str) -> None:
        """A line the engine will have the agent say word for word (the Realtime fake speaks it when asked)."""
        if self.kind == "realtime":
            self.realtime.reply(text)

    def caller_says(self, transcript: str, ms: int = 600) -> None:
        """The caller speaks; the recognizer (or the model's transcription) hears `transcript`."""
        if self.kind == "realtime":
            self.realtime.caller_says(transcript)
        else:
            self.deepgram.transcripts.append(transcript)
        self.line.say(speech(ms))

    async def outcome(self, timeout: float = 20.0) -> CallOutcome:
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def turns(self) -> list[CallTurn]:
        return await list_turns(self.pool, organization_id=self.log.organization_id, call_log_id=self.log.id)

    async def wait_for_turns(self, count: int, timeout: float = 15.0) -> list[CallTurn]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(turns := await self.turns()) < count:
            assert loop.time() < deadline, f"only {len(turns)} of {count} turns were recorded: {turns}"
            await asyncio.sleep(0.05)
        return turns


PIPELINE: dict[str, Any] = {
    "stt": {"provider": "deepgram", "endpointing": 300},
    "llm": {"provider": "openai"},
    "tts": {"provider": "espeak"},
}


def configuration(kind: str, **behaviour: Any) -> AgentConfiguration:
    stages: dict[str, Any]
    if kind == "realtime":
        stages = {"realtime": {"provider": "openai", "silence_duration_ms": 300, "transcription_model": "whisper-1"}}
    else:
        stages = dict(PIPELINE)
    return parse_agent_configuration({**stages, "prompt": "You are the front desk.", **behaviour})


@asynccontextmanager
async def call_on(
    kind: str,
    pool: asyncpg.Pool,
    *,
    outbound: bool = False,
    max_duration_s: int | None = None,
    credits: int = 100,
    credit_minute_s: float | None = None,
    low_water: LowWaterLog | None = None,
    clock: Callable[[], float] = time.monotonic,
    driver_start_s: float = 0.0,
    driver_close_s: float = 0.0,
    extension_s: float = 0.0,
    engine_settings: Mapping[str, Any] = {},
    transfer_answer_after_stop: bool | None = None,
    tools: ToolRunner | None = None,
    **behaviour: Any,
) -> AsyncIterator[Rig]:
    """Run a call on `kind`'s driver; on exit the caller hangs up if it still runs and the CallLog is finished.

    With `credit_minute_s`, the call extends its credit reservation as the engine's do, that often. With
    `low_water`, the call paces the reading of its socket, `low_water` standing in for the socket. The call keeps
    time by `clock`; its driver takes `driver_start_s` longer to start (a provider slow to connect) and
    `driver_close_s` longer to close, and each extension `extension_s` longer to be answered (a database under
    load). The engine's settings are the test's fakes' plus `engine_settings`. Twilio answers a transfer request at
    once, then leaves the stream; with `transfer_answer_after_stop` it leaves the stream first, and answers so once
    the engine has read its `stop`. `tools` are the agent's own functions."""
    async with AsyncExitStack() as stack:
        deepgram = await stack.enter_async_context(FakeDeepgram(api_key="dg"))
        openai = await stack.enter_async_context(FakeOpenAI(api_key=OPENAI_KEY))
        realtime = await stack.enter_async_context(FakeRealtime(api_key=OPENAI_KEY))
        config = configuration(kind, **behaviour)
        if max_duration_s is not None:  # below the configuration's minimum, for a test that must not wait 10 s
            config = config.model_copy(update={"max_duration_seconds": max_duration_s})
        log, agent_id = await new_call(pool, credits=credits)
        await agents.update_agent_configuration(
            pool, organization_id=log.organization_id, agent_id=agent_id, configuration=config.to_json()
        )
        settings = load_settings(
            deepgram_api_key="dg",
            openai_api_key=OPENAI_KEY,
            deepgram_url=deepgram.url,
            openai_base_url=openai.base_url,
            **engine_settings,
        )
        clients = ProviderClients()
        stack.push_async_callback(clients.aclose)
        context = ProviderContext(
            keys=ProviderKeys(settings, organization_id=None), clients=clients, instructions="Front desk.", tools=tools
        )
        driver: DriverFactory
        fallback: DriverFactory | None = None
        if config.realtime_fallback:
            built = build_pipeline(config, context=context)
            fallback = pipeline_driver(built, first_sentence=config.first_sentence)
        if kind == "realtime":
            client = clients.openai(OPENAI_KEY, realtime.base_url)
            assert config.realtime
            driver = realtime_driver(
                client=client,
                realtime=config.realtime[0],
                instructions="You are the front desk.",
                tools=tools,
                first_sentence=config.first_sentence,
            )
        else:
            pipeline = build_pipeline(config, context=context)
            driver = pipeline_driver(pipeline, first_sentence=config.first_sentence)
        if driver_start_s or driver_close_s:
            driver = slowed(driver, start_s=driver_start_s, close_s=driver_close_s)
        line = TwilioLine()
        writer = writer_for(pool, log)
        hang_ups: list[str] = []
        transfers: list[tuple[str, str]] = []
        extensions_at: list[float] = []
        began = clock()

        async def extend_reservation() -> bool:
            extensions_at.append(clock() - began)
            await asyncio.sleep(extension_s)
            return await credit_reservations.extend_reservation(pool, call_log_id=log.id)

        async def hang_up(call_sid: str) -> bool:
            hang_ups.append(call_sid)
            line.hang_up()
            return True

        async def transfer(call_sid: str, to: str) -> bool:
            transfers.append((call_sid, to))
            line.hang_up()  # the call leaves the stream for the <Dial>
            if transfer_answer_after_stop is None:
                return True
            await line.read_to_close()
            return transfer_answer_after_stop

        stream = line.stream()
        session = CallSession(
            context=CallContext(log.id, log.organization_id, agent_id, line.call_sid, outbound=outbound),
            config=config,
            driver=driver,
            fallback=fallback,
            stream=stream,
            send=line.send,
            writer=writer,
            hang_up=hang_up,
            transfer=transfer,
            extend_reservation=extend_reservation if credit_minute_s is not None else None,
            credit_minute_seconds=credit_minute_s or CREDIT_MINUTE_SECONDS,
            opt_out=functools.partial(record_opt_out, pool, log),
            reads=None
            if low_water is None
            else CallerReads(low_water, lambda: stream.last_sequence_number, loop=asyncio.get_running_loop()),
            clock=clock,
        )
        line.start()
        task = asyncio.create_task(session.run(line.frames()))
        rig = Rig(
            kind, line, session, log, task, pool, openai, realtime, deepgram, writer, hang_ups, transfers, extensions_at
        )
        try:
            yield rig
        finally:
            await rig.finish()


def slowed(factory: DriverFactory, *, start_s: float, close_s: float) -> DriverFactory:
    """`factory`'s drivers, each taking `start_s` longer to start (a provider slow to connect) and `close_s` longer
    to close (providers slow to hang up)."""

    def build(host: CallHost) -> ConversationDriver:
        driver = factory(host)
        start, close = driver.start, driver.close

        async def slow_start() -> None:
            await asyncio.sleep(start_s)
            await start()

        async def slow_close() -> None:
            await asyncio.sleep(close_s)
            await close()

        driver.start = slow_start  # type: ignore[method-assign]
        driver.close = slow_close  # type: ignore[method-assign]
        return driver

    return build


async def long_answer_playing(rig: Rig, heard_ms: int = 1500) -> None:
    """The caller asked; the agent's long answer has played `heard_ms` to them and goes on."""
    rig.reply(LONG_ANSWER)
    rig.caller_says("When are you open?")
    await until(lambda: rig.line.heard_ms >= heard_ms, timeout=15)


async def caller_mid_question(rig: Rig) -> None:
    """The agent's answer is ready; the caller is half a second into a one-second question."""
    rig.reply("We open at nine.")
    rig.caller_says("When do you open?", ms=1000)
    await asyncio.sleep(0.5)


class LowWaterLog:
    """Stands in for a call's socket: the receive low-water marks the call sets on it, in order."""

    def __init__(self) -> None:
        self.marks: list[int] = []

    def setsockopt(self, level: int, option: int, value: int, /) -> None:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        self.marks.append(value)

    @property
    def relaxed(self) -> bool:
        return bool(self.marks) and self.marks[-1] == RELAXED_LOW_WATER


pytestmark = pytest.mark.parametrize("kind", DRIVERS)
paced_reads = pytest.mark.skipif(not caller_reads.SUPPORTED, reason="the reading of a socket is paced on Linux only")


@paced_reads
async def test_the_callers_frames_are_read_in_batches_except_in_the_silence_after_their_speech(
    kind: str, pool: asyncpg.Pool
) -> None:
    low_water = LowWaterLog()
    async with call_on(kind, pool, low_water=low_water) as rig:
        await caller_mid_question(rig)
        speaking_relaxed, spoke = low_water.relaxed, len(low_water.marks)
        await rig.wait_for_turns(2)
        if kind == "realtime":  # the model's own VAD ends the turn: every frame is read as it lands
            assert not speaking_relaxed and low_water.marks == []
            return
        assert speaking_relaxed, "the caller's speech is read in batches"
        await until(lambda: 1 in low_water.marks[spoke:])  # the silence after it, frame by frame
        await until(lambda: low_water.relaxed)  # and in batches again once every rule on it is past


@paced_reads
async def test_the_callers_speech_over_the_agent_is_read_frame_by_frame_until_the_barge_in(
    kind: str, pool: asyncpg.Pool
) -> None:
    low_water = LowWaterLog()
    async with call_on(kind, pool, low_water=low_water) as rig:
        await long_answer_playing(rig)
        if kind == "pipeline":
            await until(lambda: low_water.relaxed)  # the caller listening to the agent: read in batches
        listening = len(low_water.marks)
        rig.caller_says("Thanks, that is all I needed", ms=1500)
        await until(lambda: bool(rig.line.clears), timeout=10)
        # The clear comes about 300 ms into the caller's 1.5 s: their silence after it has not begun.
        overlap = low_water.marks[listening:]
    if kind == "realtime":
        assert low_water.marks == []  # every frame is read as it lands all along
    else:
        assert 1 in overlap, "the frames that count toward the barge-in are read as they land"


@paced_reads
async def test_an_agent_that_yields_at_the_callers_first_sound_is_heard_frame_by_frame_while_it_speaks(
    kind: str, pool: asyncpg.Pool
) -> None:
    low_water = LowWaterLog()
    async with call_on(kind, pool, low_water=low_water, interruption={"thresholdMs": 20}) as rig:
        await long_answer_playing(rig)
        await asyncio.sleep(0.3)  # the agent still speaking, the caller silent
        assert not low_water.relaxed


@paced_reads
async def test_an_agent_that_speculates_within_a_batch_of_silence_hears_the_callers_speech_frame_by_frame(
    kind: str, pool: asyncpg.Pool
) -> None:
    low_water = LowWaterLog()
    async with call_on(kind, pool, low_water=low_water, endpointing={"speculateAfterMs": 40}) as rig:
        await caller_mid_question(rig)
        assert not low_water.relaxed  # its first silent frame must not wait for a batch
        await rig.wait_for_turns(2)


async def test_barge_in_keeps_in_the_transcript_only_what_the_caller_heard(kind: str, pool: asyncpg.Pool) -> None:
    async with call_on(kind, pool) as rig:
        await long_answer_playing(rig)
        rig.caller_says("Thanks, that is all I needed", ms=1500)
        await until(lambda: bool(rig.line.clears), timeout=10)
        turns = await rig.wait_for_turns(2)

    caller, agent = turns[:2]
    assert (caller.speaker, agent.speaker) == ("caller", "agent")
    assert agent.interrupted
    heard, everything = agent.text.split(), LONG_ANSWER.split()
    assert 0 < len(heard) < len(everything)
    assert heard == everything[: len(heard)]
    # It lasts as long as the caller heard it, up to the clear (by the engine's clock, not by the last mark's echo).
    heard_ms = rig.line.clears[0] // BYTES_PER_MS
    assert abs((agent.end_ms - agent.start_ms) - heard_ms) <= 3 * FRAME_MS


async def test_a_key_the_caller_presses_is_a_turn_the_agent_answers(kind: str, pool: asyncpg.Pool) -> None:
    async with call_on(kind, pool) as rig:
        rig.reply("You pressed five.")
        await asyncio.sleep(0.3)
        rig.line.press("5")
        turns = await rig.wait_for_turns(2)
    assert [(t.speaker, t.text) for t in turns[:2]] == [("caller", "[DTMF 5]"), ("agent", "You pressed five.")]


async def test_at_the_maximum_duration_the_agent_says_goodbye_and_hangs_up(kind: str, pool: asyncpg.Pool) -> None:
    async with call_on(kind, pool, max_duration_s=2, goodbyeSentence="Time is up, goodbye.") as rig:
        rig.expect_line("Time is up, goodbye.")
        outcome = await rig.outcome()
    turns = await rig.turns()
    assert (outcome.status, outcome.end_reason) == (CallStatus.COMPLETED, EndReason.MAX_DURATION)
    assert rig.hang_ups == [rig.line.call_sid]
    assert turns[-1].speaker == "agent" and "goodbye" in turns[-1].text.lower()


async def test_when_the_credits_run_out_the_agent_says_goodbye_and_the_call_ends_insufficient_credits(
    kind: str, pool: asyncpg.Pool
) -> None:
    # Two credits at one a minute (of 4 s): the first minute is reserved when the call opens, the second one
    # extension later; the next extension finds the balance empty, 2 s before the paid time is over.
    async with call_on(kind, pool, credits=2, credit_minute_s=4.0, goodbyeSentence="Out of time, goodbye.") as rig:
        rig.expect_line("Out of time, goodbye.")
        outcome = await rig.outcome()
    turns = await rig.turns()
    assert (outcome.status, outcome.end_reason) == (CallStatus.COMPLETED, EndReason.INSUFFICIENT_CREDITS)
    assert rig.hang_ups == [rig.line.call_sid]
    assert turns[-1].speaker == "agent" and "goodbye" in turns[-1].text.lower()
    organization = await organizations.get_organization(pool, organization_id=rig.log.organization_id)
    assert organization.credits == 1  # one started (real) minute charged, the other reserved minute returned


async def test_a_call_a_fraction_of_a_second_into_its_second_minute_is_charged_two_minutes(
    kind: str, pool: asyncpg.Pool
) -> None:
    skipped = [0.0]  # seconds the call's clock has jumped ahead

    def clock() -> float:
        return time.monotonic() + skipped[0]

    async with call_on(kind, pool, credits=5, clock=clock) as rig:
        skipped[0] = 60.0  # a minute goes by in an instant: the call is now a moment past its first minute
        await rig.finish()
    organization = await organizations.get_organization(pool, organization_id=rig.log.organization_id)
    assert rig.finished is not None
    assert (rig.finished.duration, organization.credits) == (61, 3)  # two started minutes at one credit a minute


async def test_a_call_is_charged_until_it_ends_not_while_its_providers_close(kind: str, pool: asyncpg.Pool) -> None:
    skipped = [0.0]  # seconds the call's clock has jumped ahead

    def clock() -> float:
        return time.monotonic() + skipped[0]

    before = time.monotonic()
    async with call_on(kind, pool, credits=5, clock=clock, driver_close_s=2.0) as rig:
        skipped[0] = 59.0 - (time.monotonic() - before)  # the call is not yet 59 s old: its caller hangs up now
        await rig.finish()  # and its providers then take 2 s to close
    organization = await organizations.get_organization(pool, organization_id=rig.log.organization_id)
    assert rig.finished is not None
    assert rig.finished.duration is not None and rig.finished.duration <= 60
    assert organization.credits == 4  # one started minute at one credit a minute


async def test_extensions_slow_to_be_answered_do_not_push_the_next_ones_past_the_paid_minutes(
    kind: str, pool: asyncpg.Pool
) -> None:
    # Tiny minutes of 2 s: each next minute is reserved 1 s before the paid one runs out, and each extension takes
    # 0.6 s to be answered (a database under load). Every minute is still reserved before the one before runs out.
    async with call_on(kind, pool, credits=20, credit_minute_s=2.0, extension_s=0.6) as rig:
        await until(lambda: len(rig.extensions_at) >= 4, timeout=30)
    paid_until = [2.0 * (minute + 1) for minute in range(4)]
    assert all(at < end for at, end in zip(rig.extensions_at, paid_until, strict=False)), rig.extensions_at


async def test_a_driver_slow_to_start_does_not_delay_the_next_minutes_reservation_past_the_paid_one(
    kind: str, pool: asyncpg.Pool
) -> None:
    # Tiny minutes of 4 s: the call reserves its second minute 2 s before its first runs out, at 2 s; the driver
    # takes 3 s to start, and the call's minute runs from its own start all the same.
    async with call_on(kind, pool, credits=5, credit_minute_s=4.0, driver_start_s=3.0) as rig:
        for _ in range(200):
            if rig.extensions_at:
                break
            await asyncio.sleep(0.1)
    assert rig.extensions_at and rig.extensions_at[0] < 4.0


async def test_a_goodbye_longer_than_the_credits_left_is_cut_when_they_run_out(kind: str, pool: asyncpg.Pool) -> None:
    # As above, and the agent's goodbye would take half a minute: the call ends when its paid time does.
    farewell = "Out of time. " + " ".join(["Thank you for calling, we hope to hear from you again soon."] * 20)
    async with call_on(kind, pool, credits=2, credit_minute_s=4.0, goodbyeSentence=farewell) as rig:
        rig.expect_line(farewell)
        outcome = await rig.outcome(timeout=20)
    turns = await rig.turns()
    assert (outcome.status, outcome.end_reason) == (CallStatus.COMPLETED, EndReason.INSUFFICIENT_CREDITS)
    assert turns[-1].speaker == "agent" and turns[-1].interrupted
    assert rig.hang_ups == [rig.line.call_sid]


async def test_an_answering_machine_verdict_stops_the_agent_and_ends_the_call_with_it(
    kind: str, pool: asyncpg.Pool
) -> None:
    async with call_on(kind, pool, firstSentence=LONG_ANSWER) as rig:
        rig.expect_line(LONG_ANSWER)
        await until(lambda: rig.line.heard_ms >= 800, timeout=15)
        rig.session.end_when_twilio_stops(EndReason.VOICEMAIL_LEFT)
        await until(lambda: bool(rig.line.clears), timeout=5)
        rig.line.hang_up()  # Twilio leaves the stream to speak the voicemail
        outcome = await rig.outcome()
    assert (outcome.status, outcome.end_reason) == (CallStatus.COMPLETED, EndReason.VOICEMAIL_LEFT)
    agent = (await rig.turns())[0]
    assert agent.interrupted and len(agent.text.split()) < len(LONG_ANSWER.split())


@pytest.mark.parametrize(
    ("answer_after_stop", "ending"),
    [
        (None, (EndReason.TRANSFERRED, "billing")),
        # Twilio leaves the stream before it answers: the call ends as the answer says, the transfer made, or
        # refused because the caller had hung up.
        (True, (EndReason.TRANSFERRED, "billing")),
        (False, (EndReason.CALLER_HANGUP, None)),
    ],
    ids=["answered-then-stop", "stop-then-made", "stop-then-refused"],
)
async def test_transfer_call_hands_the_caller_over_once_the_agent_has_spoken(
    kind: str, pool: asyncpg.Pool, answer_after_stop: bool | None, ending: tuple[EndReason, str | None]
) -> None:
    async with call_on(kind, pool, transfer=TRANSFERS, transfer_answer_after_stop=answer_after_stop) as rig:
        rig.reply(
            "Putting you through.",
            tool="transfer_call",
            arguments={"phone_number": "+14155550199", "reason": "billing"},
        )
        rig.caller_says("Billing please")
        outcome = await rig.outcome()
    assert (outcome.status, (outcome.end_reason, outcome.end_detail)) == (CallStatus.COMPLETED, ending)
    assert rig.transfers == [(rig.line.call_sid, "+14155550199")]
    assert any(t.text == "Putting you through." for t in await rig.turns())


@pytest.mark.parametrize(
    ("number", "why"),
    [
        ("+449098790000", "error: +449098790000 is a premium-rate number, which this agent may not transfer to."),
        ("+12025550123", "error: +12025550123 is not a number this agent may transfer to."),
    ],
)
async def test_a_transfer_the_rules_refuse_is_explained_to_the_model_and_the_call_goes_on(
    kind: str, pool: asyncpg.Pool, number: str, why: str
) -> None:
    async with call_on(kind, pool, transfer=TRANSFERS) as rig:
        rig.reply(tool="transfer_call", arguments={"phone_number": number})
        rig.reply("I can put you through to billing.")
        rig.caller_says("Put me through to that number")
        turns = await rig.wait_for_turns(2)
        assert not rig.task.done()
        [result] = rig.function_results()
    assert rig.transfers == []
    assert result.startswith(why)
    assert "Billing (+14155550199)" in result
    assert turns[-1].text == "I can put you through to billing."
    assert "transfer_call" in rig.offered_functions()


async def test_an_agent_without_transfer_rules_is_not_offered_transfers_and_cannot_make_one(
    kind: str, pool: asyncpg.Pool
) -> None:
    async with call_on(kind, pool) as rig:
        rig.reply(tool="transfer_call", arguments={"phone_number": "+14155550199"})
        rig.reply("I'm afraid I cannot transfer calls.")
        rig.caller_says("Transfer me")
        turns = await rig.wait_for_turns(2)
        [result] = rig.function_results()
        assert await rig.session.transfer("+14155550199") is False  # nor can anything else ask the call for one
    assert rig.offered_functions() == {"end_call", "send_dtmf", "opt_out"}
    assert rig.transfers == []
    assert result.startswith("error: this agent cannot transfer calls")
    assert turns[-1].text == "I'm afraid I cannot transfer calls."


async def test_the_call_itself_refuses_a_transfer_its_rules_do_not_allow(kind: str, pool: asyncpg.Pool) -> None:
    async with call_on(kind, pool, transfer=TRANSFERS) as rig:
        assert await rig.session.transfer("+449098790000") is False
        assert not rig.task.done()
    assert rig.transfers == []


async def test_end_call_hangs_up_after_the_goodbye_was_heard(kind: str, pool: asyncpg.Pool) -> None:
    async with call_on(kind, pool) as rig:
        rig.reply("Goodbye!", tool="end_call", arguments={"reason": "the caller is done"})
        rig.caller_says("That is all")
        outcome = await rig.outcome()
    assert (outcome.status, outcome.end_reason, outcome.end_detail) == (
        CallStatus.COMPLETED,
        EndReason.AGENT_HANGUP,
        "the caller is done",
    )
    assert rig.hang_ups == [rig.line.call_sid]
    assert [(t.speaker, t.text) for t in await rig.turns()][-1] == ("agent", "Goodbye!")


async def test_post_call_analysis_summarizes_and_judges_the_call(kind: str, pool: asyncpg.Pool, db_url: str) -> None:
    async with call_on(kind, pool, postCallSummary="What the caller wanted: {{reason}}") as rig:
        rig.reply("Tuesday at ten is free.")
        rig.caller_says("I need an appointment")
        await rig.wait_for_turns(2)
        await asyncio.sleep(0.3)
        await rig.finish()
        rig.openai.json_replies.append('{"summary": "an appointment", "success": true, "reason": "booked"}')
        settings = load_settings(database_url=db_url, openai_api_key=OPENAI_KEY, openai_base_url=rig.openai.base_url)
        clients = ProviderClients()
        try:
            deps = PostCallDeps(pool=pool, settings=settings, clients=clients)
            result = await analyze_call(deps, organization_id=rig.log.organization_id, call_log_id=rig.log.id)
        finally:
            await clients.aclose()
    assert (result.error, result.skipped) == (None, None)
    assert (result.summary, result.success) == ("an appointment", True)
    assert rig.openai.json_requests, "the analysis asked the model"
    assert "I need an appointment" in str(rig.openai.json_requests[-1]["messages"])


async def test_on_an_outbound_call_the_agent_waits_for_the_callees_hello(kind: str, pool: asyncpg.Pool) -> None:
    async with call_on(kind, pool, outbound=True, firstSentence=FIRST) as rig:
        rig.expect_line(FIRST)
        await asyncio.sleep(1.0)
        assert rig.line.agent_bytes_received == 0, "the agent spoke before the callee answered"
        rig.caller_says("Hello?")
        turns = await rig.wait_for_turns(2)
    assert [(t.speaker, t.text) for t in turns[:2]] == [("caller", "Hello?"), ("agent", FIRST)]


async def test_a_silent_callee_still_hears_the_agent(kind: str, pool: asyncpg.Pool) -> None:
    async with call_on(kind, pool, outbound=True, firstSentence=FIRST) as rig:
        rig.expect_line(FIRST)
        await until(lambda: rig.line.agent_bytes_received > 0, timeout=GREETING_WAIT_SECONDS + 5)
        turns = await rig.wait_for_turns(1)
    assert [(t.speaker, t.text) for t in turns] == [("agent", FIRST)]


async def test_without_a_first_sentence_the_caller_speaks_first(kind: str, pool: asyncpg.Pool) -> None:
    async with call_on(kind, pool) as rig:
        rig.reply("Acme Dental, how can I help?")
        await asyncio.sleep(1.5)
        assert rig.line.agent_bytes_received == 0, "the agent spoke first with no first sentence"
        rig.caller_says("Hi there")
        turns = await rig.wait_for_turns(2)
    assert [t.speaker for t in turns[:2]] == ["caller", "agent"]


async def test_a_stream_lost_in_the_middle_of_a_reply_ends_the_call_quietly(
    kind: str, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    async with call_on(kind, pool) as rig:
        await long_answer_playing(rig, heard_ms=500)
        with caplog.at_level(logging.WARNING):
            rig.line.drop()
            outcome = await rig.outcome()
    assert (outcome.status, outcome.end_reason) == (CallStatus.FAILED, EndReason.STREAM_LOST)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    agent = (await rig.turns())[1]
    assert agent.interrupted  # what was heard before the line went is kept


async def test_a_sql_deletion_of_a_running_calls_reservation_neither_ends_the_call_nor_loses_its_credits(
    kind: str, pool: asyncpg.Pool
) -> None:
    # Deleted in SQL (migration 0035 refuses it), the reservation took the credits it held, and the call's next
    # extension, finding it gone, ended the call as out of credits though the balance could pay for many more.
    async with call_on(kind, pool, credits=10, credit_minute_s=1.0) as rig:
        await until(lambda: len(rig.extensions_at) >= 1)
        with contextlib.suppress(asyncpg.ObjectInUseError):
            await pool.execute('DELETE FROM "CreditReservation" WHERE "callLogId" = $1', rig.log.id)
        extended = len(rig.extensions_at)
        await until(lambda: len(rig.extensions_at) > extended + 1 or rig.task.done())
        assert not rig.task.done(), rig.task.result()
        finished = await rig.finish()
    assert finished.metadata.get("endReason") != EndReason.INSUFFICIENT_CREDITS.value
    organization = await organizations.get_organization(pool, organization_id=rig.log.organization_id)
    assert organization.credits == 10 - 1  # its one started (real) minute; every other reserved minute returned


async def test_a_webhook_the_caller_talks_over_runs_once_and_the_model_hears_what_it_did(
    kind: str, pool: asyncpg.Pool
) -> None:
    booked: list[Any] = []
    answer = asyncio.Event()

    async def book(request: web.Request) -> web.Response:
        booked.append(await request.json())
        await answer.wait()  # the booking is made; the reply comes once the caller has spoken again
        return web.json_response({"booked": "19:00"})

    app = web.Application()
    app.router.add_post("/book", book)
    async with (
        serve(app) as url,
        aiohttp.ClientSession() as http,
        call_on(kind, pool, tools=webhook_tools(url, http, "book")) as rig,
    ):
        rig.reply(tool="book", arguments={"time": "19:00"})
        rig.reply("You are booked for seven.")
        rig.reply("You are booked for seven.")
        rig.caller_says("Book me at seven please.")
        await until(lambda: len(booked) == 1, timeout=15)
        rig.caller_says("Are you still there?")
        await asyncio.sleep(1.5)  # the caller's second turn is in
        answer.set()
        turns = await rig.wait_for_turns(3)
        results = rig.function_results()

    assert [request["arguments"] for request in booked] == [{"time": "19:00"}]
    assert results == ['{"booked": "19:00"}']
    assert ("agent", "You are booked for seven.") in [(turn.speaker, turn.text) for turn in turns]
