"""Whether an engine process of this host is gone: its PID is free, a zombie, or reused by a younger process.

Linux says when each process started (`/proc/<pid>/stat`); elsewhere only whether the PID is taken is known, and a
taken PID counts as the engine still running, so a live engine is never judged gone.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

PROC = Path("/proc")

# /proc gives the boot time to the second and start times in clock ticks; the registration comes after the start.
START_SLACK = timedelta(seconds=2)


def process_is_gone(pid: int, *, registered_at: datetime, proc: Path = PROC) -> bool:
    """Whether the process that registered with `pid` at `registered_at` has exited.

    A live process with that PID that started after the registration is another program that got the PID later.
    """
    if not (proc / "stat").is_file():
        return not _pid_taken(pid)
    started = _started_at(pid, proc)
    return started is None or started > registered_at + START_SLACK


def _pid_taken(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process holds it
    return True


def _started_at(pid: int, proc: Path) -> datetime | None:
    """When the process started, from /proc; None if there is no such process or it is a zombie."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start_ticks = fields[0], int(fields[19])
    if state in ("Z", "X"):
        return None
    boot = _boot_time(proc)
    return boot + timedelta(seconds=start_ticks / os.sysconf("SC_CLK_TCK"))


def _boot_time(proc: Path) -> datetime:
    for line in (proc / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return datetime.fromtimestamp(int(line.split()[1]), UTC)
    raise RuntimeError(f"{proc / 'stat'} has no btime line")
