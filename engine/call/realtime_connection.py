"""A call's connection to OpenAI Realtime: opened and configured, fed the caller's audio in batches, and reopened
when it drops (a few times a minute at most), with the conversation so far replayed as text; past that, or if
reopening fails, the call is handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from openai import AsyncOpenAI

from config.agent import OpenAIRealtimeConfig
from engine.call.driver import CallHost
from engine.call.phases import CallPhase
from engine.server import metrics
from pipelines.realtime.openai_realtime import (
    RealtimeChannel,
    RealtimeConnectionLost,
    RealtimeUnavailable,
    open_realtime,
    session_update,
)
from pipelines.tools import FunctionSpec
from storage.end_reasons import EndReason

log = logging.getLogger(__name__)

RECONNECTS_PER_WINDOW: Final = 2
"""How many times a lost session is reopened (with the conversation replayed) within `RECONNECT_WINDOW_SECONDS`;
one lost once more within the window hands the call over. A budget per call would let one failed response early
on send a drop half an hour later straight to the fallback; a budget per window still stops a model that fails
every response after a few seconds of the caller waiting."""
RECONNECT_WINDOW_SECONDS: Final = 60.0
"""The sliding window `RECONNECTS_PER_WINDOW` counts over."""


class RealtimeConnection:
    """The model's session for one call: its channel, the caller audio on its way to it, and its reconnects."""

    def __init__(
        self,
        host: CallHost,
        *,
        client: AsyncOpenAI,
        realtime: OpenAIRealtimeConfig,
        instructions: Callable[[], str],
        functions: Callable[[], list[FunctionSpec]],
        on_lost: Callable[[], Awaitable[None]],
        on_reopened: Callable[[RealtimeChannel], Awaitable[None]],
    ) -> None:
        """Connect `host`'s call through `client`, with `instructions()` and offering the model `functions()`.

        `on_lost()` cuts the agent off once the connection dropped (the driver's tasks are cancelled by then);
        `on_reopened(channel)` resumes the conversation on the new one.
        """
        self._host = host
        self._client = client
        self._realtime = realtime
        self._instructions = instructions
        self._functions = functions
        self._on_lost = on_lost
        self._on_reopened = on_reopened
        self.channel: RealtimeChannel | None = None
        """The open channel to the model; None before it opens and while it is being reopened."""
        self.holding_replies = False
        """The model was told not to answer by itself (awaiting a callee's hello)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._reconnected_at: deque[float] = deque()  # clock times of the reconnects within the window
        self._reconnecting: asyncio.Task[None] | None = None
        self._audio_out = bytearray()  # caller audio the sender has yet to send
        self._audio_ready = asyncio.Event()

    def spawn(self, work: Coroutine[Any, Any, None], role: str) -> asyncio.Task[None]:
        """Run part of the driver's work as a task of the call; losing the connection reopens it, not a crash."""
        task = self._host.spawn(self._guarded(work), role)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def spawn_lasting(self, work: Coroutine[Any, Any, None], role: str) -> asyncio.Task[None]:
        """Like `spawn`, for work a lost connection must not stop: an ending under way (the goodbye cut off by the
        drop, the call must still be hung up or transferred), which only the call's own end cancels."""
        return self._host.spawn(self._guarded(work), role)

    async def stop_tasks(self) -> None:
        """Cancel the driver's tasks and wait until they ended; a connection lost from now on stays lost."""
        self._closed = True
        while pending := [task for task in self._tasks if not task.done()]:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def open(self) -> RealtimeChannel:
        """Connect and configure the model's session (RealtimeUnavailable or RealtimeConnectionLost if it fails,
        RealtimeSessionRefused if the server refused the configuration)."""
        self.channel = await self._connect()
        return self.channel

    def start_sender(self) -> None:
        """Start the task that sends the caller's audio to the model as it piles up."""
        self.spawn(self._send_audio(), "realtime-audio")

    def send_audio(self, payload: bytes) -> None:
        """Queue caller audio for the model (the sender batches what piles up)."""
        self._audio_out += payload
        self._audio_ready.set()

    async def refresh(self) -> None:
        """Send the session's instructions and functions again (they changed, e.g. the path moved)."""
        if self.channel is not None:
            await self.channel.update_session(self._session_update(voice=False))

    async def release_replies(self, channel: RealtimeChannel) -> None:
        """Let the model answer the caller by itself from now on, if it was told not to."""
        if self.holding_replies:
            await channel.update_session(self._session_update(voice=False))

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a task of the driver; a lost connection leads to a reconnect (or a hand-over), not a crash."""
        try:
            await work
        except RealtimeConnectionLost as exc:
            self._lost(exc)

    def _lost(self, exc: RealtimeConnectionLost) -> None:
        """The connection dropped: reopen it in the background (unless that is under way or the call ended)."""
        if self._closed or self._reconnecting is not None or self._host.phase is CallPhase.ENDED:
            return
        log.warning("call %s: the Realtime session was lost: %s", self._host.context.call_sid, exc)
        metrics.PROVIDER_ERRORS.labels("realtime", self._realtime.provider).inc()
        self._reconnecting = self._host.spawn(self._reconnect(str(exc)), "realtime-reconnect")

    async def close(self) -> None:
        """Close the connection; its errors are logged, never raised."""
        if self.channel is not None:
            try:
                await self.channel.close()
            except Exception:  # a connection failing to close must not stop the CallLog being finished
                log.exception("call %s: closing the Realtime connection failed", self._host.context.call_sid)

    async def _connect(self, *, replay: bool = False) -> RealtimeChannel:
        """Open and configure a session (replaying the conversation so far as text, if asked); closed again if that
        fails or the call ends meanwhile, so that no session outlives its call."""
        channel = await open_realtime(self._client, self._realtime.model)
        try:
            await channel.configure(self._session_update())
            if replay:
                for speaker, text in self._host.turns.heard:
                    await channel.send_history(speaker, text)
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        return channel

    def _session_update(self, *, voice: bool = True) -> dict[str, Any]:
        # While a callee may still say hello, the engine decides when the model speaks.
        self.holding_replies = self._host.phase is CallPhase.AWAITING_GREETING
        return session_update(
            self._realtime,
            instructions=self._instructions(),
            tools=self._functions(),
            interrupt_response=False,  # barge-in is the engine's (on_caller_audio), by the agent's threshold
            create_response=not self.holding_replies,
            voice=voice,
        )

    async def _reconnect(self, why: str) -> None:
        """Reopen the model's session, replaying the conversation so far, unless the window's budget is spent (or
        reopening fails): then hand the call over."""
        lost = self.channel
        self.channel = None
        for task in [task for task in self._tasks if not task.done() and task is not asyncio.current_task()]:
            task.cancel()
        await self._on_lost()
        if lost is not None:
            with contextlib.suppress(Exception):
                await lost.close()
        channel: RealtimeChannel | None = None
        now = self._host.clock()
        recent = self._reconnected_at
        while recent and recent[0] <= now - RECONNECT_WINDOW_SECONDS:
            recent.popleft()
        if len(recent) < RECONNECTS_PER_WINDOW:
            recent.append(now)
            try:
                channel = await self._connect(replay=True)
            except (RealtimeUnavailable, RealtimeConnectionLost) as exc:
                why = f"{why}; reconnecting failed: {exc}"
                channel = None
        else:
            why = f"{why}; lost {len(recent) + 1} times within {RECONNECT_WINDOW_SECONDS:g} s"
        if channel is None:
            self._reconnecting = None
            await self._host.hand_over(EndReason.REALTIME_FAILED, why)
            return
        log.info("call %s: the Realtime session was reopened", self._host.context.call_sid)
        self.channel = channel
        self.start_sender()
        self._reconnecting = None
        await self._on_reopened(channel)

    async def _send_audio(self) -> None:
        """Send the caller's audio as it piles up: one message per wake-up, however many frames came."""
        while True:
            await self._audio_ready.wait()
            self._audio_ready.clear()
            channel = self.channel
            if channel is None or not self._audio_out:
                continue
            chunk = bytes(self._audio_out)
            self._audio_out.clear()
            await channel.append_audio(chunk)
