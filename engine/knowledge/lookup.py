"""One call's knowledge lookup: its agent's knowledge bases searched in PostgreSQL, under the organization's RLS.

`KnowledgeLookup.search` gives passage texts (the shape `pipelines.knowledge.KnowledgeSource` and the path
engine's KnowledgeLookup expect); `passages` gives them with their document and chunk ids. Every search the call
made is kept in `retrievals`, so what an answer came from can be recorded with the call.

With an embedder (vector search on), the question is embedded while its full-text search runs; the passages
nearest its embedding are then fused with the full-text ones (storage.knowledge_search.fuse_rankings). A question
whose embedding does not come in time, or fails, is answered by full-text alone, counted in
dialtone_knowledge_vector_fallbacks_total. A search the database cannot serve (unreachable, or slower than the
lookup's timeout) raises KnowledgeUnavailable, to every caller alike: the call's model is told the knowledge base
cannot be searched now, the API answers 503, and neither takes it for a search that found nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from config.text import storable_text
from engine.knowledge.embeddings import EmbeddingFailed, OpenAIEmbedder
from engine.server import metrics
from pipelines.knowledge import KnowledgeUnavailable
from storage import Pool
from storage.errors import TRANSIENT_ERRORS
from storage.knowledge_embeddings import nearest_passages
from storage.knowledge_search import Passage, frequent_words, fuse_rankings, search_passages
from storage.records import Connection
from storage.tenancy import tenant_read_transaction

log = logging.getLogger(__name__)

SEARCH_TIMEOUT_SECONDS = 2.0
"""The longest a search may take, waiting for a pooled connection included: past it the call goes on without
passages (a database so slow or busy would otherwise hold the caller's reply in silence for as long as it takes)."""
FUSION_CANDIDATES = 10
"""Passages taken from each ranking (full-text, vector) before they are fused (more if the lookup returns more)."""


@dataclass(frozen=True, slots=True)
class Retrieval:
    """One search of a call: the question, the passages found (best first), and how long it took."""

    query: str
    passages: tuple[Passage, ...]
    duration_ms: float


class KnowledgeLookup:
    """Searches one organization's knowledge bases (those linked to the call's agent)."""

    def __init__(
        self,
        pool: Pool,
        *,
        organization_id: str,
        knowledge_base_ids: Sequence[str],
        limit: int = 3,
        embedder: OpenAIEmbedder | None = None,
        timeout_s: float = SEARCH_TIMEOUT_SECONDS,
    ) -> None:
        """Search `knowledge_base_ids` of `organization_id` through `pool`, `limit` passages at most, each search
        within `timeout_s`; by vector too when an `embedder` is given."""
        self._pool = pool
        self._organization_id = organization_id
        self._knowledge_base_ids = list(knowledge_base_ids)
        self._limit = limit
        self._candidates = max(limit, FUSION_CANDIDATES)
        self._embedder = embedder
        self._timeout_s = timeout_s
        self.retrievals: list[Retrieval] = []
        """Every search made through this lookup, in order."""
        self._taken = 0

    async def passages(self, query: str) -> list[Passage]:
        """The passages that best match `query`, best first, with where each comes from; empty when none does.

        KnowledgeUnavailable, logged, when the database cannot be reached or does not answer within the lookup's
        timeout: never an empty answer, which would say that nothing matches.
        """
        found, failure = await self._look_up(query)
        if failure is not None:
            raise KnowledgeUnavailable(failure)
        return found

    async def _look_up(self, query: str) -> tuple[list[Passage], str | None]:
        """The passages that best match `query`, and why the search could not be made (None when it was)."""
        query = storable_text(query)  # a NUL or half an emoji would fail the search, and the reply waiting for it
        began = time.perf_counter()
        question = None
        if self._embedder is not None and query.strip():
            question = asyncio.get_running_loop().create_task(self._embedder.embed_question(query))
        failure = None
        try:
            async with asyncio.timeout(self._timeout_s):
                found = await self._search(query, question)
        except TimeoutError:  # before TRANSIENT_ERRORS, which holds it too
            failure = f"the search took over {self._timeout_s:g} s"
            found = []
        except TRANSIENT_ERRORS as exc:
            failure = f"the database is unavailable ({type(exc).__name__})"
            found = []
        finally:
            if question is not None:
                _discard(question)
        elapsed = time.perf_counter() - began
        metrics.KNOWLEDGE_SEARCH_SECONDS.observe(elapsed)
        self.retrievals.append(Retrieval(query, tuple(found), elapsed * 1000))
        if failure is not None:
            log.warning("knowledge search not made: %s; the call goes on without it", failure)
        return found, failure

    async def _search(self, query: str, question: asyncio.Task[list[float]] | None) -> list[Passage]:
        async with tenant_read_transaction(self._pool, self._organization_id) as conn:
            found = await self._full_text(conn, query, self._limit if question is None else self._candidates)
            # An embedding that came in while the full-text search ran is searched on the same connection: one
            # pooled connection per question instead of two, fewer waits for one when calls are many.
            in_time = question is not None and question.done()
            if question is not None and in_time:
                found = await self._fused(found, question, conn)
        if question is not None and not in_time:
            found = await self._fused(found, question, None)
        return found

    async def _full_text(self, conn: Connection, query: str, limit: int) -> list[Passage]:
        return await search_passages(
            conn,
            organization_id=self._organization_id,
            knowledge_base_ids=self._knowledge_base_ids,
            query=query,
            limit=limit,
        )

    async def _fused(
        self, full_text: list[Passage], question: asyncio.Task[list[float]], conn: Connection | None
    ) -> list[Passage]:
        """The full-text passages fused with those nearest the question's embedding (searched on `conn`, else in a
        transaction of its own); full-text alone without it."""
        assert self._embedder is not None
        try:
            embedding = await question
        except TimeoutError:
            metrics.KNOWLEDGE_VECTOR_FALLBACKS.labels("timeout").inc()
            log.info("knowledge search by full-text alone: the question's embedding timed out")
            return full_text[: self._limit]
        except Exception as exc:  # EmbeddingFailed, or a bug: either way the call keeps its full-text passages
            metrics.KNOWLEDGE_VECTOR_FALLBACKS.labels("error").inc()
            log.log(
                logging.INFO if isinstance(exc, EmbeddingFailed) else logging.ERROR,
                "knowledge search by full-text alone: the question's embedding failed (%s)",
                exc if isinstance(exc, EmbeddingFailed) else type(exc).__name__,
            )
            return full_text[: self._limit]
        if conn is None:
            async with tenant_read_transaction(self._pool, self._organization_id) as own:
                nearest = await self._nearest(own, embedding)
        else:
            nearest = await self._nearest(conn, embedding)
        return fuse_rankings([full_text, nearest], limit=self._limit)

    async def _nearest(self, conn: Connection, embedding: list[float]) -> list[Passage]:
        assert self._embedder is not None
        return await nearest_passages(
            conn,
            organization_id=self._organization_id,
            knowledge_base_ids=self._knowledge_base_ids,
            model=self._embedder.model,
            embedding=embedding,
            limit=self._candidates,
        )

    async def vocabulary(self, limit: int = 200) -> list[str]:
        """The words the knowledge bases use most: for an offline recogniser to expect (none if unreachable)."""
        try:
            async with tenant_read_transaction(self._pool, self._organization_id) as conn:
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
        """The texts of the passages that best match `query`, best first; KnowledgeUnavailable when the search could
        not be made (the model is then told so, not that nothing matched)."""
        return [passage.content for passage in await self.passages(query)]


def _discard(task: asyncio.Task[list[float]]) -> None:
    """Let go of a question's embedding the search no longer waits for: cancelled if still running, its failure
    taken if it has one (so asyncio does not report it as never retrieved)."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()
