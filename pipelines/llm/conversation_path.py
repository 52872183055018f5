"""The offline language model: walk an agent's ConversationPath, routing each caller turn by keywords.

The path engine (pipelines.paths.engine) holds the call's place; this model chooses its moves without a language
model: an edge (or a global node) is taken when the caller's words hit one of its keywords or its DTMF digit
(pipelines.paths.offline), keys pressed at a gather node are collected, and a node says its `text` as written, its
`{{…}}` filled (PathEngine.fill).
A prompt node says its `text` (the line written for offline calls); a knowledge node the best passage found.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, cast

from config.agent import ConversationPathLLMConfig
from pipelines.conversation.opt_out import opt_out_phrase
from pipelines.llm.base import ConversationTurn, EndCall, LLMError, LLMEvent, OptOut, TextDelta
from pipelines.paths.engine import GLOBAL_PREFIX, KnowledgeLookup, PathCheckpoint, PathEngine, ToolCaller, Way
from pipelines.paths.graph import (
    GatherData,
    GlobalData,
    KnowledgeData,
    Node,
    Path,
    PathInvalid,
    PromptData,
    read_path,
)
from pipelines.paths.offline import KeywordChooser, edge_keywords, label_keywords, normalize_words

__all__ = [
    "DEFAULT_MAX_MISSES",
    "MAX_RECOGNIZER_KEYWORDS",
    "NO_MATCH_GOODBYE",
    "REPROMPT_PREFIX",
    "ConversationPathLLM",
    "InvalidConversationPath",
    "PathGraph",
    "normalize_words",
]

DEFAULT_MAX_MISSES: Final = 3
"""Consecutive caller turns that match no edge before the runner gives up on re-prompting."""
REPROMPT_PREFIX: Final = "Sorry, I didn't catch that. "
"""Said before the current node's text when the caller's words matched no edge."""
NO_MATCH_GOODBYE: Final = "I'm sorry, I still couldn't understand. Thank you for calling. Goodbye!"
"""Said before the call ends because the caller's words kept matching no edge."""
MAX_RECOGNIZER_KEYWORDS: Final = 1000
"""The most keywords of a path the speech recogniser is told, the first in path order: PocketSphinx builds its
vocabulary in about 0.3 s for a thousand, 4 s for ten thousand and 30 s, an offline worker's whole deadline, for
fifty thousand, which a path the API accepts can hold."""


class InvalidConversationPath(LLMError):
    """The ConversationPath cannot be run (e.g. it has no nodes)."""


class PathGraph(Protocol):
    """Anything holding react-flow nodes and edges, such as a stored ConversationPath."""

    @property
    def nodes(self) -> Sequence[Any]:
        """The react-flow nodes."""
        ...

    @property
    def edges(self) -> Sequence[Any]:
        """The react-flow edges."""
        ...


def runnable_path(nodes: Sequence[Any], edges: Sequence[Any]) -> Path:
    """The path a call can walk (edges left dangling by the builder dropped); InvalidConversationPath otherwise."""
    try:
        return read_path(nodes, edges, strict=False)
    except PathInvalid as exc:
        if any(problem.field == "nodes" and "no nodes" in problem.message for problem in exc.problems):
            raise InvalidConversationPath(
                "ConversationPath has no nodes: add at least a start node in the flow builder"
            ) from None
        raise InvalidConversationPath(f"ConversationPath cannot be run: {exc}") from None


class ConversationPathLLM:
    """One call's walk along a ConversationPath: say the node's text, follow the edge the caller's words pick."""

    scripted_opening = True
    """respond([]) gives the opening words."""

    def __init__(
        self,
        nodes: Sequence[Any],
        edges: Sequence[Any],
        *,
        fallback_reply: str | None = None,
        max_misses: int = DEFAULT_MAX_MISSES,
        tools: ToolCaller | None = None,
        knowledge: KnowledgeLookup | None = None,
        engine: PathEngine | None = None,
        answer: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> None:
        """Build the runner from react-flow `nodes` and `edges`; `fallback_reply` is said after `max_misses`.

        With `engine` (shared with the call's other models), its path and place are walked instead. `knowledge`
        serves the path's knowledge nodes; `answer` answers, when it can, a caller's words that match no way out
        (pipelines.knowledge.PassageAnswerer), the call staying at its node.
        """
        self._engine = engine or PathEngine(runnable_path(nodes, edges), tools=tools, knowledge=knowledge)
        self._path = self._engine.path
        self._edges = {edge.id: edge for edge in self._path.edges}
        self._choosers: dict[str, tuple[list[tuple[str, tuple[str, ...], str | None]], KeywordChooser]] = {}
        """By node id: its ways out (key, keywords, digit) and their chooser, made once (a branch may be large)."""
        self._answer = answer
        self._fallback_reply = fallback_reply
        self._max_misses = max(1, max_misses)
        self._misses = 0

    @classmethod
    def from_path(
        cls,
        path: PathGraph,
        config: ConversationPathLLMConfig | None = None,
        *,
        max_misses: int = DEFAULT_MAX_MISSES,
        tools: ToolCaller | None = None,
        knowledge: KnowledgeLookup | None = None,
    ) -> ConversationPathLLM:
        """Build the runner from a stored ConversationPath (or anything with `nodes` and `edges`) and its config."""
        fallback_reply = config.fallback_reply if config is not None else None
        return cls(
            path.nodes,
            path.edges,
            fallback_reply=fallback_reply,
            max_misses=max_misses,
            tools=tools,
            knowledge=knowledge,
        )

    @classmethod
    def on_engine(
        cls,
        engine: PathEngine,
        config: ConversationPathLLMConfig | None = None,
        *,
        max_misses: int = DEFAULT_MAX_MISSES,
        answer: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> ConversationPathLLM:
        """The runner walking `engine` (the call's place on its path, which another model may share)."""
        fallback_reply = config.fallback_reply if config is not None else None
        return cls((), (), fallback_reply=fallback_reply, max_misses=max_misses, engine=engine, answer=answer)

    @property
    def engine(self) -> PathEngine:
        """The call's position on the path (and its trace)."""
        return self._engine

    @property
    def current_node_id(self) -> str:
        """The id of the node the call is at."""
        return self._engine.node.id

    def keywords(self) -> list[str]:
        """The path's keywords, once each, in path order: vocabulary for the speech recogniser, the first
        MAX_RECOGNIZER_KEYWORDS of them (the matcher still hears every keyword in the words recognised)."""
        seen: dict[str, None] = {}
        for edge in self._path.edges:
            for keyword in edge_keywords(edge):
                seen.setdefault(keyword, None)
        for node in self._path.global_nodes():
            for keyword in _global_keywords(node):
                seen.setdefault(keyword, None)
        return list(seen)[:MAX_RECOGNIZER_KEYWORDS]

    def opening(self) -> str | None:
        """The start node's text, which the agent says right after its first sentence; None when it has none."""
        return self._engine.fill(self._path.nodes[self._path.start].text) or None

    def checkpoint(self) -> object:
        """Where the path is (the engine's place and the misses counted there), for `rewind`."""
        return (self._engine.checkpoint(), self._misses)

    def rewind(self, checkpoint: object) -> None:
        """Go back to where `checkpoint` was taken: a reply the caller never heard did not move the path."""
        place, misses = cast(tuple[PathCheckpoint, int], checkpoint)
        self._engine.rewind(place)
        self._misses = misses

    async def respond(self, conversation: Sequence[ConversationTurn]) -> AsyncIterator[LLMEvent]:
        """Route the caller's last turn along the path and say where it leads, or re-prompt when nothing matched.

        A callee asking not to be called again opts out, wherever the path is (pipelines.conversation.opt_out).
        Words that match no way out are offered to the knowledge answerer; its answer is said, the call staying at
        its node.
        """
        if (phrase := opt_out_phrase(_last_caller_text(conversation))) is not None:
            yield OptOut(f"the callee said {phrase!r}", phrase=phrase)
            return
        for event in await self._next_events(conversation):
            yield event

    async def close(self) -> None:
        """Nothing to release: the runner holds no connection."""

    async def _next_events(self, conversation: Sequence[ConversationTurn]) -> list[LLMEvent]:
        # The state moves before anything is yielded, so a reply cut short by barge-in still advanced the path.
        engine = self._engine
        heard = _last_caller_text(conversation)
        unread = engine.unread_caller_text(conversation)
        if not engine.started:
            opening = self._spoken(await engine.begin(heard or ""))
            if heard is None or engine.ended:
                return opening
            # The caller spoke before the opening was asked for: they answer the start node, whose words are
            # taken as said (what its arrival does beyond speaking, like touch tones, still happens).
            return [event for event in opening if not isinstance(event, TextDelta)] + await self._route(heard, unread)
        if engine.ended:
            return [EndCall(reason="path_end")]
        if engine.keys_timed_out:  # the gather node's wait for a key ran out: its digits so far, or its text again
            return self._spoken(await engine.press(unread) or [])
        if heard is None:
            return _say(engine.fill(engine.node.text))
        return await self._route(heard, unread)

    async def _route(self, heard: str, unread: str) -> list[LLMEvent]:
        engine = self._engine
        pressed = await engine.press(unread)
        if pressed is not None:
            self._misses = 0
            return self._spoken(pressed)
        way = self._choose(heard)
        if way is not None:
            self._misses = 0
            return self._spoken(await engine.move(way, heard=heard))
        if self._answer is not None and not engine.ended and (answer := await self._answer(heard)):
            self._misses = 0
            return [TextDelta(answer)]
        return self._miss(engine.node)

    def _spoken(self, events: list[LLMEvent]) -> list[LLMEvent]:
        """The arrival's events, with what a model would say there: a knowledge node's passage, a prompt's line."""
        node = self._engine.node
        if isinstance(node.data, KnowledgeData) and self._engine.passages:
            return [*events, TextDelta(self._engine.passages[0])]
        if isinstance(node.data, PromptData) and not any(isinstance(e, TextDelta) for e in events):
            return [*events, *_say(self._engine.fill(node.text))]
        return events

    def _miss(self, node: Node) -> list[LLMEvent]:
        self._misses += 1
        if self._fallback_reply and self._misses == self._max_misses:
            return _say(self._fallback_reply)
        give_up_at = self._max_misses * (2 if self._fallback_reply else 1)
        if self._misses >= give_up_at:
            return [TextDelta(NO_MATCH_GOODBYE), EndCall(reason="no_match")]
        words = self._engine.fill(node.text)
        return _say(REPROMPT_PREFIX + words if words else REPROMPT_PREFIX.strip())

    def _choose(self, heard: str) -> str | None:
        """The way the caller's words pick; else the one way out that asks for nothing (a wait node's edge), but
        not a gather node's: the keys take that one, once they are complete."""
        node_id = self._engine.node.id
        if node_id not in self._choosers:
            keyed = [(way.key, self._keywords_of(way), way.digit) for way in self._engine.ways()]
            self._choosers[node_id] = (keyed, KeywordChooser(keyed))
        keyed, chooser = self._choosers[node_id]
        chosen = chooser.choose(heard)
        if chosen is not None:
            return chosen
        if isinstance(self._engine.node.data, GatherData):
            return None
        open_ways = [key for key, keywords, digit in keyed if not keywords and digit is None]
        return open_ways[0] if len(open_ways) == 1 else None

    def _keywords_of(self, way: Way) -> tuple[str, ...]:
        if way.key.startswith(GLOBAL_PREFIX):
            return _global_keywords(self._path.nodes[way.target])
        return edge_keywords(self._edges[way.key])


def _global_keywords(node: Node) -> tuple[str, ...]:
    data = node.data
    if not isinstance(data, GlobalData):
        return ()
    return tuple(data.keywords) or label_keywords(data.condition)


def _last_caller_text(conversation: Sequence[ConversationTurn]) -> str | None:
    if conversation and conversation[-1].role == "caller":
        return conversation[-1].text
    return None


def _say(text: str) -> list[LLMEvent]:
    return [TextDelta(text)] if text else []
