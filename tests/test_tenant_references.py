"""The database itself refuses a row that points at another organization's parent, whoever writes it.

Written as the engine's own role (not the API's, so row-level security plays no part): each child row names a
parent of a second organization by its id, and the composite key (parentId, organizationId) refuses it. An
optional reference is cleared when its parent goes, without touching the child's organizationId.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
import pytest


@dataclass(frozen=True, slots=True)
class Parents:
    """One organization's row of each parent table, by table name."""

    organization_id: str
    ids: dict[str, str]


async def make_parents(pool: asyncpg.Pool) -> Parents:
    """An organization with a phone number, an agent, a conversation path, a campaign, a call log and an event."""
    suffix = uuid.uuid4().hex[:12]
    org, ids = f"org_{suffix}", {table: f"{table.lower()}_{suffix}" for table in _PARENT_TABLES}
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute('INSERT INTO "Organization" ("id", "name", "slug") VALUES ($1, $1, $1)', org)
        await conn.execute(
            'INSERT INTO "PhoneNumber" ("id", "organizationId", "phoneNumber") VALUES ($1, $2, $3)',
            ids["PhoneNumber"],
            org,
            f"+1555{int(suffix[:7], 16) % 10_000_000:07d}",
        )
        await conn.execute(
            'INSERT INTO "Agent" ("id", "organizationId", "name") VALUES ($1, $2, $1)', ids["Agent"], org
        )
        await conn.execute(
            'INSERT INTO "ConversationPath" ("id", "organizationId", "name") VALUES ($1, $2, $1)',
            ids["ConversationPath"],
            org,
        )
        await conn.execute(
            'INSERT INTO "Campaign" ("id", "organizationId", "batchName", "agentId") VALUES ($1, $2, $1, $3)',
            ids["Campaign"],
            org,
            ids["Agent"],
        )
        await conn.execute(
            'INSERT INTO "CallLog" ("id", "organizationId", "callType", "callId", "agentId", "campaignId") '
            "VALUES ($1, $2, 'OUTBOUND', $1, $3, $4)",
            ids["CallLog"],
            org,
            ids["Agent"],
            ids["Campaign"],
        )
        await conn.execute(
            'INSERT INTO "Event" ("id", "organizationId", "name", "webhookUrl", "agentId") '
            "VALUES ($1, $2, 'call.ended', 'https://hooks.example/x', $3)",
            ids["Event"],
            org,
            ids["Agent"],
        )
    return Parents(org, ids)


_PARENT_TABLES = ("PhoneNumber", "Agent", "ConversationPath", "Campaign", "CallLog", "Event")


@dataclass(frozen=True, slots=True)
class Reference:
    """A child table's reference column, its parent table, and the other columns a child row needs."""

    table: str
    column: str
    parent: str
    others: dict[str, object]


AGENT_NUMBER = Reference("Agent", "phoneNumberId", "PhoneNumber", {"name": "agent"})
REFERENCES = [
    AGENT_NUMBER,
    Reference("Campaign", "agentId", "Agent", {"batchName": "campaign"}),
    Reference("Campaign", "conversationPathId", "ConversationPath", {"batchName": "campaign", "agentId": "Agent"}),
    Reference("CallLog", "agentId", "Agent", {"callType": "INBOUND", "callId": None}),
    Reference("CallLog", "campaignId", "Campaign", {"callType": "OUTBOUND", "callId": None}),
    Reference("Event", "agentId", "Agent", {"name": "call.ended", "webhookUrl": "https://hooks.example/x"}),
    Reference(
        "CallTurn", "callLogId", "CallLog", {"index": 0, "speaker": "agent", "text": "hi", "startMs": 0, "endMs": 1}
    ),
    Reference("WebhookDelivery", "eventId", "Event", {"occurrenceId": None, "event": "call.ended", "payload": "{}"}),
]


async def insert_child(pool: asyncpg.Pool, owner: Parents, reference: Reference, parent_id: str) -> str:
    """Insert a row of `owner`'s into the reference's table, pointing at `parent_id`; returns its id.

    In `others`, a value naming a parent table stands for the owner's row of that table; None for a unique text.
    """
    row_id = f"{reference.table.lower()}_{uuid.uuid4().hex[:12]}"
    values: dict[str, object] = {"id": row_id, "organizationId": owner.organization_id, reference.column: parent_id}
    for name, value in reference.others.items():
        values[name] = (
            uuid.uuid4().hex if value is None else owner.ids.get(value, value) if isinstance(value, str) else value
        )
    columns = ", ".join(f'"{name}"' for name in values)
    placeholders = ", ".join(f"${n}" for n in range(1, len(values) + 1))
    await pool.execute(f'INSERT INTO "{reference.table}" ({columns}) VALUES ({placeholders})', *values.values())
    return row_id


@pytest.fixture(scope="module")
async def ours(pool: asyncpg.Pool) -> Parents:
    return await make_parents(pool)


@pytest.fixture(scope="module")
async def theirs(pool: asyncpg.Pool) -> Parents:
    return await make_parents(pool)


@pytest.mark.parametrize("reference", REFERENCES, ids=[f"{r.table}.{r.column}" for r in REFERENCES])
async def test_a_row_pointing_at_another_organizations_parent_is_refused(
    pool: asyncpg.Pool, ours: Parents, theirs: Parents, reference: Reference
) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError) as refused:
        await insert_child(pool, ours, reference, theirs.ids[reference.parent])
    assert refused.value.constraint_name == f"{reference.table}_{reference.column}_organizationId_fkey"
    await insert_child(pool, ours, reference, ours.ids[reference.parent])  # its own parent is fine


async def test_moving_a_row_to_another_organizations_parent_is_refused(
    pool: asyncpg.Pool, ours: Parents, theirs: Parents
) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await pool.execute(
            'UPDATE "CallLog" SET "agentId" = $1 WHERE "id" = $2', theirs.ids["Agent"], ours.ids["CallLog"]
        )


async def test_deleting_a_parent_clears_optional_references_and_keeps_the_childs_organization(
    pool: asyncpg.Pool,
) -> None:
    parents = await make_parents(pool)
    agent = await insert_child(pool, parents, AGENT_NUMBER, parents.ids["PhoneNumber"])
    await pool.execute('DELETE FROM "PhoneNumber" WHERE "id" = $1', parents.ids["PhoneNumber"])
    await pool.execute('DELETE FROM "Campaign" WHERE "id" = $1', parents.ids["Campaign"])

    row = await pool.fetchrow('SELECT "phoneNumberId", "organizationId" FROM "Agent" WHERE "id" = $1', agent)
    assert row is not None
    assert dict(row) == {"phoneNumberId": None, "organizationId": parents.organization_id}
    row = await pool.fetchrow(
        'SELECT "campaignId", "agentId", "organizationId" FROM "CallLog" WHERE "id" = $1', parents.ids["CallLog"]
    )
    assert row is not None
    assert dict(row) == {
        "campaignId": None,
        "agentId": parents.ids["Agent"],
        "organizationId": parents.organization_id,
    }
