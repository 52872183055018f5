"""An API call whose create request Twilio never answered is settled by asking Twilio, not held for ten minutes.

`POST /v1/calls` writes the CallLog (IN_PROGRESS: a call slot of the plan, the first minute's credits) before it asks
Twilio for the call. When that request times out Twilio may or may not have created the call, and the API answers
504 `twilio_unconfirmed`. Once the request can no longer be on its way, one engine process lists Twilio's calls
between the two numbers: a call no CallLog holds is adopted and followed; none closes the CallLog FAILED
`not_placed`, which frees its slot and returns its credits like any other end. The real engine on loopback (its own
dispatcher runs the lookup), the fake Twilio, a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiohttp
import asyncpg
import pytest

from config.settings import load_settings
from engine.twilio.outbound_calls import OutboundDeps, PlacementUnconfirmed, place_call
from engine.twilio.placement_lookup import REQUEST_SETTLED, PlacementLookup
from engine.twilio.rest import TwilioCalls
from storage import phone_numbers
from storage.call_logs import PENDING_CALL_ID_PREFIX
from storage.events import create_event
from tests.engine_server import running_engine
from tests.fakes.engine_processes import free_port, load_balancer
from tests.fakes.twilio import Busy, FakeTwilio, NoAnswer
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_dispatch_do_not_call import twilio_settings
from tests.test_outbound_calls import call_log_row, callee, finished_log, make_agent

FREE_PLAN_CALLS = 1
"""One call at a time on the free plan: a CallLog left IN_PROGRESS refuses the organization's next call."""
CREDITS = 100
HOOK_URL = "http://127.0.0.1:9/hooks"  # never delivered (nothing listens): the queued rows are what is checked
SETTLED_WITHIN_S = 40.0  # a ceiling for slow machines: the lookup may start REQUEST_SETTLED (15 s) after the CallLog
_caller_ids = itertools.count(1)


@dataclass
class Engine:
    """The engine on loopback, reached by Twilio's callbacks through a gate the test may close."""

    url: str
    public_url: str
    _backends: list[str]

    @contextlib.contextmanager
    def callbacks_lost(self) -> Iterator[None]:
        """While open, every request Twilio makes to the engine is lost (answered 502 by the gate)."""
        self._backends.remove(self.url)
        try:
            yield
        finally:
            self._backends.append(self.url)


@pytest.fixture(scope="module")
async def engine(db_url: str, twilio: FakeTwilio) -> AsyncIterator[Engine]:
    """The engine, its dispatcher ticking every 0.2 s, with the plan limit above and no wait for a free slot."""
    backends: list[str] = []
    async with (
        load_balancer(backends) as public_url,
        running_engine(
            db_url,
            public_url=public_url,
            dispatch_interval=0.2,
            call_slot_wait=0,
            max_concurrent_calls_free=FREE_PLAN_CALLS,
            **twilio_settings(twilio),
        ) as url,
    ):
        backends.append(url)
        yield Engine(url, public_url, backends)


@pytest.fixture
async def api(engine: Engine) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine.url)


@dataclass(frozen=True, slots=True)
class Dialer:
    """An organization on the free plan that may place API calls: its agent and caller id, call.ended subscribed."""

    tenant: Tenant
    agent_id: str
    caller_id: str

    @property
    def organization_id(self) -> str:
        return self.tenant.organization_id

    def call(self, to: str) -> dict[str, str]:
        """The body of POST /v1/calls to `to`."""
        return {"agentId": self.agent_id, "fromNumber": self.caller_id, "to": to}


async def dialer(pool: asyncpg.Pool, name: str) -> Dialer:
    tenant = await make_tenant(pool, name, credits=CREDITS)
    number = await phone_numbers.create_phone_number(
        pool, organization_id=tenant.organization_id, phone_number=f"+1212555{next(_caller_ids) + 7000:04d}"
    )
    await create_event(pool, organization_id=tenant.organization_id, name="call.ended", webhook_url=HOOK_URL)
    return Dialer(tenant, await make_agent(pool, tenant.organization_id), number.phone_number)


async def credits(pool: asyncpg.Pool, organization_id: str) -> int:
    balance: int = await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', organization_id)
    return balance


async def calls_ended(pool: asyncpg.Pool, call_log_id: str) -> int:
    """How many call.ended deliveries were queued for the call."""
    count: int = await pool.fetchval(
        """
        SELECT count(*) FROM "WebhookDelivery"
        WHERE "event" = 'call.ended' AND "payload"->'data'->>'callLogId' = $1
        """,
        call_log_id,
    )
    return count


def lookups_of(twilio: FakeTwilio, to: str) -> list[dict[str, str]]:
    """The Calls-list requests Twilio was sent about calls to `to`."""
    return [query for query in twilio.lookups if query.get("To") == to]


async def unconfirmed_by_the_api(api: Api, caller: Dialer, to: str) -> str:
    """POST /v1/calls while Twilio holds the create request: 504 twilio_unconfirmed naming the CallLog; its id."""
    status, body = await api.call("POST", "/calls", caller.tenant.owner_key, json=caller.call(to))
    assert status == 504 and body["error"]["code"] == "twilio_unconfirmed", body
    named = re.search(r"CallLog (\S+) ", body["error"]["message"])
    assert named is not None, body
    return named[1]


async def settled(pool: asyncpg.Pool, call_log_id: str, *, call_id: str | None = None) -> asyncpg.Record:
    """The CallLog once the engine's lookup has settled it: ended, or holding `call_id`."""
    for _ in range(int(SETTLED_WITHIN_S * 10)):
        row = await call_log_row(pool, call_log_id)
        if row["callId"] == call_id if call_id is not None else row["status"] != "IN_PROGRESS":
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"CallLog {call_log_id} still unsettled after {SETTLED_WITHIN_S} s: {dict(row)}")


# ------------------------------------------------------------------------------------- through the engine


async def test_a_create_twilio_never_made_is_closed_not_placed_and_frees_the_slot_and_the_credits(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    caller = await dialer(pool, "Unplaced")
    to = callee()
    held = twilio.hold_create(to)
    call_log_id = await unconfirmed_by_the_api(api, caller, to)
    held.release(create=False)  # the request never reached Twilio: it has no such call
    await asyncio.wait_for(held.settled.wait(), 10)
    waiting = await call_log_row(pool, call_log_id)
    assert waiting["status"] == "IN_PROGRESS", "not judged while the request may still be on its way"
    assert await credits(pool, caller.organization_id) == CREDITS - 1  # the first minute, reserved

    log = await settled(pool, call_log_id)

    assert (log["status"], log["metadata"]["endReason"], log["duration"]) == ("FAILED", "not_placed", 0)
    assert log["callId"].startswith(PENDING_CALL_ID_PREFIX)
    assert await credits(pool, caller.organization_id) == CREDITS, "the reserved minute came back"
    assert await calls_ended(pool, call_log_id) == 1
    assert twilio.creates[to] == 0
    next_call = callee()
    twilio.behave(next_call, Busy())
    status, body = await api.call("POST", "/calls", caller.tenant.owner_key, json=caller.call(next_call))
    assert status == 201, body  # the plan's only slot is free again
    assert (await finished_log(pool, body["callLogId"]))["metadata"]["endReason"] == "busy"


async def test_a_create_twilio_made_without_a_word_is_adopted_and_the_call_goes_on(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio, engine: Engine
) -> None:
    caller = await dialer(pool, "Adopted")
    to = callee()
    ringing = asyncio.Event()
    twilio.behave(to, NoAnswer(until=ringing))
    held = twilio.hold_create(to)
    try:
        call_log_id = await unconfirmed_by_the_api(api, caller, to)
        with engine.callbacks_lost():  # it had arrived: Twilio creates the call, and its first callbacks are lost
            held.release(create=True)
            await asyncio.wait_for(held.settled.wait(), 10)
            [created] = twilio.calls_to(to)
            for _ in range(100):
                if len(created.callback_responses) == 2:
                    break
                await asyncio.sleep(0.05)
            assert created.callback_responses == [502, 502], "initiated and ringing never reached the engine"
        assert (await call_log_row(pool, call_log_id))["callId"].startswith(PENDING_CALL_ID_PREFIX)

        adopted = await settled(pool, call_log_id, call_id=created.sid)
        assert adopted["status"] == "IN_PROGRESS"
    finally:
        ringing.set()  # nobody answers: Twilio's final callback must find the call by its CallSid

    log = await finished_log(pool, call_log_id)
    assert (log["status"], log["metadata"]["endReason"], log["callId"]) == ("MISSED", "no-answer", created.sid)
    assert created.callback_responses[-1] == 204
    assert twilio.creates[to] == 1
    assert await credits(pool, caller.organization_id) == CREDITS, "a call nobody answered costs nothing"


async def test_a_call_twilio_creates_after_its_call_log_was_closed_not_placed_is_hung_up_before_it_is_answered(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    caller = await dialer(pool, "Late")
    to = callee()
    twilio.behave(to, NoAnswer(ring_ms=int(SETTLED_WITHIN_S * 1000)))  # rings on until someone hangs it up
    held = twilio.hold_create(to)
    call_log_id = await unconfirmed_by_the_api(api, caller, to)
    closed = await settled(pool, call_log_id)  # the lookup found no call: the request seemed lost
    assert (closed["status"], closed["metadata"]["endReason"]) == ("FAILED", "not_placed")
    assert await credits(pool, caller.organization_id) == CREDITS

    held.release(create=True)  # Twilio creates the call after all, long after the request's deadline
    await asyncio.wait_for(held.settled.wait(), 10)
    [late] = twilio.calls_to(to)
    ended = await twilio.finished(late.sid, timeout=SETTLED_WITHIN_S)

    assert ended.updates[0] == {"Status": "completed"}, "hung up at its first callback"
    assert ended.status == "canceled" and ended.answered_at is None
    log = await call_log_row(pool, call_log_id)
    assert (log["status"], log["metadata"]["endReason"], log["duration"]) == ("FAILED", "not_placed", 0)
    assert await credits(pool, caller.organization_id) == CREDITS, "nothing charged for a call nobody ran"
    assert await calls_ended(pool, call_log_id) == 1


# ------------------------------------------------------------------------------------- the lookup itself


@pytest.fixture
async def impatient(db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, engine: Engine) -> AsyncIterator[OutboundDeps]:
    """What POST /v1/calls places calls with, but a Twilio client that gives up after 0.5 s instead of 10 s: the
    test's own clock runs well ahead of the engine's lookup."""
    client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base, timeout=0.5)
    settings = load_settings(database_url=db_url, max_concurrent_calls_free=FREE_PLAN_CALLS, **twilio_settings(twilio))
    try:
        yield OutboundDeps(pool=pool, settings=settings, twilio=client, public_url=engine.public_url)
    finally:
        await client.close()


async def unconfirmed_call(deps: OutboundDeps, twilio: FakeTwilio, caller: Dialer, to: str) -> tuple[str, datetime]:
    """place_call (as POST /v1/calls calls it) whose create Twilio never answered nor made; (CallLog id, written at)."""
    held = twilio.hold_create(to)
    with pytest.raises(PlacementUnconfirmed) as unconfirmed:
        await place_call(
            deps,
            organization_id=caller.organization_id,
            agent_id=caller.agent_id,
            from_number=caller.caller_id,
            to=to,
        )
    held.release(create=False)
    await asyncio.wait_for(held.settled.wait(), 10)
    call_log_id = unconfirmed.value.call_log_id
    return call_log_id, (await call_log_row(deps.pool, call_log_id))["createdAt"]


async def test_twilio_unreachable_during_the_lookup_decides_nothing_and_a_later_lookup_settles_it(
    pool: asyncpg.Pool, twilio: FakeTwilio, impatient: OutboundDeps
) -> None:
    caller = await dialer(pool, "Unreachable")
    to = callee()
    call_log_id, written_at = await unconfirmed_call(impatient, twilio, caller, to)
    now = written_at + REQUEST_SETTLED + timedelta(seconds=1)
    unreachable = TwilioCalls("AC" + "0" * 32, "token", api_base=f"http://127.0.0.1:{free_port()}")
    try:
        await PlacementLookup(pool, unreachable).settle(now=now, owner="cut-off")
    finally:
        await unreachable.close()
    untouched = await call_log_row(pool, call_log_id)
    assert (untouched["status"], untouched["callId"][: len(PENDING_CALL_ID_PREFIX)]) == (
        "IN_PROGRESS",
        PENDING_CALL_ID_PREFIX,
    ), "nothing is guessed"
    assert await credits(pool, caller.organization_id) == CREDITS - 1

    reachable = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
    try:
        lookup = PlacementLookup(pool, reachable)
        await lookup.settle(now=now, owner="other")
        assert (await call_log_row(pool, call_log_id))["status"] == "IN_PROGRESS", "the cut-off lookup's lease holds"
        assert lookups_of(twilio, to) == []
        await lookup.settle(now=now + timedelta(seconds=31), owner="other")
    finally:
        await reachable.close()

    log = await call_log_row(pool, call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "not_placed")
    assert lookups_of(twilio, to) == [{"To": to, "From": caller.caller_id, "PageSize": "50"}]
    assert await credits(pool, caller.organization_id) == CREDITS


async def test_two_engines_looking_at_once_settle_it_once(
    pool: asyncpg.Pool, twilio: FakeTwilio, impatient: OutboundDeps
) -> None:
    caller = await dialer(pool, "Twice")
    to = callee()
    call_log_id, written_at = await unconfirmed_call(impatient, twilio, caller, to)
    now = written_at + REQUEST_SETTLED + timedelta(seconds=1)
    clients = [TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base) for _ in range(2)]
    try:
        await asyncio.gather(
            *(
                PlacementLookup(pool, client).settle(now=now, owner=owner)
                for client, owner in zip(clients, ("engine-a", "engine-b"), strict=True)
            )
        )
    finally:
        for client in clients:
            await client.close()

    log = await call_log_row(pool, call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "not_placed")
    assert len(lookups_of(twilio, to)) == 1, "one engine asked Twilio; the other found the CallLog leased"
    assert await calls_ended(pool, call_log_id) == 1
    assert await credits(pool, caller.organization_id) == CREDITS
