-- 0035: the credits running calls hold are not lost by a DELETE of their reservations, nor by a TRUNCATE of the
-- detached transfer legs.
--
-- A `DELETE FROM "CreditReservation"` of running calls' rows took the credits they held with them: nothing returned
-- them, and the call's end found nothing to charge. Its meter, finding its reservation gone, said goodbye to the
-- caller as if the organization were out of credits. It is refused now, as 0033 refused a TRUNCATE of the table,
-- with the safe way in the error: ending or deleting the calls settles their reservations. The engine's own
-- settlements go through: a call's ending settles its reservation once its CallLog is ended, in the same
-- transaction ("CallLog"."status" is no longer IN_PROGRESS), and a deletion of CallLogs (0031, 0033) or the recovery
-- of lost calls (credit_reservations.settle_orphaned_reservations) hands the credits to "CreditReturn" in the
-- statement that deletes the reservation. A reservation whose CallLog is gone (a cascade) holds nothing by then.
--
-- "DetachedTransferLeg" (0031) holds the credits of legs still dialed whose calls were deleted, as "TransferLeg" holds
-- open legs; a TRUNCATE of it alone lost them, as one of "TransferLeg" did before 0033. It is refused alike while it
-- holds any, unless "Organization" is truncated in the same statement (a `TRUNCATE "Organization" CASCADE`, which
-- detaches the open legs of the calls it empties, 0031): an organization gone has nothing left to pay or to pay back.

-- Refuse a DELETE of the reservations of calls still IN_PROGRESS whose credits the statement did not hand to
-- "CreditReturn". An AFTER statement trigger: it sees the whole statement's work, the "CreditReturn" rows a
-- settlement's data-modifying CTE writes after its DELETE included. SECURITY DEFINER: it reads the CallLogs of every
-- organization, whoever deletes.
CREATE FUNCTION "dialtone_refuse_deleting_held_reservations"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    holding bigint;
BEGIN
    SELECT count(*) INTO holding
    FROM "deleted" d JOIN "CallLog" c ON c."id" = d."callLogId"
    WHERE c."status" = 'IN_PROGRESS'
      AND NOT EXISTS (SELECT 1 FROM "CreditReturn" r WHERE r."callLogId" = d."callLogId");
    IF holding > 0 THEN
        RAISE EXCEPTION 'DELETE FROM "CreditReservation" refused: % of its rows hold credits of running calls, which it would lose',
                        holding
            USING ERRCODE = 'object_in_use',
                  HINT = 'End or delete their calls instead (DELETE FROM "CallLog" WHERE ...): that settles what they '
                         'hold and returns the rest to their organizations.';
    END IF;
    RETURN NULL;
END
$$;

-- 0033's TRUNCATE refusal, for "DetachedTransferLeg" too: every row of it holds credits. TRUNCATE takes the ACCESS
-- EXCLUSIVE lock of every table it empties before its triggers fire, so one holding "Organization"'s empties it too.
-- Redefined whole: SECURITY DEFINER again, and its search_path pinned again below.
CREATE OR REPLACE FUNCTION "dialtone_refuse_truncating_held_credits"() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER AS $$
DECLARE
    holding bigint;
    safe_way text := 'Delete their calls instead (DELETE FROM "CallLog" WHERE ..., or TRUNCATE "CallLog" CASCADE): '
                     'that settles what they hold and returns the rest to their organizations.';
BEGIN
    IF TG_TABLE_NAME = 'CreditReservation' THEN
        SELECT count(*) INTO holding FROM "CreditReservation";
    ELSIF TG_TABLE_NAME = 'TransferLeg' THEN
        SELECT count(*) INTO holding FROM "TransferLeg" WHERE "endedAt" IS NULL;
    ELSE
        SELECT count(*) INTO holding FROM "DetachedTransferLeg"
        WHERE NOT EXISTS (
            SELECT 1 FROM pg_locks
            WHERE "pid" = pg_backend_pid() AND "locktype" = 'relation' AND "relation" = '"Organization"'::regclass
              AND "mode" = 'AccessExclusiveLock' AND "granted"
        );
        safe_way := 'Each is settled by the end of its dial, or by the settlement sweep once its time limit has '
                    'passed: wait for them, or delete their organizations.';
    END IF;
    IF holding > 0 THEN
        RAISE EXCEPTION 'TRUNCATE "%" refused: % of its rows hold credits of running calls, which it would lose',
                        TG_TABLE_NAME, holding
            USING ERRCODE = 'object_in_use', HINT = safe_way;
    END IF;
    RETURN NULL;
END
$$;

DO $$
DECLARE
    refusing TEXT;
BEGIN
    FOREACH refusing IN ARRAY ARRAY['dialtone_refuse_deleting_held_reservations()',
                                    'dialtone_refuse_truncating_held_credits()']
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', refusing, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', refusing);
    END LOOP;
END
$$;

CREATE TRIGGER "CreditReservation_refuse_delete" AFTER DELETE ON "CreditReservation"
    REFERENCING OLD TABLE AS "deleted"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_refuse_deleting_held_reservations"();

CREATE TRIGGER "DetachedTransferLeg_refuse_truncate" BEFORE TRUNCATE ON "DetachedTransferLeg"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_refuse_truncating_held_credits"();
