"""A call's turns in conversation order, handed to the CallLog writer once each one's text is known.

A turn takes its place when it happens (the caller stopped speaking, the agent started a reply) and is written
once settled: a caller turn may wait for its transcript, an agent turn for the marks that say what was heard.
Turns are written strictly in order, each with the next index; offsets from different clocks are clamped onto
the call's timeline so a turn is never lost over a frame of disagreement.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, runtime_checkable

from engine.call.call_log_writer import TurnRecord
from engine.call.live_events import CallEvents
from engine.call.path_trace import PathTrace
from engine.server import metrics
from pipelines.paths.engine import PathEngine

Speaker = Literal["caller", "agent"]

TRANSCRIPTION_FAILED: Final = "[speech, transcription failed]"
"""A caller turn's text when its transcription failed, or never came before the call ended."""
LATENCY_STAGE: Final = "firstFrameSent"
"""The stage a turn's headline latency is: the agent's first audio sent, after the caller stopped speaking."""
SPECULATIVE_FLAG: Final = "speculative"
"""The key marking a speculative reply in an agent turn's latency record (1 when it was; never a stage)."""


@dataclass(slots=True)
class Turn:
    """One turn in conversation order; written once its text is known (or dropped: nothing of it was heard)."""

    speaker: Speaker
    start_ms: int = 0
    end_ms: int = 0
    text: str | None = None
    said: str | None = None
    """An agent turn's whole text, of which `text` is what the caller heard (None: the same)."""
    interrupted: bool = False
    latency_ms: int | None = None
    latency: dict[str, int] | None = None
    knowledge: Mapping[str, Any] | None = None
    dropped: bool = False
    path_node_id: str | None = None
    path_edge_id: str | None = None

    @property
    def ready(self) -> bool:
        """Whether the turn can be written (or skipped)."""
        return self.dropped or self.text is not None


class TurnSink(Protocol):
    """Where finished turns go: the call's CallLogWriter, off the audio path."""

    def record_turn(self, turn: TurnRecord) -> None:
        """Queue a finished turn for writing."""
        ...


@runtime_checkable
class MetadataSink(Protocol):
    """A TurnSink that also merges items into the CallLog's metadata (the CallLogWriter)."""

    def record_metadata(self, **items: Any) -> None:
        """Merge items into CallLog.metadata with the next write."""
        ...


def stage_latencies(reply_to: float, stage_at: Mapping[str, float | None]) -> dict[str, int]:
    """Each reached stage's time as milliseconds after `reply_to` (when the caller stopped speaking)."""
    return {stage: max(0, round((at - reply_to) * 1000)) for stage, at in stage_at.items() if at is not None}


class TurnLog:
    """The call's turns, in conversation order, to the CallLog writer; and the conversation as it was heard."""

    def __init__(
        self,
        writer: TurnSink,
        *,
        knowledge: Callable[[], Mapping[str, Any] | None] | None = None,
        live: CallEvents | None = None,
    ) -> None:
        """Write through `writer` (which does the database work off the audio path).

        `knowledge` gives the knowledge searches made since it was last asked: an agent turn takes them when it
        is placed (its reply was being prepared meanwhile), to be stored with it. `live` hears of each turn as it
        is written (caller.final, agent.turn, turn.latency) and of the agent's words as they start playing.
        """
        self._writer = writer
        self._live = live
        self._knowledge = knowledge
        self._waiting: deque[Turn] = deque()
        self._next_index = 0
        self._latencies: list[int] = []
        self.heard: list[tuple[Speaker, str]] = []
        """Every written turn's speaker and text: what was said and heard, for a model that must catch up."""
        self._trace: PathTrace | None = None

    def trace_path(self, path_id: str, engine: PathEngine) -> None:
        """Stamp each turn placed from now on with the conversation path's node and edge (and keep the trace)."""
        sink = self._writer
        self._trace = PathTrace(
            path_id,
            engine,
            record_metadata=sink.record_metadata if isinstance(sink, MetadataSink) else None,
            live=self._live,
        )

    def tell_path_steps(self) -> None:
        """A speculative reply's caller turn is confirmed: the live events hear of the path steps it took."""
        if self._trace is not None:
            self._trace.tell_steps()

    def path_node(self) -> str | None:
        """The conversation path's node the call is at now (None without a path, or before it starts)."""
        return self._trace.node() if self._trace is not None else None

    def place(
        self,
        speaker: Speaker,
        start_ms: int = 0,
        end_ms: int = 0,
        *,
        text: str | None = None,
        path_node: str | None = None,
    ) -> Turn:
        """Give a turn its place in the conversation now; it is written when settled (its text known).

        `path_node`: where a caller's turn was heard, when a speculative reply has moved the path since."""
        turn = Turn(speaker, start_ms, end_ms, text)
        if self._trace is not None:
            turn.path_node_id, turn.path_edge_id = self._trace.stamp(speaker)
            if speaker == "caller" and path_node is not None:
                turn.path_node_id = path_node
        if speaker == "agent" and self._knowledge is not None:
            turn.knowledge = self._knowledge()
        self._waiting.append(turn)
        self.flush()
        return turn

    def settle(self, turn: Turn, text: str, *, said: str | None = None) -> None:
        """A placed turn's text is known: write it, and the turns after it that were waiting on it.

        `said`: an agent turn's whole text, when the caller heard only `text` of it."""
        turn.text = text
        turn.said = said
        self.flush()

    def speaking(self, text: str, turn: Turn | None = None) -> None:
        """The agent's `text` starts playing to the caller (as part of `turn`, if it has its place already).

        Its turn index is the one the turn gets if nothing before it is dropped (agent.turn has the final one)."""
        if self._live is None:
            return
        before = self._waiting if turn is None else list(self._waiting)[: self._position(turn)]
        index = self._next_index + sum(1 for waiting in before if not waiting.dropped)
        self._live.emit("agent.speaking", turnIndex=index, text=text)

    def _position(self, turn: Turn) -> int:
        for position, waiting in enumerate(self._waiting):
            if waiting is turn:
                return position
        return len(self._waiting)

    def drop(self, turn: Turn) -> None:
        """Nothing of a placed turn reached the caller: it is not written."""
        turn.dropped = True
        self.flush()

    def time(
        self, turn: Turn, reply_to: float | None, stage_at: Mapping[str, float | None], *, speculative: bool = False
    ) -> None:
        """Record an agent turn's latency stages (seconds on the call's clock); the headline is `firstFrameSent`.

        A reply started before the caller's turn was confirmed is marked `"speculative": 1` in the record (a flag
        in the record's integers, not a stage; absent for the others).
        """
        if reply_to is None or stage_at.get(LATENCY_STAGE) is None:
            return
        stages = stage_latencies(reply_to, stage_at)
        turn.latency_ms = stages[LATENCY_STAGE]
        self._latencies.append(turn.latency_ms)
        metrics.observe_turn(stages)
        turn.latency = {**stages, SPECULATIVE_FLAG: 1} if speculative else stages

    def flush(self) -> None:
        """Write the settled turns in order, up to the first one still waiting."""
        while self._waiting and self._waiting[0].ready:
            turn = self._waiting.popleft()
            if turn.dropped or turn.text is None:
                continue
            start_ms = max(0, turn.start_ms)
            self._writer.record_turn(
                TurnRecord(
                    index=self._next_index,
                    speaker=turn.speaker,
                    text=turn.text,
                    start_ms=start_ms,
                    end_ms=max(start_ms, turn.end_ms),
                    interrupted=turn.interrupted,
                    latency_ms=turn.latency_ms,
                    latency=turn.latency,
                    path_node_id=turn.path_node_id,
                    path_edge_id=turn.path_edge_id,
                    knowledge=turn.knowledge,
                )
            )
            self._tell(self._next_index, turn)
            self._next_index += 1
            if turn.text:
                self.heard.append((turn.speaker, turn.text))

    def _tell(self, index: int, turn: Turn) -> None:
        """The call's live events hear of a turn as it is written."""
        live = self._live
        if live is None:
            return
        if turn.speaker == "caller":
            live.emit("caller.final", text=turn.text, turnIndex=index)
            return
        said = turn.said if turn.said is not None else turn.text
        live.emit("agent.turn", turnIndex=index, text=said, spokenText=turn.text, interrupted=turn.interrupted)
        if turn.latency is not None:
            latency = {stage: value for stage, value in turn.latency.items() if stage != SPECULATIVE_FLAG}
            live.emit(
                "turn.latency",
                turnIndex=index,
                voiceToVoiceMs=turn.latency_ms,
                speculative=SPECULATIVE_FLAG in turn.latency,
                **latency,
            )

    def close(self, *, unsettled_caller_text: str) -> None:
        """At the end of the call: write what is still waiting (a caller turn whose transcript never came gets
        `unsettled_caller_text`; an agent turn never settled is dropped); the path's trace keeps where it ended."""
        if self._trace is not None:
            self._trace.settle()
        for turn in self._waiting:
            if not turn.ready:
                if turn.speaker == "caller":
                    turn.text = unsettled_caller_text
                else:
                    turn.dropped = True
        self.flush()

    @property
    def latencies_ms(self) -> list[int]:
        """Response latencies of the agent's turns so far (caller stopped speaking → first agent audio sent)."""
        return list(self._latencies)
