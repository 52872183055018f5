"""seed-demo: a usable demo organization on the offline providers, created once however often it runs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg

from config.agent import parse_agent_configuration
from storage import agents, api_keys, phone_numbers, users
from storage.demo import DEMO_OWNER_EMAIL, DEMO_PHONE_NUMBER, seed_demo
from storage.enums import AgentStatus, CallerType
from tests.databases import TestDatabases

TABLES = ["Organization", "User", "UserOrganization", "ApiKey", "Voice", "PhoneNumber", "ConversationPath", "Agent"]


async def _counts(pool: asyncpg.Pool) -> dict[str, int]:
    return {table: await pool.fetchval(f'SELECT count(*) FROM "{table}"') for table in TABLES}


async def test_the_demo_agent_answers_the_demo_number_with_offline_providers(pool: asyncpg.Pool) -> None:
    seed = await seed_demo(pool)
    number = await phone_numbers.find_by_number(pool, number=DEMO_PHONE_NUMBER)
    assert number is not None
    agent = await agents.find_inbound_agent(pool, phone_number_id=number.id)
    assert agent is not None
    assert agent.id == seed.agent_id
    assert (agent.status, agent.caller_type) == (AgentStatus.ACTIVE, CallerType.INBOUND)
    config = parse_agent_configuration(agent.configuration)
    assert (config.stt[0].provider, config.llm[0].provider, config.tts[0].provider) == (
        "sphinx",
        "conversation_path",
        "espeak",
    )
    bundle = await agents.load_agent_bundle(pool, organization_id=seed.organization_id, agent_id=seed.agent_id)
    assert [path.name for path in bundle.conversation_paths] == ["Front desk"]
    assert bundle.voice is not None
    assert bundle.voice.provider == "espeak"


async def test_the_first_run_shows_working_secrets_that_are_stored_only_as_hashes(databases: TestDatabases) -> None:
    pool = await databases.pool(await databases.migrated())
    try:
        seed = await seed_demo(pool)
        assert seed.api_key is not None
        assert seed.owner_password is not None
        key = await api_keys.authenticate(pool, plaintext=seed.api_key, now=datetime.now(UTC))
        owner = await users.verify_password(pool, email=DEMO_OWNER_EMAIL, password=seed.owner_password)
        stored = await pool.fetchrow('SELECT "key" FROM "ApiKey" WHERE "organizationId" = $1', seed.organization_id)
        password_hash = await pool.fetchval('SELECT "password" FROM "User" WHERE "email" = $1', DEMO_OWNER_EMAIL)
    finally:
        await pool.close()
    assert key is not None
    assert key.organization_id == seed.organization_id
    assert owner is not None
    assert stored is not None
    assert seed.api_key not in stored["key"]
    assert password_hash.startswith("$argon2")
    assert seed.owner_password not in seed.describe().replace(seed.owner_password, "", 1)


async def test_running_it_again_creates_nothing_and_shows_no_secret(databases: TestDatabases) -> None:
    pool = await databases.pool(await databases.migrated())
    try:
        first = await seed_demo(pool)
        before = await _counts(pool)
        second = await seed_demo(pool)
        after = await _counts(pool)
    finally:
        await pool.close()
    assert before == after
    assert second.created == []
    assert (second.api_key, second.owner_password) == (None, None)
    assert (second.organization_id, second.agent_id) == (first.organization_id, first.agent_id)
    assert "already seeded" in second.describe()


async def test_a_number_given_to_a_seeded_demo_is_the_one_its_agent_answers(databases: TestDatabases) -> None:
    pool = await databases.pool(await databases.migrated())
    try:
        first = await seed_demo(pool)
        moved = await seed_demo(pool, phone_number="+15555550177")
        new_number = await phone_numbers.find_by_number(pool, number="+15555550177")
        old_number = await phone_numbers.find_by_number(pool, number=DEMO_PHONE_NUMBER)
        assert new_number is not None and old_number is not None
        answering_new = await agents.find_inbound_agent(pool, phone_number_id=new_number.id)
        answering_old = await agents.find_inbound_agent(pool, phone_number_id=old_number.id)
    finally:
        await pool.close()
    assert answering_new is not None
    assert answering_new.id == first.agent_id
    assert answering_old is None
    assert moved.describe().splitlines()[1:] == [
        f"  inbound agent 'Front desk (offline)' ({first.agent_id}) answers +15555550177",
        "  owner owner@demo.dialtone.dev",
        "  created: phone number",
        f"  moved the agent from {DEMO_PHONE_NUMBER} to +15555550177",
    ]


async def test_a_run_without_a_number_leaves_the_agent_on_the_number_it_was_given(
    databases: TestDatabases,
) -> None:
    # `make run` seeds without a number at every start: it must not take the demo back to +15555550100.
    pool = await databases.pool(await databases.migrated())
    try:
        await seed_demo(pool)
        await seed_demo(pool, phone_number="+15555550177")
        again = await seed_demo(pool)
        number = await phone_numbers.find_by_number(pool, number="+15555550177")
        assert number is not None
        answering = await agents.find_inbound_agent(pool, phone_number_id=number.id)
    finally:
        await pool.close()
    assert answering is not None
    assert answering.id == again.agent_id
    assert again.phone_number == "+15555550177"
    assert "already seeded: nothing new" in again.describe()


async def test_concurrent_runs_seed_one_demo(databases: TestDatabases) -> None:
    pool = await databases.pool(await databases.migrated())
    try:
        results = await asyncio.gather(*(seed_demo(pool) for _ in range(3)))
        counts = await _counts(pool)
    finally:
        await pool.close()
    assert len({r.agent_id for r in results}) == 1
    assert sum(1 for r in results if r.api_key) == 1
    assert counts["Organization"] == 1
    assert counts["Agent"] == 1
    assert counts["ApiKey"] == 1
