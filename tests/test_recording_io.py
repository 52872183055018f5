"""The recording worker: finished audio reaches the file during the call, so memory stays bounded."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

from engine.workers.recording_io import RecordingIO
from media.recording import StereoWavRecorder

SECOND_OF_TONE = bytes(range(0, 256, 2)) * 62 + bytes(64)  # 8000 μ-law bytes


async def test_a_long_call_is_written_out_as_it_goes_and_closed_into_a_valid_wav(tmp_path: Path) -> None:
    worker = RecordingIO(interval=0.05)
    runner = asyncio.create_task(worker.run())
    recorder = StereoWavRecorder(tmp_path / "call.wav", window_ms=1000, elapsed_ms=lambda: 3_600_000)
    worker.add(recorder)
    most_pending = 0
    try:
        for second in range(30):
            recorder.write_caller(SECOND_OF_TONE, second * 1000)
            recorder.write_agent(SECOND_OF_TONE, second * 1000 + 500)
            most_pending = max(most_pending, recorder.pending_bytes)
            await asyncio.sleep(0.06)
        size_during_call = (tmp_path / "call.wav").stat().st_size
        info = await worker.close(recorder)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        worker.shutdown()

    assert size_during_call > 25 * 8000 * 4  # most of the call was on disk before it ended
    assert most_pending <= 2 * 8000 * 4  # never more than a couple of seconds waiting in memory
    assert info.duration_ms == 30_500
    with wave.open(str(tmp_path / "call.wav")) as wav:
        assert (wav.getnchannels(), wav.getframerate()) == (2, 8000)
        assert wav.getnframes() == 30_500 * 8
