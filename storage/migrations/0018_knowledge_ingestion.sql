-- 0018: knowledge bases that agents use. A document added to a knowledge base is queued for ingestion in the same
-- transaction ("KnowledgeBaseIngestion"); any engine process claims queued documents with FOR UPDATE SKIP LOCKED
-- under a lease, so a process that dies mid-ingestion only delays the document until another claims it. Ingestion
-- splits the document's text into overlapping chunks ("KnowledgeBaseChunk"), each with its tsvector in the
-- knowledge base's text-search language, ranked by full-text search inside PostgreSQL. An uploaded file's bytes are
-- kept in "KnowledgeBaseFile" until its document is deleted. A knowledge base's counts and status follow its
-- documents and agent links by trigger, whoever writes them.

-- The text-search configuration (e.g. 'english', 'german', 'simple') a knowledge base's chunks are indexed in.
ALTER TABLE "KnowledgeBase" ADD COLUMN "language" TEXT NOT NULL DEFAULT 'english';
ALTER TABLE "KnowledgeBase" ADD CONSTRAINT "KnowledgeBase_language_check"
    CHECK ("language" ~ '^[a-z_]{1,63}$');

-- Where an agent turn's answer came from: the knowledge searches made for it, with each passage's knowledge
-- base, document and chunk ids ({"retrievals": [{"query", "passages": [...]}]}); NULL when none was made.
ALTER TABLE "CallTurn" ADD COLUMN "knowledge" JSONB;

-- Why a document ended in ERROR; NULL otherwise.
ALTER TABLE "KnowledgeBaseDocument" ADD COLUMN "error" TEXT;

-- The key children reference, so a chunk or file cannot name another organization's document.
CREATE UNIQUE INDEX "KnowledgeBaseDocument_id_organizationId_key" ON "KnowledgeBaseDocument"("id", "organizationId");

-- CreateTable
CREATE TABLE "KnowledgeBaseFile" (
    "documentId" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "data" BYTEA NOT NULL,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "KnowledgeBaseFile_pkey" PRIMARY KEY ("documentId")
);

-- CreateTable
CREATE TABLE "KnowledgeBaseIngestion" (
    "documentId" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "attemptCount" INTEGER NOT NULL DEFAULT 0,
    "nextAttemptAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "leaseToken" TEXT,
    "leasedUntil" TIMESTAMPTZ(3),
    "lastError" TEXT,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "KnowledgeBaseIngestion_pkey" PRIMARY KEY ("documentId"),
    CONSTRAINT "KnowledgeBaseIngestion_attemptCount_check" CHECK ("attemptCount" >= 0)
);

-- CreateTable
CREATE TABLE "KnowledgeBaseChunk" (
    "id" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "knowledgeBaseId" TEXT NOT NULL,
    "documentId" TEXT NOT NULL,
    "position" INTEGER NOT NULL,
    "content" TEXT NOT NULL,
    "language" TEXT NOT NULL,
    "searchVector" TSVECTOR NOT NULL,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "KnowledgeBaseChunk_pkey" PRIMARY KEY ("id"),
    CONSTRAINT "KnowledgeBaseChunk_position_check" CHECK ("position" >= 0)
);

-- CreateIndex: what the workers claim, oldest due first.
CREATE INDEX "KnowledgeBaseIngestion_due_idx" ON "KnowledgeBaseIngestion"("nextAttemptAt");
CREATE INDEX "KnowledgeBaseIngestion_organizationId_idx" ON "KnowledgeBaseIngestion"("organizationId");
CREATE INDEX "KnowledgeBaseFile_organizationId_idx" ON "KnowledgeBaseFile"("organizationId");
CREATE UNIQUE INDEX "KnowledgeBaseFile_documentId_organizationId_key" ON "KnowledgeBaseFile"("documentId", "organizationId");
CREATE UNIQUE INDEX "KnowledgeBaseIngestion_documentId_organizationId_key" ON "KnowledgeBaseIngestion"("documentId", "organizationId");

-- CreateIndex: a re-ingested document replaces its chunks, position by position.
CREATE UNIQUE INDEX "KnowledgeBaseChunk_documentId_position_key" ON "KnowledgeBaseChunk"("documentId", "position");
CREATE INDEX "KnowledgeBaseChunk_documentId_organizationId_idx" ON "KnowledgeBaseChunk"("documentId", "organizationId");
CREATE INDEX "KnowledgeBaseChunk_knowledgeBaseId_organizationId_idx" ON "KnowledgeBaseChunk"("knowledgeBaseId", "organizationId");
CREATE INDEX "KnowledgeBaseChunk_organizationId_idx" ON "KnowledgeBaseChunk"("organizationId");

-- CreateIndex: full-text search.
CREATE INDEX "KnowledgeBaseChunk_searchVector_idx" ON "KnowledgeBaseChunk" USING GIN ("searchVector");

-- AddForeignKey: composite tenant references (0010), all following their document.
ALTER TABLE "KnowledgeBaseFile" ADD CONSTRAINT "KnowledgeBaseFile_organizationId_fkey" FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "KnowledgeBaseFile" ADD CONSTRAINT "KnowledgeBaseFile_documentId_organizationId_fkey" FOREIGN KEY ("documentId", "organizationId") REFERENCES "KnowledgeBaseDocument"("id", "organizationId") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "KnowledgeBaseIngestion" ADD CONSTRAINT "KnowledgeBaseIngestion_organizationId_fkey" FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "KnowledgeBaseIngestion" ADD CONSTRAINT "KnowledgeBaseIngestion_documentId_organizationId_fkey" FOREIGN KEY ("documentId", "organizationId") REFERENCES "KnowledgeBaseDocument"("id", "organizationId") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "KnowledgeBaseChunk" ADD CONSTRAINT "KnowledgeBaseChunk_organizationId_fkey" FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "KnowledgeBaseChunk" ADD CONSTRAINT "KnowledgeBaseChunk_documentId_organizationId_fkey" FOREIGN KEY ("documentId", "organizationId") REFERENCES "KnowledgeBaseDocument"("id", "organizationId") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "KnowledgeBaseChunk" ADD CONSTRAINT "KnowledgeBaseChunk_knowledgeBaseId_organizationId_fkey" FOREIGN KEY ("knowledgeBaseId", "organizationId") REFERENCES "KnowledgeBase"("id", "organizationId") ON DELETE CASCADE ON UPDATE CASCADE;

-- A knowledge base's counts and status, recomputed from its documents and agent links after every change:
-- EMPTY with no document, PROCESSING while one is being ingested, then ACTIVE when an agent uses it, else READY.
CREATE FUNCTION "dialtone_knowledge_base_refresh"(kb_id TEXT, org_id TEXT) RETURNS void
LANGUAGE sql AS $$
    UPDATE "KnowledgeBase" kb SET
        "fileCount" = c.files, "websiteCount" = c.websites, "textCount" = c.texts,
        "status" = CASE
            WHEN c.files + c.websites + c.texts = 0 THEN 'EMPTY'
            WHEN c.processing > 0 THEN 'PROCESSING'
            WHEN EXISTS (SELECT 1 FROM "AgentKnowledgeBase" a
                         WHERE a."knowledgeBaseId" = kb_id AND a."organizationId" = org_id) THEN 'ACTIVE'
            ELSE 'READY' END::"KnowledgeBaseStatus"
    FROM (
        SELECT count(*) FILTER (WHERE "type" = 'FILE')::int AS files,
               count(*) FILTER (WHERE "type" = 'WEBSITE')::int AS websites,
               count(*) FILTER (WHERE "type" = 'TEXT')::int AS texts,
               count(*) FILTER (WHERE "status" = 'PROCESSING')::int AS processing
        FROM "KnowledgeBaseDocument" WHERE "knowledgeBaseId" = kb_id AND "organizationId" = org_id
    ) c
    WHERE kb."id" = kb_id AND kb."organizationId" = org_id
$$;

CREATE FUNCTION "dialtone_knowledge_base_refresh_trigger"() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM "dialtone_knowledge_base_refresh"(OLD."knowledgeBaseId", OLD."organizationId");
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM "dialtone_knowledge_base_refresh"(NEW."knowledgeBaseId", NEW."organizationId");
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER "KnowledgeBaseDocument_refresh_knowledgeBase"
    AFTER INSERT OR DELETE OR UPDATE OF "status", "type", "knowledgeBaseId" ON "KnowledgeBaseDocument"
    FOR EACH ROW EXECUTE FUNCTION "dialtone_knowledge_base_refresh_trigger"();
CREATE TRIGGER "AgentKnowledgeBase_refresh_knowledgeBase"
    AFTER INSERT OR DELETE OR UPDATE ON "AgentKnowledgeBase"
    FOR EACH ROW EXECUTE FUNCTION "dialtone_knowledge_base_refresh_trigger"();

-- Bring existing knowledge bases in line, and queue the documents that were left PROCESSING before this.
SELECT "dialtone_knowledge_base_refresh"("id", "organizationId") FROM "KnowledgeBase";
INSERT INTO "KnowledgeBaseIngestion" ("documentId", "organizationId")
SELECT "id", "organizationId" FROM "KnowledgeBaseDocument" WHERE "status" = 'PROCESSING';

-- Row-level security: the API sees only its organization's rows.
ALTER TABLE "KnowledgeBaseFile" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "KnowledgeBaseFile_tenant_isolation" ON "KnowledgeBaseFile"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "KnowledgeBaseFile" TO dialtone_api;

ALTER TABLE "KnowledgeBaseIngestion" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "KnowledgeBaseIngestion_tenant_isolation" ON "KnowledgeBaseIngestion"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "KnowledgeBaseIngestion" TO dialtone_api;

ALTER TABLE "KnowledgeBaseChunk" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "KnowledgeBaseChunk_tenant_isolation" ON "KnowledgeBaseChunk"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "KnowledgeBaseChunk" TO dialtone_api;

-- How many of a knowledge base's passages hold each lexeme: search weighs a question's words by their rarity
-- (inverse document frequency) and leaves out those most passages hold, which plain ts_rank cannot. Refreshed
-- whenever the knowledge base's passages change (storage/knowledge_ingestion.py, storage/knowledge_bases.py).
CREATE TABLE "KnowledgeBaseTerm" (
    "knowledgeBaseId" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "lexeme" TEXT NOT NULL,
    "chunkCount" INTEGER NOT NULL,

    CONSTRAINT "KnowledgeBaseTerm_pkey" PRIMARY KEY ("knowledgeBaseId", "lexeme"),
    CONSTRAINT "KnowledgeBaseTerm_chunkCount_check" CHECK ("chunkCount" > 0)
);
CREATE INDEX "KnowledgeBaseTerm_organizationId_idx" ON "KnowledgeBaseTerm"("organizationId");
CREATE INDEX "KnowledgeBaseTerm_knowledgeBaseId_organizationId_idx" ON "KnowledgeBaseTerm"("knowledgeBaseId", "organizationId");
ALTER TABLE "KnowledgeBaseTerm" ADD CONSTRAINT "KnowledgeBaseTerm_organizationId_fkey" FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "KnowledgeBaseTerm" ADD CONSTRAINT "KnowledgeBaseTerm_knowledgeBaseId_organizationId_fkey" FOREIGN KEY ("knowledgeBaseId", "organizationId") REFERENCES "KnowledgeBase"("id", "organizationId") ON DELETE CASCADE ON UPDATE CASCADE;

CREATE FUNCTION "dialtone_knowledge_terms_refresh"(kb_id TEXT, org_id TEXT) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM "KnowledgeBaseTerm" WHERE "knowledgeBaseId" = kb_id AND "organizationId" = org_id;
    INSERT INTO "KnowledgeBaseTerm" ("knowledgeBaseId", "organizationId", "lexeme", "chunkCount")
    SELECT kb_id, org_id, s.word, s.ndoc FROM ts_stat(format(
        'SELECT "searchVector" FROM "KnowledgeBaseChunk" WHERE "knowledgeBaseId" = %L AND "organizationId" = %L',
        kb_id, org_id)) AS s;
END
$$;

ALTER TABLE "KnowledgeBaseTerm" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "KnowledgeBaseTerm_tenant_isolation" ON "KnowledgeBaseTerm"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "KnowledgeBaseTerm" TO dialtone_api;
