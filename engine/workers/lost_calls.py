"""Ending the calls this process still runs after the others' crash recovery closed them as lost, or may be about
to, or after their CallLog was deleted.

A node that could not heartbeat for the node timeout (stopped, starved of CPU, cut off from the database) has its
calls closed as FAILED `engine_lost` by the other nodes, their credits settled and their call.ended told. When it
runs again it must not talk on to callers whose call is over for everyone else: after its first heartbeat the
database takes, it ends those calls (their media streams close, and with them Twilio's calls).

A node cut off from the database while Twilio and its callers still reach it does not wait for that: its calls could
not be billed (their credits cannot be reserved) nor seen, and the others will close them as lost. Shortly before
its heartbeat lease lapses (the node timeout since the last heartbeat the database took), it ends them itself as the
others will, FAILED `engine_lost`: the agent says goodbye and the call is hung up by the time the lease lapses. What
it cannot write goes to the CallLog spill, written when the database returns; the call's end is then the one the
first of them wrote, told once. A blip shorter than that leaves its calls be.

A CallLog deleted while its call runs (the platform's dashboard deletes rows in SQL) takes the call's credit
reservation and its concurrent-call slot with it: its call is hung up after the next heartbeat, at the latest (its
writer finds out sooner when the call has a turn to write).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from engine.call.credit_meter import HANG_UP_MARGIN_SECONDS
from engine.call.live_calls import LiveCalls
from engine.server.appkeys import DATABASE, LIVE_CALLS
from engine.workers.recovery import NODE_HEARTBEAT, NodeHeartbeat
from storage import Pool, engine_nodes
from storage.end_reasons import EndReason

log = logging.getLogger(__name__)


class LostCallsWatch:
    """Ends the calls running here whose CallLog crash recovery closed as lost, or that was deleted."""

    def __init__(self, pool: Pool, calls: LiveCalls, *, node_id: str) -> None:
        """Watch the calls `calls` runs for the engine node `node_id`, asking through `pool`."""
        self._pool = pool
        self._calls = calls
        self._node_id = node_id

    async def check(self) -> int:
        """End the calls running here that recovery closed as lost, or whose CallLog was deleted; how many."""
        running = self._calls.running()
        lost = await engine_nodes.calls_closed_as_lost(self._pool, node_id=self._node_id, call_log_ids=running)
        deleted = await engine_nodes.calls_deleted(self._pool, call_log_ids=running)
        for call_log_id in deleted:
            session = self._calls.get(call_log_id)
            if session is not None:
                session.call_log_deleted()
        for call_log_id in lost:
            session = self._calls.get(call_log_id)
            if session is not None:
                log.error(
                    "call %s was closed as lost by another engine node while this one (%s) did not heartbeat; "
                    "ending it here",
                    call_log_id,
                    self._node_id,
                )
                session.end_from_outside(EndReason.ENGINE_LOST)
        return len(lost) + len(deleted)


FENCE_LEAD_SECONDS = 10.0
"""How long before its heartbeat lease lapses a node cut off from the database starts ending its calls: time for the
agent's goodbye and Twilio's hang-up."""


class CutOffFence:
    """Ends the calls running here shortly before this node's heartbeat lease lapses, its database out of reach."""

    def __init__(self, heartbeat: NodeHeartbeat, calls: LiveCalls) -> None:
        """Fence the calls `calls` runs by the lease of `heartbeat`."""
        self._heartbeat = heartbeat
        self._calls = calls
        timeout = heartbeat.node_timeout.total_seconds()
        # Never within a heartbeat interval of the last beat taken: a live node's next beat comes before it.
        self.lead = min(FENCE_LEAD_SECONDS, (timeout - heartbeat.heartbeat_interval.total_seconds()) / 2)
        self._hang_up_margin = min(HANG_UP_MARGIN_SECONDS, self.lead / 4)

    async def run(self) -> None:
        """End the calls running here whenever the lease is about to lapse; until cancelled."""
        loop = asyncio.get_running_loop()
        timeout = self._heartbeat.node_timeout.total_seconds()
        while True:
            lapses_at = self._heartbeat.lease_lapses_at
            wait = lapses_at - self.lead - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # a heartbeat the database takes meanwhile moves the lease on
                continue
            try:
                self.fence(
                    silent_s=loop.time() - (lapses_at - timeout),
                    hang_up_in=lapses_at - self._hang_up_margin - loop.time(),
                )
            except Exception:  # the fence must outlive one call's failure to end
                log.exception(
                    "engine node %s: ending its calls cut off from the database failed", self._heartbeat.node_id
                )
            await asyncio.sleep(self._heartbeat.heartbeat_interval.total_seconds())  # a call set up meanwhile

    def fence(self, *, silent_s: float, hang_up_in: float) -> int:
        """End every call running here that is not ending already, the node's heartbeat not taken for `silent_s`
        seconds: hung up within `hang_up_in` seconds. How many."""
        detail = f"engine node {self._heartbeat.node_id} was cut off from the database for {silent_s:.0f} s"
        ended = 0
        for call_log_id in self._calls.running():
            session = self._calls.get(call_log_id)
            if session is not None and session.cut_off(detail, hang_up_in=max(hang_up_in, 0.0)):
                ended += 1
        if ended:
            log.error(
                "engine node %s: cut off from the database for %.0f s, its heartbeat not taken since; ending its %d "
                "calls before the other nodes take them for lost (engine_lost)",
                self._heartbeat.node_id,
                silent_s,
                ended,
            )
        return ended


async def lost_calls_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: check this process's calls after each of its heartbeats, and fence them while it is cut off
    from the database, for the app's lifetime."""
    heartbeat = app.get(NODE_HEARTBEAT)
    if heartbeat is None:  # no node runs on a schema that is not migrated
        yield
        return
    heartbeat.after_each_beat(LostCallsWatch(app[DATABASE].pool, app[LIVE_CALLS], node_id=heartbeat.node_id).check)
    fence = asyncio.get_running_loop().create_task(
        CutOffFence(heartbeat, app[LIVE_CALLS]).run(), name=f"engine-node-fence-{heartbeat.node_id}"
    )
    try:
        yield
    finally:
        fence.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fence
