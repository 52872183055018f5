"""Replaying the CallLog spill: the turns and ends of calls the database could not take are written once it can.

At start, the files a stopped run of this host left behind are written before crash recovery looks at the calls,
so a call that ended while the database was away ends as it did rather than as engine_lost. Then, for as long as
the engine runs, the files of this run's calls are written as they complete, retrying while the database is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from engine.call.call_log_spill import CallLogSpill, read_spill_file
from engine.call.call_log_writer import CallLogWriter
from engine.server.appkeys import DATABASE, SETTINGS
from storage import Pool
from storage.errors import DATABASE_ERRORS, TRANSIENT_ERRORS, NotFound, SchemaNotMigrated

log = logging.getLogger(__name__)

_RETRY_LATER: tuple[type[BaseException], ...] = (SchemaNotMigrated, *TRANSIENT_ERRORS)
"""The database cannot take the records now: the file stays and is tried again."""

CALL_LOG_SPILL = web.AppKey("call_log_spill", CallLogSpill)
"""This run's CallLog spill, which the call log writers fall back on while the database is away."""


class SpillReplayer:
    """Writes this host's spilled CallLogs to the database: a stopped run's at start, then this run's as they end."""

    def __init__(
        self,
        pool: Pool,
        spill: CallLogSpill,
        *,
        attempt_timeout: float = 10.0,
        retry_initial: float = 1.0,
        retry_max: float = 30.0,
    ) -> None:
        self._pool = pool
        self._spill = spill
        self._attempt_timeout = attempt_timeout
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._leftovers: list[Path] = []  # files of stopped runs the database did not take at start
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Write what stopped runs left, then keep writing this run's complete files in the background."""
        await self.replay_leftovers()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="call-log-spill-replay")

    async def stop(self) -> None:
        """Stop writing; files not written yet stay on disk for the next run."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def replay_leftovers(self) -> int:
        """Write what stopped runs of this host left in the spill; how many calls were written."""
        written = 0
        for run in await asyncio.to_thread(self._spill.leftover_runs):
            for path in run.files:
                if await self._replay(path):
                    written += 1
                else:
                    self._leftovers.append(path)
            await self._spill.forget_run(run)
        if written:
            log.warning("wrote %d CallLogs that a stopped engine run had kept in its spill", written)
        return written

    async def run(self) -> None:
        """Write complete spill files as they come, backing off while the database is away; until cancelled."""
        delay = self._retry_initial
        while True:
            self._spill.ready.clear()
            waiting = [*self._leftovers, *self._spill.released_files()]
            stuck = None
            for path in waiting:
                try:
                    written = await self._replay(path)
                except Exception:  # one bad file or a full disk must not stop the others being written
                    log.exception("%s: replaying the kept CallLog records failed; trying again later", path)
                    written = False
                if not written:
                    stuck = path  # most likely the database is away: the rest would wait the same
                    break
                if path in self._leftovers:
                    self._leftovers.remove(path)
            if stuck is None:
                delay = self._retry_initial
                await self._spill.ready.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._spill.ready.wait(), delay)
            delay = min(delay * 2, self._retry_max)

    async def _replay(self, path: Path) -> bool:
        """Write one spill file and forget it; False if the database did not take it (try again later)."""
        try:
            records = await asyncio.to_thread(read_spill_file, path)
        except FileNotFoundError:
            return True  # written already
        try:
            writer, outcome = CallLogWriter.resume(
                self._pool, records, finish_timeout=self._attempt_timeout, attempt_timeout=self._attempt_timeout
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.error("%s is not a CallLog spill file this engine can read (%s); set aside", path, exc)
            await self._spill.discard(path, rejected=True)
            return True
        try:
            if outcome is None:
                # Its run stopped mid-call: the turns are written and crash recovery closes the call.
                await writer.write_held()
            else:
                await writer.finish(outcome)
        except _RETRY_LATER:
            return False
        except NotFound:
            log.warning("%s: its call no longer exists; the kept records are dropped", path)
        except DATABASE_ERRORS:
            log.exception("%s: the database refused the kept records; the file is set aside", path)
            await self._spill.discard(path, rejected=True)
            return True
        await self._spill.discard(path)
        return True


async def call_log_spill_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: this run's spill under CALL_LOG_SPILL, stopped runs' spills written at once, this run's
    written in the background as its calls end. Runs before crash recovery, which would close those calls."""
    settings = app[SETTINGS]
    spill = CallLogSpill(settings.state_dir, max_bytes=settings.call_log_spill_max_bytes)
    await spill.open()
    app[CALL_LOG_SPILL] = spill
    replayer = SpillReplayer(app[DATABASE].call_log_pool, spill)
    try:
        await replayer.start()
        yield
    finally:
        await replayer.stop()
        await spill.close()
