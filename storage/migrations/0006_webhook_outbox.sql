-- 0006: the webhook outbox. A call event becomes one "WebhookDelivery" row per subscribed Event, written in the
-- transaction of the change it reports, so an event is never lost and never sent for a change that rolled back.
-- Delivery workers claim due rows with FOR UPDATE SKIP LOCKED and hold them by a lease ("leaseToken" until
-- "leasedUntil"); a worker that dies lets its lease expire to the others. Every POST is logged in
-- "WebhookAttempt". Each organization signs its deliveries with one secret in "WebhookSecret", made on first use.

-- CreateTable
CREATE TABLE "WebhookSecret" (
    "id" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "secret" TEXT NOT NULL,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "WebhookSecret_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "WebhookDelivery" (
    "id" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "eventId" TEXT NOT NULL,
    "occurrenceId" TEXT NOT NULL,
    "event" TEXT NOT NULL,
    "payload" JSONB NOT NULL,
    "status" TEXT NOT NULL DEFAULT 'PENDING',
    "attemptCount" INTEGER NOT NULL DEFAULT 0,
    "nextAttemptAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "leaseToken" TEXT,
    "leasedUntil" TIMESTAMPTZ(3),
    "lastResponseCode" INTEGER,
    "lastError" TEXT,
    "deliveredAt" TIMESTAMPTZ(3),
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "WebhookDelivery_pkey" PRIMARY KEY ("id"),
    CONSTRAINT "WebhookDelivery_status_check" CHECK ("status" IN ('PENDING', 'DELIVERED', 'FAILED')),
    CONSTRAINT "WebhookDelivery_attemptCount_check" CHECK ("attemptCount" >= 0)
);

-- CreateTable
CREATE TABLE "WebhookAttempt" (
    "id" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "deliveryId" TEXT NOT NULL,
    "attempt" INTEGER NOT NULL,
    "responseCode" INTEGER,
    "error" TEXT,
    "durationMs" INTEGER NOT NULL,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "WebhookAttempt_pkey" PRIMARY KEY ("id")
);

-- CreateIndex: one secret per organization.
CREATE UNIQUE INDEX "WebhookSecret_organizationId_key" ON "WebhookSecret"("organizationId");

-- CreateIndex: a subscriber hears each occurrence of an event once.
CREATE UNIQUE INDEX "WebhookDelivery_eventId_occurrenceId_key" ON "WebhookDelivery"("eventId", "occurrenceId");

-- CreateIndex: what the workers claim, oldest due first.
CREATE INDEX "WebhookDelivery_due_idx" ON "WebhookDelivery"("nextAttemptAt") WHERE "status" = 'PENDING';

-- CreateIndex: the delivery log as the API pages it.
CREATE INDEX "WebhookDelivery_organizationId_createdAt_idx" ON "WebhookDelivery"("organizationId", "createdAt", "id");

-- CreateIndex: the key attempts reference, so an attempt cannot name another organization's delivery.
CREATE UNIQUE INDEX "WebhookDelivery_id_organizationId_key" ON "WebhookDelivery"("id", "organizationId");

-- CreateIndex
CREATE INDEX "WebhookAttempt_deliveryId_organizationId_attempt_idx" ON "WebhookAttempt"("deliveryId", "organizationId", "attempt");

-- CreateIndex
CREATE INDEX "WebhookAttempt_organizationId_idx" ON "WebhookAttempt"("organizationId");

-- AddForeignKey
ALTER TABLE "WebhookSecret" ADD CONSTRAINT "WebhookSecret_organizationId_fkey" FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "WebhookDelivery" ADD CONSTRAINT "WebhookDelivery_organizationId_fkey" FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "WebhookDelivery" ADD CONSTRAINT "WebhookDelivery_eventId_fkey" FOREIGN KEY ("eventId") REFERENCES "Event"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "WebhookAttempt" ADD CONSTRAINT "WebhookAttempt_organizationId_fkey" FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "WebhookAttempt" ADD CONSTRAINT "WebhookAttempt_deliveryId_organizationId_fkey" FOREIGN KEY ("deliveryId", "organizationId") REFERENCES "WebhookDelivery"("id", "organizationId") ON DELETE CASCADE ON UPDATE CASCADE;

-- updatedAt follows every real change, as for the platform's tables (0001).
CREATE TRIGGER "WebhookDelivery_touch_updatedAt" BEFORE UPDATE ON "WebhookDelivery"
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION "dialtone_touch_updated_at"();

-- Row-level security: the API sees only its organization's rows.
ALTER TABLE "WebhookSecret" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "WebhookSecret_tenant_isolation" ON "WebhookSecret"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "WebhookSecret" TO dialtone_api;

ALTER TABLE "WebhookDelivery" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "WebhookDelivery_tenant_isolation" ON "WebhookDelivery"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "WebhookDelivery" TO dialtone_api;

ALTER TABLE "WebhookAttempt" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "WebhookAttempt_tenant_isolation" ON "WebhookAttempt"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "WebhookAttempt" TO dialtone_api;
