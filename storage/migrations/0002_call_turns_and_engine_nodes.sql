-- 0002: the engine's own tables, named as Prisma would name them: a call's turns, written while it runs, and
-- the engine processes sharing the database, so a call left behind by a process that died can be closed.

-- CreateTable
CREATE TABLE "CallTurn" (
    "id" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "callLogId" TEXT NOT NULL,
    "index" INTEGER NOT NULL,
    "speaker" TEXT NOT NULL,
    "text" TEXT NOT NULL,
    "startMs" INTEGER NOT NULL,
    "endMs" INTEGER NOT NULL,
    "interrupted" BOOLEAN NOT NULL DEFAULT false,
    "latencyMs" INTEGER,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "CallTurn_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "EngineNode" (
    "id" TEXT NOT NULL,
    "hostname" TEXT NOT NULL,
    "pid" INTEGER NOT NULL,
    "startedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "lastSeenAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "EngineNode_pkey" PRIMARY KEY ("id")
);

-- CreateIndex: a retried write of the same turn finds it already there.
CREATE UNIQUE INDEX "CallTurn_callLogId_index_key" ON "CallTurn"("callLogId", "index");

-- CreateIndex
CREATE INDEX "CallTurn_organizationId_idx" ON "CallTurn"("organizationId");

-- CreateIndex
CREATE INDEX "EngineNode_lastSeenAt_idx" ON "EngineNode"("lastSeenAt");

-- AddForeignKey
ALTER TABLE "CallTurn" ADD CONSTRAINT "CallTurn_organizationId_fkey" FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey: on "CallLog"("id") alone, since a composite key would need a unique index on CallLog that
-- schema.prisma does not declare; storage/call_turns.py only writes turns of the organization's own call.
ALTER TABLE "CallTurn" ADD CONSTRAINT "CallTurn_callLogId_fkey" FOREIGN KEY ("callLogId") REFERENCES "CallLog"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- Ranges the engine gives these fields.
ALTER TABLE "CallTurn" ADD CONSTRAINT "CallTurn_speaker_check" CHECK ("speaker" IN ('caller', 'agent'));
ALTER TABLE "CallTurn" ADD CONSTRAINT "CallTurn_index_check" CHECK ("index" >= 0);
ALTER TABLE "CallTurn" ADD CONSTRAINT "CallTurn_offsets_check" CHECK ("startMs" >= 0 AND "endMs" >= "startMs");
ALTER TABLE "CallTurn" ADD CONSTRAINT "CallTurn_latencyMs_check" CHECK ("latencyMs" >= 0);
