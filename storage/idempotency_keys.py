"""Idempotency keys: a client's retry of a creation gets the first request's answer instead of a second creation.

A key is claimed (its row inserted) before the operation runs, so of two concurrent requests with one key the
second waits on the row's unique index and then finds it in flight. The answer (status and JSON body) is stored
when the operation ends; a key whose operation could not finish is released for a retry. Keys expire: an expired
key is taken over by the next request that names it, and claims sweep the organization's expired rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from storage.records import Queryable, transaction


class ClaimState(StrEnum):
    """What claiming a key found."""

    CLAIMED = "claimed"
    """The key is new (or had expired): run the operation, then store its answer."""
    ANSWERED = "answered"
    """A request with this key and body was answered: replay its answer."""
    IN_FLIGHT = "in_flight"
    """A request with this key is still running."""
    ABANDONED = "abandoned"
    """A request with this key began longer ago than any request runs and stored no answer: its process died (or lost
    the database) half-way, and what it did is unknown."""
    OTHER_REQUEST = "other_request"
    """The key was used with another request body."""


@dataclass(frozen=True, slots=True)
class KeyClaim:
    """The outcome of claiming a key, with the stored answer when there is one."""

    state: ClaimState
    status: int | None = None
    body: str | None = None


async def claim_key(
    db: Queryable,
    *,
    organization_id: str,
    operation: str,
    key: str,
    request_hash: str,
    ttl: timedelta,
    in_flight_limit: timedelta,
) -> KeyClaim:
    """Claim `key` for one `operation` of the organization with this request's hash, or say who holds it: a claim
    without an answer older than `in_flight_limit` is ABANDONED, not in flight."""
    async with transaction(db) as conn:
        claimed = await conn.fetchval(
            """
            INSERT INTO "IdempotencyKey" AS k
                ("organizationId", "operation", "key", "requestHash", "expiresAt")
            VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP + $5::interval)
            ON CONFLICT ("organizationId", "operation", "key") DO UPDATE SET
                "requestHash" = EXCLUDED."requestHash", "responseStatus" = NULL, "responseBody" = NULL,
                "createdAt" = CURRENT_TIMESTAMP, "expiresAt" = EXCLUDED."expiresAt"
            WHERE k."expiresAt" <= CURRENT_TIMESTAMP
            RETURNING true
            """,
            organization_id,
            operation,
            key,
            request_hash,
            ttl,
        )
        if claimed:
            await conn.execute(
                'DELETE FROM "IdempotencyKey" WHERE "organizationId" = $1 AND "expiresAt" <= CURRENT_TIMESTAMP',
                organization_id,
            )
            return KeyClaim(ClaimState.CLAIMED)
        # The conflicting row is committed (the insert waited for it) and not expired; this statement sees it.
        row = await conn.fetchrow(
            """
            SELECT "requestHash", "responseStatus", "responseBody",
                "createdAt" <= CURRENT_TIMESTAMP - $4::interval AS "abandoned"
            FROM "IdempotencyKey"
            WHERE "organizationId" = $1 AND "operation" = $2 AND "key" = $3
            """,
            organization_id,
            operation,
            key,
            in_flight_limit,
        )
    if row is None:  # released by its request between the two statements: claim it afresh
        return await claim_key(
            db,
            organization_id=organization_id,
            operation=operation,
            key=key,
            request_hash=request_hash,
            ttl=ttl,
            in_flight_limit=in_flight_limit,
        )
    if row["requestHash"] != request_hash:
        return KeyClaim(ClaimState.OTHER_REQUEST)
    if row["responseStatus"] is None:
        return KeyClaim(ClaimState.ABANDONED if row["abandoned"] else ClaimState.IN_FLIGHT)
    return KeyClaim(ClaimState.ANSWERED, row["responseStatus"], row["responseBody"])


async def store_answer(
    db: Queryable, *, organization_id: str, operation: str, key: str, status: int, body: str
) -> None:
    """Keep the answer of the claimed key's operation, for its retries to get."""
    await db.execute(
        """
        UPDATE "IdempotencyKey" SET "responseStatus" = $4, "responseBody" = $5
        WHERE "organizationId" = $1 AND "operation" = $2 AND "key" = $3 AND "responseStatus" IS NULL
        """,
        organization_id,
        operation,
        key,
        status,
        body,
    )


async def release_key(db: Queryable, *, organization_id: str, operation: str, key: str) -> None:
    """Give up a claimed key whose operation did not finish (a retry may run it again)."""
    await db.execute(
        """
        DELETE FROM "IdempotencyKey"
        WHERE "organizationId" = $1 AND "operation" = $2 AND "key" = $3 AND "responseStatus" IS NULL
        """,
        organization_id,
        operation,
        key,
    )
