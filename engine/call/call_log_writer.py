"""The per-call CallLog writer: turns and metadata reach PostgreSQL from a background task, off the audio path.

The call's session hands over finished turns with a synchronous, O(1) `record_turn`; a background task writes
them in batches, retrying with exponential backoff while the database is slow or away. `finish` flushes what is
left and ends the call in one transaction: final status, duration, recording, metadata, the agent's counters and
the charge of its started minutes against its credit reservation. Every write is idempotent, so a retry after a
lost acknowledgement changes nothing.
When the database stays away longer than memory or the finish's patience allow, the call's records go to the
engine's spill on local disk instead, in order, and the engine writes them when the database returns.
Webhook events ride on the same transactions: transcript.updated with each new turn (only when something
subscribes), call.ended with the ending (call.started went out when the call's stream was taken, before the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from engine.call.call_log_spill import CallLogSpill
from engine.call.call_log_store import CallLogStore
from engine.call.call_outcome import CallOutcome, latency_summary
from engine.call.spilled_call import CallLogDeferred, SpilledCall, SpilledCallFile
from engine.server import metrics
from pipelines.loop_waits import Wakeup
from storage import Pool
from storage.call_logs import CallLog
from storage.call_turns import TurnRecord
from storage.enums import CallStatus
from storage.errors import DATABASE_ERRORS, TRANSIENT_ERRORS, DatabaseUnavailable, NotFound

__all__ = [
    "CallLogDeferred",
    "CallLogWriter",
    "CallLogWriterClosed",
    "CallOutcome",
    "TurnRecord",
    "latency_summary",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_BATCH_SIZE = 100
_SPEAKERS = frozenset({"caller", "agent"})


class CallLogWriterClosed(RuntimeError):
    """Something was recorded after `finish` began: the call's log is already being closed."""


class _Stopped(Exception):
    """The background task was asked to stop while waiting to retry."""


class CallLogWriter:
    """Writes one call's turns, metadata and ending to its CallLog, in the background and without losing any."""

    def __init__(
        self,
        pool: Pool,
        *,
        organization_id: str,
        call_log_id: str,
        agent_id: str | None,
        node_id: str,
        spill: CallLogSpill | None = None,
        max_pending: int = 500,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        finish_timeout: float = 60.0,
        attempt_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self._store = CallLogStore(pool, organization_id=organization_id, call_log_id=call_log_id, agent_id=agent_id)
        self._call_log_id = call_log_id
        self._max_pending = max_pending
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._finish_timeout = finish_timeout
        self._attempt_timeout = attempt_timeout
        self._clock = clock
        self._spill = (
            SpilledCallFile(
                spill, organization_id=organization_id, call_log_id=call_log_id, agent_id=agent_id, node_id=node_id
            )
            if spill is not None
            else None
        )
        self._spilling = False  # this call's records go to the spill from now on, after those it already holds
        self._pending: deque[TurnRecord] = deque()
        # Metadata not yet written (the node that runs the call tagged it when its stream started: claim_stream).
        self._metadata: dict[str, Any] = {}
        self._agent_latencies: list[int] = []
        self._lost_turns = 0
        self._inbound_gaps = {"count": 0, "totalMs": 0, "longestMs": 0}
        self._wake = Wakeup()
        self._stop = asyncio.Event()
        self._finish_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._result: CallLog | None = None
        self._deleted = False
        self._on_deleted: list[Callable[[], None]] = []

    @classmethod
    def resume(
        cls,
        pool: Pool,
        records: Sequence[Mapping[str, Any]],
        *,
        finish_timeout: float,
        attempt_timeout: float = 10.0,
    ) -> tuple[CallLogWriter, CallOutcome | None]:
        """A writer holding what a spill file kept of a call, and how the call ended (None if the file says not).

        Without a spill of its own, its `finish` raises DatabaseUnavailable if the database is still away.
        """
        spilled = SpilledCall.read(records)
        writer = cls(
            pool,
            organization_id=spilled.organization_id,
            call_log_id=spilled.call_log_id,
            agent_id=spilled.agent_id,
            node_id=spilled.node_id,
            finish_timeout=finish_timeout,
            attempt_timeout=attempt_timeout,
        )
        writer._pending.extend(spilled.turns)
        writer._metadata = spilled.metadata
        writer._agent_latencies = spilled.agent_latencies_ms
        writer._lost_turns = spilled.lost_turns
        return writer, spilled.outcome

    @property
    def pending_turns(self) -> int:
        """Turns recorded but not yet written."""
        return len(self._pending)

    @property
    def lost_turns(self) -> int:
        """Turns that could not be kept (buffer full, or refused by the database); also in metadata.lostTurns."""
        return self._lost_turns

    def when_deleted(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, when a write finds the CallLog deleted (the platform's dashboard deletes rows in SQL,
        alone or with their organization): nothing of the call can be written any more."""
        self._on_deleted.append(callback)

    def start(self) -> None:
        """Start the background task that writes what is recorded; call once, on the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"the writer of CallLog {self._call_log_id} is already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"call-log-writer-{self._call_log_id}")
        self._wake.set()

    def record_turn(self, turn: TurnRecord) -> None:
        """Queue a finished turn for writing; never waits. A full buffer drops the turn and counts it as lost."""
        self._check_open()
        _validate(turn)
        if turn.speaker == "agent" and turn.latency_ms is not None:
            self._agent_latencies.append(turn.latency_ms)
        if not self._spilling and len(self._pending) >= self._max_pending and self._spill is not None:
            self._divert_to_spill()
        if self._spilling:
            self._spill_turns([turn])
        elif len(self._pending) >= self._max_pending:
            self._lose(1, f"{self._max_pending} turns are waiting for the database, the most the writer keeps")
        else:
            self._pending.append(turn)
        self._wake.set()

    def record_metadata(self, **items: Any) -> None:
        """Merge items into CallLog.metadata with the next write; never waits."""
        self._check_open()
        if self._spill is not None and self._spilling:
            self._spill.add_metadata(items)
        else:
            self._metadata.update(items)
        self._wake.set()

    def note_media_gap(self, missing_ms: int) -> None:
        """Count caller audio Twilio dropped (a stream's MediaGap) in metadata.inboundGaps and the engine's metrics.

        `{count, totalMs, longestMs}` rides with the next write, at the latest the final one; a gap is not worth a
        write of its own. Never waits, and never raises: a gap reported while the call is being finished is only
        counted in the metrics.
        """
        metrics.observe_media_gap(missing_ms)
        if self._closing:
            return
        gaps = self._inbound_gaps
        gaps["count"] += 1
        gaps["totalMs"] += missing_ms
        gaps["longestMs"] = max(gaps["longestMs"], missing_ms)
        self._metadata["inboundGaps"] = dict(gaps)

    async def finish(self, outcome: CallOutcome) -> CallLog:
        """Write every pending turn, then end the call in one transaction; return the final CallLog.

        Finishing again returns the same log and charges nothing more. If the database stays away for
        `finish_timeout` seconds (or the call's records already went to the spill), the rest of the call and its
        end are kept in the spill and CallLogDeferred is raised: the engine writes them when the database returns.
        Without a spill, DatabaseUnavailable is raised and crash recovery will close the call as FAILED.
        """
        if outcome.status is CallStatus.IN_PROGRESS:
            raise ValueError("a call cannot finish IN_PROGRESS; end it COMPLETED, FAILED or MISSED")
        if outcome.duration_s < 0:
            raise ValueError(f"a call cannot last {outcome.duration_s} s")
        async with self._finish_lock:
            if self._result is not None:
                return self._result
            self._closing = True
            await self._stop_background()
            if not self._spilling:
                deadline = self._clock() + self._finish_timeout
                try:
                    await self._flush(deadline)
                    self._result = await self._with_retries(
                        functools.partial(self._finalize, outcome), deadline=deadline
                    )
                    return self._result
                except DatabaseUnavailable:
                    if self._spill is None:
                        log.error(
                            "CallLog %s could not be finished: %d turns are unwritten and the call stays "
                            "IN_PROGRESS until crash recovery closes it as FAILED",
                            self._call_log_id,
                            len(self._pending),
                        )
                        raise
                    self._divert_to_spill()
            await self._end_in_spill(outcome)

    async def write_held(self) -> None:
        """Write the turns and metadata this writer holds, within `finish_timeout`; DatabaseUnavailable if not."""
        await self._flush(self._clock() + self._finish_timeout)

    def _divert_to_spill(self) -> None:
        """Send this call's records to the spill from now on, starting with those still waiting in memory."""
        assert self._spill is not None
        self._spilling = True
        self._stop.set()  # the background task stops writing; a write in flight may still land, harmlessly
        self._wake.set()
        self._spill.begin(self._metadata)
        self._spill_turns(list(self._pending))
        log.warning(
            "CallLog %s: the database is away with %d turns waiting; this call's records go to %s until it returns",
            self._call_log_id,
            len(self._pending),
            self._spill.path,
        )
        self._pending.clear()
        self._metadata.clear()

    def _spill_turns(self, turns: list[TurnRecord]) -> None:
        assert self._spill is not None
        if not self._spill.add_turns(turns):
            self._lose(len(turns), "the spill on local disk is full")

    def _lose(self, count: int, why: str) -> None:
        self._lost_turns += count
        self._metadata["lostTurns"] = self._lost_turns
        if self._lost_turns == count:
            log.error(
                "CallLog %s: %s; further turns are dropped and counted in metadata.lostTurns until there is room",
                self._call_log_id,
                why,
            )

    async def _end_in_spill(self, outcome: CallOutcome) -> NoReturn:
        """Add the call's end to its spill file, mark the file complete, and raise CallLogDeferred."""
        assert self._spill is not None
        deferred = await self._spill.end(outcome, agent_latencies_ms=self._agent_latencies, lost_turns=self._lost_turns)
        log.warning("%s", deferred)
        raise deferred

    def _check_open(self) -> None:
        if self._closing:
            raise CallLogWriterClosed(f"CallLog {self._call_log_id} is being finished; nothing more can be recorded")

    async def _stop_background(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                await self._flush(deadline=None)
            except _Stopped:
                return
            except Exception:  # a bug must not kill the call; finish retries what is left
                log.exception("CallLog %s: the background writer failed", self._call_log_id)

    async def _flush(self, deadline: float | None) -> None:
        """Write pending turns and metadata in batches until none are left."""
        if self._deleted:
            self._drop_unwritable()
            return
        while self._pending or self._metadata:
            if deadline is None and self._stop.is_set():
                raise _Stopped
            batch = list(itertools.islice(self._pending, _BATCH_SIZE))
            metadata = dict(self._metadata)
            try:
                await self._with_retries(functools.partial(self._store.write, batch, metadata), deadline=deadline)
            except DatabaseUnavailable:
                raise
            except NotFound:
                self._call_log_deleted()
                return
            except DATABASE_ERRORS:
                # Refused, not failed: retrying the same batch would block every later turn and the call's end.
                log.exception("CallLog %s: the database refused %d turns; dropped", self._call_log_id, len(batch))
                self._lost_turns += len(batch)
                self._metadata["lostTurns"] = self._lost_turns
            if self._spilling:
                return  # what this batch came from went to the spill meanwhile: nothing here is left to pop
            for _ in batch:
                self._pending.popleft()
            for key, value in metadata.items():
                # A value replaced while the write was in flight is still to be written.
                if key in self._metadata and self._metadata[key] is value:
                    del self._metadata[key]

    def _call_log_deleted(self) -> None:
        log.warning(
            "CallLog %s was deleted while its call ran; its %d unwritten turns, and any to come, are dropped",
            self._call_log_id,
            len(self._pending),
        )
        self._deleted = True
        self._drop_unwritable()
        for callback in self._on_deleted:
            callback()

    def _drop_unwritable(self) -> None:
        self._lost_turns += len(self._pending)
        self._pending.clear()
        self._metadata.clear()

    async def _finalize(self, outcome: CallOutcome) -> CallLog:
        ended, ended_now = await self._store.end(
            outcome, self._metadata, agent_latencies_ms=self._agent_latencies, lost_turns=self._lost_turns
        )
        if ended_now:
            self._metadata.clear()
        return ended

    async def _with_retries(self, operation: Callable[[], Awaitable[T]], *, deadline: float | None) -> T:
        """Run `operation` until it succeeds, backing off after transient errors.

        With a deadline, raise DatabaseUnavailable once the next attempt would start after it; without one, retry
        until the writer is stopped (then raise _Stopped).
        """
        delay = self._retry_initial
        failures = 0
        while True:
            timeout = self._attempt_timeout
            if deadline is not None:
                timeout = max(min(timeout, deadline - self._clock()), 0.001)
            try:
                async with asyncio.timeout(timeout):
                    result = await operation()
            except TRANSIENT_ERRORS as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "CallLog %s: database write failed (%s: %s); retrying in the background",
                        self._call_log_id,
                        type(exc).__name__,
                        exc,
                    )
                if deadline is not None and self._clock() + delay > deadline:
                    raise DatabaseUnavailable(
                        f"CallLog {self._call_log_id}: the database did not accept writes for "
                        f"{self._finish_timeout:g} s ({type(exc).__name__}: {exc})"
                    ) from exc
                await self._pause(delay, interruptible=deadline is None)
                delay = min(delay * 2, self._retry_max)
            else:
                if failures:
                    log.info("CallLog %s: database writes resumed after %d failures", self._call_log_id, failures)
                return result

    async def _pause(self, delay: float, *, interruptible: bool) -> None:
        if not interruptible:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)
        if self._stop.is_set():
            raise _Stopped


def _validate(turn: TurnRecord) -> None:
    # Checked here, where the mistake is made, rather than found later by a CHECK constraint in a batch.
    if turn.speaker not in _SPEAKERS:
        raise ValueError(f"turn {turn.index}: speaker must be 'caller' or 'agent', not {turn.speaker!r}")
    if turn.index < 0:
        raise ValueError(f"turn index must be 0 or more, got {turn.index}")
    if not 0 <= turn.start_ms <= turn.end_ms:
        raise ValueError(
            f"turn {turn.index}: offsets must satisfy 0 <= start_ms <= end_ms, got {turn.start_ms}..{turn.end_ms}"
        )
    if turn.latency_ms is not None and turn.latency_ms < 0:
        raise ValueError(f"turn {turn.index}: latency_ms cannot be negative, got {turn.latency_ms}")
