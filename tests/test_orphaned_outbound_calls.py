"""An outbound call whose CallLog no longer exists (the dashboard deletes rows in SQL, also of calls being placed) rings
no more: its first signed status callback that finds no CallLog hangs it up through Twilio, canceled if nobody has
answered, completed if someone has. Only a call Twilio holds for this account, named by a callback Twilio signed with
the CallLog id the engine gave it. The real engine on loopback, the fake Twilio, a real PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from engine.twilio.outbound_calls import OutboundDeps, PlacedCall, place_call
from engine.twilio.rest import TwilioCalls
from storage import organizations, phone_numbers
from storage.records import new_id
from tests.fakes.twilio import Answer, FakeCall, FakeTwilio, NoAnswer
from tests.test_dispatch_do_not_call import deps, engine  # noqa: F401 (fixtures)
from tests.test_outbound_calls import callee, make_agent, post_status

FINISHED_WITHIN_S = 30.0
"""A ceiling for slow machines: a call hung up at its first callback ends well within it."""
HUNG_UP = "which no longer exists"
"""What the engine's log says of a call it hangs up because its CallLog is gone."""

Dialer = tuple[str, str, str]
"""An organization, its outbound number and its outbound agent."""


@pytest.fixture(scope="module")
async def dialer(pool: asyncpg.Pool) -> Dialer:
    """An organization with credits, its outbound number and an outbound agent: (organization, caller id, agent)."""
    org = await organizations.create_organization(pool, name="Orphans", slug="orphans", credits=100)
    number = await phone_numbers.create_phone_number(pool, organization_id=org.id, phone_number="+15550199301")
    return org.id, number.phone_number, await make_agent(pool, org.id)


async def delete_call_log(pool: asyncpg.Pool, call_log_id: str) -> None:
    """Delete the CallLog in SQL, as the dashboard does."""
    assert await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call_log_id) == "DELETE 1"


def said(caplog: pytest.LogCaptureFixture, call_sid: str) -> int:
    """How many of the engine's log records (it runs in this process) say `call_sid` was hung up as an orphan."""
    return sum(1 for record in caplog.records if HUNG_UP in (text := record.getMessage()) and call_sid in text)


async def dial(placing: OutboundDeps, dialer: Dialer, to: str) -> PlacedCall:
    """Place a call to `to` through `placing` as the dialer's agent, from its number."""
    organization_id, caller_id, agent_id = dialer
    return await place_call(placing, organization_id=organization_id, agent_id=agent_id, from_number=caller_id, to=to)


@asynccontextmanager
async def ringing_call(placing: OutboundDeps, twilio: FakeTwilio, dialer: Dialer) -> AsyncIterator[PlacedCall]:
    """A call placed through `placing` that rings, unanswered, until the block exits or someone hangs it up."""
    to = callee()
    ringing = asyncio.Event()
    twilio.behave(to, NoAnswer(until=ringing))
    try:
        yield await dial(placing, dialer, to)
    finally:
        ringing.set()


async def posted(call: FakeCall, status: str) -> None:
    """Wait until the fake has posted the call's `status` callback and had the engine's answer."""
    for _ in range(200):
        if status in call.statuses_posted[: len(call.callback_responses)]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"call {call.sid} never posted {status}: {call.statuses_posted}")


async def test_a_call_twilio_makes_after_its_call_log_was_deleted_is_canceled_before_it_is_answered(
    deps: OutboundDeps,  # noqa: F811 (the fixture)
    twilio: FakeTwilio,
    pool: asyncpg.Pool,
    dialer: Dialer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    to = callee()
    ringing = asyncio.Event()
    twilio.behave(to, NoAnswer(until=ringing))  # rings on until someone hangs it up
    held = twilio.hold_create(to)
    placing = asyncio.create_task(dial(deps, dialer, to))
    try:
        await asyncio.wait_for(held.arrived.wait(), 10)
        call_log_id = await pool.fetchval('SELECT "id" FROM "CallLog" WHERE "phoneNumber" = $1', to)
        await delete_call_log(pool, call_log_id)  # while Twilio has the request
        held.release(create=True)
        placed = await placing
        ended = await twilio.finished(placed.call_sid, timeout=FINISHED_WITHIN_S)
    finally:
        ringing.set()

    assert ended.updates == [{"Status": "canceled"}], "canceled at its first callback"
    assert ended.status == "canceled" and ended.answered_at is None
    assert set(ended.callback_responses) == {204}
    assert said(caplog, placed.call_sid) == 1


async def test_a_call_whose_call_log_is_deleted_while_it_rings_is_hung_up_as_it_is_answered(
    deps: OutboundDeps,  # noqa: F811 (the fixture)
    twilio: FakeTwilio,
    pool: asyncpg.Pool,
    dialer: Dialer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    to = callee()
    answer = asyncio.Event()
    twilio.behave(to, Answer(until=answer))
    placed = await dial(deps, dialer, to)
    await posted(twilio.calls[placed.call_sid], "ringing")
    await delete_call_log(pool, placed.call_log_id)
    answer.set()  # nothing tells the engine before the person answers: the answered callback does
    ended = await twilio.finished(placed.call_sid, timeout=FINISHED_WITHIN_S)

    assert ended.updates == [{"Status": "completed"}]
    assert ended.stream is None, "the person was never connected to a call nobody runs"
    assert set(ended.callback_responses) == {204}
    assert said(caplog, placed.call_sid) == 1


async def test_a_retried_callback_of_a_call_hung_up_so_asks_nothing_more_of_twilio(
    *,
    deps: OutboundDeps,  # noqa: F811 (the fixture)
    twilio: FakeTwilio,
    engine: str,  # noqa: F811 (the fixture)
    pool: asyncpg.Pool,
    dialer: Dialer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with ringing_call(deps, twilio, dialer) as placed:
        await posted(twilio.calls[placed.call_sid], "ringing")
        await delete_call_log(pool, placed.call_log_id)
        retried = {"CallSid": placed.call_sid, "CallStatus": "ringing", "AccountSid": twilio.account_sid}
        assert await post_status(engine, twilio, placed.call_log_id, retried) == 204
        ended = await twilio.finished(placed.call_sid, timeout=FINISHED_WITHIN_S)
        for _ in range(2):  # Twilio retrying the callback it had no answer to
            assert await post_status(engine, twilio, placed.call_log_id, retried) == 204

    assert ended.updates == [{"Status": "canceled"}] and ended.status == "canceled"
    assert said(caplog, placed.call_sid) == 1


async def test_a_signed_callback_naming_no_call_log_hangs_up_no_call_it_does_not_own(
    *,
    deps: OutboundDeps,  # noqa: F811 (the fixture)
    twilio: FakeTwilio,
    engine: str,  # noqa: F811 (the fixture)
    dialer: Dialer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    direct_to = callee()
    direct_ringing = asyncio.Event()
    twilio.behave(direct_to, NoAnswer(until=direct_ringing))
    client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
    async with ringing_call(deps, twilio, dialer) as placed:
        try:
            # A call of the account the engine did not place (another application's), its callbacks going elsewhere.
            direct = await client.place_call(
                to=direct_to,
                from_=dialer[1],
                twiml="<Response><Hangup/></Response>",
                status_callback="http://127.0.0.1:9/elsewhere",
                status_events=["initiated"],
                ring_timeout_seconds=30,
            )
            nobody = new_id()  # no CallLog ever had this id
            callbacks = [
                (nobody, placed.call_sid, twilio.account_sid),  # a call of another, existing CallLog
                (nobody, direct, "AC" + secrets.token_hex(16)),  # named as another account's
                (nobody, "CA" + secrets.token_hex(16), twilio.account_sid),  # a call Twilio does not hold
                ("", direct, twilio.account_sid),  # no CallLog named at all (an inbound call's callbacks)
            ]
            for call_log_id, call_sid, account_sid in callbacks:
                fields = {"CallSid": call_sid, "CallStatus": "ringing", "AccountSid": account_sid}
                assert await post_status(engine, twilio, call_log_id, fields) == 204
        finally:
            direct_ringing.set()
            await client.close()

    assert twilio.calls[placed.call_sid].updates == []
    assert twilio.calls[direct].updates == []
    assert not any(HUNG_UP in record.getMessage() for record in caplog.records)
