"""OutboundAudio paces the agent's audio to Twilio: never more than lead_ms ahead, with a wait per two chunks."""

from __future__ import annotations

import asyncio
import json
import wave
from pathlib import Path

import numpy as np
import pytest

from engine.call.audio_tap import SILENT_CHUNK, AudioTap
from engine.call.outbound_audio import OutboundAudio, StreamTimeline, heard_of_cut
from media.g711 import BYTES_PER_MS, FRAME_BYTES, FRAME_MS
from media.recording import StereoWavRecorder
from tests.test_audio_tap import Heard
from tests.test_twilio_stream import streaming

CHUNK = b"\x10" * 800  # 100 ms of μ-law


class FakeTime:
    """A clock that only moves when the sender sleeps; what was sent, and how far ahead, at each send."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


class Sent:
    def __init__(self, out: list[OutboundAudio]) -> None:
        self.out = out
        self.ahead_ms: list[int] = []  # Twilio's queue when each media frame went out
        self.events: list[str] = []

    async def __call__(self, text: str) -> None:
        event = json.loads(text)["event"]
        self.events.append(event)
        if event == "media":
            self.ahead_ms.append(self.out[0].queued_ms)


def sender(
    time: FakeTime,
    *,
    lead_ms: int = 300,
    resume_ms: int = 200,
    recorder: StereoWavRecorder | None = None,
    tap: AudioTap | None = None,
) -> tuple[OutboundAudio, Sent]:
    holder: list[OutboundAudio] = []
    sent = Sent(holder)
    timeline = StreamTimeline(time.clock)
    out = OutboundAudio(
        streaming(),
        sent,
        timeline,
        recorder,
        tap,
        lead_ms=lead_ms,
        resume_ms=resume_ms,
        chunk_ms=100,
        clock=time.clock,
        sleep=time.sleep,
    )
    holder.append(out)
    return out, sent


async def test_audio_goes_out_up_to_the_lead_then_waits_down_to_the_resume_point() -> None:
    time = FakeTime()
    out, sent = sender(time, lead_ms=300, resume_ms=200)
    await out.play(1, CHUNK * 10)  # a second of audio, all at hand (a fast synthesizer)
    assert sent.ahead_ms == [0, 100, 200, 300, 200, 300, 200, 300, 200, 300]
    assert time.sleeps == [0.2, 0.2, 0.2]  # one wait per two chunks once ahead
    assert out.queued_ms == 400


async def test_with_resume_equal_to_lead_every_chunk_waits() -> None:
    time = FakeTime()
    out, sent = sender(time, lead_ms=300, resume_ms=300)
    await out.play(1, CHUNK * 10)
    assert sent.ahead_ms == [0, 100, 200, 300, 300, 300, 300, 300, 300, 300]
    assert time.sleeps == [0.1] * 6


async def test_a_mark_goes_out_where_each_wait_begins_so_a_clear_always_has_one_to_flush() -> None:
    time = FakeTime()
    holder: list[OutboundAudio] = []
    sent = Sent(holder)

    async def sleep(seconds: float) -> None:
        sent.events.append("wait")
        await time.sleep(seconds)

    out = OutboundAudio(
        streaming(), sent, StreamTimeline(time.clock), lead_ms=300, resume_ms=200, chunk_ms=100, mark_every_ms=1000,
        clock=time.clock, sleep=sleep,
    )  # fmt: skip
    holder.append(out)
    await out.play(1, CHUNK * 8)
    assert "".join(event[:2] for event in sent.events).split("wa") == [
        "memamememema",  # the first chunk and its mark, up to the lead, the mark where the wait begins
        "memema",  # from the resume point up to the lead again, a mark, a wait
        "meme",
    ]


async def test_audio_played_slower_than_real_time_never_waits() -> None:
    time = FakeTime()
    out, sent = sender(time)
    for _ in range(5):
        await out.play(1, CHUNK)
        time.now += 0.15  # the next chunk comes after this one has played
    assert time.sleeps == []
    assert sent.ahead_ms == [0, 0, 0, 0, 0]


def test_a_resume_point_beyond_the_lead_is_refused() -> None:
    with pytest.raises(ValueError, match="resume_ms"):
        OutboundAudio(streaming(), Sent([]), StreamTimeline(), lead_ms=200, resume_ms=300)


async def test_a_clear_takes_the_audio_twilio_throws_away_out_of_the_recording_and_the_listen_in(
    tmp_path: Path,
) -> None:
    time = FakeTime()
    recorder = StereoWavRecorder(tmp_path / "call.wav", elapsed_ms=lambda: 3_600_000)
    tap, listener = AudioTap(), Heard()
    tap.add(listener)
    out, sent = sender(time, lead_ms=400, resume_ms=300, recorder=recorder, tap=tap)
    caller_frame = b"\x20" * FRAME_BYTES
    tap.write_caller(caller_frame, 0)
    recorder.write_caller(caller_frame, 0)
    await out.play(1, CHUNK * 10)  # a second of agent audio from 0 ms; sending stops 400 ms ahead of playback
    cut_ms = round((time.now - 100.0) * 1000)  # where the caller's playback is as the caller barges in
    await out.clear()
    assert sent.events[-1] == "clear" and cut_ms == 600  # 400 ms sent but never heard
    for at_ms in range(FRAME_MS, 1200, FRAME_MS):  # the call goes on: the caller's frames pace the listen-in
        tap.write_caller(caller_frame, at_ms)
        recorder.write_caller(caller_frame, at_ms)
    tap.close()
    recorder.close()

    with wave.open(str(tmp_path / "call.wav"), "rb") as wav:
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16).reshape(-1, 2)
    agent, cut = frames[:, 1], cut_ms * BYTES_PER_MS
    assert agent[:cut].all() and not agent[cut:].any()  # the agent up to the barge-in, nothing after it
    assert frames[:, 0].all() and len(frames) == 1200 * BYTES_PER_MS  # the caller's channel whole
    heard = b"".join(chunk.agent for chunk in listener.chunks)
    assert len(listener.chunks) == 12
    assert heard == CHUNK[:1] * cut + SILENT_CHUNK[:1] * (1200 * BYTES_PER_MS - cut)


async def test_a_clear_says_how_much_of_each_utterance_it_threw_away_unheard() -> None:
    time = FakeTime()
    out, _ = sender(time, lead_ms=400, resume_ms=300)
    await out.play(1, CHUNK * 5)  # heard from 0 to 500 ms
    await out.play(2, CHUNK * 3)  # from 500 to 800 ms, sent by 400 ms
    time.now += 0.05  # the caller barges in 450 ms into the call, half way through the first utterance's last chunk
    assert await out.clear() == {1: 50, 2: 300}
    await out.play(3, CHUNK)
    assert await out.clear() == {3: 100}  # what went before that clear is not counted again


async def test_a_cut_while_a_chunk_is_on_its_way_out_counts_it_unheard() -> None:
    time = FakeTime()
    stream = streaming()
    timeline = StreamTimeline(time.clock)
    on_the_wire, released = asyncio.Event(), asyncio.Event()

    async def send(text: str) -> None:
        if json.loads(text)["event"] == "media" and stream.playback.utterance(1).sent_ms == 300:
            on_the_wire.set()
            await released.wait()  # the third chunk is still being written when the caller barges in

    out = OutboundAudio(stream, send, timeline, chunk_ms=100, clock=time.clock, sleep=time.sleep)
    playing = asyncio.create_task(out.play(1, CHUNK * 5))
    await on_the_wire.wait()
    time.now += 0.15  # 150 ms into the utterance
    dropped = out.cut()  # no await: the barge-in cuts on the caller-frame path
    playing.cancel()
    await asyncio.gather(playing, return_exceptions=True)
    await out.send_clear()

    assert dropped == {1: 150}
    assert heard_of_cut(dropped, stream.playback.utterance(1)) == 150
    assert heard_of_cut(dropped, stream.playback.utterance(1), at_most=120) == 120


def test_a_recording_window_too_short_to_take_back_the_lead_is_refused(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=800)
    with pytest.raises(ValueError, match="window_ms"):
        OutboundAudio(streaming(), Sent([]), StreamTimeline(), recorder, lead_ms=400)
