-- 0021: vector search over knowledge-base passages, where the server has pgvector (the embedded server and the
-- docker-compose image do). Each passage gains its embedding and the model that made it ("embeddingModel", e.g.
-- 'text-embedding-3-small/1536'): the ingestion worker embeds the passages whose model is not the configured one,
-- so a change of model re-embeds everything in the background. On a server without pgvector (or without the right
-- to create it) only "embeddingModel" is added: full-text search works as before and the engine says at start
-- that vector search is off (storage/knowledge_embeddings.py).
--
-- No HNSW or ivfflat index: a search is always confined to one organization's knowledge bases, and pgvector before
-- 0.8 (pgserver ships 0.6) filters AFTER an approximate index scan, so the nearest 40 passages of all tenants,
-- filtered to the caller's, would often leave the caller's own best passages out. The exact scan of the linked
-- knowledge bases' passages (at most 100 documents each, found through the knowledgeBaseId index) is bounded and
-- measured by bench/bench_knowledge.py.

ALTER TABLE "KnowledgeBaseChunk" ADD COLUMN "embeddingModel" TEXT;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
        RAISE NOTICE 'pgvector is not installed on this server: knowledge-base vector search stays off';
        RETURN;
    END IF;
    BEGIN
        CREATE EXTENSION IF NOT EXISTS vector;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'not allowed to CREATE EXTENSION vector: knowledge-base vector search stays off';
        RETURN;
    END;
    -- No fixed dimension: it follows the configured model, and "embeddingModel" names it.
    ALTER TABLE "KnowledgeBaseChunk" ADD COLUMN "embedding" vector;
END
$$;

-- The passages a worker still has to embed for a model, found without reading the whole table when none is left.
CREATE INDEX "KnowledgeBaseChunk_embeddingModel_idx" ON "KnowledgeBaseChunk"("embeddingModel");
