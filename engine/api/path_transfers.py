"""Transfer nodes an agent can never make, named when a path and an agent are put together or either is changed.

Pairing a path with an agent (linking it, making it the default, a campaign naming both) is refused with a 422
when the agent's transfer rules refuse one of the path's transfer nodes. Changing one side of pairings that exist
(an agent's configuration, a path's nodes) is saved, and the response lists the same problems as `warnings`: such
a change may be the first half of two (an operator switching a destination edits the agent, then the path) or
touch a path several agents share, and the rules still refuse each transfer when a call reaches it. One rule
decides both, `pipelines.paths.transfer_check.unmakeable_transfers`.
"""

from __future__ import annotations

from config.agent import AgentConfigurationError, parse_agent_configuration
from engine.api.errors import ApiError, unprocessable
from engine.api.models import ResponseModel
from pipelines.conversation.transfer_rules import TransferRules
from pipelines.paths.transfer_check import unmakeable_transfers
from storage import agents, conversation_paths
from storage.agents import Agent
from storage.conversation_paths import ConversationPath
from storage.records import Queryable

__all__ = ["TransferWarning", "refuse_unmakeable_transfers", "transfer_warnings"]


class TransferWarning(ResponseModel):
    """A transfer node of a path an agent follows that the agent's transfer rules refuse: every call that reaches
    it fails its transfer (the caller hears an apology and the path goes back)."""

    agent_id: str
    conversation_path_id: str
    node_id: str
    field: str
    """The JSON path of the node's number in the path (`nodes[3].data.number`)."""
    number: str
    message: str


def _warnings(agent: Agent, path: ConversationPath) -> list[TransferWarning]:
    try:
        config = parse_agent_configuration(agent.configuration)
    except AgentConfigurationError:
        return []  # an agent that cannot run fails its calls for that reason, named when they start
    rules = TransferRules.from_config(config.transfer)
    return [
        TransferWarning(
            agent_id=agent.id,
            conversation_path_id=path.id,
            node_id=found.node_id,
            field=found.field,
            number=found.number,
            message=(
                f"conversation path {path.id} node {found.node_id!r} ({found.field}) transfers to {found.number}, "
                f"which agent {agent.id}'s transfer rules refuse: {found.reason.removeprefix('error: ')} "
                f"(add it to the agent's configuration.transfer.destinations, or change the node's number)"
            ),
        )
        for found in unmakeable_transfers(path.nodes, path.edges, rules)
    ]


async def transfer_warnings(
    db: Queryable, *, organization_id: str, agent_id: str | None = None, conversation_path_id: str | None = None
) -> list[TransferWarning]:
    """The transfer nodes of every path an agent follows (linked, or named by a running campaign) that it cannot
    make, for one agent or one path, as the transaction sees them."""
    pairings = await agents.list_path_pairings(
        db, organization_id=organization_id, agent_id=agent_id, conversation_path_id=conversation_path_id
    )
    return [warning for pairing in pairings for warning in _warnings(pairing.agent, pairing.conversation_path)]


async def refuse_unmakeable_transfers(
    db: Queryable, *, organization_id: str, agent_id: str, conversation_path_id: str, field: str | None = None
) -> None:
    """422 naming the first transfer node of the path the agent cannot make (`field`: the request's field that
    named the path, if any); nothing when the agent can make them all."""
    agent = await agents.get_agent(db, organization_id=organization_id, agent_id=agent_id)
    path = await conversation_paths.get_conversation_path(
        db, organization_id=organization_id, conversation_path_id=conversation_path_id
    )
    problems = _warnings(agent, path)
    if problems:
        raise _refusal(problems, field)


def _refusal(problems: list[TransferWarning], field: str | None) -> ApiError:
    more = len(problems) - 1
    suffix = f" (and {more} more transfer node{'s' if more > 1 else ''})" if more else ""
    return unprocessable(f"{problems[0].message}{suffix}", field)
