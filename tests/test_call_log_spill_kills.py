"""The CallLog spill of a `dialtone serve` killed with a call's end in it: the database was away when the call ended,
its turns and end went to the spill file, and the process is SIGKILLed before the database returns. The next start
on the same state folder writes the file before crash recovery looks at the call: it ends as it did, with its turns.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from engine.call.call_log_spill import SPILL_DIRNAME, read_spill_file
from engine.simulator import HangUp, Pause, Say
from storage.enums import CallStatus
from tests.databases import database_name
from tests.test_call_log_writer import OnOffProxy, proxy
from tests.test_calls_e2e import call, finished_call_log, turns
from tests.test_drain_processes import engine, held_call, line
from tests.test_webhook_delivery import eventually
from tests.test_webhook_fairness import fresh

__all__ = ["fresh", "proxy"]  # fixtures: a database per test, a proxy in front of PostgreSQL that can go away


def ended_in_spill(state_dir: Path) -> list[Path]:
    """The spill files in the state folder that hold a call's end."""
    return [
        path
        for path in (state_dir / SPILL_DIRNAME).glob("*/*.jsonl")
        if any("end" in record for record in read_spill_file(path))
    ]


async def test_a_call_that_ended_into_the_spill_of_a_killed_engine_ends_as_it_did_at_the_next_start(
    fresh: tuple[str, asyncpg.Pool], proxy: OnOffProxy, tmp_path: Path
) -> None:
    database_url, pool = fresh
    number = await line(pool)
    environment = {"DIALTONE_CALL_LOG_FINISH_TIMEOUT": "1"}
    async with engine(proxy.url(database_name(database_url)), tmp_path, drain_seconds=1, **environment) as doomed:
        caller = asyncio.create_task(
            call(doomed.url, number, Pause(8000), Say("I would like a table for two tonight."), Pause(5000), HangUp())
        )
        call_log_id = await held_call(pool, number)

        async def greeted() -> bool:
            return len(await turns(pool, call_log_id)) == 1

        await eventually(greeted, "the greeting to be written")
        await proxy.down()  # the caller's turn, the agent's answer and the end go to the spill

        async def spilled() -> bool:
            return bool(ended_in_spill(tmp_path / "state"))

        await eventually(spilled, "the call's end to reach the spill")
        doomed.process.kill()  # SIGKILL, the database still away
        await doomed.process.wait()
        await asyncio.gather(caller, return_exceptions=True)
    [kept] = ended_in_spill(tmp_path / "state")
    spilled_turns = [record["turn"]["text"] for record in read_spill_file(kept) if "turn" in record]
    assert spilled_turns, "no turn of the call reached the spill"

    async with engine(database_url, tmp_path, drain_seconds=1):
        row = await finished_call_log(pool, call_log_id)
    assert row["status"] == CallStatus.COMPLETED and row["metadata"]["endReason"] != "engine_lost"
    texts = [turn["text"] for turn in await turns(pool, call_log_id)]
    assert texts[1:] == spilled_turns and len(texts) == 1 + len(spilled_turns)
    assert not ended_in_spill(tmp_path / "state")
