"""Specifications of the call simulator, run against a small fake engine that speaks the webhook and stream contract."""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import time
import wave
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped, unused-ignore]

from config.settings import load_settings
from engine.simulator import (
    CallEnding,
    CallResult,
    DropAudio,
    Dtmf,
    HangUp,
    Pause,
    PlaybackQueue,
    PlayWav,
    Say,
    Step,
    add_call_command,
    run_call_command,
    simulate_call,
)
from media.g711 import pcm16_to_ulaw
from tests.fakes.server import serve

TOKEN = "test-auth-token"
SILENT_FRAME = b"\xff" * 160
TWIML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{url}">'
    '<Parameter name="callLogId" value="log-123" /></Stream></Connect></Response>'
)
REFUSAL = "<Response><Say>This number is not in service.</Say><Hangup/></Response>"


def tone_ulaw(ms: int, rate: int = 8000) -> bytes:
    """A 440 Hz tone as μ-law 8 kHz bytes."""
    t = np.arange(rate * ms // 1000) / rate
    return pcm16_to_ulaw((np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16))


def write_tone_wav(path: Path, ms: int, rate: int) -> Path:
    """A mono 16-bit WAV of a 440 Hz tone at `rate`."""
    t = np.arange(rate * ms // 1000) / rate
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
    return path


@dataclass
class Agent:
    """The fake engine's side of one media stream."""

    ws: web.WebSocketResponse
    stream_sid: str
    engine: FakeEngine

    async def send(self, message: dict[str, Any]) -> float:
        """Send one message with our streamSid; returns when it was sent."""
        await self.ws.send_str(json.dumps({**message, "streamSid": self.stream_sid}))
        return time.monotonic()

    async def say(self, ulaw: bytes, chunk: int = 800) -> float:
        """Send audio faster than real time, as a TTS stream does; returns when the last chunk went."""
        for start in range(0, len(ulaw), chunk):
            payload = base64.b64encode(ulaw[start : start + chunk]).decode()
            sent = await self.send({"event": "media", "media": {"payload": payload}})
        return sent

    async def mark(self, name: str) -> float:
        """Send a mark."""
        return await self.send({"event": "mark", "mark": {"name": name}})


@dataclass
class FakeEngine:
    """Records what the simulator sent; `agent` plays the engine's part once the stream has started."""

    agent: Callable[[Agent], Coroutine[Any, Any, None]] | None = None
    refuse: bool = False
    public_url: str | None = None
    base_url: str = ""
    forms: list[dict[str, str]] = field(default_factory=list)
    signature_valid: list[bool] = field(default_factory=list)
    ws_signature: str | None = None
    ws_query: str | None = None
    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    close_code: int | None = None

    def events(self, name: str) -> list[dict[str, Any]]:
        """Messages of one event type, in arrival order."""
        return [message for _, message in self.received if message["event"] == name]

    def arrivals(self, name: str) -> list[float]:
        """When messages of one event type arrived."""
        return [at for at, message in self.received if message["event"] == name]

    async def wait_for(self, name: str, count: int = 1, timeout: float = 5) -> float:
        """Wait until `count` messages of an event type have arrived; returns the arrival of the last."""
        deadline = time.monotonic() + timeout
        while len(self.arrivals(name)) < count:
            assert time.monotonic() < deadline, f"no {count} {name} message(s) from the simulator"
            await asyncio.sleep(0.005)
        return self.arrivals(name)[count - 1]

    async def voice(self, request: web.Request) -> web.Response:
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.forms.append(form)
        signed_url = f"{self.public_url or self.base_url}/twilio/voice"
        valid = RequestValidator(TOKEN).validate(signed_url, form, request.headers.get("X-Twilio-Signature", ""))
        self.signature_valid.append(bool(valid))
        if not valid:
            return web.Response(status=403, text="bad signature")
        if self.refuse:
            return web.Response(text=REFUSAL, content_type="text/xml")
        stream = self.base_url.replace("http://", "ws://") + "/twilio/media?token=dropped"
        return web.Response(text=TWIML.format(url=stream), content_type="text/xml")

    async def media(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws_query = request.query_string
        self.ws_signature = request.headers.get("X-Twilio-Signature")
        task: asyncio.Task[None] | None = None
        async for message in ws:
            data = json.loads(message.data)
            self.received.append((time.monotonic(), data))
            if data["event"] == "start" and self.agent is not None:
                task = asyncio.create_task(self.agent(Agent(ws, data["streamSid"], self)))
        self.close_code = ws.close_code
        if task is not None:
            task.cancel()
        return ws


@asynccontextmanager
async def fake_engine(engine: FakeEngine) -> AsyncIterator[FakeEngine]:
    """Serve the fake on a free loopback port."""
    app = web.Application()
    app.router.add_post("/twilio/voice", engine.voice)
    app.router.add_get("/twilio/media", engine.media)
    async with serve(app) as base_url:
        engine.base_url = base_url
        yield engine


async def call(engine: FakeEngine, script: list[Step], **options: Any) -> CallResult:
    """Place a simulated call on the fake engine."""
    options.setdefault("auth_token", TOKEN)
    options.setdefault("timeout_s", 15)
    options.setdefault("reply_timeout_s", 2)
    return await simulate_call(engine.base_url, to="+15555550100", from_="+15005550006", script=script, **options)


def first_caller_speech(engine: FakeEngine) -> dict[str, Any]:
    """The first inbound media frame that is not silence."""
    frames = engine.events("media")
    return next(f for f in frames if base64.b64decode(f["media"]["payload"]) != SILENT_FRAME)


# --------------------------------------------------------------------------------------------------- webhook


async def test_the_voice_webhook_carries_twilios_inbound_fields() -> None:
    async with fake_engine(FakeEngine()) as engine:
        await call(engine, [HangUp()])
    form = engine.forms[0]
    assert form["CallSid"].startswith("CA") and len(form["CallSid"]) == 34
    assert form["AccountSid"].startswith("AC") and len(form["AccountSid"]) == 34
    assert (form["From"], form["To"], form["Caller"], form["Called"]) == (
        "+15005550006",
        "+15555550100",
        "+15005550006",
        "+15555550100",
    )
    assert (form["CallStatus"], form["Direction"], form["ApiVersion"]) == ("ringing", "inbound", "2010-04-01")


async def test_the_voice_webhook_is_signed_for_the_engines_public_url() -> None:
    async with fake_engine(FakeEngine(public_url="https://dialtone.example.com")) as engine:
        result = await call(engine, [HangUp()], public_url="https://dialtone.example.com")
    assert engine.signature_valid == [True]
    assert result.webhook_status == 200


async def test_a_refusal_is_reported_and_no_stream_is_opened() -> None:
    async with fake_engine(FakeEngine(refuse=True)) as engine:
        result = await call(engine, [Say("hello")])
    assert result.ending is CallEnding.REFUSED
    assert result.refusal == "This number is not in service."
    assert engine.received == []


# --------------------------------------------------------------------------------------------------- stream start


async def test_the_start_message_carries_the_twiml_parameters() -> None:
    async with fake_engine(FakeEngine()) as engine:
        result = await call(engine, [HangUp()])
    connected, start = engine.received[0][1], engine.received[1][1]
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["sequenceNumber"] == "1"
    assert start["streamSid"].startswith("MZ") and len(start["streamSid"]) == 34
    assert start["start"]["customParameters"] == {"callLogId": "log-123"}
    assert start["start"]["callSid"] == result.call_sid
    assert start["start"]["tracks"] == ["inbound"]
    assert start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert result.call_log_id == "log-123"


async def test_the_stream_url_is_opened_without_its_query() -> None:
    async with fake_engine(FakeEngine()) as engine:
        await call(engine, [HangUp()])
    assert engine.ws_query == ""


async def test_the_stream_upgrade_is_signed() -> None:
    async with fake_engine(FakeEngine()) as engine:
        await call(engine, [HangUp()])
    stream_url = engine.base_url.replace("http://", "ws://") + "/twilio/media"
    assert engine.ws_signature == RequestValidator(TOKEN).compute_signature(stream_url, {})


# --------------------------------------------------------------------------------------------------- inbound media


async def test_inbound_media_is_160_byte_frames_every_20_ms_with_string_counters() -> None:
    async with fake_engine(FakeEngine()) as engine:
        await call(engine, [Pause(600), HangUp()])
    frames = engine.events("media")
    assert 10 <= len(frames) <= 60  # about 30 in 600 ms; generous for a loaded machine
    for index, frame in enumerate(frames):
        assert frame["sequenceNumber"] == str(index + 2)
        assert frame["media"]["chunk"] == str(index + 1)
        assert frame["media"]["timestamp"] == str(index * 20)
        assert frame["media"]["track"] == "inbound"
        assert len(base64.b64decode(frame["media"]["payload"])) == 160


async def test_dropped_audio_skips_chunks_and_timestamps_as_twilio_does() -> None:
    async with fake_engine(FakeEngine()) as engine:
        await call(engine, [Pause(100), DropAudio(200), Pause(100), HangUp()])
    chunks = [int(frame["media"]["chunk"]) for frame in engine.events("media")]
    skips = [(before, after) for before, after in itertools.pairwise(chunks) if after != before + 1]
    assert [after - before - 1 for before, after in skips] == [10]  # 200 ms of 20 ms chunks never arrive
    for frame in engine.events("media"):
        assert frame["media"]["timestamp"] == str((int(frame["media"]["chunk"]) - 1) * 20)


async def test_a_wav_at_another_rate_is_resampled_to_8_khz(tmp_path: Path) -> None:
    wav = write_tone_wav(tmp_path / "tone16k.wav", 400, 16000)
    async with fake_engine(FakeEngine()) as engine:
        await call(engine, [PlayWav(wav), HangUp()], reply_timeout_s=0)
    speech = [f for f in engine.events("media") if base64.b64decode(f["media"]["payload"]) != SILENT_FRAME]
    assert len(speech) in (20, 21)  # 400 ms is 20 frames of 8 kHz μ-law


async def test_say_speaks_synthesized_speech() -> None:
    async with fake_engine(FakeEngine()) as engine:
        result = await call(engine, [Say("I'd like to book an appointment"), HangUp()], reply_timeout_s=0)
    assert first_caller_speech(engine)
    assert any(event.who == "caller" and "book an appointment" in event.text for event in result.events)


async def test_dtmf_digits_are_sent_as_dtmf_events() -> None:
    async with fake_engine(FakeEngine()) as engine:
        await call(engine, [Dtmf("1#"), HangUp()], reply_timeout_s=0)
    dtmf = engine.events("dtmf")
    assert [d["dtmf"] for d in dtmf] == [
        {"track": "inbound_track", "digit": "1"},
        {"track": "inbound_track", "digit": "#"},
    ]
    assert all(isinstance(d["sequenceNumber"], str) for d in dtmf)


# --------------------------------------------------------------------------------------------------- playback


async def test_a_mark_is_echoed_only_after_its_audio_has_played() -> None:
    sent_at: list[float] = []

    async def agent(side: Agent) -> None:
        await side.say(tone_ulaw(500))
        sent_at.append(await side.mark("g1-u1-1"))

    async with fake_engine(FakeEngine(agent=agent)) as engine:
        result = await call(engine, [])
    echoed_at = engine.arrivals("mark")[0]
    assert echoed_at - sent_at[0] >= 0.4  # 500 ms of audio had to play first
    assert engine.events("mark")[0]["mark"] == {"name": "g1-u1-1"}
    assert result.marks_played == ["g1-u1-1"]


async def test_a_mark_with_nothing_queued_is_echoed_at_once() -> None:
    sent_at: list[float] = []

    async def agent(side: Agent) -> None:
        sent_at.append(await side.mark("g1-u1-1"))

    async with fake_engine(FakeEngine(agent=agent)) as engine:
        await call(engine, [Pause(300), HangUp()])
    assert engine.arrivals("mark")[0] - sent_at[0] < 0.2


async def test_a_clear_drops_queued_audio_and_flushes_pending_marks_in_order() -> None:
    cleared_at: list[float] = []

    async def agent(side: Agent) -> None:
        for name in ("a", "b", "c"):
            await side.say(tone_ulaw(1000))
            await side.mark(name)
        await asyncio.sleep(0.3)
        cleared_at.append(await side.send({"event": "clear"}))

    async with fake_engine(FakeEngine(agent=agent)) as engine:
        result = await call(engine, [], reply_timeout_s=3)
    marks = engine.events("mark")
    assert [m["mark"]["name"] for m in marks] == ["a", "b", "c"]
    assert engine.arrivals("mark")[-1] - cleared_at[0] < 0.2
    assert result.marks_flushed == ["a", "b", "c"]
    assert result.utterances[0].cleared
    assert result.utterances[0].duration_s < 1.0  # the rest of the 3 s was dropped, not played


async def test_the_heard_audio_is_saved_as_a_wav(tmp_path: Path) -> None:
    async def agent(side: Agent) -> None:
        await side.say(tone_ulaw(400))

    async with fake_engine(FakeEngine(agent=agent)) as engine:
        result = await call(engine, [])
    result.save_heard(tmp_path / "heard.wav")
    with wave.open(str(tmp_path / "heard.wav"), "rb") as heard:
        assert (heard.getnchannels(), heard.getsampwidth(), heard.getframerate()) == (1, 2, 8000)
        assert heard.getnframes() == len(result.heard) >= 3200
    assert len(result.utterances) == 1
    assert abs(result.utterances[0].duration_s - 0.4) < 0.03


# --------------------------------------------------------------------------------------------------- turn taking


async def test_the_caller_waits_for_the_agent_to_finish_before_speaking(tmp_path: Path) -> None:
    wav = write_tone_wav(tmp_path / "tone.wav", 200, 8000)
    agent_done: list[float] = []

    async def agent(side: Agent) -> None:
        await side.say(tone_ulaw(800))
        agent_done.append(time.monotonic() + 0.8)  # when playback of that audio ends

    async with fake_engine(FakeEngine(agent=agent)) as engine:
        await call(engine, [PlayWav(wav), HangUp()])
    speech_at = engine.arrivals("media")[engine.events("media").index(first_caller_speech(engine))]
    assert speech_at >= agent_done[0] + 0.4  # ~600 ms of agent silence first


async def test_barge_in_after_ms_speaks_while_the_agent_is_still_talking(tmp_path: Path) -> None:
    wav = write_tone_wav(tmp_path / "tone.wav", 200, 8000)
    agent_started: list[float] = []

    async def agent(side: Agent) -> None:
        agent_started.append(time.monotonic())
        await side.say(tone_ulaw(3000))

    async with fake_engine(FakeEngine(agent=agent)) as engine:
        await call(engine, [PlayWav(wav, barge_in_after_ms=500), HangUp()])
    speech_at = engine.arrivals("media")[engine.events("media").index(first_caller_speech(engine))]
    assert 0.4 <= speech_at - agent_started[0] < 2.0  # well before the agent's 3 s were over


# --------------------------------------------------------------------------------------------------- endings


async def test_hanging_up_sends_stop_and_closes_with_1000() -> None:
    async with fake_engine(FakeEngine()) as engine:
        result = await call(engine, [Pause(100), HangUp()])
    stop = engine.received[-1][1]
    assert stop["event"] == "stop"
    assert stop["stop"] == {"accountSid": result.account_sid, "callSid": result.call_sid}
    assert engine.close_code == 1000
    assert result.ending is CallEnding.CALLER_HUNG_UP


async def test_the_engine_closing_first_is_reported() -> None:
    async def agent(side: Agent) -> None:
        await asyncio.sleep(0.2)
        await side.ws.close()

    async with fake_engine(FakeEngine(agent=agent)) as engine:
        result = await call(engine, [Pause(5000)])
    assert result.ending is CallEnding.ENGINE_CLOSED
    assert engine.events("stop") == []


async def test_an_unsupported_event_from_the_engine_is_a_protocol_error() -> None:
    async def agent(side: Agent) -> None:
        await side.send({"event": "hangup"})

    async with fake_engine(FakeEngine(agent=agent)) as engine:
        result = await call(engine, [Pause(5000)])
    assert result.ending is CallEnding.PROTOCOL_ERROR
    assert result.protocol_errors and result.protocol_errors[0].startswith("31924")


async def test_a_call_that_outlives_its_timeout_is_hung_up() -> None:
    async with fake_engine(FakeEngine()) as engine:
        result = await call(engine, [Pause(5000)], timeout_s=0.5)
    assert result.ending is CallEnding.TIMEOUT
    assert engine.events("stop")


# --------------------------------------------------------------------------------------------------- pieces


def test_playback_reaches_a_mark_only_once_the_audio_before_it_is_played() -> None:
    queue = PlaybackQueue()
    queue.push_audio(b"\x00" * 300)
    assert queue.push_mark("m") == []
    assert queue.advance(160) == (b"\x00" * 160, [])
    assert queue.advance(160) == (b"\x00" * 140, ["m"])


def test_the_call_command_keeps_steps_in_command_line_order() -> None:
    parser = argparse.ArgumentParser()
    add_call_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["call", "--say", "hello", "--dtmf", "12", "--pause", "300", "--wav", "x.wav"])
    assert args.steps == [Say("hello"), Dtmf("12"), Pause(300), PlayWav("x.wav")]
    assert (args.to, args.from_) == ("+15555550100", "+15005550006")


async def test_the_call_command_prints_the_conversation_and_saves_what_was_heard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def agent(side: Agent) -> None:
        await side.say(tone_ulaw(300))

    parser = argparse.ArgumentParser()
    add_call_command(parser.add_subparsers(dest="command"))
    async with fake_engine(FakeEngine(agent=agent)) as engine:
        args = parser.parse_args(
            ["call", "--url", engine.base_url, "--dtmf", "5", "--reply-timeout", "1", "--save", str(tmp_path / "h.wav")]
        )
        status = await run_call_command(args, load_settings(twilio_auth_token=TOKEN, public_url=None))
    out = capsys.readouterr().out
    assert status == 0
    assert "] caller: presses 5" in out
    assert "] agent: speaking … (0.3 s)" in out
    assert (tmp_path / "h.wav").is_file()


async def test_the_call_command_without_a_database_to_read_says_why_the_conversation_is_not_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def agent(side: Agent) -> None:
        await side.say(tone_ulaw(100))

    parser = argparse.ArgumentParser()
    add_call_command(parser.add_subparsers(dest="command"))
    settings = load_settings(twilio_auth_token=TOKEN, public_url=None, database_url=None, state_dir=tmp_path / "state")
    async with fake_engine(FakeEngine(agent=agent)) as engine:
        args = parser.parse_args(["call", "--url", engine.base_url, "--reply-timeout", "1"])
        status = await run_call_command(args, settings)
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"conversation not shown: no embedded database runs in {tmp_path / 'state'}" in out
    assert not (tmp_path / "state").exists(), "an empty embedded database was started"


async def test_the_call_command_on_an_engine_serving_every_address_calls_it_on_loopback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def agent(side: Agent) -> None:
        await side.say(tone_ulaw(100))

    parser = argparse.ArgumentParser()
    add_call_command(parser.add_subparsers(dest="command"))
    async with fake_engine(FakeEngine(agent=agent)) as engine:
        port = int(engine.base_url.rsplit(":", 1)[1])
        settings = load_settings(host="0.0.0.0", port=port, twilio_auth_token=TOKEN, public_url=None)  # noqa: S104
        status = await run_call_command(parser.parse_args(["call", "--reply-timeout", "1"]), settings)
    assert status == 0, capsys.readouterr().out
    assert [form["To"] for form in engine.forms] == ["+15555550100"]
    assert engine.signature_valid == [True]
