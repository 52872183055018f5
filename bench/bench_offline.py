"""Offline recognition under concurrent calls: event-loop stalls and per-turn latency, decodes on threads vs processes.

First the added latency of one short utterance: its decode here, then through a worker process. Then N calls
each stream, in real time, a short turn, a long one (about 18 s without a pause) and another short one to its
own PocketSphinx recognizer, all on this process's event loop. bench/stall_watch.py records the loop's stalls
(late timers, long callbacks); each end of turn is timed from the moment the caller's end-of-turn silence was
complete. "threads" decodes on one in-process thread, as the engine did before its offline workers (the
decoder holds the interpreter lock); "processes" decodes on OfflineWorkers. Prints figures; asserts nothing.

Usage: python bench/bench_offline.py [concurrent calls ...]   (default: 1 2 4)
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from bench.stall_watch import StallWatch, overlapping
from media.framing import FrameSplitter
from media.g711 import ULAW_SILENCE, pcm16_to_ulaw
from pipelines.offline_workers import OfflineWork, OfflineWorkers
from pipelines.stt.base import EndOfTurn
from pipelines.stt.sphinx import SphinxSTT, recognize_utterance, vocabulary_key
from pipelines.tts.espeak import speak_pcm

R = TypeVar("R")
END_SILENCE_MS = 700
SHORT = "tuesday please"
LONG = " ".join(["i would like to book an appointment for next tuesday morning at ten my name is alex"] * 4)
KEYPHRASES = ("book an appointment", "tuesday")
WORKERS = 2


class ThreadWork:
    """Decodes on one thread of this process: the engine's way before offline workers."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sphinx")

    async def run(self, job: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(job, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown()


def frames_of(text: str) -> list[bytes]:
    audio = speak_pcm(text, sample_rate=8000)
    splitter = FrameSplitter()
    frames = splitter.push(pcm16_to_ulaw(audio.samples))
    tail = splitter.flush()
    return frames + ([tail] if tail else [])


def silence(ms: int) -> list[bytes]:
    return [bytes([ULAW_SILENCE]) * 160] * (ms // 20)


async def one_call(work: OfflineWork, script: list[bytes], delay_s: float) -> list[tuple[int, float]]:
    """Stream `script` in real time; (audio ms of the turn, latency s) for each end of turn."""
    await asyncio.sleep(delay_s)
    stt = SphinxSTT(work=work, keyphrases=KEYPHRASES, end_silence_ms=END_SILENCE_MS)
    await stt.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    turns: list[tuple[int, float]] = []
    last_end = 0

    async def read() -> None:
        nonlocal last_end
        async for event in stt.events():
            if isinstance(event, EndOfTurn):
                # The turn could end no sooner than END_SILENCE_MS of silence after its speech.
                due = started + (event.at_ms + END_SILENCE_MS) / 1000
                turns.append((event.at_ms - last_end, loop.time() - due))
                last_end = event.at_ms

    reader = asyncio.create_task(read())
    for index, frame in enumerate(script):
        stt.send_audio(frame)
        await asyncio.sleep(max(0.0, started + (index + 1) * 0.02 - loop.time()))
    await stt.close()
    await reader
    return turns


async def run(
    work: OfflineWork, calls: int, script: list[bytes], watch: StallWatch
) -> tuple[float, list[float], list[float]]:
    """The longest loop stall (s) while `calls` calls run, and their short and long turns' latencies (s)."""
    since = time.time()
    results = await asyncio.gather(*(one_call(work, script, 0.25 * n) for n in range(calls)))
    stalls = [ms for kind, _, ms, _ in overlapping(watch.events, since, time.time()) if kind in ("slow", "late")]
    short = [latency for turns in results for ms, latency in turns if ms < 5000]
    long = [latency for turns in results for ms, latency in turns if ms >= 5000]
    return max(stalls, default=0.0) / 1000, short, long


async def added_latency(workers: OfflineWorkers, repeats: int = 20) -> tuple[float, float]:
    """Median seconds to decode one short utterance here on the loop, and through a worker process."""
    audio = speak_pcm(SHORT, sample_rate=8000).samples
    key = vocabulary_key(KEYPHRASES)
    inline, remote = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        recognize_utterance(audio, key)
        inline.append(time.perf_counter() - started)
        started = time.perf_counter()
        await workers.run(recognize_utterance, audio, key)
        remote.append(time.perf_counter() - started)
    return statistics.median(inline), statistics.median(remote)


def ms(values: list[float], pick: Callable[[list[float]], float]) -> str:
    return f"{pick(values) * 1000:7.0f}" if values else "      -"


async def main(counts: list[int]) -> None:
    script = silence(500) + frames_of(SHORT) + silence(1200) + frames_of(LONG) + silence(1200)
    script += frames_of(SHORT) + silence(1500)
    header = f"{'decodes on':<22} {'calls':>5} {'stall max':>10} {'short p50':>10} {'short max':>10} {'long max':>9}"
    watch = StallWatch(threshold_ms=5.0)
    watch.watch_loop()
    threads = ThreadWork()
    async with OfflineWorkers(WORKERS) as processes:
        inline, remote = await added_latency(processes)
        print(
            f"one short utterance ({SHORT!r}): decoded here {inline * 1000:.1f} ms, through a worker "
            f"{remote * 1000:.1f} ms (median of 20)"
        )
        print(header + "  (ms)")
        for calls in counts:
            for name, work in (("threads (before)", threads), (f"{WORKERS} processes (after)", processes)):
                stall, short, long = await run(work, calls, script, watch)
                print(
                    f"{name:<22} {calls:>5} {stall * 1000:>10.0f} {ms(short, statistics.median):>10} "
                    f"{ms(short, max):>10} {ms(long, max):>9}"
                )
    threads.close()


if __name__ == "__main__":
    asyncio.run(main([int(arg) for arg in sys.argv[1:]] or [1, 2, 4]))
