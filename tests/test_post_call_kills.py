"""Post-call analysis of a `dialtone serve` killed at the worst instant: the model has the request (the organization's
tokens are spent), the engine has not stored its answer. The fake OpenAI holds the answer; the process is SIGKILLed
while it waits, and a new process on the same database takes the analysis over once the dead one's claim is stale:
the call is analyzed once more (the model asked twice, no more), stored once, and announced once.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import asyncpg

from storage import events, organizations
from tests.fakes.openai_chat import FakeOpenAI
from tests.test_drain_processes import engine
from tests.test_outbound_post_call import (
    BOOKED,
    CLOUD_LLM,
    OPENAI_KEY,
    finished_call,
    make_agent,
    metadata_of,
    openai,
)
from tests.test_webhook_delivery import eventually
from tests.test_webhook_fairness import fresh

__all__ = ["fresh", "openai"]  # fixtures: a database per test, the fake OpenAI


async def test_an_analysis_killed_while_the_model_answers_is_taken_over_stored_and_announced_once(
    openai: FakeOpenAI, fresh: tuple[str, asyncpg.Pool], tmp_path: Path
) -> None:
    database_url, pool = fresh
    environment = {"OPENAI_API_KEY": OPENAI_KEY, "OPENAI_BASE_URL": openai.base_url}
    organization = await organizations.create_organization(
        pool, name="Killed", slug=f"killed-analysis-{secrets.token_hex(3)}", credits=100
    )
    agent_id = await make_agent(pool, organization.id, **CLOUD_LLM)
    call_log_id = await finished_call(pool, organization.id, agent_id, BOOKED)
    await events.create_event(
        pool, organization_id=organization.id, name="call.analyzed", webhook_url="https://hooks.example/analyzed"
    )
    openai.json_delay_ms = 3_600_000  # the model has the request; its answer never comes
    try:
        async with engine(database_url, tmp_path, drain_seconds=1, **environment) as doomed:
            for _ in range(1200):  # its sweep at start finds the ended call unanalyzed
                if openai.json_requests:
                    break
                await asyncio.sleep(0.05)
            assert len(openai.json_requests) == 1, "the engine never asked the model"
            doomed.process.kill()  # SIGKILL
            await doomed.process.wait()
    finally:
        openai.json_delay_ms = 0
    metadata = await metadata_of(pool, call_log_id)
    assert "analysisClaim" in metadata and "analysis" not in metadata
    # The dead engine's claim goes stale (10 minutes on).
    await pool.execute(
        """UPDATE "CallLog" SET "metadata" = jsonb_set("metadata", '{analysisClaim,at}',
               to_jsonb((now() - interval '11 minutes')::text)) WHERE "id" = $1""",
        call_log_id,
    )

    async with engine(database_url, tmp_path, drain_seconds=1, **environment):

        async def analyzed() -> bool:
            return "analysis" in await metadata_of(pool, call_log_id)

        await eventually(analyzed, "the next engine to take the analysis over")
        metadata = await metadata_of(pool, call_log_id)
        assert metadata["success"] is True and "error" not in metadata["analysis"]
    assert len(openai.json_requests) == 2
    announced = await pool.fetch(
        """SELECT "payload" FROM "WebhookDelivery" WHERE "organizationId" = $1 AND "event" = 'call.analyzed'""",
        organization.id,
    )
    assert [row["payload"]["data"]["callLogId"] for row in announced] == [call_log_id]
