"""Campaign dispatch states: the tables match the database, and a campaign status moves only along its table."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import asyncpg
import pytest

from storage import campaign_dispatch
from storage.campaign_states import (
    ATTEMPT_TRANSITIONS,
    RECIPIENT_TRANSITIONS,
    RETRYABLE_OUTCOMES,
    AttemptState,
    RecipientDispatchState,
)
from storage.campaigns import InvalidCampaignTransition
from storage.enums import CampaignStatus
from tests.test_dispatch_claims import running_campaign


async def _check_values(pool: asyncpg.Pool, constraint: str) -> set[str]:
    definition = await pool.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1 AND contype = 'c'", constraint
    )
    assert definition is not None, f"no CHECK constraint {constraint}"
    return set(re.findall(r"'([^']*)'", definition))


@pytest.mark.parametrize(
    ("constraint", "values"),
    [
        ("CampaignRecipientDispatch_state_check", RecipientDispatchState),
        ("CampaignAttempt_state_check", AttemptState),
        ("CampaignDispatch_retryOn_check", RETRYABLE_OUTCOMES),
    ],
)
async def test_the_dispatch_enums_are_what_the_database_allows(
    pool: asyncpg.Pool, constraint: str, values: type[StrEnum] | frozenset[StrEnum]
) -> None:
    assert await _check_values(pool, constraint) == {value.value for value in values}


def test_every_state_has_a_row_in_its_transition_table_and_final_states_lead_nowhere() -> None:
    assert set(RECIPIENT_TRANSITIONS) == set(RecipientDispatchState)
    assert set(ATTEMPT_TRANSITIONS) == set(AttemptState)
    finished = {RecipientDispatchState.DONE, RecipientDispatchState.FAILED, RecipientDispatchState.CANCELED}
    assert all(not RECIPIENT_TRANSITIONS[state] for state in finished | {RecipientDispatchState.INVALID})
    assert not ATTEMPT_TRANSITIONS[AttemptState.ENDED] and not ATTEMPT_TRANSITIONS[AttemptState.ABANDONED]


async def test_the_dispatcher_cannot_start_a_campaign_stopped_after_it_was_looked_up(pool: asyncpg.Pool) -> None:
    await pool.execute("""UPDATE "Campaign" SET "status" = 'STOPPED' WHERE "status" IN ('PLANNED', 'CONTINUING')""")
    campaign = await running_campaign(pool, ["+12125550101"])
    async with pool.acquire() as conn, conn.transaction():
        due = await campaign_dispatch.lock_due_campaign(conn, now=datetime.now(UTC) + timedelta(days=1))
        assert due is not None and (due.id, due.status) == (campaign.id, CampaignStatus.PLANNED)
        # Another process stops it between the look-up and the start.
        await conn.execute('UPDATE "Campaign" SET "status" = \'STOPPED\' WHERE "id" = $1', campaign.id)

        with pytest.raises(InvalidCampaignTransition, match="is STOPPED; it cannot become CONTINUING"):
            await campaign_dispatch.mark_started(conn, due)


async def test_recipients_are_counted_by_dispatch_state(pool: asyncpg.Pool) -> None:
    campaign = await running_campaign(pool, ["+12125550102", "+12125550103"])
    counts = await campaign_dispatch.count_by_state(
        pool, organization_id=campaign.organization_id, campaign_id=campaign.id
    )
    assert counts == {RecipientDispatchState.QUEUED: 2}
