"""A speech-to-speech call on a conversation path: the session's instructions and functions follow the node.

The Realtime model gets the same prompt and `follow_path` function as a chat model (pipelines.paths.chat); after
each move the session is updated (`session.update`) with the new node's instructions and ways out. What a node
says word for word, the engine has the model say exactly; touch tones, the hang-up and the transfer are the
engine's, as for the model's own function calls; a transfer not made is told to the caller and puts the path back
where the call came from (engine.call.driver.transfer_not_made), and the model hears so. Keys pressed at a gather
node are collected by the path and not passed to the model. A knowledge node searches with the caller's latest
words: their transcript arrives apart from the model's reply, so a move to one waits for it (at most
`TRANSCRIPT_WAIT_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from engine.call.driver import CallHost, end_call_reason, transfer_not_made
from pipelines.llm.base import EndCall, LLMEvent, SendDtmf, TextDelta, TransferCall
from pipelines.paths.chat import ChatPath
from pipelines.paths.graph import KnowledgeData
from pipelines.tools import FunctionSpec, transfer_not_done
from storage.end_reasons import EndReason

__all__ = ["TRANSCRIPT_WAIT_S", "RealtimePath", "offered"]

log = logging.getLogger(__name__)

TRANSCRIPT_WAIT_S: Final = 3.0
"""How long a move to a knowledge node waits for the transcript of the caller's turn it searches with."""


class RealtimePath:
    """One Realtime call's path: prompt, functions, moves and their effects on the call."""

    def __init__(
        self,
        host: CallHost,
        path: ChatPath,
        *,
        say: Callable[[str], Awaitable[None]],
        refresh: Callable[[], Awaitable[None]],
    ) -> None:
        """Act in `host`'s call; `say(text)` has the model say text word for word, `refresh()` re-sends the session."""
        self._host = host
        self._path = path
        self._say = say
        self._refresh = refresh
        self.press_keys: Callable[[str], str] = lambda digits: "error: no keypad"
        """Plays touch tones (the driver's, set once its functions exist)."""
        self._turn: tuple[str, asyncio.Future[None]] | None = None  # the caller's latest turn: item id, transcribed
        self._not_done: str | None = None  # what the latest move's transfer came to, when it did not take the caller

    def caller_turn_ended(self, item_id: str) -> None:
        """The caller's turn `item_id` ended; its words are unknown until `heard`."""
        self._path.hear("")
        self._turn = (item_id, asyncio.get_running_loop().create_future())

    def heard(self, item_id: str, text: str) -> None:
        """The transcript of the caller's turn `item_id` ("" when it failed); only the latest turn's counts."""
        if self._turn is None or self._turn[0] != item_id:
            return
        self._path.hear(text)
        if not self._turn[1].done():
            self._turn[1].set_result(None)

    def instructions(self, base: str) -> str:
        """The session's instructions at the current node."""
        return self._path.system_prompt(base)

    def functions(self, specs: Sequence[FunctionSpec]) -> list[FunctionSpec]:
        """The session's functions: `specs` and `follow_path` when a way leads out of the node."""
        return self._path.functions(specs)

    async def opening(self) -> str:
        """Arrive at the start node; the words it says (the rest of what it does is done)."""
        move = await self._path.before_model([])
        return await self._act(move.events, say_text=False)

    async def follow(self, arguments: Mapping[str, Any]) -> tuple[str, bool]:
        """Carry out `follow_path`: (what the model is told, whether it should speak next)."""
        await self._words_for(arguments.get("way"))
        move = await self._path.follow(arguments)
        self._not_done = None
        await self._act(move.events, say_text=True)
        await self._refresh()
        engine = self._path.engine
        if self._not_done is not None and not engine.ended:  # the caller was told, the path went back
            return f"{self._not_done}; the caller was told, and the call is back at step {engine.node.id!r}", False
        return move.result, move.model_speaks

    async def _words_for(self, way: object) -> None:
        """Before a move to a knowledge node, wait for the transcript of the caller's latest turn, if still on its
        way (at most TRANSCRIPT_WAIT_S; then the node searches with nothing and says its fallback)."""
        engine = self._path.engine
        target = next((candidate.target for candidate in engine.ways() if candidate.key == way), None)
        if target is None or not isinstance(engine.path.nodes[target].data, KnowledgeData) or self._turn is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._turn[1]), TRANSCRIPT_WAIT_S)

    async def key(self, digit: str) -> bool | None:
        """A key the caller pressed: None when the path leaves it to the model; else the path (a gather node) took
        it, and whether the model should now speak (the digits are complete and the next node asks it to)."""
        return await self._press(f"[DTMF {digit}]")

    async def keys_timed_out(self) -> bool:
        """The gather node's wait for a key ran out (the engine was told): complete it with the digits so far, or
        say its text again; whether the model should now speak."""
        return await self._press("") is True

    async def _press(self, heard: str) -> bool | None:
        engine = self._path.engine
        steps = len(engine.steps)
        pressed = await engine.press(heard)
        if pressed is None:
            return None
        if len(engine.steps) == steps:
            await self._act(pressed, say_text=True)  # the node's text again, after a wait that ran out
            return False  # more digits are awaited
        await self._act(pressed, say_text=True)
        await self._refresh()
        return self._path.model_speaks_at(pressed)

    async def _act(self, events: Sequence[LLMEvent], *, say_text: bool) -> str:
        """Do what arriving at a node does, in order; the words said (or, with `say_text` False, to be said)."""
        words: list[str] = []
        for event in events:
            match event:
                case TextDelta(text=text):
                    words.append(text.strip())
                case SendDtmf(digits=digits):
                    await self._flush(words, say_text)
                    self.press_keys(digits)
                case EndCall():
                    await self._flush(words, say_text=True)
                    await self._host.hang_up(*end_call_reason(event))
                case TransferCall(to=to, reason=reason):
                    await self._flush(words, say_text=True)
                    made = await self._host.transfer(to, reason)  # the call checks the agent's rules too
                    if not made:
                        self._not_done = transfer_not_done(to, made)
                        await self._transfer_not_made(unconfirmed=made is None)
        await self._flush(words, say_text)
        return " ".join(word for word in words if word)

    async def _transfer_not_made(self, *, unconfirmed: bool) -> None:
        """The transfer node's transfer was not made (or Twilio did not confirm it): tell the caller; the path goes
        back, or is over."""
        after = transfer_not_made(self._host.config, self._path.engine, unconfirmed=unconfirmed)
        await self._say(after.words)
        if after.ends_call:
            await self._host.hang_up(EndReason.PATH_END, None)

    async def _flush(self, words: list[str], say_text: bool) -> None:
        if not say_text:
            return  # the opening's words are said by the driver, with its first sentence
        text = " ".join(word for word in words if word)
        words.clear()
        if text:
            await self._say(text)


def offered(path: RealtimePath | None, specs: Sequence[FunctionSpec]) -> list[FunctionSpec]:
    """The functions a Realtime session offers: `specs`, and the path's `follow_path` when there is a way on."""
    return path.functions(specs) if path is not None else list(specs)
