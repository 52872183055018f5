"""A chat model's side of a conversation path: its prompt, its `follow_path` function and what a move does.

`OpenAIChatLLM` holds one `ChatPath` per call (when the agent or campaign has a path) and asks it before each
completion (`before_model`: the start node's arrival, keys a gather node collects, its wait for a key running out),
for the system prompt and functions of each round, and to carry out `follow_path`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.llm.base import ConversationTurn, EndCall, LLMEvent, TextDelta, TransferCall
from pipelines.paths.engine import PATH_END, PathEngine, UnknownWay
from pipelines.paths.graph import GlobalData, KnowledgeData, PromptData
from pipelines.paths.prompts import FOLLOW_PATH, follow_path_function, system_prompt
from pipelines.tools import FunctionSpec

__all__ = ["ChatPath", "PathMove"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PathMove:
    """What the path did: the events to play, whether the model speaks next, and what the model is told."""

    events: tuple[LLMEvent, ...] = ()
    model_speaks: bool = True
    result: str = ""


class ChatPath:
    """One call's path as a chat model walks it."""

    def __init__(self, engine: PathEngine, *, agent_speech: str | None = None, path_id: str | None = None) -> None:
        """Walk `engine`'s path (the ConversationPath `path_id`); `agent_speech` (its style) joins the prompt."""
        self.engine = engine
        self.path_id = path_id
        self._agent_speech = agent_speech
        self._heard = ""

    def system_prompt(self, instructions: str) -> str:
        """The agent's prompt with the path's style, the current node and its ways out."""
        return system_prompt(instructions, self._agent_speech, self.engine)

    def functions(self, specs: Sequence[FunctionSpec]) -> list[FunctionSpec]:
        """The call's functions, and `follow_path` when a way leads out of the current node."""
        follow = follow_path_function(self.engine)
        return [*specs, follow] if follow is not None else list(specs)

    async def before_model(self, conversation: Sequence[ConversationTurn]) -> PathMove:
        """What happens before the model is asked: the start node's arrival, keys collected at a gather node, or
        what a gather node does when its wait for a key ran out."""
        engine = self.engine
        self._heard = next((turn.text for turn in reversed(conversation) if turn.role == "caller"), "")
        if engine.ended:
            return PathMove((EndCall(PATH_END),), model_speaks=False)
        caller_spoke = bool(conversation) and conversation[-1].role == "caller"
        if not engine.started:
            engine.unread_caller_text(conversation)
            events = await engine.begin(self._heard)
            speaks = self._model_speaks(events)
            if caller_spoke and not speaks:
                # The caller spoke first: the start's words are taken as said; the model answers the caller.
                return PathMove(tuple(event for event in events if not isinstance(event, TextDelta)))
            return PathMove(tuple(events), speaks)
        if not caller_spoke and not engine.keys_timed_out:
            return PathMove()
        steps = len(engine.steps)
        pressed = await engine.press(engine.unread_caller_text(conversation))
        if pressed is None:
            return PathMove()
        moved = len(engine.steps) > steps  # else more digits are awaited, silently
        return PathMove(tuple(pressed), moved and self._model_speaks(pressed))

    def hear(self, text: str) -> None:
        """The caller's latest words, as a speech-to-speech call's transcript gives them ("" while unknown): what a
        move to a knowledge node searches with (a chat call's are read from its conversation, `before_model`)."""
        self._heard = text

    async def follow(self, arguments: Mapping[str, Any]) -> PathMove:
        """Carry out `follow_path`: move (keeping the variables given), or tell the model the way is wrong."""
        engine = self.engine
        way = arguments.get("way")
        way = way.strip() if isinstance(way, str) else ""
        variables = arguments.get("variables")
        try:
            events = await engine.move(
                way, heard=self._heard, variables=variables if isinstance(variables, Mapping) else None
            )
        except UnknownWay as exc:
            log.warning("%s to %r refused at node %s", FOLLOW_PATH, way, engine.node.id)
            return PathMove(result=f"error: {exc}; stay at this step and keep talking, or call {FOLLOW_PATH} again")
        # What the node says follows what the model said before calling: a space between them.
        events = [TextDelta(" " + event.text) if isinstance(event, TextDelta) else event for event in events]
        speaks = self._model_speaks(events)
        said = "continue as it says" if speaks else "its words were said for you"
        return PathMove(tuple(events), speaks, f"moved to step {engine.node.id!r}; {said}")

    def model_speaks_at(self, events: Sequence[LLMEvent]) -> bool:
        """Whether, after arriving with `events`, the model should speak (the node asks it to)."""
        return self._model_speaks(events)

    def _model_speaks(self, events: Sequence[LLMEvent]) -> bool:
        if any(isinstance(event, EndCall | TransferCall) for event in events):
            return False
        data = self.engine.node.data
        if isinstance(data, KnowledgeData):
            return bool(self.engine.passages)
        return isinstance(data, PromptData) or (isinstance(data, GlobalData) and data.instructions is not None)
