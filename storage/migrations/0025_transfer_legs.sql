-- 0025: a transferred call's dialed leg is paid for. When the agent hands a caller to a number, the credits of the
-- leg's longest allowed length are moved from "Organization"."credits" into a "TransferLeg" (one per CallLog), and
-- Twilio is told that length as the <Dial>'s timeLimit, so the leg can never run past what was reserved. When the
-- <Dial> ends, Twilio's action request gives the leg's length: its started minutes are charged at the call's rate
-- and the rest goes back. A leg whose request never came is settled from Twilio's record of the dialed call once
-- its time limit has passed.
--
-- Billing is the owner role's work, as for "CreditReservation" (0011): no grant, so dialtone_api cannot reach it.

-- CreateTable
CREATE TABLE "TransferLeg" (
    "callLogId" TEXT NOT NULL,
    "to" TEXT NOT NULL,
    "credits" INTEGER NOT NULL,
    "creditsPerMinute" INTEGER NOT NULL,
    "timeLimitSeconds" INTEGER NOT NULL,
    "startedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "endedAt" TIMESTAMPTZ(3),
    "dialStatus" TEXT,
    "durationSeconds" INTEGER,
    "creditsCharged" INTEGER,

    CONSTRAINT "TransferLeg_pkey" PRIMARY KEY ("callLogId"),
    CONSTRAINT "TransferLeg_credits_check" CHECK ("credits" >= 0),
    CONSTRAINT "TransferLeg_creditsPerMinute_check" CHECK ("creditsPerMinute" >= 0),
    CONSTRAINT "TransferLeg_timeLimitSeconds_check" CHECK ("timeLimitSeconds" > 0),
    CONSTRAINT "TransferLeg_durationSeconds_check" CHECK ("durationSeconds" >= 0),
    CONSTRAINT "TransferLeg_creditsCharged_check" CHECK ("creditsCharged" BETWEEN 0 AND "credits"),
    CONSTRAINT "TransferLeg_ended_check" CHECK (("endedAt" IS NULL) = ("creditsCharged" IS NULL))
);

-- AddForeignKey
ALTER TABLE "TransferLeg" ADD CONSTRAINT "TransferLeg_callLogId_fkey" FOREIGN KEY ("callLogId") REFERENCES "CallLog"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- The settlement sweep reads the legs still open, oldest first.
CREATE INDEX "TransferLeg_open_idx" ON "TransferLeg" ("startedAt") WHERE "endedAt" IS NULL;
