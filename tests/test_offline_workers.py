"""Offline worker processes: they start with the engine, run jobs off its loop, and never outlive it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from pipelines.offline_workers import OfflineWorkers
from tests.test_realtime_session import until

REPO = str(Path(__file__).resolve().parent.parent)
# An engine stand-in: starts two workers, prints their process ids, then waits to be killed.
ENGINE = """
import asyncio, os
from pipelines.offline_workers import OfflineWorkers

async def main():
    async with OfflineWorkers(2) as workers:
        pids = {await workers.run(os.getpid) for _ in range(20)}
        print(" ".join(map(str, pids)), flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def marked_then_slept(marks: str, value: int) -> int:
    """A job: leaves a file named for its worker in `marks`, sleeps a little, and returns `value`."""
    Path(marks, str(os.getpid())).touch()
    time.sleep(1.0)
    return value


def busy_workers(marks: Path) -> list[int]:
    """The workers that have started a `marked_then_slept` job."""
    return [int(mark.name) for mark in marks.iterdir()]


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited, only not yet been reaped


async def test_jobs_run_in_other_processes() -> None:
    async with OfflineWorkers(2) as workers:
        assert await workers.run(os.getpid) != os.getpid()


async def test_the_workers_of_a_killed_engine_exit_and_release_its_output() -> None:
    engine = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ENGINE, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stdout=asyncio.subprocess.PIPE
    )
    assert engine.stdout is not None
    workers = [int(pid) for pid in (await engine.stdout.readline()).split()]
    engine.send_signal(signal.SIGKILL)
    # The engine's stdout closes only once every process holding it (the workers too) has gone.
    await asyncio.wait_for(engine.wait(), 60)
    assert workers and not any(running(pid) for pid in workers)


async def test_a_worker_killed_mid_job_loses_no_job_of_its_pool(tmp_path: Path) -> None:
    async with OfflineWorkers(2) as workers:
        jobs = [asyncio.ensure_future(workers.run(marked_then_slept, str(tmp_path), value)) for value in (1, 2)]
        await until(lambda: len(busy_workers(tmp_path)) == 2)  # one job running on each worker
        victim = busy_workers(tmp_path)[0]
        os.kill(victim, signal.SIGKILL)
        # The job on the killed worker and the one on the healthy worker (failed with the pool) both run again.
        assert await asyncio.gather(*jobs) == [1, 2]
        assert await workers.run(os.getpid) != victim


async def test_a_hung_worker_is_replaced_and_its_job_answered_by_the_new_one() -> None:
    async with OfflineWorkers(1, job_deadline_s=3.0) as workers:
        hung = await workers.run(os.getpid)
        os.kill(hung, signal.SIGSTOP)  # alive but answering nothing, as a deadlocked worker would be
        assert await workers.run(os.getpid) != hung
        await until(lambda: not running(hung))
