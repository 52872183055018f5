"""A call whose CallLog is given a final status by something else while it runs (an operator's or a dashboard's
`UPDATE "CallLog" SET "status" = ...` in SQL): the credits its reservation holds are settled all the same, when the
call ends, on the minutes it ran."""

from __future__ import annotations

import asyncio

import asyncpg

from engine.simulator import Pause, Say
from storage import credit_reservations
from tests.engine_server import running_engine
from tests.test_api_auth import make_tenant
from tests.test_calls_e2e import TOKEN, call, make_line, turns


async def balance(pool: asyncpg.Pool, organization_id: str) -> int:
    """The organization's credits now."""
    credits: int = await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', organization_id)
    return credits


async def test_a_call_set_completed_in_sql_while_it_runs_is_settled_at_its_end(pool: asyncpg.Pool, db_url: str) -> None:
    tenant = await make_tenant(pool, "Ended outside", credits=10)  # one credit a minute
    number, _ = await make_line(
        pool, tenant.organization_id, firstSentence="Hello, you are through.", silenceTimeoutSeconds=120
    )
    async with running_engine(db_url, twilio_auth_token=TOKEN) as base:
        running = asyncio.create_task(call(base, number, Say("I would like to book an appointment"), Pause(3_000)))
        call_log_id = None
        for _ in range(1800):
            call_log_id = await pool.fetchval(
                'SELECT "id" FROM "CallLog" WHERE "organizationId" = $1', tenant.organization_id
            )
            if call_log_id is not None and len(await turns(pool, call_log_id)) >= 3:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the call never answered its caller")
        # An operator closes the call by hand while it still runs (its first minute reserved, one credit held).
        await pool.execute('UPDATE "CallLog" SET "status" = \'COMPLETED\' WHERE "id" = $1', call_log_id)
        assert await credit_reservations.reserved_credits(pool, call_log_id=call_log_id) == 1
        await running
        for _ in range(200):  # the session's end is written just after the caller has gone
            metadata = await pool.fetchval('SELECT "metadata" FROM "CallLog" WHERE "id" = $1', call_log_id)
            if "minutesCharged" in metadata or "endReason" in metadata:
                break
            await asyncio.sleep(0.05)

    # The call ran under a minute: it pays that minute, and nothing stays held.
    assert await credit_reservations.reserved_credits(pool, call_log_id=call_log_id) is None
    assert await balance(pool, tenant.organization_id) == 9
    row = await pool.fetchrow('SELECT "status", "metadata" FROM "CallLog" WHERE "id" = $1', call_log_id)
    assert row is not None
    assert row["status"] == "COMPLETED"  # left as the operator set it
    assert (row["metadata"]["minutesCharged"], row["metadata"]["creditsPerMinute"]) == (1, 1)
