"""API calls whose CallLog never got a CallSid (Twilio never answered the create request, or the process died):
leasing them to one process at a time while it asks Twilio, then settling them.

`POST /v1/calls` writes its CallLog (IN_PROGRESS: a call slot of the plan, the first minute's credits) before it asks
Twilio for the call. Once a request can no longer be on its way, `take_unresolved` leases the outbound CallLogs still
holding their placeholder callId that no campaign dial wrote (those are leased with their recipient:
storage/campaign_placements.py) to one process, through a "PlacementLookup" row (0026), and the engine asks Twilio
(engine/twilio/placement_lookup.py). Then `adopt_placement` follows the call Twilio created, or `close_never_placed`
closes the CallLog as NOT_PLACED, freeing its slot and returning its credits, by the rule campaign dials share
(storage/placements.py). When Twilio cannot be reached nothing is decided: the lease expires and someone asks again.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from storage import placements
from storage.call_logs import PENDING_CALL_ID_PREFIX
from storage.campaign_dispatch import RECIPIENT_METADATA_KEY
from storage.enums import CallStatus, CallType
from storage.placements import UnresolvedPlacement
from storage.records import Pool, Queryable, transaction


async def take_unresolved(
    pool: Pool,
    *,
    now: datetime,
    owner: str,
    hold_for: timedelta,
    written_before: datetime,
    limit: int = 50,
) -> list[UnresolvedPlacement]:
    """Lease to `owner` for `hold_for` the API calls still IN_PROGRESS with no CallSid whose lookup nobody holds; return
    them. Only CallLogs written before `written_before`: a younger one's create request may still be on its way.

    Of several processes taking at once, one gets each CallLog: the lease is written only where none is, or where the
    last one has expired, as the lease's latest version says (ON CONFLICT sees it even when the snapshot does not).
    """
    async with transaction(pool) as conn:
        # Leases whose CallLog was settled otherwise (a status callback, recovery) while Twilio could not be asked.
        await conn.execute(
            f"""
            DELETE FROM "PlacementLookup" p USING "CallLog" c
            WHERE c."id" = p."callLogId" AND p."leaseExpiresAt" < $1
              AND (c."status" <> '{CallStatus.IN_PROGRESS}' OR NOT starts_with(c."callId", $2))
            """,
            now,
            PENDING_CALL_ID_PREFIX,
        )
        rows = await conn.fetch(
            f"""
            WITH unresolved AS (
                SELECT c."id" FROM "CallLog" c
                LEFT JOIN "PlacementLookup" p ON p."callLogId" = c."id"
                WHERE c."status" = '{CallStatus.IN_PROGRESS}' AND c."callType" = '{CallType.OUTBOUND}'
                  AND starts_with(c."callId", $1) AND NOT (c."metadata" ? '{RECIPIENT_METADATA_KEY}')
                  AND c."createdAt" < $2 AND (p."leaseExpiresAt" IS NULL OR p."leaseExpiresAt" < $3)
                ORDER BY c."createdAt"
                LIMIT $4
                FOR NO KEY UPDATE OF c SKIP LOCKED
            ), leased AS (
                INSERT INTO "PlacementLookup" ("callLogId", "leaseOwner", "leaseExpiresAt")
                SELECT "id", $5, $6 FROM unresolved
                ON CONFLICT ("callLogId") DO UPDATE
                    SET "leaseOwner" = EXCLUDED."leaseOwner", "leaseExpiresAt" = EXCLUDED."leaseExpiresAt"
                    WHERE "PlacementLookup"."leaseExpiresAt" < $3
                RETURNING "callLogId"
            )
            SELECT c."id", c."organizationId", c."phoneNumber", c."metadata"->>'from' AS "fromNumber", c."createdAt"
            FROM leased JOIN "CallLog" c ON c."id" = leased."callLogId"
            ORDER BY c."createdAt"
            """,
            PENDING_CALL_ID_PREFIX,
            written_before,
            now,
            limit,
            owner,
            now + hold_for,
        )
    return [
        UnresolvedPlacement(
            call_log_id=row["id"],
            organization_id=row["organizationId"],
            to=row["phoneNumber"] or "",
            from_=row["fromNumber"] or "",
            created_at=row["createdAt"],
        )
        for row in rows
    ]


async def adopt_placement(pool: Pool, placement: UnresolvedPlacement, *, owner: str, call_sid: str) -> bool:
    """Twilio created the call: store its CallSid on the CallLog (placements.adopt) and end the lookup.

    False if `owner` no longer holds the lookup's lease (someone else settled it). A status callback that stored a
    CallSid meanwhile wins: the CallLog follows that one. AlreadyExists if another CallLog holds `call_sid`.
    """
    async with transaction(pool) as conn:
        await placements.locked_call_log(conn, placement)
        if not await _release(conn, placement, owner):
            return False
        await placements.adopt(conn, placement, call_sid)
    return True


async def close_never_placed(pool: Pool, placement: UnresolvedPlacement, *, owner: str) -> bool:
    """Twilio has no such call: the CallLog ends FAILED as NOT_PLACED (placements.close_not_placed), its slot and
    credits released, and the lookup ends. False if `owner` no longer holds the lookup's lease, or a status callback
    gave the CallLog a CallSid meanwhile (the call exists after all, and its callbacks follow it)."""
    async with transaction(pool) as conn:
        call_log = await placements.locked_call_log(conn, placement)
        if not await _release(conn, placement, owner):
            return False
        return await placements.close_not_placed(conn, call_log)


async def _release(conn: Queryable, placement: UnresolvedPlacement, owner: str) -> bool:
    """End `owner`'s lease on the placement's lookup, in the transaction that settles it; False if it holds none."""
    released = await conn.fetchval(
        'DELETE FROM "PlacementLookup" WHERE "callLogId" = $1 AND "leaseOwner" = $2 RETURNING 1',
        placement.call_log_id,
        owner,
    )
    return released is not None
