-- 0023: Agent."successRate" kept up to date by counting, not by re-reading the agent's whole call history.
--
-- Until now every call's end (and every post-call verdict) ran an aggregate over all of the agent's CallLogs, their
-- metadata included, while holding the Agent row's lock: the cost of finishing a call grew with the number of calls
-- the agent had ever taken, and an agent's calls ended one at a time behind it. Now "AgentCallTally" keeps, per agent,
-- the counts the rate is made of, and a trigger on "CallLog" applies each row's change to them, whichever code writes
-- it (a call's end, a verdict, crash recovery, a deletion, an agent unlinked): the one home of the rule.
--
-- The rate, as before: the share of the agent's calls judged a success among those post-call analysis judged
-- ("metadata"."success" a boolean); an agent none of whose calls were judged gets the share of its finished calls
-- (any status but IN_PROGRESS) that COMPLETED; 0 with neither.

-- CreateTable
CREATE TABLE "AgentCallTally" (
    "agentId" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "finished" INTEGER NOT NULL DEFAULT 0,
    "completed" INTEGER NOT NULL DEFAULT 0,
    "judged" INTEGER NOT NULL DEFAULT 0,
    "succeeded" INTEGER NOT NULL DEFAULT 0,

    CONSTRAINT "AgentCallTally_pkey" PRIMARY KEY ("agentId"),
    CONSTRAINT "AgentCallTally_counts_check" CHECK (
        "completed" BETWEEN 0 AND "finished" AND "succeeded" BETWEEN 0 AND "judged"
    )
);

-- CreateIndex, AddForeignKey: composite tenant references (0010); the tally goes with its agent.
CREATE INDEX "AgentCallTally_agentId_organizationId_idx" ON "AgentCallTally"("agentId", "organizationId");
ALTER TABLE "AgentCallTally" ADD CONSTRAINT "AgentCallTally_agentId_organizationId_fkey"
    FOREIGN KEY ("agentId", "organizationId") REFERENCES "Agent"("id", "organizationId")
    ON DELETE CASCADE ON UPDATE CASCADE;

-- Row-level security and the API's privileges as on every tenant table (0005); the engine writes it only through the
-- trigger below.
ALTER TABLE "AgentCallTally" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "AgentCallTally_tenant_isolation" ON "AgentCallTally"
    USING ("organizationId" = current_setting('app.organization_id', true))
    WITH CHECK ("organizationId" = current_setting('app.organization_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON "AgentCallTally" TO dialtone_api;

-- Add counts (each -1, 0 or 1) to an agent's tally and set its rate from the result. Nothing when the agent is gone
-- (being deleted: ON DELETE SET NULL unlinks its calls after the row itself has gone, and the tally goes with it).
-- These functions run with the rights of whoever changed the CallLog (no SECURITY DEFINER): the API role, under its
-- organization's policies, touches only that organization's tally and agent, as the row's own "organizationId" says.
CREATE FUNCTION agent_call_tally_add(
    agent TEXT, organization TEXT, finished INTEGER, completed INTEGER, judged INTEGER, succeeded INTEGER
) RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE
    tally "AgentCallTally";
BEGIN
    -- The agent's row before its tally, always: a transaction that changed the agent earlier (the end of a call adds
    -- to "totalCalls") and one that reaches the tally first cannot wait for each other.
    PERFORM 1 FROM "Agent" WHERE "id" = agent AND "organizationId" = organization FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- A zero tally first (the counts may be negative: the row's own check holds only of their sums).
    INSERT INTO "AgentCallTally" ("agentId", "organizationId") VALUES (agent, organization)
    ON CONFLICT ("agentId") DO NOTHING;
    UPDATE "AgentCallTally" AS t SET
        "finished" = t."finished" + agent_call_tally_add.finished,
        "completed" = t."completed" + agent_call_tally_add.completed,
        "judged" = t."judged" + agent_call_tally_add.judged,
        "succeeded" = t."succeeded" + agent_call_tally_add.succeeded
    WHERE t."agentId" = agent
    RETURNING t.* INTO tally;
    UPDATE "Agent" SET "successRate" = COALESCE(
        100.0 * tally."succeeded" / NULLIF(tally."judged", 0),
        100.0 * tally."completed" / NULLIF(tally."finished", 0),
        0
    )
    WHERE "id" = agent AND "organizationId" = organization;
END
$$;

-- What one CallLog row counts for in its agent's tally: finished, completed, judged, judged a success (each 0 or 1).
CREATE FUNCTION call_log_counts(status "CallStatus", metadata JSONB) RETURNS INTEGER[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY[
        (status <> 'IN_PROGRESS')::INTEGER,
        (status = 'COMPLETED')::INTEGER,
        COALESCE(jsonb_typeof(metadata -> 'success') = 'boolean', FALSE)::INTEGER,
        COALESCE(metadata -> 'success' = 'true'::JSONB, FALSE)::INTEGER
    ]
$$;

-- A CallLog row was inserted, changed or deleted: take its old version's counts away and add its new version's.
CREATE FUNCTION call_log_tally_change() RETURNS TRIGGER LANGUAGE plpgsql AS $$
DECLARE
    old_counts INTEGER[] := ARRAY[0, 0, 0, 0];
    new_counts INTEGER[] := ARRAY[0, 0, 0, 0];
BEGIN
    IF TG_OP <> 'INSERT' AND OLD."agentId" IS NOT NULL THEN
        old_counts := call_log_counts(OLD."status", OLD."metadata");
    END IF;
    IF TG_OP <> 'DELETE' AND NEW."agentId" IS NOT NULL THEN
        new_counts := call_log_counts(NEW."status", NEW."metadata");
    END IF;
    IF TG_OP = 'UPDATE' AND OLD."agentId" IS NOT DISTINCT FROM NEW."agentId"
            AND OLD."organizationId" = NEW."organizationId" THEN
        IF old_counts <> new_counts THEN
            PERFORM agent_call_tally_add(
                NEW."agentId", NEW."organizationId",
                new_counts[1] - old_counts[1], new_counts[2] - old_counts[2],
                new_counts[3] - old_counts[3], new_counts[4] - old_counts[4]
            );
        END IF;
        RETURN NULL;
    END IF;
    IF old_counts <> ARRAY[0, 0, 0, 0] THEN
        PERFORM agent_call_tally_add(
            OLD."agentId", OLD."organizationId", -old_counts[1], -old_counts[2], -old_counts[3], -old_counts[4]
        );
    END IF;
    IF new_counts <> ARRAY[0, 0, 0, 0] THEN
        PERFORM agent_call_tally_add(
            NEW."agentId", NEW."organizationId", new_counts[1], new_counts[2], new_counts[3], new_counts[4]
        );
    END IF;
    RETURN NULL;
END
$$;

-- CreateTrigger: deferred to the commit, so the agent's row and tally are the last locks a transaction takes and it
-- holds them only while it commits (the tally is one row per agent, shared by all its calls: taken mid-transaction,
-- before the call's other rows, it could close a cycle of waits with a transaction that took those first). Each
-- event carries the row's versions of its own moment, so several changes to one row in a transaction add up.
-- Only rows whose part in a tally can have changed reach the function: a new call is IN_PROGRESS with no verdict,
-- and a turn's metadata (most of a busy engine's CallLog updates) holds none; the WHEN clauses are checked without
-- calling it. One statement changing many calls of one agent updates its tally once per call: fine for what the
-- engine does in bulk (crash recovery ending a lost node's calls), slow for a bulk load of finished calls, which
-- should come in batches.
CREATE CONSTRAINT TRIGGER "CallLog_tally_insert" AFTER INSERT ON "CallLog"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW."agentId" IS NOT NULL AND (NEW."status" <> 'IN_PROGRESS' OR NEW."metadata" ? 'success'))
    EXECUTE FUNCTION call_log_tally_change();
CREATE CONSTRAINT TRIGGER "CallLog_tally_update" AFTER UPDATE OF "status", "metadata", "agentId", "organizationId"
    ON "CallLog"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (
        OLD."agentId" IS DISTINCT FROM NEW."agentId"
        OR OLD."organizationId" <> NEW."organizationId"
        OR OLD."status" <> NEW."status"
        OR (OLD."metadata" -> 'success') IS DISTINCT FROM (NEW."metadata" -> 'success')
    )
    EXECUTE FUNCTION call_log_tally_change();
CREATE CONSTRAINT TRIGGER "CallLog_tally_delete" AFTER DELETE ON "CallLog"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (OLD."agentId" IS NOT NULL AND (OLD."status" <> 'IN_PROGRESS' OR OLD."metadata" ? 'success'))
    EXECUTE FUNCTION call_log_tally_change();

-- The tallies of the calls already there (the triggers above already hold their table: no write is missed between
-- this count and the commit), and every agent's rate from them.
INSERT INTO "AgentCallTally" ("agentId", "organizationId", "finished", "completed", "judged", "succeeded")
SELECT r."agentId", r."organizationId",
       sum(r.counts[1]), sum(r.counts[2]), sum(r.counts[3]), sum(r.counts[4])
FROM (
    SELECT c."agentId", c."organizationId", call_log_counts(c."status", c."metadata") AS counts
    FROM "CallLog" c
    JOIN "Agent" a ON a."id" = c."agentId" AND a."organizationId" = c."organizationId"
) r
GROUP BY r."agentId", r."organizationId";

-- Every agent's rate from its tally (an agent with no calls gets a zero tally and a rate of 0), by the function the
-- triggers use, adding nothing to the counts.
SELECT agent_call_tally_add(a."id", a."organizationId", 0, 0, 0, 0) FROM "Agent" a ORDER BY a."id";
