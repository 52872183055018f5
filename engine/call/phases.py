"""The phase of a call as an explicit state machine: one table from (phase, event) to the next phase.

Everything that moves a call's phase goes through `next_phase`; a move the table does not have raises
`InvalidSessionTransition`, in the manner of h11, instead of being ignored. Conversation drivers ask
`accepts` before acting on something only some phases allow (a reply while the call is ending).
"""

from __future__ import annotations

import enum
from typing import Final


class CallPhase(enum.Enum):
    """Where a call is."""

    AWAITING_GREETING = "awaiting_greeting"  # outbound: the callee may speak first ("Hello?")
    LISTENING = "listening"  # the caller has the floor
    RESPONDING = "responding"  # the agent is thinking or speaking
    ENDING = "ending"  # the end is decided; the last words may still be playing
    ENDED = "ended"


class PhaseEvent(enum.Enum):
    """What moves a call from one phase to another."""

    GREETED = "greeted"  # the callee spoke first, or waited long enough: the conversation opens
    REPLY = "reply"  # the agent starts a turn of the conversation
    YIELD = "yield"  # the agent's turn is over: heard through, cut by the caller, or nothing to say
    WIND_DOWN = "wind_down"  # hang-up, goodbye, answering machine or transfer decided
    END = "end"  # the call is over


class InvalidSessionTransition(RuntimeError):
    """A phase change the call's state machine does not allow."""


_LIVE: Final = (CallPhase.AWAITING_GREETING, CallPhase.LISTENING, CallPhase.RESPONDING)

TRANSITIONS: Final[dict[tuple[CallPhase, PhaseEvent], CallPhase]] = {
    (CallPhase.AWAITING_GREETING, PhaseEvent.GREETED): CallPhase.LISTENING,
    (CallPhase.AWAITING_GREETING, PhaseEvent.REPLY): CallPhase.RESPONDING,
    (CallPhase.LISTENING, PhaseEvent.REPLY): CallPhase.RESPONDING,
    (CallPhase.RESPONDING, PhaseEvent.REPLY): CallPhase.RESPONDING,  # a new turn replaces the one in progress
    (CallPhase.RESPONDING, PhaseEvent.YIELD): CallPhase.LISTENING,
    (CallPhase.LISTENING, PhaseEvent.YIELD): CallPhase.LISTENING,
    (CallPhase.AWAITING_GREETING, PhaseEvent.YIELD): CallPhase.AWAITING_GREETING,
    (CallPhase.ENDING, PhaseEvent.YIELD): CallPhase.ENDING,  # the last words were heard (or cut)
    **{(phase, PhaseEvent.WIND_DOWN): CallPhase.ENDING for phase in _LIVE},
    **{(phase, PhaseEvent.END): CallPhase.ENDED for phase in (*_LIVE, CallPhase.ENDING)},
}


def next_phase(phase: CallPhase, event: PhaseEvent) -> CallPhase:
    """The phase after `event` in `phase`; InvalidSessionTransition if the machine has no such move."""
    try:
        return TRANSITIONS[phase, event]
    except KeyError:
        raise InvalidSessionTransition(f"{event.value} is not allowed while {phase.value}") from None


def accepts(phase: CallPhase, event: PhaseEvent) -> bool:
    """Whether `event` is a legal move in `phase`."""
    return (phase, event) in TRANSITIONS
