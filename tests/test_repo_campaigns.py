"""Campaigns: created as drafts, moved only along the lifecycle's edges, fed recipients by COPY, and counted."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from storage import campaigns
from storage.agents import create_agent
from storage.campaigns import Campaign, InvalidCampaignTransition, NewRecipient
from storage.conversation_paths import create_conversation_path
from storage.enums import CampaignStatus, RecipientStatus
from storage.errors import ConstraintViolation, InvalidReference, NotFound
from storage.records import Queryable
from tests.test_repo_agents import insert_organization

DRAFT, PLANNED, CONTINUING, COMPLETED, STOPPED = (
    CampaignStatus.DRAFT,
    CampaignStatus.PLANNED,
    CampaignStatus.CONTINUING,
    CampaignStatus.COMPLETED,
    CampaignStatus.STOPPED,
)


async def new_campaign(db: Queryable, organization_id: str | None = None) -> Campaign:
    """A DRAFT campaign with an agent of its own, in a new organization unless one is given."""
    org = organization_id or await insert_organization(db)
    agent = await create_agent(db, organization_id=org, name="Seller")
    return await campaigns.create_campaign(db, organization_id=org, batch_name="November", agent_id=agent.id)


async def campaign_in(db: Queryable, status: CampaignStatus) -> Campaign:
    """A campaign walked along allowed edges to `status`."""
    campaign = await new_campaign(db)
    path = {
        DRAFT: [],
        PLANNED: [PLANNED],
        CONTINUING: [PLANNED, CONTINUING],
        COMPLETED: [PLANNED, CONTINUING, COMPLETED],
        STOPPED: [STOPPED],
    }[status]
    for step in path:
        campaign = await campaigns.transition_campaign(
            db, organization_id=campaign.organization_id, campaign_id=campaign.id, status=step
        )
    return campaign


def recipients(count: int, *, status: RecipientStatus = RecipientStatus.READY) -> list[NewRecipient]:
    """`count` recipients with distinct numbers."""
    return [NewRecipient(phone_number=f"+1555{n:07d}", name=f"Person {n}", status=status) for n in range(count)]


async def test_new_campaign_is_a_draft_with_no_calls(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await create_agent(pool, organization_id=org, name="Seller")
    path = await create_conversation_path(pool, organization_id=org, name="Pitch")
    created = await campaigns.create_campaign(
        pool,
        organization_id=org,
        batch_name="November",
        agent_id=agent.id,
        conversation_path_id=path.id,
        first_sentence="Hi, this is June.",
        call_start_time="09:00",
        call_end_time="17:30",
    )
    assert created == await campaigns.get_campaign(pool, organization_id=org, campaign_id=created.id)
    assert (created.status, created.progress, created.total_calls, created.completed_calls) == (DRAFT, 0, 0, 0)
    assert (created.call_start_time, created.call_end_time) == ("09:00", "17:30")


@pytest.mark.parametrize("bad_time", ["9:00", "24:00", "12:60", "noon", "12:00 "])
async def test_a_calling_window_time_must_be_hh_mm(pool: asyncpg.Pool, bad_time: str) -> None:
    org = await insert_organization(pool)
    agent = await create_agent(pool, organization_id=org, name="Seller")
    with pytest.raises(ConstraintViolation, match=r"callEndTime .* HH:MM"):
        await campaigns.create_campaign(
            pool, organization_id=org, batch_name="Bad", agent_id=agent.id, call_end_time=bad_time
        )
    assert await campaigns.list_campaigns(pool, organization_id=org) == []


async def test_a_campaign_cannot_use_another_organizations_agent_or_path(pool: asyncpg.Pool) -> None:
    org, other = await insert_organization(pool), await insert_organization(pool)
    agent = await create_agent(pool, organization_id=org, name="Ours")
    foreign_agent = await create_agent(pool, organization_id=other, name="Theirs")
    foreign_path = await create_conversation_path(pool, organization_id=other, name="Theirs")
    with pytest.raises(InvalidReference, match=f"Agent {foreign_agent.id}"):
        await campaigns.create_campaign(pool, organization_id=org, batch_name="X", agent_id=foreign_agent.id)
    with pytest.raises(InvalidReference, match=f"ConversationPath {foreign_path.id}"):
        await campaigns.create_campaign(
            pool, organization_id=org, batch_name="X", agent_id=agent.id, conversation_path_id=foreign_path.id
        )
    assert await campaigns.list_campaigns(pool, organization_id=org) == []


async def test_another_organizations_campaign_is_not_found(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    with pytest.raises(NotFound):
        await campaigns.get_campaign(pool, organization_id=await insert_organization(pool), campaign_id=campaign.id)


async def test_campaigns_are_listed_by_status(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    draft, planned = await new_campaign(pool, org), await new_campaign(pool, org)
    await campaigns.transition_campaign(pool, organization_id=org, campaign_id=planned.id, status=PLANNED)
    assert {c.id for c in await campaigns.list_campaigns(pool, organization_id=org)} == {draft.id, planned.id}
    assert [c.id for c in await campaigns.list_campaigns(pool, organization_id=org, status=PLANNED)] == [planned.id]


async def test_a_campaign_runs_from_draft_to_completed(pool: asyncpg.Pool) -> None:
    campaign = await campaign_in(pool, COMPLETED)
    assert campaign.status == COMPLETED


async def test_a_planned_campaign_can_be_unscheduled_back_to_draft(pool: asyncpg.Pool) -> None:
    planned = await campaign_in(pool, PLANNED)
    draft = await campaigns.transition_campaign(
        pool, organization_id=planned.organization_id, campaign_id=planned.id, status=DRAFT
    )
    assert draft.status == DRAFT


@pytest.mark.parametrize("start", [DRAFT, PLANNED, CONTINUING])
async def test_an_unfinished_campaign_can_be_stopped(pool: asyncpg.Pool, start: CampaignStatus) -> None:
    campaign = await campaign_in(pool, start)
    stopped = await campaigns.transition_campaign(
        pool, organization_id=campaign.organization_id, campaign_id=campaign.id, status=STOPPED
    )
    assert stopped.status == STOPPED


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (DRAFT, CONTINUING),
        (DRAFT, COMPLETED),
        (DRAFT, DRAFT),
        (PLANNED, COMPLETED),
        (CONTINUING, PLANNED),
        (CONTINUING, DRAFT),
        (COMPLETED, STOPPED),
        (COMPLETED, CONTINUING),
        (STOPPED, CONTINUING),
        (STOPPED, DRAFT),
    ],
)
async def test_a_move_off_the_lifecycle_is_refused_and_changes_nothing(
    pool: asyncpg.Pool, start: CampaignStatus, target: CampaignStatus
) -> None:
    campaign = await campaign_in(pool, start)
    with pytest.raises(InvalidCampaignTransition, match=f"is {start}; it cannot become {target}") as raised:
        await campaigns.transition_campaign(
            pool, organization_id=campaign.organization_id, campaign_id=campaign.id, status=target
        )
    assert (raised.value.current, raised.value.requested) == (start, target)
    assert await campaigns.get_campaign(pool, organization_id=campaign.organization_id, campaign_id=campaign.id) == (
        campaign
    )


async def test_moving_another_organizations_campaign_is_not_found(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    with pytest.raises(NotFound):
        await campaigns.transition_campaign(
            pool, organization_id=await insert_organization(pool), campaign_id=campaign.id, status=PLANNED
        )


async def test_imported_recipients_set_total_calls_to_the_ready_ones(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    org = campaign.organization_id
    imported = await campaigns.add_recipients(
        pool,
        organization_id=org,
        campaign_id=campaign.id,
        recipients=[*recipients(3), NewRecipient(phone_number="not a number", status=RecipientStatus.ERROR)],
    )
    assert imported == 4
    assert (await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)).total_calls == 3
    listed = await campaigns.list_recipients(pool, organization_id=org, campaign_id=campaign.id)
    assert sorted(r.phone_number for r in listed) == ["+15550000000", "+15550000001", "+15550000002", "not a number"]
    assert {r.name for r in listed if r.status == RecipientStatus.READY} == {"Person 0", "Person 1", "Person 2"}


async def test_a_second_import_adds_to_the_first(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    org = campaign.organization_id
    for batch in (recipients(2), recipients(5)):
        await campaigns.add_recipients(pool, organization_id=org, campaign_id=campaign.id, recipients=batch)
    assert (await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)).total_calls == 7


async def test_recipients_can_be_imported_inside_the_callers_transaction(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    org = campaign.organization_id
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError, match="abandon"):
            async with conn.transaction():
                await campaigns.add_recipients(
                    conn, organization_id=org, campaign_id=campaign.id, recipients=recipients(3)
                )
                raise RuntimeError("abandon the import")
    assert await campaigns.list_recipients(pool, organization_id=org, campaign_id=campaign.id) == []
    assert (await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)).total_calls == 0


async def test_recipients_cannot_be_added_to_another_organizations_campaign(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    with pytest.raises(NotFound):
        await campaigns.add_recipients(
            pool, organization_id=await insert_organization(pool), campaign_id=campaign.id, recipients=recipients(2)
        )
    assert (
        await campaigns.list_recipients(pool, organization_id=campaign.organization_id, campaign_id=campaign.id) == []
    )


async def test_recipients_are_listed_by_status_a_page_at_a_time(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    org = campaign.organization_id
    batch = recipients(7) + recipients(2, status=RecipientStatus.ERROR)
    await campaigns.add_recipients(pool, organization_id=org, campaign_id=campaign.id, recipients=batch)

    pages: list[list[str]] = []
    after: str | None = None
    while page := await campaigns.list_recipients(
        pool, organization_id=org, campaign_id=campaign.id, status=RecipientStatus.READY, limit=3, after_id=after
    ):
        pages.append([r.id for r in page])
        after = page[-1].id
    assert [len(page) for page in pages] == [3, 3, 1]
    every_id = [recipient_id for page in pages for recipient_id in page]
    assert every_id == sorted(every_id)
    errors = await campaigns.list_recipients(
        pool, organization_id=org, campaign_id=campaign.id, status=RecipientStatus.ERROR
    )
    assert len(errors) == 2
    assert set(every_id).isdisjoint(r.id for r in errors)


async def test_progress_is_the_floor_of_the_completed_percentage(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    org = campaign.organization_id
    await campaigns.add_recipients(pool, organization_id=org, campaign_id=campaign.id, recipients=recipients(3))
    progress = [
        (await campaigns.record_completed_call(pool, organization_id=org, campaign_id=campaign.id)).progress
        for _ in range(4)
    ]
    assert progress == [33, 66, 100, 100]
    final = await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)
    assert (final.completed_calls, final.progress) == (4, 100)


async def test_concurrent_completed_calls_are_all_counted(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    org = campaign.organization_id
    await campaigns.add_recipients(pool, organization_id=org, campaign_id=campaign.id, recipients=recipients(40))
    await asyncio.gather(
        *(campaigns.record_completed_call(pool, organization_id=org, campaign_id=campaign.id) for _ in range(30))
    )
    final = await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)
    assert (final.completed_calls, final.progress) == (30, 75)


async def test_completing_another_organizations_campaign_call_is_not_found(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    with pytest.raises(NotFound):
        await campaigns.record_completed_call(
            pool, organization_id=await insert_organization(pool), campaign_id=campaign.id
        )


async def test_a_hundred_thousand_recipients_import_through_copy(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    org = campaign.organization_id
    imported = await campaigns.add_recipients(
        pool, organization_id=org, campaign_id=campaign.id, recipients=recipients(100_000)
    )
    assert imported == 100_000
    stored = await pool.fetchval('SELECT count(*) FROM "CampaignRecipient" WHERE "campaignId" = $1', campaign.id)
    assert stored == 100_000
    assert (await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)).total_calls == 100_000
