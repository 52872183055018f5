-- 0032: two ways 0030's queue of recordings to remove lost one.
--
-- TRUNCATE fires no row trigger, so the queue heard nothing of a `TRUNCATE "CallLog" CASCADE`, `TRUNCATE
-- "Organization" CASCADE` or `TRUNCATE "CallRecording"`, and the objects of those recordings stayed in the bucket for
-- ever (their local files go at the hourly sweep, which finds their calls gone). A statement-level BEFORE TRUNCATE
-- trigger still sees the rows; it fires for every table a cascade truncates, so it queues, as the row trigger does,
-- every recording not already deleted by retention. "RecordingDeletion" keeps no foreign key (0030), so no cascade
-- empties it in the same statement, and what it keeps is enough without the organization's row: the workers make a
-- recording's key and path from its organization's and call's ids.
--
-- A recording deleted while its upload is under way (PENDING, under the upload's lease) was queued due at once: the
-- deletion worker found no object yet, and only the upload, once it landed and found its row gone, queued the object
-- again; a database failing at that moment (or the process dying) left the object in the bucket for ever. Its
-- removal is now due when the upload's lease ends, when the object an upload within its lease put is there to
-- remove: the queue row written with the DELETE, durably, is the one that removes it.

-- Queue a deleted recording's removal (0030's function, its removal held for an upload under way). Redefined whole:
-- SECURITY DEFINER again, and its search_path pinned again below (CREATE OR REPLACE resets both; its grants stay).
CREATE OR REPLACE FUNCTION "dialtone_queue_recording_deletion"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
    INSERT INTO "RecordingDeletion" ("id", "organizationId", "callLogId", "store", "objectKey", "spool", "localPath",
                                     "onDisk", "nextAttemptAt")
    VALUES (gen_random_uuid()::text, OLD."organizationId", OLD."callLogId", OLD."store", OLD."objectKey", OLD."spool",
            OLD."localPath", OLD."store" = 'local' OR OLD."status" = 'PENDING',
            GREATEST(CURRENT_TIMESTAMP, OLD."leasedUntil"));
    RETURN NULL;
END
$$;

-- Queue the removal of every recording a TRUNCATE is about to empty, as the row trigger does. SECURITY DEFINER for
-- the same reasons: the truncating role needs no rights on the queue, and the function reads every organization's
-- rows past "CallRecording"'s policy, as TRUNCATE empties them all.
CREATE FUNCTION "dialtone_queue_truncated_recording_deletions"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
    INSERT INTO "RecordingDeletion" ("id", "organizationId", "callLogId", "store", "objectKey", "spool", "localPath",
                                     "onDisk", "nextAttemptAt")
    SELECT gen_random_uuid()::text, r."organizationId", r."callLogId", r."store", r."objectKey", r."spool",
           r."localPath", r."store" = 'local' OR r."status" = 'PENDING', GREATEST(CURRENT_TIMESTAMP, r."leasedUntil")
    FROM "CallRecording" r
    WHERE r."status" <> 'DELETED';
    RETURN NULL;
END
$$;

DO $$
DECLARE
    queuing TEXT;
BEGIN
    FOREACH queuing IN ARRAY ARRAY['dialtone_queue_recording_deletion', 'dialtone_queue_truncated_recording_deletions']
    LOOP
        EXECUTE format('ALTER FUNCTION %I() SET search_path = %I, pg_temp', queuing, current_schema());
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION "dialtone_queue_truncated_recording_deletions"() FROM PUBLIC;

CREATE TRIGGER "CallRecording_queue_truncated_deletions" BEFORE TRUNCATE ON "CallRecording"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_queue_truncated_recording_deletions"();
