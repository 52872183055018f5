"""Run a Python module sampling its stack every few milliseconds of the process's CPU time, into folded stacks.

    python -m bench.cpu_sampler OUT.folded [--interval-ms 1] -m engine.server.cli serve ...

cProfile charges every Python call a cost of its own, so it inflates code of many small calls, and it runs on the
wall clock; py-spy samples the wall clock, idle loop included. This samples CPU time instead: `ITIMER_PROF` counts
the process's user and system time and raises SIGPROF every `--interval-ms` of it, and the handler counts the Python
stack it interrupts. Time in C (the event loop, the kernel) is charged to the Python frame that runs next, which
for a socket read is the protocol callback it feeds. Each sample costs the handler about 20 µs, so at the default
millisecond the figures include about 2% of their own; the kernel's timer ticks (often 4 ms) coarsen the interval,
which only lowers that share. What the sampler itself keeps can trigger garbage collections the module alone would
not run, charged to whatever Python code follows them (a `gc.callbacks` hook, if any). Only the main thread's stack is
seen (CPU of other threads is charged to it). The file is written when the module returns or raises SystemExit
(SIGTERM through the engine's own shutdown). Read shares, not seconds.
"""

from __future__ import annotations

import argparse
import collections
import resource
import runpy
import signal
import sys
from pathlib import Path
from types import FrameType


def _frame_name(frame: FrameType) -> str:
    code = frame.f_code
    module = frame.f_globals.get("__name__", "?")
    return f"{module}:{code.co_qualname}"


class CpuSampler:
    """Counts the stacks SIGPROF interrupts."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
        self._names: dict[object, str] = {}

    def start(self) -> None:
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_DFL)

    def _sample(self, _signum: int, frame: FrameType | None) -> None:
        names = self._names
        stack: list[str] = []
        while frame is not None:
            code = frame.f_code
            name = names.get(code)
            if name is None:
                name = names[code] = _frame_name(frame)
            stack.append(name)
            frame = frame.f_back
        stack.reverse()
        self.stacks[tuple(stack)] += 1

    def write(self, path: Path) -> None:
        with path.open("w") as out:
            for stack, count in self.stacks.most_common():
                out.write(f"{';'.join(stack)} {count}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a Python module, sampling its stack every few ms of CPU time.")
    parser.add_argument("out", type=Path, help="folded stacks, one 'a;b;c count' line per stack")
    parser.add_argument("--interval-ms", type=float, default=1.0, help="CPU time between samples")
    parser.add_argument("-m", dest="module", required=True, help="the module to run, then its arguments")
    args, rest = parser.parse_known_args()
    sampler = CpuSampler(args.interval_ms / 1000)
    sys.argv = [args.module, *rest]
    sampler.start()
    try:
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        sampler.stop()
        sampler.write(args.out)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        samples = sum(sampler.stacks.values())
        cpu = usage.ru_utime + usage.ru_stime
        print(f"cpu_sampler: {samples} samples over {cpu:.2f} CPU-s in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
