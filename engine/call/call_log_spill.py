"""The CallLog spill: what the database could not take yet, kept on local disk as one JSON-lines file per call.

Each engine run owns a folder under `{state_dir}/call-log-spill/`, locked while it runs; the files of a folder
whose lock nobody holds are left over from a run that stopped, for the next run on this host to replay. Lines are
appended in order and fsync'd; a line torn by a crash mid-write is the last one and is skipped when read.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from storage.records import new_id

__all__ = ["SPILL_DIRNAME", "CallLogSpill", "LeftoverRun", "SpillUnavailable", "read_spill_file"]

log = logging.getLogger(__name__)

SPILL_DIRNAME = "call-log-spill"
_LOCK_FILENAME = "lock"
_SUFFIX = ".jsonl"
_REJECTED_SUFFIX = ".rejected"
_RETRY_INITIAL = 0.5
_RETRY_MAX = 30.0

SpillRecord = Mapping[str, Any]
"""One line of a spill file: a JSON object whose meaning the CallLog writer defines."""


class SpillUnavailable(OSError):
    """The spill folder refused a write (disk full, read-only, gone); the lines stay queued and are retried."""


@dataclass(slots=True)
class _Queued:
    call_log_id: str
    lines: list[str]


@dataclass(frozen=True, slots=True)
class LeftoverRun:
    """The spill folder of an engine run that stopped, and the calls it left in it."""

    folder: Path
    files: list[Path] = field(default_factory=list)


def read_spill_file(path: Path) -> list[dict[str, Any]]:
    """The records of a spill file, in order; a torn last line (a crash mid-write) is skipped. Blocking."""
    records: list[dict[str, Any]] = []
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                record = json.loads(raw)
            except ValueError:
                log.warning("%s: line %d is not complete JSON (a write cut short); the rest is skipped", path, number)
                break
            if isinstance(record, dict):
                records.append(record)
    return records


class CallLogSpill:
    """This run's spill folder: bounded appends that never wait, written and fsync'd by a background task.

    `append` only queues; `durable` waits until everything queued so far is on disk. The bytes a run keeps
    (queued and written) are bounded by `max_bytes` for appends marked `bounded`; the small records that say
    who a call is and how it ended are never refused.
    """

    def __init__(self, state_dir: Path, *, max_bytes: int, run_id: str | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.root = Path(state_dir).expanduser() / SPILL_DIRNAME
        self.folder = self.root / (run_id or new_id())
        self._max_bytes = max_bytes
        self._bytes = 0
        self._queue: deque[_Queued] = deque()
        self._queued_seq = 0
        self._written_seq = 0
        self._written = asyncio.Condition()
        self._wake = asyncio.Event()
        self._failure: OSError | None = None
        self._released: set[str] = set()
        self._releasing: list[tuple[int, str]] = []  # (queue position, call) complete once written that far
        self._sizes: dict[str, int] = {}
        self._ready = asyncio.Event()
        self._lock_file: IO[str] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> asyncio.Event:
        """Set whenever a call's file is complete (its writer released it) and may be replayed."""
        return self._ready

    async def open(self) -> None:
        """Create and lock this run's folder, and start the background task that writes the queue."""
        self._lock_file = await asyncio.to_thread(self._create_locked_folder)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"call-log-spill-{self.folder.name}")

    async def close(self) -> None:
        """Write what is queued (if the disk takes it), stop, and unlock the folder for the next run."""
        if self._task is not None:
            with contextlib.suppress(SpillUnavailable):
                await self.durable()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._lock_file is not None:
            lock_file, self._lock_file = self._lock_file, None
            await asyncio.to_thread(self._unlock_and_tidy, lock_file)
        if self._queue:
            log.error(
                "%d spilled CallLog records could not be written to %s and are lost", len(self._queue), self.folder
            )

    def append(self, call_log_id: str, records: Sequence[SpillRecord], *, bounded: bool = True) -> bool:
        """Queue records for the call's file; never waits. False (nothing queued) if `bounded` and the spill is full."""
        lines = [json.dumps(record, separators=(",", ":")) + "\n" for record in records]
        size = sum(len(line) for line in lines)
        if bounded and self._bytes + size > self._max_bytes:
            return False
        self._bytes += size
        self._sizes[call_log_id] = self._sizes.get(call_log_id, 0) + size
        self._queue.append(_Queued(call_log_id, lines))
        self._queued_seq += 1
        self._wake.set()
        return True

    async def durable(self) -> None:
        """Return once everything queued before the call is on disk; SpillUnavailable if the disk refused it."""
        target = self._queued_seq
        async with self._written:
            self._wake.set()
            await self._written.wait_for(lambda: self._written_seq >= target or self._failure is not None)
            if self._written_seq < target and self._failure is not None:
                raise SpillUnavailable(f"{self.folder}: {self._failure}") from self._failure

    def release(self, call_log_id: str) -> None:
        """Mark the call's file complete (its writer adds nothing more): replayable once what is queued is on disk."""
        self._releasing.append((self._queued_seq, call_log_id))
        self._wake.set()

    def released_files(self) -> list[Path]:
        """The complete files of this run not yet replayed."""
        return [self.path_of(call_log_id) for call_log_id in sorted(self._released)]

    def path_of(self, call_log_id: str) -> Path:
        """Where this run keeps the call's records."""
        return self.folder / f"{call_log_id}{_SUFFIX}"

    async def discard(self, path: Path, *, rejected: bool = False) -> None:
        """Forget a replayed file (delete it), or set a file the database refused aside (`rejected`) for an operator."""
        call_log_id = path.name.removesuffix(_SUFFIX)
        self._released.discard(call_log_id)
        self._bytes -= self._sizes.pop(call_log_id, 0)
        await asyncio.to_thread(_discard, path, rejected)

    def leftover_runs(self) -> list[LeftoverRun]:
        """Folders of runs on this host that stopped (nobody holds their lock), with their call files. Blocking."""
        runs: list[LeftoverRun] = []
        if not self.root.is_dir():
            return runs
        for folder in sorted(self.root.iterdir()):
            if folder == self.folder or not folder.is_dir() or not _unlocked(folder / _LOCK_FILENAME):
                continue
            runs.append(LeftoverRun(folder, sorted(folder.glob(f"*{_SUFFIX}"))))
        return runs

    async def forget_run(self, run: LeftoverRun) -> None:
        """Remove a stopped run's folder once none of its files is left (rejected files keep it)."""
        await asyncio.to_thread(_remove_if_done, run.folder)

    def _create_locked_folder(self) -> IO[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock_file = (self.folder / _LOCK_FILENAME).open("a")
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return lock_file

    def _unlock_and_tidy(self, lock_file: IO[str]) -> None:
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        lock_file.close()
        _remove_if_done(self.folder)

    async def _run(self) -> None:
        delay = _RETRY_INITIAL
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = list(self._queue)
            if not batch:
                self._release_written()
                continue
            try:
                await asyncio.to_thread(_append_and_sync, self.folder, batch)
            except OSError as exc:
                # The lines stay queued, in order, and the next pass tries again.
                log.error("cannot write the CallLog spill in %s (%s); retrying in %.1f s", self.folder, exc, delay)
                async with self._written:
                    self._failure = exc
                    self._written.notify_all()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                self._wake.set()
                continue
            delay = _RETRY_INITIAL
            for _ in batch:
                self._queue.popleft()
            async with self._written:
                self._failure = None
                self._written_seq += len(batch)
                self._written.notify_all()
            self._release_written()

    def _release_written(self) -> None:
        still = [(seq, call) for seq, call in self._releasing if seq > self._written_seq]
        if len(still) < len(self._releasing):
            self._released.update(call for seq, call in self._releasing if seq <= self._written_seq)
            self._releasing = still
            self._ready.set()


def _append_and_sync(folder: Path, batch: Sequence[_Queued]) -> None:
    by_call: dict[str, list[str]] = {}
    for queued in batch:
        by_call.setdefault(queued.call_log_id, []).extend(queued.lines)
    for call_log_id, lines in by_call.items():
        with (folder / f"{call_log_id}{_SUFFIX}").open("a", encoding="utf-8") as file:
            file.writelines(lines)
            file.flush()
            os.fsync(file.fileno())
    # A new file's name must survive a power cut too, not only its content.
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def _unlocked(lock_path: Path) -> bool:
    try:
        with lock_path.open("a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            return True
    except OSError:
        return False


def _discard(path: Path, rejected: bool) -> None:
    if rejected:
        path.rename(path.with_name(path.name + _REJECTED_SUFFIX))
    else:
        path.unlink(missing_ok=True)


def _remove_if_done(folder: Path) -> None:
    if any(path.name != _LOCK_FILENAME for path in folder.iterdir()):
        return
    shutil.rmtree(folder, ignore_errors=True)
