"""How long cutting a large text into passages holds the calls' event loop: in a thread of the engine, and as the
ingestion worker does it (`text_passages`: a child process past `IN_THREAD_MAX`).

For texts of about 10 MB in several shapes (one paragraph with no sentence end, sentences, short lines, blank-line
paragraphs), a 2 ms timer runs on the loop while the text is cut, and the benchmark prints how late it fired at
worst and at the 99th percentile, with the cut's wall time. A late timer is a loop that could not run: every
call's audio on the process waits that long. Asserts nothing.

Usage: python -m bench.bench_passage_stall [--mb 10]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from functools import partial

from engine.knowledge.chunking import split_into_chunks
from engine.knowledge.extract_process import ExtractLimits, PassageSizes, text_passages

_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")
_TICK = 0.002
_SIZES = PassageSizes(1000, 150)


def _shapes(mb: float) -> dict[str, str]:
    words = int(mb * 1e6 / 6)
    pick = random.Random(1).choice
    return {
        "one paragraph": " ".join(pick(_WORDS) for _ in range(words)),
        "sentences": " ".join(pick(_WORDS) + ("." if n % 15 == 0 else "") for n in range(words)),
        "short lines": "\n".join(" ".join(pick(_WORDS) for _ in range(12)) for _ in range(words // 12)),
        "blank-line paragraphs": "\n\n".join(" ".join(pick(_WORDS) for _ in range(40)) for _ in range(words // 40)),
    }


async def _lateness(cut: Callable[[], Awaitable[list[str]]]) -> tuple[list[float], float, int]:
    late: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(_TICK)
            now = time.perf_counter()
            late.append(now - last - _TICK)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    chunks = await cut()
    took = time.perf_counter() - start
    ticker.cancel()
    return sorted(late), took, len(chunks)


async def _main(mb: float) -> None:
    limits = ExtractLimits()
    print(f"{'text':22} {'cut':22} {'passages':>8} {'wall s':>7} {'loop late: max ms':>18} {'p99 ms':>7}")
    for name, text in _shapes(mb).items():
        ways: dict[str, Callable[[], Awaitable[list[str]]]] = {
            "in a thread (before)": partial(asyncio.to_thread, split_into_chunks, text, size=1000, overlap=150),
            "text_passages": partial(text_passages, text, sizes=_SIZES, limits=limits),
        }
        for way, cut in ways.items():
            late, took, count = await _lateness(cut)
            p99 = late[int(len(late) * 0.99)] if late else 0.0
            print(f"{name:22} {way:22} {count:8} {took:7.2f} {late[-1] * 1000:18.1f} {p99 * 1000:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=10.0, help="size of each text in MB (default 10)")
    asyncio.run(_main(parser.parse_args().mb))


if __name__ == "__main__":
    main()
