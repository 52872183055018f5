-- 0014: what a caller hears when a number's agents are all outside their hours ("time-based routing": several
-- agents on one number, each with its `inboundHours`). Said with TwiML <Say>, then Twilio hangs up.
-- The table already has row-level security and the API role's grants (0005): the new column is covered.

ALTER TABLE "PhoneNumber"
    ADD COLUMN "closedMessage" TEXT NOT NULL
        DEFAULT 'Sorry, we are closed right now. Please call back during our opening hours. Goodbye.';
