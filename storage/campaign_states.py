"""Campaign dispatch states: where a recipient and each dial attempt stand, and the moves allowed between them.

The tables are the state machines; the dispatch queries (storage/campaign_dispatch.py) take their conditions
from them, and the CHECK constraints of migrations 0007 and 0013 list the same values (a test compares them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import TypeVar

from storage.errors import StorageError


class RecipientDispatchState(StrEnum):
    """Where a campaign recipient is in its dialing."""

    QUEUED = "QUEUED"
    """Waiting for its next attempt."""
    DIALING = "DIALING"
    """Leased to one process, which is placing the call."""
    IN_CALL = "IN_CALL"
    """The call was placed: its CallLog decides what happens next."""
    DONE = "DONE"
    """Reached."""
    FAILED = "FAILED"
    """Attempts exhausted, or an outcome the campaign does not retry."""
    INVALID = "INVALID"
    """An ERROR row of an import: never dialed."""
    CANCELED = "CANCELED"
    """Its campaign was stopped before it was reached, while it waited for an attempt or during one."""
    DO_NOT_CALL = "DO_NOT_CALL"
    """Its number is on the organization's do-not-call list: never dialed (`lastReason` says why)."""


class AttemptState(StrEnum):
    """Where one dial attempt stands."""

    DIALING = "DIALING"
    """Claimed: the call is being placed."""
    PLACED = "PLACED"
    """A CallLog exists."""
    ENDED = "ENDED"
    """Its outcome is known."""
    ABANDONED = "ABANDONED"
    """Given back before Twilio was asked: it does not count."""


class AttemptOutcome(StrEnum):
    """What a finished attempt means for the retry policy (the values of "retryOn")."""

    COMPLETED = "completed"
    BUSY = "busy"
    NO_ANSWER = "no-answer"
    VOICEMAIL = "voicemail"
    FAILED = "failed"


RECIPIENT_TRANSITIONS: Mapping[RecipientDispatchState, frozenset[RecipientDispatchState]] = {
    RecipientDispatchState.QUEUED: frozenset(
        {RecipientDispatchState.DIALING, RecipientDispatchState.CANCELED, RecipientDispatchState.DO_NOT_CALL}
    ),
    # A lease ends placed, given back (queued again, canceled with its campaign, or its number listed as do not
    # call since the claim), or refused (an outcome).
    RecipientDispatchState.DIALING: frozenset(
        {
            RecipientDispatchState.IN_CALL,
            RecipientDispatchState.QUEUED,
            RecipientDispatchState.CANCELED,
            RecipientDispatchState.DO_NOT_CALL,
            RecipientDispatchState.DONE,
            RecipientDispatchState.FAILED,
        }
    ),
    # A call ends retried, reached, failed, or canceled (its campaign stopped meanwhile, the recipient not reached).
    RecipientDispatchState.IN_CALL: frozenset(
        {
            RecipientDispatchState.QUEUED,
            RecipientDispatchState.DONE,
            RecipientDispatchState.FAILED,
            RecipientDispatchState.CANCELED,
        }
    ),
    RecipientDispatchState.DONE: frozenset(),
    RecipientDispatchState.FAILED: frozenset(),
    RecipientDispatchState.INVALID: frozenset(),
    RecipientDispatchState.CANCELED: frozenset(),
    RecipientDispatchState.DO_NOT_CALL: frozenset(),
}
"""The states each recipient dispatch state may move to; DONE, FAILED, INVALID, CANCELED, DO_NOT_CALL are final."""

ATTEMPT_TRANSITIONS: Mapping[AttemptState, frozenset[AttemptState]] = {
    AttemptState.DIALING: frozenset({AttemptState.PLACED, AttemptState.ENDED, AttemptState.ABANDONED}),
    AttemptState.PLACED: frozenset({AttemptState.ENDED}),
    AttemptState.ENDED: frozenset(),
    AttemptState.ABANDONED: frozenset(),
}
"""The states each attempt state may move to; ENDED and ABANDONED are final."""

UNFINISHED = frozenset(state for state, targets in RECIPIENT_TRANSITIONS.items() if targets)
"""Recipient states a campaign still waits on before it is complete."""
IN_FLIGHT = frozenset({AttemptState.DIALING, AttemptState.PLACED})
"""Attempt states that hold one of the campaign's concurrent calls."""
RETRYABLE_OUTCOMES = frozenset(AttemptOutcome) - {AttemptOutcome.COMPLETED}
"""Outcomes a retry policy may retry."""

S = TypeVar("S", RecipientDispatchState, AttemptState)


class InvalidDispatchTransition(StorageError):
    """A recipient or an attempt was asked to move to a state its current state does not lead to."""


def sources(transitions: Mapping[S, frozenset[S]], target: S) -> frozenset[S]:
    """The states that may move to `target`: the condition of the UPDATE that moves a row there."""
    return frozenset(state for state, targets in transitions.items() if target in targets)


def sql_states(states: Iterable[StrEnum]) -> str:
    """The states as a list of SQL literals, for `"state" IN (...)`; inlined, so partial indexes on a state apply.

    Safe to inline: the values are this module's constants, never input.
    """
    return ", ".join(sorted(f"'{state.value}'" for state in states))
