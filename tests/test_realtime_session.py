"""Specifications of the OpenAI Realtime call session: a scripted Twilio line in real time, a fake Realtime server,
and the CallLog in the test database.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import numpy as np
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from config.agent import AgentConfiguration, parse_agent_configuration
from engine.call import realtime_connection
from engine.call.call_log_writer import CallOutcome
from engine.call.realtime import TRANSCRIPTION_FAILED, UNTRANSCRIBED, realtime_driver
from engine.call.realtime_connection import RECONNECTS_PER_WINDOW
from engine.call.session import CREDIT_MINUTE_SECONDS, CallContext, CallSession, ExtendReservation
from engine.simulator import PlaybackQueue
from media.dtmf import dtmf_audio
from media.g711 import BYTES_PER_MS, FRAME_BYTES, FRAME_MS, ULAW_SILENCE, pcm16_to_ulaw
from media.twilio_stream import TwilioStream
from pipelines.tools import AgentFunction, FunctionSpec, ToolRunner
from storage import call_logs
from storage.call_logs import CallLog
from storage.call_turns import CallTurn, list_turns
from storage.enums import CallStatus
from tests.fakes.openai_realtime import FakeRealtime
from tests.fakes.server import serve
from tests.test_call_log_writer import new_call, writer_for

PROMPT = "You are the front desk of Acme Dental. Be brief."
ANSWER = "Sure, what day works for you?"
GOODBYE = "Thanks for calling Acme Dental today, it was a pleasure, goodbye and take care!"
LONG_ANSWER = (
    "We are open from nine in the morning to five in the evening on weekdays, "
    "from ten to four on Saturdays, and we are closed on Sundays and public holidays."
)


def speech(ms: int) -> bytes:
    """Speech-like caller audio: two tones under a syllable-rate envelope, well above any VAD's threshold."""
    t = np.arange(ms * 8) / 8000
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    wave = envelope * (0.6 * np.sin(2 * np.pi * 220 * t) + 0.4 * np.sin(2 * np.pi * 660 * t))
    return pcm16_to_ulaw((9000 * wave).astype(np.int16))


class TwilioLine:
    """Twilio's side of one media stream: caller frames every 20 ms in real time, the agent's audio played from a
    FIFO at 8 bytes per ms with its marks echoed as playback reaches them, `clear` honoured.
    """

    def __init__(self) -> None:
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.call_sid = "CA" + secrets.token_hex(16)
        self.playback = PlaybackQueue()
        self.agent_bytes_received = 0
        self.heard = 0  # agent audio played, in bytes
        self.clears: list[int] = []  # agent bytes heard when each clear came
        self.received_since_clear = 0
        self.marks_played: list[str] = []
        self.marks_flushed: list[str] = []
        self._caller_audio = bytearray()
        self._inbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._chunk = 0
        self._sequence = 1
        self._clock: asyncio.Task[None] | None = None
        self._hung_up = False
        self._read_to_close = asyncio.Event()
        self.dropped = False

    def stream(self) -> TwilioStream:
        """The engine's protocol object, past `connected` and `start` as the media socket hands it over."""
        stream = TwilioStream()
        stream.receive_text(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        start = {
            "streamSid": self.stream_sid,
            "accountSid": "AC" + "0" * 32,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        stream.receive_text(json.dumps(self._numbered({"event": "start", "start": start})))
        return stream

    def start(self) -> None:
        self._clock = asyncio.create_task(self._run_clock())

    async def stop(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            await asyncio.gather(self._clock, return_exceptions=True)

    async def frames(self) -> AsyncIterator[str]:
        """What Twilio sends the engine, until the socket closes."""
        while (text := await self._inbox.get()) is not None:
            yield text
        self._read_to_close.set()

    async def send(self, text: str) -> None:
        """The engine sends a frame to Twilio."""
        if self.dropped:
            raise ConnectionResetError("Cannot write to closing transport")
        message = json.loads(text)
        assert message["streamSid"] == self.stream_sid
        match message["event"]:
            case "media":
                audio = base64.b64decode(message["media"]["payload"])
                self.agent_bytes_received += len(audio)
                self.received_since_clear += len(audio)
                self.playback.push_audio(audio)
            case "mark":
                self._echo(self.playback.push_mark(message["mark"]["name"]), flushed=False)
            case "clear":
                self.clears.append(self.heard)
                self.received_since_clear = 0
                _, marks = self.playback.clear()
                self._echo(marks, flushed=True)
            case other:
                raise AssertionError(f"the engine sent Twilio an unsupported {other!r} frame")

    def say(self, audio: bytes) -> None:
        """The caller speaks (from the next frame on)."""
        self._caller_audio += audio

    def press(self, digit: str) -> None:
        """The caller presses a key."""
        dtmf = {"track": "inbound_track", "digit": digit}
        self._inbox.put_nowait(json.dumps(self._numbered({"event": "dtmf", "dtmf": dtmf})))

    def hang_up(self) -> None:
        """The call ends on Twilio's side: `stop`, then the socket closes."""
        if self._hung_up:
            return
        self._hung_up = True
        stop = {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}
        self._inbox.put_nowait(json.dumps(self._numbered({"event": "stop", "stop": stop})))
        self._inbox.put_nowait(None)

    async def read_to_close(self) -> None:
        """Until the engine has read every frame up to the socket's close."""
        await self._read_to_close.wait()

    def drop(self) -> None:
        """The socket is lost with no `stop` (a network failure): nothing more arrives, and sending fails."""
        if self._hung_up:
            return
        self._hung_up = True
        self.dropped = True
        self._inbox.put_nowait(None)

    @property
    def heard_ms(self) -> int:
        return self.heard // BYTES_PER_MS

    def _numbered(self, message: dict[str, Any]) -> dict[str, Any]:
        self._sequence += 1
        return {**message, "sequenceNumber": str(self._sequence - 1), "streamSid": self.stream_sid}

    def _echo(self, names: list[str], *, flushed: bool) -> None:
        for name in names:
            (self.marks_flushed if flushed else self.marks_played).append(name)
            if not self._hung_up:
                self._inbox.put_nowait(json.dumps(self._numbered({"event": "mark", "mark": {"name": name}})))

    async def _run_clock(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while not self._hung_up:
            played, reached = self.playback.advance(FRAME_BYTES)
            self.heard += len(played)
            self._echo(reached, flushed=False)
            frame = bytes(self._caller_audio[:FRAME_BYTES])
            del self._caller_audio[:FRAME_BYTES]
            frame += bytes([ULAW_SILENCE]) * (FRAME_BYTES - len(frame))
            self._chunk += 1
            media = {
                "track": "inbound",
                "chunk": str(self._chunk),
                "timestamp": str((self._chunk - 1) * 20),
                "payload": base64.b64encode(frame).decode(),
            }
            self._inbox.put_nowait(json.dumps(self._numbered({"event": "media", "media": media})))
            next_tick += 0.02
            await asyncio.sleep(max(0.0, next_tick - loop.time()))


TRANSFERS = {"destinations": [{"pattern": "+1415555****", "label": "Front office"}]}
"""Where the agents of these tests may transfer calls."""


def agent_configuration(**changes: Any) -> AgentConfiguration:
    realtime = {
        "provider": "openai",
        "model": "gpt-realtime",
        "voice": "marin",
        "silence_duration_ms": 300,
        "transcription_model": "gpt-4o-mini-transcribe",
        **changes.pop("realtime", {}),
    }
    return parse_agent_configuration({"realtime": realtime, "prompt": PROMPT, "transfer": TRANSFERS, **changes})


@dataclass
class Call:
    """One session under test, with its Twilio line, its CallLog and what it did."""

    line: TwilioLine
    session: CallSession
    log: CallLog
    task: asyncio.Task[CallOutcome]
    pool: asyncpg.Pool
    hang_ups: list[tuple[str, int, int]] = field(default_factory=list)  # call sid, ms heard, bytes still queued
    transfers: list[tuple[str, str]] = field(default_factory=list)

    async def outcome(self, timeout: float = 15.0) -> CallOutcome:
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def turns(self) -> list[CallTurn]:
        return await list_turns(self.pool, organization_id=self.log.organization_id, call_log_id=self.log.id)

    async def wait_for_turns(self, count: int, timeout: float = 10.0) -> list[CallTurn]:
        deadline = time.monotonic() + timeout
        while len(turns := await self.turns()) < count:
            assert time.monotonic() < deadline, f"only {len(turns)} of {count} turns were recorded: {turns}"
            await asyncio.sleep(0.05)
        return turns


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `condition` holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def realtime_call(
    pool: asyncpg.Pool,
    fake: FakeRealtime,
    config: AgentConfiguration | None = None,
    *,
    api_key: str | None = None,
    hang_up: bool = True,
    transfer: bool = True,
    tools: ToolRunner | None = None,
    clock: Callable[[], float] = time.monotonic,
    outbound: bool = False,
    extend_reservation: ExtendReservation | None = None,
    credit_minute_seconds: float = CREDIT_MINUTE_SECONDS,
) -> AsyncIterator[Call]:
    """Run a CallSession on the Realtime driver against `fake` on a Twilio line (a call the agent placed, waiting for
    the callee's hello, when `outbound`); on exit the caller hangs up if the call still runs, and the CallLog is
    finished with the outcome.
    """
    line = TwilioLine()
    log, agent_id = await new_call(pool)
    writer = writer_for(pool, log)
    client = AsyncOpenAI(api_key=api_key or fake.api_key, base_url=fake.base_url)
    hang_ups: list[tuple[str, int, int]] = []
    transfers: list[tuple[str, str]] = []

    async def hang_up_call(call_sid: str) -> bool:
        hang_ups.append((call_sid, line.heard_ms, line.playback.queued_bytes))
        line.hang_up()
        return True

    async def transfer_call(call_sid: str, to: str) -> bool:
        transfers.append((call_sid, to))
        line.hang_up()  # the call leaves the stream for the <Dial>
        return True

    config = config or agent_configuration()
    assert config.realtime
    session = CallSession(
        context=CallContext(log.id, log.organization_id, agent_id, line.call_sid, outbound=outbound),
        config=config,
        driver=realtime_driver(
            client=client,
            realtime=config.realtime[0],
            instructions=PROMPT,
            tools=tools,
            first_sentence=config.first_sentence,
            can_transfer=transfer,
        ),
        stream=line.stream(),
        send=line.send,
        writer=writer,
        hang_up=hang_up_call if hang_up else None,
        transfer=transfer_call if transfer else None,
        clock=clock,
        extend_reservation=extend_reservation,
        credit_minute_seconds=credit_minute_seconds,
    )
    line.start()
    task = asyncio.create_task(session.run(line.frames()))
    call = Call(line, session, log, task, pool, hang_ups, transfers)
    try:
        yield call
    finally:
        line.hang_up()
        outcome = await call.outcome()
        await line.stop()
        await writer.finish(outcome)
        await client.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeRealtime]:
    async with FakeRealtime() as server:
        yield server


async def goodbye_of_end_call_playing(call: Call, fake: FakeRealtime) -> None:
    """The caller spoke; the model answered with GOODBYE and end_call, and the goodbye has begun to play."""
    fake.reply_tool("end_call", {"reason": "the caller is done"}, text=GOODBYE)
    call.line.say(speech(500))
    await until(lambda: bool(fake.sent_of_type("response.done")) and call.line.heard_ms >= 300)


async def stored(call: Call) -> CallLog:
    return await call_logs.get_call_log(call.pool, organization_id=call.log.organization_id, call_log_id=call.log.id)


# --------------------------------------------------------------------------------------------------- session


async def test_the_session_asks_for_mulaw_both_ways_server_vad_the_prompt_and_the_tools(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    async with realtime_call(pool, fake) as call:
        await until(lambda: bool(fake.of_type("session.update")))
        call.line.hang_up()
        assert (await call.outcome()).end_reason == "caller_hangup"

    assert fake.models == ["gpt-realtime"]
    session = fake.of_type("session.update")[0]["session"]
    assert session["type"] == "realtime"
    assert session["instructions"] == PROMPT
    assert session["output_modalities"] == ["audio"]
    audio_in, audio_out = session["audio"]["input"], session["audio"]["output"]
    assert audio_in["format"] == {"type": "audio/pcmu"}
    assert audio_out["format"] == {"type": "audio/pcmu"}
    assert audio_out["voice"] == "marin"
    assert audio_in["turn_detection"] == {
        "type": "server_vad",
        "silence_duration_ms": 300,
        "create_response": True,
        "interrupt_response": False,  # the engine decides barge-in, by the agent's threshold
    }
    assert audio_in["transcription"] == {"model": "gpt-4o-mini-transcribe"}
    assert {tool["name"] for tool in session["tools"]} == {"end_call", "transfer_call", "send_dtmf", "opt_out"}
    assert all(tool["type"] == "function" and tool["parameters"]["type"] == "object" for tool in session["tools"])
    assert session["tool_choice"] == "auto"


async def test_caller_audio_reaches_the_model_as_twilio_sent_it(pool: asyncpg.Pool, fake: FakeRealtime) -> None:
    async with realtime_call(pool, fake) as call:
        await until(lambda: len(fake.of_type("input_audio_buffer.append")) >= 5)
    # Frames read together (a loaded machine, the session still opening) go in one append: the bytes are Twilio's.
    appended = b"".join(base64.b64decode(event["audio"]) for event in fake.of_type("input_audio_buffer.append"))
    assert len(appended) % FRAME_BYTES == 0
    assert appended == bytes([ULAW_SILENCE]) * len(appended)
    assert (await stored(call)).status is CallStatus.COMPLETED


# --------------------------------------------------------------------------------------------------- turns


async def test_a_caller_turn_is_answered_aloud_and_both_turns_are_recorded(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    fake.caller_says("I'd like to book a cleaning")
    fake.reply(ANSWER)
    async with realtime_call(pool, fake) as call:
        call.line.say(speech(500))
        turns = await call.wait_for_turns(2)

    assert [(t.speaker, t.text, t.interrupted) for t in turns] == [
        ("caller", "I'd like to book a cleaning", False),
        ("agent", ANSWER, False),
    ]
    caller, agent = turns
    assert 300 <= caller.end_ms - caller.start_ms <= 1000  # the caller spoke 500 ms (plus the VAD's silence)
    assert agent.latency_ms is not None and agent.latency_ms >= 0
    assert agent.latency is not None and agent.latency["firstFrameSent"] == agent.latency_ms
    assert agent.start_ms >= caller.end_ms
    reply_ms = fake.duration_ms(ANSWER)
    assert agent.end_ms - agent.start_ms == reply_ms
    assert call.line.agent_bytes_received == reply_ms * BYTES_PER_MS
    assert call.line.heard_ms == reply_ms  # all of it was played before the turn was recorded
    assert call.line.marks_played and not call.line.marks_flushed
    assert call.session.latencies_ms == [agent.latency_ms]
    log = await stored(call)
    assert log.status is CallStatus.COMPLETED
    assert log.metadata["endReason"] == "caller_hangup"
    assert log.metadata["latencyMs"]["count"] == 1


async def test_without_a_transcription_model_caller_turns_are_marked_untranscribed(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    fake.reply(ANSWER)
    config = agent_configuration(realtime={"transcription_model": None})
    async with realtime_call(pool, fake, config) as call:
        call.line.say(speech(500))
        turns = await call.wait_for_turns(2)
    assert [(t.speaker, t.text) for t in turns] == [("caller", UNTRANSCRIBED), ("agent", ANSWER)]
    assert "transcription" not in fake.of_type("session.update")[0]["session"]["audio"]["input"]


async def test_the_first_sentence_is_spoken_before_the_caller_says_anything(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    greeting = "Thanks for calling Acme Dental, how can I help?"
    fake.reply(greeting)
    async with realtime_call(pool, fake, agent_configuration(firstSentence=greeting)) as call:
        turns = await call.wait_for_turns(1)
    instructions = fake.of_type("response.create")[0]["response"]["instructions"]
    assert greeting in instructions
    assert [(t.speaker, t.text, t.latency_ms) for t in turns] == [("agent", greeting, None)]


async def test_a_key_the_caller_presses_is_a_turn_the_model_is_told_about(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    fake.reply("You pressed five.")
    async with realtime_call(pool, fake) as call:
        await until(lambda: bool(fake.of_type("session.update")))
        call.line.press("5")
        turns = await call.wait_for_turns(2)
    assert [(t.speaker, t.text) for t in turns] == [("caller", "[DTMF 5]"), ("agent", "You pressed five.")]
    (told,) = fake.of_type("conversation.item.create")
    assert told["item"]["role"] == "user" and "5" in told["item"]["content"][0]["text"]
    assert turns[1].latency_ms is not None


async def test_after_the_silence_timeout_the_agent_says_goodbye_and_hangs_up(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    skipped = 0.0  # seconds the session's clock is ahead of real time

    def clock() -> float:
        return time.monotonic() + skipped

    goodbye = "It seems you have stepped away. Goodbye."
    fake.reply(goodbye)
    config = agent_configuration(silenceTimeoutSeconds=5, goodbyeSentence=goodbye)
    async with realtime_call(pool, fake, config, clock=clock) as call:
        await until(lambda: bool(fake.of_type("session.update")))
        skipped = 6.0  # six silent seconds pass
        outcome = await call.outcome()
    assert (outcome.status, outcome.end_reason) == (CallStatus.COMPLETED, "silence_timeout")
    assert goodbye in fake.of_type("response.create")[0]["response"]["instructions"]
    assert call.hang_ups and call.hang_ups[0][1] == fake.duration_ms(goodbye)
    assert [(t.speaker, t.text) for t in await call.turns()] == [("agent", goodbye)]


# --------------------------------------------------------------------------------------------------- barge-in


async def test_a_caller_who_talks_over_the_agent_cuts_it_off_where_they_stopped_hearing_it(pool: asyncpg.Pool) -> None:
    long_answer = LONG_ANSWER
    # Real-time generation: the reply is still being generated when the caller interrupts, and two audio deltas
    # already on the wire arrive after the interruption.
    async with FakeRealtime(speedup=1.0, in_flight_deltas=2) as fake:
        fake.reply(long_answer)
        async with realtime_call(pool, fake) as call:
            line = call.line
            line.say(speech(400))
            await until(lambda: line.heard_ms >= 1200)
            line.say(speech(2000))  # still talking when the call ends: no second reply
            await until(lambda: bool(line.clears) and bool(fake.truncations))
            turns = await call.wait_for_turns(2)
            await asyncio.sleep(0.3)  # the late deltas arrive meanwhile
            assert line.received_since_clear == 0  # nothing of the cut reply played after the clear

        assert len(fake.of_type("response.cancel")) == 1
        (truncation,) = fake.truncations
        assert truncation.accepted
        assert truncation.audio_end_ms <= truncation.item_audio_ms
        heard_at_clear_ms = line.clears[0] // BYTES_PER_MS
        # The clear cut where the caller's playback had reached by the clock (not at the last mark, up to 500 ms
        # earlier): what the caller heard, give or take a frame (two, for a busy machine).
        assert abs(truncation.audio_end_ms - heard_at_clear_ms) <= 2 * FRAME_MS
        caller, agent = turns[:2]
        assert caller.speaker == "caller"
        assert agent.speaker == "agent" and agent.interrupted
        assert agent.end_ms - agent.start_ms == truncation.audio_end_ms
        heard_words, all_words = agent.text.split(), long_answer.split()
        assert 0 < len(heard_words) < len(all_words)
        assert heard_words == all_words[: len(heard_words)]


async def test_a_goodbye_due_while_the_agent_speaks_cuts_it_off_and_is_said(pool: asyncpg.Pool) -> None:
    goodbye = "Time is up, goodbye."
    config = agent_configuration(goodbyeSentence=goodbye).model_copy(update={"max_duration_seconds": 2})
    async with FakeRealtime(speedup=1.0) as fake:  # the answer is still being generated when the time is up
        fake.reply(LONG_ANSWER)
        fake.reply(goodbye)
        async with realtime_call(pool, fake, config) as call:
            call.line.say(speech(500))
            outcome = await call.outcome()
    assert outcome.end_reason == "max_duration"
    turns = await call.turns()
    assert [(t.speaker, t.interrupted) for t in turns[1:]] == [("agent", True), ("agent", False)]
    assert turns[-1].text == goodbye
    assert fake.sent_of_type("error") == []  # the goodbye was asked for once the cut answer had ended


async def test_a_key_pressed_while_the_agent_speaks_is_answered(pool: asyncpg.Pool) -> None:
    async with FakeRealtime(speedup=1.0) as fake:
        fake.reply(LONG_ANSWER)
        fake.reply("You pressed five.")
        async with realtime_call(pool, fake) as call:
            call.line.say(speech(500))
            await until(lambda: call.line.heard_ms >= 500)
            call.line.press("5")
            turns = await call.wait_for_turns(4)
    assert [(t.speaker, t.text) for t in turns[2:]] == [("caller", "[DTMF 5]"), ("agent", "You pressed five.")]
    assert turns[1].interrupted


async def test_a_caller_who_talks_over_the_goodbye_of_end_call_hears_it_to_the_end(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    async with realtime_call(pool, fake) as call:
        await goodbye_of_end_call_playing(call, fake)
        call.line.say(speech(1500))  # "wait, one more thing": the call is ending all the same
        outcome = await call.outcome()
    assert outcome.end_reason == "agent_hangup"
    assert call.line.clears == []
    assert [heard_ms for _, heard_ms, _ in call.hang_ups] == [fake.duration_ms(GOODBYE)]
    assert [(t.speaker, t.text, t.interrupted) for t in await call.turns()][-1] == ("agent", GOODBYE, False)


async def test_a_short_sound_over_the_agent_below_the_threshold_does_not_cut_it_off(pool: asyncpg.Pool) -> None:
    async with FakeRealtime(speedup=1.0) as fake:
        fake.reply(ANSWER + " " + ANSWER)
        config = agent_configuration(interruption={"thresholdMs": 600})
        async with realtime_call(pool, fake, config) as call:
            line = call.line
            line.say(speech(400))
            await until(lambda: line.heard_ms >= 300)
            line.say(speech(200))  # a cough, an "mm": under the 600 ms threshold
            turns = await call.wait_for_turns(2, timeout=15)
    assert line.clears == []
    assert not turns[1].interrupted


async def test_the_agents_openai_voice_is_used_when_its_realtime_entry_names_none() -> None:
    from engine.call.media_socket import realtime_voice
    from pipelines.registry import VoiceChoice

    config = agent_configuration()
    assert config.realtime
    entry = config.realtime[0].model_copy()
    default = parse_agent_configuration({"realtime": {"provider": "openai"}}).realtime
    assert default
    assert realtime_voice(default[0], VoiceChoice("openai", "cedar")).voice == "cedar"
    assert realtime_voice(entry, VoiceChoice("openai", "cedar")).voice == "marin"  # named in the entry: kept
    assert realtime_voice(default[0], VoiceChoice("elevenlabs", "abc")).voice == "marin"


# --------------------------------------------------------------------------------------------------- functions


async def test_end_call_hangs_up_once_the_goodbye_has_been_heard(pool: asyncpg.Pool, fake: FakeRealtime) -> None:
    goodbye = "Thanks for calling, goodbye!"
    fake.reply_tool("end_call", {"reason": "the caller is done"}, text=goodbye)
    async with realtime_call(pool, fake) as call:
        call.line.say(speech(500))
        outcome = await call.outcome()

    assert outcome.status is CallStatus.COMPLETED
    assert (outcome.end_reason, outcome.end_detail) == ("agent_hangup", "the caller is done")
    ((call_sid, heard_ms, queued),) = call.hang_ups
    assert call_sid == call.line.call_sid
    assert heard_ms == fake.duration_ms(goodbye) and queued == 0
    turns = await call.turns()
    assert [(t.speaker, t.text, t.interrupted) for t in turns][-1] == ("agent", goodbye, False)
    metadata = (await stored(call)).metadata
    assert (metadata["endReason"], metadata["endDetail"]) == ("agent_hangup", "the caller is done")


async def test_without_twilio_credentials_end_call_ends_by_closing_the_stream(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    fake.reply_tool("end_call", {"reason": "done"}, text="Goodbye!")
    async with realtime_call(pool, fake, hang_up=False) as call:
        call.line.say(speech(500))
        outcome = await call.outcome()
    assert (outcome.status, outcome.end_reason, outcome.end_detail) == (CallStatus.COMPLETED, "agent_hangup", "done")
    assert call.line.heard_ms == fake.duration_ms("Goodbye!")


async def test_transfer_call_hands_the_caller_to_the_e164_number(pool: asyncpg.Pool, fake: FakeRealtime) -> None:
    fake.reply_tool("transfer_call", {"phone_number": "+1 (415) 555-0123", "reason": "billing"}, text="One moment.")
    async with realtime_call(pool, fake) as call:
        call.line.say(speech(500))
        outcome = await call.outcome()
    assert call.transfers == [(call.line.call_sid, "+14155550123")]
    assert (outcome.status, outcome.end_reason, outcome.end_detail) == (CallStatus.COMPLETED, "transferred", "billing")
    assert call.line.heard_ms == fake.duration_ms("One moment.")


async def test_a_transfer_to_an_invalid_number_is_refused_back_to_the_model(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    fake.reply_tool("transfer_call", {"phone_number": "12"})
    fake.reply("Could you give me the full number?")
    async with realtime_call(pool, fake) as call:
        call.line.say(speech(500))
        turns = await call.wait_for_turns(2)
    assert call.transfers == []
    (created,) = fake.of_type("conversation.item.create")
    assert created["item"]["type"] == "function_call_output"
    assert created["item"]["output"].startswith("error: '12' is not a valid phone number")
    assert turns[-1].text == "Could you give me the full number?"


async def test_send_dtmf_plays_the_tones_and_tells_the_model_they_were_sent(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    fake.reply_tool("send_dtmf", {"digits": "12#"})
    fake.reply("Done.")
    async with realtime_call(pool, fake) as call:
        call.line.say(speech(500))
        turns = await call.wait_for_turns(3)
    assert [(t.speaker, t.text) for t in turns][1:] == [("agent", "[DTMF 12#]"), ("agent", "Done.")]
    assert call.line.agent_bytes_received == len(dtmf_audio("12#")) + fake.duration_ms("Done.") * BYTES_PER_MS
    (output,) = fake.of_type("conversation.item.create")
    assert output["item"]["output"] == "sent"


async def test_an_agent_function_calls_its_webhook_and_the_model_answers_with_the_result(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    requests: list[dict[str, Any]] = []

    async def availability(request: web.Request) -> web.Response:
        requests.append(await request.json())
        return web.json_response({"free": ["19:00"]})

    app = web.Application()
    app.router.add_post("/availability", availability)
    async with serve(app) as url:
        spec = FunctionSpec(
            "check_availability",
            "Free slots on a day.",
            {"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]},
        )
        function = AgentFunction("tool_1", spec, f"{url}/availability", "POST", {}, 5.0)
        fake.reply_tool("check_availability", {"day": "friday"})
        fake.reply("Friday at seven is free.")
        async with (
            aiohttp.ClientSession() as http,
            realtime_call(
                pool, fake, tools=ToolRunner([function], call={"callSid": "CA-test"}, allow_private=True, session=http)
            ) as call,
        ):
            call.line.say(speech(500))
            turns = await call.wait_for_turns(2)

    assert requests == [
        {"function": "check_availability", "arguments": {"day": "friday"}, "call": {"callSid": "CA-test"}}
    ]
    session = fake.of_type("session.update")[0]["session"]
    assert "check_availability" in {tool["name"] for tool in session["tools"]}
    (output,) = fake.of_type("conversation.item.create")
    call_id = fake.sent_of_type("response.function_call_arguments.done")[0]["call_id"]
    assert output["item"] == {"type": "function_call_output", "call_id": call_id, "output": '{"free": ["19:00"]}'}
    assert fake.received.index(output) < max(i for i, e in enumerate(fake.received) if e["type"] == "response.create")
    assert [(t.speaker, t.text) for t in turns] == [("caller", "hello"), ("agent", "Friday at seven is free.")]
    assert turns[1].latency_ms is not None  # the caller waited through the function call too


async def test_a_line_said_as_the_callers_turn_ends_is_said_after_the_models_answer_not_taken_for_it(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    line = "A colleague will call you back within the hour."
    fake.response_created_delay_ms = 300  # the server's answer to the caller is under way before the engine knows
    fake.reply(ANSWER)
    fake.reply(line)
    async with realtime_call(pool, fake) as call:
        call.line.say(speech(600))
        await until(lambda: bool(fake.sent_of_type("input_audio_buffer.speech_stopped")))
        await call.session.say_line(line, interrupt=False)  # the server refuses it: its own answer is under way
        turns = await call.wait_for_turns(3)
    assert [(t.speaker, t.text) for t in turns] == [("caller", "hello"), ("agent", ANSWER), ("agent", line)]


# --------------------------------------------------------------------------------------------------- failures


async def test_a_dropped_realtime_connection_is_reopened_with_the_conversation_replayed(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    fake.caller_says("I need an appointment")
    fake.reply(ANSWER)
    fake.reply("Tuesday at ten is free.")
    async with realtime_call(pool, fake) as call:
        call.line.say(speech(600))
        await call.wait_for_turns(2)
        await fake.drop_all()
        await until(lambda: len(fake.models) == 2)  # a second session was opened
        await until(lambda: len(fake.of_type("session.update")) == 2)
        call.line.say(speech(600))
        turns = await call.wait_for_turns(4)
    replayed = [event["item"] for event in fake.of_type("conversation.item.create")]
    assert [(item["role"], item["content"][0]["text"]) for item in replayed] == [
        ("user", "I need an appointment"),
        ("assistant", ANSWER),
    ]
    assert [turn.speaker for turn in turns] == ["caller", "agent", "caller", "agent"]
    outcome = await call.outcome()
    assert (outcome.status, outcome.end_reason) == (CallStatus.COMPLETED, "caller_hangup")


async def test_a_connection_lost_while_the_goodbye_plays_still_hangs_the_call_up(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    async with realtime_call(pool, fake) as call:
        await goodbye_of_end_call_playing(call, fake)
        await fake.drop_all()  # the goodbye is still playing: the call was ending, and must still end
        outcome = await call.outcome(timeout=8)
    assert (outcome.status, outcome.end_reason, outcome.end_detail) == (
        CallStatus.COMPLETED,
        "agent_hangup",
        "the caller is done",
    )
    assert [sid for sid, _, _ in call.hang_ups] == [call.line.call_sid]


async def test_a_connection_that_cannot_be_reopened_fails_the_call_naming_the_provider(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    async with realtime_call(pool, fake) as call:
        await until(lambda: bool(fake.of_type("session.update")))
        fake.api_key = "sk-rotated"  # the reconnect is refused
        await fake.drop_all()
        outcome = await call.outcome()
    assert (outcome.status, outcome.end_reason) == (CallStatus.FAILED, "realtime_failed")
    assert outcome.end_detail is not None and "127.0.0.1" in outcome.end_detail
    assert "HTTP 401" in outcome.end_detail
    log = await stored(call)
    assert (log.status, log.metadata["endReason"]) == (CallStatus.FAILED, "realtime_failed")


async def test_a_session_the_server_refuses_fails_the_call_instead_of_running_on_the_servers_defaults(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    config = agent_configuration(realtime={"voice": "nonesuch"}, first_sentence="Hello, Acme Dental.")
    async with realtime_call(pool, fake, config) as call:
        outcome = await call.outcome(timeout=5)
    assert (outcome.status, outcome.end_reason) == (CallStatus.FAILED, "realtime_unavailable")
    assert outcome.end_detail is not None
    assert "refused the session's configuration" in outcome.end_detail
    assert "'nonesuch'" in outcome.end_detail and "session.audio.output.voice" in outcome.end_detail
    # Nothing ran on the server's default session: no reply asked for, no audio sent either way.
    assert not fake.of_type("response.create") and not fake.of_type("input_audio_buffer.append")
    assert call.line.agent_bytes_received == 0
    assert (await stored(call)).metadata["endReason"] == "realtime_unavailable"


async def test_a_wrong_api_key_fails_the_call_without_quoting_the_key(pool: asyncpg.Pool, fake: FakeRealtime) -> None:
    key = "sk-wrong-" + secrets.token_hex(8)
    async with realtime_call(pool, fake, api_key=key) as call:
        outcome = await call.outcome()
    assert outcome.status is CallStatus.FAILED
    assert outcome.end_reason == "realtime_unavailable"
    assert outcome.end_detail is not None and "HTTP 401" in outcome.end_detail
    assert key not in outcome.end_detail and "sk-wrong" not in outcome.end_detail
    assert fake.refused == 1
    assert (await stored(call)).status is CallStatus.FAILED


async def test_a_call_that_ends_while_the_connection_is_being_reopened_leaves_no_realtime_session_open(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    async with realtime_call(pool, fake) as call:
        await until(lambda: bool(fake.of_type("session.update")))
        fake.confirm_delay_ms = 5000  # the reopened session is slow to be configured
        await fake.drop_all()
        await until(lambda: len(fake.of_type("session.update")) == 2)
        call.line.hang_up()  # the caller leaves meanwhile
        outcome = await call.outcome()
    assert outcome.end_reason == "caller_hangup"
    await until(lambda: fake.open_sessions == 0, timeout=3)


async def test_a_response_the_server_fails_reopens_the_session_and_the_caller_is_answered(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    fake.caller_says("I need an appointment")
    fake.reply_fails()
    fake.reply(ANSWER)
    async with realtime_call(pool, fake) as call:
        call.line.say(speech(600))
        turns = await call.wait_for_turns(2)
    assert len(fake.models) == 2  # the session that failed the reply was replaced
    # Its transcript of the caller's words went with it; the model answers all the same.
    assert [(t.speaker, t.text) for t in turns] == [("caller", TRANSCRIPTION_FAILED), ("agent", ANSWER)]
    assert (await stored(call)).metadata["endReason"] == "caller_hangup"


async def test_a_model_that_fails_every_response_fails_the_call_naming_the_error(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    for _ in range(RECONNECTS_PER_WINDOW + 1):  # the first session's and each reopened one's
        fake.reply_fails("rate_limit_exceeded", "Rate limit reached for gpt-realtime.")
    async with realtime_call(pool, fake) as call:
        call.line.say(speech(600))
        outcome = await call.outcome(timeout=10)
    assert (outcome.status, outcome.end_reason) == (CallStatus.FAILED, "realtime_failed")
    assert outcome.end_detail is not None and "rate_limit_exceeded" in outcome.end_detail
    assert f"lost {RECONNECTS_PER_WINDOW + 1} times within 60 s" in outcome.end_detail
    assert len(fake.models) == RECONNECTS_PER_WINDOW + 1
    assert (await stored(call)).metadata["endReason"] == "realtime_failed"


async def test_a_connection_dropped_after_a_failed_response_is_reopened_again(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    fake.caller_says("I need an appointment")
    fake.reply_fails()
    fake.reply(ANSWER)
    fake.reply("Tuesday at ten is free.")
    async with realtime_call(pool, fake) as call:
        call.line.say(speech(600))
        await call.wait_for_turns(2)  # answered on the session reopened after the failed response
        await fake.drop_all()  # and later the network fails
        await until(lambda: len(fake.of_type("session.update")) == 3)
        call.line.say(speech(600))
        turns = await call.wait_for_turns(4)
    assert len(fake.models) == 3
    assert [t.speaker for t in turns] == ["caller", "agent", "caller", "agent"]
    assert turns[3].text == "Tuesday at ten is free."
    assert (await stored(call)).metadata["endReason"] == "caller_hangup"


async def test_sessions_lost_further_apart_than_the_window_are_each_reopened(
    pool: asyncpg.Pool, fake: FakeRealtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(realtime_connection, "RECONNECT_WINDOW_SECONDS", 0.5)
    async with realtime_call(pool, fake) as call:
        for opened in range(1, RECONNECTS_PER_WINDOW + 2):
            await until(functools.partial(lambda n: len(fake.of_type("session.update")) == n, opened))
            await fake.drop_all()
            await asyncio.sleep(0.6)  # the next loss comes after the window has moved past this one
        await until(lambda: len(fake.of_type("session.update")) == RECONNECTS_PER_WINDOW + 2)
        call.line.say(speech(600))
        turns = await call.wait_for_turns(2)
    assert [t.speaker for t in turns] == ["caller", "agent"]
    assert (await stored(call)).metadata["endReason"] == "caller_hangup"


async def test_a_connection_dropped_before_the_callers_words_were_transcribed_still_answers_the_caller(
    pool: asyncpg.Pool,
) -> None:
    # The model is still to speak, and the caller's words to be transcribed, when the connection drops.
    async with FakeRealtime(first_audio_delay_ms=3000, transcription_delay_ms=3000) as fake:
        fake.reply(ANSWER)
        fake.reply("Sorry, could you say that again?")
        async with realtime_call(pool, fake) as call:
            call.line.say(speech(600))
            await until(lambda: bool(fake.sent_of_type("response.created")))
            await fake.drop_all()
            turns = await call.wait_for_turns(2)
    assert [(t.speaker, t.text) for t in turns] == [
        ("caller", TRANSCRIPTION_FAILED),
        ("agent", "Sorry, could you say that again?"),
    ]
    replayed = [event["item"] for event in fake.of_type("conversation.item.create")]
    assert [(item["role"], item["content"][0]["text"]) for item in replayed] == [("user", TRANSCRIPTION_FAILED)]


async def test_a_function_result_that_comes_while_the_model_answers_the_caller_is_answered_after_it(
    pool: asyncpg.Pool,
) -> None:
    requests: list[dict[str, Any]] = []

    async def availability(request: web.Request) -> web.Response:
        requests.append(await request.json())
        await asyncio.sleep(2.0)  # a slow CRM
        return web.json_response({"free": ["19:00"]})

    app = web.Application()
    app.router.add_post("/availability", availability)
    spec = FunctionSpec("check_availability", "Free slots on a day.", {"type": "object", "properties": {}})
    async with serve(app) as url, aiohttp.ClientSession() as http, FakeRealtime(speedup=1.0) as fake:
        function = AgentFunction("tool_1", spec, f"{url}/availability", "POST", {}, 5.0)
        tools = ToolRunner([function], call={"callSid": "CA-test"}, allow_private=True, session=http)
        fake.reply_tool("check_availability", {"day": "friday"})
        fake.reply(LONG_ANSWER)  # to the caller who speaks while the CRM is asked; still generating when it answers
        fake.reply("Friday at seven is free.")
        async with realtime_call(pool, fake, tools=tools) as call:
            call.line.say(speech(500))
            await until(lambda: bool(requests))
            call.line.say(speech(500))
            turns = await call.wait_for_turns(4, timeout=20)

    assert fake.sent_of_type("error") == []
    assert len(requests) == 1
    (output,) = fake.of_type("conversation.item.create")
    assert output["item"]["output"] == '{"free": ["19:00"]}'
    assert [(t.speaker, t.text) for t in turns][2:] == [("agent", LONG_ANSWER), ("agent", "Friday at seven is free.")]


def webhook_tools(url: str, http: aiohttp.ClientSession, *names: str) -> ToolRunner:
    """The agent's functions `names`, each POSTing to `url`/<name>."""
    functions = [
        AgentFunction(f"tool_{name}", FunctionSpec(name, name, {"type": "object"}), f"{url}/{name}", "POST", {}, 5.0)
        for name in names
    ]
    return ToolRunner(functions, call={"callSid": "CA-test"}, allow_private=True, session=http)


async def test_two_functions_called_in_one_response_run_once_each_and_the_model_hears_each_result_once(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    requests: list[str] = []

    async def availability(request: web.Request) -> web.Response:
        requests.append(request.path)
        await asyncio.sleep(1.0)  # slower than the other
        return web.json_response({"free": ["19:00"]})

    async def book(request: web.Request) -> web.Response:
        requests.append(request.path)
        return web.Response(status=500, text="database down")

    app = web.Application()
    app.router.add_post("/check_availability", availability)
    app.router.add_post("/book", book)
    async with serve(app) as url, aiohttp.ClientSession() as http:
        fake.reply_tools(("check_availability", {"day": "friday"}), ("book", {"time": "19:00"}))
        fake.reply("Seven is free, but I could not book it.")
        async with realtime_call(pool, fake, tools=webhook_tools(url, http, "check_availability", "book")) as call:
            call.line.say(speech(500))
            turns = await call.wait_for_turns(2)

    assert sorted(requests) == ["/book", "/check_availability"]
    assert fake.sent_of_type("response.function_call_arguments.delta")  # the arguments came in pieces
    called = {event["call_id"]: event["name"] for event in fake.sent_of_type("response.function_call_arguments.done")}
    outputs = {event["item"]["call_id"]: event["item"]["output"] for event in fake.of_type("conversation.item.create")}
    assert len(fake.of_type("conversation.item.create")) == 2
    assert {called[call_id]: output for call_id, output in outputs.items()} == {
        "check_availability": '{"free": ["19:00"]}',
        "book": "error: the book service answered HTTP 500: database down",
    }
    assert len(fake.of_type("response.create")) == 1  # one answer, once both results are in
    assert fake.sent_of_type("error") == []
    assert turns[-1].text == "Seven is free, but I could not book it."


async def test_a_function_call_whose_arguments_are_not_a_json_object_is_sent_back_to_the_model_not_to_the_webhook(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    requests: list[Any] = []

    async def book(request: web.Request) -> web.Response:
        requests.append(await request.json())
        return web.json_response({"booked": True})

    app = web.Application()
    app.router.add_post("/book", book)
    async with serve(app) as url, aiohttp.ClientSession() as http:
        fake.reply_tool("book", '{"time": "19:00", "name": "Ada')  # cut off: not JSON
        fake.reply_tool("book", {"time": "19:00", "name": "Ada"})
        fake.reply("Booked for seven.")
        async with realtime_call(pool, fake, tools=webhook_tools(url, http, "book")) as call:
            call.line.say(speech(500))
            turns = await call.wait_for_turns(2)

    assert requests == [
        {"function": "book", "arguments": {"time": "19:00", "name": "Ada"}, "call": {"callSid": "CA-test"}}
    ]
    first, second = (event["item"]["output"] for event in fake.of_type("conversation.item.create"))
    assert first == "error: the arguments were not a JSON object; call book again"
    assert second == '{"booked": true}'
    assert turns[-1].text == "Booked for seven."


async def test_a_caller_who_hangs_up_while_a_function_runs_ends_the_call_at_once(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    asked, answer = asyncio.Event(), asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        asked.set()
        await answer.wait()  # not before the call has ended
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/lookup", stuck)
    async with serve(app) as url, aiohttp.ClientSession() as http:
        fake.reply_tool("lookup", {})
        async with realtime_call(pool, fake, tools=webhook_tools(url, http, "lookup")) as call:
            call.line.say(speech(500))
            await asyncio.wait_for(asked.wait(), 10)
            call.line.hang_up()
            outcome = await call.outcome(timeout=5)
        answer.set()
    assert (outcome.status, outcome.end_reason) == (CallStatus.COMPLETED, "caller_hangup")
    assert fake.of_type("conversation.item.create") == [] and fake.of_type("response.create") == []
    await until(lambda: fake.open_sessions == 0, timeout=3)


async def test_a_caller_who_hangs_up_while_the_agent_speaks_ends_the_session_with_what_they_heard_recorded(
    pool: asyncpg.Pool,
) -> None:
    async with FakeRealtime(speedup=1.0) as fake:  # the answer is still being generated when the caller leaves
        fake.reply(LONG_ANSWER)
        async with realtime_call(pool, fake) as call:
            call.line.say(speech(500))
            await until(lambda: call.line.heard_ms >= 1000)
            call.line.hang_up()
            outcome = await call.outcome(timeout=5)
            sent_by_the_end = call.line.agent_bytes_received
        assert fake.open_sessions == 0  # closed as the call ended, the reply unfinished
        await asyncio.sleep(0.3)
        assert call.line.agent_bytes_received == sent_by_the_end
    assert outcome.end_reason == "caller_hangup"
    caller, agent = await call.turns()
    assert (caller.speaker, agent.speaker, agent.interrupted) == ("caller", "agent", True)
    heard_words, all_words = agent.text.split(), LONG_ANSWER.split()
    assert 0 < len(heard_words) < len(all_words) and heard_words == all_words[: len(heard_words)]
    assert 0 < agent.end_ms - agent.start_ms <= call.line.heard_ms


async def test_a_session_update_the_server_refuses_mid_call_fails_the_call_naming_the_refusal(
    pool: asyncpg.Pool, fake: FakeRealtime
) -> None:
    async with realtime_call(pool, fake, outbound=True) as call:
        await until(lambda: bool(fake.of_type("session.update")))  # the model holds its replies for the callee's hello
        fake.refused_update = {"code": "invalid_value", "message": "Invalid value.", "param": "session.instructions"}
        call.line.say(speech(500))  # "Hello?": the model is to answer by itself from now on; the server refuses
        outcome = await call.outcome(timeout=10)
    assert (outcome.status, outcome.end_reason) == (CallStatus.FAILED, "realtime_failed")
    assert outcome.end_detail is not None
    assert "refused the session's configuration: invalid_value" in outcome.end_detail
    assert "session.instructions" in outcome.end_detail
    assert fake.open_sessions == 0


async def test_a_call_out_of_credits_while_the_agent_speaks_says_goodbye_and_is_cut_off(
    pool: asyncpg.Pool,
) -> None:
    async def no_more_credits() -> bool:
        return False

    async with FakeRealtime(speedup=1.0) as fake:  # the answer is still being generated when the credits run out
        fake.reply(LONG_ANSWER)
        fake.reply(LONG_ANSWER)  # a goodbye too long for the paid time left
        async with realtime_call(pool, fake, extend_reservation=no_more_credits, credit_minute_seconds=4.0) as call:
            call.line.say(speech(400))
            outcome = await call.outcome(timeout=10)
        assert fake.open_sessions == 0
    assert (outcome.status, outcome.end_reason) == (CallStatus.COMPLETED, "insufficient_credits")
    assert len(call.hang_ups) == 1
    assert [(t.speaker, t.interrupted) for t in await call.turns()] == [
        ("caller", False),
        ("agent", True),  # the answer, cut for the goodbye
        ("agent", True),  # the goodbye, cut by the hang-up
    ]
