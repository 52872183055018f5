-- 0003: where an agent turn's response time went, stage by stage: milliseconds from the moment the caller
-- stopped speaking to the recognizer's end of turn, the model's first token, the first sentence, the
-- synthesizer's first byte, the first frame sent to Twilio and the first mark Twilio echoed back.

-- AlterTable
ALTER TABLE "CallTurn" ADD COLUMN "latency" JSONB;

ALTER TABLE "CallTurn" ADD CONSTRAINT "CallTurn_latency_check" CHECK ("latency" IS NULL OR jsonb_typeof("latency") = 'object');
