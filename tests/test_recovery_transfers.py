"""Crash recovery of a call whose engine process died while Twilio was taking its transfer: the caller was handed
over as asked, so recovery closes the call COMPLETED `transferred` when the leg or Twilio's record shows the dial,
and FAILED `engine_lost` otherwise. Real `dialtone serve` processes killed mid-transfer, the fake Twilio, Deepgram
and OpenAI fakes behind their real SDKs, real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from config.settings import load_settings
from engine.simulator import Pause
from engine.twilio.outbound_calls import OutboundDeps, PlacedCall
from engine.twilio.rest import TwilioCalls
from engine.workers.recovery import NodeHeartbeat
from storage import call_logs, credit_reservations, engine_nodes, events, organizations, transfer_legs
from storage.call_logs import CallLog
from storage.enums import CallStatus
from storage.pool import create_pool
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.engine_processes import free_port
from tests.fakes.openai_chat import FakeOpenAI
from tests.fakes.twilio import Answer, FakeCall, FakeTwilio
from tests.test_call_log_writer import OnOffProxy
from tests.test_calls_e2e import TOKEN
from tests.test_calls_e2e import call as simulated_call
from tests.test_drain_processes import Engine, engine, held_call
from tests.test_live_call_control_channel import held_by_a_node
from tests.test_node_fencing import STREAM_TIMEOUT
from tests.test_node_fencing import line as fenced_line
from tests.test_opt_out_calls import DG_KEY, OPENAI_KEY, deepgram, openai
from tests.test_outbound_calls import finished_log
from tests.test_repo_call_logs import open_call, set_started_at
from tests.test_transfer_stream_stop import BILLING, RATE, transfer_to_billing
from tests.test_webhook_fairness import fresh

__all__ = ["deepgram", "fresh", "openai"]  # fixtures: the fakes behind Deepgram and OpenAI, a database per test

RATES = {"free": RATE, "pro": RATE, "enterprise": RATE}
RINGS_MS = 4000
"""How long the callee's phone rings before an outbound call is answered, when its ringing must show."""


@pytest.fixture(scope="module")
async def twilio() -> AsyncIterator[FakeTwilio]:
    """The fake Twilio, signing its callbacks with the token the engine processes check."""
    async with FakeTwilio(auth_token=TOKEN) as fake:
        yield fake


@pytest.fixture
def fakes(
    twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> tuple[FakeTwilio, FakeDeepgram, FakeOpenAI]:
    """The fakes an engine process talks to: Twilio, Deepgram and OpenAI."""
    return twilio, deepgram, openai


def environment(twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI) -> dict[str, str]:
    """An engine process's settings: the fakes, and one rate on every plan."""
    return {
        "TWILIO_ACCOUNT_SID": twilio.account_sid,
        "TWILIO_API_BASE": twilio.api_base,
        "DEEPGRAM_API_KEY": DG_KEY,
        "OPENAI_API_KEY": OPENAI_KEY,
        "DEEPGRAM_URL": deepgram.url,
        "OPENAI_BASE_URL": openai.base_url,
        **{f"DIALTONE_CREDITS_PER_MINUTE_{plan}": str(RATE) for plan in ("FREE", "PRO", "ENTERPRISE")},
    }


@asynccontextmanager
async def placing_through(
    engine_url: str, database_url: str, pool: asyncpg.Pool, twilio: FakeTwilio
) -> AsyncIterator[OutboundDeps]:
    """What place_call needs to place calls through the fake Twilio that the engine at `engine_url` runs."""
    client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
    try:
        yield OutboundDeps(
            pool=pool,
            settings=load_settings(
                database_url=database_url,
                twilio_account_sid=twilio.account_sid,
                twilio_auth_token=twilio.auth_token,
                twilio_api_base=twilio.api_base,
                credits_per_minute_free=RATE,
                credits_per_minute_pro=RATE,
                credits_per_minute_enterprise=RATE,
                deepgram_api_key=DG_KEY,
                openai_api_key=OPENAI_KEY,
            ),
            twilio=client,
            public_url=engine_url,
        )
    finally:
        await client.close()


async def killed_mid_transfer(
    doomed: Engine,
    database_url: str,
    pool: asyncpg.Pool,
    fakes: tuple[FakeTwilio, FakeDeepgram, FakeOpenAI],
    organization_id: str,
    *,
    ring_ms: int = 100,
) -> PlacedCall:
    """A call `doomed` runs whose model transfers the callee (who answers after `ring_ms`) to billing; Twilio takes
    the transfer (the stream's `stop`, its `<Dial>`) but has not answered the request yet when the process is killed.
    """
    twilio, deepgram, openai = fakes
    async with placing_through(doomed.url, database_url, pool, twilio) as deps:
        placed = await transfer_to_billing(
            deps,
            pool,
            twilio=twilio,
            deepgram=deepgram,
            openai=openai,
            organization_id=organization_id,
            ring_ms=ring_ms,
        )
    call = twilio.calls[placed.call_sid]
    call.answer_gate = asyncio.Event()  # acted on, answered only once the process is gone
    await held_by_a_node(pool, organization_id)
    for _ in range(600):
        if twilio.dialed_calls.get(placed.call_sid):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("Twilio never dialed the transfer")
    doomed.process.send_signal(signal.SIGKILL)
    await doomed.process.wait()
    call.answer_gate.set()
    return placed


async def test_a_call_whose_engine_was_killed_after_twilio_took_its_transfer_ends_transferred(
    fresh: tuple[str, asyncpg.Pool], fakes: tuple[FakeTwilio, FakeDeepgram, FakeOpenAI], tmp_path: Path
) -> None:
    database_url, pool = fresh
    org = (await organizations.create_organization(pool, name="Killed", slug="killed-transfer", credits=1000)).id
    await events.create_event(pool, organization_id=org, name="call.ended", webhook_url="https://hooks.example/x")
    settings: dict[str, Any] = environment(*fakes)
    (tmp_path / "killed").mkdir()
    (tmp_path / "next").mkdir()
    async with engine(database_url, tmp_path / "killed", drain_seconds=20, **settings) as doomed:
        placed = await killed_mid_transfer(doomed, database_url, pool, fakes, org, ring_ms=RINGS_MS)
    still_open = await pool.fetchrow('SELECT "status" FROM "CallLog" WHERE "id" = $1', placed.call_log_id)
    assert still_open is not None and still_open["status"] == "IN_PROGRESS", "the process died before its end"

    async with engine(database_url, tmp_path / "next", drain_seconds=1, **settings):
        ended = await finished_log(pool, placed.call_log_id)  # closed by its recovery at start

    assert (ended["status"], ended["metadata"]["endReason"]) == ("COMPLETED", "transferred"), ended["metadata"]
    # Its credit reservation is settled as recovery settles them; the leg waits for the dial's settlement.
    assert await pool.fetchval('SELECT count(*) FROM "CreditReservation"') == 0
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=placed.call_log_id) == 5 * RATE
    told = await pool.fetch(
        """SELECT "payload" FROM "WebhookDelivery" WHERE "event" = 'call.ended'
           AND "payload"->'data'->>'callLogId' = $1""",
        placed.call_log_id,
    )
    assert [row["payload"]["data"]["endReason"] for row in told] == ["transferred"]
    # The agent's part of the call ran from its answer (its stream's start) to its transfer's leg, as a transfer that
    # ends normally does: the callee's phone ringing is not part of it.
    leg_opened = await pool.fetchval('SELECT "startedAt" FROM "TransferLeg" WHERE "callLogId" = $1', placed.call_log_id)
    answered = datetime.fromisoformat(ended["metadata"]["streamStartedAt"])
    ran = math.ceil((leg_opened - answered).total_seconds())
    assert ran >= 1 and ended["duration"] == ran
    assert math.ceil((leg_opened - ended["timestamp"]).total_seconds()) >= ran + RINGS_MS // 1000 - 1  # it rang
    assert told[0]["payload"]["data"]["duration"] == ran
    # The dial's action request (or the sweep) settles the leg, once.
    settled = await transfer_legs.settle_leg(
        pool, call_log_id=placed.call_log_id, dial_status="completed", duration_seconds=90, call_sid=placed.call_sid
    )
    assert settled is not None and settled.credits_charged == 2 * RATE
    assert (
        await transfer_legs.settle_leg(
            pool, call_log_id=placed.call_log_id, dial_status="completed", duration_seconds=90, call_sid=placed.call_sid
        )
        is None
    )


async def lost_call_with_a_transfer(pool: asyncpg.Pool) -> CallLog:
    """A call of an engine node that died (on another host) after opening the call's transfer leg to billing."""
    await engine_nodes.register_node(
        pool, node_id="dead", hostname="elsewhere", pid=1, now=datetime.now(UTC) - timedelta(minutes=5)
    )
    slug = f"lost-{secrets.token_hex(4)}"
    org = (await organizations.create_organization(pool, name="Lost", slug=slug, credits=1000)).id
    call = await open_call(pool, org, metadata={"engineNode": "dead"}, credit_rates=RATES)
    await transfer_legs.open_leg(pool, organization_id=org, call_log_id=call.id, to=BILLING, max_minutes=5, rates=RATES)
    return call


async def lost_call_transferred_after(pool: asyncpg.Pool, talked: timedelta) -> CallLog:
    """A call of an engine node that died (on another host) after its agent talked for `talked` and opened the call's
    transfer leg to billing, every minute it started reserved."""
    await engine_nodes.register_node(
        pool, node_id="dead", hostname="elsewhere", pid=1, now=datetime.now(UTC) - timedelta(minutes=5)
    )
    org = (await organizations.create_organization(pool, name="Lost", slug="lost-talked", credits=1000)).id
    call = await open_call(pool, org, metadata={"engineNode": "dead"}, credit_rates=RATES)
    await set_started_at(pool, call.id, datetime.now(UTC) - talked)
    for _ in range(math.ceil(talked.total_seconds() / 60) - 1):  # its meter reserved each next minute as it ran
        assert await credit_reservations.extend_reservation(pool, call_log_id=call.id)
    await transfer_legs.open_leg(pool, organization_id=org, call_log_id=call.id, to=BILLING, max_minutes=5, rates=RATES)
    return call


async def recovered(pool: asyncpg.Pool, twilio: TwilioCalls | None, call: CallLog) -> CallLog:
    """`call` once a node asking `twilio` has recovered the calls of dead nodes."""
    await NodeHeartbeat(pool, twilio=twilio).recover()
    return await call_logs.get_call_log(pool, organization_id=call.organization_id, call_log_id=call.id)


@asynccontextmanager
async def unreachable_twilio() -> AsyncIterator[TwilioCalls]:
    """A Twilio client whose API root nothing listens on."""
    client = TwilioCalls("AC" + "0" * 32, "token", api_base=f"http://127.0.0.1:{free_port()}")
    try:
        yield client
    finally:
        await client.close()


async def test_a_lost_call_whose_transfer_twilio_never_dialed_ends_engine_lost(
    fresh: tuple[str, asyncpg.Pool], twilio: FakeTwilio
) -> None:
    _, pool = fresh
    call = await lost_call_with_a_transfer(pool)  # the node died before Twilio was asked
    async with client_of(twilio) as client:
        ended = await recovered(pool, client, call)
    assert (ended.status, ended.metadata["endReason"]) == (CallStatus.FAILED, "engine_lost")
    assert any(lookup.get("ParentCallSid") == call.call_id for lookup in twilio.lookups), "Twilio was asked"
    # Its leg waits for the sweep, which finds no dial and returns every credit.
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=call.id) == 5 * RATE


async def test_a_lost_call_whose_open_transfer_twilio_cannot_be_asked_about_is_closed_engine_lost(
    fresh: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = fresh
    lost = [await lost_call_with_a_transfer(pool) for _ in range(2)]
    async with unreachable_twilio() as client:
        await NodeHeartbeat(pool, twilio=client).recover()
    ended = await pool.fetch(
        'SELECT "status", "metadata" FROM "CallLog" WHERE "id" = ANY($1::text[])', [c.id for c in lost]
    )
    assert [(row["status"], row["metadata"]["endReason"]) for row in ended] == [("FAILED", "engine_lost")] * 2


@pytest.mark.parametrize(
    ("dial_status", "closed_as"),
    [
        ("completed", ("COMPLETED", "transferred")),
        ("no-answer", ("COMPLETED", "transferred")),
        (transfer_legs.NOT_DIALED, ("FAILED", "engine_lost")),
    ],
)
async def test_a_lost_call_whose_leg_is_settled_ends_as_its_dial_went_without_asking_twilio(
    fresh: tuple[str, asyncpg.Pool], dial_status: str, closed_as: tuple[str, str]
) -> None:
    _, pool = fresh
    call = await lost_call_with_a_transfer(pool)
    await transfer_legs.settle_leg(pool, call_log_id=call.id, dial_status=dial_status, duration_seconds=30)
    async with unreachable_twilio() as client:
        ended = await recovered(pool, client, call)
    assert (ended.status.value, ended.metadata["endReason"]) == closed_as


@asynccontextmanager
async def slow_twilio(twilio: FakeTwilio) -> AsyncIterator[asyncio.Event]:
    """The fake Twilio answering no lookup until the returned event is set (or the block is left)."""
    twilio.lookup_gate = answer = asyncio.Event()
    try:
        yield answer
    finally:
        answer.set()
        twilio.lookup_gate = None


@asynccontextmanager
async def client_of(twilio: FakeTwilio) -> AsyncIterator[TwilioCalls]:
    """A Twilio client of the fake's account."""
    client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
    try:
        yield client
    finally:
        await client.close()


async def asked_about(twilio: FakeTwilio, call: CallLog) -> None:
    """Return once Twilio has been asked which calls `call`'s `<Dial>` made."""
    for _ in range(600):
        if any(lookup.get("ParentCallSid") == call.call_id for lookup in twilio.lookups):
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"Twilio was never asked about the transfer of {call.call_id}")


async def test_a_lost_call_whose_transfer_twilio_does_not_tell_within_the_lookup_budget_ends_engine_lost(
    fresh: tuple[str, asyncpg.Pool], twilio: FakeTwilio
) -> None:
    _, pool = fresh
    lost = [await lost_call_with_a_transfer(pool) for _ in range(6)]
    async with client_of(twilio) as client, slow_twilio(twilio):
        node = NodeHeartbeat(pool, twilio=client, transfer_lookup_budget=timedelta(seconds=0.5))
        assert await node.recover() == len(lost)  # while Twilio still holds the lookups
    ended = await pool.fetch(
        'SELECT "status", "metadata" FROM "CallLog" WHERE "id" = ANY($1::text[])', [c.id for c in lost]
    )
    assert [(row["status"], row["metadata"]["endReason"]) for row in ended] == [("FAILED", "engine_lost")] * 6


async def test_a_call_lost_while_twilio_is_asked_about_others_is_closed_by_the_next_pass_as_twilio_tells(
    fresh: tuple[str, asyncpg.Pool], twilio: FakeTwilio
) -> None:
    _, pool = fresh
    first = await lost_call_with_a_transfer(pool)
    async with client_of(twilio) as client, slow_twilio(twilio) as answer:
        node = NodeHeartbeat(pool, twilio=client)
        recovery = asyncio.create_task(node.recover())
        await asked_about(twilio, first)
        later = await lost_call_with_a_transfer(pool)  # lost while Twilio is being asked: nobody asked about it yet
        dialed = FakeCall(
            sid=f"CA{secrets.token_hex(16)}", to=BILLING, from_="+15550100000", params={}, behaviour=Answer()
        )
        twilio.dialed_calls[later.call_id] = [dialed]  # Twilio took its transfer
        answer.set()
        assert await recovery == 1
        closed = await call_logs.get_call_log(pool, organization_id=first.organization_id, call_log_id=first.id)
        assert (closed.status, closed.metadata["endReason"]) == (CallStatus.FAILED, "engine_lost")
        waiting = await call_logs.get_call_log(pool, organization_id=later.organization_id, call_log_id=later.id)
        assert waiting.status is CallStatus.IN_PROGRESS
        ended = await recovered(pool, client, later)  # the next pass asks about it
    assert (ended.status, ended.metadata["endReason"]) == (CallStatus.COMPLETED, "transferred")


async def test_a_node_whose_recovery_waits_on_twilio_keeps_heartbeating_and_its_live_call_runs(
    fresh: tuple[str, asyncpg.Pool], fakes: tuple[FakeTwilio, FakeDeepgram, FakeOpenAI], tmp_path: Path
) -> None:
    database_url, pool = fresh
    twilio = fakes[0]
    number, _ = await fenced_line(pool)
    node_timeout = timedelta(seconds=6)
    async with engine(
        database_url,
        tmp_path,
        drain_seconds=1,
        DIALTONE_NODE_HEARTBEAT_INTERVAL="0.5",
        DIALTONE_NODE_TIMEOUT=str(node_timeout.total_seconds()),
        DIALTONE_RECOVERY_INTERVAL="1",
        **environment(*fakes),
    ) as node:
        caller = asyncio.create_task(simulated_call(node.url, number, Pause(120_000), timeout_s=150))
        call_log_id = await held_call(pool, number)
        async with slow_twilio(twilio):
            lost = [await lost_call_with_a_transfer(pool) for _ in range(3)]
            await asked_about(twilio, lost[0])  # the node's recovery waits on Twilio
            # Another node's recovery looks all along, for twice the node timeout: the node is never taken for lost.
            for _ in range(int(2 * node_timeout.total_seconds() / 0.2)):
                await engine_nodes.close_orphaned_calls(pool, node_timeout=node_timeout, stream_timeout=STREAM_TIMEOUT)
                await asyncio.sleep(0.2)
            assert await pool.fetchval('SELECT "status" FROM "CallLog" WHERE "id" = $1', call_log_id) == "IN_PROGRESS"
            assert not caller.done(), "the node's live call ended while its recovery waited on Twilio"
            assert "cut off from the database" not in node.log()
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)


async def test_a_lost_call_closed_transferred_lasts_and_pays_as_a_transfer_that_ends_normally(
    fresh: tuple[str, asyncpg.Pool],
) -> None:
    _, pool = fresh
    call = await lost_call_transferred_after(pool, timedelta(seconds=100))
    await transfer_legs.settle_leg(pool, call_log_id=call.id, dial_status="completed", duration_seconds=30)
    balance = await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', call.organization_id)

    ended = await recovered(pool, None, call)

    assert (ended.status, ended.metadata["endReason"]) == (CallStatus.COMPLETED, "transferred")
    # Its agent talked 100 s before the transfer (the leg's opening; Twilio's `stop` follows it): two started minutes,
    # both of them reserved, so nothing returns.
    assert ended.duration is not None and 100 <= ended.duration <= 101
    assert (ended.metadata["minutesCharged"], ended.metadata["creditsPerMinute"]) == (2, RATE)
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', call.organization_id) == balance


async def test_a_pass_a_heartbeat_outage_interrupts_is_cancelled_and_the_next_one_closes_its_calls_once(
    fresh: tuple[str, asyncpg.Pool], twilio: FakeTwilio, postgres_server_url: str
) -> None:
    _, pool = fresh
    proxy = OnOffProxy(postgres_server_url)
    await proxy.up()
    proxied = await create_pool(
        proxy.url(await pool.fetchval("SELECT current_database()")), min_size=1, max_size=2, timeout=1
    )
    async with client_of(twilio) as client:
        node = NodeHeartbeat(
            proxied,
            heartbeat_interval=timedelta(seconds=0.05),
            recovery_interval=timedelta(seconds=0.1),
            node_timeout=timedelta(seconds=1),
            twilio=client,
        )
        await node.start()
        try:
            async with slow_twilio(twilio) as answer:
                lost = await lost_call_with_a_transfer(pool)
                await events.create_event(
                    pool, organization_id=lost.organization_id, name="call.ended", webhook_url="https://hooks.example/x"
                )
                await engine_nodes.register_node(
                    pool, node_id="neighbour", hostname="elsewhere", pid=2, now=datetime.now(UTC)
                )
                running = await open_call(pool, lost.organization_id, metadata={"engineNode": "neighbour"})
                await asked_about(twilio, lost)  # a pass of the node's waits on Twilio
                await proxy.down()  # the database is away for both nodes, longer than the node timeout
                await asyncio.sleep(1.5)
                await proxy.up()
                twilio.dialed_calls[lost.call_id] = [
                    FakeCall(
                        sid=f"CA{secrets.token_hex(16)}",
                        to=BILLING,
                        from_="+15550100000",
                        params={},
                        behaviour=Answer(),
                    )
                ]
                answer.set()  # the interrupted pass, had it gone on, would judge the neighbour now
                await asyncio.sleep(0.3)  # the neighbour's first heartbeat after the outage comes a little later
                for _ in range(10):
                    await engine_nodes.heartbeat(pool, node_id="neighbour", now=datetime.now(UTC))
                    await asyncio.sleep(0.2)
            assert await pool.fetchval('SELECT "status" FROM "CallLog" WHERE "id" = $1', running.id) == "IN_PROGRESS"
            ended = await finished_log(pool, lost.id)  # the next pass asks Twilio again, and closes it
        finally:
            await node.stop()
            proxied.terminate()
            await proxy.down()
    assert (ended["status"], ended["metadata"]["endReason"]) == ("COMPLETED", "transferred")
    asked = [lookup for lookup in twilio.lookups if lookup.get("ParentCallSid") == lost.call_id]
    assert len(asked) >= 2, "the next pass asked Twilio again"
    told = await pool.fetchval(
        """SELECT count(*) FROM "WebhookDelivery" WHERE "event" = 'call.ended'
           AND "payload"->'data'->>'callLogId' = $1""",
        lost.id,
    )
    assert told == 1
    assert await credit_reservations.reserved_credits(pool, call_log_id=lost.id) is None
    assert ended["metadata"]["minutesCharged"] == 1  # settled once: the minute it surely started
