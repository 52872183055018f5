"""The per-call CallLog writer: turns land while the call runs, the end is one transaction, and a database that is
slow or away delays no turn and loses none.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import pytest

from engine.call.call_log_spill import SPILL_DIRNAME, CallLogSpill, read_spill_file
from engine.call.call_log_writer import (
    CallLogDeferred,
    CallLogWriter,
    CallLogWriterClosed,
    CallOutcome,
    TurnRecord,
    latency_summary,
)
from engine.workers.call_log_replay import SpillReplayer
from storage import agents, call_logs, organizations
from storage.call_logs import CallLog
from storage.call_turns import list_turns
from storage.end_reasons import MAX_DETAIL_CHARS, EndReason
from storage.enums import CallStatus
from storage.errors import DatabaseUnavailable, NotFound
from storage.pool import create_pool
from storage.records import new_id
from tests.databases import database_name
from tests.engine_server import running_engine
from tests.test_repo_call_logs import open_call

FAST_RETRIES: dict[str, Any] = {"retry_initial": 0.02, "retry_max": 0.1, "attempt_timeout": 2.0}


class OnOffProxy:
    """A TCP proxy in front of PostgreSQL that can go away (dropping every connection, refusing new ones) and
    come back on the same port: a database outage as the engine sees it. It can also stall: connections stay open
    and nothing crosses them, as when a network partition leaves the engine waiting for answers that never come.
    """

    def __init__(self, server_url: str) -> None:
        parts = urlsplit(server_url)
        self._server_url = parts
        socket_dir = parse_qs(parts.query).get("host", [None])[0]
        if socket_dir:
            sockets = [p for p in Path(socket_dir).glob(".s.PGSQL.*") if not p.name.endswith(".lock")]
            self._unix_path: str | None = str(sockets[0])
        else:
            self._unix_path = None
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def url(self, database: str) -> str:
        """A URL for `database` through the proxy, with the server's credentials."""
        parts = self._server_url
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, f"/{database}", "", ""))

    async def up(self) -> None:
        """Accept connections (again, on the same port)."""
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        """Drop every open connection and refuse new ones."""
        assert self._server is not None
        self._server.close()
        self._flowing.set()  # a stalled link's pipes wake to find their connections dropped
        for transport in list(self._transports):
            transport.abort()
        await self._server.wait_closed()

    def stall(self) -> None:
        """Keep every connection open and new ones accepted, but pass no more bytes either way."""
        self._flowing.clear()

    def flow(self) -> None:
        """Pass bytes again after a stall: what waited meanwhile arrives now, late."""
        self._flowing.set()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._unix_path is not None:
            return await asyncio.open_unix_connection(self._unix_path)
        return await asyncio.open_connection(self._server_url.hostname, self._server_url.port or 5432)

    async def _link(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await self._open_upstream()
        transports = {client_writer.transport, upstream_writer.transport}
        self._transports |= transports

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    await self._flowing.wait()
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))
        self._transports -= transports


@pytest.fixture
async def proxy(postgres_server_url: str) -> AsyncIterator[OnOffProxy]:
    """A running proxy to the test server."""
    proxy = OnOffProxy(postgres_server_url)
    await proxy.up()
    yield proxy
    if proxy._server is not None and proxy._server.is_serving():
        await proxy.down()


@pytest.fixture
async def proxied_pool(proxy: OnOffProxy, db_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool like the engine's writers use (stateless) on this module's database, through the proxy."""
    pool = await create_pool(proxy.url(database_name(db_url)), min_size=1, max_size=3, timeout=2, stateless=True)
    yield pool
    pool.terminate()


async def new_organization(pool: asyncpg.Pool, *, credits: int = 100) -> str:
    """A new organization with some credits; its id."""
    organization = await organizations.create_organization(pool, name="Acme", slug=f"acme-{new_id()}", credits=credits)
    return organization.id


async def new_call(pool: asyncpg.Pool, *, credits: int = 100) -> tuple[CallLog, str]:
    """An IN_PROGRESS call of a new organization, taken by a new agent, its first minute of credits reserved at one
    credit a minute; the call and its agent's id."""
    org = await new_organization(pool, credits=credits)
    agent = await agents.create_agent(pool, organization_id=org, name="Support")
    rates = {"free": 1, "pro": 1, "enterprise": 1}
    return await open_call(pool, org, agent_id=agent.id, credit_rates=rates), agent.id


def writer_for(pool: asyncpg.Pool, call: CallLog, **options: Any) -> CallLogWriter:
    """A writer for the call, on this node."""
    return CallLogWriter(
        pool,
        organization_id=call.organization_id,
        call_log_id=call.id,
        agent_id=call.agent_id,
        node_id="node-a",
        **options,
    )


def turn(index: int, *, speaker: str = "caller", latency_ms: int | None = None) -> TurnRecord:
    """The index-th turn of a call, two seconds each."""
    return TurnRecord(
        index=index,
        speaker=speaker,  # type: ignore[arg-type]
        text=f"turn {index}",
        start_ms=index * 2000,
        end_ms=index * 2000 + 1500,
        latency_ms=latency_ms,
    )


def completed(duration_s: float, **fields: Any) -> CallOutcome:
    """A call that ended normally after `duration_s`."""
    return CallOutcome(status=CallStatus.COMPLETED, end_reason=EndReason.CALLER_HANGUP, duration_s=duration_s, **fields)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float = 5.0) -> None:
    """Wait until `check` holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.02)


async def turn_indexes(pool: asyncpg.Pool, call: CallLog) -> list[int]:
    """The indexes of the call's stored turns, in order."""
    return [t.index for t in await list_turns(pool, organization_id=call.organization_id, call_log_id=call.id)]


async def test_turns_are_in_the_database_while_the_call_is_still_open(pool: asyncpg.Pool) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(pool, call)
    writer.start()
    for index in range(3):
        writer.record_turn(turn(index))

    async def all_written() -> bool:
        return await turn_indexes(pool, call) == [0, 1, 2]

    await eventually(all_written)
    stored = await call_logs.get_call_log(pool, organization_id=call.organization_id, call_log_id=call.id)
    assert stored.status is CallStatus.IN_PROGRESS
    assert stored.transcript == "Caller: turn 0\nCaller: turn 1\nCaller: turn 2"
    await writer.finish(completed(10))


async def test_running_metadata_reaches_the_call_log_while_the_call_runs(pool: asyncpg.Pool) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(pool, call)
    writer.record_metadata(stt="deepgram")
    writer.start()

    async def tagged() -> bool:
        stored = await call_logs.get_call_log(pool, organization_id=call.organization_id, call_log_id=call.id)
        return stored.metadata.get("stt") == "deepgram"

    await eventually(tagged)
    await writer.finish(completed(1))


async def test_finish_ends_the_call_with_everything_in_one_go(pool: asyncpg.Pool) -> None:
    call, agent_id = await new_call(pool, credits=10)
    writer = writer_for(pool, call)
    writer.start()
    latencies = [300, 500, 700, 900]
    for index, latency in enumerate(latencies):
        writer.record_turn(turn(2 * index, speaker="caller"))
        writer.record_turn(turn(2 * index + 1, speaker="agent", latency_ms=latency))
    ended = await writer.finish(
        completed(61, recording_url="https://engine.example/recordings/x.wav", metadata={"recordingMs": 61000})
    )

    stored = await call_logs.get_call_log(pool, organization_id=call.organization_id, call_log_id=call.id)
    assert stored == ended
    assert (stored.status, stored.duration, stored.recording_url) == (
        CallStatus.COMPLETED,
        61,
        "https://engine.example/recordings/x.wav",
    )
    assert stored.metadata["endReason"] == "caller_hangup"
    assert "endDetail" not in stored.metadata
    assert stored.metadata["recordingMs"] == 61000
    assert stored.metadata["latencyMs"] == {"p50": 500, "p95": 900, "max": 900, "count": 4}
    assert "lostTurns" not in stored.metadata
    assert await turn_indexes(pool, call) == list(range(8))
    agent = await agents.get_agent(pool, organization_id=call.organization_id, agent_id=agent_id)
    assert (agent.total_calls, agent.success_rate) == (1, 100.0)
    organization = await organizations.get_organization(pool, organization_id=call.organization_id)
    assert organization.credits == 8  # 61 s is two started minutes


async def test_a_failed_call_keeps_its_end_reason(pool: asyncpg.Pool) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(pool, call)
    ended = await writer.finish(
        CallOutcome(status=CallStatus.FAILED, end_reason=EndReason.STT_UNAVAILABLE, duration_s=3)
    )
    assert (ended.status, ended.metadata["endReason"]) == (CallStatus.FAILED, "stt_unavailable")


async def test_the_end_detail_is_kept_beside_the_reason_and_bounded(pool: asyncpg.Pool) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(pool, call)
    outcome = CallOutcome(
        status=CallStatus.FAILED, end_reason=EndReason.STT_FAILED, end_detail="x" * 10_000, duration_s=3
    )
    ended = await writer.finish(outcome)
    assert ended.metadata["endReason"] == "stt_failed"
    assert ended.metadata["endDetail"] == "x" * MAX_DETAIL_CHARS


@pytest.mark.parametrize(("duration_s", "credits"), [(0, 0), (1, 1), (60, 1), (61, 2), (119.5, 2), (180, 3)])
async def test_credits_are_charged_per_started_minute(pool: asyncpg.Pool, duration_s: float, credits: int) -> None:
    call, _ = await new_call(pool, credits=10)
    await writer_for(pool, call).finish(completed(duration_s))
    organization = await organizations.get_organization(pool, organization_id=call.organization_id)
    assert organization.credits == 10 - credits


async def test_finishing_twice_returns_the_same_log_and_charges_once(pool: asyncpg.Pool) -> None:
    call, agent_id = await new_call(pool, credits=10)
    writer = writer_for(pool, call)
    first = await writer.finish(completed(61))
    assert await writer.finish(completed(61)) == first
    # Another writer finishing the same call (a retry whose first commit did land) changes nothing either.
    assert await writer_for(pool, call).finish(completed(61)) == first
    organization = await organizations.get_organization(pool, organization_id=call.organization_id)
    agent = await agents.get_agent(pool, organization_id=call.organization_id, agent_id=agent_id)
    assert (organization.credits, agent.total_calls) == (8, 1)


async def test_a_database_outage_mid_call_delays_no_turn_and_loses_none(
    pool: asyncpg.Pool, proxied_pool: asyncpg.Pool, proxy: OnOffProxy
) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(proxied_pool, call, **FAST_RETRIES)
    writer.start()
    for index in range(5):
        writer.record_turn(turn(index))

    async def first_five_written() -> bool:
        return await turn_indexes(pool, call) == [0, 1, 2, 3, 4]

    await eventually(first_five_written)

    await proxy.down()
    began = time.perf_counter()
    for index in range(5, 105):
        writer.record_turn(turn(index))
    elapsed = time.perf_counter() - began
    await asyncio.sleep(0.5)  # the writer keeps failing and backing off meanwhile
    assert writer.pending_turns > 0
    assert await turn_indexes(pool, call) == [0, 1, 2, 3, 4]

    await proxy.up()
    ended = await writer.finish(completed(200))
    assert elapsed < 0.05, f"100 turns took {elapsed * 1000:.1f} ms to record while the database was away"
    assert await turn_indexes(pool, call) == list(range(105))
    assert ended.transcript is not None and len(ended.transcript.splitlines()) == 105
    assert "lostTurns" not in ended.metadata


async def test_a_turn_recorded_during_an_outage_is_written_without_waiting_for_finish(
    pool: asyncpg.Pool, proxied_pool: asyncpg.Pool, proxy: OnOffProxy
) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(proxied_pool, call, **FAST_RETRIES)
    await proxy.down()
    writer.start()
    writer.record_turn(turn(0))
    await asyncio.sleep(0.3)
    await proxy.up()

    async def written() -> bool:
        return await turn_indexes(pool, call) == [0]

    await eventually(written)
    await writer.finish(completed(5))


async def test_a_full_buffer_drops_new_turns_and_counts_them_as_lost(pool: asyncpg.Pool) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(pool, call, max_pending=10)
    for index in range(15):  # not started: nothing is written until finish
        writer.record_turn(turn(index))
    assert (writer.pending_turns, writer.lost_turns) == (10, 5)
    ended = await writer.finish(completed(30))
    assert await turn_indexes(pool, call) == list(range(10))
    assert ended.metadata["lostTurns"] == 5


async def test_finish_gives_up_after_its_time_limit_while_the_database_stays_away(
    pool: asyncpg.Pool, proxied_pool: asyncpg.Pool, proxy: OnOffProxy
) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(proxied_pool, call, finish_timeout=0.5, **FAST_RETRIES)
    writer.record_turn(turn(0))
    await proxy.down()
    began = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match=call.id):
        await writer.finish(completed(5))
    assert time.monotonic() - began < 3
    stored = await call_logs.get_call_log(pool, organization_id=call.organization_id, call_log_id=call.id)
    assert stored.status is CallStatus.IN_PROGRESS  # left for crash recovery to close


@pytest.fixture
async def spill(tmp_path: Path) -> AsyncIterator[CallLogSpill]:
    """This run's spill, in a state folder of the test's own."""
    spill = CallLogSpill(tmp_path, max_bytes=1 << 20)
    await spill.open()
    yield spill
    await spill.close()


@pytest.fixture
async def replayer(proxied_pool: asyncpg.Pool, spill: CallLogSpill) -> AsyncIterator[SpillReplayer]:
    """The engine's replay of the spill, running in the background through the proxy."""
    replayer = SpillReplayer(proxied_pool, spill, attempt_timeout=0.5, retry_initial=0.05, retry_max=0.2)
    await replayer.start()
    yield replayer
    await replayer.stop()


async def stored_status(pool: asyncpg.Pool, call: CallLog) -> CallStatus:
    """The call's status as stored now."""
    return (await call_logs.get_call_log(pool, organization_id=call.organization_id, call_log_id=call.id)).status


async def test_an_outage_across_the_call_end_longer_than_the_patience_still_ends_the_call_with_every_turn(
    pool: asyncpg.Pool, proxied_pool: asyncpg.Pool, proxy: OnOffProxy, spill: CallLogSpill, replayer: SpillReplayer
) -> None:
    call, agent_id = await new_call(pool, credits=10)
    writer = writer_for(proxied_pool, call, spill=spill, finish_timeout=0.3, **FAST_RETRIES)
    writer.start()
    writer.record_turn(turn(0))
    writer.record_turn(turn(1, speaker="agent", latency_ms=400))
    writer.record_turn(turn(2))
    await proxy.down()
    writer.record_turn(turn(3, speaker="agent", latency_ms=600))  # the agent's last turn, said during the outage
    with pytest.raises(CallLogDeferred, match=call.id):
        await writer.finish(completed(61))
    await asyncio.sleep(0.6)  # twice the patience, the database still away
    assert await stored_status(pool, call) is CallStatus.IN_PROGRESS

    await proxy.up()

    async def ended() -> bool:
        return await stored_status(pool, call) is CallStatus.COMPLETED

    await eventually(ended)
    stored = await call_logs.get_call_log(pool, organization_id=call.organization_id, call_log_id=call.id)
    assert await turn_indexes(pool, call) == [0, 1, 2, 3]
    assert stored.transcript == "Caller: turn 0\nAgent: turn 1\nCaller: turn 2\nAgent: turn 3"
    assert (stored.duration, stored.metadata["endReason"]) == (61, "caller_hangup")
    assert stored.metadata["latencyMs"] == {"p50": 400, "p95": 600, "max": 600, "count": 2}
    organization = await organizations.get_organization(pool, organization_id=call.organization_id)
    agent = await agents.get_agent(pool, organization_id=call.organization_id, agent_id=agent_id)
    assert (organization.credits, agent.total_calls) == (8, 1)
    assert not list(spill.folder.glob("*.jsonl"))


async def test_turns_beyond_what_memory_keeps_go_to_the_spill_in_order_and_none_is_lost(
    pool: asyncpg.Pool, proxied_pool: asyncpg.Pool, proxy: OnOffProxy, spill: CallLogSpill, replayer: SpillReplayer
) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(proxied_pool, call, spill=spill, max_pending=10, **FAST_RETRIES)
    writer.start()
    await proxy.down()
    began = time.perf_counter()
    for index in range(40):
        writer.record_turn(turn(index))
    elapsed = time.perf_counter() - began
    assert (writer.pending_turns, writer.lost_turns) == (0, 0)
    await proxy.up()
    with pytest.raises(CallLogDeferred):
        await writer.finish(completed(90))

    async def ended() -> bool:
        return await stored_status(pool, call) is CallStatus.COMPLETED

    await eventually(ended)
    stored = await call_logs.get_call_log(pool, organization_id=call.organization_id, call_log_id=call.id)
    assert await turn_indexes(pool, call) == list(range(40))
    assert stored.transcript == "\n".join(f"Caller: turn {index}" for index in range(40))
    assert "lostTurns" not in stored.metadata
    assert elapsed < 0.05, f"40 turns took {elapsed * 1000:.1f} ms to record while the database was away"


async def test_a_full_spill_drops_further_turns_and_counts_them_as_lost(
    pool: asyncpg.Pool, tmp_path: Path, proxied_pool: asyncpg.Pool, proxy: OnOffProxy
) -> None:
    call, _ = await new_call(pool)
    spill = CallLogSpill(tmp_path, max_bytes=1500)  # room for about ten turns
    await spill.open()
    writer = writer_for(proxied_pool, call, spill=spill, max_pending=5, finish_timeout=0.2, **FAST_RETRIES)
    await proxy.down()
    for index in range(30):
        writer.record_turn(turn(index))
    assert 0 < writer.lost_turns < 25
    with pytest.raises(CallLogDeferred):
        await writer.finish(completed(90))
    await spill.close()
    await proxy.up()

    replayer = SpillReplayer(pool, CallLogSpill(tmp_path, max_bytes=1500))
    assert await replayer.replay_leftovers() == 1
    stored = await call_logs.get_call_log(pool, organization_id=call.organization_id, call_log_id=call.id)
    kept = 30 - writer.lost_turns
    assert await turn_indexes(pool, call) == list(range(kept))
    assert (stored.status, stored.metadata["lostTurns"]) == (CallStatus.COMPLETED, writer.lost_turns)


async def test_a_spill_left_by_a_stopped_run_is_written_when_the_engine_next_starts(
    pool: asyncpg.Pool, db_url: str, proxied_pool: asyncpg.Pool, proxy: OnOffProxy, tmp_path: Path
) -> None:
    call, _ = await new_call(pool)
    spill = CallLogSpill(tmp_path, max_bytes=1 << 20)
    await spill.open()
    writer = writer_for(proxied_pool, call, spill=spill, finish_timeout=0.2, **FAST_RETRIES)
    writer.record_turn(turn(0))
    await proxy.down()
    writer.record_turn(turn(1, speaker="agent"))
    with pytest.raises(CallLogDeferred):
        await writer.finish(completed(30))
    await spill.close()  # the run stops with the database still away; its file stays behind
    assert await stored_status(pool, call) is CallStatus.IN_PROGRESS

    # The next run on this host (same state folder) writes it before crash recovery would close the call.
    async with running_engine(db_url, state_dir=str(tmp_path)):
        stored = await call_logs.get_call_log(pool, organization_id=call.organization_id, call_log_id=call.id)
        assert (stored.status, stored.metadata["endReason"]) == (CallStatus.COMPLETED, "caller_hangup")
        assert await turn_indexes(pool, call) == [0, 1]
    assert not list((tmp_path / SPILL_DIRNAME).glob("*/*.jsonl"))


async def test_the_spill_of_a_running_engine_is_never_taken_for_a_stopped_runs(tmp_path: Path) -> None:
    running = CallLogSpill(tmp_path, max_bytes=1 << 20)
    await running.open()
    running.append("call-1", [{"call": {}}])
    await running.durable()
    stopped = CallLogSpill(tmp_path, max_bytes=1 << 20)
    await stopped.open()
    stopped.append("call-2", [{"call": {}}])
    await stopped.durable()
    await stopped.close()

    starting = CallLogSpill(tmp_path, max_bytes=1 << 20)
    runs = starting.leftover_runs()
    assert [[path.name for path in run.files] for run in runs] == [["call-2.jsonl"]]
    await running.close()


def test_a_spill_line_torn_by_a_crash_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "call.jsonl"
    path.write_text('{"call": {"callLogId": "c"}}\n{"turn": {"index": 0}}\n{"turn": {"ind')
    assert read_spill_file(path) == [{"call": {"callLogId": "c"}}, {"turn": {"index": 0}}]


async def test_a_write_that_finds_the_call_log_deleted_tells_the_call_once_and_keeps_nothing(
    pool: asyncpg.Pool,
) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(pool, call)
    told: list[str] = []
    writer.when_deleted(lambda: told.append(call.id))
    writer.start()
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call.id)  # as the platform's dashboard does

    async def nothing_waiting() -> bool:
        return writer.pending_turns == 0

    for index in range(3):
        writer.record_turn(turn(index))
        await eventually(nothing_waiting)
    assert told == [call.id]
    assert writer.lost_turns == 3
    with pytest.raises(NotFound):
        await writer.finish(completed(5))


async def test_nothing_can_be_recorded_once_the_call_is_finished(pool: asyncpg.Pool) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(pool, call)
    await writer.finish(completed(5))
    with pytest.raises(CallLogWriterClosed):
        writer.record_turn(turn(0))
    with pytest.raises(CallLogWriterClosed):
        writer.record_metadata(late=True)


async def test_inbound_media_gaps_are_summed_into_the_final_metadata(pool: asyncpg.Pool) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(pool, call)
    writer.start()

    for missing_ms in (40, 500, 120):
        writer.note_media_gap(missing_ms)
    ended = await writer.finish(completed(3))

    assert ended.metadata["inboundGaps"] == {"count": 3, "totalMs": 660, "longestMs": 500}


async def test_a_call_without_gaps_has_no_inbound_gaps_metadata(pool: asyncpg.Pool) -> None:
    call, _ = await new_call(pool)
    writer = writer_for(pool, call)
    writer.start()

    ended = await writer.finish(completed(3))

    assert "inboundGaps" not in ended.metadata


async def test_a_call_cannot_finish_in_progress(pool: asyncpg.Pool) -> None:
    call, _ = await new_call(pool)
    with pytest.raises(ValueError, match="IN_PROGRESS"):
        await writer_for(pool, call).finish(CallOutcome(CallStatus.IN_PROGRESS, EndReason.CALLER_HANGUP, 5))


@pytest.mark.parametrize(
    "bad",
    [
        TurnRecord(index=-1, speaker="caller", text="x", start_ms=0, end_ms=1),
        TurnRecord(index=0, speaker="caller", text="x", start_ms=500, end_ms=100),
        TurnRecord(index=0, speaker="agent", text="x", start_ms=0, end_ms=1, latency_ms=-5),
        TurnRecord(index=0, speaker="robot", text="x", start_ms=0, end_ms=1),  # type: ignore[arg-type]
    ],
)
def test_an_impossible_turn_is_refused_where_it_is_recorded(bad: TurnRecord) -> None:
    writer = CallLogWriter(None, organization_id="o", call_log_id="c", agent_id=None, node_id="n")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        writer.record_turn(bad)
    assert writer.pending_turns == 0


def test_latency_summary_uses_nearest_rank_percentiles() -> None:
    assert latency_summary(list(range(1, 101))) == {"p50": 50, "p95": 95, "max": 100, "count": 100}
    assert latency_summary([250]) == {"p50": 250, "p95": 250, "max": 250, "count": 1}
    assert latency_summary([]) == {"p50": None, "p95": None, "max": None, "count": 0}
