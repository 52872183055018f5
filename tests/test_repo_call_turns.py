"""Call turns: written while the call runs, idempotent on retry, mirrored once each in the readable transcript."""

from __future__ import annotations

import asyncpg
import pytest

from storage import call_logs
from storage.agents import create_agent
from storage.call_turns import (
    TurnRecord,
    insert_turns,
    insert_turns_unless_subscribed,
    list_turns,
    lock_call_log,
    transcript_line,
)
from storage.enums import CallStatus
from storage.errors import ConstraintViolation, NotFound
from storage.events import create_event
from storage.records import transaction
from storage.webhook_outbox import WebhookEvent
from tests.test_repo_agents import insert_organization
from tests.test_repo_call_logs import open_call

GREETING = TurnRecord(index=0, speaker="agent", text="Hello, how can I help?", start_ms=0, end_ms=1800, latency_ms=420)
QUESTION = TurnRecord(index=1, speaker="caller", text="What are your hours?", start_ms=2100, end_ms=3500)
ANSWER = TurnRecord(
    index=2, speaker="agent", text="We open at nine", start_ms=3900, end_ms=4700, interrupted=True, latency_ms=380
)


async def test_written_turns_are_listed_in_order_with_every_field(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    call = await open_call(pool, org)
    inserted = await insert_turns(pool, organization_id=org, call_log_id=call.id, turns=[QUESTION, GREETING])
    listed = await list_turns(pool, organization_id=org, call_log_id=call.id)
    assert listed == inserted
    assert [(t.index, t.speaker, t.text, t.start_ms, t.end_ms, t.interrupted, t.latency_ms) for t in listed] == [
        (0, "agent", "Hello, how can I help?", 0, 1800, False, 420),
        (1, "caller", "What are your hours?", 2100, 3500, False, None),
    ]
    assert {(t.organization_id, t.call_log_id) for t in listed} == {(org, call.id)}


async def test_each_written_turn_adds_a_readable_line_to_the_transcript(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    call = await open_call(pool, org)
    await insert_turns(pool, organization_id=org, call_log_id=call.id, turns=[GREETING, QUESTION])
    await insert_turns(pool, organization_id=org, call_log_id=call.id, turns=[ANSWER])
    stored = await call_logs.get_call_log(pool, organization_id=org, call_log_id=call.id)
    assert stored.transcript == (
        "Agent: Hello, how can I help?\nCaller: What are your hours?\nAgent: We open at nine [interrupted]"
    )


async def test_writing_the_same_turns_again_duplicates_neither_turns_nor_transcript_lines(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    call = await open_call(pool, org)
    await insert_turns(pool, organization_id=org, call_log_id=call.id, turns=[GREETING, QUESTION])
    again = await insert_turns(pool, organization_id=org, call_log_id=call.id, turns=[GREETING, QUESTION, ANSWER])
    assert [t.index for t in again] == [2]
    assert [t.index for t in await list_turns(pool, organization_id=org, call_log_id=call.id)] == [0, 1, 2]
    stored = await call_logs.get_call_log(pool, organization_id=org, call_log_id=call.id)
    assert stored.transcript is not None
    assert stored.transcript.count("Hello, how can I help?") == 1
    assert len(stored.transcript.splitlines()) == 3


async def test_text_no_column_can_hold_is_written_with_replacement_characters(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    call = await open_call(pool, org)
    said = [
        TurnRecord(index=0, speaker="caller", text="two\x00 seats", start_ms=0, end_ms=900),
        TurnRecord(index=1, speaker="agent", text="half \ud83d an emoji", start_ms=1000, end_ms=1900),
        TurnRecord(index=2, speaker="agent", text="split \ud83d\ude00 pair", start_ms=2000, end_ms=2900),
    ]
    await insert_turns(pool, organization_id=org, call_log_id=call.id, turns=said)
    stored = await list_turns(pool, organization_id=org, call_log_id=call.id)
    assert [t.text for t in stored] == ["two\ufffd seats", "half \ufffd an emoji", "split \U0001f600 pair"]
    log = await call_logs.get_call_log(pool, organization_id=org, call_log_id=call.id)
    assert log.transcript == "Caller: two\ufffd seats\nAgent: half \ufffd an emoji\nAgent: split \U0001f600 pair"


async def test_metadata_is_merged_into_the_call_with_the_turns(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    call = await open_call(pool, org, metadata={"from": "+15550001111"})
    await insert_turns(pool, organization_id=org, call_log_id=call.id, turns=[], metadata={"engineNode": "n1"})
    await insert_turns(pool, organization_id=org, call_log_id=call.id, turns=[GREETING], metadata={"stt": "deepgram"})
    stored = await call_logs.get_call_log(pool, organization_id=org, call_log_id=call.id)
    assert stored.metadata == {"from": "+15550001111", "engineNode": "n1", "stt": "deepgram"}


async def test_turns_of_another_organizations_call_are_refused_and_nothing_is_written(pool: asyncpg.Pool) -> None:
    org, other = await insert_organization(pool), await insert_organization(pool)
    call = await open_call(pool, org)
    with pytest.raises(NotFound):
        await insert_turns(pool, organization_id=other, call_log_id=call.id, turns=[GREETING])
    assert await list_turns(pool, organization_id=org, call_log_id=call.id) == []
    assert await list_turns(pool, organization_id=other, call_log_id=call.id) == []


async def test_a_speaker_other_than_caller_or_agent_is_refused(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    call = await open_call(pool, org)
    narrator = TurnRecord(index=0, speaker="narrator", text="…", start_ms=0, end_ms=1)  # type: ignore[arg-type]
    with pytest.raises(ConstraintViolation, match=r"CallTurn\.speaker"):
        await insert_turns(pool, organization_id=org, call_log_id=call.id, turns=[narrator])


async def test_a_turn_ending_before_it_starts_is_refused(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    call = await open_call(pool, org)
    backwards = TurnRecord(index=0, speaker="caller", text="hi", start_ms=500, end_ms=100)
    with pytest.raises(ConstraintViolation, match=r"CallTurn\.offsets"):
        await insert_turns(pool, organization_id=org, call_log_id=call.id, turns=[backwards])


async def test_deleting_a_call_deletes_its_turns(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    call = await open_call(pool, org)
    await insert_turns(pool, organization_id=org, call_log_id=call.id, turns=[GREETING])
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call.id)
    assert await pool.fetchval('SELECT count(*) FROM "CallTurn" WHERE "callLogId" = $1', call.id) == 0


async def test_locking_a_call_returns_its_status_and_refuses_another_organizations(pool: asyncpg.Pool) -> None:
    org, other = await insert_organization(pool), await insert_organization(pool)
    call = await open_call(pool, org)
    async with transaction(pool) as conn:
        assert await lock_call_log(conn, organization_id=org, call_log_id=call.id) is CallStatus.IN_PROGRESS
    with pytest.raises(NotFound):
        await lock_call_log(pool, organization_id=other, call_log_id=call.id)


def test_transcript_lines_name_the_speaker_and_mark_interruptions() -> None:
    assert transcript_line("caller", "Hi there", interrupted=False) == "Caller: Hi there"
    assert transcript_line("agent", "Let me", interrupted=True) == "Agent: Let me [interrupted]"


async def test_turns_written_in_the_callers_transaction_commit_and_roll_back_with_it(pool: asyncpg.Pool) -> None:
    # Inside an open transaction the turns join it (no savepoint of their own): they are kept or lost with it.
    org = await insert_organization(pool)
    call = await open_call(pool, org)
    with pytest.raises(RuntimeError, match="after the turns"):
        async with transaction(pool) as conn:
            await insert_turns(conn, organization_id=org, call_log_id=call.id, turns=[GREETING])
            assert [t.index for t in await list_turns(conn, organization_id=org, call_log_id=call.id)] == [0]
            raise RuntimeError("after the turns")
    assert await list_turns(pool, organization_id=org, call_log_id=call.id) == []
    async with transaction(pool) as conn:
        await insert_turns(conn, organization_id=org, call_log_id=call.id, turns=[GREETING])
    assert [t.index for t in await list_turns(pool, organization_id=org, call_log_id=call.id)] == [0]


async def test_turns_nobody_subscribes_to_are_written_whole_in_one_statement(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await create_agent(pool, organization_id=org, name="Ava")
    other_agent = await create_agent(pool, organization_id=org, name="Bo")
    call = await open_call(pool, org, agent_id=agent.id)
    # Subscriptions that do not want this call's turns: disabled, another agent's, another event.
    for name, agent_id, enabled in [
        (WebhookEvent.TRANSCRIPT_UPDATED, None, False),
        (WebhookEvent.TRANSCRIPT_UPDATED, other_agent.id, True),
        ("call.ended", None, True),
    ]:
        await create_event(
            pool,
            organization_id=org,
            name=name,
            webhook_url="https://hooks.example/x",
            agent_id=agent_id,
            is_enabled=enabled,
        )
    for turns in ([GREETING, QUESTION], [QUESTION, ANSWER]):  # the second repeats a turn, as a retry would
        assert await insert_turns_unless_subscribed(
            pool,
            organization_id=org,
            call_log_id=call.id,
            turns=turns,
            metadata={"stt": "deepgram"},
            event=WebhookEvent.TRANSCRIPT_UPDATED,
            agent_id=agent.id,
        )
    assert [t.index for t in await list_turns(pool, organization_id=org, call_log_id=call.id)] == [0, 1, 2]
    stored = await call_logs.get_call_log(pool, organization_id=org, call_log_id=call.id)
    assert stored.transcript == (
        "Agent: Hello, how can I help?\nCaller: What are your hours?\nAgent: We open at nine [interrupted]"
    )
    assert stored.metadata["stt"] == "deepgram"


@pytest.mark.parametrize("for_the_agent", [False, True])
async def test_turns_a_subscription_wants_are_left_to_a_transaction_that_queues_the_event(
    pool: asyncpg.Pool, for_the_agent: bool
) -> None:
    org = await insert_organization(pool)
    agent = await create_agent(pool, organization_id=org, name="Ava")
    call = await open_call(pool, org, agent_id=agent.id)
    await create_event(
        pool,
        organization_id=org,
        name=WebhookEvent.TRANSCRIPT_UPDATED,
        webhook_url="https://hooks.example/x",
        agent_id=agent.id if for_the_agent else None,
    )
    written = await insert_turns_unless_subscribed(
        pool,
        organization_id=org,
        call_log_id=call.id,
        turns=[GREETING],
        metadata={"stt": "deepgram"},
        event=WebhookEvent.TRANSCRIPT_UPDATED,
        agent_id=agent.id,
    )
    assert written is False
    assert await list_turns(pool, organization_id=org, call_log_id=call.id) == []
    stored = await call_logs.get_call_log(pool, organization_id=org, call_log_id=call.id)
    assert stored.transcript in (None, "")
    assert "stt" not in stored.metadata


async def test_unsubscribed_turns_of_another_organizations_call_are_refused(pool: asyncpg.Pool) -> None:
    org, other = await insert_organization(pool), await insert_organization(pool)
    call = await open_call(pool, org)
    with pytest.raises(NotFound):
        await insert_turns_unless_subscribed(
            pool,
            organization_id=other,
            call_log_id=call.id,
            turns=[GREETING],
            event=WebhookEvent.TRANSCRIPT_UPDATED,
            agent_id=None,
        )
    assert await list_turns(pool, organization_id=org, call_log_id=call.id) == []
