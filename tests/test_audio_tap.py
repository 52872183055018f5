"""The listen-in tap as a unit: both sides on the call's timeline in 100 ms chunks, paced by the caller's frames,
listeners that never make the call wait, and the two sides laid out as stereo or mixed, μ-law or PCM16."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine.call.audio_tap import (
    CALL_ENDED,
    CHUNK_BYTES,
    CHUNK_MS,
    LISTENER_TOO_SLOW,
    SILENT_CHUNK,
    AudioTap,
    ListenerQueue,
    TapChunk,
)
from media.g711 import BYTES_PER_MS, FRAME_BYTES, FRAME_MS, pcm16_to_ulaw, ulaw_to_pcm16
from media.stereo import Channels, Encoding, combine


class Heard:
    """A listener keeping what it hears."""

    def __init__(self) -> None:
        self.chunks: list[TapChunk] = []
        self.ended: str | None = None

    def hear(self, chunk: TapChunk) -> bool:
        self.chunks.append(chunk)
        return True

    def end(self, reason: str) -> None:
        self.ended = reason


def frames(count: int, first: int = 0) -> list[bytes]:
    """`count` distinct 20 ms caller frames (byte value = frame number + 1, never silence)."""
    return [bytes([(first + index) % 250 + 1]) * FRAME_BYTES for index in range(count)]


def test_a_chunk_goes_out_once_the_caller_has_run_a_chunk_past_it_with_both_sides_where_they_were_placed() -> None:
    tap, heard = AudioTap(), Heard()
    tap.add(heard)
    caller = frames(15)
    for index, frame in enumerate(caller[:10]):  # 0..200 ms: chunk 0 ends at 100, and waits one chunk more
        tap.write_caller(frame, index * FRAME_MS)
        if index == 2:
            tap.write_agent(b"\x10" * 400, 50)  # the agent's audio, sent ahead, at 50..100 ms
            tap.write_agent(b"\x20" * 800, 100)  # and 100..200 ms
    assert [chunk.sequence for chunk in heard.chunks] == [0]
    for index, frame in enumerate(caller[10:], start=10):
        tap.write_caller(frame, index * FRAME_MS)
    assert [chunk.sequence for chunk in heard.chunks] == [0, 1]
    assert heard.chunks[0].caller == b"".join(caller[:5])
    assert heard.chunks[1].caller == b"".join(caller[5:10])
    assert heard.chunks[0].agent == SILENT_CHUNK[:400] + b"\x10" * 400
    assert heard.chunks[1].agent == b"\x20" * 800


def test_a_listener_joining_mid_call_starts_at_the_chunk_of_the_next_caller_frame() -> None:
    tap, heard = AudioTap(), Heard()
    tap.write_agent(b"\x30" * 800, 0)  # nobody listens: kept, but played long before the listener joins
    tap.add(heard)
    tap.write_agent(b"\x30" * 800, 1000)  # before any caller frame: no timeline yet
    for index, frame in enumerate(frames(12), start=57):  # 1140 ms on
        tap.write_caller(frame, index * FRAME_MS)
    assert [chunk.sequence for chunk in heard.chunks] == [11]
    assert heard.chunks[0].caller == SILENT_CHUNK[: 2 * FRAME_BYTES] + b"".join(frames(3))
    assert heard.chunks[0].agent == SILENT_CHUNK


def test_a_listener_joining_mid_reply_hears_the_agent_audio_already_sent_ahead_of_playback() -> None:
    tap, heard = AudioTap(), Heard()
    tap.write_agent(b"\x30" * 800, 1000)  # nobody listens: sent ahead, heard at 1000..1100 ms (before they join)
    tap.write_agent(b"\x31" * 800, 1100)  # 1100..1200 ms
    tap.write_agent(b"\x32" * 400, 1200)  # 1200..1250 ms
    tap.add(heard)
    for index, frame in enumerate(frames(20), start=56):  # 1120 ms on
        tap.write_caller(frame, index * FRAME_MS)
    assert [chunk.sequence for chunk in heard.chunks][:2] == [11, 12]
    assert heard.chunks[0].agent == b"\x31" * CHUNK_BYTES  # what the caller hears from the chunk they joined in
    assert heard.chunks[1].agent == b"\x32" * 400 + SILENT_CHUNK[400:]


def test_agent_audio_twilio_was_told_to_drop_is_not_heard_by_a_listener_joining_after() -> None:
    tap, heard = AudioTap(), Heard()
    tap.write_agent(b"\x30" * 800, 1100)
    tap.write_agent(b"\x31" * 800, 1200)
    tap.drop_agent_from(1150)  # a barge-in: Twilio throws away what it had not played at 1150 ms
    tap.add(heard)
    for index, frame in enumerate(frames(15), start=55):  # 1100 ms on
        tap.write_caller(frame, index * FRAME_MS)
    assert [chunk.sequence for chunk in heard.chunks][:2] == [11, 12]
    assert heard.chunks[0].agent == b"\x30" * 400 + SILENT_CHUNK[400:]
    assert all(chunk.agent == SILENT_CHUNK for chunk in heard.chunks[1:])


def test_agent_audio_twilio_was_told_to_drop_is_not_heard_by_a_listener_already_listening() -> None:
    tap, heard = AudioTap(), Heard()
    tap.add(heard)
    agent_sent_to = 0
    for index, frame in enumerate(frames(60)):  # 1.2 s; the agent's audio goes out 400 ms ahead of playback
        now_ms = index * FRAME_MS
        tap.write_caller(frame, now_ms)
        if now_ms == 620:
            tap.drop_agent_from(now_ms)  # the caller barges in: Twilio drops the 400 ms it had not played
            agent_sent_to = 1100  # the agent's answer, when it comes
        while agent_sent_to < now_ms + 400:
            tap.write_agent(b"\x40" * CHUNK_BYTES, agent_sent_to)
            agent_sent_to += CHUNK_MS
    tap.close()
    agent = b"".join(chunk.agent for chunk in heard.chunks)
    assert [chunk.sequence for chunk in heard.chunks] == list(range(12))
    silence = SILENT_CHUNK[:1]
    assert agent == b"\x40" * (620 * BYTES_PER_MS) + silence * (480 * BYTES_PER_MS) + b"\x40" * (100 * BYTES_PER_MS)
    assert b"".join(chunk.caller for chunk in heard.chunks) == b"".join(frames(60))


def test_agent_audio_for_a_chunk_already_sent_keeps_only_its_part_still_to_come() -> None:
    tap, heard = AudioTap(), Heard()
    tap.add(heard)
    for index, frame in enumerate(frames(10)):
        tap.write_caller(frame, index * FRAME_MS)
    tap.write_agent(b"\x40" * 1600, 0)  # 0..200 ms, chunk 0 is out: only 100..200 ms is kept
    tap.close()
    assert [chunk.agent for chunk in heard.chunks] == [SILENT_CHUNK, b"\x40" * CHUNK_BYTES]


def test_closing_sends_the_whole_chunks_left_then_the_end() -> None:
    tap, heard = AudioTap(), Heard()
    tap.add(heard)
    for index, frame in enumerate(frames(13)):  # 260 ms: two whole chunks, a third begun
        tap.write_caller(frame, index * FRAME_MS)
    tap.close(CALL_ENDED)
    assert [chunk.sequence for chunk in heard.chunks] == [0, 1]
    assert heard.ended == CALL_ENDED
    assert not tap.listening


def test_the_last_listener_leaving_makes_the_tap_idle_and_forget_its_audio() -> None:
    tap, first, second = AudioTap(), Heard(), Heard()
    tap.add(first)
    tap.add(second)
    tap.write_caller(frames(1)[0], 0)
    tap.remove(first)
    assert tap.listening
    tap.remove(second)
    assert not tap.listening
    tap.add(first)
    for index, frame in enumerate(frames(10), start=100):  # 2 s on: a new timeline
        tap.write_caller(frame, index * FRAME_MS)
    assert [chunk.sequence for chunk in first.chunks] == [20]


async def test_a_full_listener_queue_drops_that_listener_and_the_others_go_on() -> None:
    tap, slow, fast = AudioTap(), ListenerQueue(2), ListenerQueue(100)
    tap.add(slow)
    tap.add(fast)
    for index, frame in enumerate(frames(30)):  # 600 ms: five chunks out
        tap.write_caller(frame, index * FRAME_MS)
    assert slow.ended == LISTENER_TOO_SLOW and slow.dropped.is_set()
    assert await slow.next() is None  # what it held is dropped with it
    tap.close()
    received = []
    while (chunk := await fast.next()) is not None:
        received.append(chunk.sequence)
    assert received == [0, 1, 2, 3, 4, 5]
    assert fast.ended == CALL_ENDED


def test_the_only_listener_dropped_as_a_chunk_goes_out_leaves_the_tap_idle_and_the_call_unharmed() -> None:
    tap, slow = AudioTap(), ListenerQueue(1)
    tap.add(slow)
    for index, frame in enumerate(frames(30)):  # the second chunk overflows the queue
        tap.write_caller(frame, index * FRAME_MS)
        tap.write_agent(frame, index * FRAME_MS + 40)
    assert slow.ended == LISTENER_TOO_SLOW
    assert not tap.listening


async def test_a_listener_queue_waits_for_chunks_and_ends_after_the_queued_ones() -> None:
    queue = ListenerQueue(4)
    waiting = asyncio.create_task(queue.next())
    await asyncio.sleep(0)
    assert queue.hear(TapChunk(7, SILENT_CHUNK, SILENT_CHUNK))
    assert (await waiting) == TapChunk(7, SILENT_CHUNK, SILENT_CHUNK)
    queue.hear(TapChunk(8, SILENT_CHUNK, SILENT_CHUNK))
    queue.end(CALL_ENDED)
    assert not queue.hear(TapChunk(9, SILENT_CHUNK, SILENT_CHUNK))
    assert [await queue.next(), await queue.next()] == [TapChunk(8, SILENT_CHUNK, SILENT_CHUNK), None]
    with pytest.raises(ValueError, match="capacity"):
        ListenerQueue(0)


# ------------------------------------------------------------------------------------------- layouts


LEFT = pcm16_to_ulaw(np.array([1000, -2000, 30000, 0], dtype=np.int16))
RIGHT = pcm16_to_ulaw(np.array([500, 500, 30000, -7], dtype=np.int16))


def test_stereo_mulaw_interleaves_the_caller_left_and_the_agent_right() -> None:
    assert combine(LEFT, RIGHT, Channels.STEREO, Encoding.MULAW) == bytes(
        byte for pair in zip(LEFT, RIGHT, strict=True) for byte in pair
    )


def test_stereo_pcm16_interleaves_the_decoded_samples_little_endian() -> None:
    out = np.frombuffer(combine(LEFT, RIGHT, Channels.STEREO, Encoding.PCM16), dtype="<i2").reshape(-1, 2)
    assert out[:, 0].tolist() == ulaw_to_pcm16(LEFT).tolist()
    assert out[:, 1].tolist() == ulaw_to_pcm16(RIGHT).tolist()


def test_mixed_sums_the_two_sides_clipped_to_sixteen_bits() -> None:
    mixed = np.frombuffer(combine(LEFT, RIGHT, Channels.MIXED, Encoding.PCM16), dtype="<i2")
    expected = np.clip(ulaw_to_pcm16(LEFT).astype(np.int32) + ulaw_to_pcm16(RIGHT), -32768, 32767)
    assert mixed.tolist() == expected.tolist()
    assert mixed[2] == 32767
    assert combine(LEFT, RIGHT, Channels.MIXED, Encoding.MULAW) == pcm16_to_ulaw(expected.astype(np.int16))


def test_channels_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        combine(LEFT, RIGHT[:2], Channels.STEREO, Encoding.MULAW)
