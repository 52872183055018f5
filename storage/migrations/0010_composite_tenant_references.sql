-- 0010: the references that still named their parent by id alone become composite (parentId, organizationId)
-- references, as 0001 made the join tables' and recipients', so the database itself refuses a row that points at
-- another organization's parent, whoever writes it (the engine's owner role, a dashboard sharing the database):
-- row-level security binds only the API's role, and foreign-key checks ignore it.
--
-- Each parent gets a UNIQUE ("id", "organizationId") for its children to reference; each child's index on the
-- parent id alone becomes one on (parentId, organizationId), which serves the composite key. Optional references
-- that were ON DELETE SET NULL stay so, naming the one column to clear (PostgreSQL 15+): a bare SET NULL on a
-- composite key would clear the child's organizationId too, which is NOT NULL. Rows that already point across
-- organizations make this migration fail, naming the constraint: they are corrupt and need fixing by hand.

-- Parents' keys.
CREATE UNIQUE INDEX "PhoneNumber_id_organizationId_key" ON "PhoneNumber"("id", "organizationId");
CREATE UNIQUE INDEX "Event_id_organizationId_key" ON "Event"("id", "organizationId");
CREATE UNIQUE INDEX "CallLog_id_organizationId_key" ON "CallLog"("id", "organizationId");

-- Agent.phoneNumberId → PhoneNumber
ALTER TABLE "Agent" DROP CONSTRAINT "Agent_phoneNumberId_fkey";
DROP INDEX "Agent_phoneNumberId_idx";
CREATE INDEX "Agent_phoneNumberId_organizationId_idx" ON "Agent"("phoneNumberId", "organizationId");
ALTER TABLE "Agent" ADD CONSTRAINT "Agent_phoneNumberId_organizationId_fkey"
    FOREIGN KEY ("phoneNumberId", "organizationId") REFERENCES "PhoneNumber"("id", "organizationId")
    ON DELETE SET NULL ("phoneNumberId") ON UPDATE CASCADE;

-- Campaign.agentId → Agent
ALTER TABLE "Campaign" DROP CONSTRAINT "Campaign_agentId_fkey";
DROP INDEX "Campaign_agentId_idx";
CREATE INDEX "Campaign_agentId_organizationId_idx" ON "Campaign"("agentId", "organizationId");
ALTER TABLE "Campaign" ADD CONSTRAINT "Campaign_agentId_organizationId_fkey"
    FOREIGN KEY ("agentId", "organizationId") REFERENCES "Agent"("id", "organizationId")
    ON DELETE NO ACTION ON UPDATE CASCADE;

-- Campaign.conversationPathId → ConversationPath
ALTER TABLE "Campaign" DROP CONSTRAINT "Campaign_conversationPathId_fkey";
DROP INDEX "Campaign_conversationPathId_idx";
CREATE INDEX "Campaign_conversationPathId_organizationId_idx" ON "Campaign"("conversationPathId", "organizationId");
ALTER TABLE "Campaign" ADD CONSTRAINT "Campaign_conversationPathId_organizationId_fkey"
    FOREIGN KEY ("conversationPathId", "organizationId") REFERENCES "ConversationPath"("id", "organizationId")
    ON DELETE SET NULL ("conversationPathId") ON UPDATE CASCADE;

-- CallLog.agentId → Agent, CallLog.campaignId → Campaign
ALTER TABLE "CallLog" DROP CONSTRAINT "CallLog_agentId_fkey";
DROP INDEX "CallLog_agentId_idx";
CREATE INDEX "CallLog_agentId_organizationId_idx" ON "CallLog"("agentId", "organizationId");
ALTER TABLE "CallLog" ADD CONSTRAINT "CallLog_agentId_organizationId_fkey"
    FOREIGN KEY ("agentId", "organizationId") REFERENCES "Agent"("id", "organizationId")
    ON DELETE SET NULL ("agentId") ON UPDATE CASCADE;

ALTER TABLE "CallLog" DROP CONSTRAINT "CallLog_campaignId_fkey";
DROP INDEX "CallLog_campaignId_idx";
CREATE INDEX "CallLog_campaignId_organizationId_idx" ON "CallLog"("campaignId", "organizationId");
ALTER TABLE "CallLog" ADD CONSTRAINT "CallLog_campaignId_organizationId_fkey"
    FOREIGN KEY ("campaignId", "organizationId") REFERENCES "Campaign"("id", "organizationId")
    ON DELETE SET NULL ("campaignId") ON UPDATE CASCADE;

-- Event.agentId → Agent
ALTER TABLE "Event" DROP CONSTRAINT "Event_agentId_fkey";
DROP INDEX "Event_agentId_idx";
CREATE INDEX "Event_agentId_organizationId_idx" ON "Event"("agentId", "organizationId");
ALTER TABLE "Event" ADD CONSTRAINT "Event_agentId_organizationId_fkey"
    FOREIGN KEY ("agentId", "organizationId") REFERENCES "Agent"("id", "organizationId")
    ON DELETE CASCADE ON UPDATE CASCADE;

-- CallTurn.callLogId → CallLog (engine table; its unique (callLogId, index) stays for the turn writer)
ALTER TABLE "CallTurn" DROP CONSTRAINT "CallTurn_callLogId_fkey";
CREATE INDEX "CallTurn_callLogId_organizationId_idx" ON "CallTurn"("callLogId", "organizationId");
ALTER TABLE "CallTurn" ADD CONSTRAINT "CallTurn_callLogId_organizationId_fkey"
    FOREIGN KEY ("callLogId", "organizationId") REFERENCES "CallLog"("id", "organizationId")
    ON DELETE CASCADE ON UPDATE CASCADE;

-- WebhookDelivery.eventId → Event (engine table). The key now does what 0008's policy on eventId did, for every
-- role, so the policy goes: one home for the rule.
ALTER TABLE "WebhookDelivery" DROP CONSTRAINT "WebhookDelivery_eventId_fkey";
CREATE INDEX "WebhookDelivery_eventId_organizationId_idx" ON "WebhookDelivery"("eventId", "organizationId");
ALTER TABLE "WebhookDelivery" ADD CONSTRAINT "WebhookDelivery_eventId_organizationId_fkey"
    FOREIGN KEY ("eventId", "organizationId") REFERENCES "Event"("id", "organizationId")
    ON DELETE CASCADE ON UPDATE CASCADE;
DROP POLICY "WebhookDelivery_own_references" ON "WebhookDelivery";
