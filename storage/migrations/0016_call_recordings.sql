-- 0016: where each call's recording is kept. A recording is written to a local file during the call; when the call
-- ends, one "CallRecording" row is written (PENDING) and the file is moved into the configured store: the local
-- folder (done at once, STORED) or S3-compatible object storage (uploaded by a worker, then STORED, and only then is
-- the local file removed). Upload workers claim due rows with FOR UPDATE SKIP LOCKED under a lease, like the
-- webhook outbox (0006); "spool" names the state folder whose disk holds the file (an id kept in that folder), so a
-- row is claimed only by processes that can read the file: this one, a later run, or another replica sharing the
-- folder. The retention sweep deletes old recordings (DELETED).

-- CreateTable
CREATE TABLE "CallRecording" (
    "id" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "callLogId" TEXT NOT NULL,
    "store" TEXT NOT NULL,
    "objectKey" TEXT NOT NULL,
    "spool" TEXT NOT NULL,
    "localPath" TEXT NOT NULL,
    "bytes" BIGINT NOT NULL,
    "status" TEXT NOT NULL DEFAULT 'PENDING',
    "attemptCount" INTEGER NOT NULL DEFAULT 0,
    "nextAttemptAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "leaseToken" TEXT,
    "leasedUntil" TIMESTAMPTZ(3),
    "lastError" TEXT,
    "storedAt" TIMESTAMPTZ(3),
    "deletedAt" TIMESTAMPTZ(3),
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "CallRecording_pkey" PRIMARY KEY ("id"),
    CONSTRAINT "CallRecording_store_check" CHECK ("store" IN ('local', 's3')),
    CONSTRAINT "CallRecording_status_check" CHECK ("status" IN ('PENDING', 'STORED', 'DELETED')),
    CONSTRAINT "CallRecording_attemptCount_check" CHECK ("attemptCount" >= 0),
    CONSTRAINT "CallRecording_bytes_check" CHECK ("bytes" >= 0)
);

-- CreateIndex: one recording per call.
CREATE UNIQUE INDEX "CallRecording_callLogId_key" ON "CallRecording"("callLogId");

-- CreateIndex: what the upload workers of a spool claim, oldest due first.
CREATE INDEX "CallRecording_due_idx" ON "CallRecording"("spool", "nextAttemptAt") WHERE "status" = 'PENDING';

-- CreateIndex: an organization's recordings, newest first (and the key to "Organization").
CREATE INDEX "CallRecording_organizationId_createdAt_idx" ON "CallRecording"("organizationId", "createdAt", "id");

-- CreateIndex: what the retention sweep deletes, oldest first.
CREATE INDEX "CallRecording_kept_idx" ON "CallRecording"("createdAt") WHERE "status" <> 'DELETED';

-- AddForeignKey: a composite tenant reference (0010), so a row cannot name another organization's call.
CREATE INDEX "CallRecording_callLogId_organizationId_idx" ON "CallRecording"("callLogId", "organizationId");
ALTER TABLE "CallRecording" ADD CONSTRAINT "CallRecording_callLogId_organizationId_fkey"
    FOREIGN KEY ("callLogId", "organizationId") REFERENCES "CallLog"("id", "organizationId")
    ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "CallRecording" ADD CONSTRAINT "CallRecording_organizationId_fkey" FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- updatedAt follows every real change, as for the platform's tables (0001).
CREATE TRIGGER "CallRecording_touch_updatedAt" BEFORE UPDATE ON "CallRecording"
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION "dialtone_touch_updated_at"();

-- Row-level security: the API sees only its organization's rows (the same grants as every tenant table).
ALTER TABLE "CallRecording" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "CallRecording_tenant_isolation" ON "CallRecording"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "CallRecording" TO dialtone_api;
