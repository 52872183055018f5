-- 0013: the organization's do-not-call list. A number on it is never dialed: campaigns skip it when they claim
-- recipients (the recipient ends DO_NOT_CALL with the entry's reason) and /v1/calls refuses it. Numbers are
-- E.164 (storage/do_not_call.py normalizes them with config/phone.py, the one rule for numbers), one entry per
-- organization and number. An entry added by an opt-out in a call names that call's CallLog; the reference is
-- composite (callLogId, organizationId) like 0010's, and cleared alone when the CallLog goes: the number stays.
--   source: API, CSV_IMPORT, CLI, OPT_OUT_MODEL (the model called `opt_out`), OPT_OUT_PHRASE (the offline model
--           heard "stop calling me" or the like).

CREATE TABLE "DoNotCallEntry" (
    "id" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "phoneNumber" TEXT NOT NULL,
    "reason" TEXT,
    "source" TEXT NOT NULL,
    "callLogId" TEXT,
    "createdAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "DoNotCallEntry_pkey" PRIMARY KEY ("id"),
    CONSTRAINT "DoNotCallEntry_source_check"
        CHECK ("source" IN ('API', 'CSV_IMPORT', 'CLI', 'OPT_OUT_MODEL', 'OPT_OUT_PHRASE'))
);

-- One entry per number; the same index answers "is this number listed?" for claims and calls.
CREATE UNIQUE INDEX "DoNotCallEntry_organizationId_phoneNumber_key"
    ON "DoNotCallEntry"("organizationId", "phoneNumber");
-- The API's list, newest first.
CREATE INDEX "DoNotCallEntry_organizationId_createdAt_idx" ON "DoNotCallEntry"("organizationId", "createdAt", "id");
CREATE INDEX "DoNotCallEntry_callLogId_organizationId_idx" ON "DoNotCallEntry"("callLogId", "organizationId");

ALTER TABLE "DoNotCallEntry" ADD CONSTRAINT "DoNotCallEntry_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "DoNotCallEntry" ADD CONSTRAINT "DoNotCallEntry_callLogId_organizationId_fkey"
    FOREIGN KEY ("callLogId", "organizationId") REFERENCES "CallLog"("id", "organizationId")
    ON DELETE SET NULL ("callLogId") ON UPDATE CASCADE;

ALTER TABLE "DoNotCallEntry" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "DoNotCallEntry_tenant_isolation" ON "DoNotCallEntry"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "DoNotCallEntry" TO dialtone_api;

-- A recipient whose number is on the list when the dispatcher comes to it is never dialed: DO_NOT_CALL, final.
ALTER TABLE "CampaignRecipientDispatch" DROP CONSTRAINT "CampaignRecipientDispatch_state_check";
ALTER TABLE "CampaignRecipientDispatch" ADD CONSTRAINT "CampaignRecipientDispatch_state_check"
    CHECK ("state" IN ('QUEUED', 'DIALING', 'IN_CALL', 'DONE', 'FAILED', 'INVALID', 'CANCELED', 'DO_NOT_CALL'));
