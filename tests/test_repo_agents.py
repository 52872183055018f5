"""Agents and the resources they use: knowledge bases, tools, conversation paths, numbers and voices."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import pytest

from storage import agents, conversation_paths, knowledge_bases, tools
from storage.enums import AgentStatus, CallerType, DocumentType, KnowledgeBaseStatus
from storage.errors import InvalidReference, NotFound
from storage.knowledge_bases import KnowledgeBaseDocument
from storage.records import Queryable, new_id


async def insert_organization(db: Queryable) -> str:
    """A new organization, inserted with plain SQL; its id."""
    organization_id = new_id()
    await db.execute(
        'INSERT INTO "Organization" ("id", "name", "slug") VALUES ($1, $2, $3)',
        organization_id,
        f"Org {organization_id}",
        f"org-{organization_id}",
    )
    return organization_id


async def insert_phone_number(db: Queryable, organization_id: str) -> str:
    """A new phone number of an organization, inserted with plain SQL; its id."""
    phone_number_id = new_id()
    await db.execute(
        'INSERT INTO "PhoneNumber" ("id", "organizationId", "label", "phoneNumber") VALUES ($1, $2, $3, $4)',
        phone_number_id,
        organization_id,
        "Support line",
        f"+1555{secrets.randbelow(10**7):07d}",
    )
    return phone_number_id


async def insert_voice(db: Queryable, organization_id: str | None) -> str:
    """A new voice (a system voice when organization_id is None), inserted with plain SQL; its id."""
    voice_id = new_id()
    await db.execute(
        'INSERT INTO "Voice" ("id", "organizationId", "name", "tags", "isCustom") VALUES ($1, $2, $3, $4, $5)',
        voice_id,
        organization_id,
        "June",
        ["english", "female"],
        organization_id is not None,
    )
    return voice_id


def by_id_key(record: KnowledgeBaseDocument) -> str:
    """Sort key for documents created within the same millisecond, whose order is otherwise a tie."""
    return record.id


async def test_created_agent_reads_back_with_its_defaults(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    created = await agents.create_agent(
        pool, organization_id=org, name="Support", configuration={"llm": {"provider": "openai"}}
    )
    agent = await agents.get_agent(pool, organization_id=org, agent_id=created.id)
    assert agent == created
    assert (agent.status, agent.caller_type) == (AgentStatus.ACTIVE, CallerType.INBOUND)
    assert (agent.total_calls, agent.success_rate) == (0, 0.0)
    assert agent.configuration == {"llm": {"provider": "openai"}}


async def test_another_organizations_agent_is_not_found(pool: asyncpg.Pool) -> None:
    owner, stranger = await insert_organization(pool), await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=owner, name="Support")
    with pytest.raises(NotFound):
        await agents.get_agent(pool, organization_id=stranger, agent_id=agent.id)


async def test_list_agents_filters_by_status_and_caller_type(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    inbound = await agents.create_agent(pool, organization_id=org, name="In")
    outbound = await agents.create_agent(pool, organization_id=org, name="Out", caller_type=CallerType.OUTBOUND)
    idle = await agents.create_agent(pool, organization_id=org, name="Idle", status=AgentStatus.INACTIVE)
    await agents.create_agent(pool, organization_id=await insert_organization(pool), name="Elsewhere")

    assert {a.id for a in await agents.list_agents(pool, organization_id=org)} == {inbound.id, outbound.id, idle.id}
    active_inbound = await agents.list_agents(
        pool, organization_id=org, status=AgentStatus.ACTIVE, caller_type=CallerType.INBOUND
    )
    assert [a.id for a in active_inbound] == [inbound.id]
    assert [a.id for a in await agents.list_agents(pool, organization_id=org, caller_type=CallerType.OUTBOUND)] == [
        outbound.id
    ]
    assert [a.id for a in await agents.list_agents(pool, organization_id=org, status=AgentStatus.INACTIVE)] == [idle.id]


async def test_agent_cannot_use_another_organizations_phone_number(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    foreign_number = await insert_phone_number(pool, await insert_organization(pool))
    with pytest.raises(InvalidReference, match=f"PhoneNumber {foreign_number}"):
        await agents.create_agent(pool, organization_id=org, name="Support", phone_number_id=foreign_number)
    assert await agents.list_agents(pool, organization_id=org) == []


async def test_agent_may_use_a_system_voice_but_not_another_organizations(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    system_voice = await insert_voice(pool, None)
    foreign_voice = await insert_voice(pool, await insert_organization(pool))
    agent = await agents.create_agent(pool, organization_id=org, name="Support", voice_id=system_voice)
    assert agent.voice_id == system_voice
    with pytest.raises(InvalidReference, match=f"Voice {foreign_voice}"):
        await agents.create_agent(pool, organization_id=org, name="Support", voice_id=foreign_voice)


async def test_status_and_configuration_updates_are_kept(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="Support")
    await agents.update_agent_status(pool, organization_id=org, agent_id=agent.id, status=AgentStatus.INACTIVE)
    configuration = {"tts": {"provider": "espeak", "voice": "en-us"}}
    await agents.update_agent_configuration(pool, organization_id=org, agent_id=agent.id, configuration=configuration)
    stored = await agents.get_agent(pool, organization_id=org, agent_id=agent.id)
    assert (stored.status, stored.configuration) == (AgentStatus.INACTIVE, configuration)


async def test_updating_another_organizations_agent_is_not_found(pool: asyncpg.Pool) -> None:
    agent = await agents.create_agent(pool, organization_id=await insert_organization(pool), name="Support")
    with pytest.raises(NotFound):
        await agents.update_agent_status(
            pool, organization_id=await insert_organization(pool), agent_id=agent.id, status=AgentStatus.INACTIVE
        )
    assert (await agents.get_agent(pool, organization_id=agent.organization_id, agent_id=agent.id)).status == "ACTIVE"


async def test_linking_another_organizations_tool_is_an_invalid_reference(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="Support")
    foreign_tool = await tools.create_tool(pool, organization_id=await insert_organization(pool), name="Stripe")
    with pytest.raises(InvalidReference, match=f"Tool {foreign_tool.id} does not exist in organization {org}"):
        await agents.link_tool(pool, organization_id=org, agent_id=agent.id, tool_id=foreign_tool.id)
    assert (await agents.load_agent_bundle(pool, organization_id=org, agent_id=agent.id)).tools == []


async def test_linking_to_another_organizations_agent_is_not_found(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    tool = await tools.create_tool(pool, organization_id=org, name="Slack")
    foreign_agent = await agents.create_agent(pool, organization_id=await insert_organization(pool), name="Other")
    with pytest.raises(NotFound, match="Agent"):
        await agents.link_tool(pool, organization_id=org, agent_id=foreign_agent.id, tool_id=tool.id)


async def test_linking_twice_keeps_one_link_and_unlinking_removes_it(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="Support")
    kb = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="FAQ")
    for _ in range(2):
        await agents.link_knowledge_base(pool, organization_id=org, agent_id=agent.id, knowledge_base_id=kb.id)
    assert [
        k.id for k in (await agents.load_agent_bundle(pool, organization_id=org, agent_id=agent.id)).knowledge_bases
    ] == [kb.id]

    assert await agents.unlink_knowledge_base(pool, organization_id=org, agent_id=agent.id, knowledge_base_id=kb.id)
    assert not await agents.unlink_knowledge_base(pool, organization_id=org, agent_id=agent.id, knowledge_base_id=kb.id)
    assert (await agents.load_agent_bundle(pool, organization_id=org, agent_id=agent.id)).knowledge_bases == []


async def test_bundle_carries_every_resource_of_the_agent(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    number_id, voice_id = await insert_phone_number(pool, org), await insert_voice(pool, org)
    agent = await agents.create_agent(
        pool, organization_id=org, name="Support", phone_number_id=number_id, voice_id=voice_id
    )
    faq = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="FAQ")
    empty = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="Empty")
    page = await knowledge_bases.add_document(
        pool, organization_id=org, knowledge_base_id=faq.id, name="Pricing", type=DocumentType.WEBSITE, url="https://x"
    )
    note = await knowledge_bases.add_document(
        pool, organization_id=org, knowledge_base_id=faq.id, name="Hours", type=DocumentType.TEXT, content="9-5"
    )
    calendar = await tools.create_tool(pool, organization_id=org, name="Calendar", configuration={"token": "t"})
    path = await conversation_paths.create_conversation_path(
        pool, organization_id=org, name="Booking", nodes=[{"id": "start"}], edges=[]
    )
    for kb_id in (faq.id, empty.id):
        await agents.link_knowledge_base(pool, organization_id=org, agent_id=agent.id, knowledge_base_id=kb_id)
    await agents.link_tool(pool, organization_id=org, agent_id=agent.id, tool_id=calendar.id)
    await agents.link_conversation_path(pool, organization_id=org, agent_id=agent.id, conversation_path_id=path.id)
    unlinked_tool = await tools.create_tool(pool, organization_id=org, name="Unused")

    bundle = await agents.load_agent_bundle(pool, organization_id=org, agent_id=agent.id)

    assert bundle.agent == agent
    assert bundle.phone_number is not None and bundle.phone_number.id == number_id
    assert bundle.voice is not None and (bundle.voice.id, bundle.voice.tags) == (voice_id, ["english", "female"])
    faq_now = await knowledge_bases.get_knowledge_base(pool, organization_id=org, knowledge_base_id=faq.id)
    by_id = {kb.id: kb for kb in bundle.knowledge_bases}
    assert by_id.keys() == {faq.id, empty.id}
    assert by_id[faq.id].model_dump(exclude={"documents"}) == faq_now.model_dump()
    assert sorted(by_id[faq.id].documents, key=by_id_key) == sorted([page, note], key=by_id_key)
    assert by_id[empty.id].documents == []
    assert bundle.tools == [calendar]
    assert unlinked_tool not in bundle.tools
    assert bundle.conversation_paths == [path]


async def test_bundle_of_a_bare_agent_has_no_resources(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="Bare")
    bundle = await agents.load_agent_bundle(pool, organization_id=org, agent_id=agent.id)
    assert (bundle.phone_number, bundle.voice) == (None, None)
    assert (bundle.knowledge_bases, bundle.tools, bundle.conversation_paths) == ([], [], [])


async def test_bundle_of_another_organizations_agent_is_not_found(pool: asyncpg.Pool) -> None:
    agent = await agents.create_agent(pool, organization_id=await insert_organization(pool), name="Support")
    with pytest.raises(NotFound):
        await agents.load_agent_bundle(pool, organization_id=await insert_organization(pool), agent_id=agent.id)


async def test_inbound_agent_is_the_most_recently_updated_active_inbound_one(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    number = await insert_phone_number(pool, org)
    older = await agents.create_agent(pool, organization_id=org, name="Older", phone_number_id=number)
    await asyncio.sleep(0.01)  # updatedAt has millisecond precision
    newer = await agents.create_agent(pool, organization_id=org, name="Newer", phone_number_id=number)
    await agents.create_agent(
        pool, organization_id=org, name="Out", phone_number_id=number, caller_type=CallerType.OUTBOUND
    )
    await agents.create_agent(
        pool, organization_id=org, name="Off", phone_number_id=number, status=AgentStatus.INACTIVE
    )
    assert (await agents.find_inbound_agent(pool, phone_number_id=number)) == newer

    await asyncio.sleep(0.01)  # updatedAt has millisecond precision
    touched = await agents.update_agent_configuration(
        pool, organization_id=org, agent_id=older.id, configuration={"stt": {"provider": "deepgram"}}
    )
    assert (await agents.find_inbound_agent(pool, phone_number_id=number)) == touched


async def test_a_number_without_an_active_inbound_agent_has_none(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    number = await insert_phone_number(pool, org)
    await agents.create_agent(
        pool, organization_id=org, name="Off", phone_number_id=number, status=AgentStatus.INACTIVE
    )
    assert await agents.find_inbound_agent(pool, phone_number_id=number) is None
    assert await agents.find_inbound_agent(pool, phone_number_id=new_id()) is None


async def test_concurrent_increments_count_every_call(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    agent = await agents.create_agent(pool, organization_id=org, name="Busy")
    await asyncio.gather(
        *(agents.increment_total_calls(pool, organization_id=org, agent_id=agent.id) for _ in range(20))
    )
    assert (await agents.get_agent(pool, organization_id=org, agent_id=agent.id)).total_calls == 20


async def test_documents_are_counted_by_kind_and_listed_in_order(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    kb = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="Manuals")
    assert kb.status == KnowledgeBaseStatus.EMPTY
    added = [
        await knowledge_bases.add_document(
            pool, organization_id=org, knowledge_base_id=kb.id, name=f"doc {kind}", type=kind
        )
        for kind in (DocumentType.FILE, DocumentType.FILE, DocumentType.TEXT)
    ]
    counted = await knowledge_bases.get_knowledge_base(pool, organization_id=org, knowledge_base_id=kb.id)
    assert (counted.file_count, counted.website_count, counted.text_count) == (2, 0, 1)
    assert counted.status == KnowledgeBaseStatus.PROCESSING
    listed = await knowledge_bases.list_documents(pool, organization_id=org, knowledge_base_id=kb.id)
    assert sorted(listed, key=by_id_key) == sorted(added, key=by_id_key)


async def test_document_cannot_be_added_to_another_organizations_knowledge_base(pool: asyncpg.Pool) -> None:
    owner = await insert_organization(pool)
    kb = await knowledge_bases.create_knowledge_base(pool, organization_id=owner, name="Private")
    with pytest.raises(NotFound):
        await knowledge_bases.add_document(
            pool,
            organization_id=await insert_organization(pool),
            knowledge_base_id=kb.id,
            name="x",
            type=DocumentType.TEXT,
        )
    assert await knowledge_bases.list_documents(pool, organization_id=owner, knowledge_base_id=kb.id) == []


async def test_resources_are_listed_only_for_their_organization(pool: asyncpg.Pool) -> None:
    org, other = await insert_organization(pool), await insert_organization(pool)
    kb = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="FAQ")
    tool = await tools.create_tool(pool, organization_id=org, name="CRM", category="CRM")
    path = await conversation_paths.create_conversation_path(pool, organization_id=org, name="Flow")
    await knowledge_bases.create_knowledge_base(pool, organization_id=other, name="Theirs")
    await tools.create_tool(pool, organization_id=other, name="Theirs")
    await conversation_paths.create_conversation_path(pool, organization_id=other, name="Theirs")

    assert await knowledge_bases.list_knowledge_bases(pool, organization_id=org) == [kb]
    assert await tools.list_tools(pool, organization_id=org) == [tool]
    assert await conversation_paths.list_conversation_paths(pool, organization_id=org) == [path]
    with pytest.raises(NotFound):
        await tools.get_tool(pool, organization_id=other, tool_id=tool.id)
    with pytest.raises(NotFound):
        await conversation_paths.get_conversation_path(pool, organization_id=other, conversation_path_id=path.id)
    with pytest.raises(NotFound):
        await knowledge_bases.get_knowledge_base(pool, organization_id=other, knowledge_base_id=kb.id)


async def test_conversation_path_keeps_its_react_flow_graph(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    nodes = [
        {"id": "1", "type": "start", "position": {"x": 0, "y": 0}, "data": {"text": "Hello!"}},
        {"id": "2", "type": "end", "position": {"x": 0, "y": 120}, "data": {"text": "Bye"}},
    ]
    edges = [{"id": "e1-2", "source": "1", "target": "2", "label": "done"}]
    created = await conversation_paths.create_conversation_path(
        pool, organization_id=org, name="Greeting", nodes=nodes, edges=edges
    )
    stored = await conversation_paths.get_conversation_path(pool, organization_id=org, conversation_path_id=created.id)
    assert (stored.nodes, stored.edges) == (nodes, edges)


async def test_tool_configuration_never_shows_in_its_repr(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    tool = await tools.create_tool(pool, organization_id=org, name="Stripe", configuration={"apiKey": "sk_secret"})
    assert tool.configuration == {"apiKey": "sk_secret"}
    assert "sk_secret" not in repr(tool)
