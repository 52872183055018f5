"""A transfer whose request Twilio does not answer in time (the fake Twilio holds it, then acts on it when the test
says): the model is told what Twilio's record shows, never a failure Twilio may yet undo by handing the caller over;
and a call whose transfer's fate is unknown is never ended in a way that would cut the caller off from where Twilio
took them. Outbound calls placed through the fake Twilio, the Deepgram and OpenAI fakes behind their real SDKs, real
PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg

from engine.call.driver import TRANSFER_FAILED
from engine.twilio.outbound_calls import OutboundDeps, PlacedCall
from pipelines.tools import transfer_unconfirmed, transferring
from storage import transfer_legs
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.openai_chat import FakeOpenAI
from tests.fakes.twilio import FakeCall, FakeTwilio, dialed_number
from tests.sse_client import EventStream
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_outbound_calls import finished_log
from tests.test_transfer_stream_stop import (
    BILLING,
    RATE,
    Fakes,
    deepgram,
    deps,
    held_call,
    model_answered,
    openai,
    settings,
)

__all__ = ["deepgram", "deps", "openai", "settings"]  # that module's fixtures: the engine and the fakes behind it


async def held_transfer(
    deps: OutboundDeps, pool: asyncpg.Pool, fakes: Fakes, tenant: Tenant, **options: Any
) -> tuple[PlacedCall, FakeCall, asyncio.Event]:
    """held_call's call (its model's transfer request held by Twilio until the gate returned is set), whose callee
    stays on the line a minute."""
    return await held_call(deps, pool, tenant, fakes, stays_ms=60_000, **options)


@contextlib.asynccontextmanager
async def events(deps: OutboundDeps, tenant: Tenant) -> AsyncIterator[EventStream]:
    """The tenant's live event stream."""
    async with (
        aiohttp.ClientSession() as session,
        EventStream(session, f"{deps.public_url}/v1/live-calls/events", tenant.owner_key) as stream,
    ):
        yield stream


async def ended_or_updated_again(call: FakeCall) -> None:
    """Once the call has ended, or the engine has asked Twilio for something after its transfer."""
    while not call.finished.is_set() and len(call.updates) < 2:  # noqa: ASYNC110 (two conditions of the fake's)
        await asyncio.sleep(0.05)


def transfer_results(stream: EventStream) -> list[str]:
    """What the stream's transfer_call tool.call events told."""
    return [event.data["result"] for event in stream.of_type("tool.call") if event.data["name"] == "transfer_call"]


async def test_a_transfer_twilio_makes_just_after_its_request_timed_out_is_not_told_as_failed(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """The engine gives up waiting for Twilio's answer, and Twilio then leaves the stream for the `<Dial>`: the engine
    asks Twilio's record before it tells anyone, so neither the model nor the tool.call events hear of a failure,
    and the agent does not start telling the caller it could not transfer them."""
    tenant = await make_tenant(pool, "Late dial", credits=1000)
    async with events(deps, tenant) as stream:
        placed, call, gate = await held_transfer(deps, pool, (twilio, deepgram, openai), tenant)
        await asyncio.wait_for(call.abandoned.wait(), 60)  # the engine's request to Twilio timed out
        gate.set()  # then Twilio carries it out: `stop` on the stream, and its <Dial>
        log = await finished_log(pool, placed.call_log_id)
        await stream.until(lambda event: event.type == "call.ended")

    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred"), log["metadata"]
    assert transfer_results(stream) == [transferring(BILLING)]
    said = await pool.fetch(
        """SELECT "text" FROM "CallTurn" WHERE "callLogId" = $1 AND "speaker" = 'agent' """, placed.call_log_id
    )
    assert TRANSFER_FAILED not in [row["text"] for row in said]
    [dial] = twilio.dialed_calls[placed.call_sid]
    assert (dial.to, dial.status) == (BILLING, "in-progress")


async def test_a_transfer_twilio_never_answers_is_told_as_unconfirmed_not_failed(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """Twilio neither answers the request nor shows a dialed call in its record: the model hears that the transfer
    is unconfirmed and may still go through, not that it failed; the call goes on, its leg held."""
    tenant = await make_tenant(pool, "Unconfirmed", credits=1000)
    async with events(deps, tenant) as stream:
        placed, call, gate = await held_transfer(deps, pool, (twilio, deepgram, openai), tenant)
        try:
            told = await stream.until(
                lambda event: event.type == "tool.call" and event.data["result"] != transferring(BILLING), timeout=90
            )
            async with aiohttp.ClientSession() as session:
                status, _ = await Api(session, deps.public_url).call(
                    "POST", f"/live-calls/{placed.call_log_id}/hangup", tenant.owner_key
                )
        finally:
            gate.set()

    assert (told.data["ok"], told.data["result"]) == (False, transfer_unconfirmed(BILLING))
    assert status == 202
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=placed.call_log_id) == 5 * RATE
    assert [dialed_number(update["Twiml"]) for update in call.updates if "Twiml" in update] == [BILLING]


async def test_a_call_whose_transfer_twilio_has_not_answered_is_hung_up_without_cutting_a_late_transfer(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """The call is hung up (through the API) while Twilio still holds the transfer request it never answered, and
    Twilio then acts on what it holds: the engine did not ask Twilio to complete the call, which would have cut the
    caller off from a `<Dial>` made first; it closed its stream, which ends a call still on it and no other."""
    tenant = await make_tenant(pool, "Hung up", credits=1000)
    async with events(deps, tenant) as stream:
        placed, call, gate = await held_transfer(deps, pool, (twilio, deepgram, openai), tenant)
        try:
            await stream.until(
                lambda event: event.type == "tool.call" and event.data["result"] != transferring(BILLING), timeout=90
            )
            async with aiohttp.ClientSession() as session:
                hang_up = asyncio.create_task(
                    Api(session, deps.public_url).call(
                        "POST", f"/live-calls/{placed.call_log_id}/hangup", tenant.owner_key
                    )
                )
                await asyncio.wait_for(ended_or_updated_again(call), 60)
                gate.set()  # Twilio acts on what it holds, in order: the transfer first
                status, body = await hang_up
        finally:
            gate.set()
        log = await finished_log(pool, placed.call_log_id)

    assert status == 202, body
    assert [dial.status for dial in twilio.dialed_calls.get(placed.call_sid, [])] in ([], ["in-progress"])
    assert [update for update in call.updates if update.get("Status") == "completed"] == []
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "api_hangup"), log["metadata"]


async def test_a_call_hung_up_while_twilio_holds_its_transfer_request_is_not_cut_off_from_the_transfer(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """The call is hung up (through the API) while its transfer request waits for Twilio's answer, and Twilio then
    carries the transfer out: the hang-up waited for that answer instead of asking Twilio to complete the call, which
    would have cut the caller off from the `<Dial>`; the call ends transferred, its leg held for the dial."""
    tenant = await make_tenant(pool, "Hung up early", credits=1000)
    placed, call, gate = await held_transfer(deps, pool, (twilio, deepgram, openai), tenant)
    try:
        await asyncio.wait_for(call.updated.wait(), 60)  # Twilio holds the transfer request
        async with aiohttp.ClientSession() as session:
            hang_up = asyncio.create_task(
                Api(session, deps.public_url).call("POST", f"/live-calls/{placed.call_log_id}/hangup", tenant.owner_key)
            )
            with contextlib.suppress(TimeoutError):  # the hang-up reaches Twilio, or waits in the engine
                await asyncio.wait_for(ended_or_updated_again(call), 3)
            gate.set()  # Twilio acts on what it holds, in order: the transfer first
            status, body = await hang_up
    finally:
        gate.set()
    log = await finished_log(pool, placed.call_log_id)

    assert status == 202, body
    assert [dial.status for dial in twilio.dialed_calls[placed.call_sid]] == ["in-progress"]
    assert [update for update in call.updates if update.get("Status") == "completed"] == []
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred"), log["metadata"]
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=placed.call_log_id) == 5 * RATE


async def test_a_transfer_through_the_api_twilio_never_answers_asks_its_record_then_answers_unconfirmed(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """The API's transfer follows the model's rule: Twilio neither answers the request nor shows a dialed call in
    its record, asked after the request timed out; the API answers 504 `twilio_unconfirmed`, the call goes on,
    its leg held until Twilio's record settles it."""
    tenant = await make_tenant(pool, "API unconfirmed", credits=1000)
    placed, call, gate = await held_transfer(deps, pool, (twilio, deepgram, openai), tenant, model_transfers=False)
    await model_answered(openai)
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(session, deps.public_url)
            path = f"/live-calls/{placed.call_log_id}"
            status, body = await api.call("POST", f"{path}/transfer", tenant.owner_key, json={"to": BILLING})
            held = await transfer_legs.reserved_leg_credits(pool, call_log_id=placed.call_log_id)
            hung_up, _ = await api.call("POST", f"{path}/hangup", tenant.owner_key)
    finally:
        gate.set()
    log = await finished_log(pool, placed.call_log_id)

    assert (status, body["error"]["code"]) == (504, "twilio_unconfirmed"), body
    assert "may still make it" in body["error"]["message"]
    assert call.abandoned.is_set()  # the request timed out, and then
    assert any(lookup.get("ParentCallSid") == placed.call_sid for lookup in twilio.lookups)  # the record was asked
    assert held == 5 * RATE
    assert hung_up == 202
    assert [update for update in call.updates if update.get("Status") == "completed"] == []
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "api_hangup"), log["metadata"]


async def credits_held(pool: asyncpg.Pool, organization_id: str, call_log_id: str) -> int:
    """The organization's balance with what its call holds: its credit reservation and its open transfer leg."""
    held: int = await pool.fetchval(
        """
        SELECT o."credits"
             + COALESCE((SELECT "credits" FROM "CreditReservation" WHERE "callLogId" = $2), 0)
             + COALESCE((SELECT sum("credits") FROM "TransferLeg" WHERE "callLogId" = $2 AND "endedAt" IS NULL), 0)
        FROM "Organization" o WHERE o."id" = $1
        """,
        organization_id,
        call_log_id,
    )
    return held


async def test_a_transfer_after_one_twilio_never_made_settles_that_one_by_its_record_and_is_made(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """The model's transfer request never reached Twilio (it went unanswered, and Twilio's record shows no dialed
    call); a transfer asked through the API then asks the record again, returns the first one's leg, and is made:
    the call ends transferred with one leg held, the first one's credits back in the balance."""
    tenant = await make_tenant(pool, "Second try", credits=1000)
    async with events(deps, tenant) as stream:
        placed, call, gate = await held_transfer(deps, pool, (twilio, deepgram, openai), tenant)
        call.lose_abandoned = True
        try:
            await stream.until(
                lambda event: event.type == "tool.call" and event.data["result"] != transferring(BILLING), timeout=90
            )
        finally:
            gate.set()  # the request the engine gave up on never reached Twilio
        before = await credits_held(pool, tenant.organization_id, placed.call_log_id)
        async with aiohttp.ClientSession() as session:
            status, body = await Api(session, deps.public_url).call(
                "POST", f"/live-calls/{placed.call_log_id}/transfer", tenant.owner_key, json={"to": BILLING}
            )
        after = await credits_held(pool, tenant.organization_id, placed.call_log_id)
        log = await finished_log(pool, placed.call_log_id)

    assert (status, body) == (202, {"callLogId": placed.call_log_id, "to": BILLING}), body
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred"), log["metadata"]
    [dial] = twilio.dialed_calls[placed.call_sid]
    assert (dial.to, dial.status) == (BILLING, "in-progress")
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=placed.call_log_id) == 5 * RATE
    assert after == before  # one leg held at a time: the first one's credits returned as the second's were taken


async def test_a_transfer_twilio_makes_late_while_its_record_cannot_be_read_still_ends_the_call_transferred(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """The transfer is unconfirmed; Twilio then carries it out (`stop`, its `<Dial>`) while its record does not
    answer: the call's end asks the record again until it answers, and ends transferred, not caller_hangup."""
    tenant = await make_tenant(pool, "Record down", credits=1000)
    async with events(deps, tenant) as stream:
        placed, _, gate = await held_transfer(deps, pool, (twilio, deepgram, openai), tenant)
        record = asyncio.Event()  # Twilio's record of dialed calls, held from the transfer's end on
        try:
            await stream.until(
                lambda event: event.type == "tool.call" and event.data["result"] != transferring(BILLING), timeout=90
            )
            asked = len(twilio.lookups)
            twilio.lookup_gate = record  # the record answers nothing: the engine's lookups time out
            gate.set()  # Twilio carries the transfer out
            await asyncio.wait_for(asked_again_or_ended(twilio, asked, pool, placed.call_log_id), 90)
        finally:
            twilio.lookup_gate = None
            record.set()
            gate.set()
        log = await finished_log(pool, placed.call_log_id)

    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred"), log["metadata"]
    assert [dial.to for dial in twilio.dialed_calls[placed.call_sid]] == [BILLING]


async def asked_again_or_ended(twilio: FakeTwilio, asked: int, pool: asyncpg.Pool, call_log_id: str) -> None:
    """Once Twilio's record has been asked twice since `asked` lookups (the first gave up), or the call has ended."""
    while len(twilio.lookups) < asked + 2:
        status = await pool.fetchval('SELECT "status" FROM "CallLog" WHERE "id" = $1', call_log_id)
        if status != "IN_PROGRESS":
            return
        await asyncio.sleep(0.1)


async def test_a_hang_up_told_no_dial_as_twilio_leaves_for_the_transfer_ends_the_call_transferred(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """The call is hung up (through the API; the max-duration goodbye's hang-up is the same) with its transfer
    unconfirmed, and Twilio's record, asked by the hang-up, answers that it dialed nobody; before that answer comes,
    Twilio carries the transfer out (`stop`, its `<Dial>`): the stale answer does not decide the end, the record asked
    after the `stop` does, and the call ends transferred, not api_hangup."""
    tenant = await make_tenant(pool, "Stale record", credits=1000)
    async with events(deps, tenant) as stream:
        placed, _, gate = await held_transfer(deps, pool, (twilio, deepgram, openai), tenant)
        answers = asyncio.Queue[asyncio.Event]()
        held: list[asyncio.Event] = []
        try:
            await stream.until(
                lambda event: event.type == "tool.call" and event.data["result"] != transferring(BILLING), timeout=90
            )
            twilio.lookup_answers = answers
            async with aiohttp.ClientSession() as session:
                hang_up = asyncio.create_task(
                    Api(session, deps.public_url).call(
                        "POST", f"/live-calls/{placed.call_log_id}/hangup", tenant.owner_key
                    )
                )
                held.append(await asyncio.wait_for(answers.get(), 60))  # the hang-up's lookup: no dial, on its way
                gate.set()  # Twilio carries the transfer out: `stop` on the stream, then its <Dial>
                held.append(await asyncio.wait_for(answers.get(), 60))  # the lookup the engine makes after the stop
                held[0].set()
                status, body = await hang_up  # answered once the engine has read the hang-up's lookup
            held[1].set()
            log = await finished_log(pool, placed.call_log_id)
        finally:
            twilio.lookup_answers = None
            for answer in held:
                answer.set()
            while not answers.empty():
                answers.get_nowait().set()
            gate.set()

    assert status == 202, body
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred"), log["metadata"]
    assert [dial.to for dial in twilio.dialed_calls[placed.call_sid]] == [BILLING]


async def test_a_transfer_twilio_makes_late_before_its_record_shows_the_dial_ends_the_call_transferred(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """The transfer is unconfirmed; Twilio then carries it out (`stop`), but its record, asked as the `stop` comes,
    does not show the `<Dial>`'s call yet: the engine asks it again for a while before it decides the caller hung
    up, and the call ends transferred."""
    tenant = await make_tenant(pool, "Record behind", credits=1000)
    async with events(deps, tenant) as stream:
        placed, call, gate = await held_transfer(deps, pool, (twilio, deepgram, openai), tenant)
        answers = asyncio.Queue[asyncio.Event]()
        try:
            await stream.until(
                lambda event: event.type == "tool.call" and event.data["result"] != transferring(BILLING), timeout=90
            )
            call.dials_late = True
            twilio.lookup_answers = answers
            gate.set()  # Twilio carries the transfer out: `stop` on the stream; its record does not show the dial yet
            stale = await asyncio.wait_for(answers.get(), 60)  # the engine's lookup after the stop: no dial
            twilio.lookup_answers = None
            twilio.record_dials(call)
            stale.set()
            log = await finished_log(pool, placed.call_log_id)
        finally:
            twilio.lookup_answers = None
            while not answers.empty():
                answers.get_nowait().set()
            twilio.record_dials(call)
            gate.set()

    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred"), log["metadata"]
    assert [dial.to for dial in twilio.dialed_calls[placed.call_sid]] == [BILLING]
