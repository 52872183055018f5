"""Waits on the event loop that do not ask which loop is running each time.

In Python 3.11 every `asyncio.get_running_loop()` makes a `getpid` system call (the running loop is checked
against the process that set it), and `asyncio.Event.wait`, `asyncio.Queue.get` and `asyncio.sleep` each ask it
on every wait. A call's per-chunk waits (its recognizer's sender, its audio pacing, its CallLog writer) wait
thousands of times a second across a busy engine; these keep the loop of their first wait instead.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

__all__ = ["LoopSleep", "SingleWaiterQueue", "Wakeup"]

_T = TypeVar("_T")


def _running_loop(known: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
    return known if known is not None else asyncio.get_running_loop()


class Wakeup:
    """`asyncio.Event` for one waiting task at a time, bound to the loop of its first wait."""

    __slots__ = ("_flag", "_loop", "_waiter")

    def __init__(self) -> None:
        self._flag = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        """Set the flag and wake the waiting task, if any."""
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> None:
        """Return once the flag is set (at once if it is); one task at a time may wait."""
        if self._flag:
            return
        if self._waiter is not None:
            raise RuntimeError("Wakeup.wait() is already awaited by another task")
        loop = self._loop = _running_loop(self._loop)
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class SingleWaiterQueue(Generic[_T]):
    """An unbounded FIFO with one reader at a time (`asyncio.Queue`'s `put_nowait` and `get`), bound to the loop of
    its first wait."""

    __slots__ = ("_items", "_wakeup")

    def __init__(self) -> None:
        self._items: deque[_T] = deque()
        self._wakeup = Wakeup()

    def put_nowait(self, item: _T) -> None:
        self._items.append(item)
        self._wakeup.set()

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> _T:
        """The oldest item, waiting for one if there is none."""
        while not self._items:
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._items.popleft()


class LoopSleep:
    """`asyncio.sleep`, bound to the loop of its first sleep (one per task or object that sleeps often)."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, delay: float) -> None:
        loop = self._loop = _running_loop(self._loop)
        if delay <= 0:
            await asyncio.sleep(0)  # a bare yield: no future, no loop lookup
            return
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(delay, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
