-- 0019: live call events for the API's event streams (GET /v1/live-calls/events, /v1/live-calls/{id}/events).
-- A call's engine process records what happens in it ("LiveCallEvent") only while someone watches the call or its
-- organization: each open stream holds a lease ("LiveCallWatch", renewed while the stream is open), so every
-- engine process knows which calls to record, and events keep being recorded for a while after a stream drops, for
-- its reconnection to resume with nothing lost. Event ids increase in commit order: writers take a transaction
-- advisory lock around each insert, so a reader that has seen id N will never later see a smaller id appear.
-- Old events are pruned after DIALTONE_LIVE_EVENTS_RETENTION seconds.

-- CreateTable
CREATE TABLE "LiveCallEvent" (
    "id" BIGSERIAL NOT NULL,
    "organizationId" TEXT NOT NULL,
    "callLogId" TEXT NOT NULL,
    "type" TEXT NOT NULL,
    "data" JSONB NOT NULL,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "LiveCallEvent_pkey" PRIMARY KEY ("id")
);

-- CreateTable: "callLogId" NULL watches the whole organization.
CREATE TABLE "LiveCallWatch" (
    "id" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "callLogId" TEXT,
    "node" TEXT NOT NULL,
    "expiresAt" TIMESTAMPTZ(3) NOT NULL,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "LiveCallWatch_pkey" PRIMARY KEY ("id")
);

-- CreateIndex: what a stream reads, an organization's or a call's events after the last one it sent.
CREATE INDEX "LiveCallEvent_organizationId_id_idx" ON "LiveCallEvent"("organizationId", "id");
CREATE INDEX "LiveCallEvent_callLogId_id_idx" ON "LiveCallEvent"("callLogId", "id");
-- CreateIndex: what the pruning deletes, oldest first.
CREATE INDEX "LiveCallEvent_createdAt_idx" ON "LiveCallEvent"("createdAt");
CREATE INDEX "LiveCallEvent_callLogId_organizationId_idx" ON "LiveCallEvent"("callLogId", "organizationId");
-- CreateIndex: the leases every engine process reads, and the keys to their parents.
CREATE INDEX "LiveCallWatch_expiresAt_idx" ON "LiveCallWatch"("expiresAt");
CREATE INDEX "LiveCallWatch_organizationId_idx" ON "LiveCallWatch"("organizationId");
CREATE INDEX "LiveCallWatch_callLogId_organizationId_idx" ON "LiveCallWatch"("callLogId", "organizationId");

-- AddForeignKey: composite tenant references (0010), so a row cannot name another organization's call.
ALTER TABLE "LiveCallEvent" ADD CONSTRAINT "LiveCallEvent_organizationId_fkey" FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "LiveCallEvent" ADD CONSTRAINT "LiveCallEvent_callLogId_organizationId_fkey" FOREIGN KEY ("callLogId", "organizationId") REFERENCES "CallLog"("id", "organizationId") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "LiveCallWatch" ADD CONSTRAINT "LiveCallWatch_organizationId_fkey" FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "LiveCallWatch" ADD CONSTRAINT "LiveCallWatch_callLogId_organizationId_fkey" FOREIGN KEY ("callLogId", "organizationId") REFERENCES "CallLog"("id", "organizationId") ON DELETE CASCADE ON UPDATE CASCADE;

-- Row-level security: the API reads its organization's events and holds its own streams' leases.
ALTER TABLE "LiveCallEvent" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "LiveCallEvent_tenant_isolation" ON "LiveCallEvent"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "LiveCallEvent" TO dialtone_api;

ALTER TABLE "LiveCallWatch" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "LiveCallWatch_tenant_isolation" ON "LiveCallWatch"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "LiveCallWatch" TO dialtone_api;
