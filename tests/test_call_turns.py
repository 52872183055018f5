"""Turns reach the CallLog writer in conversation order, once each one's text is known."""

from __future__ import annotations

from engine.call.call_log_writer import TurnRecord
from engine.call.turns import TurnLog, stage_latencies


class Sink:
    def __init__(self) -> None:
        self.turns: list[TurnRecord] = []

    def record_turn(self, turn: TurnRecord) -> None:
        self.turns.append(turn)


def test_a_turn_waiting_for_its_transcript_holds_back_the_ones_after_it() -> None:
    sink = Sink()
    log = TurnLog(sink)
    caller = log.place("caller", 0, 900)
    log.place("agent", 950, 2000, text="Sure.")
    assert sink.turns == []

    log.settle(caller, "Book me in")

    assert [(t.index, t.speaker, t.text) for t in sink.turns] == [(0, "caller", "Book me in"), (1, "agent", "Sure.")]
    assert log.heard == [("caller", "Book me in"), ("agent", "Sure.")]


def test_a_dropped_turn_is_skipped_without_a_gap_in_the_indices() -> None:
    sink = Sink()
    log = TurnLog(sink)
    agent = log.place("agent")
    log.place("caller", 10, 20, text="Hello?")
    log.drop(agent)

    assert [(t.index, t.speaker) for t in sink.turns] == [(0, "caller")]


def test_offsets_from_disagreeing_clocks_are_clamped_onto_the_timeline() -> None:
    sink = Sink()
    TurnLog(sink).place("caller", -40, -60, text="hi")

    assert (sink.turns[0].start_ms, sink.turns[0].end_ms) == (0, 0)


def test_at_the_end_a_caller_turn_never_transcribed_is_written_with_a_placeholder() -> None:
    sink = Sink()
    log = TurnLog(sink)
    log.place("caller", 0, 500)
    log.place("agent")

    log.close(unsettled_caller_text="[speech, transcription failed]")

    assert [(t.speaker, t.text) for t in sink.turns] == [("caller", "[speech, transcription failed]")]


def test_an_agent_turn_is_timed_from_when_the_caller_stopped_speaking() -> None:
    sink = Sink()
    log = TurnLog(sink)
    turn = log.place("agent", 1000, 2000)

    log.time(turn, 10.0, {"llmFirstToken": 10.3, "firstFrameSent": 10.5, "firstMarkEchoed": None})
    log.settle(turn, "Sure.")

    assert sink.turns[0].latency_ms == 500
    assert sink.turns[0].latency == {"llmFirstToken": 300, "firstFrameSent": 500}
    assert log.latencies_ms == [500]
    assert stage_latencies(1.0, {"a": 0.5}) == {"a": 0}
