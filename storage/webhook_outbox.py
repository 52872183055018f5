"""The webhook outbox: call events queued as deliveries in the caller's transaction, claimed by workers under leases.

`enqueue_event` writes one "WebhookDelivery" per enabled subscription (organization-wide Events and the agent's
own) inside the transaction of the change it reports, and notifies WEBHOOK_CHANNEL when that transaction commits.
Workers `claim_due` deliveries with FOR UPDATE SKIP LOCKED: a claim moves "nextAttemptAt" to the end of its lease,
so a worker that dies before recording an outcome only delays the delivery until another worker claims it. Every
outcome is recorded against the claim's lease token, so a worker whose lease ran out cannot overwrite the outcome
of the worker that took over. Claims are fair between organizations: none has more than a few deliveries in flight
at once across all workers, so one organization's hanging endpoint or burst of events leaves the others' on time.
Finished deliveries are kept, with their attempts, for the history period only (`delete_finished_deliveries`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

from storage.errors import NotFound, translate_errors
from storage.records import Queryable, Record, new_id, transaction

WEBHOOK_CHANNEL = "dialtone_webhooks"
"""The LISTEN/NOTIFY channel told, at commit, that new deliveries are waiting."""


class WebhookEvent(StrEnum):
    """The events a webhook can subscribe to: the names an Event row subscribes by, and each delivery's type."""

    CALL_STARTED = "call.started"
    CALL_ENDED = "call.ended"
    CALL_ANALYZED = "call.analyzed"
    TRANSCRIPT_UPDATED = "transcript.updated"
    TRANSFER_ENDED = "transfer.ended"
    CAMPAIGN_STARTED = "campaign.started"
    CAMPAIGN_COMPLETED = "campaign.completed"
    RECIPIENT_FAILED = "recipient.failed"


HISTORY_BATCH = 1000
"""Deliveries one statement of the history sweep deletes (their attempts go with them)."""

_SECRET_PREFIX = "whsec_"  # noqa: S105 -- a label that makes secrets recognisable, not a secret

_COLUMNS = (
    '"id", "organizationId", "eventId", "occurrenceId", "event", "payload", "status", "attemptCount", '
    '"nextAttemptAt", "leasedUntil", "lastResponseCode", "lastError", "deliveredAt", "createdAt", "updatedAt"'
)


class DeliveryStatus(StrEnum):
    """Where a delivery stands: waiting (for its first attempt or a retry), accepted, or given up."""

    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


class UnknownWebhookEvent(ValueError):
    """An event name that no Event can subscribe to."""

    def __init__(self, event: str) -> None:
        super().__init__(f"unknown webhook event {event!r}; expected one of {', '.join(sorted(WebhookEvent))}")
        self.event = event


class WebhookDelivery(Record):
    """One event occurrence for one subscription, and how its delivery went."""

    id: str
    organization_id: str
    event_id: str
    occurrence_id: str
    event: str
    payload: dict[str, Any]
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: datetime
    leased_until: datetime | None
    last_response_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime
    updated_at: datetime


class WebhookAttempt(Record):
    """One POST of a delivery: the receiver's status code, or why there was none, and how long it took."""

    id: str
    organization_id: str
    delivery_id: str
    attempt: int
    response_code: int | None
    error: str | None
    duration_ms: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery a worker holds until `lease_token`'s lease ends: what to send, and where."""

    id: str
    organization_id: str
    event_id: str
    event: str
    payload: Mapping[str, Any]
    attempt_count: int
    webhook_url: str
    subscription_enabled: bool
    lease_token: str


@dataclass(frozen=True, slots=True)
class DeliveryRetryPolicy:
    """When a failed delivery is tried again: exponential backoff with jitter, given up `give_up_after` creation.

    The n-th retry waits min(initial * 2**(n-1), maximum), scaled by a jitter factor between 0.5 and 1.
    """

    initial: timedelta = timedelta(seconds=10)
    maximum: timedelta = timedelta(hours=1)
    give_up_after: timedelta = timedelta(hours=24)

    def __post_init__(self) -> None:
        if self.initial <= timedelta(0) or self.maximum < self.initial:
            raise ValueError(f"retry delays must satisfy 0 < initial <= maximum, got {self.initial}..{self.maximum}")
        if self.give_up_after <= timedelta(0):
            raise ValueError(f"give_up_after must be positive, got {self.give_up_after}")


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return str(value)
    raise TypeError(f"webhook event data cannot hold a {type(value).__name__} ({value!r})")


def event_envelope(occurrence_id: str, event: str, organization_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body subscribers receive: the occurrence's id, its type, when it happened and its data."""
    # Round-tripped here so data that is not JSON fails in the caller's code, not in a worker hours later.
    return {
        "id": occurrence_id,
        "type": event,
        "createdAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "organizationId": organization_id,
        "data": json.loads(json.dumps(dict(data), default=_json_value)),
    }


def subscribed(organization: str, event: str, agent: str) -> str:
    """The SQL condition on "Event" rows for the enabled subscriptions of an organization to an event,
    organization-wide or the agent's own; the arguments are SQL (placeholders such as "$1")."""
    return (
        f'"organizationId" = {organization} AND "name" = {event} AND "isEnabled"'
        f' AND ("agentId" IS NULL OR "agentId" = {agent})'
    )


_SUBSCRIBED_EVENT_IDS = f'SELECT "id" FROM "Event" WHERE {subscribed("$1", "$2", "$3")} ORDER BY "createdAt", "id"'


async def enqueue_event(
    conn: Queryable,
    *,
    organization_id: str,
    event: WebhookEvent,
    data: Mapping[str, Any],
    agent_id: str | None = None,
) -> int:
    """Queue `event` for every enabled subscription (organization-wide and `agent_id`'s own); return how many.

    Runs in the caller's transaction: the deliveries exist if and only if it commits. Costs one query when
    nothing subscribes. UnknownWebhookEvent for a name no Event can subscribe to; TypeError for data that is not JSON.
    """
    if event not in WebhookEvent._value2member_map_:
        raise UnknownWebhookEvent(event)
    event_ids: list[str] = [
        row["id"]
        for row in await conn.fetch(
            _SUBSCRIBED_EVENT_IDS,
            organization_id,
            event,
            agent_id,
        )
    ]
    if not event_ids:
        return 0
    occurrence_id = new_id()
    count: int = await conn.fetchval(
        """
        WITH queued AS (
            INSERT INTO "WebhookDelivery" ("id", "organizationId", "eventId", "occurrenceId", "event", "payload")
            SELECT d.id, $1, d.event_id, $2, $3, $4::jsonb
            FROM unnest($5::text[], $6::text[]) AS d(id, event_id)
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM queued), pg_notify($7, '')
        """,
        organization_id,
        occurrence_id,
        event,
        event_envelope(occurrence_id, event, organization_id, data),
        [new_id() for _ in event_ids],
        event_ids,
        WEBHOOK_CHANNEL,
    )
    return count


# A delivery is in flight while a live lease holds it: set by a claim, cleared by its outcome, or run out.
_IN_FLIGHT = '"leaseToken" IS NOT NULL AND "leasedUntil" > clock_timestamp()'

# Every organization with pending deliveries and when its oldest is due (a delivery in flight is "due" when its lease
# ends), found by a skip-scan of the index, one probe per organization; with how many it has in flight and when the
# first of those leases ends, from the index of leased rows (a few per delivery slot, however long the queue).
_QUEUES = f"""
WITH RECURSIVE pending AS (
    (SELECT "organizationId" AS org, "nextAttemptAt" AS due FROM "WebhookDelivery" WHERE "status" = 'PENDING'
     ORDER BY "organizationId", "nextAttemptAt" LIMIT 1)
    UNION ALL
    SELECT next.org, next.due FROM pending CROSS JOIN LATERAL (
        SELECT "organizationId" AS org, "nextAttemptAt" AS due FROM "WebhookDelivery"
        WHERE "status" = 'PENDING' AND "organizationId" > pending.org
        ORDER BY "organizationId", "nextAttemptAt" LIMIT 1
    ) next
),
leases AS (
    SELECT "organizationId" AS org, count(*) AS in_flight, min("leasedUntil") AS first_ends FROM "WebhookDelivery"
    WHERE {_IN_FLIGHT} GROUP BY "organizationId"
),
queues AS (
    SELECT pending.org, pending.due, coalesce(leases.in_flight, 0) AS in_flight, leases.first_ends
    FROM pending LEFT JOIN leases USING (org)
)
"""


async def claim_due(db: Queryable, *, limit: int, per_organization: int, lease: timedelta) -> list[ClaimedDelivery]:
    """Take up to `limit` due deliveries for `lease`, oldest first, but never so many that an organization would
    have more than `per_organization` in flight across all workers; rows other workers are claiming are skipped.

    The cap is what keeps one organization (an endpoint that hangs, a burst of events) from holding every worker's
    slots while other organizations' deliveries wait. It holds across processes: a claim takes an organization's
    deliveries only under a transaction advisory lock of that organization, and counts what it has in flight after
    taking the lock, so two claims never both fill the same organization's last places; an organization another
    claim holds is skipped, as its rows would be.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if per_organization < 1:
        raise ValueError(f"per_organization must be at least 1, got {per_organization}")
    lease_token = new_id()
    async with transaction(db) as conn:
        # First the organizations to serve, oldest due first, each locked for this claim (the lock is taken as rows
        # are read, so only as many as the claim uses; the order is the materialized CTE's).
        organizations: list[str] = [
            row["org"]
            for row in await conn.fetch(
                f"""
                {_QUEUES},
                ready AS MATERIALIZED (
                    SELECT org FROM queues WHERE in_flight < $2 AND due <= clock_timestamp() ORDER BY due, org
                )
                SELECT org FROM ready
                WHERE pg_try_advisory_xact_lock(hashtext('dialtone.webhook_claim:' || org))
                LIMIT $1
                """,
                limit,
                per_organization,
            )
        ]
        if not organizations:
            return []
        # Then, in a statement whose snapshot follows the locks (READ COMMITTED), what each has in flight now that
        # no other claim can add to it, and its oldest due deliveries up to the cap.
        rows = await conn.fetch(
            f"""
            WITH picked AS (
                SELECT due."id" FROM unnest($1::text[]) AS o(org)
                CROSS JOIN LATERAL (
                    SELECT count(*) AS in_flight FROM "WebhookDelivery"
                    WHERE "organizationId" = o.org AND {_IN_FLIGHT}
                ) leases
                CROSS JOIN LATERAL (
                    SELECT "id" FROM "WebhookDelivery"
                    WHERE "organizationId" = o.org AND "status" = 'PENDING' AND "nextAttemptAt" <= clock_timestamp()
                    ORDER BY "nextAttemptAt", "id"
                    LIMIT greatest($2 - leases.in_flight, 0)
                ) due
            ),
            due AS (
                SELECT "id" FROM "WebhookDelivery"
                WHERE "id" IN (SELECT "id" FROM picked)
                  AND "status" = 'PENDING' AND "nextAttemptAt" <= clock_timestamp()
                ORDER BY "nextAttemptAt", "id"
                LIMIT $3
                FOR UPDATE SKIP LOCKED
            )
            UPDATE "WebhookDelivery" d SET
                "leaseToken" = $4,
                "leasedUntil" = clock_timestamp() + $5::interval,
                "nextAttemptAt" = clock_timestamp() + $5::interval
            FROM due, "Event" e
            WHERE d."id" = due."id" AND e."id" = d."eventId"
            RETURNING d."id", d."organizationId", d."eventId", d."event", d."payload", d."attemptCount",
                      e."webhookUrl", e."isEnabled"
            """,
            organizations,
            per_organization,
            limit,
            lease_token,
            lease,
        )
    return [
        ClaimedDelivery(
            id=row["id"],
            organization_id=row["organizationId"],
            event_id=row["eventId"],
            event=row["event"],
            payload=row["payload"],
            attempt_count=row["attemptCount"],
            webhook_url=row["webhookUrl"],
            subscription_enabled=row["isEnabled"],
            lease_token=lease_token,
        )
        for row in rows
    ]


async def next_due_in(db: Queryable, *, per_organization: int) -> timedelta | None:
    """How long until `claim_due` with this `per_organization` could take a delivery (zero or less: now); None when
    none is pending. An organization at its cap counts from when the first of its leases ends, not from its due
    deliveries, which no claim may take until then.
    """
    wait: timedelta | None = await db.fetchval(
        f"""
        {_QUEUES}
        SELECT min(CASE WHEN in_flight >= $1 THEN first_ends ELSE due END) - clock_timestamp() FROM queues
        """,
        per_organization,
    )
    return wait


async def record_success(
    db: Queryable, *, delivery: ClaimedDelivery, response_code: int, duration_ms: int
) -> DeliveryStatus | None:
    """Mark a claimed delivery DELIVERED, log the attempt and count one more trigger of its Event, together.

    None, changing nothing, if the claim's lease was lost to another worker.
    """
    async with transaction(db) as conn:
        attempt: int | None = await conn.fetchval(
            """
            UPDATE "WebhookDelivery" SET
                "status" = 'DELIVERED', "attemptCount" = "attemptCount" + 1, "deliveredAt" = clock_timestamp(),
                "lastResponseCode" = $3, "lastError" = NULL, "leaseToken" = NULL, "leasedUntil" = NULL
            WHERE "id" = $1 AND "leaseToken" = $2 AND "status" = 'PENDING'
            RETURNING "attemptCount"
            """,
            delivery.id,
            delivery.lease_token,
            response_code,
        )
        if attempt is None:
            return None
        await conn.execute(
            'UPDATE "Event" SET "triggerCount" = "triggerCount" + 1 WHERE "id" = $1 AND "organizationId" = $2',
            delivery.event_id,
            delivery.organization_id,
        )
        await _log_attempt(
            conn, delivery=delivery, attempt=attempt, response_code=response_code, error=None, duration_ms=duration_ms
        )
    return DeliveryStatus.DELIVERED


async def record_failure(
    db: Queryable,
    *,
    delivery: ClaimedDelivery,
    response_code: int | None,
    error: str,
    duration_ms: int,
    policy: DeliveryRetryPolicy,
    jitter: float,
    give_up: bool = False,
) -> DeliveryStatus | None:
    """Log a failed attempt and schedule the next, per `policy`, or mark the delivery FAILED.

    `jitter` (0 to 1) spreads retries: the delay is scaled by 0.5 + jitter / 2. A delivery whose next attempt
    would fall after `policy.give_up_after` from its creation, or with `give_up`, becomes FAILED. None, changing
    nothing, if the claim's lease was lost to another worker.
    """
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter must be between 0 and 1, got {jitter}")
    async with transaction(db) as conn:
        row = await conn.fetchrow(
            """
            UPDATE "WebhookDelivery" d SET
                "attemptCount" = d."attemptCount" + 1,
                "lastResponseCode" = $3, "lastError" = $4, "leaseToken" = NULL, "leasedUntil" = NULL,
                "nextAttemptAt" = n.at,
                "status" = CASE WHEN $8 OR n.at > d."createdAt" + $7::interval THEN 'FAILED' ELSE 'PENDING' END
            FROM (
                -- In seconds, as float: an interval doubled past ~60 attempts would overflow.
                SELECT "id", clock_timestamp() + make_interval(secs => (0.5 + $9::float8 / 2) * LEAST(
                    extract(epoch FROM $5::interval)::float8 * power(2, LEAST("attemptCount", 100)),
                    extract(epoch FROM $6::interval)::float8)) AS at
                FROM "WebhookDelivery" WHERE "id" = $1
            ) n
            WHERE d."id" = n."id" AND d."leaseToken" = $2 AND d."status" = 'PENDING'
            RETURNING d."status", d."attemptCount"
            """,
            delivery.id,
            delivery.lease_token,
            response_code,
            error,
            policy.initial,
            policy.maximum,
            policy.give_up_after,
            give_up,
            jitter,
        )
        if row is None:
            return None
        await _log_attempt(
            conn,
            delivery=delivery,
            attempt=row["attemptCount"],
            response_code=response_code,
            error=error,
            duration_ms=duration_ms,
        )
    return DeliveryStatus(row["status"])


async def _log_attempt(
    conn: Queryable,
    *,
    delivery: ClaimedDelivery,
    attempt: int,
    response_code: int | None,
    error: str | None,
    duration_ms: int,
) -> None:
    await conn.execute(
        """
        INSERT INTO "WebhookAttempt" ("id", "organizationId", "deliveryId", "attempt", "responseCode", "error",
                                      "durationMs")
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        """,
        new_id(),
        delivery.organization_id,
        delivery.id,
        attempt,
        response_code,
        error,
        max(duration_ms, 0),
    )


async def delete_finished_deliveries(
    db: Queryable, *, created_before: datetime, batch_size: int = HISTORY_BATCH
) -> int:
    """Delete the finished deliveries (DELIVERED or FAILED) created before `created_before`, with their attempts;
    how many deliveries. Unscoped: the history sweep of every organization.

    A batch of at most `batch_size` at a time, each its own statement (given a pool, its own transaction), until one
    comes back short, so no statement holds many locks or runs long however large the backlog. Rows another sweep has
    locked are skipped, and that sweep deletes them, so several processes may sweep at once without waiting on each
    other. PENDING deliveries stay whatever their age: they are still to be sent, and only they are ever leased.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    deleted = 0
    while True:
        status = await db.execute(
            f"""
            WITH finished AS (
                SELECT "id" FROM "WebhookDelivery"
                WHERE "status" <> '{DeliveryStatus.PENDING}' AND "createdAt" < $1
                ORDER BY "createdAt", "id"
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            DELETE FROM "WebhookDelivery" d USING finished WHERE d."id" = finished."id"
            """,
            created_before,
            batch_size,
        )
        batch = int(status.rsplit(" ", 1)[1])
        deleted += batch
        if batch < batch_size:
            return deleted


async def get_delivery(db: Queryable, *, organization_id: str, delivery_id: str) -> WebhookDelivery:
    """One of the organization's deliveries; NotFound if it has none with that id."""
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "WebhookDelivery" WHERE "id" = $1 AND "organizationId" = $2',
        delivery_id,
        organization_id,
    )
    if row is None:
        raise NotFound("WebhookDelivery", delivery_id)
    return WebhookDelivery.from_row(row)


async def list_deliveries(
    db: Queryable,
    *,
    organization_id: str,
    event_id: str | None = None,
    status: DeliveryStatus | None = None,
    limit: int = 50,
    before: tuple[datetime, str] | None = None,
) -> list[WebhookDelivery]:
    """The organization's delivery log, newest first, optionally for one subscription or in one status.

    For the next page pass `before=(delivery.created_at, delivery.id)` of the last delivery of this one.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    conditions = ['"organizationId" = $1']
    args: list[Any] = [organization_id]
    for condition, value in (('"eventId" = ${}', event_id), ('"status" = ${}', status)):
        if value is not None:
            args.append(value)
            conditions.append(condition.format(len(args)))
    if before is not None:
        args.extend(before)
        conditions.append(f'("createdAt", "id") < (${len(args) - 1}, ${len(args)})')
    args.append(limit)
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "WebhookDelivery"
        WHERE {" AND ".join(conditions)}
        ORDER BY "createdAt" DESC, "id" DESC
        LIMIT ${len(args)}
        """,
        *args,
    )
    return WebhookDelivery.from_rows(rows)


async def list_attempts(db: Queryable, *, organization_id: str, delivery_id: str) -> list[WebhookAttempt]:
    """Every POST of one of the organization's deliveries, first to last (empty for a delivery it does not have)."""
    rows = await db.fetch(
        """
        SELECT "id", "organizationId", "deliveryId", "attempt", "responseCode", "error", "durationMs", "createdAt"
        FROM "WebhookAttempt"
        WHERE "organizationId" = $1 AND "deliveryId" = $2
        ORDER BY "attempt", "createdAt"
        """,
        organization_id,
        delivery_id,
    )
    return WebhookAttempt.from_rows(rows)


async def signing_secret(db: Queryable, *, organization_id: str) -> str:
    """The organization's webhook signing secret, made on first use. Never log it."""
    query = 'SELECT "secret" FROM "WebhookSecret" WHERE "organizationId" = $1'
    secret: str | None = await db.fetchval(query, organization_id)
    if secret is not None:
        return secret
    # Two callers may make it at once: the loser's INSERT does nothing, and its SELECT finds the winner's.
    with translate_errors():
        await db.execute(
            """
            INSERT INTO "WebhookSecret" ("id", "organizationId", "secret") VALUES ($1, $2, $3)
            ON CONFLICT ("organizationId") DO NOTHING
            """,
            new_id(),
            organization_id,
            _SECRET_PREFIX + secrets.token_hex(32),
        )
    secret = await db.fetchval(query, organization_id)
    if secret is None:
        raise NotFound("Organization", organization_id)
    return secret
