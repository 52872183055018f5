"""bench/cpu_sampler.py: a module run under it leaves folded stacks whose samples fall where it spends its CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BUSY_MODULE = """\
import time


def spin(seconds):
    end = time.process_time() + seconds
    total = 0
    while time.process_time() < end:
        total += sum(range(200))
    return total


def nap(seconds):
    time.sleep(seconds)


if __name__ == "__main__":
    nap(0.3)
    spin(0.4)
    raise SystemExit(0)
"""


def test_samples_fall_in_the_code_that_spends_the_cpu_and_not_in_sleep(tmp_path: Path) -> None:
    (tmp_path / "busy_for_sampler.py").write_text(BUSY_MODULE)
    out = tmp_path / "busy.folded"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-m", "bench.cpu_sampler", str(out), "-m", "busy_for_sampler"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "samples over" in result.stderr
    stacks = [line.rsplit(" ", 1) for line in out.read_text().splitlines()]
    counts = {stack: int(count) for stack, count in stacks}
    total = sum(counts.values())
    in_spin = sum(count for stack, count in counts.items() if stack.endswith("__main__:spin"))
    in_nap = sum(count for stack, count in counts.items() if "__main__:nap" in stack)
    assert total >= 10  # 0.4 CPU-s at one sample a ms, coarsened by the kernel's ticks (at most 4 ms here)
    assert in_spin / total > 0.6
    assert in_nap == 0  # a sleep spends no CPU: ITIMER_PROF does not run
    assert all(stack.startswith("runpy:") for stack in counts)  # whole stacks, outermost first
