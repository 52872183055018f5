"""Which transfer nodes of a conversation path can never be made: an agent's transfer rules refuse their number, or
the organization's dial policy does.

A call that reaches such a node always has its transfer refused (the caller hears an apology and the path goes
back, `PathEngine.transfer_not_made`); the API names these nodes when a path and an agent are put together and when
a path is saved, so the operator learns it before a caller does. The verdicts are the rules' own
(`TransferRules.check`) and the policy's own (`OutboundDialPolicy.refusal`, given as `dial_refusal`), never copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.conversation.transfer_rules import Refusal, TransferRules
from pipelines.paths.graph import PathInvalid, TransferData, read_path

__all__ = ["TransferNode", "UnmakeableTransfer", "refused_by_dial_policy", "transfer_nodes", "unmakeable_transfers"]


@dataclass(frozen=True, slots=True)
class TransferNode:
    """A transfer node of a path: its id, the JSON path of its number (`nodes[3].data.number`) and the number."""

    node_id: str
    field: str
    number: str


@dataclass(frozen=True, slots=True)
class UnmakeableTransfer:
    """A transfer node refused: the node and the reason (the rules' function result, or the dial policy's)."""

    node: TransferNode
    reason: str


def transfer_nodes(nodes: Any, edges: Any) -> list[TransferNode]:
    """The transfer nodes of the path (`nodes`, `edges` as stored), in saved order.

    A path a call could not read (a draft, or a shape another writer left) has none: the call fails for that reason
    instead, named where the path is saved or in the call's CallLog.
    """
    try:
        path = read_path(nodes, edges, strict=False)
    except PathInvalid:
        return []
    return [
        TransferNode(node.id, f"nodes[{_index_of(nodes, node.id)}].data.number", node.data.number)
        for node in path.nodes.values()
        if isinstance(node.data, TransferData)
    ]


def unmakeable_transfers(nodes: Any, edges: Any, rules: TransferRules) -> list[UnmakeableTransfer]:
    """The transfer nodes of the path whose number `rules` refuse, in saved order."""
    found = []
    for node in transfer_nodes(nodes, edges):
        verdict = rules.check(node.number)
        if isinstance(verdict, Refusal):
            found.append(UnmakeableTransfer(node, verdict.message))
    return found


def refused_by_dial_policy(
    nodes: Any, edges: Any, dial_refusal: Callable[[str], str | None]
) -> list[UnmakeableTransfer]:
    """The transfer nodes of the path whose number the organization's dial policy refuses (`dial_refusal`: the
    policy's `refusal`, given the node's number in E.164 as the path stores it), in saved order."""
    found = []
    for node in transfer_nodes(nodes, edges):
        reason = dial_refusal(node.number)
        if reason is not None:
            found.append(UnmakeableTransfer(node, reason))
    return found


def _index_of(nodes: Sequence[Any], node_id: str) -> int:
    # read_path keeps the first node of an id (a second is refused) and reads a numeric id as text, as here.
    return next(index for index, item in enumerate(nodes) if isinstance(item, dict) and str(item.get("id")) == node_id)
