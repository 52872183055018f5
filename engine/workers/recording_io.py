"""Recording file I/O for every call of the process, on one worker thread, off the event loop.

Recorders only touch memory on the audio path; once a second this writes each live call's finished audio
to its file, all calls in one thread hop. Closing a recording goes through the same thread, so a flush and a
close of one file can never overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from media.recording import RecorderClosedError, RecordingInfo, StereoWavRecorder

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SECONDS = 1.0


class RecordingIO:
    """Flushes registered recorders periodically and closes them, on a single worker thread."""

    def __init__(self, *, interval: float = FLUSH_INTERVAL_SECONDS) -> None:
        """Create the worker; `run` must be running for periodic flushes."""
        self._interval = interval
        self._recorders: set[StereoWavRecorder] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dialtone-recordings")

    def add(self, recorder: StereoWavRecorder) -> None:
        """Flush this recorder's finished audio to disk from now on."""
        self._recorders.add(recorder)

    async def close(self, recorder: StereoWavRecorder) -> RecordingInfo:
        """Stop flushing the recorder, write the rest and finalise its file."""
        self._recorders.discard(recorder)
        return await asyncio.get_running_loop().run_in_executor(self._executor, recorder.close)

    async def run(self) -> None:
        """Flush every recorder with pending audio, once per interval, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._interval)
            due = [recorder for recorder in self._recorders if recorder.pending_bytes]
            if due:
                await loop.run_in_executor(self._executor, _flush_all, due)

    def shutdown(self) -> None:
        """Let queued writes finish, then stop the worker thread."""
        self._executor.shutdown(wait=True)


def _flush_all(recorders: list[StereoWavRecorder]) -> None:
    for recorder in recorders:
        try:
            recorder.flush()
        except RecorderClosedError:
            pass  # closed between the look and the flush: its close wrote everything
        except OSError as exc:  # a full disk must cost the recording, not the call
            log.error("could not write recording %s: %s", recorder.path, exc)


RECORDING_IO = web.AppKey("recording_io", RecordingIO)


async def recording_io_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the process's recording worker under RECORDING_IO."""
    worker = RecordingIO()
    app[RECORDING_IO] = worker
    task = asyncio.create_task(worker.run(), name="recording-io")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(worker.shutdown)
