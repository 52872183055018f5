-- 0033: billing takes its locks in one order, and a TRUNCATE of the tables holding credits alone is refused.
--
-- The order: the calls' "CallLog" rows, then their "CreditReservation" or "TransferLeg" rows, then the "Organization"
-- rows whose balance changes, last and in id order. 0031's row trigger took the organization's row with each deleted
-- call: a `DELETE FROM "CallLog"` of several running calls held it while it went on to lock the next CallLog, and
-- deadlocked with the engine ending that call (CallLog, reservation, organization), metering its next minute
-- (reservation, organization) or closing it in recovery (CallLogs, reservations, organizations): one side failed with
-- "deadlock detected", the dashboard's deletion or the engine's billing. The row trigger now settles the reservation
-- into "CreditReturn", and a statement trigger returns what it holds once the statement has taken every CallLog it
-- deletes. The engine's recovery (credit_reservations.settle_orphaned_reservations) returns credits the same way.
--
-- "CreditReservation" and "TransferLeg" hold credits taken from balances; a TRUNCATE of either alone (no CallLog with
-- it) lost them. It is refused while they hold any, with the safe way in the error: deleting the calls (or
-- `TRUNCATE "CallLog" CASCADE`) settles them.

-- CreateTable: credits settled reservations return to their organizations, kept from the settlement until the
-- organizations' rows are locked, in id order, by "dialtone_return_credits" in the same statement: rows never outlive
-- the statement that writes them.
CREATE TABLE "CreditReturn" (
    "callLogId" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "credits" INTEGER NOT NULL,

    CONSTRAINT "CreditReturn_pkey" PRIMARY KEY ("callLogId")
);

-- Billing is the owner role's work, as for "DetachedTransferLeg" (0031): no grant, row-level security all the same.
-- No foreign key: an organization deleted with its calls is gone by the statement's end, which returns nothing to it,
-- as 0031 did.
ALTER TABLE "CreditReturn" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "CreditReturn_tenant_isolation" ON "CreditReturn"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));

-- 0031's function, the organizations' rows left alone: the reservations of the calls `ids` are settled into
-- "CreditReturn" ("dialtone_return_credits" gives it back), and their open legs detached.
CREATE OR REPLACE FUNCTION "dialtone_keep_calls_credits"("ids" text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    WITH held AS (
        DELETE FROM "CreditReservation" r USING "CallLog" c
        WHERE r."callLogId" = ANY("ids") AND c."id" = r."callLogId"
        RETURNING r."callLogId", c."organizationId",
                  r."credits" - "dialtone_credits_surely_used"(r."credits", r."creditsPerMinute",
                                                               c."metadata" ? 'engineNode') AS "back"
    )
    INSERT INTO "CreditReturn" ("callLogId", "organizationId", "credits")
    SELECT "callLogId", "organizationId", "back" FROM held;

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

-- Give the organizations what "CreditReturn" holds for them (this transaction's rows: no other's outlives its
-- statement), their rows locked in id order first.
CREATE FUNCTION "dialtone_return_credits"() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM FROM "Organization"
    WHERE "id" IN (SELECT "organizationId" FROM "CreditReturn")
    ORDER BY "id"
    FOR NO KEY UPDATE;

    WITH returned AS (
        DELETE FROM "CreditReturn" RETURNING "organizationId", "credits"
    ), owed AS (
        SELECT "organizationId", sum("credits")::integer AS "credits" FROM returned GROUP BY "organizationId"
    )
    UPDATE "Organization" o SET "credits" = o."credits" + owed."credits"
    FROM owed
    WHERE o."id" = owed."organizationId";
END
$$;

-- At the end of a statement deleting CallLogs (a cascade's too), once it holds every row it deletes. SECURITY
-- DEFINER, as the row trigger is (0031).
CREATE FUNCTION "dialtone_return_deleted_calls_credits"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM "dialtone_return_credits"();
    RETURN NULL;
END
$$;

-- 0031's TRUNCATE trigger, returning the credits it keeps at once (the TRUNCATE holds the whole table already).
-- Redefined whole: SECURITY DEFINER again, and its search_path pinned again below.
CREATE OR REPLACE FUNCTION "dialtone_keep_truncated_calls_credits"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
    PERFORM "dialtone_keep_calls_credits"(ARRAY(
        SELECT "callLogId" FROM "CreditReservation"
        UNION SELECT "callLogId" FROM "TransferLeg" WHERE "endedAt" IS NULL
    ));
    PERFORM "dialtone_return_credits"();
    RETURN NULL;
END
$$;

-- Refuse a TRUNCATE of "CreditReservation" or "TransferLeg" that would empty rows holding credits: running calls'
-- reservations, open legs. One of "CallLog" (or cascading to it) has settled them by then, its trigger firing first.
CREATE FUNCTION "dialtone_refuse_truncating_held_credits"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    holding bigint;
BEGIN
    IF TG_TABLE_NAME = 'CreditReservation' THEN
        SELECT count(*) INTO holding FROM "CreditReservation";
    ELSE
        SELECT count(*) INTO holding FROM "TransferLeg" WHERE "endedAt" IS NULL;
    END IF;
    IF holding > 0 THEN
        RAISE EXCEPTION 'TRUNCATE "%" refused: % of its rows hold credits of running calls, which it would lose',
                        TG_TABLE_NAME, holding
            USING ERRCODE = 'object_in_use',
                  HINT = 'Delete their calls instead (DELETE FROM "CallLog" WHERE ..., or TRUNCATE "CallLog" CASCADE): '
                         'that settles what they hold and returns the rest to their organizations.';
    END IF;
    RETURN NULL;
END
$$;

DO $$
DECLARE
    keeping TEXT;
BEGIN
    FOREACH keeping IN ARRAY ARRAY['dialtone_keep_calls_credits(text[])', 'dialtone_return_credits()',
                                   'dialtone_return_deleted_calls_credits()',
                                   'dialtone_keep_truncated_calls_credits()',
                                   'dialtone_refuse_truncating_held_credits()']
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', keeping, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', keeping);
    END LOOP;
END
$$;

CREATE TRIGGER "CallLog_return_deleted_credits" AFTER DELETE ON "CallLog"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_return_deleted_calls_credits"();

CREATE TRIGGER "CreditReservation_refuse_truncate" BEFORE TRUNCATE ON "CreditReservation"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_refuse_truncating_held_credits"();

CREATE TRIGGER "TransferLeg_refuse_truncate" BEFORE TRUNCATE ON "TransferLeg"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_refuse_truncating_held_credits"();
