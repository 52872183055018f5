"""What a call's model knows of its agent's knowledge bases: the `search_knowledge_base` function, and an answer
the offline model can speak from the best passage.

The passages come from a `KnowledgeSource` the engine provides (engine/knowledge/lookup.py searches PostgreSQL);
this module stays free of storage, so any source with `search` serves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

from pipelines.tools import TOOL_ERROR_PREFIX, FunctionSpec

SEARCH_KNOWLEDGE_BASE: Final = "search_knowledge_base"
NO_PASSAGES: Final = "No passage of the knowledge base matches that question."
"""The function's result when nothing matched: the model should say it does not know rather than guess."""

SEARCH_UNAVAILABLE: Final = (
    f"{TOOL_ERROR_PREFIX}the knowledge base cannot be searched right now. Do not tell the caller the information does "
    "not exist: say you cannot look it up at the moment."
)
"""The function's result when the search could not be made (its database unreachable or too slow): unlike
NO_PASSAGES, the answer may well be there."""

SEARCH_SPEC: Final = FunctionSpec(
    SEARCH_KNOWLEDGE_BASE,
    "Look up facts (prices, hours, policies, products) in the documents your organization gave you. Use it "
    "whenever the caller asks something those documents may answer, and answer from the passages it returns.",
    {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "What to look for, in a few words."}},
        "required": ["query"],
    },
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[^\W_]+")
_SHORT_WORDS: Final = 2
_MAX_ANSWER_CHARS: Final = 300


class KnowledgeUnavailable(Exception):
    """The knowledge base could not be searched now (not the same as nothing matching)."""


class KnowledgeSource(Protocol):
    """Passages relevant to a question, best first (the shape pipelines.paths' KnowledgeLookup expects)."""

    async def search(self, query: str) -> list[str]:
        """The passages that best match `query`, best first; empty when none does. KnowledgeUnavailable when the
        search could not be made."""
        ...


class KnowledgeFunction:
    """`search_knowledge_base` for a model: the spec it is offered, and the passages it gets back as text."""

    spec: Final = SEARCH_SPEC

    def __init__(self, source: KnowledgeSource) -> None:
        """Answer from `source`."""
        self._source = source

    async def run(self, arguments: Mapping[str, Any]) -> str:
        """The numbered passages matching the call's `query`, or NO_PASSAGES (or an error the model can act on:
        SEARCH_UNAVAILABLE when the search could not be made)."""
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            return "error: search_knowledge_base needs a `query`"
        try:
            return format_passages(await self._source.search(query))
        except KnowledgeUnavailable:
            return SEARCH_UNAVAILABLE


def format_passages(passages: Sequence[str]) -> str:
    """Passages as the model reads them: numbered, one per paragraph; NO_PASSAGES for none."""
    if not passages:
        return NO_PASSAGES
    return "\n\n".join(f"[{number}] {passage}" for number, passage in enumerate(passages, start=1))


def _words(text: str) -> set[str]:
    return {word for word in _WORD.findall(text.lower()) if len(word) > _SHORT_WORDS}


def answer_from_passage(question: str, passage: str, *, sentences: int = 2) -> str | None:
    """The sentence(s) of `passage` sharing most words with `question`, in the passage's order; None if none does.

    Up to `sentences` sentences (a later one only if it matches at least half as well), shortened to about
    300 characters: something a voice agent can say.
    """
    asked = _words(question)
    candidates = [part.strip() for part in _SENTENCE_END.split(passage) if part.strip()]
    scored = [(len(asked & _words(sentence)), -index, index) for index, sentence in enumerate(candidates)]
    ranked = sorted((entry for entry in scored if entry[0] > 0), reverse=True)
    if not ranked:
        return None
    # A second sentence only when it holds at least half as much of the question as the best one.
    best = [entry for entry in ranked[:sentences] if entry[0] * 2 >= ranked[0][0]]
    chosen = sorted(index for _, _, index in best)
    answer = " ".join(candidates[index] for index in chosen)
    if len(answer) > _MAX_ANSWER_CHARS:
        answer = candidates[best[0][2]][:_MAX_ANSWER_CHARS].rsplit(" ", 1)[0]
    return answer


class PassageAnswerer:
    """For the offline model: an answer to a caller's question from the best passage of a source, if any."""

    def __init__(self, source: KnowledgeSource) -> None:
        """Answer from `source`."""
        self._source = source

    async def __call__(self, question: str) -> str | None:
        """A sentence or two of the best passage that shares words with `question`; None when nothing fits (or the
        search could not be made)."""
        try:
            passages = await self._source.search(question)
        except KnowledgeUnavailable:
            return None
        for passage in passages:
            answer = answer_from_passage(question, passage)
            if answer is not None:
                return answer
        return None
