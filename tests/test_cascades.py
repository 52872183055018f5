"""What a delete takes with it, as the schema's ON DELETE rules say, checked through real deletes."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import pytest

from storage import agents, campaigns, conversation_paths, knowledge_bases, tools
from storage.call_logs import CallLog, create_call_log, get_call_log
from storage.campaigns import NewRecipient
from storage.enums import CallType, DocumentType
from storage.errors import InvalidReference
from storage.records import Queryable, new_id
from tests.test_repo_agents import insert_organization, insert_phone_number, insert_voice

# Every table holding an organization's rows.
TENANT_TABLES = (
    "Agent",
    "Campaign",
    "CampaignRecipient",
    "CallLog",
    "KnowledgeBase",
    "KnowledgeBaseDocument",
    "ConversationPath",
    "Tool",
    "Event",
    "PhoneNumber",
    "Voice",
    "AgentKnowledgeBase",
    "AgentTool",
    "AgentConversationPath",
)


@dataclass(frozen=True)
class Tenant:
    """An organization with one of everything, all linked together."""

    organization_id: str
    agent: agents.Agent
    campaign: campaigns.Campaign
    knowledge_base: knowledge_bases.KnowledgeBase
    tool: tools.Tool
    path: conversation_paths.ConversationPath
    call_log: CallLog
    event_id: str


async def insert_event(db: Queryable, organization_id: str, agent_id: str | None) -> str:
    """A webhook event (agent-scoped when agent_id is given), inserted with plain SQL; its id."""
    event_id = new_id()
    await db.execute(
        'INSERT INTO "Event" ("id", "organizationId", "name", "agentId", "webhookUrl") VALUES ($1, $2, $3, $4, $5)',
        event_id,
        organization_id,
        "call.ended",
        agent_id,
        "https://example.com/hook",
    )
    return event_id


async def build_tenant(db: asyncpg.Pool) -> Tenant:
    """A new organization holding an agent with every kind of resource, a campaign, a call and an event."""
    org = await insert_organization(db)
    agent = await agents.create_agent(
        db,
        organization_id=org,
        name="Seller",
        phone_number_id=await insert_phone_number(db, org),
        voice_id=await insert_voice(db, org),
    )
    kb = await knowledge_bases.create_knowledge_base(db, organization_id=org, name="FAQ")
    await knowledge_bases.add_document(
        db, organization_id=org, knowledge_base_id=kb.id, name="Hours", type=DocumentType.TEXT, content="9-5"
    )
    tool = await tools.create_tool(db, organization_id=org, name="Calendar")
    path = await conversation_paths.create_conversation_path(db, organization_id=org, name="Pitch")
    await agents.link_knowledge_base(db, organization_id=org, agent_id=agent.id, knowledge_base_id=kb.id)
    await agents.link_tool(db, organization_id=org, agent_id=agent.id, tool_id=tool.id)
    await agents.link_conversation_path(db, organization_id=org, agent_id=agent.id, conversation_path_id=path.id)
    campaign = await campaigns.create_campaign(
        db, organization_id=org, batch_name="November", agent_id=agent.id, conversation_path_id=path.id
    )
    await campaigns.add_recipients(
        db,
        organization_id=org,
        campaign_id=campaign.id,
        recipients=[NewRecipient(phone_number="+15550000001"), NewRecipient(phone_number="+15550000002")],
    )
    call_log = await create_call_log(
        db,
        organization_id=org,
        call_type=CallType.OUTBOUND,
        call_id=f"CA{new_id()}",
        agent_id=agent.id,
        campaign_id=campaign.id,
    )
    event_id = await insert_event(db, org, agent.id)
    return Tenant(org, agent, campaign, kb, tool, path, call_log, event_id)


async def rows_of(db: Queryable, organization_id: str) -> dict[str, int]:
    """How many rows each tenant table holds for an organization."""
    return {
        table: await db.fetchval(f'SELECT count(*) FROM "{table}" WHERE "organizationId" = $1', organization_id)
        for table in TENANT_TABLES
    }


async def count(db: Queryable, table: str, column: str, value: str) -> int:
    """How many rows of a table have that value in that column."""
    found: int = await db.fetchval(f'SELECT count(*) FROM "{table}" WHERE "{column}" = $1', value)
    return found


async def test_deleting_an_organization_removes_everything_it_owns(pool: asyncpg.Pool) -> None:
    doomed, bystander = await build_tenant(pool), await build_tenant(pool)
    before = await rows_of(pool, bystander.organization_id)
    assert all(before.values()), before

    await pool.execute('DELETE FROM "Organization" WHERE "id" = $1', doomed.organization_id)

    assert await rows_of(pool, doomed.organization_id) == dict.fromkeys(TENANT_TABLES, 0)
    assert await rows_of(pool, bystander.organization_id) == before


async def test_deleting_a_campaign_removes_its_recipients_and_keeps_its_calls(pool: asyncpg.Pool) -> None:
    tenant = await build_tenant(pool)
    org = tenant.organization_id
    await campaigns.delete_campaign(pool, organization_id=org, campaign_id=tenant.campaign.id)

    assert await count(pool, "CampaignRecipient", "campaignId", tenant.campaign.id) == 0
    kept = await get_call_log(pool, organization_id=org, call_log_id=tenant.call_log.id)
    assert (kept.campaign_id, kept.agent_id) == (None, tenant.agent.id)


async def test_deleting_a_knowledge_base_removes_its_documents_and_agent_links(pool: asyncpg.Pool) -> None:
    tenant = await build_tenant(pool)
    org = tenant.organization_id
    await knowledge_bases.delete_knowledge_base(pool, organization_id=org, knowledge_base_id=tenant.knowledge_base.id)

    assert await count(pool, "KnowledgeBaseDocument", "knowledgeBaseId", tenant.knowledge_base.id) == 0
    bundle = await agents.load_agent_bundle(pool, organization_id=org, agent_id=tenant.agent.id)
    assert bundle.knowledge_bases == []
    assert [t.id for t in bundle.tools] == [tenant.tool.id]


async def test_deleting_a_tool_or_path_removes_only_their_agent_links(pool: asyncpg.Pool) -> None:
    tenant = await build_tenant(pool)
    org = tenant.organization_id
    await tools.delete_tool(pool, organization_id=org, tool_id=tenant.tool.id)
    await conversation_paths.delete_conversation_path(pool, organization_id=org, conversation_path_id=tenant.path.id)

    bundle = await agents.load_agent_bundle(pool, organization_id=org, agent_id=tenant.agent.id)
    assert (bundle.tools, bundle.conversation_paths) == ([], [])
    assert [kb.id for kb in bundle.knowledge_bases] == [tenant.knowledge_base.id]
    campaign = await campaigns.get_campaign(pool, organization_id=org, campaign_id=tenant.campaign.id)
    assert campaign.conversation_path_id is None


async def test_an_agent_a_campaign_uses_cannot_be_deleted(pool: asyncpg.Pool) -> None:
    tenant = await build_tenant(pool)
    org = tenant.organization_id
    with pytest.raises(InvalidReference, match=f"Agent {tenant.agent.id} is used by campaign "):
        await agents.delete_agent(pool, organization_id=org, agent_id=tenant.agent.id)
    assert await agents.get_agent(pool, organization_id=org, agent_id=tenant.agent.id) == tenant.agent


async def test_deleting_an_agent_keeps_its_calls_without_it(pool: asyncpg.Pool) -> None:
    tenant = await build_tenant(pool)
    org = tenant.organization_id
    await campaigns.delete_campaign(pool, organization_id=org, campaign_id=tenant.campaign.id)
    await agents.delete_agent(pool, organization_id=org, agent_id=tenant.agent.id)

    kept = await get_call_log(pool, organization_id=org, call_log_id=tenant.call_log.id)
    assert kept.agent_id is None
    assert (kept.call_id, kept.status) == (tenant.call_log.call_id, tenant.call_log.status)


async def test_deleting_an_agent_removes_its_events_and_links_but_not_organization_events(
    pool: asyncpg.Pool,
) -> None:
    tenant = await build_tenant(pool)
    org = tenant.organization_id
    organization_event = await insert_event(pool, org, None)
    await campaigns.delete_campaign(pool, organization_id=org, campaign_id=tenant.campaign.id)
    await agents.delete_agent(pool, organization_id=org, agent_id=tenant.agent.id)

    assert await count(pool, "Event", "id", tenant.event_id) == 0
    assert await count(pool, "Event", "id", organization_event) == 1
    for link_table in ("AgentKnowledgeBase", "AgentTool", "AgentConversationPath"):
        assert await count(pool, link_table, "agentId", tenant.agent.id) == 0
    assert await count(pool, "Tool", "id", tenant.tool.id) == 1
