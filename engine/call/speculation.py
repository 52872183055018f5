"""Speculative replies: a reply started on the caller's words before their turn is confirmed, its audio held.

The pipeline driver (engine.call.cascade) asks the recognizer for its final words after a short silence
(`endpointing.speculate_after_ms`), and when those words read as finished (pipelines.conversation.end_of_turn) it
starts the model, and the synthesizer, on them at once. The reply's audio waits behind the utterance's gate
(engine.call.pipeline_speech) until the turn is confirmed by the agent's own rule: then, if the confirmed words are
the same, the speculation is used (the gate opens); if the caller spoke on or the words differ, it is discarded:
its task cancelled (which closes the model's and the synthesizer's streams), nothing played, nothing written, and a
model with state of its own (a conversation path) rewound.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from engine.call.pipeline_speech import Utterance
from engine.server import metrics
from media.g711 import FRAME_MS
from pipelines.llm.base import Rewinds

__all__ = ["RESUME_MS", "CallerPause", "SpeculativeReply"]

RESUME_MS = 60
"""Voiced audio after a pause that counts as the caller speaking on (the VAD's own start of speech)."""


@dataclass(slots=True)
class CallerPause:
    """The silence since the caller's last voiced frame, counted in audio time (20 ms a frame), and whether the
    caller has spoken on since a moment of interest."""

    quiet_ms: int = 0
    voiced_run_ms: int = 0

    def frame(self, *, voiced: bool) -> bool:
        """Count one frame; True when it makes the caller's voiced run reach `RESUME_MS` (they speak on)."""
        if voiced:
            self.quiet_ms = 0
            self.voiced_run_ms += FRAME_MS
            return self.voiced_run_ms == RESUME_MS
        self.quiet_ms += FRAME_MS
        self.voiced_run_ms = 0
        return False


@dataclass(slots=True)
class SpeculativeReply:
    """A reply in flight on words the caller may not have finished: its text, utterance (gated) and task."""

    text: str
    utterance: Utterance
    task: asyncio.Task[None]
    checkpoint: object | None
    """The model's state before the reply (for a model that `Rewinds`), to go back to if it is discarded."""
    path_node: str | None = None
    """The conversation path's node where the caller was heard (the reply may move the path before the turn is
    confirmed; the caller's turn is still stamped with this node)."""

    def use(self, reply_to: float | None, confirmed_at: float) -> None:
        """The turn is confirmed with these words: the reply answers it, its audio may play."""
        utterance = self.utterance
        utterance.reply_to = reply_to
        utterance.stage_at["sttEndOfTurn"] = confirmed_at
        utterance.speculative = True
        assert utterance.gate is not None
        utterance.gate.set()
        metrics.SPECULATIVE_REPLIES.labels("used").inc()

    def discard(self, model: object) -> None:
        """The caller spoke on or said something else: stop the reply; nothing of it was heard or is written."""
        self.task.cancel()
        self.utterance.settled = True
        if self.checkpoint is not None and isinstance(model, Rewinds):
            model.rewind(self.checkpoint)
        metrics.SPECULATIVE_REPLIES.labels("discarded").inc()
