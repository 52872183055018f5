"""Crash recovery: this process's heartbeat as an engine node, and closing calls that dead nodes left open.

Every engine process registers as an EngineNode with a fresh id and heartbeats while it runs. At start and then
every minute, it closes as FAILED the IN_PROGRESS calls of nodes that stopped heartbeating (a crash, a lost host)
and of calls whose media stream never started, so nothing stays IN_PROGRESS forever; a lost call whose transfer
Twilio had made (its leg settled from the dial, or Twilio's record of the dial, asked when its leg is still open)
ends COMPLETED `transferred` instead. Twilio out of reach (or no Twilio account) delays nothing: such a call is then
closed on its leg's evidence alone. A node of this host whose
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
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

from aiohttp import web

from engine.server.appkeys import DATABASE, SETTINGS, TWILIO
from engine.twilio.rest import CallLookupFailed, TwilioCalls
from engine.workers.host_processes import process_is_gone
from storage import Pool, engine_nodes
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
    ) -> None:
        """`twilio` is asked whether the lost calls with an open transfer leg were transferred (without it, they are
        closed as `engine_lost`)."""
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
        self._clock = clock or _utc_now
        self._stamp_clock = clock
        """Heartbeats are stamped and judged by the database's clock (None) unless a clock is given (tests)."""
        self._task: asyncio.Task[None] | None = None
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
        """Register this node, close what dead nodes left open, and start heartbeating in the background."""
        await self._register()
        await self.recover()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"engine-node-{self.node_id}")
        log.info("engine node %s registered", self.node_id)

    async def recover(self) -> int:
        """Close the calls no live node runs; how many were closed."""
        await self._forget_gone_neighbours()
        now = self._stamp()
        closed = await engine_nodes.close_orphaned_calls(
            self._pool,
            now=now,
            node_timeout=self.node_timeout,
            stream_timeout=self._stream_timeout,
            dialed=await self._transfers_twilio_dialed(now),
        )
        if closed:
            log.warning("closed %d calls left IN_PROGRESS by engine processes that stopped", closed)
        await engine_nodes.forget_dead_nodes(self._pool, now=now, older_than=FORGET_NODES_AFTER)
        return closed

    async def _transfers_twilio_dialed(self, now: datetime | None) -> list[str]:
        """Of the lost calls whose transfer leg is open, those Twilio's record shows a dial of (the caller was handed
        over). Once Twilio cannot be asked, the rest are not asked about: their calls end `engine_lost`, unproven."""
        orphaned = await engine_nodes.orphaned_transfers(
            self._pool, now=now, node_timeout=self.node_timeout, stream_timeout=self._stream_timeout
        )
        dialed: list[str] = []
        for index, transfer in enumerate(orphaned):
            if self._twilio is None:
                log.warning(
                    "lost call %s had asked for a transfer; with no Twilio account to ask whether it was made, it is "
                    "closed as engine_lost",
                    transfer.call_sid,
                )
                continue
            try:
                if await self._twilio.dialed_calls(transfer.call_sid):
                    dialed.append(transfer.call_log_id)
            except CallLookupFailed as exc:
                log.warning(
                    "whether Twilio made the transfers of %d lost calls is unknown (%s); they are closed as "
                    "engine_lost",
                    len(orphaned) - index,
                    exc,
                )
                break
        return dialed

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
        """Stop heartbeating and deregister; calls this node still holds are closed by the next node's recovery."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await engine_nodes.deregister_node(self._pool, node_id=self.node_id)
        except DATABASE_ERRORS as exc:
            # Whatever the database says at shutdown, the node times out instead: nothing is lost.
            log.warning("engine node %s could not deregister (%s); it will time out instead", self.node_id, exc)

    async def _run(self) -> None:
        next_recovery = self._clock() + self._recovery_interval
        missed = False
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
                if self._clock() >= next_recovery:
                    next_recovery = self._clock() + self._recovery_interval
                    await self.recover()
                for check in self._after_beat:
                    await check()
            except TRANSIENT_ERRORS as exc:
                missed = True
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
