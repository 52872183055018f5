"""Which agent answers a number several agents share ("time-based routing"): the one whose hours are open now.

Each agent's `inboundHours` (config.agent.InboundHours) are calling windows (engine.campaigns.windows, the one
home of "is this window open at this instant"). An agent whose hours are open is chosen before an agent with
no hours (which answers at any time); among equals, the most recently updated agent, as with a single number.
With every agent outside its hours, nobody answers: the caller hears the number's closed message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from config.agent import WEEKDAYS, AgentConfiguration, AgentConfigurationError, parse_agent_configuration
from engine.campaigns.windows import CallingWindow, zone
from storage.agents import Agent

__all__ = ["InboundChoice", "choose_inbound_agent", "hours_open"]


@dataclass(frozen=True, slots=True)
class InboundChoice:
    """The agent that answers, or None when every agent on the number is outside its hours (closed)."""

    agent: Agent | None

    @property
    def closed(self) -> bool:
        """Whether the number is closed: it has agents, but none whose hours are open."""
        return self.agent is None


def hours_open(config: AgentConfiguration, at: datetime) -> bool | None:
    """Whether the agent's inbound hours are open at the aware instant `at`; None if it has no hours (always)."""
    if not config.inbound_hours:
        return None
    for hours in config.inbound_hours:
        days = frozenset(WEEKDAYS.index(day) + 1 for day in hours.days)
        window = CallingWindow.from_strings(hours.start, hours.end, days)
        if window.is_open(zone(hours.timezone or config.timezone), at):
            return True
    return False


def choose_inbound_agent(candidates: Sequence[Agent], at: datetime) -> InboundChoice:
    """The agent of `candidates` (most recently updated first) that answers at `at`.

    An agent whose configuration cannot be read counts as having no hours: it is chosen as before routing
    existed, and the voice webhook then refuses the call as misconfigured, naming the problem in its log and in
    the call's CallLog (FAILED, `pipeline_unavailable`).
    """
    always: Agent | None = None
    for agent in candidates:
        try:
            is_open = hours_open(parse_agent_configuration(agent.configuration), at)
        except AgentConfigurationError:
            is_open = None
        if is_open:
            return InboundChoice(agent)
        if is_open is None and always is None:
            always = agent
    return InboundChoice(always)
