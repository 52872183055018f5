"""StereoWavRecorder: a streamed stereo WAV with both parties on one timeline, in bounded memory."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from media.g711 import ulaw_to_pcm16
from media.recording import LEAD_MS, RecorderClosedError, StereoWavRecorder, repair_wav_header

RATE = 8000
CALL_MS = 10_000
WINDOW_MS = 4000


def an_hour_in() -> int:
    """The call's elapsed ms for tests that write a call's audio at once: it has lasted an hour."""
    return 3_600_000


def random_ulaw(n_bytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()


def read_wav(path: Path) -> tuple[wave._wave_params, npt.NDArray[np.int16]]:
    with wave.open(str(path), "rb") as wav:
        params = wav.getparams()
        frames = np.frombuffer(wav.readframes(params.nframes), dtype=np.int16).reshape(-1, 2)
    return params, frames


def record_synthetic_call(
    recorder: StereoWavRecorder,
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int16], list[int]]:
    """Caller frames every 20 ms (gap at 3-4 s); agent talks 4-8 s in 100 ms chunks sent up to 1 s ahead."""
    left = np.zeros(CALL_MS * 8, dtype=np.int16)
    right = np.zeros(CALL_MS * 8, dtype=np.int16)
    buffered = []
    agent_sent_to = 4000
    for now_ms in range(0, CALL_MS, 20):
        if not 3000 <= now_ms < 4000:
            frame = random_ulaw(160, now_ms)
            recorder.write_caller(frame, now_ms)
            left[now_ms * 8 : now_ms * 8 + 160] = ulaw_to_pcm16(frame)
        while agent_sent_to < min(now_ms + 1000, 8000):
            chunk = random_ulaw(800, 100_000 + agent_sent_to)
            recorder.write_agent(chunk, agent_sent_to)
            right[agent_sent_to * 8 : agent_sent_to * 8 + 800] = ulaw_to_pcm16(chunk)
            agent_sent_to += 100
        buffered.append(recorder.buffered_ms)
        if now_ms % 1000 == 0:
            recorder.flush()
    return left, right, buffered


def test_a_call_produces_a_valid_8khz_stereo_wav(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    record_synthetic_call(recorder)
    recorder.close()
    params, frames = read_wav(tmp_path / "call.wav")
    assert (params.nchannels, params.sampwidth, params.framerate) == (2, 2, RATE)
    assert params.nframes == CALL_MS * 8 == len(frames)


def test_each_party_is_on_its_channel_at_its_offsets_with_silence_in_gaps(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    left, right, _ = record_synthetic_call(recorder)
    recorder.close()
    _, frames = read_wav(tmp_path / "call.wav")
    assert np.array_equal(frames[:, 0], left)
    assert np.array_equal(frames[:, 1], right)
    assert not frames[3000 * 8 : 4000 * 8, 0].any()


def test_close_reports_duration_and_size(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    record_synthetic_call(recorder)
    info = recorder.close()
    assert info.path == tmp_path / "call.wav"
    assert info.duration_ms == CALL_MS
    assert info.bytes == (tmp_path / "call.wav").stat().st_size == 44 + CALL_MS * 8 * 4


def test_memory_stays_within_the_window(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    window_bytes = WINDOW_MS * 8 * 2  # two channels of μ-law
    _, _, buffered = record_synthetic_call(recorder)
    assert max(buffered) <= WINDOW_MS
    assert recorder.buffer_bytes == window_bytes
    recorder.close()


def test_audio_reaches_the_file_before_the_call_ends(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    record_synthetic_call(recorder)
    recorder.flush()
    assert recorder.pending_bytes == 0
    assert (tmp_path / "call.wav").stat().st_size > WINDOW_MS * 8 * 4
    recorder.close()


def test_a_recording_never_closed_is_repaired_to_play_every_whole_frame_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "call.wav"
    recorder = StereoWavRecorder(path, window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    left, right, _ = record_synthetic_call(recorder)
    recorder.flush()  # and then its process was killed: no close
    with path.open("ab") as file:
        file.write(b"\x01\x02")  # half a frame, written as the kill came
    written = (path.stat().st_size - 44) // 4

    assert repair_wav_header(path) == written

    params, frames = read_wav(path)
    assert params.nframes == written > WINDOW_MS * 8
    assert path.stat().st_size == 44 + written * 4
    np.testing.assert_array_equal(frames[:, 0], left[:written])
    np.testing.assert_array_equal(frames[:, 1], right[:written])


def test_a_file_that_is_not_a_recording_is_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "call.wav"
    path.write_bytes(b"RIFF" + b"\x00" * 60)
    assert repair_wav_header(path) is None
    assert path.read_bytes() == b"RIFF" + b"\x00" * 60


def test_a_write_far_ahead_fills_the_gap_with_silence(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    frame = random_ulaw(160, 1)
    recorder.write_caller(frame, 60_000)
    info = recorder.close()
    _, frames = read_wav(tmp_path / "call.wav")
    assert info.duration_ms == 60_020
    assert not frames[: 60_000 * 8].any()
    assert np.array_equal(frames[60_000 * 8 :, 0], ulaw_to_pcm16(frame))


def test_a_chunk_longer_than_the_window_is_recorded_whole(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    chunk = random_ulaw(3 * WINDOW_MS * 8, 2)
    recorder.write_agent(chunk, 500)
    recorder.close()
    _, frames = read_wav(tmp_path / "call.wav")
    assert np.array_equal(frames[500 * 8 :, 1], ulaw_to_pcm16(chunk))


def test_audio_older_than_half_the_window_is_dropped_and_counted(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    recorder.write_agent(random_ulaw(160, 3), 10_000)
    recorder.write_caller(random_ulaw(160, 4), 1000)
    assert recorder.dropped_ms == 20
    recorder.close()


def test_a_later_write_at_the_same_position_replaces_the_earlier(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    recorder.write_caller(random_ulaw(160, 5), 0)
    second = random_ulaw(160, 6)
    recorder.write_caller(second, 0)
    recorder.close()
    _, frames = read_wav(tmp_path / "call.wav")
    assert np.array_equal(frames[:, 0], ulaw_to_pcm16(second))


def test_an_empty_recording_is_a_valid_wav_of_zero_length(tmp_path: Path) -> None:
    info = StereoWavRecorder(tmp_path / "empty.wav").close()
    params, _ = read_wav(tmp_path / "empty.wav")
    assert (params.nchannels, params.nframes, info.duration_ms) == (2, 0, 0)


def test_writing_after_close_is_an_error(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav")
    recorder.close()
    with pytest.raises(RecorderClosedError):
        recorder.write_caller(b"\xff" * 160, 0)


async def test_flush_and_close_run_in_a_thread_from_asyncio(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    for now_ms in range(0, 6000, 20):
        recorder.write_caller(b"\x00" * 160, now_ms)
        if now_ms % 1000 == 0:
            await asyncio.to_thread(recorder.flush)
    info = await asyncio.to_thread(recorder.close)
    assert info.duration_ms == 6000


def test_audio_held_to_be_placed_in_batches_lands_where_it_was_written(tmp_path: Path) -> None:
    """Frames are gathered before they are placed; gaps, overlaps, odd sizes and slides must not show it."""
    rng = np.random.default_rng(7)
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    expected = np.zeros((CALL_MS * 8 + 8000, 2), dtype=np.int16)
    caller_ms = agent_ms = 0
    for step in range(2000):
        channel = int(rng.integers(0, 2))
        if channel == 0:
            caller_ms = max(caller_ms + int(rng.choice([20, 20, 20, 20, 40, 0, -20])), 0)  # gaps, repeats
            at_ms, size = caller_ms, int(rng.choice([160, 160, 160, 80, 240]))
        else:
            agent_ms = min(agent_ms + int(rng.choice([0, 100, 100, 300])), caller_ms + 1000)  # a little ahead
            at_ms, size = agent_ms, int(rng.choice([800, 160, 1600]))
        if at_ms * 8 + size > expected.shape[0]:
            break
        audio = random_ulaw(size, step)
        (recorder.write_caller if channel == 0 else recorder.write_agent)(audio, at_ms)
        expected[at_ms * 8 : at_ms * 8 + size, channel] = ulaw_to_pcm16(audio)  # the last write wins
        if step % 300 == 0:
            recorder.flush()
    info = recorder.close()

    _, frames = read_wav(tmp_path / "call.wav")
    assert recorder.dropped_ms == 0
    assert frames.shape[0] == info.duration_ms * 8
    assert np.array_equal(frames, expected[: frames.shape[0]])


def test_audio_placed_past_the_calls_real_time_is_dropped_and_counted(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", elapsed_ms=lambda: 1000)
    recorder.write_caller(random_ulaw(160, 1), 0)
    recorder.write_caller(random_ulaw(8000, 2), 10 * 60 * 1000)  # one frame stamped ten minutes on
    info = recorder.close()
    assert recorder.dropped_ms == 1000
    assert info.duration_ms == 20
    assert info.bytes < 1000


def test_a_write_reaching_past_the_lead_keeps_only_the_part_within_it(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", elapsed_ms=lambda: 1000)
    recorder.write_agent(random_ulaw(8 * 5000, 3), 0)
    info = recorder.close()
    assert info.duration_ms == 1000 + LEAD_MS
    assert recorder.dropped_ms == 5000 - (1000 + LEAD_MS)


def test_a_timestamp_days_ahead_leaves_a_small_valid_wav(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", elapsed_ms=lambda: 0)
    recorder.write_caller(random_ulaw(160, 4), 39 * 3600 * 1000)
    info = recorder.close()
    params, _ = read_wav(tmp_path / "call.wav")
    assert (info.duration_ms, params.nframes) == (0, 0)


def record_a_barge_in(
    recorder: StereoWavRecorder, clear_ms: int
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int16]]:
    """Caller frames every 20 ms for 6 s; the agent talks from 1 s to 5.6 s in 100 ms chunks sent 400 ms ahead of
    playback, but the caller barges in at `clear_ms` (a clear) and the agent answers 600 ms later. Returns both
    channels as the caller heard them."""
    left = np.zeros(6000 * 8, dtype=np.int16)
    right = np.zeros(6000 * 8, dtype=np.int16)
    agent_sent_to = 1000
    for now_ms in range(0, 6000, 20):
        frame = random_ulaw(160, now_ms)
        recorder.write_caller(frame, now_ms)
        left[now_ms * 8 : now_ms * 8 + 160] = ulaw_to_pcm16(frame)
        if now_ms == clear_ms:
            assert recorder.drop_agent_from(clear_ms) == 0
            right[clear_ms * 8 :] = 0
            agent_sent_to = clear_ms + 600
        while agent_sent_to < min(now_ms + 400, 5600):
            chunk = random_ulaw(800, 100_000 + agent_sent_to)
            recorder.write_agent(chunk, agent_sent_to)
            right[agent_sent_to * 8 : agent_sent_to * 8 + 800] = ulaw_to_pcm16(chunk)
            agent_sent_to += 100
        if now_ms % 1000 == 0:
            recorder.flush()
    return left, right


@pytest.mark.parametrize("clear_ms", [1700, 4920])
def test_agent_audio_a_clear_dropped_is_silence_in_the_recording_while_the_callers_stays(
    tmp_path: Path, clear_ms: int
) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    left, right = record_a_barge_in(recorder, clear_ms)
    recorder.close()
    _, frames = read_wav(tmp_path / "call.wav")
    cut, answer = clear_ms * 8, (clear_ms + 600) * 8
    assert frames[cut - 8 : cut, 1].any()  # the agent was talking up to the cut
    assert not frames[cut:answer, 1].any()  # what Twilio threw away, the caller never heard
    assert np.array_equal(frames[:, 1], right)
    assert np.array_equal(frames[:, 0], left)


def test_agent_audio_a_clear_dropped_after_it_reached_the_file_stays_and_is_counted(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=WINDOW_MS, elapsed_ms=an_hour_in)
    agent = random_ulaw(2000 * 8, 1)
    recorder.write_agent(agent, 0)
    recorder.write_caller(random_ulaw(160, 2), 4000)  # the window slides to keep 2020..4020 ms: the rest is out
    recorder.flush()
    assert recorder.drop_agent_from(1520) == 500
    recorder.close()
    _, frames = read_wav(tmp_path / "call.wav")
    assert np.array_equal(frames[: 2000 * 8, 1], ulaw_to_pcm16(agent))


def test_dropping_agent_audio_from_a_negative_time_or_after_close_is_an_error(tmp_path: Path) -> None:
    recorder = StereoWavRecorder(tmp_path / "call.wav")
    with pytest.raises(ValueError, match="at_ms"):
        recorder.drop_agent_from(-20)
    recorder.close()
    with pytest.raises(RecorderClosedError):
        recorder.drop_agent_from(0)
