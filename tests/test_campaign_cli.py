"""`dialtone campaign ...` as an operator runs it: real processes on a real database, one-line errors."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from pathlib import Path

import asyncpg

from engine.campaigns.cli import parse_days
from storage import campaigns
from storage.agents import create_agent
from storage.enums import CallerType, CampaignStatus
from storage.phone_numbers import create_phone_number
from tests.test_repo_agents import insert_organization

DIALTONE = [sys.executable, "-m", "engine.server.cli"]
REPO = Path(__file__).resolve().parent.parent


_numbers = itertools.count(100)


async def us_organization(pool: asyncpg.Pool) -> str:
    """An organization with a US number: by default it dials the US, where these files' numbers are."""
    org = await insert_organization(pool)
    await create_phone_number(pool, organization_id=org, phone_number=f"+1720555{next(_numbers):04d}")
    return org


async def dialtone(db_url: str, cwd: Path, *args: str, **settings: str) -> tuple[int, str, str]:
    """Run `dialtone *args` on the database, with no settings from this environment but `settings` (env names)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_", "OPENAI_"))}
    env.update(PYTHONPATH=str(REPO), DATABASE_URL=db_url, DIALTONE_LOG_LEVEL="WARNING", **settings)
    process = await asyncio.create_subprocess_exec(
        *DIALTONE, *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_create_import_start_pause_stop_and_status(pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    org = await us_organization(pool)
    slug = await pool.fetchval('SELECT "slug" FROM "Organization" WHERE "id" = $1', org)
    agent = await create_agent(pool, organization_id=org, name="Caller", caller_type=CallerType.OUTBOUND)

    code, out, err = await dialtone(
        db_url,
        tmp_path,
        *("campaign", "create", "--org", slug, "--agent", agent.id, "--name", "Renewals"),
        *("--window", "09:00-17:00", "--days", "mon-fri", "--timezone", "Europe/Paris"),
        *("--max-concurrent", "3", "--calls-per-second", "2", "--max-attempts", "3", "--retry-on", "busy"),
        *("--retry-delays", "600,3600"),
    )
    assert code == 0, err
    campaign_id = out.strip()
    state = await campaigns.get_dispatch_state(pool, organization_id=org, campaign_id=campaign_id)
    assert state.rules.days_of_week == frozenset({1, 2, 3, 4, 5})
    assert state.rules.retry.delays_seconds == (600, 3600)

    csv = tmp_path / "people.csv"
    csv.write_text("\ufeffname;phone;plan\nAda;+12125551234;gold\nGrace;not a number;silver\n", encoding="utf-8")
    code, out, err = await dialtone(db_url, tmp_path, "campaign", "import", "--org", org, campaign_id, str(csv))
    assert code == 0, err
    assert "2 rows" in out and "1 recipients imported" in out and "1 invalid" in out
    assert "importing [" in err and "100%" in err

    for action in ("start", "pause"):
        code, _, err = await dialtone(db_url, tmp_path, "campaign", action, "--org", org, campaign_id)
        assert code == 0, err
    code, out, err = await dialtone(db_url, tmp_path, "campaign", "status", "--once", "--org", org, campaign_id)
    assert code == 0, err
    assert "Renewals" in out and "PLANNED" in out and "PAUSED: paused by request" in out
    assert "queued 1" in out and "invalid 1" in out

    code, _, err = await dialtone(db_url, tmp_path, "campaign", "stop", "--org", org, campaign_id)
    assert code == 0, err
    stopped = await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign_id)
    assert stopped.status == CampaignStatus.STOPPED
    # Watching a campaign that places no more calls shows its last state and ends, rather than redraw it for ever.
    code, out, err = await dialtone(db_url, tmp_path, "campaign", "status", "--org", org, campaign_id)
    assert code == 0, err
    assert out.count("STOPPED") == 1


async def test_mistakes_get_one_line_naming_what_is_wrong(pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    org = await us_organization(pool)
    agent = await create_agent(pool, organization_id=org, name="Caller")
    code, _, err = await dialtone(
        db_url, tmp_path, "campaign", "create", "--org", org, "--agent", agent.id, "--name", "X", "--window", "9-5"
    )
    assert code == 1 and err.startswith("dialtone: ") and "'9'" in err and "Traceback" not in err

    campaign = await campaigns.create_campaign(pool, organization_id=org, batch_name="Y", agent_id=agent.id)
    headerless = tmp_path / "bad.csv"
    headerless.write_text("email\nada@example.com\n", encoding="utf-8")
    code, _, err = await dialtone(db_url, tmp_path, "campaign", "import", "--org", org, campaign.id, str(headerless))
    assert code == 1 and "no phone number column" in err and "Traceback" not in err

    code, _, err = await dialtone(db_url, tmp_path, "campaign", "start", "--org", org, campaign.id)
    assert code == 1 and "no valid recipient" in err

    people = tmp_path / "people.csv"
    people.write_text("phone\n+12125551234\n", encoding="utf-8")
    code, _, err = await dialtone(db_url, tmp_path, "campaign", "import", "--org", org, campaign.id, str(people))
    assert code == 0, err
    code, _, err = await dialtone(db_url, tmp_path, "campaign", "start", "--org", org, campaign.id)
    assert code == 1 and "only OUTBOUND agents place calls" in err and "Traceback" not in err  # as POST /v1/calls
    assert (await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)).status == "DRAFT"


async def refused_import(pool: asyncpg.Pool, db_url: str, tmp_path: Path, csv: Path) -> str:
    """`dialtone campaign import` of `csv` into a new campaign, which must fail in one line importing nothing;
    its stderr."""
    org = await us_organization(pool)
    agent = await create_agent(pool, organization_id=org, name="Caller")
    campaign = await campaigns.create_campaign(pool, organization_id=org, batch_name="Refused", agent_id=agent.id)
    code, _, err = await dialtone(db_url, tmp_path, "campaign", "import", "--org", org, campaign.id, str(csv))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert await campaigns.list_recipients(pool, organization_id=org, campaign_id=campaign.id) == []
    return err


async def test_a_file_the_csv_module_cannot_read_is_one_line_naming_where_and_imports_nothing(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    oversized = tmp_path / "oversized.csv"
    oversized.write_text(f"phone,plan\n+12125550187,gold\n+12125550188,{'z' * 140_000}\n", encoding="utf-8")
    err = await refused_import(pool, db_url, tmp_path, oversized)
    assert err.startswith("dialtone: line 3: not readable as CSV"), err


async def test_a_latin1_file_is_refused_naming_the_line_and_byte_where_it_stops_being_utf8(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    rows = "".join(f"+1212555{n:04d},Person {n}\n" for n in range(5000))  # past the reader's first chunks
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(("phone,name\n" + rows + "+12125559999,Zoé\n").encode("latin-1"))
    offset = latin1.read_bytes().index("é".encode("latin-1"))
    err = await refused_import(pool, db_url, tmp_path, latin1)
    assert f"not UTF-8 text at line 5002 (byte offset {offset:,}: invalid continuation byte)" in err, err


def test_days_read_as_names_ranges_or_numbers() -> None:
    assert parse_days("mon-fri") == frozenset({1, 2, 3, 4, 5})
    assert parse_days("sat,sun") == frozenset({6, 7})
    assert parse_days("1,3-4") == frozenset({1, 3, 4})


async def test_a_region_no_number_is_read_in_is_one_line_and_imports_nothing_and_a_lowercase_one_is_read(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    org = await us_organization(pool)
    agent = await create_agent(pool, organization_id=org, name="Caller")
    campaign = await campaigns.create_campaign(pool, organization_id=org, batch_name="Regions", agent_id=agent.id)
    people = tmp_path / "people.csv"
    people.write_text("phone\n(212) 555-0181\n212.555.0182\n", encoding="utf-8")
    args = ("campaign", "import", "--org", org, campaign.id, str(people), "--region")

    code, _, err = await dialtone(db_url, tmp_path, *args, "UK")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "--region: 'UK' is not a region numbers are read in" in err and "GB (the United Kingdom)" in err
    assert await campaigns.list_recipients(pool, organization_id=org, campaign_id=campaign.id) == []

    code, _, err = await dialtone(db_url, tmp_path, *args, "us")
    assert code == 0, err
    imported = await campaigns.list_recipients(pool, organization_id=org, campaign_id=campaign.id)
    assert sorted((r.phone_number, r.status) for r in imported) == [
        ("+12125550181", "READY"),
        ("+12125550182", "READY"),
    ]
