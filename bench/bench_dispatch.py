"""Campaign dispatch: calls placed per second with one and with three engine processes, and a 100,000-row import.

Starts real `dialtone serve` processes on an embedded PostgreSQL, all dialing one campaign through the fake
Twilio REST API (in this process; its callbacks reach the engines through a loopback proxy standing for the
load balancer). The campaign's pace and concurrency cap are set far above what the engines can do, so the
figure is the engines' own rate. Then imports a generated 100,000-row CSV into a campaign. Prints figures;
asserts nothing.

Usage: python -m bench.bench_dispatch [recipients]   (default: 600)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from engine.campaigns.recipients_csv import open_recipients_file, read_recipients
from storage import campaigns, dial_policies
from storage.agents import create_agent
from storage.campaigns import DialingRules, NewRecipient
from storage.embedded import start_embedded
from storage.enums import CallerType, CampaignStatus
from storage.migrate import migrate
from storage.organizations import create_organization
from storage.phone_numbers import create_phone_number
from storage.pool import create_pool, ensure_database
from storage.records import new_id
from tests.fakes.engine_processes import free_port, load_balancer, wait_healthy
from tests.fakes.twilio import FakeTwilio, NoAnswer

REPO = Path(__file__).resolve().parent.parent
IMPORT_ROWS = 100_000


async def _campaign(pool: asyncpg.Pool, recipients: int, first_number: int) -> tuple[str, str]:
    org = await create_organization(pool, name="Bench", slug=f"bench-{new_id()}", credits=1_000_000)
    await create_phone_number(pool, organization_id=org.id, phone_number=f"+1646555{first_number // 10000:04d}")
    agent = await create_agent(pool, organization_id=org.id, name="Bench", caller_type=CallerType.OUTBOUND)
    campaign = await campaigns.create_campaign(
        pool,
        organization_id=org.id,
        batch_name="bench",
        agent_id=agent.id,
        rules=DialingRules(max_concurrent_calls=1000, calls_per_second=1000),
    )
    numbers = [NewRecipient(phone_number=f"+1212{first_number + n}") for n in range(recipients)]
    await campaigns.import_recipients(pool, organization_id=org.id, campaign_id=campaign.id, recipients=numbers)
    return org.id, campaign.id


async def _dial_round(url: str, pool: asyncpg.Pool, tmp: Path, *, engines: int, recipients: int, first: int) -> None:
    async with FakeTwilio() as twilio:
        twilio.default = NoAnswer(ring_ms=50)
        ports = [free_port() for _ in range(engines)]
        backends = [f"http://127.0.0.1:{port}" for port in ports]
        async with load_balancer(backends) as public_url:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_"))}
            env |= {"PYTHONPATH": str(REPO), "DATABASE_URL": url, "DIALTONE_PUBLIC_URL": public_url,
                    "DIALTONE_DISPATCH_INTERVAL": "0.2", "DIALTONE_LOG_LEVEL": "WARNING",
                    "TWILIO_ACCOUNT_SID": twilio.account_sid, "TWILIO_AUTH_TOKEN": twilio.auth_token,
                    "TWILIO_API_BASE": twilio.api_base, "DIALTONE_SECRET_KEY": secrets.token_hex(32)}  # fmt: skip
            processes = []
            for index, port in enumerate(ports):
                env["DIALTONE_STATE_DIR"] = str(tmp / f"state-{engines}-{index}")
                processes.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "engine.server.cli", "serve", "--port", str(port), env=dict(env)
                    )
                )
            try:
                for backend, process in zip(backends, processes, strict=True):
                    await wait_healthy(backend, process)
                org, campaign_id = await _campaign(pool, recipients, first)
                began = time.perf_counter()
                await campaigns.start_campaign(pool, organization_id=org, campaign_id=campaign_id)
                placed = await _seconds_until(lambda: _all_placed(twilio, recipients), began)
                finished = await _seconds_until(lambda: _completed(pool, campaign_id), began)
            finally:
                for process in processes:
                    process.send_signal(signal.SIGTERM)
                await asyncio.gather(*(process.wait() for process in processes))
    print(
        f"  {engines} engine{'s' if engines > 1 else ' '}: {recipients} calls placed in {placed:5.2f} s = "
        f"{recipients / placed:6.1f} calls/s; campaign COMPLETED after {finished:5.2f} s"
    )


async def _seconds_until(condition: Callable[[], Awaitable[bool]], since: float) -> float:
    """Seconds from `since` until `condition` holds, looked at every 20 ms."""
    while True:
        if await condition():
            return time.perf_counter() - since
        await asyncio.sleep(0.02)


async def _all_placed(twilio: FakeTwilio, recipients: int) -> bool:
    return sum(twilio.creates.values()) >= recipients


async def _completed(pool: asyncpg.Pool, campaign_id: str) -> bool:
    status = await pool.fetchval('SELECT "status" FROM "Campaign" WHERE "id" = $1', campaign_id)
    return bool(status == CampaignStatus.COMPLETED)


async def _import(pool: asyncpg.Pool, tmp: Path) -> None:
    org, campaign_id = await _campaign(pool, 0, 0)
    path = tmp / "recipients.csv"
    with path.open("w", encoding="utf-8") as out:
        out.write("name,phone,notes,plan\n")
        for n in range(IMPORT_ROWS):
            out.write(f"Person {n},+1917{2000000 + n},note {n},tier{n % 5}\n")
    began = time.perf_counter()
    policy = await dial_policies.get_policy(pool, organization_id=org)  # as the API's import reads it
    with open_recipients_file(path) as stream:
        summary = await campaigns.import_recipients(
            pool,
            organization_id=org,
            campaign_id=campaign_id,
            recipients=(row.recipient for row in read_recipients(stream, policy=policy)),
        )
    elapsed = time.perf_counter() - began
    print(
        f"  import: {summary.rows:,} CSV rows ({path.stat().st_size / 1e6:.1f} MB) parsed, checked and copied in "
        f"{elapsed:.2f} s = {summary.rows / elapsed:,.0f} rows/s ({summary.imported:,} imported)"
    )


async def main(recipients: int) -> None:
    with tempfile.TemporaryDirectory(prefix="dialtone-bench-dispatch-") as scratch:
        tmp = Path(scratch)
        server = start_embedded(tmp / "db")
        await ensure_database(server.url(), "bench")
        url = server.url("bench")
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        pool = await create_pool(url)
        try:
            print(f"campaign dispatch against the fake Twilio REST API, {os.cpu_count()} cores:")
            await _dial_round(url, pool, tmp, engines=1, recipients=recipients, first=2_000_000)
            await _dial_round(url, pool, tmp, engines=3, recipients=recipients, first=3_000_000)
            await _import(pool, tmp)
        finally:
            await pool.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 600))
