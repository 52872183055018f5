"""A conversation path's react-flow JSON, read into typed nodes and edges and checked as a whole.

Each node's `type` selects its `data` model (speak, prompt, wait, gather, end, transfer, webhook, knowledge,
press_digits, global); react-flow's own `default`, `input` and `output` nodes (and nodes with no type) are the
original speak nodes the flow builder saved before typed nodes existed, read as they always were. Every problem
is a `PathProblem` naming the node or edge id and the JSON path of the field, so the API can point at it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from pipelines.llm.prompt import variable_name_refusal
from pipelines.paths.nodes import (
    EDGE_DATA,
    LEGACY_TYPES,
    NODE_TYPES,
    TYPED_NODES,
    EndData,
    GatherData,
    GlobalData,
    KnowledgeData,
    LegacyData,
    NodeData,
    PressDigitsData,
    PromptData,
    SpeakData,
    TransferData,
    VariableSpec,
    WaitData,
    WebhookData,
)

__all__ = [
    "LEGACY_TYPES",
    "NODE_TYPES",
    "Edge",
    "EndData",
    "GatherData",
    "GlobalData",
    "KnowledgeData",
    "LegacyData",
    "Node",
    "NodeData",
    "Path",
    "PathInvalid",
    "PathProblem",
    "PressDigitsData",
    "PromptData",
    "SpeakData",
    "TransferData",
    "VariableSpec",
    "WaitData",
    "WebhookData",
    "read_path",
    "result_edges",
]


@dataclass(frozen=True, slots=True)
class PathProblem:
    """One thing wrong with a path: the JSON path of the field (`nodes[2].data.digitCount`) and what is wrong."""

    field: str
    message: str


class PathInvalid(ValueError):
    """The path cannot be saved or run; `problems` says what, first one first."""

    def __init__(self, problems: Sequence[PathProblem]) -> None:
        self.problems = list(problems)
        first = self.problems[0]
        more = len(self.problems) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        super().__init__(f"{first.field}: {first.message}{suffix}")


@dataclass(frozen=True, slots=True)
class Node:
    """A node of the path: its id, its react-flow type and its typed data."""

    id: str
    kind: str
    data: NodeData

    @property
    def is_global(self) -> bool:
        """Whether the node is reachable from anywhere by its condition."""
        return isinstance(self.data, GlobalData)

    @property
    def ends_call(self) -> bool:
        """Whether arriving here ends the call (an end node, or a stock node marked `endCall`)."""
        return isinstance(self.data, EndData) or (isinstance(self.data, LegacyData) and self.data.end_call)

    @property
    def passes_through(self) -> bool:
        """Whether a call arriving here moves on at once, without the caller: touch tones, a webhook, or a global
        node with nothing to say (`passing_edges` names where it may go)."""
        data = self.data
        if isinstance(data, GlobalData):
            return not data.text and not data.instructions
        return isinstance(data, PressDigitsData | WebhookData)

    @property
    def text(self) -> str:
        """What the offline model says on arriving here (may be empty)."""
        data = self.data
        if isinstance(data, LegacyData):
            for value in (data.text, data.prompt, data.label):
                if value and value.strip():
                    return value.strip()
            return ""
        text = getattr(data, "text", None)
        return text.strip() if isinstance(text, str) else ""


@dataclass(frozen=True, slots=True)
class Edge:
    """A way from `source` to `target`, with what the model and the keyword chooser read to pick it."""

    id: str
    source: str
    target: str
    label: str
    condition: str
    keywords: tuple[str, ...]
    digit: str | None
    result: str | None

    @property
    def description(self) -> str:
        """What a model is told this way is for."""
        return self.condition or self.label or f"go to {self.target}"


MAX_ID_CHARS = 100
"""The longest node or edge id a path is saved with: ids are written with every turn of every call on the path and
are labels of the engine's metrics. (A path stored longer before still runs.)"""


@dataclass(frozen=True, slots=True)
class Path:
    """A checked path: nodes by id in saved order, edges, and the start node."""

    nodes: Mapping[str, Node]
    edges: Sequence[Edge]
    start: str
    _outgoing: Mapping[str, list[Edge]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_outgoing", _outgoing_edges(self.edges))

    def outgoing(self, node_id: str) -> list[Edge]:
        """The edges out of a node, in saved order."""
        return list(self._outgoing.get(node_id, ()))

    def global_nodes(self) -> list[Node]:
        """The nodes reachable from anywhere."""
        return [node for node in self.nodes.values() if node.is_global]


def read_path(nodes: Any, edges: Any, *, strict: bool = True) -> Path:
    """Read and check react-flow `nodes` and `edges` (JSON arrays); PathInvalid listing every problem.

    `strict` (saving through the API) also refuses dangling edges, unreachable nodes and variables named like a
    built-in prompt variable; a call (`strict=False`) runs a path saved before those checks existed, leaving out
    the edges that lead nowhere (and the built-in fills such a variable's placeholder: see PathEngine.fill).
    """
    problems = [
        PathProblem(name, f"must be a JSON array of react-flow {name}, not {_json_kind(value)}")
        for name, value in (("nodes", nodes), ("edges", edges))
        if not isinstance(value, list | tuple)
    ]
    if problems:  # a graph stored by another writer in another shape: nothing in it can be read as nodes or edges
        raise PathInvalid(problems)
    read_nodes: dict[str, Node] = {}
    for index, item in enumerate(nodes):
        node = _read_node(index, item, problems, strict=strict)
        if node is None:
            continue
        if strict:
            _check_variable_names(index, node, problems)
        if node.id in read_nodes:
            problems.append(PathProblem(f"nodes[{index}].id", f"node id {node.id!r} is used by two nodes"))
            continue
        read_nodes[node.id] = node
    if not read_nodes and not problems:
        problems.append(PathProblem("nodes", "the path has no nodes: add at least a start node"))
    read_edges = _read_edges(edges, read_nodes, problems, strict=strict)
    start = _start(read_nodes, read_edges, problems) if read_nodes else ""
    if strict and start and not problems:
        _check_reachable(read_nodes, read_edges, start, problems)
    if strict and start and not problems:
        _check_way_out(read_nodes, read_edges, problems)
        _check_edges_taken(read_nodes, read_edges, problems)
    if problems:
        raise PathInvalid(problems)
    return Path(read_nodes, read_edges, start)


def _json_kind(value: Any) -> str:
    match value:
        case None:
            return "null"
        case Mapping():
            return "an object"
        case str():
            return "a string"
        case bool():
            return "a boolean"
        case _:
            return "a number"


def _read_node(index: int, item: Any, problems: list[PathProblem], *, strict: bool) -> Node | None:
    where = f"nodes[{index}]"
    if not isinstance(item, Mapping):
        problems.append(PathProblem(where, "a node must be a JSON object"))
        return None
    raw_id = item.get("id")
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool) or not str(raw_id):
        problems.append(PathProblem(f"{where}.id", "a node needs an id"))
        return None
    node_id = str(raw_id)
    if strict and len(node_id) > MAX_ID_CHARS:
        problems.append(PathProblem(f"{where}.id", f"a node id is at most {MAX_ID_CHARS} characters"))
        return None
    kind = item.get("type") or "default"
    raw_data = item.get("data") if item.get("data") is not None else {}
    if not isinstance(raw_data, Mapping):
        problems.append(PathProblem(f"{where}.data", f"node {node_id!r}: data must be a JSON object"))
        return None
    if not isinstance(kind, str) or kind not in NODE_TYPES:
        allowed = ", ".join(sorted(NODE_TYPES))
        problems.append(PathProblem(f"{where}.type", f"node {node_id!r}: unknown type {kind!r} (use one of {allowed})"))
        return None
    model: type[BaseModel] = TYPED_NODES.get(kind, LegacyData)
    try:
        data = model.model_validate({key: value for key, value in raw_data.items() if key != "type"})
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            field = ".".join(str(part) for part in error["loc"])
            path = f"{where}.data.{field}" if field else f"{where}.data"
            message = error["msg"].removeprefix("Value error, ")
            problems.append(PathProblem(path, f"node {node_id!r} ({kind}): {message}"))
        return None
    return Node(node_id, kind, data)  # type: ignore[arg-type]


def _check_variable_names(index: int, node: Node, problems: list[PathProblem]) -> None:
    """A problem for each variable the node gathers under a name that would hide a built-in prompt variable."""
    data = node.data
    named = [(f"extractVariables.{number}.name", spec.name) for number, spec in enumerate(data.extract_variables)]
    if isinstance(data, GatherData | WebhookData) and data.variable is not None:
        named.append(("variable", data.variable))
    for field_name, name in named:
        refusal = variable_name_refusal(name)
        if refusal is not None:
            message = f"node {node.id!r} ({node.kind}): {refusal}; rename it"
            problems.append(PathProblem(f"nodes[{index}].data.{field_name}", message))


def _read_edges(
    raw: Sequence[Any], nodes: Mapping[str, Node], problems: list[PathProblem], *, strict: bool
) -> list[Edge]:
    edges: list[Edge] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        where = f"edges[{index}]"
        if not isinstance(item, Mapping):
            problems.append(PathProblem(where, "an edge must be a JSON object"))
            continue
        edge_id = str(item.get("id") or f"edge-{index}")
        if edge_id in seen:
            problems.append(PathProblem(f"{where}.id", f"edge id {edge_id!r} is used by two edges"))
            continue
        if strict and len(edge_id) > MAX_ID_CHARS:
            problems.append(PathProblem(f"{where}.id", f"an edge id is at most {MAX_ID_CHARS} characters"))
            continue
        seen.add(edge_id)
        source, target = str(item.get("source")), str(item.get("target"))
        missing = [(end, name) for end, name in (("source", source), ("target", target)) if name not in nodes]
        if missing:
            if strict:
                for end, name in missing:
                    problems.append(PathProblem(f"{where}.{end}", f"edge {edge_id!r}: no node has the id {name!r}"))
            continue  # an edge left dangling by the flow builder leads nowhere
        try:
            data = EDGE_DATA.validate_python(item.get("data") or {})
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field = ".".join(str(part) for part in error["loc"])
            problems.append(PathProblem(f"{where}.data.{field}", f"edge {edge_id!r}: {error['msg']}"))
            continue
        source_node = nodes[source]
        if strict and (source_node.ends_call or isinstance(source_node.data, TransferData)):
            problems.append(
                PathProblem(f"{where}.source", f"edge {edge_id!r}: node {source!r} ends the call, nothing follows it")
            )
        if strict and data.result is not None and not isinstance(source_node.data, WebhookData):
            problems.append(
                PathProblem(f"{where}.data.result", f"edge {edge_id!r}: only edges out of a webhook node have a result")
            )
        label = data.label or (item.get("label") if isinstance(item.get("label"), str) else None) or ""
        edges.append(
            Edge(
                id=edge_id,
                source=source,
                target=target,
                label=label.strip(),
                condition=(data.condition or "").strip(),
                keywords=_keywords(data.keywords),
                digit=_digit(data.digit),
                result=data.result,
            )
        )
    return edges


def _keywords(value: str | list[str] | None) -> tuple[str, ...]:
    parts = value.split(",") if isinstance(value, str) else value or []
    return tuple(part.strip() for part in parts if isinstance(part, str) and part.strip())


def _digit(value: int | str | None) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def _start(nodes: Mapping[str, Node], edges: Sequence[Edge], problems: list[PathProblem]) -> str:
    marked = [node_id for node_id, node in nodes.items() if node.data.is_start]
    if len(marked) > 1:
        index = list(nodes).index(marked[1])
        problems.append(
            PathProblem(
                f"nodes[{index}].data.isStart",
                f"node {marked[1]!r}: only one node may start the path ({marked[0]!r} already does)",
            )
        )
    if marked:
        return marked[0]
    for node_id, node in nodes.items():
        if node.kind == "input":
            return node_id
    targets = {edge.target for edge in edges}
    for node_id, node in nodes.items():
        if node_id not in targets and not node.is_global:
            return node_id
    return next(iter(nodes))


def _check_reachable(nodes: Mapping[str, Node], edges: Sequence[Edge], start: str, problems: list[PathProblem]) -> None:
    if nodes[start].is_global:
        problems.append(PathProblem("nodes", f"node {start!r}: a global node cannot start the path"))
        return
    outgoing = _outgoing_edges(edges)  # by source: one pass over the edges, not one per node reached
    reached = {start} | {node_id for node_id, node in nodes.items() if node.is_global}
    frontier = list(reached)
    while frontier:
        for edge in outgoing.get(frontier.pop(), ()):
            if edge.target not in reached:
                reached.add(edge.target)
                frontier.append(edge.target)
    for index, node_id in enumerate(nodes):
        if node_id not in reached:
            problems.append(
                PathProblem(f"nodes[{index}]", f"node {node_id!r} cannot be reached from the start node {start!r}")
            )


def result_edges(edges: Sequence[Edge], result: str) -> list[Edge]:
    """The edges out of a webhook node that its call's `result` (success or failure) may take, first one first:
    those marked with it, else those marked with none."""
    return [edge for edge in edges if edge.result == result] or [edge for edge in edges if edge.result is None]


def _passing_targets(node: Node, outgoing: Sequence[Edge]) -> set[str]:
    """Where a call passing through `node` may go next: its first edge, or a webhook's first for each result;
    none when the call may stop there (no edge to follow, or none for one of the webhook's results)."""
    if isinstance(node.data, WebhookData):
        taken = [result_edges(outgoing, result) for result in ("success", "failure")]
        return {edges[0].target for edges in taken} if all(taken) else set()
    return {outgoing[0].target} if outgoing else set()


def _check_way_out(nodes: Mapping[str, Node], edges: Sequence[Edge], problems: list[PathProblem]) -> None:
    """A problem for each node passed through (touch tones, webhooks, silent global nodes) from which the call can
    only go round a loop of such nodes: it would never stop to say anything, hear the caller or end."""
    outgoing = _outgoing_edges(edges)
    following = {
        node_id: _passing_targets(node, outgoing.get(node_id, ()))
        for node_id, node in nodes.items()
        if node.passes_through
    }
    leading_to: dict[str, list[str]] = {}
    for node_id, targets in following.items():
        for target in targets:
            leading_to.setdefault(target, []).append(node_id)
    # Stopping nodes, and those passed through to one, have a way out: walk back from the stopping ones.
    way_out = {node_id for node_id in nodes if not following.get(node_id)}
    frontier = list(way_out)
    while frontier:
        for node_id in leading_to.get(frontier.pop(), ()):
            if node_id not in way_out:
                way_out.add(node_id)
                frontier.append(node_id)
    for index, (node_id, node) in enumerate(nodes.items()):
        if node_id in way_out:
            continue
        loop = [node_id]
        while (after := min(following[loop[-1]])) not in loop:
            loop.append(after)
        round_trip = " → ".join(repr(name) for name in [*loop, after])
        problems.append(
            PathProblem(
                f"nodes[{index}]",
                f"node {node_id!r} ({node.kind}) leads only round nodes a call passes through without the caller "
                f"({round_trip}): it would never stop to speak, listen or end; give one of them an edge to a node "
                "that does",
            )
        )


def _check_edges_taken(nodes: Mapping[str, Node], edges: Sequence[Edge], problems: list[PathProblem]) -> None:
    """A problem for each edge out of a node passed through that no call can take: such a node follows its first
    edge (a webhook its first for each result), so a second one is a branch nothing decides."""
    outgoing = _outgoing_edges(edges)
    index = {edge.id: number for number, edge in enumerate(edges)}
    for node_id, node in nodes.items():
        leaving = outgoing.get(node_id, [])
        if not node.passes_through or len(leaving) < 2:
            continue
        if isinstance(node.data, WebhookData):
            taken = [result_edges(leaving, result) for result in ("success", "failure")]
            if not all(taken):
                continue  # a result with no edge leaves the call at the node, where any of its edges is a way on
            rule = f"follows its first edge for each result ({taken[0][0].id!r} on success, {taken[1][0].id!r} on "
            rule += "failure); mark the edges with data.result success or failure, or remove this one"
            chosen = {taken[0][0].id, taken[1][0].id}
        else:
            rule = f"always follows its first edge, {leaving[0].id!r}; remove the others"
            chosen = {leaving[0].id}
        for edge in leaving:
            if edge.id not in chosen:
                message = f"edge {edge.id!r} is never taken: node {node_id!r} ({node.kind}) {rule}"
                problems.append(PathProblem(f"edges[{index[edge.id]}]", message))


def _outgoing_edges(edges: Sequence[Edge]) -> dict[str, list[Edge]]:
    """The edges by the node they leave, each node's in saved order."""
    outgoing: dict[str, list[Edge]] = {}
    for edge in edges:
        outgoing.setdefault(edge.source, []).append(edge)
    return outgoing
