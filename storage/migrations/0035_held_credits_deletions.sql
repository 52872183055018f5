-- 0035: the credits running calls hold are not lost by a DELETE of their reservations or transfer legs, nor by a
-- TRUNCATE of the detached transfer legs.
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
-- A `DELETE` of a leg still dialed, open in "TransferLeg" or detached in "DetachedTransferLeg" (0031), lost its
-- credits alike, and its dial's end found nothing to settle. It is refused too; the engine's release of a leg Twilio
-- was not asked to dial, and its settlement of a detached leg, hand the credits to "CreditReturn" in the statement
-- that deletes it (storage.transfer_legs), and a CallLog's deletion moves its open leg into "DetachedTransferLeg".
-- Deleted with its organization, a leg has nobody left to pay back: that goes through, as before.
--
-- A TRUNCATE of "DetachedTransferLeg" alone lost what it holds, as one of "TransferLeg" did before 0033. It is
-- refused alike while it holds any, unless "Organization" is truncated in the same statement (a `TRUNCATE
-- "Organization" CASCADE`, which detaches the open legs of the calls it empties, 0031).

-- The error of a `statement` that would lose the credits `holding` rows hold, `safe_way` its hint.
CREATE FUNCTION "dialtone_refuse_losing_credits"("statement" text, "holding" bigint, "safe_way" text)
    RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF "holding" > 0 THEN
        RAISE EXCEPTION '% refused: % of its rows hold credits of running calls, which it would lose',
                        "statement", "holding"
            USING ERRCODE = 'object_in_use', HINT = "safe_way";
    END IF;
END
$$;

-- Refuse a DELETE of rows holding credits whose credits the statement does not account for: reservations of calls
-- still IN_PROGRESS, open legs, detached legs, unless the statement hands their credits to "CreditReturn" (or moves an
-- open leg into "DetachedTransferLeg"), or their organization is gone (deleted with it: nothing is left to pay back).
-- An AFTER statement trigger: it sees the whole statement's work, the rows a data-modifying CTE writes after its
-- DELETE included. SECURITY DEFINER: it reads every organization's rows, whoever deletes.
CREATE FUNCTION "dialtone_refuse_deleting_held_credits"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    holding bigint;
    safe_way text := 'Each is settled by the end of its dial, or by the settlement sweep once its time limit has '
                     'passed.';
BEGIN
    IF TG_TABLE_NAME = 'CreditReservation' THEN
        SELECT count(*) INTO holding
        FROM "deleted" d JOIN "CallLog" c ON c."id" = d."callLogId"
        WHERE c."status" = 'IN_PROGRESS'
          AND NOT EXISTS (SELECT 1 FROM "CreditReturn" r WHERE r."callLogId" = d."callLogId");
        safe_way := 'End or delete their calls instead (DELETE FROM "CallLog" WHERE ...): that settles what they '
                    'hold and returns the rest to their organizations.';
    ELSIF TG_TABLE_NAME = 'TransferLeg' THEN
        SELECT count(*) INTO holding
        FROM "deleted" d
        JOIN "CallLog" c ON c."id" = d."callLogId"
        JOIN "Organization" o ON o."id" = c."organizationId"
        WHERE d."endedAt" IS NULL
          AND NOT EXISTS (SELECT 1 FROM "CreditReturn" r WHERE r."callLogId" = d."callLogId")
          AND NOT EXISTS (SELECT 1 FROM "DetachedTransferLeg" l WHERE l."callLogId" = d."callLogId");
    ELSE
        SELECT count(*) INTO holding
        FROM "deleted" d JOIN "Organization" o ON o."id" = d."organizationId"
        WHERE NOT EXISTS (SELECT 1 FROM "CreditReturn" r WHERE r."callLogId" = d."callLogId");
    END IF;
    PERFORM "dialtone_refuse_losing_credits"(format('DELETE FROM %I', TG_TABLE_NAME), holding, safe_way);
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
    PERFORM "dialtone_refuse_losing_credits"(format('TRUNCATE %I', TG_TABLE_NAME), holding, safe_way);
    RETURN NULL;
END
$$;

DO $$
DECLARE
    refusing TEXT;
BEGIN
    FOREACH refusing IN ARRAY ARRAY['dialtone_refuse_losing_credits(text,bigint,text)',
                                    'dialtone_refuse_deleting_held_credits()',
                                    'dialtone_refuse_truncating_held_credits()']
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', refusing, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', refusing);
    END LOOP;
END
$$;

CREATE TRIGGER "CreditReservation_refuse_delete" AFTER DELETE ON "CreditReservation"
    REFERENCING OLD TABLE AS "deleted"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_refuse_deleting_held_credits"();

CREATE TRIGGER "TransferLeg_refuse_delete" AFTER DELETE ON "TransferLeg"
    REFERENCING OLD TABLE AS "deleted"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_refuse_deleting_held_credits"();

CREATE TRIGGER "DetachedTransferLeg_refuse_delete" AFTER DELETE ON "DetachedTransferLeg"
    REFERENCING OLD TABLE AS "deleted"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_refuse_deleting_held_credits"();

CREATE TRIGGER "DetachedTransferLeg_refuse_truncate" BEFORE TRUNCATE ON "DetachedTransferLeg"
    FOR EACH STATEMENT EXECUTE FUNCTION "dialtone_refuse_truncating_held_credits"();
