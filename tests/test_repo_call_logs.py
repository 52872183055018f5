"""Call logs: opened IN_PROGRESS, transcript lines appended, ended once along allowed edges, listed, recovered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from storage import call_logs
from storage.agents import create_agent
from storage.call_logs import CallLog, InvalidCallTransition
from storage.campaigns import create_campaign
from storage.end_reasons import EndReason
from storage.enums import CallStatus, CallType
from storage.errors import AlreadyExists, InvalidReference, NotFound
from storage.records import Queryable, new_id
from tests.databases import TestDatabases
from tests.test_repo_agents import insert_organization


@pytest.fixture
async def own_pool(databases: TestDatabases) -> AsyncIterator[asyncpg.Pool]:
    """A database of this test's own: start-up recovery looks across every organization."""
    pool = await databases.pool(await databases.migrated())
    yield pool
    await pool.close()


async def open_call(
    db: Queryable,
    organization_id: str,
    *,
    call_type: CallType = CallType.INBOUND,
    agent_id: str | None = None,
    campaign_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    credit_rates: dict[str, int] | None = None,
) -> CallLog:
    """A new IN_PROGRESS call with a unique CallSid (with `credit_rates`, its first minute reserved)."""
    return await call_logs.create_call_log(
        db,
        organization_id=organization_id,
        call_type=call_type,
        call_id=f"CA{new_id()}",
        agent_id=agent_id,
        campaign_id=campaign_id,
        metadata=metadata,
        credit_rates=credit_rates,
    )


async def set_started_at(db: Queryable, call_log_id: str, started_at: datetime) -> None:
    """Move a call's start time (only tests rewrite history)."""
    await db.execute('UPDATE "CallLog" SET "timestamp" = $2 WHERE "id" = $1', call_log_id, started_at)


async def test_new_call_log_is_in_progress_with_its_details(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await create_agent(pool, organization_id=org, name="Support")
    created = await call_logs.create_call_log(
        pool,
        organization_id=org,
        call_type=CallType.INBOUND,
        call_id="CA" + new_id(),
        agent_id=agent.id,
        customer="Ada",
        phone_number="+15550001111",
        metadata={"from": "+15550001111"},
    )
    stored = await call_logs.get_call_log(pool, organization_id=org, call_log_id=created.id)
    assert stored == created
    assert (stored.status, stored.agent_id, stored.customer) == (CallStatus.IN_PROGRESS, agent.id, "Ada")
    assert (stored.duration, stored.transcript, stored.metadata) == (None, None, {"from": "+15550001111"})


async def test_a_second_log_with_the_same_call_id_already_exists(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    call_id = f"CA{new_id()}"
    await call_logs.create_call_log(pool, organization_id=org, call_type=CallType.INBOUND, call_id=call_id)
    with pytest.raises(AlreadyExists, match="callId"):
        await call_logs.create_call_log(pool, organization_id=org, call_type=CallType.INBOUND, call_id=call_id)


async def test_a_call_cannot_name_another_organizations_agent_or_campaign(pool: asyncpg.Pool) -> None:
    org, other = await insert_organization(pool), await insert_organization(pool)
    foreign_agent = await create_agent(pool, organization_id=other, name="Theirs")
    foreign_campaign = await create_campaign(
        pool, organization_id=other, batch_name="Theirs", agent_id=foreign_agent.id
    )
    with pytest.raises(InvalidReference, match=f"Agent {foreign_agent.id}"):
        await open_call(pool, org, agent_id=foreign_agent.id)
    with pytest.raises(InvalidReference, match=f"Campaign {foreign_campaign.id}"):
        await open_call(pool, org, campaign_id=foreign_campaign.id)
    assert await call_logs.list_call_logs(pool, organization_id=org) == []


async def test_another_organizations_call_log_is_not_found(pool: asyncpg.Pool) -> None:
    log = await open_call(pool, await insert_organization(pool))
    with pytest.raises(NotFound):
        await call_logs.get_call_log(pool, organization_id=await insert_organization(pool), call_log_id=log.id)


async def test_a_call_is_found_by_its_call_id_alone(pool: asyncpg.Pool) -> None:
    log = await open_call(pool, await insert_organization(pool))
    assert await call_logs.get_by_call_id(pool, call_id=log.call_id) == log
    assert await call_logs.get_by_call_id(pool, call_id="CA-unknown") is None


async def test_fifty_concurrent_appends_keep_every_line(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    log = await open_call(pool, org)
    lines = [f"caller: line {n}" for n in range(50)]
    await asyncio.gather(
        *(call_logs.append_transcript(pool, organization_id=org, call_log_id=log.id, text=line) for line in lines)
    )
    transcript = (await call_logs.get_call_log(pool, organization_id=org, call_log_id=log.id)).transcript
    assert transcript is not None
    assert sorted(transcript.split("\n")) == sorted(lines)


async def test_appended_lines_follow_each_other_in_order(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    log = await open_call(pool, org)
    for line in ("agent: Hello!", "caller: Hi, I need help."):
        await call_logs.append_transcript(pool, organization_id=org, call_log_id=log.id, text=line)
    stored = await call_logs.get_call_log(pool, organization_id=org, call_log_id=log.id)
    assert stored.transcript == "agent: Hello!\ncaller: Hi, I need help."


async def test_appending_to_another_organizations_call_is_not_found(pool: asyncpg.Pool) -> None:
    owner = await insert_organization(pool)
    log = await open_call(pool, owner)
    with pytest.raises(NotFound):
        await call_logs.append_transcript(
            pool, organization_id=await insert_organization(pool), call_log_id=log.id, text="intruder"
        )
    assert (await call_logs.get_call_log(pool, organization_id=owner, call_log_id=log.id)).transcript is None


async def test_finalizing_sets_status_duration_recording_and_merges_metadata(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    log = await open_call(pool, org, metadata={"from": "+15550001111", "attempt": 1})
    finished = await call_logs.finalize_call_log(
        pool,
        organization_id=org,
        call_log_id=log.id,
        status=CallStatus.COMPLETED,
        duration=42,
        recording_url="file:///recordings/a.wav",
        metadata={"attempt": 2, "endReason": "hangup"},
    )
    assert finished == await call_logs.get_call_log(pool, organization_id=org, call_log_id=log.id)
    assert (finished.status, finished.duration, finished.recording_url) == (
        CallStatus.COMPLETED,
        42,
        "file:///recordings/a.wav",
    )
    assert finished.metadata == {"from": "+15550001111", "attempt": 2, "endReason": "hangup"}


async def test_finalizing_again_with_the_same_status_returns_the_row_unchanged(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    log = await open_call(pool, org)
    first = await call_logs.finalize_call_log(
        pool, organization_id=org, call_log_id=log.id, status=CallStatus.MISSED, metadata={"twilio": "no-answer"}
    )
    again = await call_logs.finalize_call_log(
        pool, organization_id=org, call_log_id=log.id, status=CallStatus.MISSED, duration=9, metadata={"x": 1}
    )
    assert again == first


async def test_a_finished_call_cannot_end_differently_and_stays_as_it_was(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    log = await open_call(pool, org)
    completed = await call_logs.finalize_call_log(
        pool, organization_id=org, call_log_id=log.id, status=CallStatus.COMPLETED, duration=30
    )
    with pytest.raises(InvalidCallTransition, match="is COMPLETED; it cannot become FAILED") as raised:
        await call_logs.finalize_call_log(
            pool, organization_id=org, call_log_id=log.id, status=CallStatus.FAILED, metadata={"error": "late"}
        )
    assert (raised.value.current, raised.value.requested) == (CallStatus.COMPLETED, CallStatus.FAILED)
    assert await call_logs.get_call_log(pool, organization_id=org, call_log_id=log.id) == completed


async def test_a_call_cannot_be_moved_to_in_progress(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    log = await open_call(pool, org)
    with pytest.raises(InvalidCallTransition):
        await call_logs.finalize_call_log(pool, organization_id=org, call_log_id=log.id, status=CallStatus.IN_PROGRESS)
    assert await call_logs.get_call_log(pool, organization_id=org, call_log_id=log.id) == log


async def test_finalizing_another_organizations_call_is_not_found(pool: asyncpg.Pool) -> None:
    owner = await insert_organization(pool)
    log = await open_call(pool, owner)
    with pytest.raises(NotFound):
        await call_logs.finalize_call_log(
            pool, organization_id=await insert_organization(pool), call_log_id=log.id, status=CallStatus.FAILED
        )
    assert (await call_logs.get_call_log(pool, organization_id=owner, call_log_id=log.id)).status == "IN_PROGRESS"


async def test_of_two_racing_finalizers_exactly_one_wins(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    log = await open_call(pool, org)
    results = await asyncio.gather(
        *(
            call_logs.finalize_call_log(pool, organization_id=org, call_log_id=log.id, status=status, duration=n)
            for n, status in enumerate([CallStatus.COMPLETED, CallStatus.FAILED] * 5)
        ),
        return_exceptions=True,
    )
    winners = {result.status for result in results if isinstance(result, CallLog)}
    losers = [result for result in results if isinstance(result, BaseException)]
    assert len(winners) == 1
    assert len(losers) == 5
    assert all(isinstance(loser, InvalidCallTransition) for loser in losers)
    final = await call_logs.get_call_log(pool, organization_id=org, call_log_id=log.id)
    assert final.status in winners


async def test_call_history_filters_and_carries_agent_and_campaign_names(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    seller = await create_agent(pool, organization_id=org, name="Seller", type="Outbound Sales")
    helper = await create_agent(pool, organization_id=org, name="Helper")
    campaign = await create_campaign(pool, organization_id=org, batch_name="November", agent_id=seller.id)
    sale = await open_call(pool, org, call_type=CallType.OUTBOUND, agent_id=seller.id, campaign_id=campaign.id)
    await call_logs.finalize_call_log(pool, organization_id=org, call_log_id=sale.id, status=CallStatus.COMPLETED)
    await open_call(pool, org, call_type=CallType.OUTBOUND, agent_id=seller.id, campaign_id=campaign.id)
    support = await open_call(pool, org, agent_id=helper.id)
    await open_call(pool, await insert_organization(pool), call_type=CallType.OUTBOUND)

    completed_outbound = await call_logs.list_call_logs(
        pool, organization_id=org, call_type=CallType.OUTBOUND, status=CallStatus.COMPLETED
    )
    assert [entry.id for entry in completed_outbound] == [sale.id]
    entry = completed_outbound[0]
    assert (entry.agent_name, entry.agent_type, entry.campaign_batch_name) == ("Seller", "Outbound Sales", "November")
    assert [e.id for e in await call_logs.list_call_logs(pool, organization_id=org, agent_id=helper.id)] == [support.id]
    assert len(await call_logs.list_call_logs(pool, organization_id=org, campaign_id=campaign.id)) == 2
    assert len(await call_logs.list_call_logs(pool, organization_id=org)) == 3
    standalone = await call_logs.list_call_logs(pool, organization_id=org, call_type=CallType.INBOUND)
    assert (standalone[0].agent_name, standalone[0].campaign_batch_name) == ("Helper", None)


async def test_call_history_pages_newest_first_with_a_cursor(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    day = datetime(2024, 11, 1, 9, 0, tzinfo=UTC)
    started = [day, day + timedelta(minutes=1), day + timedelta(minutes=1), day + timedelta(minutes=1)]
    started += [day + timedelta(minutes=2), day + timedelta(minutes=3), day + timedelta(minutes=3)]
    logs = [await open_call(pool, org) for _ in started]
    for log, at in zip(logs, started, strict=True):
        await set_started_at(pool, log.id, at)
    expected = [log.id for log, _ in sorted(zip(logs, started, strict=True), key=lambda p: (p[1], p[0].id))][::-1]

    seen: list[str] = []
    cursor: tuple[datetime, str] | None = None
    while page := await call_logs.list_call_logs(pool, organization_id=org, limit=3, before=cursor):
        seen += [entry.id for entry in page]
        cursor = (page[-1].timestamp, page[-1].id)
    assert seen == expected


async def test_call_history_time_window_includes_both_ends(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    start, end = datetime(2024, 11, 1, tzinfo=UTC), datetime(2024, 11, 30, tzinfo=UTC)
    inside = {}
    for at in (start - timedelta(seconds=1), start, start + timedelta(days=3), end, end + timedelta(seconds=1)):
        log = await open_call(pool, org)
        await set_started_at(pool, log.id, at)
        inside[log.id] = start <= at <= end
    window = await call_logs.list_call_logs(pool, organization_id=org, since=start, until=end)
    assert {entry.id for entry in window} == {log_id for log_id, within in inside.items() if within}


async def test_in_progress_calls_started_before_the_cutoff_are_listed(own_pool: asyncpg.Pool) -> None:
    org = await insert_organization(own_pool)
    now = datetime.now(UTC)
    old, recent, old_but_done = [await open_call(own_pool, org) for _ in range(3)]
    for log in (old, old_but_done):
        await set_started_at(own_pool, log.id, now - timedelta(hours=5))
    await call_logs.finalize_call_log(
        own_pool, organization_id=org, call_log_id=old_but_done.id, status=CallStatus.COMPLETED
    )
    listed = await call_logs.list_in_progress(own_pool, older_than=now - timedelta(hours=4))
    assert [log.id for log in listed] == [old.id]
    assert recent.id not in {log.id for log in listed}


async def test_stale_calls_of_every_organization_are_failed_with_the_reason(own_pool: asyncpg.Pool) -> None:
    first, second = await insert_organization(own_pool), await insert_organization(own_pool)
    now = datetime.now(UTC)
    stale = [await open_call(own_pool, org, metadata={"from": "+1555"}) for org in (first, second)]
    for log in stale:
        await set_started_at(own_pool, log.id, now - timedelta(hours=5))
    live = await open_call(own_pool, first)

    marked = await call_logs.fail_stale_in_progress(
        own_pool, older_than=now - timedelta(hours=4), reason=EndReason.ENGINE_LOST, detail="engine restarted"
    )

    assert marked == 2
    for log in stale:
        failed = await call_logs.get_call_log(own_pool, organization_id=log.organization_id, call_log_id=log.id)
        assert (failed.status, failed.metadata) == (
            CallStatus.FAILED,
            {"from": "+1555", "endReason": "engine_lost", "endDetail": "engine restarted"},
        )
    still = await call_logs.get_call_log(own_pool, organization_id=first, call_log_id=live.id)
    assert still.status == CallStatus.IN_PROGRESS
    assert await call_logs.list_in_progress(own_pool, older_than=now - timedelta(hours=4)) == []
