"""Agents: the voice agents that take and place calls, the resources linked to them, and their counters."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
from pydantic.alias_generators import to_camel

from storage.conversation_paths import ConversationPath
from storage.enums import AgentStatus, CallerType
from storage.errors import InvalidReference, NotFound, translate_errors
from storage.knowledge_bases import KnowledgeBaseWithDocuments
from storage.phone_numbers import PhoneNumber
from storage.records import Queryable, Record, StoredJsonObject, new_id, transaction
from storage.tools import Tool
from storage.voices import Voice

_FIELDS = (
    "id",
    "organizationId",
    "name",
    "description",
    "type",
    "status",
    "callerType",
    "phoneNumberId",
    "voiceId",
    "successRate",
    "totalCalls",
    "configuration",
    "createdAt",
    "updatedAt",
)
_COLUMNS = ", ".join(f'"{field}"' for field in _FIELDS)
_AGENT_COLUMNS = ", ".join(f'a."{field}"' for field in _FIELDS)


class Agent(Record):
    """A voice agent: who it answers or calls for, and the provider configuration its calls run on."""

    id: str
    organization_id: str
    name: str
    description: str | None
    type: str | None
    status: AgentStatus
    caller_type: CallerType
    phone_number_id: str | None
    voice_id: str | None
    success_rate: float
    total_calls: int
    configuration: StoredJsonObject
    """An object when saved through the API; read as stored otherwise, for config.agent to read (null: the
    defaults) or refuse when a call starts, instead of failing every read of the agent and its number."""
    created_at: datetime
    updated_at: datetime


class AgentBundle(Record):
    """An agent with everything a call needs of it: number, voice, knowledge, tools and conversation paths."""

    agent: Agent
    phone_number: PhoneNumber | None
    voice: Voice | None
    knowledge_bases: list[KnowledgeBaseWithDocuments]
    tools: list[Tool]
    conversation_paths: list[ConversationPath]
    """The paths linked to the agent, its default (AgentConversationPath.isDefault) first, then in link order."""


async def create_agent(
    db: Queryable,
    *,
    organization_id: str,
    name: str,
    description: str | None = None,
    type: str | None = None,
    status: AgentStatus = AgentStatus.ACTIVE,
    caller_type: CallerType = CallerType.INBOUND,
    phone_number_id: str | None = None,
    voice_id: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> Agent:
    """Create an agent; InvalidReference if its phone number or voice is not the organization's to use."""
    with translate_errors():
        row = await db.fetchrow(
            f"""
            INSERT INTO "Agent"
                ("id", "organizationId", "name", "description", "type", "status", "callerType", "phoneNumberId",
                 "voiceId", "configuration")
            SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
            WHERE ($8::text IS NULL OR EXISTS (
                    SELECT 1 FROM "PhoneNumber" WHERE "id" = $8 AND "organizationId" = $2))
              AND ($9::text IS NULL OR EXISTS (
                    SELECT 1 FROM "Voice" WHERE "id" = $9 AND ("organizationId" = $2 OR "organizationId" IS NULL)))
            RETURNING {_COLUMNS}
            """,
            new_id(),
            organization_id,
            name,
            description,
            type,
            status,
            caller_type,
            phone_number_id,
            voice_id,
            configuration if configuration is not None else {},
        )
    if row is None:
        raise await _unusable_reference(db, organization_id, phone_number_id, voice_id)
    return Agent.from_row(row)


async def _unusable_reference(
    db: Queryable, organization_id: str, phone_number_id: str | None, voice_id: str | None
) -> InvalidReference:
    # Only reached when the guarded INSERT found a reference it may not use: name which one.
    if phone_number_id is not None and not await db.fetchval(
        'SELECT EXISTS (SELECT 1 FROM "PhoneNumber" WHERE "id" = $1 AND "organizationId" = $2)',
        phone_number_id,
        organization_id,
    ):
        return InvalidReference(
            f"PhoneNumber {phone_number_id} is not a number of organization {organization_id}",
            entity="PhoneNumber",
            key=phone_number_id,
        )
    return InvalidReference(
        f"Voice {voice_id} is neither a system voice nor a voice of organization {organization_id}",
        entity="Voice",
        key=voice_id,
    )


async def get_agent(db: Queryable, *, organization_id: str, agent_id: str) -> Agent:
    """The organization's agent with that id; NotFound otherwise."""
    row = await db.fetchrow(
        f'SELECT {_COLUMNS} FROM "Agent" WHERE "id" = $1 AND "organizationId" = $2', agent_id, organization_id
    )
    if row is None:
        raise NotFound("Agent", agent_id)
    return Agent.from_row(row)


async def list_agents(
    db: Queryable,
    *,
    organization_id: str,
    status: AgentStatus | None = None,
    caller_type: CallerType | None = None,
) -> list[Agent]:
    """The organization's agents, newest first, optionally only those of one status and caller type."""
    conditions = ['"organizationId" = $1']
    args: list[Any] = [organization_id]
    if status is not None:
        args.append(status)
        conditions.append(f'"status" = ${len(args)}')
    if caller_type is not None:
        args.append(caller_type)
        conditions.append(f'"callerType" = ${len(args)}')
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "Agent"
        WHERE {" AND ".join(conditions)}
        ORDER BY "createdAt" DESC, "id" DESC
        """,
        *args,
    )
    return Agent.from_rows(rows)


async def update_agent_status(db: Queryable, *, organization_id: str, agent_id: str, status: AgentStatus) -> Agent:
    """Turn an agent on (ACTIVE) or off (INACTIVE)."""
    return await _update(db, organization_id, agent_id, '"status" = $3', status)


async def update_agent_configuration(
    db: Queryable, *, organization_id: str, agent_id: str, configuration: dict[str, Any]
) -> Agent:
    """Replace an agent's provider configuration (validated by config/ before it gets here)."""
    return await _update(db, organization_id, agent_id, '"configuration" = $3', configuration)


async def increment_total_calls(db: Queryable, *, organization_id: str, agent_id: str) -> Agent:
    """Count one more call for the agent, in one UPDATE so concurrent calls are all counted."""
    return await _update(db, organization_id, agent_id, '"totalCalls" = "totalCalls" + 1')


async def _update(db: Queryable, organization_id: str, agent_id: str, assignments: str, *args: Any) -> Agent:
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "Agent" SET {assignments}
            WHERE "id" = $1 AND "organizationId" = $2
            RETURNING {_COLUMNS}
            """,
            agent_id,
            organization_id,
            *args,
        )
    if row is None:
        raise NotFound("Agent", agent_id)
    return Agent.from_row(row)


async def delete_agent(db: Queryable, *, organization_id: str, agent_id: str) -> None:
    """Delete an agent (its CallLogs stay, unlinked); InvalidReference naming the campaigns that still use it."""
    try:
        # A savepoint: the refused DELETE leaves the caller's transaction usable to say which campaigns refused it.
        async with transaction(db) as conn:
            with translate_errors():
                deleted = await conn.fetchval(
                    'DELETE FROM "Agent" WHERE "id" = $1 AND "organizationId" = $2 RETURNING "id"',
                    agent_id,
                    organization_id,
                )
    except InvalidReference as exc:
        raise InvalidReference(await _campaigns_using(db, organization_id, agent_id)) from exc.__cause__
    if deleted is None:
        raise NotFound("Agent", agent_id)


_CAMPAIGNS_NAMED = 3
"""How many of the campaigns that keep an agent from its deletion the refusal names; it counts the others."""


async def _campaigns_using(db: Queryable, organization_id: str, agent_id: str) -> str:
    """Why the agent cannot be deleted: the campaigns that use it, named, since a campaign's agent cannot be changed."""
    rows = await db.fetch(
        """
        SELECT "id", "batchName", "status", count(*) OVER ()::int AS "total" FROM "Campaign"
        WHERE "agentId" = $1 AND "organizationId" = $2
        ORDER BY "createdAt", "id"
        LIMIT $3
        """,
        agent_id,
        organization_id,
        _CAMPAIGNS_NAMED,
    )
    if not rows:  # the one that refused the deletion was deleted since
        return f"Agent {agent_id} was used by a campaign, whose agent cannot be changed; delete the agent again"
    total = rows[0]["total"]
    named = ", ".join(f"{row['batchName']!r} ({row['id']}, {row['status']})" for row in rows)
    more = f" and {total - len(rows):,} more" if total > len(rows) else ""
    if total == 1:
        return (
            f"Agent {agent_id} is used by campaign {named}, whose agent cannot be changed; "
            "delete that campaign first (its calls stay in the call logs)"
        )
    return (
        f"Agent {agent_id} is used by {total:,} campaigns: {named}{more}, whose agent cannot be changed; "
        "delete those campaigns first (their calls stay in the call logs)"
    )


# Each kind of resource an agent links to: its join table and the join table's column for it.
_LINKS = {
    "KnowledgeBase": ("AgentKnowledgeBase", "knowledgeBaseId"),
    "Tool": ("AgentTool", "toolId"),
    "ConversationPath": ("AgentConversationPath", "conversationPathId"),
}


async def link_knowledge_base(db: Queryable, *, organization_id: str, agent_id: str, knowledge_base_id: str) -> None:
    """Let the agent use a knowledge base of its organization (linking twice is harmless)."""
    await _link(db, "KnowledgeBase", organization_id, agent_id, knowledge_base_id)


async def unlink_knowledge_base(db: Queryable, *, organization_id: str, agent_id: str, knowledge_base_id: str) -> bool:
    """Stop the agent using a knowledge base; whether there was a link to remove."""
    return await _unlink(db, "KnowledgeBase", organization_id, agent_id, knowledge_base_id)


async def link_tool(db: Queryable, *, organization_id: str, agent_id: str, tool_id: str) -> None:
    """Let the agent use a tool of its organization (linking twice is harmless)."""
    await _link(db, "Tool", organization_id, agent_id, tool_id)


async def unlink_tool(db: Queryable, *, organization_id: str, agent_id: str, tool_id: str) -> bool:
    """Stop the agent using a tool; whether there was a link to remove."""
    return await _unlink(db, "Tool", organization_id, agent_id, tool_id)


async def link_conversation_path(
    db: Queryable, *, organization_id: str, agent_id: str, conversation_path_id: str
) -> None:
    """Let the agent follow a conversation path of its organization (linking twice is harmless)."""
    await _link(db, "ConversationPath", organization_id, agent_id, conversation_path_id)


async def unlink_conversation_path(
    db: Queryable, *, organization_id: str, agent_id: str, conversation_path_id: str
) -> bool:
    """Stop the agent following a conversation path; whether there was a link to remove."""
    return await _unlink(db, "ConversationPath", organization_id, agent_id, conversation_path_id)


async def _link(db: Queryable, entity: str, organization_id: str, agent_id: str, target_id: str) -> None:
    table, column = _LINKS[entity]
    try:
        with translate_errors():
            await db.execute(
                f"""
                INSERT INTO "{table}" ("agentId", "{column}", "organizationId") VALUES ($1, $2, $3)
                ON CONFLICT ("agentId", "organizationId", "{column}") DO NOTHING
                """,
                agent_id,
                target_id,
                organization_id,
            )
    except InvalidReference as exc:
        # The join table's composite foreign keys require both ends to be this organization's rows.
        cause = exc.__cause__
        if isinstance(cause, asyncpg.ForeignKeyViolationError) and cause.constraint_name == (
            f"{table}_agentId_organizationId_fkey"
        ):
            raise NotFound("Agent", agent_id) from cause
        raise InvalidReference(
            f"{entity} {target_id} does not exist in organization {organization_id}", entity=entity, key=target_id
        ) from cause


async def _unlink(db: Queryable, entity: str, organization_id: str, agent_id: str, target_id: str) -> bool:
    table, column = _LINKS[entity]
    with translate_errors():
        status = await db.execute(
            f'DELETE FROM "{table}" WHERE "agentId" = $1 AND "{column}" = $2 AND "organizationId" = $3',
            agent_id,
            target_id,
            organization_id,
        )
    return status != "DELETE 0"


# One round trip and one snapshot: linked resources come back as JSON arrays built by subqueries.
_BUNDLE = f"""
SELECT {_AGENT_COLUMNS},
    (SELECT to_jsonb(p) FROM "PhoneNumber" p
     WHERE p."id" = a."phoneNumberId" AND p."organizationId" = a."organizationId") AS "bundlePhoneNumber",
    (SELECT to_jsonb(v) FROM "Voice" v
     WHERE v."id" = a."voiceId" AND (v."organizationId" = a."organizationId" OR v."organizationId" IS NULL))
        AS "bundleVoice",
    COALESCE((
        SELECT jsonb_agg(
            to_jsonb(kb) || jsonb_build_object('documents', COALESCE((
                SELECT jsonb_agg(to_jsonb(d) ORDER BY d."createdAt", d."id")
                FROM "KnowledgeBaseDocument" d
                WHERE d."knowledgeBaseId" = kb."id" AND d."organizationId" = kb."organizationId"
            ), '[]'::jsonb))
            ORDER BY link."createdAt", kb."id")
        FROM "AgentKnowledgeBase" link
        JOIN "KnowledgeBase" kb ON kb."id" = link."knowledgeBaseId" AND kb."organizationId" = link."organizationId"
        WHERE link."agentId" = a."id" AND link."organizationId" = a."organizationId"
    ), '[]'::jsonb) AS "bundleKnowledgeBases",
    COALESCE((
        SELECT jsonb_agg(to_jsonb(t) ORDER BY link."createdAt", t."id")
        FROM "AgentTool" link
        JOIN "Tool" t ON t."id" = link."toolId" AND t."organizationId" = link."organizationId"
        WHERE link."agentId" = a."id" AND link."organizationId" = a."organizationId"
    ), '[]'::jsonb) AS "bundleTools",
    COALESCE((
        SELECT jsonb_agg(to_jsonb(cp) ORDER BY link."isDefault" DESC, link."createdAt", cp."id")
        FROM "AgentConversationPath" link
        JOIN "ConversationPath" cp
            ON cp."id" = link."conversationPathId" AND cp."organizationId" = link."organizationId"
        WHERE link."agentId" = a."id" AND link."organizationId" = a."organizationId"
    ), '[]'::jsonb) AS "bundleConversationPaths"
FROM "Agent" a
WHERE a."id" = $1 AND a."organizationId" = $2
"""


async def load_agent_bundle(db: Queryable, *, organization_id: str, agent_id: str) -> AgentBundle:
    """The agent with its phone number, voice, knowledge bases (with documents), tools and paths, in one query."""
    row = await db.fetchrow(_BUNDLE, agent_id, organization_id)
    if row is None:
        raise NotFound("Agent", agent_id)
    phone_number, voice = row["bundlePhoneNumber"], row["bundleVoice"]
    return AgentBundle(
        agent=Agent.from_row(row),
        phone_number=PhoneNumber.from_row(phone_number) if phone_number is not None else None,
        voice=Voice.from_row(voice) if voice is not None else None,
        knowledge_bases=[KnowledgeBaseWithDocuments.from_row(kb) for kb in row["bundleKnowledgeBases"]],
        tools=[Tool.from_row(tool) for tool in row["bundleTools"]],
        conversation_paths=[ConversationPath.from_row(path) for path in row["bundleConversationPaths"]],
    )


async def list_inbound_agents(db: Queryable, *, phone_number_id: str) -> list[Agent]:
    """The ACTIVE INBOUND agents on a number, most recently updated first (time-based routing picks among them).

    Unscoped by design: the inbound webhook knows only the number it was called on.
    """
    rows = await db.fetch(
        f"""
        SELECT {_AGENT_COLUMNS}
        FROM "Agent" a
        JOIN "PhoneNumber" p ON p."id" = a."phoneNumberId" AND p."organizationId" = a."organizationId"
        WHERE a."phoneNumberId" = $1 AND a."status" = 'ACTIVE' AND a."callerType" = 'INBOUND'
        ORDER BY a."updatedAt" DESC, a."id" DESC
        """,
        phone_number_id,
    )
    return Agent.from_rows(rows)


async def find_inbound_agent(db: Queryable, *, phone_number_id: str) -> Agent | None:
    """The ACTIVE INBOUND agent on a number updated most recently, or None; hours aside (see list_inbound_agents)."""
    found = await list_inbound_agents(db, phone_number_id=phone_number_id)
    return found[0] if found else None


_UPDATABLE = frozenset(
    {"name", "description", "type", "status", "caller_type", "phone_number_id", "voice_id", "configuration"}
)


async def list_agents_page(
    db: Queryable,
    *,
    organization_id: str,
    limit: int,
    before: tuple[datetime, str] | None = None,
    status: AgentStatus | None = None,
    caller_type: CallerType | None = None,
) -> list[Agent]:
    """A page of the organization's agents, newest first, after the (createdAt, id) `before`, optionally filtered."""
    rows = await db.fetch(
        f"""
        SELECT {_COLUMNS} FROM "Agent"
        WHERE "organizationId" = $1
          AND ($2::timestamptz IS NULL OR ("createdAt", "id") < ($2, $3))
          AND ($4::"AgentStatus" IS NULL OR "status" = $4)
          AND ($5::"CallerType" IS NULL OR "callerType" = $5)
        ORDER BY "createdAt" DESC, "id" DESC
        LIMIT $6
        """,
        organization_id,
        *(before or (None, None)),
        status,
        caller_type,
        limit,
    )
    return Agent.from_rows(rows)


async def update_agent(db: Queryable, *, organization_id: str, agent_id: str, changes: dict[str, Any]) -> Agent:
    """Change some of an agent's fields (snake_case names; configuration validated by config/ before it gets here).

    NotFound if the agent is not the organization's; InvalidReference if a new phone number or voice is not
    the organization's to use.
    """
    unknown = set(changes) - _UPDATABLE
    if unknown:
        raise ValueError(f"Agent fields that cannot be changed: {', '.join(sorted(unknown))}")
    if not changes:
        return await get_agent(db, organization_id=organization_id, agent_id=agent_id)
    args: list[Any] = [agent_id, organization_id]
    assignments = []
    for name, value in changes.items():
        args.append(value)
        assignments.append(f'"{to_camel(name)}" = ${len(args)}')
    phone_number_id, voice_id = changes.get("phone_number_id"), changes.get("voice_id")
    args += [phone_number_id, voice_id]
    with translate_errors():
        row = await db.fetchrow(
            f"""
            UPDATE "Agent" SET {", ".join(assignments)}
            WHERE "id" = $1 AND "organizationId" = $2
              AND (${len(args) - 1}::text IS NULL OR EXISTS (
                    SELECT 1 FROM "PhoneNumber" WHERE "id" = ${len(args) - 1} AND "organizationId" = $2))
              AND (${len(args)}::text IS NULL OR EXISTS (
                    SELECT 1 FROM "Voice" WHERE "id" = ${len(args)}
                        AND ("organizationId" = $2 OR "organizationId" IS NULL)))
            RETURNING {_COLUMNS}
            """,
            *args,
        )
    if row is not None:
        return Agent.from_row(row)
    await get_agent(db, organization_id=organization_id, agent_id=agent_id)  # NotFound if it is not there
    raise await _unusable_reference(db, organization_id, phone_number_id, voice_id)


async def set_default_conversation_path(
    db: Queryable, *, organization_id: str, agent_id: str, conversation_path_id: str
) -> None:
    """Make a linked path the agent's default (the others stop being it); NotFound if the path is not linked.

    One UPDATE of all the agent's links: concurrent calls serialise on the rows, so exactly one stays default.
    """
    with translate_errors():
        linked = await db.fetchval(
            """
            WITH changed AS (
                UPDATE "AgentConversationPath" SET "isDefault" = ("conversationPathId" = $3)
                WHERE "agentId" = $1 AND "organizationId" = $2
                    AND EXISTS (
                        SELECT 1 FROM "AgentConversationPath"
                        WHERE "agentId" = $1 AND "organizationId" = $2 AND "conversationPathId" = $3
                    )
                RETURNING "conversationPathId"
            )
            SELECT count(*) FROM changed WHERE "conversationPathId" = $3
            """,
            agent_id,
            organization_id,
            conversation_path_id,
        )
    if not linked:
        raise NotFound("AgentConversationPath", f"{agent_id}/{conversation_path_id}")


class AgentPathPairing(Record):
    """An agent and a conversation path its calls may follow: linked to it, or named by one of its campaigns."""

    agent: Agent
    conversation_path: ConversationPath


async def list_path_pairings(
    db: Queryable, *, organization_id: str, agent_id: str | None = None, conversation_path_id: str | None = None
) -> list[AgentPathPairing]:
    """The organization's agent-path pairings, of one agent or one path (or both): each path linked to an agent,
    and each path a campaign not yet COMPLETED or STOPPED follows with its agent, once per pair."""
    rows = await db.fetch(
        """
        WITH pair AS (
            SELECT "agentId", "conversationPathId" FROM "AgentConversationPath" WHERE "organizationId" = $1
            UNION
            SELECT "agentId", "conversationPathId" FROM "Campaign"
            WHERE "organizationId" = $1 AND "conversationPathId" IS NOT NULL
              AND "status" NOT IN ('COMPLETED', 'STOPPED')
        )
        SELECT to_jsonb(a) AS "agent", to_jsonb(cp) AS "conversationPath"
        FROM pair
        JOIN "Agent" a ON a."id" = pair."agentId" AND a."organizationId" = $1
        JOIN "ConversationPath" cp ON cp."id" = pair."conversationPathId" AND cp."organizationId" = $1
        WHERE ($2::text IS NULL OR pair."agentId" = $2)
          AND ($3::text IS NULL OR pair."conversationPathId" = $3)
        ORDER BY a."createdAt", a."id", cp."createdAt", cp."id"
        """,
        organization_id,
        agent_id,
        conversation_path_id,
    )
    return [
        AgentPathPairing(
            agent=Agent.from_row(row["agent"]), conversation_path=ConversationPath.from_row(row["conversationPath"])
        )
        for row in rows
    ]
