-- 0012: plans and limits. Three things the engine counts in PostgreSQL, so that every engine process sharing the
-- database counts the same:
--   * calls in progress per organization (its plan's concurrent-call limit): no new table, the IN_PROGRESS
--     "CallLog" rows are the slots (counted through "CallLog_status_idx": only live calls are IN_PROGRESS);
--   * API requests per key per minute ("ApiRateLimit", one row per key, its window rewritten in place);
--   * Idempotency-Key answers of POST /v1/calls and POST /v1/campaigns ("IdempotencyKey").

-- CreateTable: one fixed one-minute window per API key; a request in a new window starts its count again, so the
-- table never holds more than one row per key (a deleted key's row goes with it).
CREATE TABLE "ApiRateLimit" (
    "apiKeyId" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "windowStart" TIMESTAMPTZ(3) NOT NULL,
    "count" INTEGER NOT NULL,

    CONSTRAINT "ApiRateLimit_pkey" PRIMARY KEY ("apiKeyId", "organizationId"),
    CONSTRAINT "ApiRateLimit_count_check" CHECK ("count" >= 0)
);

CREATE UNIQUE INDEX "ApiKey_id_organizationId_key" ON "ApiKey"("id", "organizationId");
ALTER TABLE "ApiRateLimit" ADD CONSTRAINT "ApiRateLimit_apiKeyId_organizationId_fkey"
    FOREIGN KEY ("apiKeyId", "organizationId") REFERENCES "ApiKey"("id", "organizationId")
    ON DELETE CASCADE ON UPDATE CASCADE;
CREATE INDEX "ApiRateLimit_organizationId_idx" ON "ApiRateLimit"("organizationId");
ALTER TABLE "ApiRateLimit" ADD CONSTRAINT "ApiRateLimit_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- Counting happens before the organization's transaction opens (the key names the organization), as the owner
-- role, like the key lookup itself; the API role sees only its own organization's rows, as for every tenant table.
ALTER TABLE "ApiRateLimit" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "ApiRateLimit_tenant_isolation" ON "ApiRateLimit"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "ApiRateLimit" TO dialtone_api;

-- CreateTable: a client's Idempotency-Key for one operation. The row is inserted before the operation runs (its
-- unique key makes a concurrent duplicate wait, then find it), and holds the answer once there is one
-- ("responseStatus" NULL while the first request is in flight). "requestHash" is the SHA-256 of the canonical
-- JSON body, so the same key with another body is refused.
CREATE TABLE "IdempotencyKey" (
    "organizationId" TEXT NOT NULL,
    "operation" TEXT NOT NULL,
    "key" TEXT NOT NULL,
    "requestHash" TEXT NOT NULL,
    "responseStatus" INTEGER,
    "responseBody" TEXT,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "expiresAt" TIMESTAMPTZ(3) NOT NULL,

    CONSTRAINT "IdempotencyKey_pkey" PRIMARY KEY ("organizationId", "operation", "key"),
    CONSTRAINT "IdempotencyKey_key_check" CHECK (length("key") BETWEEN 1 AND 255),
    CONSTRAINT "IdempotencyKey_response_check" CHECK (("responseStatus" IS NULL) = ("responseBody" IS NULL))
);

CREATE INDEX "IdempotencyKey_organizationId_expiresAt_idx" ON "IdempotencyKey"("organizationId", "expiresAt");
ALTER TABLE "IdempotencyKey" ADD CONSTRAINT "IdempotencyKey_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- The API reads and writes its own organization's keys inside its tenant transaction (0005's pattern).
ALTER TABLE "IdempotencyKey" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "IdempotencyKey_tenant_isolation" ON "IdempotencyKey"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "IdempotencyKey" TO dialtone_api;
