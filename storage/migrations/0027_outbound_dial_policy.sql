-- 0027: the organization's outbound dial policy, against toll fraud (International Revenue Share Fraud above all):
-- someone holding a leaked API key must not be able to place calls to premium-rate numbers at the organization's
-- expense. Every outbound call (POST /v1/calls, campaign recipients at their import and again at their dial) is
-- checked by one rule (storage/dial_policies.py): by default only fixed-line, mobile, fixed-line-or-mobile, VoIP
-- and toll-free numbers of a country are dialed, not those of the international networks (+870, +881, +882, ...:
-- satellite phones and the like, the dearest destinations there are). An organization without a row has that
-- default.
--   allowedKinds:     the kinds dialed besides the default (config/phone.py's NumberKind values), an opt-in that an
--                     OWNER or ADMIN makes deliberately; empty: none.
--   allowedCountries: ISO 3166 region codes ('GB', 'US'): only numbers of these countries are dialed. NULL: any.
--   internationalNetworks: whether numbers of the international networks are dialed too (subject to the kinds).

-- CreateTable
CREATE TABLE "OutboundDialPolicy" (
    "organizationId" TEXT NOT NULL,
    "allowedKinds" TEXT[] NOT NULL DEFAULT ARRAY[]::TEXT[],
    "allowedCountries" TEXT[],
    "internationalNetworks" BOOLEAN NOT NULL DEFAULT false,
    "updatedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "OutboundDialPolicy_pkey" PRIMARY KEY ("organizationId"),
    CONSTRAINT "OutboundDialPolicy_allowedKinds_check" CHECK (
        "allowedKinds" <@ ARRAY[
            'premium_rate', 'shared_cost', 'personal', 'pager', 'uan', 'voicemail', 'unclassified'
        ]::TEXT[]
    ),
    CONSTRAINT "OutboundDialPolicy_allowedCountries_check" CHECK (
        "allowedCountries" IS NULL
        OR (array_position("allowedCountries", NULL) IS NULL  -- array_to_string skips NULL elements
            AND array_to_string("allowedCountries", ',') ~ '^([A-Z]{2}(,|$))+$')
    )
);

-- AddForeignKey
ALTER TABLE "OutboundDialPolicy" ADD CONSTRAINT "OutboundDialPolicy_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id") ON DELETE CASCADE ON UPDATE CASCADE;

CREATE TRIGGER "OutboundDialPolicy_touch_updatedAt" BEFORE UPDATE ON "OutboundDialPolicy"
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION "dialtone_touch_updated_at"();

ALTER TABLE "OutboundDialPolicy" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "OutboundDialPolicy_tenant_isolation" ON "OutboundDialPolicy"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "OutboundDialPolicy" TO dialtone_api;
