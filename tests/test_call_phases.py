"""The call's phase machine: the legal moves, and a named error for the others."""

from __future__ import annotations

import pytest

from engine.call.phases import TRANSITIONS, CallPhase, InvalidSessionTransition, PhaseEvent, accepts, next_phase


@pytest.mark.parametrize(
    ("phase", "event", "after"),
    [
        (CallPhase.AWAITING_GREETING, PhaseEvent.GREETED, CallPhase.LISTENING),
        (CallPhase.LISTENING, PhaseEvent.REPLY, CallPhase.RESPONDING),
        (CallPhase.RESPONDING, PhaseEvent.YIELD, CallPhase.LISTENING),
        (CallPhase.RESPONDING, PhaseEvent.WIND_DOWN, CallPhase.ENDING),
        (CallPhase.ENDING, PhaseEvent.END, CallPhase.ENDED),
    ],
)
def test_a_conversation_moves_along_the_table(phase: CallPhase, event: PhaseEvent, after: CallPhase) -> None:
    assert next_phase(phase, event) is after


@pytest.mark.parametrize(
    ("phase", "event"),
    [
        (CallPhase.ENDING, PhaseEvent.REPLY),  # no new turn once the end is decided
        (CallPhase.ENDED, PhaseEvent.END),
        (CallPhase.ENDED, PhaseEvent.REPLY),
        (CallPhase.LISTENING, PhaseEvent.GREETED),
        (CallPhase.ENDING, PhaseEvent.WIND_DOWN),
    ],
)
def test_an_illegal_move_raises_a_named_error(phase: CallPhase, event: PhaseEvent) -> None:
    assert not accepts(phase, event)
    with pytest.raises(InvalidSessionTransition, match=f"{event.value} is not allowed while {phase.value}"):
        next_phase(phase, event)


def test_an_ended_call_never_moves_again() -> None:
    assert not [event for (phase, event) in TRANSITIONS if phase is CallPhase.ENDED]


def test_every_live_phase_can_wind_down_and_end() -> None:
    for phase in (CallPhase.AWAITING_GREETING, CallPhase.LISTENING, CallPhase.RESPONDING):
        assert next_phase(next_phase(phase, PhaseEvent.WIND_DOWN), PhaseEvent.END) is CallPhase.ENDED
