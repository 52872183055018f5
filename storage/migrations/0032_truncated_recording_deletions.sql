-- 0032: a recording goes with its call when the call is truncated, too. TRUNCATE fires no row trigger, so 0030's
-- queue heard nothing of a `TRUNCATE "CallLog" CASCADE`, `TRUNCATE "Organization" CASCADE` or `TRUNCATE
-- "CallRecording"`, and the objects of those recordings stayed in the bucket for ever (their local files go at the
-- hourly sweep, which finds their calls gone). A statement-level BEFORE TRUNCATE trigger still sees the rows; it fires
-- for every table a cascade truncates, so it queues, as 0030's row trigger does, every recording not already deleted
-- by retention. "RecordingDeletion" keeps no foreign key (0030), so no cascade empties it in the same statement, and
-- what it keeps is enough without the organization's row: the workers make a recording's key and path from its
-- organization's and call's ids.

-- Queue the removal of every recording a TRUNCATE is about to empty. SECURITY DEFINER, its search_path pinned below,
-- for the reasons of 0030's "dialtone_queue_recording_deletion": the truncating role needs no rights on the queue, and
-- the function reads every organization's rows past "CallRecording"'s policy, as TRUNCATE empties them all.
CREATE FUNCTION "dialtone_queue_truncated_recording_deletions"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
    INSERT INTO "RecordingDeletion" ("id", "organizationId", "callLogId", "store", "objectKey", "spool", "localPath",
                                     "onDisk")
    SELECT gen_random_uuid()::text, r."organizationId", r."callLogId", r."store", r."objectKey", r."spool",
           r."localPath", r."store" = 'local' OR r."status" = 'PENDING'
    FROM "CallRecording" r
    WHERE r."status" <> 'DELETED';
    RETURN NULL;
END
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION "dialtone_queue_truncated_recording_deletions"() SET search_path = %I, pg_temp',
                   current_schema());
END
$$;

REVOKE ALL ON FUNCTION "dialtone_queue_truncated_recording_deletions"() FROM PUBLIC;

CREATE TRIGGER "CallRecording_queue_truncated_deletions" BEFORE TRUNCATE ON "CallRecording"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_queue_truncated_recording_deletions"();
