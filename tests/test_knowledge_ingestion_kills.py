"""Knowledge ingestion of a `dialtone serve` killed mid-document: the process reading an uploaded file (a child of the
engine, engine/knowledge/extract_process.py) ends with the engine instead of reading on, unbounded, for nobody.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import asyncpg

from tests.test_drain_processes import engine
from tests.test_knowledge_ingestion import _raw_pdf, file_document
from tests.test_repo_agents import insert_organization
from tests.test_webhook_delivery import eventually
from tests.test_webhook_fairness import fresh

__all__ = ["fresh"]  # fixture: a database per test


def costly_pdf(pages: int) -> bytes:
    """A PDF of a few KB whose `pages` pages all draw one content stream of 100,000 words: seconds of reading per
    page, about as many as there are pages (the engine stops its reading process at the time limit, 120 s)."""
    return _raw_pdf(b"BT /F1 12 Tf 72 700 Td " + b"(word ) Tj " * 100_000 + b"ET", pages=pages)


def reading_processes(parent: int) -> list[int]:
    """The ids of `parent`'s children that read knowledge documents."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"engine.knowledge.extract_process" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_the_process_reading_a_file_ends_with_the_engine_killed_while_it_reads(
    fresh: tuple[str, asyncpg.Pool], tmp_path: Path
) -> None:
    database_url, pool = fresh
    organization_id = await insert_organization(pool)
    await file_document(pool, organization_id, costly_pdf(pages=1000))
    readers: list[int] = []
    try:
        async with engine(database_url, tmp_path, drain_seconds=1) as doomed:

            async def reading() -> bool:
                readers.extend(reading_processes(doomed.process.pid))
                return bool(readers)

            await eventually(reading, "the engine to start reading the file")
            doomed.process.send_signal(signal.SIGKILL)
            await doomed.process.wait()

        async def reader_gone() -> bool:
            return not any(running(pid) for pid in readers)

        await eventually(reader_gone, "the reading process to end with the engine")
    finally:
        for pid in readers:  # started, through the engine, by this test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
