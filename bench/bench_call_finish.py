"""What ending a call costs in PostgreSQL as its agent's history grows: the end's transaction and the verdict's.

On an embedded PostgreSQL, one agent gets N earlier calls (finished, 80% with a post-call verdict, metadata and a
transcript of the size real calls leave); then calls of that agent are ended one at a time, as the engine's CallLog
store ends them (`finalize_call_log` and `increment_total_calls` in one transaction, the success rate kept up with
them), and judged as post-call analysis judges them (`merge_metadata` of the verdict); then 20 of its calls end at
once. Prints the medians for each N. With a checkout whose storage still has `agents.refresh_success_rate` (the rate
recomputed from every CallLog of the agent), it calls that where the engine did; otherwise the database's own tally
keeps the rate. Asserts nothing. Usage: python -m bench.bench_call_finish [N ...] (default 0 10000 100000)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from storage import agents
from storage.call_logs import create_call_log, finalize_call_log, merge_metadata
from storage.embedded import start_embedded
from storage.enums import CallStatus, CallType
from storage.migrate import migrate
from storage.pool import create_pool, ensure_database
from storage.records import new_id, transaction

ENDS = 40
"""Calls ended (and then judged) one at a time per history size."""
AT_ONCE = 20
"""Calls ended at the same moment per history size."""

_METADATA = {
    "endReason": "caller_hung_up",
    "latencyMs": {"p50": 781, "p95": 799, "max": 812, "turns": 6},
    "summary": "Caller asked about the opening hours and booked a table for two on Friday at 7 pm. " * 6,
    "successReason": "The caller booked a table, which the task asked for.",
    "analysis": {"model": "gpt-4o-mini", "at": "2026-12-07T01:00:00.000+00:00"},
    "conversationPath": {"node": "confirm", "visited": ["greeting", "hours", "booking", "confirm"]},
}
_TRANSCRIPT = "Agent: Hello, thanks for calling. How can I help?\nCaller: I'd like to book a table for two.\n" * 30

refresh: Callable[..., Awaitable[object]] | None = getattr(agents, "refresh_success_rate", None)


HISTORY_BATCH = 1_000
"""Earlier calls inserted per statement (each its own transaction), as a bulk load of finished calls should be."""


async def _history(pool: asyncpg.Pool, org: str, agent_id: str, calls: int) -> None:
    """`calls` finished calls of the agent, 80% judged (three in four of those a success)."""
    prefix = new_id()
    for first in range(1, calls + 1, HISTORY_BATCH):
        await pool.execute(
            """
            INSERT INTO "CallLog" ("id", "organizationId", "callType", "agentId", "callId", "status", "duration",
                                   "transcript", "metadata")
            SELECT 'h' || $3 || '-' || i, $1, 'INBOUND', $2, 'CA' || $3 || '-' || i,
                   (CASE WHEN i % 10 = 0 THEN 'FAILED' ELSE 'COMPLETED' END)::"CallStatus", 60, $4,
                   CASE WHEN i % 5 = 0 THEN $5::jsonb ELSE $5::jsonb || jsonb_build_object('success', i % 4 <> 0) END
            FROM generate_series($6::int, $7::int) AS i
            """,
            org,
            agent_id,
            prefix,
            _TRANSCRIPT,
            _METADATA,
            first,
            min(first + HISTORY_BATCH - 1, calls),
        )
    await pool.execute('ANALYZE "CallLog"')


async def _end(pool: asyncpg.Pool, org: str, agent_id: str, call_log_id: str) -> None:
    """A call's end as the engine's CallLog store writes it."""
    async with transaction(pool) as conn:
        await finalize_call_log(
            conn,
            organization_id=org,
            call_log_id=call_log_id,
            status=CallStatus.COMPLETED,
            duration=60,
            metadata=dict(_METADATA),
        )
        await agents.increment_total_calls(conn, organization_id=org, agent_id=agent_id)
        if refresh is not None:
            await refresh(conn, organization_id=org, agent_id=agent_id)


async def _judge(pool: asyncpg.Pool, org: str, agent_id: str, call_log_id: str) -> None:
    """A verdict as post-call analysis stores it."""
    async with transaction(pool) as conn:
        await merge_metadata(conn, organization_id=org, call_log_id=call_log_id, metadata={"success": True})
        if refresh is not None:
            await refresh(conn, organization_id=org, agent_id=agent_id)


async def _new_calls(pool: asyncpg.Pool, org: str, agent_id: str, count: int) -> list[str]:
    calls = []
    for _ in range(count):
        log = await create_call_log(
            pool, organization_id=org, call_type=CallType.INBOUND, call_id=f"CA{new_id()}", agent_id=agent_id
        )
        calls.append(log.id)
    return calls


async def _timed(step: Awaitable[None]) -> float:
    """Milliseconds to run `step` (a coroutine not yet started)."""
    began = time.perf_counter()
    await step
    return (time.perf_counter() - began) * 1000


async def _round(pool: asyncpg.Pool, org: str, history: int, *, show: bool = True) -> None:
    agent = await agents.create_agent(pool, organization_id=org, name=f"History {history}")
    await _history(pool, org, agent.id, history)
    calls = await _new_calls(pool, org, agent.id, ENDS)
    ends = [await _timed(_end(pool, org, agent.id, call)) for call in calls]
    judged = [await _timed(_judge(pool, org, agent.id, call)) for call in calls]
    together = await _new_calls(pool, org, agent.id, AT_ONCE)
    at_once = await _timed(_gather(pool, org, agent.id, together))
    rate = await pool.fetchval('SELECT "successRate" FROM "Agent" WHERE "id" = $1', agent.id)
    if not show:
        return
    print(
        f"{history:>9,} {statistics.median(ends):12.2f} {statistics.median(judged):12.2f} {at_once:14.1f} {rate:9.2f}"
    )


async def _gather(pool: asyncpg.Pool, org: str, agent_id: str, calls: list[str]) -> None:
    await asyncio.gather(*(_end(pool, org, agent_id, call) for call in calls))


async def main(histories: list[int]) -> None:
    with tempfile.TemporaryDirectory(prefix="dialtone-bench-call-finish-") as scratch:
        server = start_embedded(Path(scratch) / "db")
        await ensure_database(server.url(), "bench")
        url = server.url("bench")
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        pool = await create_pool(url, min_size=AT_ONCE, max_size=AT_ONCE)  # every connection open before timing
        try:
            org = new_id()
            await pool.execute(
                'INSERT INTO "Organization" ("id", "name", "slug") VALUES ($1, $1, $1)',
                org,
            )
            how = "recomputed from every CallLog of the agent" if refresh else "kept by the CallLog tally trigger"
            print(f"ending a call, success rate {how}; medians of {ENDS} ends and verdicts, {AT_ONCE} ends at once:")
            print(f"{'history':>9} {'end ms':>12} {'verdict ms':>12} {'20 at once ms':>14} {'rate %':>9}")
            await _round(pool, org, 0, show=False)  # every connection has prepared its statements and types
            for history in histories:
                await _round(pool, org, history)
        finally:
            await pool.close()


if __name__ == "__main__":
    asyncio.run(main([int(arg) for arg in sys.argv[1:]] or [0, 10_000, 100_000]))
