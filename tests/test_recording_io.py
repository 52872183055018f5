"""The recording worker: finished audio reaches the file during the call, so memory stays bounded."""

from __future__ import annotations

import asyncio
import resource
import wave
from pathlib import Path

from config.settings import load_settings
from engine.simulator import Pause
from engine.workers.recording_io import RecordingIO
from media.recording import StereoWavRecorder
from storage.recordings import recording_path
from tests.databases import TestDatabases
from tests.test_calls_e2e import call, finished_call_log
from tests.test_drain_processes import engine, held_call, line

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


async def test_a_disk_refusing_writes_mid_call_costs_that_audio_and_the_rest_keeps_its_place(
    databases: TestDatabases, tmp_path: Path
) -> None:
    database_url = await databases.migrated()
    own_pool = await databases.pool(database_url)
    try:
        number = await line(own_pool)
        organization_id = await own_pool.fetchval(
            'SELECT "organizationId" FROM "PhoneNumber" WHERE "phoneNumber" = $1', number
        )
        async with engine(database_url, tmp_path, drain_seconds=20) as running:
            caller = asyncio.create_task(call(running.url, number, Pause(24_000)))
            call_log_id = await held_call(own_pool, number)
            path = recording_path(load_settings(state_dir=tmp_path / "state"), organization_id, call_log_id)
            for _ in range(600):  # until the first 5 s have reached the file
                if path.is_file() and path.stat().st_size >= 44 + 5 * 32_000:
                    break
                await asyncio.sleep(0.05)
            # The disk is full (the engine may write no file past a size a little beyond it) for a few seconds.
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.prlimit(running.process.pid, resource.RLIMIT_FSIZE, (path.stat().st_size + 50_000, hard))
            await asyncio.sleep(6)
            resource.prlimit(running.process.pid, resource.RLIMIT_FSIZE, (hard, hard))
            await caller
            ended = await finished_call_log(own_pool, call_log_id)
        assert "could not write recording" in running.log()
        assert ended["status"] == "COMPLETED", ended["metadata"]
        with wave.open(str(path)) as wav:
            frames = wav.getnframes()
        assert frames * 4 == path.stat().st_size - 44, "the header does not count the audio in the file"
        assert frames // 8 == ended["metadata"]["recordingMs"], "the recording is not as long as the call's timeline"
    finally:
        await own_pool.close()
