"""OutboundAudio paces the agent's audio to Twilio: never more than lead_ms ahead, with a wait per two chunks."""

from __future__ import annotations

import json

import pytest

from engine.call.outbound_audio import OutboundAudio, StreamTimeline
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


def sender(time: FakeTime, *, lead_ms: int = 300, resume_ms: int = 200) -> tuple[OutboundAudio, Sent]:
    holder: list[OutboundAudio] = []
    sent = Sent(holder)
    timeline = StreamTimeline(time.clock)
    out = OutboundAudio(
        streaming(), sent, timeline, lead_ms=lead_ms, resume_ms=resume_ms, clock=time.clock, sleep=time.sleep
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
