-- 0028: fair webhook claims. A claim takes at most a few deliveries in flight per organization across every engine
-- process (storage/webhook_outbox.py), so one organization whose endpoint hangs, or that queues thousands of events,
-- cannot hold every delivery slot while the others' events wait. The claim walks the organizations that have
-- pending deliveries, counts each one's deliveries in flight and takes its oldest due ones; without these indexes
-- it would have to read every queued delivery on each claim ("WebhookDelivery_due_idx" orders by due time only,
-- so another organization's delivery could lie behind the whole of one organization's backlog).

-- CreateIndex: each organization's pending deliveries, oldest due first (and the organizations that have any).
CREATE INDEX "WebhookDelivery_organizationId_due_idx" ON "WebhookDelivery"("organizationId", "nextAttemptAt", "id")
    WHERE "status" = 'PENDING';

-- CreateIndex: the deliveries held under a lease, by organization: what each one has in flight. A lease token is set
-- by a claim and cleared by the outcome, so this index holds a few rows per delivery slot, however long the queue.
CREATE INDEX "WebhookDelivery_organizationId_leased_idx" ON "WebhookDelivery"("organizationId", "leasedUntil")
    WHERE "leaseToken" IS NOT NULL;
