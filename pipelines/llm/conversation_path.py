"""The offline language model: walk an agent's ConversationPath, routing each caller turn by keywords.

The path is the react-flow JSON the flow builder saved. Nodes say their text; an edge is taken when the caller's
words hit one of its keywords (or its DTMF digit). Matching is deliberately forgiving of speech recognition: words
are lowercased, stemmed, number words become digits, and long words match near-misses ("appoint meant").
"""

from __future__ import annotations

import difflib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from config.agent import ConversationPathLLMConfig
from pipelines.llm.base import ConversationTurn, EndCall, LLMError, LLMEvent, TextDelta

__all__ = [
    "DEFAULT_MAX_MISSES",
    "NO_MATCH_GOODBYE",
    "REPROMPT_PREFIX",
    "ConversationPathLLM",
    "InvalidConversationPath",
    "PathEdge",
    "PathGraph",
    "PathNode",
    "normalize_words",
]

DEFAULT_MAX_MISSES: Final = 3
"""Consecutive caller turns that match no edge before the runner gives up on re-prompting."""
REPROMPT_PREFIX: Final = "Sorry, I didn't catch that. "
"""Said before the current node's text when the caller's words matched no edge."""
NO_MATCH_GOODBYE: Final = "I'm sorry, I still couldn't understand. Thank you for calling. Goodbye!"
"""Said before the call ends because the caller's words kept matching no edge."""

_NUMBER_WORDS: Final = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
}
# Spoken yes/no variants recognisers return; mapped on both sides, so a keyword "yeah" still matches "yeah".
_SYNONYMS: Final = {
    "yeah": "yes",
    "yep": "yes",
    "yup": "yes",
    "yea": "yes",
    "sure": "yes",
    "ok": "yes",
    "okay": "yes",
    "nope": "no",
    "nah": "no",
}
_STOPWORDS: Final = frozenset(
    {
        *("a", "an", "the", "to", "of", "and", "or", "for", "in", "on", "at", "is", "are", "be", "it", "this"),
        *("i", "me", "my", "you", "your", "we", "our", "that", "with", "please", "want", "wants", "would", "like"),
        *("caller", "says", "say", "asks", "ask"),
    }
)
_SYMBOLS: Final = {"#": " pound ", "*": " star "}
_NOT_WORD = re.compile(r"[^a-z0-9]+")
_LABEL_SEPARATORS = re.compile(r"[,;/|]|\bor\b")
_FUZZY_MIN_LENGTH: Final = 5
_FUZZY_RATIO: Final = 0.85
_MAX_JOINED_TOKENS: Final = 3


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


@dataclass(frozen=True, slots=True)
class PathNode:
    """One step of the path: what the agent says there, and whether saying it ends the call."""

    id: str
    text: str
    ends_call: bool


@dataclass(frozen=True, slots=True)
class PathEdge:
    """A way out of a node, taken when the caller says one of its keywords or presses its digit."""

    id: str
    source: str
    target: str
    keywords: tuple[str, ...]
    digit: str | None


# --------------------------------------------------------------------------------------------------- text


def _stem(word: str) -> str:
    # Just enough to make "appointments", "booking" and "opened" meet their keywords; both sides get the same.
    if len(word) <= 3 or word.isdigit():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("sses"):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if word.endswith("ing") and len(word) > 5:
        return word[:-3]
    if word.endswith("ed") and len(word) > 4:
        return word[:-2]
    return word


def normalize_words(text: str) -> list[str]:
    """Lowercase, drop punctuation, turn number words into digits and stem: the words the matcher compares."""
    lowered = text.lower().replace("'", "").replace("\u2019", "")
    for symbol, word in _SYMBOLS.items():
        lowered = lowered.replace(symbol, word)
    words = _NOT_WORD.sub(" ", lowered).split()
    return [_stem(_SYNONYMS.get(word, _NUMBER_WORDS.get(word, word))) for word in words]


def _similar(keyword: str, heard: str) -> bool:
    if keyword == heard:
        return True
    if len(keyword) < _FUZZY_MIN_LENGTH or len(heard) < _FUZZY_MIN_LENGTH:
        return False
    return difflib.SequenceMatcher(None, keyword, heard, autojunk=False).ratio() >= _FUZZY_RATIO


def _phrase_heard(keyword: Sequence[str], heard: Sequence[str]) -> bool:
    """Whether the keyword's words occur in order in what was heard, allowing a long word to be split by ASR."""
    size = len(keyword)
    for start in range(len(heard) - size + 1):
        if all(_similar(word, heard[start + offset]) for offset, word in enumerate(keyword)):
            return True
    joined = "".join(keyword)
    if len(joined) < _FUZZY_MIN_LENGTH:
        return False
    for start in range(len(heard)):
        for count in range(2, _MAX_JOINED_TOKENS + 1):
            if start + count <= len(heard) and _similar(joined, "".join(heard[start : start + count])):
                return True
    return False


# --------------------------------------------------------------------------------------------------- graph


def _data(item: Mapping[str, Any]) -> Mapping[str, Any]:
    data = item.get("data")
    return data if isinstance(data, Mapping) else {}


def _text_of(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _node_text(data: Mapping[str, Any]) -> str:
    for key in ("text", "prompt", "label"):
        text = _text_of(data.get(key))
        if text:
            return text
    return ""


def _edge_keywords(edge: Mapping[str, Any]) -> tuple[str, ...]:
    data = _data(edge)
    keywords = data.get("keywords")
    if isinstance(keywords, str):
        found = [part.strip() for part in keywords.split(",")]
    elif isinstance(keywords, Sequence):
        found = [_text_of(part) for part in keywords]
    else:
        found = []
    found = [keyword for keyword in found if keyword]
    if found:
        return tuple(found)
    # No keywords: the edge's label ("Book / reschedule") stands for them, one keyword per content word.
    label = _text_of(data.get("label")) or _text_of(edge.get("label"))
    words: list[str] = []
    for phrase in _LABEL_SEPARATORS.split(label.lower()):
        for word in _NOT_WORD.sub(" ", phrase).split():
            if word not in _STOPWORDS and word not in words:
                words.append(word)
    return tuple(words)


def _edge_digit(edge: Mapping[str, Any]) -> str | None:
    digit = _data(edge).get("digit")
    if isinstance(digit, int) and not isinstance(digit, bool):
        return str(digit)
    text = _text_of(digit)
    return text or None


def _parse_nodes(raw: Sequence[Any]) -> list[tuple[Mapping[str, Any], str]]:
    nodes: list[tuple[Mapping[str, Any], str]] = []
    for item in raw:
        if isinstance(item, Mapping) and item.get("id") is not None:
            nodes.append((item, str(item["id"])))
    return nodes


def _parse_edges(raw: Sequence[Any], node_ids: set[str]) -> list[PathEdge]:
    edges: list[PathEdge] = []
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping):
            continue
        source, target = str(item.get("source")), str(item.get("target"))
        if source not in node_ids or target not in node_ids:
            continue  # a dangling edge left behind by the flow builder leads nowhere
        edges.append(
            PathEdge(
                id=str(item.get("id", f"edge-{index}")),
                source=source,
                target=target,
                keywords=_edge_keywords(item),
                digit=_edge_digit(item),
            )
        )
    return edges


def _start_node_id(raw_nodes: list[tuple[Mapping[str, Any], str]], edges: list[PathEdge]) -> str:
    for item, node_id in raw_nodes:
        if _data(item).get("isStart"):
            return node_id
    for item, node_id in raw_nodes:
        if item.get("type") == "input":
            return node_id
    targets = {edge.target for edge in edges}
    for _, node_id in raw_nodes:
        if node_id not in targets:
            return node_id
    return raw_nodes[0][1]


# --------------------------------------------------------------------------------------------------- runner


@dataclass(frozen=True, slots=True)
class _CompiledEdge:
    edge: PathEdge
    phrases: tuple[tuple[str, ...], ...]


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
        knowledge: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> None:
        """Build the runner from react-flow `nodes` and `edges`; `fallback_reply` is said after `max_misses`.

        `knowledge` answers, when it can, a caller's words that match no edge (pipelines.knowledge).
        """
        self._knowledge = knowledge
        raw_nodes = _parse_nodes(nodes)
        if not raw_nodes:
            raise InvalidConversationPath(
                "ConversationPath has no nodes: add at least a start node in the flow builder"
            )
        node_ids = {node_id for _, node_id in raw_nodes}
        self._edges = _parse_edges(edges, node_ids)
        sources = {edge.source for edge in self._edges}
        self._nodes: dict[str, PathNode] = {}
        for item, node_id in raw_nodes:
            data = _data(item)
            ends = bool(data.get("endCall")) or (item.get("type") == "output" and node_id not in sources)
            self._nodes.setdefault(node_id, PathNode(id=node_id, text=_node_text(data), ends_call=ends))
        self._outgoing: dict[str, list[_CompiledEdge]] = {node_id: [] for node_id in self._nodes}
        for edge in self._edges:
            phrases = [tuple(normalize_words(keyword)) for keyword in edge.keywords]
            if edge.digit is not None:
                phrases.append(tuple(normalize_words(edge.digit)))
            self._outgoing[edge.source].append(_CompiledEdge(edge, tuple(phrase for phrase in phrases if phrase)))
        self._current = _start_node_id(raw_nodes, self._edges)
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
        knowledge: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> ConversationPathLLM:
        """Build the runner from a stored ConversationPath (or anything with `nodes` and `edges`) and its config."""
        fallback_reply = config.fallback_reply if config is not None else None
        return cls(path.nodes, path.edges, fallback_reply=fallback_reply, max_misses=max_misses, knowledge=knowledge)

    @property
    def current_node_id(self) -> str:
        """The id of the node the call is at."""
        return self._current

    @property
    def current_node(self) -> PathNode:
        """The node the call is at."""
        return self._nodes[self._current]

    def keywords(self) -> list[str]:
        """Every keyword of the path, once each, in path order: vocabulary for the speech recogniser."""
        seen: dict[str, None] = {}
        for edge in self._edges:
            for keyword in edge.keywords:
                seen.setdefault(keyword, None)
        return list(seen)

    def opening(self) -> str | None:
        """The start node's text, which the agent says right after its first sentence; None when it has none."""
        return self._nodes[self._current].text or None

    async def respond(self, conversation: Sequence[ConversationTurn]) -> AsyncIterator[LLMEvent]:
        """Route the caller's last turn along the path and say where it leads, or re-prompt when nothing matched.

        Words that match no edge are first offered to the knowledge lookup; its answer is said, the call staying
        at its node.
        """
        answer = await self._answer_from_knowledge(conversation)
        if answer:
            self._misses = 0
            yield TextDelta(answer)
            return
        for event in self._next_events(conversation):
            yield event

    async def close(self) -> None:
        """Nothing to release: the runner holds no connection."""

    async def _answer_from_knowledge(self, conversation: Sequence[ConversationTurn]) -> str | None:
        heard = _last_caller_text(conversation)
        if self._knowledge is None or heard is None or self.current_node.ends_call:
            return None
        if self._choose_edge(normalize_words(heard)) is not None:
            return None
        return await self._knowledge(heard)

    def _next_events(self, conversation: Sequence[ConversationTurn]) -> list[LLMEvent]:
        # The state moves before anything is yielded, so a reply cut short by barge-in still advanced the path.
        node = self._nodes[self._current]
        if node.ends_call:
            return [EndCall(reason="path_end")]
        heard = _last_caller_text(conversation)
        if heard is None:
            return _say(node.text)
        edge = self._choose_edge(normalize_words(heard))
        if edge is not None:
            self._misses = 0
            self._current = edge.target
            target = self._nodes[edge.target]
            events = _say(target.text)
            return [*events, EndCall(reason="path_end")] if target.ends_call else events
        return self._miss(node)

    def _miss(self, node: PathNode) -> list[LLMEvent]:
        self._misses += 1
        if self._fallback_reply and self._misses == self._max_misses:
            return _say(self._fallback_reply)
        give_up_at = self._max_misses * (2 if self._fallback_reply else 1)
        if self._misses >= give_up_at:
            return [TextDelta(NO_MATCH_GOODBYE), EndCall(reason="no_match")]
        return _say(REPROMPT_PREFIX + node.text if node.text else REPROMPT_PREFIX.strip())

    def _choose_edge(self, heard: list[str]) -> PathEdge | None:
        best: PathEdge | None = None
        best_score = (0, 0)
        for compiled in self._outgoing[self._current]:
            hits = [phrase for phrase in compiled.phrases if _phrase_heard(phrase, heard)]
            score = (len(hits), sum(len("".join(phrase)) for phrase in hits))
            if score > best_score:  # strictly better: on a tie the first edge keeps it
                best, best_score = compiled.edge, score
        return best


def _last_caller_text(conversation: Sequence[ConversationTurn]) -> str | None:
    if conversation and conversation[-1].role == "caller":
        return conversation[-1].text
    return None


def _say(text: str) -> list[LLMEvent]:
    return [TextDelta(text)] if text else []
