-- 0008: rows of the webhook outbox (0006) and campaign dispatch (0007) tables may reference only rows of their own
-- organization. Foreign-key checks ignore row-level security, so without these RESTRICTIVE policies (AND-ed with
-- each table's tenant policy) a tenant could write a row pointing at another organization's Event, Campaign,
-- recipient or call by its id alone, as 0005 explains for the seed's tables. Each checks the rows written
-- (INSERT and UPDATE: WITH CHECK) and restricts nothing read (USING true). The engine's owner role is not
-- subject to them.

CREATE POLICY "WebhookDelivery_own_references" ON "WebhookDelivery" AS RESTRICTIVE
    FOR ALL
    USING (true)
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM "Event" t
            WHERE t."id" = "WebhookDelivery"."eventId" AND t."organizationId" = "WebhookDelivery"."organizationId")
    );

CREATE POLICY "CampaignDispatch_own_references" ON "CampaignDispatch" AS RESTRICTIVE
    FOR ALL
    USING (true)
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM "Campaign" t
            WHERE t."id" = "CampaignDispatch"."campaignId" AND t."organizationId" = "CampaignDispatch"."organizationId")
    );

CREATE POLICY "CampaignRecipientDispatch_own_references" ON "CampaignRecipientDispatch" AS RESTRICTIVE
    FOR ALL
    USING (true)
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM "CampaignRecipient" t
            WHERE t."id" = "CampaignRecipientDispatch"."recipientId" AND t."organizationId" = "CampaignRecipientDispatch"."organizationId")
        AND EXISTS (
            SELECT 1 FROM "Campaign" t
            WHERE t."id" = "CampaignRecipientDispatch"."campaignId" AND t."organizationId" = "CampaignRecipientDispatch"."organizationId")
    );

CREATE POLICY "CampaignAttempt_own_references" ON "CampaignAttempt" AS RESTRICTIVE
    FOR ALL
    USING (true)
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM "Campaign" t
            WHERE t."id" = "CampaignAttempt"."campaignId" AND t."organizationId" = "CampaignAttempt"."organizationId")
        AND EXISTS (
            SELECT 1 FROM "CampaignRecipient" t
            WHERE t."id" = "CampaignAttempt"."recipientId" AND t."organizationId" = "CampaignAttempt"."organizationId")
        AND ("callLogId" IS NULL OR EXISTS (
            SELECT 1 FROM "CallLog" t
            WHERE t."id" = "CampaignAttempt"."callLogId" AND t."organizationId" = "CampaignAttempt"."organizationId"))
    );
