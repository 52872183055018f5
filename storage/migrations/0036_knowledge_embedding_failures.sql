-- 0036: why knowledge-base passages wait for their embeddings, kept in the database rather than in the engine
-- process whose embedding round failed. Documents and knowledge bases show `vectors` WAITING with this reason (the
-- embedding API refusing the engine's key, say); kept in one process's memory, a restarted process, or another node,
-- showed EMBEDDING, as if all were well, until a round of its own had failed.
--
-- One row per embedding model (its key, 'text-embedding-3-small/1536'): written by the round that fails, deleted by
-- the next that makes vectors, whichever engine runs them. The engine's, not an organization's: no organization's
-- text goes in it (the API's words about refused passages stay in the log). Like every engine table, out of the API
-- role's reach: the engine reads it with its own connection when an organization's passages wait.

-- CreateTable
CREATE TABLE "KnowledgeEmbeddingFailure" (
    "model" TEXT NOT NULL,
    "reason" TEXT NOT NULL,
    "failedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "KnowledgeEmbeddingFailure_pkey" PRIMARY KEY ("model")
);
