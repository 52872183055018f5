"""Two engines' CPU over the same whole calls, measured side by side: this checkout against another, at once.

    python -m bench.bench_cloud_ab --against ../other-checkout [--rounds 3] [--calls 100] [-- bench_cloud args]
    python -m bench.bench_cloud_ab --against . --against-python ../venv-3.12/bin/python   # two interpreters

The shared machine's speed drifts by a quarter between minutes, far more than the change a cut of a few percent
makes, so rounds of `bench.bench_cloud` taken one after the other cannot tell such a cut apart. Here both
checkouts run their own `bench.bench_cloud` round at the same moment: two engines pinned to the same CPU, two
harnesses to the other, each with its own fakes and embedded database. Whatever the machine does, it does to
both, and the ratio of their engine CPU seconds holds still (two rounds of one engine against itself: 8.71 against
8.70 and 8.53 against 8.53 CPU-s). Latency is not comparable with single runs (the engines share one core): the
voice-to-voice figures are printed only to show that every turn was answered.

Each checkout must hold this repository (its own `bench/bench_cloud.py` runs its own engine); the same virtual
environment serves both. Prints each round and the median ratio (this checkout / the other); asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent


async def _round(checkout: Path, python: str, out: Path, calls: int, extra: list[str]) -> str:
    """Run one `bench.bench_cloud` round of `calls` whole calls in `checkout` with `python`, results into `out`;
    its output."""
    command = [python, "-m", "bench.bench_cloud", "--calls", str(calls), "--out", str(out), *extra]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=checkout, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        tail = output.decode(errors="replace")[-2000:]
        raise RuntimeError(f"bench.bench_cloud in {checkout} failed (exit {process.returncode}):\n{tail}")
    return output.decode(errors="replace")


def _result(out: Path) -> dict[str, Any]:
    """The last round of the newest JSON result in `out`."""
    results = sorted(out.glob("cloud-*.json"))
    if not results:
        raise RuntimeError(f"bench.bench_cloud wrote no result into {out}")
    rounds: list[dict[str, Any]] = json.loads(results[-1].read_text())["rounds"]
    return rounds[-1]


def _describe(label: str, result: dict[str, Any]) -> str:
    v2v = result["voiceToVoiceMs"]
    return (
        f"{label:>7}: {result['engineCpuSeconds']:6.2f} engine CPU-s over {result['callMinutes']:.1f} call-min "
        f"({result['engineCpuPerCallMinute']:.3f} per call-min), {result['answered']}/{result['asked']} turns, "
        f"voice-to-voice p50 {v2v['p50']:.0f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, required=True, help="the other checkout of this repository")
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side rounds (default 3)")
    parser.add_argument("--calls", type=int, default=100, help="concurrent calls per engine (default 100)")
    parser.add_argument("--against-python", default=sys.executable, help="the other side's Python (default: this one)")
    parser.add_argument("extra", nargs="*", help="after --: further bench.bench_cloud arguments for both")
    args = parser.parse_args()
    other = args.against.resolve()
    if not (other / "bench" / "bench_cloud.py").is_file():
        parser.error(f"{other} is not a checkout of this repository (no bench/bench_cloud.py)")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="dialtone-ab-") as folder:
        for index in range(1, args.rounds + 1):
            outs = Path(folder) / f"this-{index}", Path(folder) / f"other-{index}"
            for out in outs:
                out.mkdir()
            await asyncio.gather(
                _round(HERE, sys.executable, outs[0], args.calls, args.extra),
                _round(other, args.against_python, outs[1], args.calls, args.extra),
            )
            ours, theirs = _result(outs[0]), _result(outs[1])
            ratio = ours["engineCpuSeconds"] / theirs["engineCpuSeconds"]
            ratios.append(ratio)
            print(f"round {index} ({args.calls} calls each, at once): this / other engine CPU = {ratio:.3f}")
            print(_describe("this", ours))
            print(_describe("other", theirs), flush=True)
    against = other if args.against_python == sys.executable else f"{other} on {args.against_python}"
    print(f"median ratio over {len(ratios)} rounds: {statistics.median(ratios):.3f} (this checkout / {against})")


if __name__ == "__main__":
    asyncio.run(main())
