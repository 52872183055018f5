-- 0005: tenant isolation enforced by PostgreSQL. Every tenant table gets row-level security keyed on the
-- transaction-local setting app.organization_id, and the API role dialtone_api (0004) gets exactly the
-- privileges the /v1 API needs. storage/tenancy.py's tenant_transaction switches to that role and sets the
-- organization; a transaction that did not set it sees current_setting(..., true) as NULL or '' and so matches
-- no row at all.
--
-- RLS is enabled, not FORCEd: the owner role, which the engine's cross-organization background work (calls,
-- dispatch, webhook delivery, migrations) connects as, keeps full access. Tables with no grant here
-- ("EngineNode", "SchemaMigration") are not reachable by dialtone_api at all.

-- "Organization": the tenant row itself, matched on its "id". The API may read its own organization and
-- rename it; creating and deleting organizations, and changing "plan" or "credits" (billing), stay with the
-- owner role, hence no INSERT/DELETE grant and a column-level UPDATE grant.
ALTER TABLE "Organization" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Organization_tenant_isolation" ON "Organization"
    USING ("id" = current_setting('app.organization_id', true))
    WITH CHECK ("id" = current_setting('app.organization_id', true));
GRANT SELECT ON "Organization" TO dialtone_api;
GRANT UPDATE ("name", "slug") ON "Organization" TO dialtone_api;

-- "User": no "organizationId"; a user may belong to several organizations through "UserOrganization". An
-- organization sees the users that are its members (the subquery itself runs under "UserOrganization"'s
-- policy). Users are shared identities, so no organization may create, change or delete one: sign-up,
-- passwords and two-factor settings are the owner role's work.
ALTER TABLE "User" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "User_tenant_isolation" ON "User"
    FOR SELECT
    USING (EXISTS (
        SELECT 1 FROM "UserOrganization" m
        WHERE m."userId" = "User"."id" AND m."organizationId" = current_setting('app.organization_id', true)
    ));
GRANT SELECT ON "User" TO dialtone_api;

-- "Voice": "organizationId" is NULL for the platform's system voices. Every tenant may read those; the
-- standard policy is the only one that allows writes, and a NULL "organizationId" never equals the setting,
-- so no tenant can create, change or delete a system voice, nor turn its own voice into one.
ALTER TABLE "Voice" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Voice_tenant_isolation" ON "Voice"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
CREATE POLICY "Voice_system_voices_readable" ON "Voice"
    FOR SELECT
    USING ("organizationId" IS NULL);
GRANT SELECT, INSERT, UPDATE, DELETE ON "Voice" TO dialtone_api;

-- Tables owned by one organization: the standard pattern, full read and write of the organization's own rows.
-- Join tables ("UserOrganization" memberships, "Agent*" links) carry their own "organizationId" and are
-- treated alike; "KnowledgeBaseDocument" carries it too, so it needs no policy through its parent.
ALTER TABLE "UserOrganization" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "UserOrganization_tenant_isolation" ON "UserOrganization"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "UserOrganization" TO dialtone_api;

ALTER TABLE "Agent" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Agent_tenant_isolation" ON "Agent"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "Agent" TO dialtone_api;

ALTER TABLE "Campaign" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Campaign_tenant_isolation" ON "Campaign"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "Campaign" TO dialtone_api;

ALTER TABLE "CampaignRecipient" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "CampaignRecipient_tenant_isolation" ON "CampaignRecipient"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "CampaignRecipient" TO dialtone_api;

ALTER TABLE "CallLog" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "CallLog_tenant_isolation" ON "CallLog"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "CallLog" TO dialtone_api;

ALTER TABLE "KnowledgeBase" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "KnowledgeBase_tenant_isolation" ON "KnowledgeBase"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "KnowledgeBase" TO dialtone_api;

ALTER TABLE "KnowledgeBaseDocument" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "KnowledgeBaseDocument_tenant_isolation" ON "KnowledgeBaseDocument"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "KnowledgeBaseDocument" TO dialtone_api;

ALTER TABLE "ConversationPath" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "ConversationPath_tenant_isolation" ON "ConversationPath"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "ConversationPath" TO dialtone_api;

ALTER TABLE "Tool" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Tool_tenant_isolation" ON "Tool"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "Tool" TO dialtone_api;

ALTER TABLE "Event" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Event_tenant_isolation" ON "Event"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "Event" TO dialtone_api;

ALTER TABLE "PhoneNumber" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "PhoneNumber_tenant_isolation" ON "PhoneNumber"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "PhoneNumber" TO dialtone_api;

ALTER TABLE "ApiKey" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "ApiKey_tenant_isolation" ON "ApiKey"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "ApiKey" TO dialtone_api;

ALTER TABLE "AgentKnowledgeBase" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "AgentKnowledgeBase_tenant_isolation" ON "AgentKnowledgeBase"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "AgentKnowledgeBase" TO dialtone_api;

ALTER TABLE "AgentTool" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "AgentTool_tenant_isolation" ON "AgentTool"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "AgentTool" TO dialtone_api;

ALTER TABLE "AgentConversationPath" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "AgentConversationPath_tenant_isolation" ON "AgentConversationPath"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "AgentConversationPath" TO dialtone_api;

-- "CallTurn" (0002): written by the engine as the owner role; the API reads transcripts and may delete them
-- with their call, so it gets the standard pattern like every other tenant table.
ALTER TABLE "CallTurn" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "CallTurn_tenant_isolation" ON "CallTurn"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "CallTurn" TO dialtone_api;

-- References by "id" alone. Foreign-key checks run as the table owner and ignore row-level security, so
-- without these an organization could point its own row at another organization's row: link its agent to
-- someone else's phone number (inbound routing), block the deletion of someone else's agent with a campaign
-- (ON DELETE NO ACTION), or probe which ids exist. These RESTRICTIVE policies (AND-ed with the ones above) let
-- a written row reference only rows of its own organization, or a system voice. Composite foreign keys
-- ("id", "organizationId") already guarantee this for the other references and need nothing here.
CREATE POLICY "Agent_own_references_insert" ON "Agent" AS RESTRICTIVE
    FOR INSERT
    WITH CHECK (
        ("phoneNumberId" IS NULL OR EXISTS (
            SELECT 1 FROM "PhoneNumber" p
            WHERE p."id" = "Agent"."phoneNumberId" AND p."organizationId" = "Agent"."organizationId"))
        AND ("voiceId" IS NULL OR EXISTS (
            SELECT 1 FROM "Voice" v
            WHERE v."id" = "Agent"."voiceId"
              AND (v."organizationId" IS NULL OR v."organizationId" = "Agent"."organizationId")))
    );
CREATE POLICY "Agent_own_references_update" ON "Agent" AS RESTRICTIVE
    FOR UPDATE
    USING (true)
    WITH CHECK (
        ("phoneNumberId" IS NULL OR EXISTS (
            SELECT 1 FROM "PhoneNumber" p
            WHERE p."id" = "Agent"."phoneNumberId" AND p."organizationId" = "Agent"."organizationId"))
        AND ("voiceId" IS NULL OR EXISTS (
            SELECT 1 FROM "Voice" v
            WHERE v."id" = "Agent"."voiceId"
              AND (v."organizationId" IS NULL OR v."organizationId" = "Agent"."organizationId")))
    );

CREATE POLICY "Campaign_own_references_insert" ON "Campaign" AS RESTRICTIVE
    FOR INSERT
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM "Agent" a
            WHERE a."id" = "Campaign"."agentId" AND a."organizationId" = "Campaign"."organizationId")
        AND ("conversationPathId" IS NULL OR EXISTS (
            SELECT 1 FROM "ConversationPath" c
            WHERE c."id" = "Campaign"."conversationPathId" AND c."organizationId" = "Campaign"."organizationId"))
    );
CREATE POLICY "Campaign_own_references_update" ON "Campaign" AS RESTRICTIVE
    FOR UPDATE
    USING (true)
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM "Agent" a
            WHERE a."id" = "Campaign"."agentId" AND a."organizationId" = "Campaign"."organizationId")
        AND ("conversationPathId" IS NULL OR EXISTS (
            SELECT 1 FROM "ConversationPath" c
            WHERE c."id" = "Campaign"."conversationPathId" AND c."organizationId" = "Campaign"."organizationId"))
    );

CREATE POLICY "CallLog_own_references_insert" ON "CallLog" AS RESTRICTIVE
    FOR INSERT
    WITH CHECK (
        ("agentId" IS NULL OR EXISTS (
            SELECT 1 FROM "Agent" a
            WHERE a."id" = "CallLog"."agentId" AND a."organizationId" = "CallLog"."organizationId"))
        AND ("campaignId" IS NULL OR EXISTS (
            SELECT 1 FROM "Campaign" c
            WHERE c."id" = "CallLog"."campaignId" AND c."organizationId" = "CallLog"."organizationId"))
    );
CREATE POLICY "CallLog_own_references_update" ON "CallLog" AS RESTRICTIVE
    FOR UPDATE
    USING (true)
    WITH CHECK (
        ("agentId" IS NULL OR EXISTS (
            SELECT 1 FROM "Agent" a
            WHERE a."id" = "CallLog"."agentId" AND a."organizationId" = "CallLog"."organizationId"))
        AND ("campaignId" IS NULL OR EXISTS (
            SELECT 1 FROM "Campaign" c
            WHERE c."id" = "CallLog"."campaignId" AND c."organizationId" = "CallLog"."organizationId"))
    );

CREATE POLICY "Event_own_references_insert" ON "Event" AS RESTRICTIVE
    FOR INSERT
    WITH CHECK (
        "agentId" IS NULL OR EXISTS (
            SELECT 1 FROM "Agent" a
            WHERE a."id" = "Event"."agentId" AND a."organizationId" = "Event"."organizationId")
    );
CREATE POLICY "Event_own_references_update" ON "Event" AS RESTRICTIVE
    FOR UPDATE
    USING (true)
    WITH CHECK (
        "agentId" IS NULL OR EXISTS (
            SELECT 1 FROM "Agent" a
            WHERE a."id" = "Event"."agentId" AND a."organizationId" = "Event"."organizationId")
    );

-- A key acts for a user of its own organization: the user must be a member.
CREATE POLICY "ApiKey_own_references_insert" ON "ApiKey" AS RESTRICTIVE
    FOR INSERT
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM "UserOrganization" m
            WHERE m."userId" = "ApiKey"."userId" AND m."organizationId" = "ApiKey"."organizationId")
    );
CREATE POLICY "ApiKey_own_references_update" ON "ApiKey" AS RESTRICTIVE
    FOR UPDATE
    USING (true)
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM "UserOrganization" m
            WHERE m."userId" = "ApiKey"."userId" AND m."organizationId" = "ApiKey"."organizationId")
    );

CREATE POLICY "CallTurn_own_references_insert" ON "CallTurn" AS RESTRICTIVE
    FOR INSERT
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM "CallLog" c
            WHERE c."id" = "CallTurn"."callLogId" AND c."organizationId" = "CallTurn"."organizationId")
    );
CREATE POLICY "CallTurn_own_references_update" ON "CallTurn" AS RESTRICTIVE
    FOR UPDATE
    USING (true)
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM "CallLog" c
            WHERE c."id" = "CallTurn"."callLogId" AND c."organizationId" = "CallTurn"."organizationId")
    );
