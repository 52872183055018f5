-- 0030: a recording goes with its call, whoever deletes the call. The dashboard deletes "CallLog" rows (and whole
-- organizations) in SQL, outside the engine; the cascades take the "CallRecording" row (0016) with them, but not the
-- object in the bucket nor the file on the disk. A trigger on "CallRecording" therefore queues, for every deleted row
-- whose recording was not already deleted by retention, what must be removed: the object under "objectKey" (the s3
-- store), and the file at "localPath" in the state folder "spool" when it may still be there ("onDisk": the local
-- store, or an upload not yet done). Cascades fire row triggers, so a CallLog deleted alone, or with its organization,
-- queues its recording alike. The engine's workers claim due rows with FOR UPDATE SKIP LOCKED under a lease, as for
-- uploads, remove the recording (an object or a file already gone counts as removed), delete the row, and retry with
-- a growing wait while the store fails: the DELETE itself never waits on, nor fails for, the store.
--
-- The queue keeps no foreign key: its rows must outlive the call and the organization they came from.

-- CreateTable
CREATE TABLE "RecordingDeletion" (
    "id" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "callLogId" TEXT NOT NULL,
    "store" TEXT NOT NULL,
    "objectKey" TEXT NOT NULL,
    "spool" TEXT NOT NULL,
    "localPath" TEXT NOT NULL,
    "onDisk" BOOLEAN NOT NULL,
    "attemptCount" INTEGER NOT NULL DEFAULT 0,
    "nextAttemptAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "leaseToken" TEXT,
    "leasedUntil" TIMESTAMPTZ(3),
    "lastError" TEXT,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "RecordingDeletion_pkey" PRIMARY KEY ("id"),
    CONSTRAINT "RecordingDeletion_store_check" CHECK ("store" IN ('local', 's3')),
    CONSTRAINT "RecordingDeletion_attemptCount_check" CHECK ("attemptCount" >= 0)
);

-- CreateIndex: what the workers claim, oldest due first.
CREATE INDEX "RecordingDeletion_due_idx" ON "RecordingDeletion"("nextAttemptAt", "id");

-- CreateIndex: an organization's queued deletions.
CREATE INDEX "RecordingDeletion_organizationId_idx" ON "RecordingDeletion"("organizationId");

-- updatedAt follows every real change, as for the platform's tables (0001).
CREATE TRIGGER "RecordingDeletion_touch_updatedAt" BEFORE UPDATE ON "RecordingDeletion"
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION "dialtone_touch_updated_at"();

-- Row-level security: the API sees only its organization's rows (the same grants as every tenant table).
ALTER TABLE "RecordingDeletion" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "RecordingDeletion_tenant_isolation" ON "RecordingDeletion"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "RecordingDeletion" TO dialtone_api;

-- Queue a deleted recording's removal. SECURITY DEFINER: whoever deletes the call (the API role under its
-- organization's policy, a dashboard's role with no grant on this table) must never have the DELETE refused for
-- want of rights on the queue; the function's search_path is pinned to this schema below, as such functions need.
CREATE FUNCTION "dialtone_queue_recording_deletion"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    INSERT INTO "RecordingDeletion" ("id", "organizationId", "callLogId", "store", "objectKey", "spool", "localPath",
                                     "onDisk")
    VALUES (gen_random_uuid()::text, OLD."organizationId", OLD."callLogId", OLD."store", OLD."objectKey", OLD."spool",
            OLD."localPath", OLD."store" = 'local' OR OLD."status" = 'PENDING');
    RETURN NULL;
END
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION "dialtone_queue_recording_deletion"() SET search_path = %I, pg_temp',
                   current_schema());
END
$$;

REVOKE ALL ON FUNCTION "dialtone_queue_recording_deletion"() FROM PUBLIC;

-- A recording retention already deleted (DELETED) has nothing left to remove.
CREATE TRIGGER "CallRecording_queue_deletion" AFTER DELETE ON "CallRecording"
    FOR EACH ROW WHEN (OLD."status" <> 'DELETED') EXECUTE FUNCTION "dialtone_queue_recording_deletion"();
