"""/v1/conversation-paths: react-flow graphs that script how an agent's calls go."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from engine.api.errors import ApiError, unprocessable
from engine.api.models import LongText, Name, RequestModel, ShortText, UpdateModel
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from engine.api.path_transfers import (
    TransferWarning,
    dial_policy_warnings,
    refuse_unmakeable_transfers,
    transfer_warnings,
)
from pipelines.paths.graph import PathInvalid, read_path
from storage import agents, conversation_paths
from storage.conversation_paths import ConversationPath

resource = Resource(
    "Conversation paths",
    "Conversation flows: the flow builder's nodes and edges, kept as saved once checked: one start node, edges "
    "between existing nodes, every node reachable, no loop of nodes passed through without the caller (press_digits, "
    "webhook, a silent global node) without a way out nor an edge out of one that no call takes, and each node's "
    "`data` valid for its `type` (speak, prompt, "
    "wait, gather, end, transfer, webhook, knowledge, press_digits, global, or react-flow's default/input/output). "
    "A 422 names the node or edge and the field. A path with no nodes and no edges is a draft.",
)

Graph = Annotated[list[dict[str, Any]], Field(max_length=5000)]


class ConversationPathCreate(RequestModel):
    """A new path; `nodes` and `edges` are react-flow's JSON objects."""

    name: Name
    use_case: ShortText | None = None
    agent_speech: LongText | None = None
    nodes: Graph = Field(default_factory=list)
    edges: Graph = Field(default_factory=list)


class ConversationPathUpdate(UpdateModel):
    """Fields to change; null clears an optional one."""

    not_null = frozenset({"name", "nodes", "edges"})

    name: Name | None = None
    use_case: ShortText | None = None
    agent_speech: LongText | None = None
    nodes: Graph | None = None
    edges: Graph | None = None


class SavedConversationPath(ConversationPath):
    """A path as saved, with the transfer nodes no call can make."""

    warnings: list[TransferWarning] = Field(
        description="Transfer nodes of this path that the organization's dial policy refuses, and those the transfer "
        "rules of an agent following it (linked, or with a running campaign naming it) refuse: every such call that "
        "reaches one fails its transfer. The change is saved."
    )


@resource.get(
    "/conversation-paths", summary="List conversation paths", response=Page[ConversationPath], query=PageQuery
)
async def list_conversation_paths(call: ApiCall) -> Page[ConversationPath]:
    """The organization's conversation paths, newest first."""
    query = call.query_as(PageQuery)
    async with call.tenant() as db:
        rows = await conversation_paths.list_conversation_paths_page(
            db, organization_id=call.caller.organization_id, limit=query.fetch_limit, before=query.position()
        )
    return to_page(Page[ConversationPath], rows, query)


@resource.post(
    "/conversation-paths",
    summary="Create a conversation path",
    response=SavedConversationPath,
    body=ConversationPathCreate,
)
async def create_conversation_path(call: ApiCall) -> SavedConversationPath:
    """Create a conversation path; `warnings` names its transfer nodes the organization's dial policy refuses."""
    body = call.body_as(ConversationPathCreate)
    _check_graph(body.nodes, body.edges)
    organization_id = call.caller.organization_id
    async with call.tenant() as db:
        path = await conversation_paths.create_conversation_path(
            db, organization_id=organization_id, **body.model_dump()
        )
        warnings = await dial_policy_warnings(db, organization_id=organization_id, path=path)
    return SavedConversationPath(**path.model_dump(), warnings=warnings)


@resource.get("/conversation-paths/{conversationPathId}", summary="Get a conversation path", response=ConversationPath)
async def get_conversation_path(call: ApiCall) -> ConversationPath:
    """One conversation path."""
    async with call.tenant() as db:
        return await conversation_paths.get_conversation_path(
            db, organization_id=call.caller.organization_id, conversation_path_id=call.path["conversationPathId"]
        )


@resource.patch(
    "/conversation-paths/{conversationPathId}",
    summary="Update a conversation path",
    response=SavedConversationPath,
    body=ConversationPathUpdate,
)
async def update_conversation_path(call: ApiCall) -> SavedConversationPath:
    """Change a path's name, use case, speech or graph; `warnings` names transfer nodes its agents cannot make."""
    changes = call.body_as(ConversationPathUpdate).changes()
    organization_id = call.caller.organization_id
    async with call.tenant() as db:
        if "nodes" in changes or "edges" in changes:
            current = await conversation_paths.lock_conversation_path(
                db, organization_id=organization_id, conversation_path_id=call.path["conversationPathId"]
            )
            _check_graph(changes.get("nodes", current.nodes), changes.get("edges", current.edges))
        path = await conversation_paths.update_conversation_path(
            db,
            organization_id=organization_id,
            conversation_path_id=call.path["conversationPathId"],
            changes=changes,
        )
        warnings = [
            *await dial_policy_warnings(db, organization_id=organization_id, path=path),
            *await transfer_warnings(db, organization_id=organization_id, conversation_path_id=path.id),
        ]
    return SavedConversationPath(**path.model_dump(), warnings=warnings)


@resource.delete("/conversation-paths/{conversationPathId}", summary="Delete a conversation path")
async def delete_conversation_path(call: ApiCall) -> None:
    """Delete a path; agents lose it, campaigns that followed it run without one."""
    async with call.tenant() as db:
        await conversation_paths.delete_conversation_path(
            db, organization_id=call.caller.organization_id, conversation_path_id=call.path["conversationPathId"]
        )


def _check_graph(nodes: Any, edges: Any) -> None:
    """Refuse a graph a call could not walk (422 naming the node or edge and its field); an empty one is a draft.
    Half of it may be the stored half, in whatever shape another writer left it."""
    if not nodes and not edges:
        return
    try:
        read_path(nodes, edges, strict=True)
    except PathInvalid as exc:
        raise _invalid(exc) from None


def _invalid(exc: PathInvalid) -> ApiError:
    first = exc.problems[0]
    return unprocessable(str(exc), first.field)


@resource.put(
    "/agents/{agentId}/conversation-paths/{conversationPathId}/default",
    summary="Make a linked path the agent's default",
    errors=(422,),
)
async def set_default_conversation_path(call: ApiCall) -> None:
    """The agent's calls follow this path (unless their campaign names one); it must be linked to the agent.

    422 if the agent's transfer rules refuse one of the path's transfer nodes."""
    pairing = {
        "organization_id": call.caller.organization_id,
        "agent_id": call.path["agentId"],
        "conversation_path_id": call.path["conversationPathId"],
    }
    async with call.tenant() as db:
        await agents.set_default_conversation_path(db, **pairing)
        await refuse_unmakeable_transfers(db, **pairing)
