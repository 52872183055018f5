"""Webhook subscriptions: which URL hears which call event, for a whole organization or one of its agents."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from storage.errors import InvalidReference, NotFound, translate_errors
from storage.records import Queryable, Record, fetch_page, new_id, set_clause

_COLUMNS = (
    '"id", "organizationId", "name", "description", "isEnabled", "agentId", "webhookUrl", "triggerCount", '
    '"createdAt", "updatedAt"'
)


class InvalidWebhookUrl(ValueError):
    """A webhook URL that cannot be delivered to."""

    def __init__(self, url: str) -> None:
        super().__init__(f"webhook URL must be an absolute http:// or https:// URL, got {url!r}")
        self.url = url


class Event(Record):
    """A subscription: when the event `name` happens (for `agent_id`, or any agent if None), POST to `webhook_url`."""

    id: str
    organization_id: str
    name: str
    description: str | None
    is_enabled: bool
    agent_id: str | None
    webhook_url: str
    trigger_count: int
    created_at: datetime
    updated_at: datetime


def check_webhook_url(url: str) -> str:
    """The URL unchanged if it is absolute http(s) with a host; InvalidWebhookUrl otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise InvalidWebhookUrl(url)
    return url


async def create_event(
    db: Queryable,
    *,
    organization_id: str,
    name: str,
    webhook_url: str,
    description: str | None = None,
    agent_id: str | None = None,
    is_enabled: bool = True,
    id: str | None = None,
) -> Event:
    """Subscribe a webhook to an event, organization-wide or for one of its agents (InvalidReference if not its
    agent)."""
    with translate_errors():
        # The agent must be this organization's: the schema's foreign key alone would accept anyone's.
        row = await db.fetchrow(
            f"""
            INSERT INTO "Event" ("id", "organizationId", "name", "description", "isEnabled", "agentId", "webhookUrl")
            SELECT $1::text, $2::text, $3::text, $4::text, $5::boolean, $6::text, $7::text
            WHERE $6::text IS NULL
               OR EXISTS (SELECT 1 FROM "Agent" WHERE "id" = $6::text AND "organizationId" = $2::text)
            RETURNING {_COLUMNS}
            """,
            id or new_id(),
            organization_id,
            name,
            description,
            is_enabled,
            agent_id,
            check_webhook_url(webhook_url),
        )
    if row is None:
        raise _not_its_agent(organization_id, str(agent_id))
    return Event.from_row(row)


async def get_event(db: Queryable, *, organization_id: str, event_id: str) -> Event:
    """One of the organization's subscriptions; NotFound if it has none with that id."""
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "Event" WHERE "organizationId" = $1 AND "id" = $2', organization_id, event_id
    )
    if row is None:
        raise NotFound("Event", event_id)
    return Event.from_row(row)


async def list_events(db: Queryable, *, organization_id: str) -> list[Event]:
    """The organization's subscriptions, enabled or not, by event name then age."""
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "Event"
        WHERE "organizationId" = $1
        ORDER BY "name", "createdAt", "id"
        """,
        organization_id,
    )
    return Event.from_rows(rows)


async def subscriptions_for(
    db: Queryable, *, organization_id: str, event_name: str, agent_id: str | None
) -> list[Event]:
    """The enabled subscriptions to notify when `event_name` happens: organization-wide ones and the agent's own."""
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "Event"
        WHERE "organizationId" = $1 AND "name" = $2 AND "isEnabled"
          AND ("agentId" IS NULL OR "agentId" = $3)
        ORDER BY "createdAt", "id"
        """,
        organization_id,
        event_name,
        agent_id,
    )
    return Event.from_rows(rows)


async def increment_trigger_count(db: Queryable, *, organization_id: str, event_id: str) -> int:
    """Count one more firing of a subscription; return the new count."""
    count: int | None = await db.fetchval(
        """
        UPDATE "Event" SET "triggerCount" = "triggerCount" + 1
        WHERE "organizationId" = $1 AND "id" = $2
        RETURNING "triggerCount"
        """,
        organization_id,
        event_id,
    )
    if count is None:
        raise NotFound("Event", event_id)
    return count


async def set_event_enabled(db: Queryable, *, organization_id: str, event_id: str, enabled: bool) -> Event:
    """Switch a subscription on or off without deleting it."""
    row = await db.fetchrow(
        f"""
        UPDATE "Event" SET "isEnabled" = $3
        WHERE "organizationId" = $1 AND "id" = $2
        RETURNING {_COLUMNS}
        """,
        organization_id,
        event_id,
        enabled,
    )
    if row is None:
        raise NotFound("Event", event_id)
    return Event.from_row(row)


async def delete_event(db: Queryable, *, organization_id: str, event_id: str) -> None:
    """Delete one of the organization's subscriptions."""
    deleted = await db.fetchval(
        'DELETE FROM "Event" WHERE "organizationId" = $1 AND "id" = $2 RETURNING "id"', organization_id, event_id
    )
    if deleted is None:
        raise NotFound("Event", event_id)


async def list_events_page(
    db: Queryable, *, organization_id: str, limit: int, before: tuple[datetime, str] | None = None
) -> list[Event]:
    """A page of the organization's subscriptions, newest first, after the (createdAt, id) `before`."""
    rows = await fetch_page(
        db, table="Event", columns=_COLUMNS, organization_id=organization_id, limit=limit, before=before
    )
    return Event.from_rows(rows)


async def update_event(db: Queryable, *, organization_id: str, event_id: str, changes: dict[str, Any]) -> Event:
    """Change some of a subscription's fields (snake_case names).

    NotFound if the subscription is not the organization's, InvalidReference if a new agent it names is not;
    InvalidWebhookUrl for a URL that cannot be delivered to.
    """
    if changes.get("webhook_url") is not None:
        check_webhook_url(changes["webhook_url"])
    assignments, args = set_clause(
        "Event", changes, {"name", "description", "is_enabled", "agent_id", "webhook_url"}, first=4
    )
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "Event" SET {assignments}
            WHERE "organizationId" = $1 AND "id" = $2
              AND ($3::text IS NULL OR EXISTS (SELECT 1 FROM "Agent" WHERE "id" = $3 AND "organizationId" = $1))
            RETURNING {_COLUMNS}
            """,
            organization_id,
            event_id,
            changes.get("agent_id"),
            *args,
        )
    if row is not None:
        return Event.from_row(row)
    await get_event(db, organization_id=organization_id, event_id=event_id)  # NotFound if it is not there
    raise _not_its_agent(organization_id, str(changes.get("agent_id")))


def _not_its_agent(organization_id: str, agent_id: str) -> InvalidReference:
    return InvalidReference(
        f"Agent {agent_id} does not exist in organization {organization_id}", entity="Agent", key=agent_id
    )
