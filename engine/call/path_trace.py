"""A call's trace along its conversation path: each turn's node and edge, the CallLog's path metadata, metrics,
and the call's live events.

The TurnLog stamps every turn it places with `stamp`: a caller turn with the node they answered at, an agent turn
with the node it was spoken at and the edge taken to it during the reply. The CallLog's `metadata.conversationPath`
keeps the path's id and the node the call is at (at the end: where it ended), and the engine's `/metrics` count,
once per call, the calls that reached each node and took each edge.

The live events hear of each step (path.node) as the path engine takes it, not with the next turn: a step of a
speculative reply waits until the caller's turn is confirmed (`tell_steps`), and one of a reply thrown away is
rewound before anyone hears of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.call.live_events import CallEvents
from engine.server import metrics
from pipelines.conversation.confirmation import turn_pending
from pipelines.paths.engine import PathEngine, PathStep

__all__ = ["PathTrace"]


class PathTrace:
    """Follows one call's path engine for its turns, its CallLog and the metrics."""

    def __init__(
        self,
        path_id: str,
        engine: PathEngine,
        *,
        record_metadata: Callable[..., None] | None = None,
        live: CallEvents | None = None,
    ) -> None:
        """Trace `engine` (walking path `path_id`); `record_metadata` merges items into the CallLog's metadata;
        `live` hears of each step (path.node) as it is taken."""
        self._path_id = path_id
        self._live = live
        self._engine = engine
        self._record_metadata = record_metadata
        self._seen_steps = 0
        self._told_steps = 0
        if live is not None:
            engine.on_step = self._stepped
        self._nodes: set[str] = set()
        self._edges: set[str] = set()
        self._reported: str | None = None

    def node(self) -> str | None:
        """The node the call is at now; None before the path starts."""
        return self._engine.node.id if self._engine.started else None

    def stamp(self, speaker: str) -> tuple[str | None, str | None]:
        """(node id, edge id) for a turn placed now: where the path is, and for the agent the edge taken to it."""
        engine = self._engine
        if not engine.started:
            return None, None
        new_steps = engine.steps[self._seen_steps :]
        if speaker == "caller":
            return engine.node.id, None
        self._seen_steps = len(engine.steps)
        for step in new_steps:
            self._took(step.node_id, step.edge_id)
        self._report(engine.node.id)
        return engine.node.id, (new_steps[-1].edge_id if new_steps else None)

    def settle(self) -> None:
        """At the end of the call: count the steps no turn was stamped with, and keep where the call ended."""
        engine = self._engine
        if not engine.started:
            return
        for step in engine.steps[self._seen_steps :]:
            self._took(step.node_id, step.edge_id)
        self._seen_steps = len(engine.steps)
        self._reported = None  # the variables may have changed without a move
        self._report(engine.node.id)

    def tell_steps(self) -> None:
        """Tell the live events the steps not told yet (a speculative reply's, once its caller's turn is confirmed:
        they are the call's now)."""
        if self._live is None:
            return
        steps = self._engine.steps
        self._told_steps = min(self._told_steps, len(steps))  # a rewind takes back untold steps only; if more, follow
        for step in steps[self._told_steps :]:
            self._live.emit("path.node", pathId=self._path_id, nodeId=step.node_id, edgeId=step.edge_id)
        self._told_steps = len(steps)

    def _stepped(self, _step: PathStep) -> None:
        """The path engine took a step: told now, unless a speculative reply took it before its turn is confirmed."""
        if not turn_pending():
            self.tell_steps()

    def _took(self, node_id: str, edge_id: str | None) -> None:
        """A step of the path, counted once per call for the metrics."""
        if node_id not in self._nodes:
            self._nodes.add(node_id)
            metrics.PATH_NODES.inc(self._path_id, node_id)
        if edge_id is not None and edge_id not in self._edges:
            self._edges.add(edge_id)
            metrics.PATH_EDGES.inc(self._path_id, edge_id)

    def _report(self, node_id: str) -> None:
        if self._record_metadata is None or node_id == self._reported:
            return
        self._reported = node_id
        variables: dict[str, Any] = dict(self._engine.variables)
        self._record_metadata(conversationPath={"id": self._path_id, "node": node_id, "variables": variables})
