"""One call's position on a conversation path, and the moves that change it; driven by any language model.

The engine is pure: it holds where the call is, the call's variables and the trace of nodes and edges, and turns
arriving at a node into call events (verbatim speech with its `{{…}}` filled as the agent's first sentence is,
`fill`; touch tones, hang-up, transfer). The two things a node may reach outside the call are injected: the agent's
Tools (`ToolCaller`, a webhook node) and its knowledge bases (`KnowledgeLookup`, a knowledge node). Knowledge bases
do not exist yet: with no lookup, a knowledge node says its fallback line, and the knowledge-base work plugs its
search in through that Protocol.

A model moves the call with `move(way)`: a way is an outgoing edge of the current node (by edge id) or a global
node (`global:<node id>`), reachable from anywhere. Nodes that need no caller (press digits, webhook, a global
node with nothing to say) are passed through on arrival, following their first (or result-matching) edge.

A gather node waits `timeoutSeconds` for each key, as Twilio's `<Gather>` does: the call arms a timer when the node
has been said and after each key (`key_timeout`), and tells the engine when it runs out (`time_out_keys`). The next
reading of the caller's keys (`press`) then completes the node with the digits so far, or, with none, says the
node's text again; after `MAX_KEY_REPROMPTS` of those the node waits without a timer (the call's silence time-out
ends a call nobody answers).

A transfer node hands the caller to its number; when that transfer is not made (the agent's transfer rules refuse
the number, Twilio does not redirect the call, the credits cannot pay for the leg), the call tells the engine
(`transfer_not_made`) and the path goes back to the node the call came from, so the conversation goes on there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from pipelines.knowledge import KnowledgeUnavailable
from pipelines.llm.base import ConversationTurn, EndCall, LLMEvent, SendDtmf, TextDelta, TransferCall
from pipelines.llm.prompt import render_prompt, without_hidden
from pipelines.paths.graph import (
    Edge,
    EndData,
    GatherData,
    GlobalData,
    KnowledgeData,
    LegacyData,
    Node,
    Path,
    PressDigitsData,
    PromptData,
    TransferData,
    WebhookData,
    result_edges,
)

__all__ = [
    "GLOBAL_PREFIX",
    "MAX_KEY_REPROMPTS",
    "KnowledgeLookup",
    "PathEngine",
    "PathStep",
    "ToolCaller",
    "UnknownWay",
    "Way",
]

log = logging.getLogger(__name__)

GLOBAL_PREFIX: Final = "global:"
"""A way to a global node is named `global:<node id>`."""
PATH_END: Final = "path_end"
"""The EndCall reason of a call that reached an end node."""
MAX_KEY_REPROMPTS: Final = 2
"""Times a gather node says its text again when its wait for a first key runs out."""
_MAX_PASS_THROUGH: Final = 20
"""Nodes passed through in one arrival at most: a loop of them (a webhook retried on failure that keeps failing, or
a path stored before such loops were refused) ends the call instead of spinning."""
_KEY = re.compile(r"\[DTMF ([0-9*#A-Da-d])\]")
_SPOKEN_DIGITS: Final = {
    **{str(digit): str(digit) for digit in range(10)},
    **{
        word: str(digit)
        for digit, word in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
    },
    "oh": "0",
    "pound": "#",
    "hash": "#",
    "star": "*",
}


class KnowledgeLookup(Protocol):
    """The agent's knowledge bases, searched by a knowledge node (the seam the knowledge-base work implements)."""

    async def search(self, query: str) -> list[str]:
        """Passages answering `query`, best first; empty when nothing fits (pipelines.knowledge.KnowledgeUnavailable
        when the search could not be made)."""
        ...


class ToolCaller(Protocol):
    """Runs one of the agent's Tool functions (pipelines.tools.ToolRunner); failures come back as 'error: ...'."""

    async def run(self, name: str, arguments: Mapping[str, object]) -> str:
        """Call `name` with `arguments`; the reply as text."""
        ...


class UnknownWay(LookupError):
    """The model named a way that does not leave the current node; `ways` lists those that do."""

    def __init__(self, given: str, ways: Sequence[str]) -> None:
        self.given, self.ways = given, list(ways)
        super().__init__(f"there is no way {given!r} from here; choose one of: {', '.join(ways) or '(none)'}")


@dataclass(frozen=True, slots=True)
class Way:
    """A way out of the current node, as a model or the keyword chooser sees it."""

    key: str
    """The edge id, or `global:<node id>`."""
    target: str
    description: str
    keywords: tuple[str, ...]
    digit: str | None = None


@dataclass(frozen=True, slots=True)
class PathStep:
    """One node the call arrived at, and the edge (or global way) it came by (None at the start)."""

    node_id: str
    edge_id: str | None


@dataclass(slots=True)
class _Gathering:
    digits: str = ""
    reprompts: int = 0
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class PathCheckpoint:
    """Where a call was on its path (PathEngine.checkpoint), to go back to when a reply is thrown away."""

    current: str
    steps: int
    variables: dict[str, str]
    passages: list[str]
    digits: str
    turns_read: int
    key_reprompts: int = 0
    came_from: str | None = None


@dataclass(slots=True)
class PathEngine:
    """Where one call is on its path; every move and arrival goes through here."""

    path: Path
    tools: ToolCaller | None = None
    knowledge: KnowledgeLookup | None = None
    variables: dict[str, str] = field(default_factory=dict)
    """What the path gathered: keys, the model's extracted variables, webhook replies."""
    call_variables: Mapping[str, Any] = field(default_factory=dict)
    """The call's own variables (as the agent's prompt has them): a node's `{{…}}` finds them where the path has
    gathered nothing of that name (`fill`)."""
    steps: list[PathStep] = field(default_factory=list)
    """The trace: every node arrived at, with the edge taken to it."""
    passages: list[str] = field(default_factory=list)
    """What the knowledge lookup found at the current (knowledge) node."""
    on_step: Callable[[PathStep], None] | None = field(default=None, repr=False, compare=False)
    """Told of every step as the call arrives at its node (the call's trace, for its live events)."""
    _current: str = ""
    _gathering: _Gathering = field(default_factory=_Gathering)
    _turns_read: int = 0
    _came_from: str | None = None  # where the arrival at the current transfer node left from (None: the start)

    def __post_init__(self) -> None:
        self._current = self.path.start

    @property
    def started(self) -> bool:
        """Whether the call has arrived at the start node yet."""
        return bool(self.steps)

    @property
    def node(self) -> Node:
        """The node the call is at."""
        return self.path.nodes[self._current]

    @property
    def last_edge(self) -> str | None:
        """The edge (or global way) that led to the current node; None at the start."""
        return self.steps[-1].edge_id if self.steps else None

    @property
    def ended(self) -> bool:
        """Whether the call's path is over (an end or transfer node was reached)."""
        return self.started and (self.node.ends_call or isinstance(self.node.data, TransferData))

    def ways(self) -> list[Way]:
        """The ways out of the current node: its edges, then every global node but the one the call is at."""
        ways = [
            Way(edge.id, edge.target, edge.description, edge.keywords, edge.digit)
            for edge in self.path.outgoing(self._current)
        ]
        for node in self.path.global_nodes():
            if node.id != self._current and isinstance(node.data, GlobalData):
                data = node.data
                ways.append(Way(GLOBAL_PREFIX + node.id, node.id, data.condition, tuple(data.keywords)))
        return ways

    def fill(self, text: str) -> str:
        """`text` of a node (what it says, its instructions) with its `{{…}}` filled as the agent's prompt and first
        sentence are (pipelines.llm.prompt.render_prompt): from what the path gathered, else the call's variables;
        a name neither has says nothing. One pass: a value holding `{{x}}` (a caller's words) is said as it is."""
        # What the path gathered under a built-in's name (refused on saving, a path stored before) never hides it.
        return render_prompt(text, {**self.call_variables, **without_hidden(self.variables)}).text

    def checkpoint(self) -> PathCheckpoint:
        """The call's place now: node, trace length, variables, passages, digits gathered, caller turns read."""
        return PathCheckpoint(
            self._current,
            len(self.steps),
            dict(self.variables),
            list(self.passages),
            self._gathering.digits,
            self._turns_read,
            self._gathering.reprompts,
            self._came_from,
        )

    def rewind(self, checkpoint: PathCheckpoint) -> None:
        """Go back to `checkpoint`: a reply the caller never heard (a discarded speculation) did not move the call."""
        self._current = checkpoint.current
        del self.steps[checkpoint.steps :]
        self.variables = dict(checkpoint.variables)
        self.passages = list(checkpoint.passages)
        self._gathering = _Gathering(checkpoint.digits, checkpoint.key_reprompts)
        self._turns_read = checkpoint.turns_read
        self._came_from = checkpoint.came_from

    async def begin(self, heard: str = "") -> list[LLMEvent]:
        """Arrive at the start node: the events of saying (or doing) what it says."""
        return await self._arrive(self.path.start, None, heard)

    async def move(self, way: str, *, heard: str = "", variables: Mapping[str, object] | None = None) -> list[LLMEvent]:
        """Take `way` (UnknownWay if it does not leave here), keep `variables`, and arrive where it leads."""
        chosen = next((candidate for candidate in self.ways() if candidate.key == way), None)
        if chosen is None:
            raise UnknownWay(way, [candidate.key for candidate in self.ways()])
        self.remember(variables or {})
        return await self._arrive(chosen.target, chosen.key, heard)

    def transfer_not_made(self) -> bool:
        """The call's transfer was not made (its rules, Twilio or the credits refused it); whether the path goes on.

        At a transfer node, the call goes back to the node it came from (a step of the trace without an edge) and
        the conversation goes on there; a path that began with its transfer has no such node and is over (False).
        Anywhere else (a model's own `transfer_call` failed) nothing moves.
        """
        if not self.started or not isinstance(self.node.data, TransferData):
            return True
        if self._came_from is None:
            return False
        self._enter(self._came_from, None)
        return True

    def remember(self, variables: Mapping[str, object]) -> None:
        """Keep, as text, the variables the current node asks for (`extractVariables`); other names are ignored."""
        asked = {spec.name for spec in self.node.data.extract_variables}
        for name, value in variables.items():
            if name in asked and value is not None and str(value).strip():
                self.variables[name] = str(value).strip()

    def unread_caller_text(self, conversation: Sequence[ConversationTurn]) -> str:
        """The caller's turns the path has not read yet, joined: keys pressed in quick succession are turns whose
        replies were cancelled before they ran, yet every key counts."""
        start = self._turns_read if self._turns_read <= len(conversation) else 0
        self._turns_read = len(conversation)
        return " ".join(turn.text for turn in conversation[start:] if turn.role == "caller")

    @property
    def key_timeout(self) -> float | None:
        """Seconds the current gather node waits for the caller's next key; None elsewhere, and once the node has
        said its text again `MAX_KEY_REPROMPTS` times with no key pressed."""
        data = self.node.data
        if not self.started or not isinstance(data, GatherData):
            return None
        gathering = self._gathering
        if not gathering.digits and gathering.reprompts >= MAX_KEY_REPROMPTS:
            return None
        return data.timeout_seconds

    @property
    def keys_timed_out(self) -> bool:
        """Whether the gather node's wait for a key ran out, and the next `press` acts on it."""
        return self._gathering.timed_out

    def time_out_keys(self) -> None:
        """The wait for the caller's next key ran out (the call's timer): the next `press` acts on it."""
        if self.key_timeout is not None:
            self._gathering.timed_out = True

    async def press(self, heard: str) -> list[LLMEvent] | None:
        """At a gather node, take the keys in the caller's turn; the arrival's events once the digits are complete.

        None when the turn carried no keys (the model handles it); [] while more digits are awaited. After the
        wait for a key ran out (`time_out_keys`), a turn without keys completes the node with the digits so far, or
        with none has the node's text said again.
        """
        data = self.node.data
        if not isinstance(data, GatherData):
            return None
        keys = _keys(heard)
        timed_out, self._gathering.timed_out = self._gathering.timed_out, False
        if not keys:
            if self._gathering.digits:
                return await self._gathered(data)  # the caller stopped pressing (or spoke): the digits so far
            if timed_out:
                self._gathering.reprompts += 1
                words = self.fill(self.node.text)
                return [TextDelta(words)] if words else []
            return None
        for key in keys:
            if data.terminator is not None and key == data.terminator:
                return await self._gathered(data)
            self._gathering.digits += key
            if data.digit_count is not None and len(self._gathering.digits) >= data.digit_count:
                return await self._gathered(data)
        return []

    async def _gathered(self, data: GatherData) -> list[LLMEvent]:
        self.variables[data.variable] = self._gathering.digits
        self._gathering = _Gathering()
        edges = self.path.outgoing(self._current)
        if not edges:
            return []
        return await self._arrive(edges[0].target, edges[0].id, "")

    async def _arrive(self, node_id: str, edge_id: str | None, heard: str) -> list[LLMEvent]:
        events: list[LLMEvent] = []
        came_from = self._current if self.started else None
        for _ in range(_MAX_PASS_THROUGH):
            self._enter(node_id, edge_id)
            node = self.node
            data = node.data
            # A prompt's text is offline-only; a line whose every word is a variable without a value says nothing.
            if not isinstance(data, KnowledgeData | PromptData) and (words := self.fill(node.text)):
                events.append(TextDelta(words))
            if isinstance(data, EndData) or node.ends_call:
                events.append(EndCall(PATH_END))
                return events
            if isinstance(data, LegacyData) and node.kind == "output" and not self.path.outgoing(node_id):
                events.append(EndCall(PATH_END))
                return events
            if isinstance(data, TransferData):
                self._came_from = came_from
                events.append(TransferCall(data.number, f"conversation path node {node_id}"))
                return events
            if isinstance(data, KnowledgeData):
                self.passages = await self._passages(heard)
                if not self.passages and (words := self.fill(data.fallback)):
                    events.append(TextDelta(words))
                return events
            if isinstance(data, PressDigitsData):
                events.append(SendDtmf(data.digits))
                following = self.path.outgoing(node_id)
            elif isinstance(data, WebhookData):
                following = await self._call_webhook(data, node_id)
            elif node.passes_through:
                following = self.path.outgoing(node_id)  # a global node with nothing to say only routes
            else:
                return events  # speak, prompt, wait, gather, global: the caller's answer moves on
            if not following:
                return events
            node_id, edge_id = following[0].target, following[0].id
        reason = (
            f"the conversation path went through {_MAX_PASS_THROUGH} nodes without stopping for the caller, "
            f"round a loop at node {self._current!r}"
        )
        log.warning("%s: the call is ended", reason)
        events.append(EndCall(reason))
        return events

    async def _passages(self, heard: str) -> list[str]:
        """The knowledge base's passages for what the caller said; none when it could not be searched (the node
        says its fallback, as when nothing matched)."""
        if self.knowledge is None or not heard:
            return []
        try:
            return await self.knowledge.search(heard)
        except KnowledgeUnavailable:
            return []

    def _enter(self, node_id: str, edge_id: str | None) -> None:
        """The call is at `node_id` now, come by `edge_id`: a step of the trace (told to `on_step`)."""
        self._current = node_id
        step = PathStep(node_id, edge_id)
        self.steps.append(step)
        self.passages = []
        self._gathering = _Gathering()
        if self.on_step is not None:
            self.on_step(step)

    async def _call_webhook(self, data: WebhookData, node_id: str) -> list[Edge]:
        if self.tools is None:
            reply = f"error: the agent has no tool function {data.tool!r}"
        else:
            reply = await self.tools.run(data.tool, dict(self.variables))
        if data.variable is not None:
            self.variables[data.variable] = reply
        result = "failure" if reply.startswith("error:") else "success"
        return result_edges(self.path.outgoing(node_id), result)


def _keys(heard: str) -> str:
    """The keypad keys in a caller turn: `[DTMF 5]` markers, or digits spoken or typed one by one."""
    pressed = "".join(match.upper() for match in _KEY.findall(heard))
    if pressed:
        return pressed
    words = re.sub(r"[^a-z0-9*#]+", " ", heard.lower()).split()
    if words and all(word in _SPOKEN_DIGITS or word.isdigit() for word in words):
        return "".join(_SPOKEN_DIGITS.get(word, word) for word in words)
    return ""
