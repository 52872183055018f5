"""Agent.successRate, kept by the CallLog tally trigger (migration 0023) whichever code changes a call.

Each test checks the rate the trigger keeps against the rule itself, computed here from the agent's CallLogs the
way the engine did before the tally: the share of judged calls judged a success, else of finished calls that
completed, else 0.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from storage import agents
from storage.call_logs import create_call_log, finalize_call_log, merge_metadata
from storage.enums import CallStatus, CallType
from storage.migrate import load_migrations, migrate
from storage.records import Queryable, new_id, transaction
from storage.tenancy import tenant_transaction
from tests.databases import TestDatabases
from tests.test_repo_agents import insert_organization

FINISHED = (CallStatus.COMPLETED, CallStatus.FAILED, CallStatus.MISSED)

_RULE = """
    SELECT COALESCE(
        100.0 * count(*) FILTER (WHERE "metadata" -> 'success' = 'true'::jsonb)
            / NULLIF(count(*) FILTER (WHERE jsonb_typeof("metadata" -> 'success') = 'boolean'), 0),
        100.0 * count(*) FILTER (WHERE "status" = 'COMPLETED')
            / NULLIF(count(*) FILTER (WHERE "status" <> 'IN_PROGRESS'), 0),
        0
    )::float8
    FROM "CallLog" WHERE "agentId" = $1
"""


async def rate(db: Queryable, agent_id: str) -> float:
    """The rate the agent's row holds."""
    value: float = await db.fetchval('SELECT "successRate" FROM "Agent" WHERE "id" = $1', agent_id)
    return value


async def rule(db: Queryable, agent_id: str) -> float:
    """The rate by the rule, from the agent's CallLogs."""
    value: float = await db.fetchval(_RULE, agent_id)
    return value


async def new_call(db: Queryable, organization_id: str, agent_id: str | None) -> str:
    log = await create_call_log(
        db, organization_id=organization_id, call_type=CallType.OUTBOUND, call_id=f"CA{new_id()}", agent_id=agent_id
    )
    return log.id


async def test_the_share_of_finished_calls_that_completed(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="Closer")
    outcomes = [CallStatus.COMPLETED, CallStatus.COMPLETED, CallStatus.COMPLETED, CallStatus.FAILED, CallStatus.MISSED]
    for outcome in outcomes:
        call = await new_call(pool, org, agent.id)
        await finalize_call_log(pool, organization_id=org, call_log_id=call, status=outcome)
    await new_call(pool, org, agent.id)  # still running: not counted
    assert await rate(pool, agent.id) == pytest.approx(60.0)
    assert (await agents.get_agent(pool, organization_id=org, agent_id=agent.id)).success_rate == pytest.approx(60.0)


async def test_an_agent_without_finished_calls_has_zero(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="New")
    await new_call(pool, org, agent.id)
    assert await rate(pool, agent.id) == 0.0


async def test_verdicts_take_over_from_statuses_and_a_new_verdict_replaces_the_old(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="Judged")
    calls = [await new_call(pool, org, agent.id) for _ in range(4)]
    for call in calls:
        await finalize_call_log(pool, organization_id=org, call_log_id=call, status=CallStatus.COMPLETED)
    assert await rate(pool, agent.id) == 100.0
    await merge_metadata(pool, organization_id=org, call_log_id=calls[0], metadata={"success": False})
    assert await rate(pool, agent.id) == 0.0  # one call judged, a failure: the unjudged ones no longer count
    await merge_metadata(pool, organization_id=org, call_log_id=calls[1], metadata={"success": True})
    assert await rate(pool, agent.id) == 50.0
    await merge_metadata(pool, organization_id=org, call_log_id=calls[0], metadata={"success": True})  # judged again
    assert await rate(pool, agent.id) == 100.0
    await merge_metadata(pool, organization_id=org, call_log_id=calls[1], metadata={"summary": "no verdict change"})
    assert await rate(pool, agent.id) == 100.0
    await pool.execute(
        """UPDATE "CallLog" SET "metadata" = "metadata" - 'success' WHERE "id" = ANY($1::text[])""", calls[:2]
    )
    assert await rate(pool, agent.id) == 100.0  # back to the statuses: all four completed
    await pool.execute('UPDATE "CallLog" SET "status" = \'FAILED\' WHERE "id" = $1', calls[3])  # e.g. recovery
    assert await rate(pool, agent.id) == 75.0


async def test_deleted_calls_leave_the_tally_and_a_deleted_agent_takes_its_tally(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="Gone")
    completed, failed = await new_call(pool, org, agent.id), await new_call(pool, org, agent.id)
    await finalize_call_log(pool, organization_id=org, call_log_id=completed, status=CallStatus.COMPLETED)
    await finalize_call_log(pool, organization_id=org, call_log_id=failed, status=CallStatus.FAILED)
    assert await rate(pool, agent.id) == 50.0
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', failed)
    assert await rate(pool, agent.id) == 100.0
    await agents.delete_agent(pool, organization_id=org, agent_id=agent.id)  # its calls stay, unlinked
    assert await pool.fetchval('SELECT "agentId" FROM "CallLog" WHERE "id" = $1', completed) is None
    assert await pool.fetchval('SELECT count(*) FROM "AgentCallTally" WHERE "agentId" = $1', agent.id) == 0
    await pool.execute('UPDATE "CallLog" SET "status" = \'MISSED\' WHERE "id" = $1', completed)  # no agent: no tally


async def test_a_call_moved_to_another_agent_moves_its_part(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    first = await agents.create_agent(pool, organization_id=org, name="First")
    second = await agents.create_agent(pool, organization_id=org, name="Second")
    call = await new_call(pool, org, first.id)
    await finalize_call_log(pool, organization_id=org, call_log_id=call, status=CallStatus.COMPLETED)
    other = await new_call(pool, org, second.id)
    await finalize_call_log(pool, organization_id=org, call_log_id=other, status=CallStatus.FAILED)
    await pool.execute('UPDATE "CallLog" SET "agentId" = $2 WHERE "id" = $1', call, second.id)
    assert (await rate(pool, first.id), await rate(pool, second.id)) == (0.0, 50.0)
    tallies = await pool.fetch(
        'SELECT "agentId", "finished", "completed" FROM "AgentCallTally" WHERE "agentId" = ANY($1::text[])',
        [first.id, second.id],
    )
    assert {row["agentId"]: (row["finished"], row["completed"]) for row in tallies} == {
        first.id: (0, 0),
        second.id: (2, 1),
    }


async def test_the_api_role_keeps_the_tally_of_its_own_organization(pool: asyncpg.Pool) -> None:
    """Under the API role and its organization's policies (no function runs as its owner), a change to a call still
    moves its agent's tally and rate."""
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="Tenant")
    calls = [await new_call(pool, org, agent.id) for _ in range(2)]
    for call in calls:
        await finalize_call_log(pool, organization_id=org, call_log_id=call, status=CallStatus.COMPLETED)
    async with tenant_transaction(pool, org) as conn:
        await merge_metadata(conn, organization_id=org, call_log_id=calls[0], metadata={"success": False})
        await conn.execute('DELETE FROM "CallLog" WHERE "id" = $1', calls[1])
        assert await rate(conn, agent.id) == 100.0  # the tally moves as the transaction commits
    assert await rate(pool, agent.id) == 0.0 == await rule(pool, agent.id)


async def test_any_sequence_of_changes_keeps_the_rule(pool: asyncpg.Pool) -> None:
    """Random creations, ends, verdicts, status changes, moves and deletions over three agents: after each, every
    agent's rate is the rule's."""
    org = await insert_organization(pool)
    agent_ids = [(await agents.create_agent(pool, organization_id=org, name=f"A{i}")).id for i in range(3)]
    rng = random.Random(23)  # noqa: S311 - a repeatable sequence of changes, not a secret
    calls: list[str] = []
    for _ in range(150):
        action = rng.choice(["create", "end", "judge", "unjudge", "status", "move", "delete"])
        if action == "create" or not calls:
            calls.append(await new_call(pool, org, rng.choice([*agent_ids, None])))
            continue
        call = rng.choice(calls)
        if action == "end":
            running = await pool.fetchval('SELECT "status" = \'IN_PROGRESS\' FROM "CallLog" WHERE "id" = $1', call)
            if running:
                await finalize_call_log(pool, organization_id=org, call_log_id=call, status=rng.choice(FINISHED))
        elif action == "judge":
            verdict = {"success": rng.random() < 0.5}
            await merge_metadata(pool, organization_id=org, call_log_id=call, metadata=verdict)
        elif action == "unjudge":
            await pool.execute("""UPDATE "CallLog" SET "metadata" = "metadata" - 'success' WHERE "id" = $1""", call)
        elif action == "status":
            status = rng.choice([*FINISHED, CallStatus.IN_PROGRESS])
            await pool.execute('UPDATE "CallLog" SET "status" = $2 WHERE "id" = $1', call, status.value)
        elif action == "move":
            await pool.execute('UPDATE "CallLog" SET "agentId" = $2 WHERE "id" = $1', call, rng.choice(agent_ids))
        else:
            await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call)
            calls.remove(call)
        for agent_id in agent_ids:
            assert await rate(pool, agent_id) == pytest.approx(await rule(pool, agent_id)), action


async def test_one_statement_inserting_or_deleting_many_calls_counts_each(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent_ids = [(await agents.create_agent(pool, organization_id=org, name=f"Bulk {i}")).id for i in range(2)]
    await pool.execute(
        """
        INSERT INTO "CallLog" ("id", "organizationId", "callType", "agentId", "callId", "status", "metadata")
        SELECT 'bulk-' || $1 || '-' || i, $1, 'INBOUND', ($2::text[])[1 + i % 2], 'CA-bulk-' || $1 || '-' || i,
               (CASE WHEN i % 7 = 0 THEN 'IN_PROGRESS' WHEN i % 5 = 0 THEN 'FAILED' ELSE 'COMPLETED' END)::"CallStatus",
               CASE WHEN i % 3 = 0 THEN '{}'::jsonb ELSE jsonb_build_object('success', i % 4 = 0) END
        FROM generate_series(1, 300) AS i
        """,
        org,
        agent_ids,
    )
    for agent_id in agent_ids:
        assert await rate(pool, agent_id) == pytest.approx(await rule(pool, agent_id))
    await pool.execute("""DELETE FROM "CallLog" WHERE "organizationId" = $1 AND "metadata" ? 'success'""", org)
    for agent_id in agent_ids:
        assert await rate(pool, agent_id) == pytest.approx(await rule(pool, agent_id)) != 0.0


async def test_calls_ending_at_once_are_all_counted(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="Busy")
    calls = [await new_call(pool, org, agent.id) for _ in range(20)]
    await asyncio.gather(
        *(
            finalize_call_log(
                pool,
                organization_id=org,
                call_log_id=call,
                status=CallStatus.COMPLETED if i % 4 else CallStatus.FAILED,
            )
            for i, call in enumerate(calls)
        )
    )
    assert await rate(pool, agent.id) == 75.0
    row = await pool.fetchrow('SELECT "finished", "completed" FROM "AgentCallTally" WHERE "agentId" = $1', agent.id)
    assert row is not None and (row["finished"], row["completed"]) == (20, 15)


async def test_ends_that_touch_the_agent_first_and_ends_and_verdicts_that_do_not_never_wait_on_each_other(
    pool: asyncpg.Pool,
) -> None:
    """The engine's own end adds to "totalCalls" (the agent's row) before it commits; a status callback's end and a
    verdict reach the agent only through the tally as they commit. All at once, none deadlocks and each counts."""
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="Crowded")
    calls = [await new_call(pool, org, agent.id) for _ in range(30)]
    own, called_back, judged = calls[:10], calls[10:20], calls[20:]
    for call in judged:
        await finalize_call_log(pool, organization_id=org, call_log_id=call, status=CallStatus.COMPLETED)

    async def own_end(call: str) -> None:
        async with transaction(pool) as conn:
            await finalize_call_log(conn, organization_id=org, call_log_id=call, status=CallStatus.COMPLETED)
            await asyncio.sleep(0.01)  # the end's other writes: others commit meanwhile
            await agents.increment_total_calls(conn, organization_id=org, agent_id=agent.id)
            await asyncio.sleep(0.01)

    async def callback_end(call: str) -> None:
        await finalize_call_log(pool, organization_id=org, call_log_id=call, status=CallStatus.MISSED)

    async def verdict(call: str) -> None:
        await merge_metadata(pool, organization_id=org, call_log_id=call, metadata={"success": True})

    await asyncio.gather(
        *(own_end(call) for call in own),
        *(callback_end(call) for call in called_back),
        *(verdict(call) for call in judged),
    )
    await asyncio.gather(*(verdict(call) for call in own))  # and verdicts on the engine's own ends, all at once
    row = await pool.fetchrow('SELECT * FROM "AgentCallTally" WHERE "agentId" = $1', agent.id)
    assert row is not None
    assert (row["finished"], row["completed"], row["judged"], row["succeeded"]) == (30, 20, 20, 20)
    assert (await agents.get_agent(pool, organization_id=org, agent_id=agent.id)).total_calls == 10
    assert await rate(pool, agent.id) == 100.0 == await rule(pool, agent.id)


async def test_the_migration_counts_the_calls_already_there(databases: TestDatabases) -> None:
    shipped = load_migrations()
    before = [migration for migration in shipped if migration.version < 23]
    url = await databases.empty()
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, before)
        org = await insert_organization(conn)
        agent_id, idle_id = new_id(), new_id()
        for each in (agent_id, idle_id):
            await conn.execute(
                'INSERT INTO "Agent" ("id", "organizationId", "name", "successRate") VALUES ($1, $2, $3, 42)',
                each,
                org,
                f"Agent {each}",
            )
        rows = [
            ("COMPLETED", '{"success": true}'),
            ("COMPLETED", '{"success": false}'),
            ("FAILED", '{"success": true}'),
            ("MISSED", "{}"),
            ("IN_PROGRESS", "{}"),
        ]
        for status, metadata in rows:
            await conn.execute(
                'INSERT INTO "CallLog" ("id", "organizationId", "callType", "agentId", "callId", "status", "metadata")'
                " VALUES ($1, $2, 'OUTBOUND', $3, $4, $5, $6::jsonb)",
                new_id(),
                org,
                agent_id,
                f"CA{new_id()}",
                status,
                metadata,
            )
        await migrate(conn, shipped)
        tally = await conn.fetchrow('SELECT * FROM "AgentCallTally" WHERE "agentId" = $1', agent_id)
        assert tally is not None
        assert (tally["finished"], tally["completed"], tally["judged"], tally["succeeded"]) == (4, 2, 3, 2)
        assert await rate(conn, agent_id) == pytest.approx(200 / 3)
        assert await rate(conn, idle_id) == 0.0  # no calls: the stale 42 is gone
    finally:
        await conn.close()
