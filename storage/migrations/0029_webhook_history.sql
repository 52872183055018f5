-- 0029: the webhook delivery log is kept for DIALTONE_WEBHOOK_HISTORY_DAYS, not for ever. Every engine process sweeps
-- it hourly, deleting finished deliveries (DELIVERED or FAILED: PENDING ones are still to be sent) created before the
-- period, a bounded batch at a time, their "WebhookAttempt" rows going with them (ON DELETE CASCADE, through
-- "WebhookAttempt_deliveryId_organizationId_attempt_idx"). The other indexes cannot find those rows cheaply:
-- "WebhookDelivery_organizationId_createdAt_idx" leads with the organization, so a sweep across every organization
-- would read the whole table for each batch, and the due and leased indexes hold only PENDING rows.

-- CreateIndex: the finished deliveries, oldest first: what the history sweep deletes.
CREATE INDEX "WebhookDelivery_finished_idx" ON "WebhookDelivery"("createdAt", "id") WHERE "status" <> 'PENDING';
