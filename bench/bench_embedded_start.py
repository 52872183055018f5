"""Embedded PostgreSQL start-up: cold (initdb + start), warm (existing data), and migrating an empty database.

Each start runs in a fresh process, as `dialtone serve` would, and that process stops the server on exit.
Prints medians; asserts nothing. Usage: python bench/bench_embedded_start.py [runs]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = """
import asyncio, json, sys, time
from pathlib import Path
import asyncpg
from storage.embedded import start_embedded
from storage.migrate import migrate
from storage.pool import ensure_database

async def main() -> None:
    began = time.perf_counter()
    server = start_embedded(Path(sys.argv[1]))
    started = time.perf_counter() - began
    await ensure_database(server.url(), "dialtone")
    conn = await asyncpg.connect(server.url("dialtone"))
    t = time.perf_counter()
    applied = await migrate(conn)
    migrated = time.perf_counter() - t
    await conn.close()
    print(json.dumps({"start": started, "migrate": migrated, "applied": len(applied)}))

asyncio.run(main())
"""


def _run(state_dir: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(state_dir)], cwd=REPO, capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(runs: int = 5) -> None:
    cold, warm, migrate_empty = [], [], []
    with tempfile.TemporaryDirectory(prefix="dialtone-bench-") as tmp:
        for i in range(runs):
            state = Path(tmp) / f"state{i}"
            first = _run(state)
            cold.append(first["start"])
            migrate_empty.append(first["migrate"])
            warm.append(_run(state)["start"])
    print(f"embedded PostgreSQL, {runs} runs each (median, min-max):")
    for label, values in (
        ("cold start (initdb + start)", cold),
        ("warm start (existing data)", warm),
        ("migrate empty database", migrate_empty),
    ):
        ms = [v * 1000 for v in values]
        print(f"  {label:30s} {statistics.median(ms):8.0f} ms   ({min(ms):.0f}-{max(ms):.0f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
