"""Transfer nodes an agent can never make, named when a path and an agent are put together or either is changed.

Pairing a path with an agent (linking it, making it the default, a campaign naming both) is refused with a 422
when the agent's transfer rules refuse one of the path's transfer nodes. Changing one side of pairings that exist
(an agent's configuration, a path's nodes) is saved, and the response lists the same problems as `warnings`: such
a change may be the first half of two (an operator switching a destination edits the agent, then the path) or
touch a path several agents share, and the rules still refuse each transfer when a call reaches it. One rule
decides both, `pipelines.paths.transfer_check.unmakeable_transfers`.

A transfer the organization's dial policy refuses (storage.dial_policies: a country it does not dial, a premium-rate
number) is never made either, whichever agent reaches it: saving a path or an agent's configuration lists those
transfer nodes and exact destinations in `warnings` too (`dial_policy_warnings`), never a refusal, since the policy
is an OWNER's or ADMIN's to change and may be opened after the save. The verdict is the policy's own `refusal`, the
one every transfer obeys when a call makes it (engine/call/paid_transfer.py).
"""

from __future__ import annotations

from config.agent import AgentConfiguration, AgentConfigurationError, parse_agent_configuration
from engine.api.errors import ApiError, unprocessable
from engine.api.models import ResponseModel
from pipelines.conversation.transfer_rules import TransferRules
from pipelines.paths.transfer_check import refused_by_dial_policy, unmakeable_transfers
from storage import agents, conversation_paths, dial_policies
from storage.agents import Agent
from storage.conversation_paths import ConversationPath
from storage.records import Queryable

__all__ = ["TransferWarning", "dial_policy_warnings", "refuse_unmakeable_transfers", "transfer_warnings"]


class TransferWarning(ResponseModel):
    """A transfer no call can make: a transfer node of a path an agent follows that the agent's transfer rules
    refuse, or a path's transfer node or an agent's destination that the organization's dial policy refuses. Every
    call that reaches it fails its transfer (the caller hears an apology, and a path goes back)."""

    agent_id: str | None
    """The agent whose rules refuse the node, or whose destination the dial policy refuses; None for a path's node
    the dial policy refuses (whichever agent follows the path)."""
    conversation_path_id: str | None
    """The path of the node; None for an agent's destination."""
    node_id: str | None
    field: str
    """The JSON path of the number in the path (`nodes[3].data.number`) or in the agent
    (`configuration.transfer.destinations[0].number`)."""
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
            node_id=found.node.node_id,
            field=found.node.field,
            number=found.node.number,
            message=(
                f"conversation path {path.id} node {found.node.node_id!r} ({found.node.field}) transfers to "
                f"{found.node.number}, which agent {agent.id}'s transfer rules refuse: "
                f"{found.reason.removeprefix('error: ')} "
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


async def dial_policy_warnings(
    db: Queryable,
    *,
    organization_id: str,
    path: ConversationPath | None = None,
    agent_id: str | None = None,
    configuration: AgentConfiguration | None = None,
) -> list[TransferWarning]:
    """The transfer nodes of `path`, or the exact destinations of agent `agent_id`'s `configuration`, that the
    organization's dial policy refuses, as the transaction sees the policy."""
    policy = await dial_policies.get_policy(db, organization_id=organization_id)
    found = []
    if path is not None:
        for refused in refused_by_dial_policy(path.nodes, path.edges, policy.refusal):
            node = refused.node
            found.append(
                TransferWarning(
                    agent_id=None,
                    conversation_path_id=path.id,
                    node_id=node.node_id,
                    field=node.field,
                    number=node.number,
                    message=f"conversation path {path.id} node {node.node_id!r} ({node.field}) transfers to "
                    f"{node.number}, which the organization's dial policy refuses: {refused.reason}",
                )
            )
    if configuration is not None and configuration.transfer is not None:
        for index, destination in enumerate(configuration.transfer.destinations):
            reason = None if destination.number is None else policy.refusal(destination.number)
            if destination.number is None or reason is None:
                continue
            field = f"configuration.transfer.destinations[{index}].number"
            found.append(
                TransferWarning(
                    agent_id=agent_id,
                    conversation_path_id=None,
                    node_id=None,
                    field=field,
                    number=destination.number,
                    message=f"agent {agent_id}'s transfer destination {destination.label!r} ({field}) is "
                    f"{destination.number}, which the organization's dial policy refuses: {reason}",
                )
            )
    return found


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
