"""Passage embeddings for vector search: whether the database can hold them, which passages still need one, and
the passages nearest a question's embedding.

Migration 0021 adds "KnowledgeBaseChunk"."embedding" (a pgvector `vector`) only where the server has pgvector;
`vector_search_available` tells whether it did. Each embedding is stored with the model that made it
("embeddingModel", an `EmbeddingModel.key`), so passages embedded by another model are embedded again and never
compared with a question embedded by this one. A passage the model refuses (`record_refusals`) records its
`refused_key` instead: this model never claims it again, another model tries it afresh. Why the last round of a
model failed is kept for every engine to tell (`record_embedding_failure`, migration 0036) until one makes vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from storage.knowledge_ingestion import MAX_ERROR_CHARS
from storage.knowledge_search import PASSAGE_COLUMNS, Passage
from storage.records import Connection, Queryable


@dataclass(frozen=True, slots=True)
class EmbeddingModel:
    """An embedding model and the length of its vectors; `key` is what passages record as "embeddingModel"."""

    name: str
    dimensions: int

    @property
    def key(self) -> str:
        """'<name>/<dimensions>': one key per vector space (a model's shortened vectors are another space)."""
        return f"{self.name}/{self.dimensions}"

    @property
    def refused_key(self) -> str:
        """What a passage this model refused records as "embeddingModel", so it is not claimed again for it."""
        return f"refused:{self.key}"


@dataclass(frozen=True, slots=True)
class PendingPassage:
    """A passage to embed: its id and text."""

    chunk_id: str
    content: str


async def vector_search_available(db: Queryable) -> bool:
    """Whether passages have an embedding column (the server had pgvector when migration 0021 ran)."""
    found = await db.fetchval(
        """
        SELECT EXISTS (
            SELECT 1 FROM pg_attribute
            WHERE attrelid = '"KnowledgeBaseChunk"'::regclass AND attname = 'embedding' AND NOT attisdropped
        )
        """
    )
    return bool(found)


_WAITING = """("embeddingModel" IS NULL OR "embeddingModel" < $1 OR "embeddingModel" > $1)
    AND "embeddingModel" IS DISTINCT FROM $2"""
"""A passage still to embed by the model whose key is $1 and refused key $2. `< OR > OR IS NULL` rather than
IS DISTINCT FROM, so the "embeddingModel" index finds them."""

_CLAIM_WINDOW = 16
"""How many batches' worth of the oldest waiting passages a claim looks through for ones no other process holds."""


async def claim_pending(conn: Connection, *, model: EmbeddingModel, limit: int) -> list[PendingPassage]:
    """In the caller's transaction: up to `limit` passages not yet embedded (nor refused) by `model`, oldest first,
    each held by a transaction advisory lock until the transaction ends.

    Passages another process holds are left to it. Advisory locks rather than row locks: a row lock held while the
    passages' request runs made deleting or reingesting their document (and every change to its knowledge base,
    whose lock that takes first) wait for the embedding API's answer; a passage deleted meanwhile is simply not
    stored (`store_embeddings`).
    """
    # The lock is taken as rows are read, in the materialized CTE's order: only as many as the claim uses.
    locked = await conn.fetch(
        f"""
        WITH oldest AS MATERIALIZED (
            SELECT "id" FROM "KnowledgeBaseChunk" WHERE {_WAITING} ORDER BY "createdAt", "id" LIMIT $3 * {_CLAIM_WINDOW}
        )
        SELECT "id" FROM oldest WHERE pg_try_advisory_xact_lock(hashtext('dialtone.embedding:' || "id")) LIMIT $3
        """,
        model.key,
        model.refused_key,
        limit,
    )
    if not locked:
        return []
    # Then, in a statement whose snapshot follows the locks (READ COMMITTED), those still waiting: another process
    # may have embedded some between the first statement's snapshot and its lock.
    rows = await conn.fetch(
        f"""
        SELECT "id", "content" FROM "KnowledgeBaseChunk"
        WHERE "id" = ANY($3::text[]) AND {_WAITING}
        ORDER BY "createdAt", "id"
        """,
        model.key,
        model.refused_key,
        [row["id"] for row in locked],
    )
    return [PendingPassage(row["id"], row["content"]) for row in rows]


@dataclass(frozen=True, slots=True)
class EmbeddingProgress:
    """How many of a document's (or a knowledge base's) passages there are, and how many still wait for an
    embedding by the model (those it refused are not waiting: they are found by full-text only)."""

    passages: int
    waiting: int


async def embedding_progress(
    db: Queryable,
    *,
    organization_id: str,
    model: EmbeddingModel,
    by: Literal["documentId", "knowledgeBaseId"],
    ids: Sequence[str],
) -> dict[str, EmbeddingProgress]:
    """The organization's documents or knowledge bases (`by`) among `ids` that have passages, each with its
    progress towards an embedding of every passage by `model`."""
    rows = await db.fetch(
        f"""
        SELECT "{by}" AS "id", count(*)::int AS "passages", count(*) FILTER (WHERE {_WAITING})::int AS "waiting"
        FROM "KnowledgeBaseChunk"
        WHERE "{by}" = ANY($3::text[]) AND "organizationId" = $4
        GROUP BY "{by}"
        """,
        model.key,
        model.refused_key,
        list(ids),
        organization_id,
    )
    return {row["id"]: EmbeddingProgress(row["passages"], row["waiting"]) for row in rows}


async def record_embedding_failure(db: Queryable, *, model: EmbeddingModel, reason: str) -> None:
    """Record why a round embedding passages by `model` failed (migration 0036), for every engine to tell."""
    await db.execute(
        """
        INSERT INTO "KnowledgeEmbeddingFailure" ("model", "reason") VALUES ($1, left($2, $3))
        ON CONFLICT ("model") DO UPDATE SET "reason" = EXCLUDED."reason", "failedAt" = EXCLUDED."failedAt"
        """,
        model.key,
        reason,
        MAX_ERROR_CHARS,
    )


async def clear_embedding_failure(db: Queryable, *, model: EmbeddingModel) -> None:
    """Forget why embedding by `model` failed: a round has made vectors since."""
    await db.execute('DELETE FROM "KnowledgeEmbeddingFailure" WHERE "model" = $1', model.key)


async def embedding_failure(db: Queryable, *, model: EmbeddingModel) -> str | None:
    """Why the last round embedding passages by `model` failed, whichever engine ran it; None when a round has made
    vectors since (or none failed)."""
    reason: str | None = await db.fetchval(
        'SELECT "reason" FROM "KnowledgeEmbeddingFailure" WHERE "model" = $1', model.key
    )
    return reason


async def store_embeddings(
    conn: Connection, *, model: EmbeddingModel, chunk_ids: Sequence[str], vectors: Sequence[Sequence[float]]
) -> int:
    """Record each passage's embedding (by `model`), in order of `chunk_ids`; how many passages were still there
    to take theirs (a passage deleted meanwhile, with its document, is passed over)."""
    if len(chunk_ids) != len(vectors):
        raise ValueError(f"{len(chunk_ids)} passages but {len(vectors)} embeddings")
    wrong = [len(vector) for vector in vectors if len(vector) != model.dimensions]
    if wrong:
        raise ValueError(f"{model.name} gave vectors of {wrong[0]} dimensions, expected {model.dimensions}")
    stored: int = await conn.fetchval(
        """
        WITH stored AS (
            UPDATE "KnowledgeBaseChunk" c SET "embedding" = e.vector::vector, "embeddingModel" = $3
            FROM unnest($1::text[], $2::text[]) AS e(id, vector)
            WHERE c."id" = e.id
            RETURNING 1
        )
        SELECT count(*) FROM stored
        """,
        list(chunk_ids),
        [vector_literal(vector) for vector in vectors],
        model.key,
    )
    return stored


async def record_refusals(conn: Connection, *, model: EmbeddingModel, refusals: Mapping[str, str]) -> None:
    """Set aside the passages `model` refused (chunk id to the reason), each named in its document's error.

    Their document stays READY: they are still found by full-text search, and re-ingesting it tries them again.
    """
    for chunk_id, reason in refusals.items():
        await conn.execute(
            """
            WITH refused AS (
                UPDATE "KnowledgeBaseChunk" SET "embeddingModel" = $2 WHERE "id" = $1
                RETURNING "documentId", "organizationId", "position"
            )
            UPDATE "KnowledgeBaseDocument" d SET "error" = left(
                concat_ws('; ', d."error", format('passage %s is found by full-text search only: %s',
                                                  r."position" + 1, $3::text)),
                $4
            )
            FROM refused r WHERE d."id" = r."documentId" AND d."organizationId" = r."organizationId"
            """,
            chunk_id,
            model.refused_key,
            reason,
            MAX_ERROR_CHARS,
        )


async def nearest_passages(
    db: Queryable,
    *,
    organization_id: str,
    knowledge_base_ids: Sequence[str],
    model: EmbeddingModel,
    embedding: Sequence[float],
    limit: int,
) -> list[Passage]:
    """The organization's passages in `knowledge_base_ids` nearest `embedding` (cosine), nearest first.

    Only passages embedded by `model` are compared; `rank` is the cosine similarity.
    """
    if not knowledge_base_ids:
        return []
    rows = await db.fetch(
        f"""
        SELECT {PASSAGE_COLUMNS}, 1 - (c."embedding" <=> $4::real[]::vector) AS "rank"
        FROM "KnowledgeBaseChunk" c
        JOIN "KnowledgeBaseDocument" d ON d."id" = c."documentId" AND d."organizationId" = c."organizationId"
        WHERE c."organizationId" = $1 AND c."knowledgeBaseId" = ANY($2::text[]) AND c."embeddingModel" = $3
        ORDER BY c."embedding" <=> $4::real[]::vector, c."documentId", c."position"
        LIMIT $5
        """,
        organization_id,
        list(knowledge_base_ids),
        model.key,
        list(embedding),  # a float4[] in asyncpg's binary format: no text to print and parse
        limit,
    )
    return Passage.from_rows(rows)


def vector_literal(vector: Sequence[float]) -> str:
    """A vector in pgvector's text form, '[0.1,0.2,...]' (sent as text and cast, so asyncpg needs no codec)."""
    return "[" + ",".join(map(str, vector)) + "]"
