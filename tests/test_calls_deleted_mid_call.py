"""A call whose CallLog is deleted while it runs, as the platform's dashboard deletes rows in SQL: the engine hangs it
up through Twilio, ends it without an error, and keeps nothing of it. One simulated call on the offline pipeline,
whose CallLog is deleted once its first turns are written; each test reads one outcome of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from config.settings import load_settings
from engine.simulator import CallResult, Pause, Say
from storage.recordings import recording_path
from tests.engine_server import running_engine
from tests.fakes.twilio import call_updates
from tests.test_api_auth import make_tenant
from tests.test_calls_e2e import TOKEN, call, make_line, turns

ACCOUNT = "AC" + "5" * 32


@dataclass(frozen=True, slots=True)
class DeletedCall:
    """What a call whose CallLog was deleted mid-call left: what the caller saw, Twilio's updates, the engine's log."""

    result: CallResult
    updates: list[dict[str, str]]
    records: list[logging.LogRecord]
    recording: Path


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def engine_log() -> Iterator[_Kept]:
    """The engine's log records (it runs in this process) while the module's call runs."""
    kept = _Kept()
    root = logging.getLogger()
    root.addHandler(kept)
    try:
        yield kept
    finally:
        root.removeHandler(kept)


@pytest.fixture(scope="module")
async def deleted_call(
    pool: asyncpg.Pool, db_url: str, tmp_path_factory: pytest.TempPathFactory, engine_log: _Kept
) -> AsyncIterator[DeletedCall]:
    """A recorded call with a Twilio account to hang up with; its CallLog deleted in SQL after its first turns.

    The caller says one line and then stays silent for 30 s (well within its agent's silence time-out and its first
    paid minute): the call has no turn left to write, and an engine that lets it run on leaves the hanging up to the
    caller.
    """
    state = tmp_path_factory.mktemp("state")
    tenant = await make_tenant(pool, "Deleted mid call")
    number, _ = await make_line(
        pool, tenant.organization_id, firstSentence="Hello, this call is recorded.", silenceTimeoutSeconds=120
    )
    async with (
        call_updates() as (rest, updates),
        running_engine(
            db_url,
            twilio_auth_token=TOKEN,
            twilio_account_sid=ACCOUNT,
            twilio_api_base=rest,
            state_dir=state,
            node_heartbeat_interval=0.2,
        ) as engine,
    ):
        running = asyncio.create_task(call(engine, number, Say("I would like to book an appointment"), Pause(30_000)))
        call_log_id = None
        for _ in range(600):
            call_log_id = await pool.fetchval(
                'SELECT "id" FROM "CallLog" WHERE "organizationId" = $1', tenant.organization_id
            )
            # The greeting, the caller's line and the agent's answer: from then on the call has nothing to write.
            if call_log_id is not None and len(await turns(pool, call_log_id)) >= 3:
                break
            await asyncio.sleep(0.05)
        assert call_log_id is not None
        await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call_log_id)
        result = await running
        settings = load_settings(state_dir=state)
        yield DeletedCall(
            result, updates, list(engine_log.records), recording_path(settings, tenant.organization_id, call_log_id)
        )


async def test_the_call_is_hung_up_through_twilio_once_its_call_log_is_deleted(deleted_call: DeletedCall) -> None:
    assert deleted_call.updates == [{"sid": deleted_call.result.call_sid, "Status": "completed"}]
    assert any("was deleted while the call ran: hanging up" in record.getMessage() for record in deleted_call.records)


async def test_the_end_of_a_call_whose_call_log_was_deleted_raises_no_error(deleted_call: DeletedCall) -> None:
    errors = [record for record in deleted_call.records if record.levelno >= logging.ERROR]
    assert [record.getMessage() for record in errors] == []
    assert any("was deleted during the call" in record.getMessage() for record in deleted_call.records)


async def test_the_recording_of_a_call_deleted_while_it_ran_is_removed_at_its_end(deleted_call: DeletedCall) -> None:
    assert not await asyncio.to_thread(deleted_call.recording.exists)
