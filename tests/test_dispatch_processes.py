"""Two real `dialtone serve` processes dial one campaign against the fake Twilio; one is SIGKILLed mid-campaign.

Twilio reaches the engines through one address (a small loopback proxy standing for the load balancer), so the
status callbacks of calls the dead process placed land on the survivor. Every recipient must be dialed exactly
once per attempt (the fake counts creates per number), nobody may be lost, and the campaign must complete.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import asyncpg
import pytest

from storage import campaigns
from storage.agents import create_agent
from storage.campaigns import CampaignRetryPolicy, DialingRules, NewRecipient
from storage.enums import CallerType, CampaignStatus
from storage.phone_numbers import create_phone_number
from tests.fakes.engine_processes import free_port, load_balancer, start_engine, wait_healthy
from tests.fakes.twilio import Busy, FakeTwilio, NoAnswer
from tests.test_repo_agents import insert_organization

REPO = Path(__file__).resolve().parent.parent
CALLER_ID = "+12125550000"
RECIPIENTS = 30
BUSY = [f"+1212555{n:04d}" for n in range(1000, 1000 + RECIPIENTS // 2)]  # busy twice: two attempts each
UNANSWERED = [f"+1212555{n:04d}" for n in range(2000, 2000 + RECIPIENTS // 2)]  # no-answer: one attempt


async def campaign_for_processes(pool: asyncpg.Pool) -> campaigns.Campaign:
    org = await insert_organization(pool)
    await pool.execute('UPDATE "Organization" SET "credits" = 1000 WHERE "id" = $1', org)
    await create_phone_number(pool, organization_id=org, phone_number=CALLER_ID)
    agent = await create_agent(pool, organization_id=org, name="Caller", caller_type=CallerType.OUTBOUND)
    rules = DialingRules(
        max_concurrent_calls=4,
        calls_per_second=5,
        retry=CampaignRetryPolicy(max_attempts=2, retry_on=frozenset({"busy"}), delays_seconds=(0,)),
    )
    campaign = await campaigns.create_campaign(
        pool, organization_id=org, batch_name="Shared", agent_id=agent.id, rules=rules
    )
    await campaigns.import_recipients(
        pool,
        organization_id=org,
        campaign_id=campaign.id,
        recipients=[NewRecipient(phone_number=n) for n in BUSY + UNANSWERED],
    )
    return await campaigns.start_campaign(pool, organization_id=org, campaign_id=campaign.id)


async def in_flight_of(pool: asyncpg.Pool, campaign_id: str, pid: int) -> tuple[int, int]:
    """(engines that have dialed the campaign, attempts the engine with process id `pid` has in flight)."""
    row = await pool.fetchrow(
        """
        SELECT (SELECT count(DISTINCT "dialedBy") FROM "CampaignAttempt" WHERE "campaignId" = $1)::int AS "dialers",
               (SELECT count(*) FROM "CampaignAttempt" a JOIN "EngineNode" n ON n."id" = a."dialedBy"
                WHERE a."campaignId" = $1 AND n."pid" = $2 AND a."state" IN ('DIALING', 'PLACED'))::int AS "mine"
        """,
        campaign_id,
        pid,
    )
    assert row is not None
    return row["dialers"], row["mine"]


async def kill_mid_campaign(pool: asyncpg.Pool, campaign_id: str, victim: asyncio.subprocess.Process) -> int:
    """SIGKILL `victim` once both engines have dialed and it has calls in flight; return how many it had."""
    for _ in range(400):
        dialers, mine = await in_flight_of(pool, campaign_id, victim.pid)
        if dialers == 2 and mine > 0:
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            return mine
        await asyncio.sleep(0.02)
    pytest.fail("the two engines did not both dial the campaign")


async def reached(pool: asyncpg.Pool, campaign_id: str, status: CampaignStatus, timeout: float = 150) -> bool:
    """Whether the campaign reaches `status` within `timeout` seconds."""
    for _ in range(int(timeout * 10)):
        if await pool.fetchval('SELECT "status" FROM "Campaign" WHERE "id" = $1', campaign_id) == status:
            return True
        await asyncio.sleep(0.1)
    return False


async def campaign_picture(pool: asyncpg.Pool, campaign_id: str) -> str:
    """The campaign's status and its recipients' dispatch and attempt states, for a failure's message."""
    campaign = await pool.fetchrow(
        """
        SELECT c."status", d."paused", d."pausedReason", d."nextDialAt"
        FROM "Campaign" c JOIN "CampaignDispatch" d ON d."campaignId" = c."id" WHERE c."id" = $1
        """,
        campaign_id,
    )
    dispatch = await pool.fetch(
        """
        SELECT d."state", d."leaseOwner" IS NOT NULL AS "leased", d."lastReason", a."state" AS "attempt",
            count(*)::int AS n
        FROM "CampaignRecipientDispatch" d LEFT JOIN "CampaignAttempt" a ON a."recipientId" = d."recipientId"
        WHERE d."campaignId" = $1 GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        """,
        campaign_id,
    )
    recipients = [tuple(row.values()) for row in dispatch]
    return f"campaign {dict(campaign or {})}; recipients (dispatch, leased, last reason, attempt, n): {recipients}"


async def test_a_campaign_survives_one_of_two_engines_being_killed(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    async with FakeTwilio() as twilio:
        for number in BUSY:
            twilio.behave(number, Busy(ring_ms=400))
        for number in UNANSWERED:
            twilio.behave(number, NoAnswer(ring_ms=400))
        ports = [free_port(), free_port()]
        backends = [f"http://127.0.0.1:{port}" for port in ports]
        async with load_balancer(backends) as public_url:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_"))}
            env.update(
                PYTHONPATH=str(REPO),
                DATABASE_URL=db_url,
                DIALTONE_PUBLIC_URL=public_url,
                DIALTONE_DISPATCH_INTERVAL="0.2",
                DIALTONE_DISPATCH_LEASE="5",
                DIALTONE_LOG_LEVEL="WARNING",
                TWILIO_ACCOUNT_SID=twilio.account_sid,
                TWILIO_AUTH_TOKEN=twilio.auth_token,
                TWILIO_API_BASE=twilio.api_base,
            )
            engines = []
            for index, port in enumerate(ports):
                env["DIALTONE_STATE_DIR"] = str(tmp_path / f"engine-{index}")
                engines.append(await start_engine(port, dict(env), tmp_path))
            try:
                for backend, engine in zip(backends, engines, strict=True):
                    await wait_healthy(backend, engine)
                campaign = await campaign_for_processes(pool)
                left_in_flight = await kill_mid_campaign(pool, campaign.id, engines[0])
                completed = await reached(pool, campaign.id, CampaignStatus.COMPLETED)
            finally:
                for engine in engines:
                    if engine.returncode is None:
                        engine.send_signal(signal.SIGTERM)
                stderr = [(await asyncio.wait_for(engine.communicate(), 30))[1].decode() for engine in engines]

    assert completed, f"not completed within 150 s: {await campaign_picture(pool, campaign.id)}\n{stderr[1][-3000:]}"

    creates = {number: twilio.creates[number] for number in BUSY + UNANSWERED}
    assert creates == {**{n: 2 for n in BUSY}, **{n: 1 for n in UNANSWERED}}, stderr[1][-3000:]
    counted = await pool.fetch(
        """
        SELECT r."phoneNumber", count(*) FILTER (WHERE a."state" <> 'ABANDONED')::int AS "attempts"
        FROM "CampaignRecipient" r JOIN "CampaignAttempt" a ON a."recipientId" = r."id"
        WHERE r."campaignId" = $1 GROUP BY r."phoneNumber"
        """,
        campaign.id,
    )
    assert {row["phoneNumber"]: row["attempts"] for row in counted} == creates
    states = await pool.fetch(
        'SELECT "state", count(*)::int AS n FROM "CampaignRecipientDispatch" WHERE "campaignId" = $1 GROUP BY 1',
        campaign.id,
    )
    assert {row["state"]: row["n"] for row in states} == {"FAILED": RECIPIENTS}
    done = await campaigns.get_campaign(pool, organization_id=campaign.organization_id, campaign_id=campaign.id)
    assert (done.total_calls, done.completed_calls, done.progress) == (RECIPIENTS, RECIPIENTS, 100)
    assert "Traceback" not in stderr[1], stderr[1][-3000:]
    assert left_in_flight > 0
