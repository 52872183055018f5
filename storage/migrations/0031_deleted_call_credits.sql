-- 0031: the credits a call holds do not go with its CallLog. The dashboard deletes "CallLog" rows in SQL, also of calls
-- still running; the cascades took the call's "CreditReservation" (0011) and its open "TransferLeg" (0025) with the row,
-- and with them every credit they held: a reserved minute the call never started, a transfer's whole time limit.
--
-- A trigger on "CallLog" now settles the call's reservation before the row goes, by the rule the recovery of lost
-- calls uses ("dialtone_credits_surely_used"): a call whose media stream started (its CallLog names an engine node)
-- pays every minute it reserved but the last, at least one; a call whose stream never started pays nothing; the rest
-- returns to its organization. The engine hangs such a call up at once (it finds its CallLog gone), so it may be
-- undercharged a minute, never overcharged.
--
-- A transfer's open leg is still dialed, and only Twilio knows how long it talks: the trigger moves it into
-- "DetachedTransferLeg", with the organization and the call it belongs to, where the dial's action request (or the
-- settlement sweep, from Twilio's record) settles it as it would have the leg. A leg already settled goes with its call,
-- as before. An organization deleted with its calls keeps nothing. A `TRUNCATE "CallLog"` (or one cascading to it)
-- keeps the credits of the calls it empties alike, by a statement trigger.

-- The credits a reservation holding `credits` at `per_minute` surely used: those of every minute reserved but the last
-- (each next minute is reserved in the last seconds of the one before), at least one, when the call's stream started.
CREATE FUNCTION "dialtone_credits_surely_used"("credits" integer, "per_minute" integer, "stream_started" boolean)
    RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN "stream_started" THEN GREATEST("credits" - "per_minute", "per_minute") ELSE 0 END
$$;

-- CreateTable
CREATE TABLE "DetachedTransferLeg" (
    "callLogId" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "agentId" TEXT,
    "campaignId" TEXT,
    "callId" TEXT NOT NULL,
    "to" TEXT NOT NULL,
    "credits" INTEGER NOT NULL,
    "creditsPerMinute" INTEGER NOT NULL,
    "timeLimitSeconds" INTEGER NOT NULL,
    "startedAt" TIMESTAMPTZ(3) NOT NULL,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "DetachedTransferLeg_pkey" PRIMARY KEY ("callLogId"),
    CONSTRAINT "DetachedTransferLeg_credits_check" CHECK ("credits" >= 0),
    CONSTRAINT "DetachedTransferLeg_creditsPerMinute_check" CHECK ("creditsPerMinute" >= 0),
    CONSTRAINT "DetachedTransferLeg_timeLimitSeconds_check" CHECK ("timeLimitSeconds" > 0)
);

-- AddForeignKey: the legs of a deleted organization go with it (nothing is left to pay or to pay back).
ALTER TABLE "DetachedTransferLeg" ADD CONSTRAINT "DetachedTransferLeg_organizationId_fkey" FOREIGN KEY ("organizationId")
    REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- CreateIndex: an organization's detached legs.
CREATE INDEX "DetachedTransferLeg_organizationId_idx" ON "DetachedTransferLeg"("organizationId");

-- CreateIndex: the settlement sweep reads them oldest first, as it does the open legs.
CREATE INDEX "DetachedTransferLeg_startedAt_idx" ON "DetachedTransferLeg"("startedAt");

-- Billing is the owner role's work, as for "CreditReservation" (0011) and "TransferLeg" (0025): no grant, so
-- dialtone_api cannot reach it (a leg it could write would be a refund it could make up). Row-level security is on
-- all the same, with the tenant policy, should a grant ever be given.
ALTER TABLE "DetachedTransferLeg" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "DetachedTransferLeg_tenant_isolation" ON "DetachedTransferLeg"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));

-- Settle the reservations of the calls `ids` and detach their open legs, before their CallLogs go. Called by the
-- triggers below only (no grant): it runs as the owner role, whose work billing is.
CREATE FUNCTION "dialtone_keep_calls_credits"("ids" text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    WITH held AS (
        DELETE FROM "CreditReservation" r USING "CallLog" c
        WHERE r."callLogId" = ANY("ids") AND c."id" = r."callLogId"
        RETURNING c."organizationId",
                  r."credits" - "dialtone_credits_surely_used"(r."credits", r."creditsPerMinute",
                                                               c."metadata" ? 'engineNode') AS "back"
    ), owed AS (
        SELECT "organizationId", sum("back")::integer AS "back" FROM held GROUP BY "organizationId"
    )
    UPDATE "Organization" o SET "credits" = o."credits" + owed."back"
    FROM owed
    WHERE o."id" = owed."organizationId";

    -- Deleted with its organization (a cascade), a call's leg has nobody left to settle with: it goes with the call.
    WITH leg AS (
        DELETE FROM "TransferLeg" l USING "CallLog" c
        WHERE l."callLogId" = ANY("ids") AND l."endedAt" IS NULL AND c."id" = l."callLogId"
        RETURNING c."id", c."organizationId", c."agentId", c."campaignId", c."callId", l."to", l."credits",
                  l."creditsPerMinute", l."timeLimitSeconds", l."startedAt"
    )
    INSERT INTO "DetachedTransferLeg" ("callLogId", "organizationId", "agentId", "campaignId", "callId", "to", "credits",
                                       "creditsPerMinute", "timeLimitSeconds", "startedAt")
    SELECT leg."id", leg."organizationId", leg."agentId", leg."campaignId", leg."callId", leg."to", leg."credits",
           leg."creditsPerMinute", leg."timeLimitSeconds", leg."startedAt"
    FROM leg JOIN "Organization" o ON o."id" = leg."organizationId";
END
$$;

-- A deleted call's credits. SECURITY DEFINER: whoever deletes the call (the API role under its organization's
-- policy, a dashboard's role with no grant on the billing tables) must never have the DELETE refused for want of
-- rights on them; the function's search_path is pinned to this schema below.
CREATE FUNCTION "dialtone_keep_deleted_call_credits"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM "dialtone_keep_calls_credits"(ARRAY[OLD."id"]);
    RETURN OLD;
END
$$;

-- TRUNCATE fires no row trigger: the credits of every call a `TRUNCATE "CallLog"` (or one cascading to it) empties
-- are kept by a statement trigger, which still sees the rows. An organization truncated in the same statement
-- takes its detached legs with it, as a deleted one does.
CREATE FUNCTION "dialtone_keep_truncated_calls_credits"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM "dialtone_keep_calls_credits"(ARRAY(
        SELECT "callLogId" FROM "CreditReservation"
        UNION SELECT "callLogId" FROM "TransferLeg" WHERE "endedAt" IS NULL
    ));
    RETURN NULL;
END
$$;

DO $$
DECLARE
    keeping TEXT;
BEGIN
    FOREACH keeping IN ARRAY ARRAY['dialtone_keep_calls_credits(text[])', 'dialtone_keep_deleted_call_credits()',
                                   'dialtone_keep_truncated_calls_credits()']
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', keeping, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', keeping);
    END LOOP;
END
$$;

CREATE TRIGGER "CallLog_keep_credits" BEFORE DELETE ON "CallLog"
    FOR EACH ROW EXECUTE FUNCTION "dialtone_keep_deleted_call_credits"();

CREATE TRIGGER "CallLog_keep_truncated_credits" BEFORE TRUNCATE ON "CallLog"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_keep_truncated_calls_credits"();
