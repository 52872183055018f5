"""The calls this process is running right now: for listing, controlling, and ending them at shutdown."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from engine.call.audio_tap import AudioTap
from pipelines.conversation.transfer_rules import AllowedTransfer, Refusal
from pipelines.llm.base import MessageRole
from storage.end_reasons import EndReason

log = logging.getLogger(__name__)


class LiveCall(Protocol):
    """What the registry needs of a running call session."""

    tap: AudioTap
    """The call's audio for listeners."""

    def end_from_outside(self, reason: EndReason, *, completed: bool = False) -> None:
        """End the call for a reason outside it (COMPLETED if `completed`, else FAILED)."""
        ...

    @property
    def transfer_unsettled(self) -> bool:
        """Whether a transfer request of the call waits for Twilio's answer, or went unanswered."""
        ...

    async def hang_up(self, reason: EndReason, detail: str | None = None) -> None:
        """End the call from our side, never cutting the caller off from a transfer Twilio made."""
        ...

    def call_log_deleted(self) -> None:
        """The call's CallLog was deleted while it ran: hang it up (through Twilio when the engine can)."""
        ...

    def cut_off(self, detail: str, *, hang_up_in: float) -> bool:
        """The engine lost its database for so long that the other nodes may soon take the call for lost: say goodbye
        and hang up within `hang_up_in` seconds (FAILED, ENGINE_LOST); False if it is ending already."""
        ...

    def end_when_twilio_stops(self, reason: EndReason) -> None:
        """Stop speaking now; end with `reason` when Twilio's `stop` comes (it was redirected elsewhere)."""
        ...

    async def say_line(self, text: str, *, interrupt: bool) -> bool:
        """Have the agent say `text`, cutting what it says (True when something was cut) or after it."""
        ...

    async def add_message(self, content: str, role: MessageRole) -> None:
        """Add a message to the model's context for its next reply."""
        ...

    async def transfer_from_outside(self, to: str, detail: str) -> AllowedTransfer | Refusal:
        """Hand the caller to `to` if the agent's transfer rules allow it."""
        ...


class LiveCalls:
    """Running sessions by CallLog id, and the tasks that run them."""

    def __init__(self) -> None:
        """An empty registry."""
        self._sessions: dict[str, LiveCall] = {}
        self._taken: set[str] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._none_held = asyncio.Event()
        self._none_held.set()
        self._ending: EndReason | None = None  # set by `end_all`: a session registered after it ends at once

    def __len__(self) -> int:
        """How many calls are running."""
        return len(self._sessions)

    def __contains__(self, call_log_id: object) -> bool:
        """Whether that call runs here."""
        return call_log_id in self._sessions

    def get(self, call_log_id: str) -> LiveCall | None:
        """The session running that call here, or None."""
        return self._sessions.get(call_log_id)

    def running(self) -> list[str]:
        """The CallLog ids of the calls running here (their sessions registered)."""
        return list(self._sessions)

    def take(self, call_log_id: str) -> None:
        """Note a call whose media stream this process has taken (`call_logs.claim_stream`) and is setting up.

        Until `add` registers its session, the call is `starting` here: the node the CallLog names, without a session
        to command yet. `remove` forgets it. The current task is the one that sets it up and runs it.
        """
        self._taken.add(call_log_id)
        self._none_held.clear()
        self._track(asyncio.current_task())

    def starting(self, call_log_id: str) -> bool:
        """Whether this process has taken that call's stream and is still setting its session up."""
        return call_log_id in self._taken and call_log_id not in self._sessions

    def add(self, call_log_id: str, session: LiveCall) -> None:
        """Register a running call; the current task is the one that runs it.

        Once `end_all` has run, the session is ended as it is registered: its setup outlasted the engine's.
        """
        self._sessions[call_log_id] = session
        self._none_held.clear()
        self._track(asyncio.current_task())
        if self._ending is not None:
            session.end_from_outside(self._ending)

    def _track(self, task: asyncio.Task[object] | None) -> None:
        if task is not None and task not in self._tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def remove(self, call_log_id: str) -> None:
        """Forget a call that has finished, or whose stream gave it up before its session ran."""
        self._sessions.pop(call_log_id, None)
        self._taken.discard(call_log_id)
        if not self._sessions and not self._taken:
            self._none_held.set()

    @property
    def held(self) -> int:
        """How many calls this process holds: running, or with their stream taken and their session starting."""
        return len(self._taken | self._sessions.keys())

    async def wait_until_none_held(self) -> None:
        """Return once this process holds no call (at once if it holds none)."""
        await self._none_held.wait()

    async def end_all(self, reason: EndReason, *, timeout: float = 30.0) -> None:
        """End every running call, and every call still being set up as soon as its session is registered, and wait
        (bounded) until their CallLogs are finished."""
        self._ending = reason
        tasks = [t for t in self._tasks if not t.done()]
        if not tasks:
            return
        log.info("ending %d call(s) held: %s", len(tasks), reason)
        for session in list(self._sessions.values()):
            session.end_from_outside(reason)
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            log.error("%d call(s) did not finish within %.0f s of shutdown", len(pending), timeout)
