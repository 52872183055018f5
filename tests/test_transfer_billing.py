"""A transferred call's dialed leg is paid for: its credits are reserved before Twilio dials, its length is limited to
what they pay for (the agent's `transfer.maxMinutes` at most), and it is charged the minutes it talked when the
`<Dial>` ends, from Twilio's action request, or from the settlement sweep when that request never came."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from config.phone import NumberKind
from engine.call.driver import TRANSFER_FAILED
from engine.call.paid_transfer import PaidTransfer
from engine.simulator import CallResult, Pause, Say
from engine.twilio.rest import CallLookupFailed, TwilioCalls
from engine.twilio.signature import request_signature
from engine.twilio.webhooks import TRANSFER_UNANSWERED
from engine.workers.transfer_settlement import settle_overdue_legs
from storage import call_logs, dial_policies, organizations, phone_numbers, transfer_legs
from storage.enums import CallStatus
from storage.errors import NotFound
from storage.events import create_event
from storage.organizations import InsufficientCredits
from storage.records import Connection, Queryable
from storage.tenancy import tenant_transaction
from storage.transfer_legs import TransferLeg
from tests.engine_server import running_engine
from tests.fakes.openai_chat import ToolCall
from tests.fakes.server import serve
from tests.fakes.twilio import Dialed, call_updates, dialed, dialed_number
from tests.test_calls_e2e import call_log, turns
from tests.test_cloud_calls_e2e import TOKEN, Fakes, call, make_line, running_fakes
from tests.test_repo_call_logs import open_call

ACCOUNT = "AC" + "4" * 32
BILLING = "+14155550199"
HOOK_URL = "http://127.0.0.1:9/hooks"  # never delivered (a private address): the outbox rows are what is checked
RATE = 10
"""Credits a minute, on every plan, in these tests."""
RATES = {"free": RATE, "pro": RATE, "enterprise": RATE}
_names = itertools.count(1)


@dataclass
class Line:
    """The engine (with a Twilio account whose REST API records updates) and what it reaches."""

    base: str
    fakes: Fakes
    updates: list[dict[str, str]]


@pytest.fixture(scope="module")
async def line(db_url: str) -> AsyncIterator[Line]:
    async with (
        call_updates() as (api_base, updates),
        running_fakes() as fakes,
        running_engine(
            db_url,
            twilio_auth_token=TOKEN,
            twilio_account_sid=ACCOUNT,
            twilio_api_base=api_base,
            credits_per_minute_free=RATE,
            credits_per_minute_pro=RATE,
            credits_per_minute_enterprise=RATE,
            **fakes.settings(),
        ) as base,
    ):
        yield Line(base, fakes, updates)


async def organization(pool: asyncpg.Pool, credits: int) -> str:
    """An organization with a US number: by default it dials the US (storage.dial_policies), where BILLING is."""
    n = next(_names)
    org = await organizations.create_organization(pool, name=f"Transfers {n}", slug=f"transfers-{n}", credits=credits)
    await phone_numbers.create_phone_number(pool, organization_id=org.id, phone_number=f"+1303555{n:04d}")
    return org.id


async def open_leg(pool: asyncpg.Pool, organization_id: str, call_log_id: str, max_minutes: int) -> TransferLeg:
    """Open the call's transfer leg to billing at the tests' rates."""
    return await transfer_legs.open_leg(
        pool, organization_id=organization_id, call_log_id=call_log_id, to=BILLING, max_minutes=max_minutes, rates=RATES
    )


async def balance(db: Queryable, organization_id: str) -> int:
    credits: int = await db.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', organization_id)
    return credits


async def transferred_call(line: Line, pool: asyncpg.Pool, organization_id: str, max_minutes: int) -> CallResult:
    """A caller asks for billing; the model transfers them there."""
    number, _ = await make_line(
        pool,
        organization_id,
        firstSentence="Hi.",
        transfer={"destinations": [{"number": BILLING, "label": "Billing"}], "maxMinutes": max_minutes},
    )
    line.fakes.deepgram.transcripts.extend(["Put me through to billing."])
    line.fakes.openai.replies.extend(
        [["Transferring you now.", ToolCall("transfer_call", {"phone_number": BILLING, "reason": "billing"})]]
    )
    return await call(line.base, number, Say("put me through to billing"), Pause(4000))


async def dial_ends(url: str, call_sid: str, status: str, duration_s: int | None) -> tuple[int, str]:
    """Twilio's action request at the end of a `<Dial>`, signed: its HTTP status and the TwiML answered."""
    fields = {"AccountSid": ACCOUNT, "CallSid": call_sid, "DialCallStatus": status, "DialCallSid": "CA" + "9" * 32}
    if duration_s is not None:
        fields["DialCallDuration"] = str(duration_s)
    headers = {"X-Twilio-Signature": request_signature(TOKEN, url, fields)}
    async with aiohttp.ClientSession() as session, session.post(url, data=fields, headers=headers) as response:
        return response.status, await response.text()


async def queued_data(pool: asyncpg.Pool, organization_id: str, event: str) -> list[dict[str, Any]]:
    """The data of each `event` delivery queued for the organization's subscribers."""
    rows = await pool.fetch(
        """SELECT "payload" FROM "WebhookDelivery" WHERE "organizationId" = $1 AND "event" = $2""",
        organization_id,
        event,
    )
    return [row["payload"]["data"] for row in rows]


async def dialing_transfer(line: Line, pool: asyncpg.Pool, credits: int) -> tuple[CallResult, asyncpg.Record, Dialed]:
    """A call transferred to billing (for at most 30 minutes) by an organization holding `credits` and subscribed to
    transfer.ended; the call, its CallLog and the dial Twilio was asked for, which has not ended yet."""
    organization_id = await organization(pool, credits=credits)
    await create_event(pool, organization_id=organization_id, name="transfer.ended", webhook_url=HOOK_URL)
    result = await transferred_call(line, pool, organization_id, max_minutes=30)
    log = await call_log(pool, result)
    update = next(u for u in line.updates if u["sid"] == result.call_sid)
    dial = dialed(update["Twiml"])
    assert dial is not None
    return result, log, dial


async def test_a_transfer_reserves_its_longest_leg_and_pays_for_the_minutes_it_talked(
    line: Line, pool: asyncpg.Pool
) -> None:
    result, log, dial = await dialing_transfer(line, pool, credits=1000)
    organization_id = log["organizationId"]
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred")
    assert dial.number == BILLING
    assert dial.time_limit_seconds == 30 * 60  # the agent's limit: the balance pays for more
    assert dial.action == f"{line.base}/twilio/dial?callLogId={log['id']}"
    # The agent's minute is charged; the leg's 30 minutes are held while it talks.
    assert await balance(pool, organization_id) == 1000 - RATE - 30 * RATE

    status, twiml = await dial_ends(dial.action, result.call_sid, "completed", 125)
    assert status == 200 and "<Hangup />" in twiml and "<Say>" not in twiml
    assert await balance(pool, organization_id) == 1000 - RATE - 3 * RATE  # 125 s: three started minutes
    log = await call_log(pool, result)
    assert log["metadata"]["transfer"] == {
        "to": BILLING,
        "dialStatus": "completed",
        "durationSeconds": 125,
        "timeLimitSeconds": 1800,
        "creditsCharged": 3 * RATE,
    }
    # Twilio retrying its request charges nothing more, and subscribers hear of the transfer's end once.
    assert (await dial_ends(dial.action, result.call_sid, "completed", 125))[0] == 200
    assert await balance(pool, organization_id) == 1000 - RATE - 3 * RATE
    assert await queued_data(pool, organization_id, "transfer.ended") == [
        {
            "callLogId": log["id"],
            "agentId": log["agentId"],
            "campaignId": None,
            "to": BILLING,
            "dialStatus": "completed",
            "durationSeconds": 125,
            "timeLimitSeconds": 1800,
            "creditsCharged": 3 * RATE,
        }
    ]


async def test_a_transfer_whose_call_log_is_deleted_during_the_dial_is_charged_its_minutes_once(
    line: Line, pool: asyncpg.Pool
) -> None:
    # The dashboard deletes CallLog rows in SQL; the leg Twilio is dialing is still paid for, once, by its action.
    result, log, dial = await dialing_transfer(line, pool, credits=1000)
    organization_id = log["organizationId"]
    assert dial.action == f"{line.base}/twilio/dial?callLogId={log['id']}"
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', log["id"])
    assert await balance(pool, organization_id) == 1000 - RATE - 30 * RATE  # still held while it talks

    status, twiml = await dial_ends(dial.action, result.call_sid, "completed", 125)
    assert status == 200 and "<Hangup />" in twiml
    assert await balance(pool, organization_id) == 1000 - RATE - 3 * RATE  # 125 s: three started minutes
    assert (await dial_ends(dial.action, result.call_sid, "completed", 125))[0] == 200
    assert await balance(pool, organization_id) == 1000 - RATE - 3 * RATE
    assert [data["creditsCharged"] for data in await queued_data(pool, organization_id, "transfer.ended")] == [3 * RATE]
    assert await pool.fetchval('SELECT count(*) FROM "DetachedTransferLeg" WHERE "callLogId" = $1', log["id"]) == 0


async def test_a_dial_ending_while_its_call_log_is_deleted_is_settled_by_its_action_not_left_to_the_sweep(
    line: Line, pool: asyncpg.Pool, db_url: str
) -> None:
    # The deletion waits for a writer of the CallLog (its call's own), and the dial's action request comes meanwhile:
    # both go through in turn. Taking the leg before the CallLog, the action deadlocked with the deletion's trigger
    # (CallLog, then the leg) and left the settlement to the sweep, half an hour later.
    result, log, dial = await dialing_transfer(line, pool, credits=1000)
    assert dial.action is not None
    writer, deleter = await asyncpg.connect(db_url), await asyncpg.connect(db_url)
    try:
        writing = writer.transaction()
        await writing.start()
        await writer.execute('SELECT 1 FROM "CallLog" WHERE "id" = $1 FOR NO KEY UPDATE', log["id"])
        deleting = asyncio.create_task(deleter.execute('DELETE FROM "CallLog" WHERE "id" = $1', log["id"]))
        await asyncio.sleep(0.3)  # the deletion waits for the writer
        ending = asyncio.create_task(dial_ends(dial.action, result.call_sid, "completed", 125))
        await asyncio.sleep(0.3)  # the action waits too
        await writing.commit()
        await deleting
        assert (await ending)[0] == 200
    finally:
        await writer.close()
        await deleter.close()

    assert await balance(pool, log["organizationId"]) == 1000 - RATE - 3 * RATE  # 125 s: three started minutes
    assert [data["creditsCharged"] for data in await queued_data(pool, log["organizationId"], "transfer.ended")] == [
        3 * RATE
    ]


async def test_a_leg_released_while_its_call_log_is_deleted_returns_its_credits_at_once(
    pool: asyncpg.Pool, db_url: str
) -> None:
    # Twilio refused the dial as the dashboard deleted the running call, whose organization another call's meter was
    # charging: the deletion and the release both go through, and the leg's credits come back now, not from the
    # sweep half an hour later. Taking the leg before the CallLog, the release deadlocked with the deletion's trigger.
    organization_id = await organization(pool, credits=1000)
    running = await open_call(pool, organization_id, credit_rates=RATES)
    await open_leg(pool, organization_id, running.id, max_minutes=30)
    meter, deleter = await asyncpg.connect(db_url), await asyncpg.connect(db_url)
    try:
        charging = meter.transaction()
        await charging.start()
        await meter.execute('SELECT 1 FROM "Organization" WHERE "id" = $1 FOR NO KEY UPDATE', organization_id)
        deleting = asyncio.create_task(deleter.execute('DELETE FROM "CallLog" WHERE "id" = $1', running.id))
        await asyncio.sleep(0.3)  # the deletion's trigger waits for the organization's row
        releasing = asyncio.create_task(transfer_legs.release_leg(pool, call_log_id=running.id))
        await asyncio.sleep(0.3)
        await charging.commit()
        await deleting
        assert await releasing == 1000
    finally:
        await meter.close()
        await deleter.close()

    assert await balance(pool, organization_id) == 1000  # its stream never started: the reserved minute is back too
    assert await pool.fetchval('SELECT count(*) FROM "DetachedTransferLeg" WHERE "callLogId" = $1', running.id) == 0


async def test_a_truncate_of_the_call_logs_keeps_the_credits_their_calls_hold(pool: asyncpg.Pool) -> None:
    # TRUNCATE fires no row trigger: a statement trigger settles the calls' reservations and detaches their open legs.
    organization_id = await organization(pool, credits=100)
    opened = await open_call(pool, organization_id, credit_rates=RATES)
    await open_leg(pool, organization_id, opened.id, 3)
    assert await balance(pool, organization_id) == 100 - RATE - 3 * RATE
    async with pool.acquire() as conn:
        truncation = conn.transaction()  # rolled back: the module's other tests keep their rows
        await truncation.start()
        try:
            await conn.execute('TRUNCATE "CallLog" CASCADE')
            kept = await balance(conn, organization_id)
            detached = await conn.fetchval(
                'SELECT "credits" FROM "DetachedTransferLeg" WHERE "callLogId" = $1', opened.id
            )
        finally:
            await truncation.rollback()
    # The call's minute comes back (its stream never started); the leg's three stay held, detached, for its dial.
    assert (kept, detached) == (100 - 3 * RATE, 3 * RATE)


async def test_a_leg_settled_before_its_call_log_is_deleted_goes_with_it_and_returns_nothing_more(
    pool: asyncpg.Pool,
) -> None:
    organization_id = await organization(pool, credits=100)
    opened = await open_call(pool, organization_id, credit_rates=RATES)
    await open_leg(pool, organization_id, opened.id, 3)
    await transfer_legs.settle_leg(pool, call_log_id=opened.id, dial_status="completed", duration_seconds=30)
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', opened.id)
    assert await pool.fetchval('SELECT count(*) FROM "TransferLeg" WHERE "callLogId" = $1', opened.id) == 0
    assert await pool.fetchval('SELECT count(*) FROM "DetachedTransferLeg" WHERE "callLogId" = $1', opened.id) == 0
    # The call's minute (its stream never started, so its reservation comes back whole) and the leg's one minute.
    assert await balance(pool, organization_id) == 100 - RATE


async def test_an_organization_deleted_with_a_call_whose_leg_is_open_leaves_nothing_behind(pool: asyncpg.Pool) -> None:
    organization_id = await organization(pool, credits=100)
    opened = await open_call(pool, organization_id, credit_rates=RATES)
    await open_leg(pool, organization_id, opened.id, 3)
    detached = await open_call(pool, organization_id, credit_rates=RATES)
    await open_leg(pool, organization_id, detached.id, 3)
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', detached.id)
    await pool.execute('DELETE FROM "Organization" WHERE "id" = $1', organization_id)
    for table in ("TransferLeg", "DetachedTransferLeg"):
        left = await pool.fetchval(
            f'SELECT count(*) FROM "{table}" WHERE "callLogId" = ANY($1)', [opened.id, detached.id]
        )
        assert left == 0, table


async def test_call_ended_of_a_transferred_call_names_its_leg_whose_settlement_follows_as_transfer_ended(
    line: Line, pool: asyncpg.Pool
) -> None:
    organization_id = await organization(pool, credits=1000)
    await create_event(pool, organization_id=organization_id, name="call.ended", webhook_url=HOOK_URL)
    await call_log(pool, await transferred_call(line, pool, organization_id, max_minutes=30))

    # Queued as the agent's part of the call ended, while the leg talks on.
    [ended] = await queued_data(pool, organization_id, "call.ended")
    assert (ended["endReason"], ended["transfer"]) == (
        "transferred",
        {"to": BILLING, "dialStatus": None, "durationSeconds": None, "timeLimitSeconds": 1800, "creditsCharged": None},
    )


async def test_call_ended_of_a_call_never_transferred_has_no_leg(line: Line, pool: asyncpg.Pool) -> None:
    organization_id = await organization(pool, credits=RATE + RATE - 1)  # the transfer cannot pay a minute
    await create_event(pool, organization_id=organization_id, name="call.ended", webhook_url=HOOK_URL)
    await call_log(pool, await transferred_call(line, pool, organization_id, max_minutes=60))

    [ended] = await queued_data(pool, organization_id, "call.ended")
    assert ended["endReason"] != "transferred" and ended["transfer"] is None


async def test_a_transfer_is_limited_to_what_the_credits_pay_for_and_an_unanswered_one_costs_nothing(
    line: Line, pool: asyncpg.Pool
) -> None:
    organization_id = await organization(pool, credits=6 * RATE + RATE // 2)
    result = await transferred_call(line, pool, organization_id, max_minutes=60)
    update = next(u for u in line.updates if u["sid"] == result.call_sid)
    dial = dialed(update["Twiml"])
    assert dial is not None and dial.action is not None
    assert dial.time_limit_seconds == 5 * 60  # the agent's first minute, then five whole minutes left
    assert await balance(pool, organization_id) == RATE // 2

    status, twiml = await dial_ends(dial.action, result.call_sid, "busy", None)
    assert status == 200
    assert f"<Say>{TRANSFER_UNANSWERED}</Say><Hangup />" in twiml  # the caller, still on the line, hears why
    assert await balance(pool, organization_id) == 5 * RATE + RATE // 2
    assert (await call_log(pool, result))["metadata"]["transfer"]["creditsCharged"] == 0


async def test_a_transfer_the_credits_cannot_pay_a_minute_of_is_not_made(line: Line, pool: asyncpg.Pool) -> None:
    organization_id = await organization(pool, credits=RATE + RATE - 1)
    result = await transferred_call(line, pool, organization_id, max_minutes=60)
    log = await call_log(pool, result)
    assert log["metadata"]["endReason"] != "transferred"
    assert all(u["sid"] != result.call_sid for u in line.updates)  # Twilio was never asked
    agent_said = [row["text"] for row in await turns(pool, log["id"]) if row["speaker"] == "agent"]
    assert TRANSFER_FAILED in agent_said
    assert await pool.fetchval('SELECT count(*) FROM "TransferLeg" WHERE "callLogId" = $1', log["id"]) == 0


async def test_an_unsigned_dial_action_is_refused(line: Line, pool: asyncpg.Pool) -> None:
    organization_id = await organization(pool, credits=100)
    opened = await open_call(pool, organization_id, credit_rates=RATES)
    await open_leg(pool, organization_id, opened.id, 5)
    url = f"{line.base}/twilio/dial?callLogId={opened.id}"
    fields = {"CallSid": opened.call_id, "DialCallStatus": "completed", "DialCallDuration": "1"}
    async with aiohttp.ClientSession() as session, session.post(url, data=fields) as response:
        assert response.status == 403
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=opened.id) == 5 * RATE


# ------------------------------------------------------------------------------------------------- storage


async def test_a_leg_at_a_free_rate_gets_its_whole_limit_and_settling_never_charges_more_than_it_holds(
    pool: asyncpg.Pool,
) -> None:
    organization_id = await organization(pool, credits=0)
    opened = await open_call(pool, organization_id, credit_rates=dict.fromkeys(RATES, 0))
    free = await open_leg(pool, organization_id, opened.id, 7)
    assert (free.time_limit_seconds, free.credits, free.credits_per_minute) == (7 * 60, 0, 0)  # the call's own rate

    paid = await organization(pool, credits=100)
    opened = await open_call(pool, paid, credit_rates=RATES)
    leg = await open_leg(pool, paid, opened.id, 2)
    assert (leg.time_limit_seconds, leg.credits) == (120, 2 * RATE)
    settled = await transfer_legs.settle_leg(pool, call_log_id=opened.id, dial_status="completed", duration_seconds=190)
    assert settled is not None and settled.credits_charged == 2 * RATE  # Twilio's second past the limit is not billed
    assert (
        await transfer_legs.settle_leg(pool, call_log_id=opened.id, dial_status="completed", duration_seconds=9) is None
    )
    assert await balance(pool, paid) == 100 - RATE - 2 * RATE


async def test_a_leg_is_opened_only_for_the_organizations_own_call_once_and_only_with_a_minute_of_credits(
    pool: asyncpg.Pool,
) -> None:
    ours = await organization(pool, credits=100)
    theirs = await organization(pool, credits=100)
    their_call = await open_call(pool, theirs, credit_rates=RATES)
    with pytest.raises(NotFound):
        await open_leg(pool, ours, their_call.id, 5)
    assert await balance(pool, ours) == 100

    poor = await organization(pool, credits=RATE + RATE - 1)
    opened = await open_call(pool, poor, credit_rates=RATES)
    with pytest.raises(InsufficientCredits):
        await open_leg(pool, poor, opened.id, 5)
    assert await balance(pool, poor) == RATE - 1

    opened = await open_call(pool, ours, credit_rates=RATES)
    await open_leg(pool, ours, opened.id, 1)
    with pytest.raises(asyncpg.UniqueViolationError):  # one transfer at a time
        await open_leg(pool, ours, opened.id, 1)
    # Twilio refused that one: its credits return, and the call may try again.
    assert await transfer_legs.release_leg(pool, call_log_id=opened.id) == 100 - RATE
    await open_leg(pool, ours, opened.id, 1)
    assert await balance(pool, ours) == 100 - 2 * RATE


# ------------------------------------------------------------------------------------------- the sweep


@dataclass
class DialedCalls:
    """Twilio's Calls list by ParentCallSid: the calls each `<Dial>` made, and the parents it cannot answer for."""

    children: dict[str, list[dict[str, Any]]]
    failing: set[str]


@pytest.fixture
async def twilio_lookups() -> AsyncIterator[tuple[TwilioCalls, DialedCalls]]:
    known = DialedCalls({}, set())

    async def calls(request: web.Request) -> web.Response:
        parent = request.query.get("ParentCallSid", "")
        if known.failing & set(request.query.values()):
            return web.json_response({"code": 20500, "message": "Internal Server Error", "status": 500}, status=500)
        found = [
            {"sid": sid, "status": status, "duration": duration}
            for sid, status, duration in (
                (c["sid"], c["status"], c["duration"]) for c in known.children.get(parent, [])
            )
        ]
        uri = request.path_qs
        page = {
            "calls": found,
            "start": 0,
            "end": len(found),
            "page": 0,
            "page_size": 20,
            "uri": uri,
            "first_page_uri": uri,
            "next_page_uri": None,
            "previous_page_uri": None,
        }
        return web.json_response(page)

    app = web.Application()
    app.router.add_get("/2010-04-01/Accounts/{account}/Calls.json", calls)
    async with serve(app) as base:
        twilio = TwilioCalls(ACCOUNT, TOKEN, api_base=base)
        try:
            yield twilio, known
        finally:
            await twilio.close()


async def test_the_sweep_settles_legs_whose_action_never_came_from_twilios_record(
    pool: asyncpg.Pool, twilio_lookups: tuple[TwilioCalls, DialedCalls]
) -> None:
    twilio, known = twilio_lookups
    organization_id = await organization(pool, credits=1000)
    talked, never_dialed, unknown, recent = [
        await open_call(pool, organization_id, credit_rates=RATES) for _ in range(4)
    ]
    for opened in (talked, never_dialed, unknown, recent):
        await open_leg(pool, organization_id, opened.id, 3)
    known.children[talked.call_id] = [{"sid": "CA" + "a" * 32, "status": "completed", "duration": "70"}]
    known.failing.add(unknown.call_id)
    await pool.execute(
        """UPDATE "TransferLeg" SET "startedAt" = "startedAt" - interval '10 minutes' WHERE "callLogId" = ANY($1)""",
        [talked.id, never_dialed.id, unknown.id],
    )

    settled = await settle_overdue_legs(pool, twilio, now=datetime.now(UTC), grace=timedelta(minutes=5))
    assert settled == 2
    talked_log = await call_logs.get_call_log(pool, organization_id=organization_id, call_log_id=talked.id)
    assert talked_log.metadata["transfer"]["creditsCharged"] == 2 * RATE  # 70 s
    never = await call_logs.get_call_log(pool, organization_id=organization_id, call_log_id=never_dialed.id)
    assert never.metadata["transfer"]["dialStatus"] == transfer_legs.NOT_DIALED
    assert never.metadata["transfer"]["creditsCharged"] == 0
    # Twilio could not say for one; the other's limit has not run out: both stay held for a later sweep.
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=unknown.id) == 3 * RATE
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=recent.id) == 3 * RATE
    assert talked_log.status is CallStatus.IN_PROGRESS  # the call's own log is the media session's to end
    assert await balance(pool, organization_id) == 1000 - 4 * RATE - 2 * 3 * RATE - 2 * RATE


async def test_the_sweep_settles_the_leg_of_a_call_log_deleted_during_the_dial(
    pool: asyncpg.Pool, twilio_lookups: tuple[TwilioCalls, DialedCalls]
) -> None:
    twilio, known = twilio_lookups
    organization_id = await organization(pool, credits=1000)
    opened = await open_call(pool, organization_id, credit_rates=RATES)
    await open_leg(pool, organization_id, opened.id, 3)
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', opened.id)
    known.children[opened.call_id] = [{"sid": "CA" + "b" * 32, "status": "completed", "duration": "70"}]
    await pool.execute(
        """UPDATE "DetachedTransferLeg" SET "startedAt" = "startedAt" - interval '10 minutes' WHERE "callLogId" = $1""",
        opened.id,
    )

    for _ in range(2):  # settling twice charges once
        await settle_overdue_legs(pool, twilio, now=datetime.now(UTC), grace=timedelta(minutes=5))
        # Its stream never started: the call's minute came back with its deletion; the leg pays its two minutes.
        assert await balance(pool, organization_id) == 1000 - 2 * RATE
    assert await pool.fetchval('SELECT count(*) FROM "DetachedTransferLeg" WHERE "callLogId" = $1', opened.id) == 0


async def test_a_call_list_twilio_will_not_give_is_a_lookup_failure(
    twilio_lookups: tuple[TwilioCalls, DialedCalls],
) -> None:
    twilio, known = twilio_lookups
    known.failing.add("+14155550100")
    with pytest.raises(CallLookupFailed, match="500"):
        await twilio.calls_between(to="+14155550100", from_="+14155550101")
    with pytest.raises(CallLookupFailed, match="500"):
        await twilio.dialed_calls("+14155550100")


@pytest.mark.parametrize(("answer", "held_after"), [("hang", 2 * RATE), ("refuse", None)])
async def test_a_transfer_twilio_may_have_made_keeps_its_leg_and_a_refused_one_returns_it(
    pool: asyncpg.Pool, answer: str, held_after: int | None
) -> None:
    answered = asyncio.Event()

    async def update(request: web.Request) -> web.Response:
        if answer == "hang":
            await answered.wait()  # sent, not answered before the client gives up: Twilio may be dialing
        return web.json_response({"code": 21220, "message": "Call is not in-progress.", "status": 400}, status=400)

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{sid}.json", update)
    organization_id = await organization(pool, credits=100)
    opened = await open_call(pool, organization_id, credit_rates=RATES)
    async with serve(app) as base:
        twilio = TwilioCalls(ACCOUNT, TOKEN, api_base=base, timeout=0.3)
        try:
            transfer = two_minute_transfer(pool, twilio, organization_id, opened.id)
            assert not await transfer(opened.call_id, BILLING)
        finally:
            answered.set()
            await twilio.close()
    # Unconfirmed: the leg's action request or the sweep settles it; refused: its credits are back at once.
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=opened.id) == held_after
    assert await balance(pool, organization_id) == 100 - RATE - (held_after or 0)


def two_minute_transfer(
    pool: asyncpg.Pool, twilio: TwilioCalls, organization_id: str, call_log_id: str
) -> PaidTransfer:
    """A transfer of the organization's call, its leg limited to two minutes, at the module's rates."""
    return PaidTransfer(
        pool,
        twilio,
        organization_id=organization_id,
        call_log_id=call_log_id,
        max_minutes=2,
        rates=RATES,
        action_url="http://127.0.0.1:9/twilio/dial",
    )


UK_PREMIUM = "+449012345678"  # phonenumbers reads it as premium-rate (tests/test_dial_policy.py checks the reading)


async def transfer_to(
    pool: asyncpg.Pool, organization_id: str, to: str
) -> tuple[bool | None, list[dict[str, str]], str]:
    """A paid transfer of one of the organization's calls to `to`: whether it was made (None: unanswered), Twilio's
    updates, the call."""
    opened = await open_call(pool, organization_id, credit_rates=RATES)
    async with call_updates() as (api_base, updates):
        twilio = TwilioCalls(ACCOUNT, TOKEN, api_base=api_base, timeout=2.0)
        try:
            transfer = two_minute_transfer(pool, twilio, organization_id, opened.id)
            made = await transfer(opened.call_id, to)
        finally:
            await twilio.close()
    return made, updates, opened.id


JAMAICA = "+18765550123"  # +1 like the US, but Jamaica's: billed as an international call


@pytest.mark.parametrize("to", [UK_PREMIUM, JAMAICA], ids=["premium-rate", "another country of +1"])
async def test_a_transfer_to_a_number_the_dial_policy_refuses_is_not_made_though_the_agent_lists_it(
    pool: asyncpg.Pool, to: str
) -> None:
    # An agent may list a premium-rate number exactly (config.agent.TransferDestination), or a Jamaican one, but the
    # organization pays for the leg: without its OWNER's or ADMIN's opt-in (storage.dial_policies), Twilio is never
    # asked to dial it. Its number is American: by default it dials the US, not the other countries of +1.
    organization_id = await organization(pool, credits=100)

    made, updates, call_log_id = await transfer_to(pool, organization_id, to)

    assert not made
    assert updates == []
    assert await pool.fetchval('SELECT count(*) FROM "TransferLeg" WHERE "callLogId" = $1', call_log_id) == 0
    assert await balance(pool, organization_id) == 100 - RATE  # only the call's own first minute


@pytest.mark.parametrize(
    ("to", "kinds", "countries"),
    [(UK_PREMIUM, [NumberKind.PREMIUM_RATE], ["GB", "US"]), (JAMAICA, [], ["JM", "US"])],
    ids=["premium-rate", "another country of +1"],
)
async def test_a_transfer_is_made_once_the_organization_allows_the_number(
    pool: asyncpg.Pool, to: str, kinds: list[NumberKind], countries: list[str]
) -> None:
    organization_id = await organization(pool, credits=100)
    async with tenant_transaction(pool, organization_id) as conn:
        await dial_policies.set_policy(
            conn,
            organization_id=organization_id,
            allowed_kinds=kinds,
            allowed_countries=countries,
            international_networks=False,
        )

    made, updates, _ = await transfer_to(pool, organization_id, to)

    assert made
    assert [dialed_number(update["Twiml"]) for update in updates] == [to]


@pytest.mark.parametrize("table", ["CreditReservation", "TransferLeg"])
async def test_a_truncate_of_the_credits_running_calls_hold_is_refused_and_names_the_safe_way(
    pool: asyncpg.Pool, table: str
) -> None:
    # Emptied alone (no CallLog truncated with them), a reservation and an open leg lost the credits they held.
    organization_id = await organization(pool, credits=100)
    opened = await open_call(pool, organization_id, credit_rates=RATES)
    await open_leg(pool, organization_id, opened.id, 3)
    async with pool.acquire() as conn:
        truncation = conn.transaction()  # rolled back: had it gone through, the module's other tests keep their rows
        await truncation.start()
        try:
            with pytest.raises(asyncpg.ObjectInUseError) as refused:
                await conn.execute(f'TRUNCATE "{table}"')
        finally:
            await truncation.rollback()

    assert f'TRUNCATE "{table}" refused' in str(refused.value)
    assert 'TRUNCATE "CallLog" CASCADE' in refused.value.as_dict()["hint"]
    assert await balance(pool, organization_id) == 100 - RATE - 3 * RATE
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=opened.id) == 3 * RATE


@contextlib.asynccontextmanager
async def rolled_back(conn: Connection) -> AsyncIterator[None]:
    """A transaction on `conn`, rolled back at the end: had a TRUNCATE in it gone through, the module's other tests
    keep their rows."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    finally:
        await transaction.rollback()


async def test_a_truncate_of_the_detached_legs_is_refused_unless_their_organizations_go_with_them(
    pool: asyncpg.Pool,
) -> None:
    # A leg its call's deletion detached is still dialed: emptied alone, the table lost the credits it holds for it.
    organization_id = await organization(pool, credits=100)
    opened = await open_call(pool, organization_id, credit_rates=RATES)
    await open_leg(pool, organization_id, opened.id, 3)
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', opened.id)
    async with pool.acquire() as conn:
        async with rolled_back(conn):
            with pytest.raises(asyncpg.ObjectInUseError) as refused:
                await conn.execute('TRUNCATE "DetachedTransferLeg"')
        async with rolled_back(conn):
            # An organization gone has nothing left to pay or to pay back: its detached legs go with it.
            await conn.execute('TRUNCATE "Organization" CASCADE')
            left = await conn.fetchval('SELECT count(*) FROM "DetachedTransferLeg"')

    assert 'TRUNCATE "DetachedTransferLeg" refused' in str(refused.value)
    assert "settlement sweep" in refused.value.as_dict()["hint"]
    assert left == 0
    assert await balance(pool, organization_id) == 100 - 3 * RATE  # the call's minute back, the leg's three held
    detached = 'SELECT "credits" FROM "DetachedTransferLeg" WHERE "callLogId" = $1'
    assert await pool.fetchval(detached, opened.id) == 3 * RATE


@pytest.mark.parametrize("detached", [False, True], ids=["open leg", "detached leg"])
async def test_a_deletion_of_a_leg_still_dialed_is_refused_and_its_dial_still_pays(
    pool: asyncpg.Pool, detached: bool
) -> None:
    # Deleted in SQL, a leg still dialed took the credits it held with it: its dial's end found nothing to settle.
    organization_id = await organization(pool, credits=100)
    opened = await open_call(pool, organization_id, credit_rates=RATES)
    await open_leg(pool, organization_id, opened.id, 3)
    table = "TransferLeg"
    if detached:
        await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', opened.id)
        table = "DetachedTransferLeg"

    with pytest.raises(asyncpg.ObjectInUseError) as refused:
        await pool.execute(f'DELETE FROM "{table}" WHERE "callLogId" = $1', opened.id)

    assert f'DELETE FROM "{table}" refused' in str(refused.value)
    assert "settlement sweep" in refused.value.as_dict()["hint"]
    settled = await transfer_legs.settle_leg(pool, call_log_id=opened.id, dial_status="completed", duration_seconds=70)
    assert settled is not None and settled.credits_charged == 2 * RATE
    # Two minutes of the leg; the call's own minute is held while it runs, or came back with its deletion.
    assert await balance(pool, organization_id) == 100 - 2 * RATE - (0 if detached else RATE)
