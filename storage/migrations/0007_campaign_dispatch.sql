-- 0007: what the dispatcher needs beyond the seed's Campaign and CampaignRecipient, kept in side tables so the
-- seed's tables stay exactly as the platform's Prisma schema has them.
--   "CampaignDispatch"           one row per campaign: its calling rules (timezone, days, concurrency, pace,
--                                retry policy), pause state, and the pacing clock every engine process shares.
--   "CampaignRecipientDispatch"  one row per recipient: extra CSV columns, resolved timezone, where the
--                                recipient is in its dialing (state, attempts, next attempt), and its lease.
--   "CampaignAttempt"            one row per dial, linked to the CallLog that dial created.
-- Leases: a process claims recipients with SELECT ... FOR UPDATE SKIP LOCKED and stamps "leaseOwner" and
-- "leaseExpiresAt"; a process that dies lets them expire to the others.

CREATE TABLE "CampaignDispatch" (
    "campaignId" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "fromNumber" TEXT,
    "timezone" TEXT NOT NULL DEFAULT 'UTC',
    "daysOfWeek" INTEGER[] NOT NULL DEFAULT ARRAY[1, 2, 3, 4, 5, 6, 7],
    "maxConcurrentCalls" INTEGER NOT NULL DEFAULT 1,
    "callsPerSecond" DOUBLE PRECISION NOT NULL DEFAULT 1,
    "maxAttempts" INTEGER NOT NULL DEFAULT 1,
    "retryOn" TEXT[] NOT NULL DEFAULT ARRAY['busy', 'no-answer', 'failed']::TEXT[],
    "retryDelaysSeconds" INTEGER[] NOT NULL DEFAULT ARRAY[3600],
    "paused" BOOLEAN NOT NULL DEFAULT false,
    "pausedReason" TEXT,
    "nextDialAt" TIMESTAMPTZ(3) NOT NULL DEFAULT 'epoch',
    "startedAt" TIMESTAMPTZ(3),
    "finishedAt" TIMESTAMPTZ(3),
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "CampaignDispatch_pkey" PRIMARY KEY ("campaignId"),
    CONSTRAINT "CampaignDispatch_daysOfWeek_check"
        CHECK (cardinality("daysOfWeek") > 0 AND "daysOfWeek" <@ ARRAY[1, 2, 3, 4, 5, 6, 7]),
    CONSTRAINT "CampaignDispatch_maxConcurrentCalls_check" CHECK ("maxConcurrentCalls" >= 1),
    CONSTRAINT "CampaignDispatch_callsPerSecond_check" CHECK ("callsPerSecond" > 0),
    CONSTRAINT "CampaignDispatch_maxAttempts_check" CHECK ("maxAttempts" >= 1),
    CONSTRAINT "CampaignDispatch_retryOn_check"
        CHECK ("retryOn" <@ ARRAY['busy', 'no-answer', 'failed', 'voicemail']::TEXT[]),
    CONSTRAINT "CampaignDispatch_retryDelaysSeconds_check" CHECK (cardinality("retryDelaysSeconds") > 0)
);

CREATE INDEX "CampaignDispatch_organizationId_idx" ON "CampaignDispatch"("organizationId");
-- The dispatcher's scan: unfinished, unpaused campaigns due for a claim.
CREATE INDEX "CampaignDispatch_nextDialAt_idx" ON "CampaignDispatch"("nextDialAt")
    WHERE NOT "paused" AND "finishedAt" IS NULL;

ALTER TABLE "CampaignDispatch" ADD CONSTRAINT "CampaignDispatch_campaignId_fkey"
    FOREIGN KEY ("campaignId") REFERENCES "Campaign"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "CampaignDispatch" ADD CONSTRAINT "CampaignDispatch_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- state: QUEUED (waiting for "nextAttemptAt"), DIALING (leased: a process is placing the call), IN_CALL (the call
-- was placed: its CallLog decides what happens next), DONE (reached), FAILED (attempts exhausted or not
-- retryable), INVALID (an ERROR row of an import, never dialed), CANCELED (its campaign was stopped first).
CREATE TABLE "CampaignRecipientDispatch" (
    "recipientId" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "campaignId" TEXT NOT NULL,
    "timezone" TEXT,
    "variables" JSONB NOT NULL DEFAULT '{}',
    "state" TEXT NOT NULL DEFAULT 'QUEUED',
    "attempts" INTEGER NOT NULL DEFAULT 0,
    -- The epoch: due at once, whatever the clock of the process that looks.
    "nextAttemptAt" TIMESTAMPTZ(3) NOT NULL DEFAULT 'epoch',
    "leaseOwner" TEXT,
    "leaseExpiresAt" TIMESTAMPTZ(3),
    "lastOutcome" TEXT,
    "lastReason" TEXT,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "CampaignRecipientDispatch_pkey" PRIMARY KEY ("recipientId"),
    CONSTRAINT "CampaignRecipientDispatch_state_check"
        CHECK ("state" IN ('QUEUED', 'DIALING', 'IN_CALL', 'DONE', 'FAILED', 'INVALID', 'CANCELED')),
    CONSTRAINT "CampaignRecipientDispatch_lease_check"
        CHECK (("state" = 'DIALING') = ("leaseOwner" IS NOT NULL AND "leaseExpiresAt" IS NOT NULL)),
    CONSTRAINT "CampaignRecipientDispatch_attempts_check" CHECK ("attempts" >= 0)
);

CREATE INDEX "CampaignRecipientDispatch_organizationId_idx" ON "CampaignRecipientDispatch"("organizationId");
-- Claims: the campaign's queued recipients, soonest first.
CREATE INDEX "CampaignRecipientDispatch_campaignId_state_nextAttemptAt_idx"
    ON "CampaignRecipientDispatch"("campaignId", "state", "nextAttemptAt");
-- Lease expiry across every campaign.
CREATE INDEX "CampaignRecipientDispatch_leaseExpiresAt_idx"
    ON "CampaignRecipientDispatch"("leaseExpiresAt") WHERE "state" = 'DIALING';

ALTER TABLE "CampaignRecipientDispatch" ADD CONSTRAINT "CampaignRecipientDispatch_recipientId_fkey"
    FOREIGN KEY ("recipientId") REFERENCES "CampaignRecipient"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "CampaignRecipientDispatch" ADD CONSTRAINT "CampaignRecipientDispatch_campaignId_fkey"
    FOREIGN KEY ("campaignId") REFERENCES "Campaign"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "CampaignRecipientDispatch" ADD CONSTRAINT "CampaignRecipientDispatch_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- state: DIALING (claimed, the call is being placed), PLACED (a CallLog exists), ENDED (outcome known),
-- ABANDONED (its lease expired and no CallLog shows the dial ever happened: it did not count).
CREATE TABLE "CampaignAttempt" (
    "id" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "campaignId" TEXT NOT NULL,
    "recipientId" TEXT NOT NULL,
    "attemptNumber" INTEGER NOT NULL,
    "state" TEXT NOT NULL DEFAULT 'DIALING',
    "dialedBy" TEXT NOT NULL,
    "callLogId" TEXT,
    "callSid" TEXT,
    "outcome" TEXT,
    "reason" TEXT,
    "startedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "endedAt" TIMESTAMPTZ(3),

    CONSTRAINT "CampaignAttempt_pkey" PRIMARY KEY ("id"),
    CONSTRAINT "CampaignAttempt_state_check" CHECK ("state" IN ('DIALING', 'PLACED', 'ENDED', 'ABANDONED')),
    CONSTRAINT "CampaignAttempt_attemptNumber_check" CHECK ("attemptNumber" >= 1)
);

-- At most one live attempt per recipient and attempt number: a double claim cannot insert a second.
CREATE UNIQUE INDEX "CampaignAttempt_recipientId_attemptNumber_key"
    ON "CampaignAttempt"("recipientId", "attemptNumber") WHERE "state" <> 'ABANDONED';
CREATE INDEX "CampaignAttempt_recipientId_idx" ON "CampaignAttempt"("recipientId");
CREATE INDEX "CampaignAttempt_organizationId_idx" ON "CampaignAttempt"("organizationId");
-- The concurrency cap counts a campaign's live attempts; reconcile walks them.
CREATE INDEX "CampaignAttempt_campaignId_state_idx" ON "CampaignAttempt"("campaignId", "state");
CREATE INDEX "CampaignAttempt_callLogId_idx" ON "CampaignAttempt"("callLogId");
-- Reconciling walks the attempts still live, across every campaign.
CREATE INDEX "CampaignAttempt_live_idx" ON "CampaignAttempt"("startedAt") WHERE "state" IN ('DIALING', 'PLACED');

ALTER TABLE "CampaignAttempt" ADD CONSTRAINT "CampaignAttempt_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "CampaignAttempt" ADD CONSTRAINT "CampaignAttempt_campaignId_fkey"
    FOREIGN KEY ("campaignId") REFERENCES "Campaign"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "CampaignAttempt" ADD CONSTRAINT "CampaignAttempt_recipientId_fkey"
    FOREIGN KEY ("recipientId") REFERENCES "CampaignRecipient"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "CampaignAttempt" ADD CONSTRAINT "CampaignAttempt_callLogId_fkey"
    FOREIGN KEY ("callLogId") REFERENCES "CallLog"("id") ON DELETE SET NULL ON UPDATE CASCADE;

ALTER TABLE "CampaignDispatch" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "CampaignDispatch_tenant_isolation" ON "CampaignDispatch"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "CampaignDispatch" TO dialtone_api;

ALTER TABLE "CampaignRecipientDispatch" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "CampaignRecipientDispatch_tenant_isolation" ON "CampaignRecipientDispatch"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "CampaignRecipientDispatch" TO dialtone_api;

ALTER TABLE "CampaignAttempt" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "CampaignAttempt_tenant_isolation" ON "CampaignAttempt"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "CampaignAttempt" TO dialtone_api;

CREATE TRIGGER "CampaignDispatch_touch_updatedAt" BEFORE UPDATE ON "CampaignDispatch"
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION "dialtone_touch_updated_at"();
CREATE TRIGGER "CampaignRecipientDispatch_touch_updatedAt" BEFORE UPDATE ON "CampaignRecipientDispatch"
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION "dialtone_touch_updated_at"();
