"""`dialtone api-key create` as an operator runs it: a real process on the test database, the key printed once."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from storage import api_keys, organizations, users
from storage.enums import UserRole, UserStatus

REPO = Path(__file__).resolve().parent.parent


async def dialtone(*args: str, database_url: str) -> tuple[int, str, str]:
    """Run `dialtone` with the arguments against `database_url`; exit code, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_"))}
    env |= {"PYTHONPATH": str(REPO), "DATABASE_URL": database_url}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.server.cli",
        *args,
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_the_printed_key_authenticates_as_the_member(db_url: str, pool: asyncpg.Pool) -> None:
    org = await organizations.create_organization(pool, name="CLI Co", slug="cli-co")
    user = await users.create_user(pool, email="ops@cli.example", status=UserStatus.ACTIVE)
    await users.add_member(pool, user_id=user.id, organization_id=org.id, role=UserRole.ADMIN)
    code, out, err = await dialtone(
        "api-key", "create", "--org", "cli-co", "--user", "ops@cli.example", "--name", "ops", database_url=db_url
    )
    assert code == 0, err
    plaintext = out.strip().splitlines()[-1]
    assert plaintext.startswith("sk_live_")
    key = await api_keys.authenticate(pool, plaintext=plaintext, now=datetime.now(UTC))
    assert key is not None
    assert (key.organization_id, key.user_id, key.name) == (org.id, user.id, "ops")
    assert plaintext not in err


async def test_a_user_outside_the_organization_gets_no_key(db_url: str, pool: asyncpg.Pool) -> None:
    await organizations.create_organization(pool, name="Closed", slug="closed-co")
    await users.create_user(pool, email="stranger@cli.example")
    code, out, err = await dialtone(
        "api-key", "create", "--org", "closed-co", "--user", "stranger@cli.example", database_url=db_url
    )
    assert code == 1
    assert "not a member of closed-co" in err
    assert "sk_" not in out
    assert (
        await pool.fetchval(
            'SELECT count(*) FROM "ApiKey" k JOIN "Organization" o ON o."id" = k."organizationId" '
            "WHERE o.\"slug\" = 'closed-co'"
        )
        == 0
    )


async def test_an_unknown_organization_is_named(db_url: str) -> None:
    code, _, err = await dialtone("api-key", "create", "--org", "nope", "--user", "x@y.z", database_url=db_url)
    assert code == 1
    assert "Organization nope not found" in err
