"""/v1/agents: the organization's voice agents, and the knowledge bases, tools and paths linked to them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import Field

from config.agent import AgentConfiguration, AgentConfigurationError, parse_agent_configuration
from engine.api.errors import ApiError, conflict, invalid_reference, not_found
from engine.api.models import Id, LongText, Name, RequestModel, ResponseModel, ShortText, UpdateModel
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from engine.api.path_transfers import (
    TransferWarning,
    dial_policy_warnings,
    refuse_unmakeable_transfers,
    transfer_warnings,
)
from engine.api.resources.tools import ToolView
from pipelines.languages import language_problems
from pipelines.llm.prompt import variable_name_refusal
from pipelines.registry import configuration_references, key_ref_problems
from storage import agents, conversation_paths, tools, voices
from storage.agents import Agent
from storage.conversation_paths import ConversationPath
from storage.enums import AgentStatus, CallerType, VoiceStatus
from storage.errors import InvalidReference, NotFound
from storage.knowledge_bases import KnowledgeBaseWithDocuments
from storage.phone_numbers import PhoneNumber
from storage.records import Queryable
from storage.voices import Voice

resource = Resource("Agents", "Voice agents: who they answer or call for, and the providers their calls run on.")


class AgentListQuery(PageQuery):
    """Which agents to list."""

    status: AgentStatus | None = Field(None, description="Only agents of this status.")
    caller_type: CallerType | None = Field(None, description="Only agents that take (INBOUND) or place calls.")


class AgentCreate(RequestModel):
    """A new agent. `configuration` is checked as calls would use it, and stored with its defaults filled in."""

    name: Name
    description: LongText | None = None
    type: ShortText | None = None
    status: AgentStatus = AgentStatus.ACTIVE
    caller_type: CallerType = CallerType.INBOUND
    phone_number_id: Id | None = None
    voice_id: Id | None = None
    configuration: dict[str, Any] = Field(default_factory=dict)


class AgentUpdate(UpdateModel):
    """Fields to change; those left out stay as they are, and null clears an optional one."""

    not_null = frozenset({"name", "status", "caller_type", "configuration"})

    name: Name | None = None
    description: LongText | None = None
    type: ShortText | None = None
    status: AgentStatus | None = None
    caller_type: CallerType | None = None
    phone_number_id: Id | None = None
    voice_id: Id | None = None
    configuration: dict[str, Any] | None = None


class SavedAgent(Agent):
    """An agent as saved, with the transfers it can never make."""

    warnings: list[TransferWarning] = Field(
        description="Transfers this agent can never make: its exact transfer destinations the organization's dial "
        "policy refuses, and transfer nodes of paths it follows (linked, or named by a running campaign) that its "
        "transfer rules refuse. Every call that reaches one fails its transfer. The change is saved."
    )


def _configuration(data: dict[str, Any], organization_id: str) -> AgentConfiguration:
    try:
        config = parse_agent_configuration(data)
        # A language a provider cannot work in, or a key variable the organization may not use (another's), is refused
        # now, not when a call comes in. A key merely unset is not: it may be set by the first call.
        problems = language_problems(config) + key_ref_problems(config, organization_id) + _variable_problems(config)
        if problems:
            raise AgentConfigurationError(problems)
    except AgentConfigurationError as exc:
        path, message = exc.problems[0]
        field = f"configuration.{path}" if path != "configuration" else path
        raise ApiError(422, "validation_error", f"body {field}: {message}", field) from None
    return config


def _variable_problems(config: AgentConfiguration) -> list[tuple[str, str]]:
    # Refused on saving only: an agent stored before still runs, the built-in filling its placeholder
    # (pipelines.llm.prompt.call_variables).
    return [
        (f"variables.{name}", f"{refusal}; rename it")
        for name in config.variables
        if (refusal := variable_name_refusal(name)) is not None
    ]


_REFERENCED: dict[str, Callable[[Queryable, str, str], Awaitable[object]]] = {
    "ConversationPath": lambda db, organization_id, row_id: conversation_paths.get_conversation_path(
        db, organization_id=organization_id, conversation_path_id=row_id
    ),
    "Tool": lambda db, organization_id, row_id: tools.get_tool(db, organization_id=organization_id, tool_id=row_id),
}
"""How to find each kind of row a configuration names by id (configuration_references)."""


async def _check_references(db: Queryable, organization_id: str, config: AgentConfiguration) -> None:
    """422 invalid_reference at the first id in the configuration that names no row of the organization."""
    for path, table, row_id in configuration_references(config):
        try:
            await _REFERENCED[table](db, organization_id, row_id)
        except NotFound:
            message = f"{table} {row_id} does not exist in organization {organization_id}"
            raise invalid_reference(f"configuration.{path}", message) from None


async def _check_voice(db: Queryable, organization_id: str, voice_id: str | None) -> None:
    # Only a READY voice may be chosen: one still PROCESSING (being cloned) or in ERROR has nothing to speak with.
    if voice_id is None:
        return
    try:
        voice = await voices.get_voice_for_organization(db, organization_id=organization_id, voice_id=voice_id)
    except NotFound:
        return  # storage answers for a voice that is not the organization's
    if voice.status is not VoiceStatus.READY:
        raise ApiError(
            422,
            "validation_error",
            f"body voiceId: voice {voice_id} is {voice.status.value}; only a READY voice can be used",
            "voiceId",
        )


@resource.get("/agents", summary="List agents", response=Page[Agent], query=AgentListQuery)
async def list_agents(call: ApiCall) -> Page[Agent]:
    """The organization's agents, newest first."""
    query = call.query_as(AgentListQuery)
    async with call.tenant() as db:
        rows = await agents.list_agents_page(
            db,
            organization_id=call.caller.organization_id,
            limit=query.fetch_limit,
            before=query.position(),
            status=query.status,
            caller_type=query.caller_type,
        )
    return to_page(Page[Agent], rows, query)


@resource.post("/agents", summary="Create an agent", response=SavedAgent, body=AgentCreate)
async def create_agent(call: ApiCall) -> SavedAgent:
    """Create an agent; its phone number and voice must be the organization's (or a system voice); `warnings` names
    its transfer destinations the organization's dial policy refuses."""
    body = call.body_as(AgentCreate)
    configuration = _configuration(body.configuration, call.caller.organization_id)
    async with call.tenant() as db:
        await _check_references(db, call.caller.organization_id, configuration)
        await _check_voice(db, call.caller.organization_id, body.voice_id)
        agent = await agents.create_agent(
            db,
            organization_id=call.caller.organization_id,
            name=body.name,
            description=body.description,
            type=body.type,
            status=body.status,
            caller_type=body.caller_type,
            phone_number_id=body.phone_number_id,
            voice_id=body.voice_id,
            configuration=configuration.to_json(),
        )
        warnings = await dial_policy_warnings(
            db, organization_id=call.caller.organization_id, agent_id=agent.id, configuration=configuration
        )
    return SavedAgent(**agent.model_dump(), warnings=warnings)


@resource.get("/agents/{agentId}", summary="Get an agent", response=Agent)
async def get_agent(call: ApiCall) -> Agent:
    """One agent."""
    async with call.tenant() as db:
        return await agents.get_agent(db, organization_id=call.caller.organization_id, agent_id=call.path["agentId"])


@resource.patch("/agents/{agentId}", summary="Update an agent", response=SavedAgent, body=AgentUpdate)
async def update_agent(call: ApiCall) -> SavedAgent:
    """Change some of an agent's fields; `warnings` names the transfers it cannot make (its destinations the dial
    policy refuses, when its configuration changes; the transfer nodes of its paths its rules refuse)."""
    changes = call.body_as(AgentUpdate).changes()
    organization_id = call.caller.organization_id
    configuration = _configuration(changes["configuration"], organization_id) if "configuration" in changes else None
    if configuration is not None:
        changes["configuration"] = configuration.to_json()
    async with call.tenant() as db:
        if configuration is not None:
            await _check_references(db, organization_id, configuration)
        await _check_voice(db, organization_id, changes.get("voice_id"))
        agent = await agents.update_agent(
            db, organization_id=organization_id, agent_id=call.path["agentId"], changes=changes
        )
        warnings = await transfer_warnings(db, organization_id=organization_id, agent_id=agent.id)
        if configuration is not None:
            warnings[:0] = await dial_policy_warnings(
                db, organization_id=organization_id, agent_id=agent.id, configuration=configuration
            )
    return SavedAgent(**agent.model_dump(), warnings=warnings)


@resource.delete("/agents/{agentId}", summary="Delete an agent", errors=(409,))
async def delete_agent(call: ApiCall) -> None:
    """Delete an agent; its call logs stay. 409 while a campaign uses it."""
    try:
        async with call.tenant() as db:
            await agents.delete_agent(db, organization_id=call.caller.organization_id, agent_id=call.path["agentId"])
    except InvalidReference as exc:
        raise conflict(str(exc)) from None


class AgentBundleView(ResponseModel):
    """An agent with everything its calls use; tools without their configuration's values."""

    agent: Agent
    phone_number: PhoneNumber | None
    voice: Voice | None
    knowledge_bases: list[KnowledgeBaseWithDocuments]
    tools: list[ToolView]
    conversation_paths: list[ConversationPath]


@resource.get("/agents/{agentId}/bundle", summary="Get an agent with all its resources", response=AgentBundleView)
async def get_agent_bundle(call: ApiCall) -> AgentBundleView:
    """The agent with its phone number, voice, knowledge bases (with their documents), tools and paths."""
    async with call.tenant() as db:
        bundle = await agents.load_agent_bundle(
            db, organization_id=call.caller.organization_id, agent_id=call.path["agentId"]
        )
    return AgentBundleView(
        agent=bundle.agent,
        phone_number=bundle.phone_number,
        voice=bundle.voice,
        knowledge_bases=bundle.knowledge_bases,
        tools=[ToolView.of(tool) for tool in bundle.tools],
        conversation_paths=bundle.conversation_paths,
    )


# Linked resources: PUT links (idempotent), DELETE unlinks. A link's check runs after it, in its transaction: an
# ApiError it raises undoes the link.
_Link = tuple[
    str, Callable[..., Awaitable[None]], Callable[..., Awaitable[bool]], str, Callable[..., Awaitable[None]] | None
]
_LINKS: dict[str, _Link] = {
    "knowledge-bases": (
        "knowledgeBaseId",
        agents.link_knowledge_base,
        agents.unlink_knowledge_base,
        "knowledge_base_id",
        None,
    ),
    "tools": ("toolId", agents.link_tool, agents.unlink_tool, "tool_id", None),
    "conversation-paths": (
        "conversationPathId",
        agents.link_conversation_path,
        agents.unlink_conversation_path,
        "conversation_path_id",
        refuse_unmakeable_transfers,  # 422 for a transfer node the agent's rules refuse
    ),
}


def _declare_links(collection: str) -> None:
    parameter, link, unlink, argument, check = _LINKS[collection]
    path = f"/agents/{{agentId}}/{collection}/{{{parameter}}}"
    singular = collection.removesuffix("s").replace("-", " ")

    async def link_handler(call: ApiCall) -> None:
        arguments = {
            "organization_id": call.caller.organization_id,
            "agent_id": call.path["agentId"],
            argument: call.path[parameter],
        }
        try:
            async with call.tenant() as db:
                await link(db, **arguments)
                if check is not None:
                    await check(db, **arguments)
        except InvalidReference as exc:
            raise not_found(str(exc)) from None

    async def unlink_handler(call: ApiCall) -> None:
        async with call.tenant() as db:
            removed = await unlink(
                db,
                organization_id=call.caller.organization_id,
                agent_id=call.path["agentId"],
                **{argument: call.path[parameter]},
            )
        if not removed:
            raise not_found(f"agent {call.path['agentId']} has no {singular} {call.path[parameter]}")

    name = collection.replace("-", "_")
    link_handler.__name__, link_handler.__doc__ = f"link_{name}", f"Let the agent use a {singular} (idempotent)."
    unlink_handler.__name__, unlink_handler.__doc__ = f"unlink_{name}", f"Stop the agent using a {singular}."
    resource.put(path, summary=f"Link a {singular} to an agent", errors=(422,) if check else ())(link_handler)
    resource.delete(path, summary=f"Unlink a {singular} from an agent")(unlink_handler)


for _collection in _LINKS:
    _declare_links(_collection)
