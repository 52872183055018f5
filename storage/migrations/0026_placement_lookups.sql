-- 0026: API calls whose create request Twilio never confirmed are settled by asking Twilio, as campaign dials are.
-- POST /v1/calls writes its CallLog (a call slot of the plan, the first minute's credits) before it asks Twilio for
-- the call; a request Twilio never answered, or a process that died meanwhile, leaves that CallLog IN_PROGRESS with
-- its placeholder callId. Once the request can no longer be on its way, one engine process at a time lists Twilio's
-- calls between the two numbers and adopts the call it finds or closes the CallLog as not placed. A campaign dial is
-- leased for that through its recipient's dispatch row (0007); an API call has no such row, so its lookup's lease is
-- a "PlacementLookup" row: taken with INSERT ... ON CONFLICT DO UPDATE only where the previous lease has expired, so
-- of several processes racing for one CallLog exactly one gets it, and deleted when the lookup settles it.
--
-- Engine work, as "CreditReservation" (0011) and "TransferLeg" (0025): no "organizationId" of its own (its CallLog
-- says whose it is) and no grant, so dialtone_api cannot reach it at all.

-- CreateTable
CREATE TABLE "PlacementLookup" (
    "callLogId" TEXT NOT NULL,
    "leaseOwner" TEXT NOT NULL,
    "leaseExpiresAt" TIMESTAMPTZ(3) NOT NULL,

    CONSTRAINT "PlacementLookup_pkey" PRIMARY KEY ("callLogId")
);

-- AddForeignKey
ALTER TABLE "PlacementLookup" ADD CONSTRAINT "PlacementLookup_callLogId_fkey" FOREIGN KEY ("callLogId") REFERENCES "CallLog"("id") ON DELETE CASCADE ON UPDATE CASCADE;
