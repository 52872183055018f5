"""Full-text search over knowledge-base passages, ranked inside PostgreSQL.

A question is read in each knowledge base's own text-search language: its words become lexemes (stop words
dropped, stems taken), any of which may match (an OR query, since a caller's question rarely repeats a passage's
every word). Each lexeme is weighed by its rarity among the knowledge bases' passages ("KnowledgeBaseTerm", an
inverse document frequency), lexemes most passages hold are left out (unless nothing rarer was asked), and a
passage ranks by the summed weight of the lexemes it holds, then by cover density (ts_rank_cd: closer together
ranks higher). The GIN index on "searchVector" finds the candidates.

Where passages also have embeddings (storage.knowledge_embeddings), `fuse_rankings` merges the full-text ranking
with the vector one by reciprocal rank fusion: the one place the two are combined.
"""

from __future__ import annotations

from collections.abc import Sequence

from storage.records import Queryable, Record


class Passage(Record):
    """A ranked passage: where it comes from (knowledge base, document, chunk) and its text."""

    chunk_id: str
    document_id: str
    document_name: str
    knowledge_base_id: str
    position: int
    content: str
    rank: float


PASSAGE_COLUMNS = (
    'c."id" AS "chunkId", c."documentId", d."name" AS "documentName", c."knowledgeBaseId", c."position", c."content"'
)
"""The columns a `Passage` is read from, for queries over "KnowledgeBaseChunk" c joined to its document d."""

RRF_K = 60
"""Reciprocal rank fusion's constant: a passage ranked r-th in a list adds 1 / (RRF_K + r) to its score."""

_SEARCH = f"""
WITH kbs AS (
    SELECT "id", "language" FROM "KnowledgeBase" WHERE "organizationId" = $1 AND "id" = ANY($3::text[])
), total AS (
    SELECT count(*)::float8 AS n FROM "KnowledgeBaseChunk"
    WHERE "organizationId" = $1 AND "knowledgeBaseId" = ANY($3::text[])
), asked AS (
    SELECT DISTINCT kbs."language", lexeme
    FROM kbs, unnest(tsvector_to_array(to_tsvector(kbs."language"::regconfig, $2))) AS lexeme
), weighed AS (
    -- Each word of the question that some passage holds, weighed by its rarity (inverse document frequency).
    SELECT a."language", a.lexeme, sum(t."chunkCount")::float8 AS df,
           ln((total.n + 1) / (sum(t."chunkCount") + 0.5)) AS idf,
           ('''' || replace(replace(a.lexeme, '''', ''), '\\', '') || '''')::tsquery AS query
    FROM asked a
    JOIN "KnowledgeBaseTerm" t
        ON t."lexeme" = a.lexeme AND t."organizationId" = $1 AND t."knowledgeBaseId" = ANY($3::text[])
    CROSS JOIN total
    GROUP BY a."language", a.lexeme, total.n
), chosen AS (
    -- Words most passages hold say little: left out, unless the knowledge base is small or nothing rarer is asked.
    SELECT w.* FROM weighed w, total
    WHERE total.n < 20 OR w.df <= total.n / 2 OR NOT EXISTS (SELECT 1 FROM weighed r WHERE r.df <= total.n / 2)
), queries AS (
    SELECT "language", string_agg(query::text, ' | ')::tsquery AS query FROM chosen GROUP BY "language"
), ranked AS (
    SELECT c."id", scored.score, ts_rank_cd(c."searchVector", q.query) AS cover
    FROM queries q
    JOIN "KnowledgeBaseChunk" c ON c."language" = q."language" AND c."searchVector" @@ q.query
    CROSS JOIN LATERAL (
        SELECT sum(w.idf) AS score FROM chosen w WHERE w."language" = c."language" AND c."searchVector" @@ w.query
    ) scored
    WHERE c."organizationId" = $1 AND c."knowledgeBaseId" = ANY($3::text[])
    ORDER BY scored.score DESC, cover DESC, c."documentId", c."position"
    LIMIT $4
)
SELECT {PASSAGE_COLUMNS}, r.score AS "rank"
FROM ranked r
JOIN "KnowledgeBaseChunk" c ON c."id" = r."id"
JOIN "KnowledgeBaseDocument" d ON d."id" = c."documentId" AND d."organizationId" = c."organizationId"
ORDER BY r.score DESC, r.cover DESC, c."documentId", c."position"
"""


async def search_passages(
    db: Queryable, *, organization_id: str, knowledge_base_ids: Sequence[str], query: str, limit: int
) -> list[Passage]:
    """The organization's passages in `knowledge_base_ids` that best match `query`, best first (at most `limit`).

    A document being re-ingested keeps its passages until the new ones replace them; a query of stop words
    alone, or no knowledge base, finds nothing.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if not knowledge_base_ids or not query.strip():
        return []
    rows = await db.fetch(_SEARCH, organization_id, query, list(knowledge_base_ids), limit)
    return Passage.from_rows(rows)


def fuse_rankings(rankings: Sequence[Sequence[Passage]], *, limit: int) -> list[Passage]:
    """Passages of several rankings (full-text, vector) in one order, by reciprocal rank fusion; at most `limit`.

    A passage scores the sum of 1 / (RRF_K + rank) over the rankings that hold it (rank 1 = first), so one
    near the top of both beats one first in a single ranking; `rank` becomes that score. Ties keep the order of
    the first ranking that holds them.
    """
    scores: dict[str, float] = {}
    first_seen: dict[str, Passage] = {}
    for ranking in rankings:
        for position, passage in enumerate(ranking, start=1):
            scores[passage.chunk_id] = scores.get(passage.chunk_id, 0.0) + 1.0 / (RRF_K + position)
            first_seen.setdefault(passage.chunk_id, passage)
    order = sorted(first_seen, key=lambda chunk_id: -scores[chunk_id])  # stable: ties keep first-seen order
    return [first_seen[chunk_id].model_copy(update={"rank": scores[chunk_id]}) for chunk_id in order[:limit]]


async def frequent_words(
    db: Queryable, *, organization_id: str, knowledge_base_ids: Sequence[str], limit: int, min_length: int = 4
) -> list[str]:
    """The words the knowledge bases use most (at least `min_length` letters), most frequent first.

    Vocabulary for an offline speech recogniser, so a caller asking about the documents' subjects is understood.
    Reads at most the first 500 passages of each knowledge base.
    """
    if not knowledge_base_ids:
        return []
    rows = await db.fetch(
        """
        WITH sample AS (
            SELECT c."content" FROM unnest($2::text[]) AS kb(id)
            CROSS JOIN LATERAL (
                SELECT "content" FROM "KnowledgeBaseChunk"
                WHERE "organizationId" = $1 AND "knowledgeBaseId" = kb.id
                ORDER BY "documentId", "position" LIMIT 500
            ) c
        )
        SELECT word FROM sample, regexp_split_to_table(lower(sample."content"), '[^[:alpha:]]+') AS word
        WHERE length(word) >= $4
        GROUP BY word ORDER BY count(*) DESC, word
        LIMIT $3
        """,
        organization_id,
        list(knowledge_base_ids),
        limit,
        min_length,
    )
    return [row["word"] for row in rows]
