"""Webhook subscriptions: who hears which event, scoped to the organization and optionally to one agent."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from storage.errors import InvalidReference, NotFound
from storage.events import (
    Event,
    InvalidWebhookUrl,
    create_event,
    delete_event,
    get_event,
    increment_trigger_count,
    list_events,
    set_event_enabled,
    subscriptions_for,
)
from storage.organizations import Organization, create_organization
from storage.records import new_id

HOOK = "https://hooks.example.com/dialtone"


async def new_organization(pool: asyncpg.Pool) -> Organization:
    return await create_organization(pool, name="Acme", slug=f"acme-{new_id()}")


async def new_agent(pool: asyncpg.Pool, organization_id: str) -> str:
    # Agents have their own repository; these tests need only a row to point at.
    agent_id = new_id()
    await pool.execute(
        'INSERT INTO "Agent" ("id", "organizationId", "name") VALUES ($1, $2, $3)', agent_id, organization_id, "Ava"
    )
    return agent_id


async def test_an_event_keeps_every_column_through_a_round_trip(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    agent_id = await new_agent(pool, organization.id)
    created = await create_event(
        pool,
        organization_id=organization.id,
        name="call.completed",
        webhook_url=HOOK,
        description="Post-call CRM sync",
        agent_id=agent_id,
        is_enabled=False,
    )

    fetched = await get_event(pool, organization_id=organization.id, event_id=created.id)
    row = await pool.fetchrow('SELECT * FROM "Event" WHERE "id" = $1', created.id)

    assert fetched == created
    assert (fetched.organization_id, fetched.name, fetched.webhook_url) == (organization.id, "call.completed", HOOK)
    assert (fetched.description, fetched.agent_id, fetched.is_enabled) == ("Post-call CRM sync", agent_id, False)
    assert fetched.trigger_count == 0
    assert row is not None
    assert set(row.keys()) == {field.alias for field in Event.model_fields.values()}
    assert Event.from_row(row) == fetched


async def test_a_new_event_is_enabled_and_organization_wide(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)

    created = await create_event(pool, organization_id=organization.id, name="call.completed", webhook_url=HOOK)

    assert created.is_enabled
    assert created.agent_id is None


@pytest.mark.parametrize("url", ["", "hooks.example.com/x", "ftp://example.com/x", "https://", "javascript:alert(1)"])
async def test_a_webhook_url_that_cannot_be_posted_to_is_refused(pool: asyncpg.Pool, url: str) -> None:
    organization = await new_organization(pool)

    with pytest.raises(InvalidWebhookUrl, match="absolute http:// or https:// URL"):
        await create_event(pool, organization_id=organization.id, name="call.completed", webhook_url=url)

    assert await list_events(pool, organization_id=organization.id) == []


async def test_an_event_cannot_be_tied_to_another_organizations_agent(pool: asyncpg.Pool) -> None:
    mine, theirs = await new_organization(pool), await new_organization(pool)
    their_agent = await new_agent(pool, theirs.id)

    with pytest.raises(InvalidReference, match=f"Agent {their_agent} does not exist in organization {mine.id}"):
        await create_event(pool, organization_id=mine.id, name="call.completed", webhook_url=HOOK, agent_id=their_agent)

    assert await list_events(pool, organization_id=mine.id) == []


async def test_subscriptions_are_the_enabled_organization_wide_ones_and_the_agents_own(pool: asyncpg.Pool) -> None:
    organization, other = await new_organization(pool), await new_organization(pool)
    agent, other_agent = await new_agent(pool, organization.id), await new_agent(pool, organization.id)

    async def subscribe(organization_id: str, name: str, agent_id: str | None = None, enabled: bool = True) -> Event:
        return await create_event(
            pool, organization_id=organization_id, name=name, webhook_url=HOOK, agent_id=agent_id, is_enabled=enabled
        )

    org_wide = await subscribe(organization.id, "call.completed")
    agents_own = await subscribe(organization.id, "call.completed", agent)
    await subscribe(organization.id, "call.completed", other_agent)
    await subscribe(organization.id, "call.completed", enabled=False)
    await subscribe(organization.id, "call.started")
    await subscribe(other.id, "call.completed")

    found = await subscriptions_for(pool, organization_id=organization.id, event_name="call.completed", agent_id=agent)

    assert {event.id for event in found} == {org_wide.id, agents_own.id}


async def test_an_event_without_an_agent_reaches_only_organization_wide_subscriptions(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    agent = await new_agent(pool, organization.id)
    org_wide = await create_event(pool, organization_id=organization.id, name="credits.low", webhook_url=HOOK)
    await create_event(pool, organization_id=organization.id, name="credits.low", webhook_url=HOOK, agent_id=agent)

    found = await subscriptions_for(pool, organization_id=organization.id, event_name="credits.low", agent_id=None)

    assert [event.id for event in found] == [org_wide.id]


async def test_each_trigger_counts_once(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    event = await create_event(pool, organization_id=organization.id, name="call.completed", webhook_url=HOOK)

    counts = [await increment_trigger_count(pool, organization_id=organization.id, event_id=event.id) for _ in range(3)]

    assert counts == [1, 2, 3]
    assert (await get_event(pool, organization_id=organization.id, event_id=event.id)).trigger_count == 3


async def test_a_disabled_event_is_kept_but_not_notified_until_enabled_again(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    event = await create_event(pool, organization_id=organization.id, name="call.failed", webhook_url=HOOK)
    await asyncio.sleep(0.01)  # updatedAt is kept to the millisecond

    disabled = await set_event_enabled(pool, organization_id=organization.id, event_id=event.id, enabled=False)

    assert not disabled.is_enabled
    assert disabled.updated_at > event.updated_at
    assert await subscriptions_for(pool, organization_id=organization.id, event_name="call.failed", agent_id=None) == []
    await set_event_enabled(pool, organization_id=organization.id, event_id=event.id, enabled=True)
    assert [
        e.id
        for e in await subscriptions_for(pool, organization_id=organization.id, event_name="call.failed", agent_id=None)
    ] == [event.id]


async def test_another_organization_can_neither_see_nor_change_an_event(pool: asyncpg.Pool) -> None:
    owner, other = await new_organization(pool), await new_organization(pool)
    event = await create_event(pool, organization_id=owner.id, name="call.completed", webhook_url=HOOK)

    with pytest.raises(NotFound, match=f"Event {event.id} not found"):
        await get_event(pool, organization_id=other.id, event_id=event.id)
    with pytest.raises(NotFound):
        await increment_trigger_count(pool, organization_id=other.id, event_id=event.id)
    with pytest.raises(NotFound):
        await set_event_enabled(pool, organization_id=other.id, event_id=event.id, enabled=False)
    with pytest.raises(NotFound):
        await delete_event(pool, organization_id=other.id, event_id=event.id)

    assert await list_events(pool, organization_id=other.id) == []
    assert await get_event(pool, organization_id=owner.id, event_id=event.id) == event


async def test_an_organization_lists_its_events(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    completed = await create_event(pool, organization_id=organization.id, name="call.completed", webhook_url=HOOK)
    started = await create_event(pool, organization_id=organization.id, name="call.started", webhook_url=HOOK)

    assert await list_events(pool, organization_id=organization.id) == [completed, started]


async def test_a_deleted_event_is_gone(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    event = await create_event(pool, organization_id=organization.id, name="call.completed", webhook_url=HOOK)

    await delete_event(pool, organization_id=organization.id, event_id=event.id)

    with pytest.raises(NotFound):
        await get_event(pool, organization_id=organization.id, event_id=event.id)


async def test_deleting_an_agent_removes_its_own_events_but_not_organization_wide_ones(pool: asyncpg.Pool) -> None:
    organization = await new_organization(pool)
    agent = await new_agent(pool, organization.id)
    org_wide = await create_event(pool, organization_id=organization.id, name="call.completed", webhook_url=HOOK)
    await create_event(pool, organization_id=organization.id, name="call.completed", webhook_url=HOOK, agent_id=agent)

    await pool.execute('DELETE FROM "Agent" WHERE "id" = $1', agent)

    assert [event.id for event in await list_events(pool, organization_id=organization.id)] == [org_wide.id]
