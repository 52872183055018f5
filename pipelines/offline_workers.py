"""Where CPU-heavy offline provider work runs: worker processes shared by every call of an engine, or inline."""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import ParamSpec, Protocol, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Imported once by the fork server, so each worker forks with them loaded instead of importing them itself.
_PRELOAD = ["numpy", "soxr", "pocketsphinx", "pipelines.stt.sphinx", "pipelines.tts.espeak"]

JOB_DEADLINE_S = 30.0
"""Longest a job may take, queue included: a decode or synthesis takes well under a second, so a job this late is
on a hung worker (stopped, deadlocked), whose pool is then replaced rather than leaving its calls without answer."""


class OfflineWorkError(Exception):
    """A worker process died while running a job; the message says what was lost."""


class OfflineWork(Protocol):
    """Runs a provider's CPU-heavy job (a picklable module-level function) and returns its result."""

    async def run(self, job: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """The result of `job(*args, **kwargs)`, or the exception it raised."""
        ...


class InlineWork:
    """Runs each job on the calling event loop, stalling it meanwhile: for tests and tools without an engine."""

    async def run(self, job: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """The result of `job(*args, **kwargs)`, computed here and now."""
        return job(*args, **kwargs)


INLINE = InlineWork()
"""The inline runner: where providers built outside an engine (unit tests, tools) do their offline work."""


class OfflineWorkers:
    """A pool of `size` worker processes with the offline models loaded; an async context manager.

    Jobs queue first come, first served; a recognizer keeps at most one decode of its call in flight, so no call
    can take every worker while others wait. A worker that dies takes the pool with it: the pool is replaced and
    the jobs it lost run again there (see `run`); so does a worker that hangs, once a job is `job_deadline_s` late.
    """

    def __init__(self, size: int, *, job_deadline_s: float = JOB_DEADLINE_S) -> None:
        """Prepare a pool of `size` workers; `start` (or entering the context) starts them."""
        if size < 1:
            raise ValueError(f"size: {size} workers cannot run anything; use 1 or more")
        self.size = size
        self.job_deadline_s = job_deadline_s
        self._executor: ProcessPoolExecutor | None = None

    async def __aenter__(self) -> OfflineWorkers:
        """Start the workers."""
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Stop the workers."""
        await self.close()

    async def start(self) -> None:
        """Start every worker now and wait until each has loaded the models, so no call waits for a start."""
        if self._executor is None:
            self._executor = self._new_executor()
        loop = asyncio.get_running_loop()
        # One job per worker submitted at once: the executor starts a new worker for each job it has no idle one for.
        await asyncio.gather(*(loop.run_in_executor(self._executor, os.getpid) for _ in range(self.size)))
        log.info("%d offline worker process(es) started", self.size)

    async def run(self, job: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """The result of `job(*args, **kwargs)` computed in a worker process (started on demand if need be).

        One worker dying fails every job of its pool, those of other calls on healthy workers too: a job lost that
        way runs once more on the new pool (the jobs are pure decodes and syntheses, so a rerun changes nothing).
        Lost twice, as a job that kills or hangs its worker itself would be, it fails with OfflineWorkError.
        """
        work = functools.partial(job, *args, **kwargs)
        try:
            return await self._run_once(work)
        except BrokenProcessPool:
            log.warning("offline job %s was lost with a worker process; running it again", job.__qualname__)
        try:
            return await self._run_once(work)
        except BrokenProcessPool as exc:
            raise OfflineWorkError(f"offline worker process died running {job.__qualname__} ({exc})") from exc

    async def _run_once(self, work: Callable[[], R]) -> R:
        """`work()` on the current pool; BrokenProcessPool, with the pool replaced, if a worker of it died or
        the job is past its deadline."""
        if self._executor is None:
            self._executor = self._new_executor()
        executor = self._executor
        try:
            async with asyncio.timeout(self.job_deadline_s):
                return await asyncio.get_running_loop().run_in_executor(executor, work)
        except BrokenProcessPool:
            self._replace(executor, "an offline worker process died")
            raise
        except TimeoutError:
            self._replace(executor, f"an offline job got no answer in {self.job_deadline_s:g} s")
            raise BrokenProcessPool(f"no answer in {self.job_deadline_s:g} s: a worker process hung") from None

    def _replace(self, executor: ProcessPoolExecutor, why: str) -> None:
        """Start a new pool instead of `executor`, unless another job already has; its workers are killed, so
        that a hung one frees its memory and the jobs still on it fail over to the new pool."""
        if self._executor is not executor:
            return
        log.error("%s; starting a new pool of %d", why, self.size)
        self._executor = self._new_executor()
        for process in list((executor._processes or {}).values()):  # no public way to stop a pool's workers
            process.kill()
        executor.shutdown(wait=False, cancel_futures=True)

    async def close(self) -> None:
        """Cancel queued jobs, let running ones finish and stop the workers; idempotent."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    def _new_executor(self) -> ProcessPoolExecutor:
        # A fork server, not fork: the engine has threads (database, executors) that a forked child would inherit
        # mid-operation. Not spawn either: each worker would import numpy and the models afresh.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        return ProcessPoolExecutor(
            max_workers=self.size, mp_context=context, initializer=_initialize_worker, initargs=(os.getpid(),)
        )


def _initialize_worker(engine_pid: int) -> None:
    # Runs in each new worker: load the models now rather than in the first call's first turn.
    from pipelines.stt import sphinx
    from pipelines.tts import espeak

    threading.Thread(target=_exit_with, args=(engine_pid,), name="engine-watch", daemon=True).start()
    for load in (sphinx.load_process_decoder, espeak.load_process_engine):
        try:
            load()
        except Exception as exc:  # the jobs that need this model raise it again, to their provider
            log.warning("offline worker %d: %s", os.getpid(), exc)


def _exit_with(engine_pid: int) -> None:
    # A worker whose engine is killed (SIGKILL, the OOM killer) would wait for work forever, keeping the fork
    # server alive and the engine's stdout and stderr open: it ends as soon as the engine is gone.
    try:
        select.select([os.pidfd_open(engine_pid)], [], [])  # readable once the process has exited
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+): look once a second
        while _running(engine_pid):
            time.sleep(1.0)
    os._exit(0)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True
