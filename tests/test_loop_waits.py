"""The per-chunk waits that keep their loop: same behaviour as asyncio's Event, Queue and sleep, one loop lookup."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pipelines.loop_waits import LoopSleep, SingleWaiterQueue, Wakeup


@pytest.fixture
def loop_lookups(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many times `asyncio.get_running_loop()` has been asked since the test began."""
    calls = 0
    real = asyncio.get_running_loop

    def counting() -> asyncio.AbstractEventLoop:
        nonlocal calls
        calls += 1
        return real()

    monkeypatch.setattr(asyncio, "get_running_loop", counting)
    return lambda: calls


async def test_a_wakeup_set_before_the_wait_returns_at_once_and_stays_set_until_cleared() -> None:
    wakeup = Wakeup()
    wakeup.set()
    await asyncio.wait_for(wakeup.wait(), timeout=1)
    assert wakeup.is_set()
    wakeup.clear()
    assert not wakeup.is_set()


async def test_a_wakeup_wakes_its_waiting_task_each_time_it_is_set(loop_lookups: Callable[[], int]) -> None:
    wakeup = Wakeup()
    woken = 0

    async def waiter() -> None:
        nonlocal woken
        for _ in range(3):
            await wakeup.wait()
            wakeup.clear()
            woken += 1

    task = asyncio.create_task(waiter())
    for expected in (1, 2, 3):
        await asyncio.sleep(0)
        assert woken == expected - 1
        wakeup.set()
        await asyncio.sleep(0)
        assert woken == expected
    await task
    assert loop_lookups() == 1  # the first wait's only


async def test_a_wakeup_has_one_waiter_at_a_time_and_survives_a_cancelled_wait() -> None:
    wakeup = Wakeup()
    first = asyncio.create_task(wakeup.wait())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already awaited"):
        await wakeup.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    again = asyncio.create_task(wakeup.wait())
    await asyncio.sleep(0)
    wakeup.set()
    await asyncio.wait_for(again, timeout=1)


async def test_a_single_waiter_queue_hands_items_over_in_order(loop_lookups: Callable[[], int]) -> None:
    queue: SingleWaiterQueue[int] = SingleWaiterQueue()
    queue.put_nowait(1)
    assert not queue.empty()
    assert await queue.get() == 1
    assert queue.empty()
    reader = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not reader.done()
    queue.put_nowait(2)
    queue.put_nowait(3)
    assert await reader == 2
    assert await queue.get() == 3
    for item in (4, 5):
        waiting = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        queue.put_nowait(item)
        assert await waiting == item
    assert loop_lookups() == 1


async def test_a_loop_sleep_waits_its_delay_and_cancels_cleanly(loop_lookups: Callable[[], int]) -> None:
    sleep = LoopSleep()
    loop = asyncio.get_event_loop()
    for _ in range(3):
        started = loop.time()
        await sleep(0.02)
        assert loop.time() - started >= 0.019  # timers may fire up to the clock's resolution early
    await sleep(0)  # a bare yield
    await sleep(-1)
    sleeping = asyncio.create_task(sleep(60))
    await asyncio.sleep(0)
    sleeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeping
    assert loop_lookups() == 1
