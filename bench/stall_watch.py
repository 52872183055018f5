"""Where a process's event loop stalled: garbage-collector pauses, callbacks that ran long and timers that fired late.

The cloud benchmark installs this in the engine (through a `sitecustomize` it puts first on the engine's
PYTHONPATH, so no engine code changes) and in its own process, then lines the events up against its slowest turns
to tell where a latency tail came from: a GC pause, one long callback (named by its task's coroutine), the loop
busy with many short ones (timers late with no long callback), or the process not running at all.

Only the standard library is imported: the engine loads this before anything of its own.
Watching callbacks wraps `asyncio.events.Handle._run`, which costs about a microsecond per callback; under uvloop
(the engine's loop), whose handles cannot be wrapped, a 2 ms timer records how late it fires instead. GC pauses
are always recorded (they cost nothing between collections).
"""

from __future__ import annotations

import asyncio.events
import atexit
import gc
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

Event = tuple[str, float, float, str]
"""(kind, wall-clock start in s, ms, label): kind is gc0/gc1/gc2, slow (a callback's run time) or late (a timer's
delay past its due time)."""

ENV_LOG = "BENCH_STALL_LOG"
"""Where the engine writes its events when it exits (set by the benchmark)."""
ENV_LOOP = "BENCH_STALL_LOOP"
"""'1': also watch the engine's callbacks and timers."""


class StallWatch:
    """Records this process's GC pauses and, once `watch_loop` is called, its loop's slow callbacks and late timers."""

    def __init__(self, threshold_ms: float = 5.0) -> None:
        """Callbacks and timer delays under `threshold_ms` are not recorded."""
        self.events: list[Event] = []
        self._threshold_s = threshold_ms / 1000
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: Mapping[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._gc_started) * 1000
        self.events.append((f"gc{info['generation']}", time.time() - ms / 1000, ms, ""))

    def watch_loop(self) -> None:
        """Wrap every asyncio callback (in every loop of this process) to time it and, for timers, its delay."""
        run = asyncio.events.Handle._run
        events, threshold = self.events, self._threshold_s
        monotonic, wall = time.monotonic, time.time

        def timed_run(handle: asyncio.events.Handle) -> None:
            started = monotonic()
            when = getattr(handle, "_when", None)  # TimerHandle: due on the loop clock, which is time.monotonic
            if when is not None and started - when >= threshold:
                events.append(("late", wall() - (started - when), (started - when) * 1000, _label(handle)))
            run(handle)
            took = monotonic() - started
            if took >= threshold:
                events.append(("slow", wall() - took, took * 1000, _label(handle)))

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]
        self._tick_uvloop()

    def _tick_uvloop(self, period_s: float = 0.002) -> None:
        """uvloop's handles are its own (Cython) and cannot be wrapped: give each new uvloop loop a timer that
        re-arms itself every `period_s` and records how late it fires (its loop's stalls, whatever their cause)."""
        try:
            import uvloop
        except ImportError:
            return
        make_loop, events, threshold, wall = uvloop.new_event_loop, self.events, self._threshold_s, time.time

        def new_event_loop() -> uvloop.Loop:
            loop = make_loop()

            def tick(due: float) -> None:
                late = loop.time() - due
                if late >= threshold:
                    events.append(("late", wall() - late, late * 1000, "uvloop tick"))
                due = max(due + period_s, loop.time())
                loop.call_at(due, tick, due)

            loop.call_soon(tick, loop.time())
            return loop

        uvloop.new_event_loop = new_event_loop

    def dump(self, path: str) -> None:
        """Write the events as JSON."""
        with open(path, "w") as out:
            json.dump(self.events, out)


def _label(handle: asyncio.events.Handle) -> str:
    """The callback's name; for a task's step, the task's coroutine and where it is suspended now."""
    callback: Callable[..., Any] | None = getattr(handle, "_callback", None)
    task = getattr(callback, "__self__", None)
    coro = task.get_coro() if isinstance(task, asyncio.Task) else None
    if coro is not None:
        frame = getattr(coro, "cr_frame", None)
        where = f" line {frame.f_lineno}" if frame is not None else ""
        return f"{getattr(coro, '__qualname__', type(coro).__name__)}{where}"
    return getattr(callback, "__qualname__", type(callback).__name__)


def install_from_env() -> StallWatch | None:
    """In the engine's `sitecustomize`: watch as the benchmark's environment says and dump at exit."""
    path = os.environ.get(ENV_LOG)
    if not path:
        return None
    watch = StallWatch()
    if os.environ.get(ENV_LOOP) == "1":
        watch.watch_loop()
    atexit.register(watch.dump, path)
    return watch


def read_events(path: str | os.PathLike[str]) -> list[Event]:
    """The events a process dumped, or none when it wrote nothing."""
    try:
        with open(path) as source:
            return [(str(k), float(at), float(ms), str(label)) for k, at, ms, label in json.load(source)]
    except (OSError, ValueError):
        return []


def gc_figures(events: list[Event], since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
    """Count, total and longest GC pause starting between two wall-clock instants, and how many were full ones."""
    pauses = [(kind, ms) for kind, at, ms, _ in events if kind.startswith("gc") and since <= at < until]
    return {
        "count": len(pauses),
        "full": sum(1 for kind, _ in pauses if kind == "gc2"),
        "totalMs": round(sum(ms for _, ms in pauses), 1),
        "maxMs": round(max((ms for _, ms in pauses), default=0.0), 1),
    }


def overlapping(events: list[Event], since: float, until: float) -> list[Event]:
    """The events whose span (start to start + ms) overlaps the wall-clock interval [since, until]."""
    return [e for e in events if e[1] <= until and e[1] + e[2] / 1000 >= since]
