"""Which transfer nodes of a conversation path an agent can never make: its transfer rules refuse their number.

A call that reaches such a node always has its transfer refused (the caller hears an apology and the path goes
back, `PathEngine.transfer_not_made`); the API names these nodes when a path and an agent are put together, so the
operator learns it before a caller does. The verdict is the rules' own (`TransferRules.check`), never a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.conversation.transfer_rules import Refusal, TransferRules
from pipelines.paths.graph import PathInvalid, TransferData, read_path

__all__ = ["UnmakeableTransfer", "unmakeable_transfers"]


@dataclass(frozen=True, slots=True)
class UnmakeableTransfer:
    """A transfer node the rules refuse: its id, the JSON path of its number, the number and the rules' reason."""

    node_id: str
    field: str
    number: str
    reason: str


def unmakeable_transfers(nodes: Any, edges: Any, rules: TransferRules) -> list[UnmakeableTransfer]:
    """The transfer nodes of the path (`nodes`, `edges` as stored) whose number `rules` refuse, in saved order.

    A path a call could not read (a draft, or a shape another writer left) has none: the call fails for that reason
    instead, named where the path is saved or in the call's CallLog.
    """
    try:
        path = read_path(nodes, edges, strict=False)
    except PathInvalid:
        return []
    found = []
    for node in path.nodes.values():
        if not isinstance(node.data, TransferData):
            continue
        verdict = rules.check(node.data.number)
        if isinstance(verdict, Refusal):
            field = f"nodes[{_index_of(nodes, node.id)}].data.number"
            found.append(UnmakeableTransfer(node.id, field, node.data.number, verdict.message))
    return found


def _index_of(nodes: Sequence[Any], node_id: str) -> int:
    # read_path keeps the first node of an id (a second is refused) and reads a numeric id as text, as here.
    return next(index for index, item in enumerate(nodes) if isinstance(item, dict) and str(item.get("id")) == node_id)
