-- 0011: credits are reserved before a call runs, so a balance never goes below zero. A call that starts takes
-- its first minute from "Organization"."credits" into a "CreditReservation" (one per CallLog) with a conditional
-- UPDATE; while it runs it moves one more minute at a time; its end charges the minutes it used and returns the
-- rest. "creditsPerMinute" is the organization's plan rate when the call started, so a plan change mid-call
-- does not reprice it.
--
-- Balances the old end-of-call charge left below zero are set to zero before the CHECK holds the rule.

UPDATE "Organization" SET "credits" = 0 WHERE "credits" < 0;
ALTER TABLE "Organization" ADD CONSTRAINT "Organization_credits_check" CHECK ("credits" >= 0);

-- CreateTable
CREATE TABLE "CreditReservation" (
    "callLogId" TEXT NOT NULL,
    "credits" INTEGER NOT NULL,
    "creditsPerMinute" INTEGER NOT NULL,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "CreditReservation_pkey" PRIMARY KEY ("callLogId"),
    CONSTRAINT "CreditReservation_credits_check" CHECK ("credits" >= 0),
    CONSTRAINT "CreditReservation_creditsPerMinute_check" CHECK ("creditsPerMinute" >= 0)
);

-- AddForeignKey
ALTER TABLE "CreditReservation" ADD CONSTRAINT "CreditReservation_callLogId_fkey" FOREIGN KEY ("callLogId") REFERENCES "CallLog"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- Billing is the owner role's work, as for "Organization"."credits" (0005): the table has no "organizationId" of
-- its own (its CallLog says whose it is) and no grant, so dialtone_api cannot reach it at all.

-- updatedAt follows every extension, as for the platform's tables (0001).
CREATE TRIGGER "CreditReservation_touch_updatedAt" BEFORE UPDATE ON "CreditReservation"
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION "dialtone_touch_updated_at"();
