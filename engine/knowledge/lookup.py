"""One call's knowledge lookup: its agent's knowledge bases searched in PostgreSQL, under the organization's RLS.

`KnowledgeLookup.search` gives passage texts (the shape `pipelines.knowledge.KnowledgeSource` and the path
engine's KnowledgeLookup expect); `passages` gives them with their document and chunk ids. Every search the call
made is kept in `retrievals`, so what an answer came from can be recorded with the call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.server import metrics
from storage import Pool
from storage.errors import TRANSIENT_ERRORS
from storage.knowledge_search import Passage, frequent_words, search_passages
from storage.tenancy import tenant_transaction

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Retrieval:
    """One search of a call: the question, the passages found (best first), and how long it took."""

    query: str
    passages: tuple[Passage, ...]
    duration_ms: float


class KnowledgeLookup:
    """Searches one organization's knowledge bases (those linked to the call's agent)."""

    def __init__(self, pool: Pool, *, organization_id: str, knowledge_base_ids: Sequence[str], limit: int = 3) -> None:
        """Search `knowledge_base_ids` of `organization_id` through `pool`, `limit` passages at most."""
        self._pool = pool
        self._organization_id = organization_id
        self._knowledge_base_ids = list(knowledge_base_ids)
        self._limit = limit
        self.retrievals: list[Retrieval] = []
        """Every search made through this lookup, in order."""
        self._taken = 0

    async def passages(self, query: str) -> list[Passage]:
        """The passages that best match `query`, best first, with where each comes from.

        A database that cannot be reached gives no passages (the call goes on without them), logged.
        """
        began = time.perf_counter()
        try:
            async with tenant_transaction(self._pool, self._organization_id) as conn:
                found = await search_passages(
                    conn,
                    organization_id=self._organization_id,
                    knowledge_base_ids=self._knowledge_base_ids,
                    query=query,
                    limit=self._limit,
                )
        except TRANSIENT_ERRORS as exc:
            log.warning("knowledge search unavailable (%s); the call goes on without it", type(exc).__name__)
            found = []
        elapsed = time.perf_counter() - began
        metrics.KNOWLEDGE_SEARCH_SECONDS.observe(elapsed)
        self.retrievals.append(Retrieval(query, tuple(found), elapsed * 1000))
        return found

    async def vocabulary(self, limit: int = 200) -> list[str]:
        """The words the knowledge bases use most: for an offline recogniser to expect (none if unreachable)."""
        try:
            async with tenant_transaction(self._pool, self._organization_id) as conn:
                return await frequent_words(
                    conn,
                    organization_id=self._organization_id,
                    knowledge_base_ids=self._knowledge_base_ids,
                    limit=limit,
                )
        except TRANSIENT_ERRORS as exc:
            log.warning("knowledge vocabulary unavailable (%s)", type(exc).__name__)
            return []

    def take_sources(self) -> dict[str, Any] | None:
        """The searches made since the last call, as stored with an agent turn; None when there were none.

        `{"retrievals": [{"query", "passages": [{"knowledgeBaseId", "documentId", "chunkId", "rank"}]}]}`
        """
        new = self.retrievals[self._taken :]
        self._taken = len(self.retrievals)
        if not new:
            return None
        return {
            "retrievals": [
                {
                    "query": retrieval.query,
                    "passages": [
                        {
                            "knowledgeBaseId": passage.knowledge_base_id,
                            "documentId": passage.document_id,
                            "chunkId": passage.chunk_id,
                            "rank": round(passage.rank, 4),
                        }
                        for passage in retrieval.passages
                    ],
                }
                for retrieval in new
            ]
        }

    async def search(self, query: str) -> list[str]:
        """The texts of the passages that best match `query`, best first."""
        return [passage.content for passage in await self.passages(query)]
