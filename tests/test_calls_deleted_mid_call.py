"""A call whose CallLog is deleted while it runs, as the platform's dashboard deletes rows in SQL: the engine hangs it
up through Twilio, ends it without an error, and keeps nothing of it. One simulated call on the offline pipeline,
whose CallLog is deleted once its first turns are written; each test reads one outcome of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from config.settings import load_settings
from engine.simulator import CallResult, Pause, Say, Step
from storage import credit_reservations
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


async def call_deleted_when(
    pool: asyncpg.Pool,
    db_url: str,
    organization_id: str,
    number: str,
    *,
    steps: Sequence[Step],
    ready: Callable[[str], Awaitable[bool]],
    **settings: Any,
) -> tuple[CallResult, list[dict[str, str]], str]:
    """Call `number` with `steps` on an engine with a Twilio account to hang up with, and delete the call's CallLog
    in SQL once `ready` says so of it; what the caller saw, Twilio's updates and the CallLog's id."""
    async with (
        call_updates() as (rest, updates),
        running_engine(
            db_url,
            twilio_auth_token=TOKEN,
            twilio_account_sid=ACCOUNT,
            twilio_api_base=rest,
            node_heartbeat_interval=0.2,
            **settings,
        ) as engine,
    ):
        running = asyncio.create_task(call(engine, number, *steps))
        call_log_id = None
        for _ in range(1800):
            call_log_id = await pool.fetchval('SELECT "id" FROM "CallLog" WHERE "organizationId" = $1', organization_id)
            if call_log_id is not None and await ready(call_log_id):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the call of {organization_id} never became ready to delete")
        await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call_log_id)
        return await running, updates, call_log_id


@pytest.fixture(scope="module")
async def deleted_call(
    pool: asyncpg.Pool, db_url: str, tmp_path_factory: pytest.TempPathFactory, engine_log: _Kept
) -> DeletedCall:
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

    async def answered(call_log_id: str) -> bool:
        # The greeting, the caller's line and the agent's answer: from then on the call has nothing to write.
        return len(await turns(pool, call_log_id)) >= 3

    result, updates, call_log_id = await call_deleted_when(
        pool,
        db_url,
        tenant.organization_id,
        number,
        steps=[Say("I would like to book an appointment"), Pause(30_000)],
        ready=answered,
        state_dir=state,
    )
    settings = load_settings(state_dir=state)
    return DeletedCall(
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


async def test_a_call_deleted_after_its_next_minute_was_reserved_gets_that_minute_back(
    pool: asyncpg.Pool, db_url: str
) -> None:
    # The meter reserves each next minute in the last seconds of the one before: a call deleted then has started one
    # minute and holds two. Its deletion charges the one and returns the other (migration 0031).
    tenant = await make_tenant(pool, "Deleted after a minute", credits=100)
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello.", silenceTimeoutSeconds=120)

    async def next_minute_reserved(call_log_id: str) -> bool:  # 50 s into the call
        return await credit_reservations.reserved_credits(pool, call_log_id=call_log_id) == 2

    steps: list[Step] = [Say("Hello there"), Pause(90_000)]
    result, updates, _ = await call_deleted_when(
        pool, db_url, tenant.organization_id, number, steps=steps, ready=next_minute_reserved
    )

    assert updates == [{"sid": result.call_sid, "Status": "completed"}]  # hung up, not left to run on
    credits = await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', tenant.organization_id)
    assert credits == 100 - 1
