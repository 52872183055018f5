"""A gather node's wait for the caller's next key, as a timer in the call (both conversation drivers use it).

The driver arms it when the agent has finished speaking at a gather node and after each key the node takes; the
caller speaking or pressing, a new reply, or the end of the call disarms it. When the node's `timeoutSeconds` pass
with the call listening and the caller silent, the path engine is told (`PathEngine.time_out_keys`) and the driver
has the path act on it: the digits so far complete the node, or, with none, the node's text is said again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from engine.call.driver import CallHost
from engine.call.phases import CallPhase
from pipelines.paths.engine import PathEngine

__all__ = ["KeyWait"]

log = logging.getLogger(__name__)


class KeyWait:
    """One call's timer for the keys of the gather node it is at."""

    def __init__(
        self,
        host: CallHost,
        engine: PathEngine,
        *,
        caller_speaking: Callable[[], bool],
        timed_out: Callable[[], None],
    ) -> None:
        """Time the keys of `engine`'s gather nodes in `host`'s call; `timed_out()` has the path act on a wait that
        ran out (the engine was told)."""
        self._host = host
        self._engine = engine
        self._caller_speaking = caller_speaking
        self._timed_out = timed_out
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Start (or restart) the wait, when the call is listening at a gather node that times its keys."""
        self.cancel()
        seconds = self._engine.key_timeout
        if seconds is not None and self._host.phase is CallPhase.LISTENING:
            self._timer = asyncio.get_running_loop().call_later(seconds, self._expire, self._engine.node.id)

    def cancel(self) -> None:
        """Stop waiting: the caller spoke or pressed, the agent speaks, or the call ends."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, node_id: str) -> None:
        self._timer = None
        engine = self._engine
        if self._host.phase is not CallPhase.LISTENING or engine.node.id != node_id:
            return  # the call moved on meanwhile; whatever moved it arms the next wait
        if self._caller_speaking():
            self.arm()  # they are saying something: their turn decides, or the wait starts over
            return
        log.info("call %s: no key at node %s in %.1f s", self._host.context.call_sid, node_id, engine.key_timeout or 0)
        engine.time_out_keys()
        self._timed_out()
