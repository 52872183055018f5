"""Ending the calls this process still runs after the others' crash recovery closed them as lost, or after their
CallLog was deleted.

A node that could not heartbeat for the node timeout (stopped, starved of CPU, cut off from the database) has its
calls closed as FAILED `engine_lost` by the other nodes, their credits settled and their call.ended told. When it
runs again it must not talk on to callers whose call is over for everyone else: after its first heartbeat the
database takes, it ends those calls (their media streams close, and with them Twilio's calls).

A CallLog deleted while its call runs (the platform's dashboard deletes rows in SQL) takes the call's credit
reservation and its concurrent-call slot with it: its call is hung up after the next heartbeat, at the latest (its
writer finds out sooner when the call has a turn to write).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from engine.call.live_calls import LiveCalls
from engine.server.appkeys import DATABASE, LIVE_CALLS
from engine.workers.recovery import NODE_HEARTBEAT
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


async def lost_calls_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: check this process's calls after each of its heartbeats, for the app's lifetime."""
    heartbeat = app.get(NODE_HEARTBEAT)
    if heartbeat is not None:  # no node runs on a schema that is not migrated
        heartbeat.after_each_beat(LostCallsWatch(app[DATABASE].pool, app[LIVE_CALLS], node_id=heartbeat.node_id).check)
    yield
