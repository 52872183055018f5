"""Crash recovery: this process's heartbeat as an engine node, and closing calls that dead nodes left open.

Every engine process registers as an EngineNode with a fresh id and heartbeats while it runs. At start and then
every minute, it closes as FAILED the IN_PROGRESS calls of nodes that stopped heartbeating (a crash, a lost host)
and of calls whose media stream never started, so nothing stays IN_PROGRESS forever; a lost call whose transfer
Twilio had made (its leg settled from the dial, or Twilio's record of the dial, asked when its leg is still open)
ends COMPLETED `transferred` instead. Twilio out of reach (or no Twilio account) delays nothing: such a call is then
closed on its leg's evidence alone. Each pass also settles the credit reservations that calls ended outside the
engine left held (credit_reservations.settle_stranded_reservations). Recovery runs beside the heartbeat, never in its
way: Twilio is asked a few calls at a time, for a bounded time in all (a lookup still unanswered then is given up, as
if Twilio could not be asked), and a slow Twilio never keeps this node from heartbeating. A node of this host whose
process is gone is not waited for: its calls are closed at once. A node that was taken for dead but runs again ends
the calls it finds closed, and one cut off from the database ends its calls itself shortly before its heartbeat lease
lapses (`lease_lapses_at`), so that they are never taken for lost while they run (engine.workers.lost_calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta

from aiohttp import web

from engine.call.credit_meter import CREDIT_MINUTE_SECONDS, UNPAID_MINUTES
from engine.server.appkeys import DATABASE, SETTINGS, TWILIO
from engine.twilio.rest import REQUEST_TIMEOUT_SECONDS, CallLookupFailed, TwilioCalls
from engine.workers.host_processes import process_is_gone
from storage import Pool, credit_reservations, engine_nodes
from storage.engine_nodes import OrphanedTransfer
from storage.errors import DATABASE_ERRORS, TRANSIENT_ERRORS, SchemaNotMigrated
from storage.records import new_id

log = logging.getLogger(__name__)

NODE_ID = web.AppKey("node_id", str)
"""This process's EngineNode id, which its call log writers tag calls with."""

NODE_TIMEOUT_KEY = web.AppKey("node_timeout", timedelta)
"""How long a node may stay silent before its calls count as orphaned (DIALTONE_NODE_TIMEOUT)."""

HEARTBEAT_INTERVAL = timedelta(seconds=10)
RECOVERY_INTERVAL = timedelta(minutes=1)
NODE_TIMEOUT = timedelta(seconds=60)
STREAM_TIMEOUT = timedelta(minutes=10)
FORGET_NODES_AFTER = timedelta(days=1)
STRANDED_RESERVATION_IDLE = timedelta(seconds=CREDIT_MINUTE_SECONDS * (UNPAID_MINUTES + 2))
"""How long the reservation of a call ended outside the engine must have gone unextended before recovery settles
it: a running call's meter extends it every minute, and ends the call after `UNPAID_MINUTES` failed extensions in a
row, within the next minute."""
TRANSFER_LOOKUPS_AT_ONCE = 4
"""How many lost calls' transfers recovery asks Twilio about at once."""
TRANSFER_LOOKUP_BUDGET = timedelta(seconds=2 * REQUEST_TIMEOUT_SECONDS)
"""How long a recovery pass waits for Twilio's records of the lost calls' transfers in all; a call whose record is not
in by then ends as if Twilio could not be asked (`engine_lost`)."""
# Neither is a setting: only the calls a node lost between asking Twilio for their transfer and Twilio's `stop` are
# looked up, a handful a crash; four at a time answer dozens within the budget without holding much of the account's
# REST concurrency, and the budget only bounds how long Twilio's silence delays the others' closing.


def _utc_now() -> datetime:
    return datetime.now(UTC)


class NodeHeartbeat:
    """This process as an engine node: registered at start, heartbeating, recovering orphaned calls, then gone."""

    def __init__(
        self,
        pool: Pool,
        *,
        node_id: str | None = None,
        heartbeat_interval: timedelta = HEARTBEAT_INTERVAL,
        recovery_interval: timedelta = RECOVERY_INTERVAL,
        node_timeout: timedelta = NODE_TIMEOUT,
        stream_timeout: timedelta = STREAM_TIMEOUT,
        clock: Callable[[], datetime] | None = None,
        twilio: TwilioCalls | None = None,
        transfer_lookup_budget: timedelta = TRANSFER_LOOKUP_BUDGET,
    ) -> None:
        """`twilio` is asked whether the lost calls with an open transfer leg were transferred, for at most
        `transfer_lookup_budget` a recovery pass (without it, or past it, they are closed as `engine_lost`)."""
        if heartbeat_interval >= node_timeout:
            raise ValueError("the heartbeat interval must be shorter than the node timeout, or live nodes look dead")
        self.node_id = node_id or new_id()
        self._hostname = socket.gethostname()
        self._pool = pool
        self.heartbeat_interval = heartbeat_interval
        self._recovery_interval = recovery_interval
        self.node_timeout = node_timeout
        self._stream_timeout = stream_timeout
        self._twilio = twilio
        self._transfer_lookup_budget = transfer_lookup_budget
        self._clock = clock or _utc_now
        self._stamp_clock = clock
        """Heartbeats are stamped and judged by the database's clock (None) unless a clock is given (tests)."""
        self._task: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[int] | None = None
        """The recovery pass under way beside the heartbeat, if any: one at a time."""
        self._after_beat: list[Callable[[], Awaitable[object]]] = []
        self._last_taken_sent_at: float | None = None
        """When (on the loop's clock) the last heartbeat the database took was sent: the database stamped it later."""

    def after_each_beat(self, check: Callable[[], Awaitable[object]]) -> None:
        """Run `check` after each heartbeat the database took (its transient database errors are retried with the
        next beat)."""
        self._after_beat.append(check)

    @property
    def lease_lapses_at(self) -> float:
        """When (on the loop's clock) the other nodes may take this one for dead at the earliest, its heartbeats not
        taken since: a node timeout after the last one the database took was sent (it was stamped later, by the
        database's clock). Only a started node has one."""
        if self._last_taken_sent_at is None:
            raise RuntimeError(f"engine node {self.node_id} is not registered yet")
        return self._last_taken_sent_at + self.node_timeout.total_seconds()

    async def start(self) -> None:
        """Register this node, start heartbeating in the background, and close what dead nodes left open (the node
        heartbeats meanwhile, however long Twilio takes to say which lost calls it transferred)."""
        await self._register()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"engine-node-{self.node_id}")
        log.info("engine node %s registered", self.node_id)
        self._recovery = self._recovery_task(self.recover())
        try:
            await self._recovery
        except BaseException:
            await self._stop_tasks()
            raise

    async def recover(self) -> int:
        """Close the calls no live node runs; how many were closed."""
        await self._forget_gone_neighbours()
        now = self._stamp()
        looked_up, dialed = await self._transfers_twilio_dialed(now)
        closed = await engine_nodes.close_orphaned_calls(
            self._pool,
            now=now,
            node_timeout=self.node_timeout,
            stream_timeout=self._stream_timeout,
            dialed=dialed,
            looked_up=looked_up,
        )
        if closed:
            log.warning("closed %d calls left IN_PROGRESS by engine processes that stopped", closed)
        stranded = await credit_reservations.settle_stranded_reservations(
            self._pool, idle_for=STRANDED_RESERVATION_IDLE, now=now
        )
        if stranded:
            log.warning("settled the credit reservations of %d calls ended outside the engine", stranded)
        await engine_nodes.forget_dead_nodes(self._pool, now=now, older_than=FORGET_NODES_AFTER)
        return closed

    async def _transfers_twilio_dialed(self, now: datetime | None) -> tuple[list[str], list[str]]:
        """The lost calls whose transfer leg is open, and of those the ones Twilio's record shows a dial of (the caller
        was handed over). The others end `engine_lost`, unproven: no Twilio account, Twilio could not be asked, or
        it did not answer within the lookup budget."""
        orphaned = await engine_nodes.orphaned_transfers(
            self._pool, now=now, node_timeout=self.node_timeout, stream_timeout=self._stream_timeout
        )
        looked_up = [transfer.call_log_id for transfer in orphaned]
        if self._twilio is None:
            for transfer in orphaned:
                log.warning(
                    "lost call %s had asked for a transfer; with no Twilio account to ask whether it was made, it is "
                    "closed as engine_lost",
                    transfer.call_sid,
                )
            return looked_up, []
        return looked_up, await self._dials_twilio_shows(self._twilio, orphaned)

    async def _dials_twilio_shows(self, twilio: TwilioCalls, orphaned: list[OrphanedTransfer]) -> list[str]:
        """Of the `orphaned` calls, those Twilio's record shows a dial of: asked TRANSFER_LOOKUPS_AT_ONCE at a time,
        for the lookup budget in all. Once Twilio cannot be asked, the rest are not asked about; a lookup still
        unanswered when the budget is spent is given up. Either way, those calls' transfers are unknown."""
        slots = asyncio.Semaphore(TRANSFER_LOOKUPS_AT_ONCE)

        async def dialed(transfer: OrphanedTransfer) -> bool:
            async with slots:
                return bool(await twilio.dialed_calls(transfer.call_sid))

        loop = asyncio.get_running_loop()
        lookups = {loop.create_task(dialed(transfer)): transfer for transfer in orphaned}
        if not lookups:
            return []
        try:
            done, _ = await asyncio.wait(
                lookups, timeout=self._transfer_lookup_budget.total_seconds(), return_when=asyncio.FIRST_EXCEPTION
            )
        finally:
            for lookup in lookups:
                lookup.cancel()
            await asyncio.gather(*lookups, return_exceptions=True)
        failures = [exc for lookup in done if (exc := lookup.exception()) is not None]
        for exc in failures:
            if not isinstance(exc, CallLookupFailed):
                raise exc
        answered = [lookup for lookup in done if lookup.exception() is None]
        if unknown := len(orphaned) - len(answered):
            why = failures[0] if failures else f"Twilio did not answer within {self._transfer_lookup_budget}"
            log.warning(
                "whether Twilio made the transfers of %d lost calls is unknown (%s); they are closed as engine_lost",
                unknown,
                why,
            )
        return [lookups[lookup].call_log_id for lookup in answered if lookup.result()]

    async def _forget_gone_neighbours(self) -> None:
        """Deregister the nodes of this host whose process is gone, so their calls count as orphaned right away."""
        for node in await engine_nodes.list_nodes_on_host(self._pool, hostname=self._hostname):
            if node.id != self.node_id and process_is_gone(node.pid, registered_at=node.started_at):
                log.warning("engine node %s (pid %d on this host) is gone; its calls are closed now", node.id, node.pid)
                await engine_nodes.deregister_node(self._pool, node_id=node.id)

    async def _register(self) -> None:
        sent_at = asyncio.get_running_loop().time()
        await engine_nodes.register_node(
            self._pool, node_id=self.node_id, hostname=self._hostname, pid=os.getpid(), now=self._stamp()
        )
        self._last_taken_sent_at = sent_at

    def _stamp(self) -> datetime | None:
        """The instant to stamp a heartbeat with, or judge others' by: None for the database's clock."""
        return self._stamp_clock() if self._stamp_clock is not None else None

    async def stop(self) -> None:
        """Stop heartbeating (and any recovery under way) and deregister; calls this node still holds are closed by
        the next node's recovery."""
        await self._stop_tasks()
        try:
            await engine_nodes.deregister_node(self._pool, node_id=self.node_id)
        except DATABASE_ERRORS as exc:
            # Whatever the database says at shutdown, the node times out instead: nothing is lost.
            log.warning("engine node %s could not deregister (%s); it will time out instead", self.node_id, exc)

    async def _stop_tasks(self) -> None:
        for task in (self._task, self._recovery):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._recovery = None

    def _recovery_task(self, recovery: Coroutine[object, object, int]) -> asyncio.Task[int]:
        return asyncio.get_running_loop().create_task(recovery, name=f"engine-node-recovery-{self.node_id}")

    async def _recover_beside(self) -> int:
        """A recovery pass of the heartbeat's, its failure logged: the next pass tries again."""
        try:
            return await self.recover()
        except TRANSIENT_ERRORS as exc:
            log.warning("engine node %s: recovery failed (%s: %s); retrying", self.node_id, type(exc).__name__, exc)
        except Exception:  # recovery must outlive any one bad pass
            log.exception("engine node %s: recovery pass failed", self.node_id)
        return 0

    async def _run(self) -> None:
        next_recovery = self._clock() + self._recovery_interval
        missed = False
        begun: asyncio.Task[int] | None = None  # the last recovery pass this loop began
        while True:
            await asyncio.sleep(self.heartbeat_interval.total_seconds())
            try:
                # Heartbeat first: after an outage, this node must look alive before it judges the others.
                sent_at = asyncio.get_running_loop().time()
                if await engine_nodes.heartbeat(self._pool, node_id=self.node_id, now=self._stamp()):
                    self._last_taken_sent_at = sent_at
                else:
                    log.warning("engine node %s was forgotten by the database; registering again", self.node_id)
                    await self._register()
                if missed:
                    # The others missed their heartbeats through the same outage: give them a node timeout to
                    # be seen again before their calls are judged orphaned.
                    missed = False
                    next_recovery = max(next_recovery, self._clock() + self.node_timeout)
                if self._clock() >= next_recovery and (self._recovery is None or self._recovery.done()):
                    # Beside the heartbeat, not in its way: Twilio may take its time to answer recovery's lookups.
                    next_recovery = self._clock() + self._recovery_interval
                    self._recovery = begun = self._recovery_task(self._recover_beside())
                for check in self._after_beat:
                    await check()
            except TRANSIENT_ERRORS as exc:
                missed = True
                if begun is not None:
                    # A pass this loop began before the outage would judge the others as soon as it ends, before
                    # they could heartbeat again.
                    begun.cancel()
                log.warning(
                    "engine node %s: heartbeat failed (%s: %s); retrying", self.node_id, type(exc).__name__, exc
                )
            except Exception:  # the heartbeat must outlive any one bad pass
                log.exception("engine node %s: heartbeat pass failed", self.node_id)


NODE_HEARTBEAT = web.AppKey("node_heartbeat", NodeHeartbeat)
"""This process's heartbeat as an engine node (absent on a schema that is not migrated: no node runs)."""


async def recovery_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: run this process as an engine node for the app's lifetime; its id under NODE_ID."""
    settings = app.get(SETTINGS)
    if settings is None:  # a bare app (tests of this context alone) runs on the defaults
        heartbeat = NodeHeartbeat(app[DATABASE].pool, twilio=app.get(TWILIO))
    else:
        heartbeat = NodeHeartbeat(
            app[DATABASE].pool,
            heartbeat_interval=timedelta(seconds=settings.node_heartbeat_interval),
            recovery_interval=timedelta(seconds=settings.recovery_interval),
            node_timeout=timedelta(seconds=settings.node_timeout),
            twilio=app.get(TWILIO),
        )
    app[NODE_TIMEOUT_KEY] = heartbeat.node_timeout
    app[NODE_ID] = heartbeat.node_id
    try:
        await heartbeat.start()
        app[NODE_HEARTBEAT] = heartbeat
    except SchemaNotMigrated:
        # Started on a schema that is not migrated (`serve --no-migrate`): /health says so; no recovery runs.
        log.error("the database schema is not migrated: engine node liveness and call recovery are off")
        yield
        return
    try:
        yield
    finally:
        await heartbeat.stop()
