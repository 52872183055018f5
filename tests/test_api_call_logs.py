"""Call logs and live calls through /v1: the seed's filters (callType, status, agent, campaign, date range),
newest first, cursor pages, agent and campaign names included; calls in progress listed and hung up via Twilio."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from storage import agents, call_logs, call_turns, campaigns
from storage.call_turns import TurnRecord
from storage.enums import CallStatus, CallType
from tests.engine_server import running_engine
from tests.fakes.server import serve
from tests.test_api_auth import Api, Tenant, assert_error, make_tenant

ACCOUNT_SID = "AC" + "5" * 32
TWILIO_TOKEN = "api-test-twilio-token-0123456789"
DAY = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
_sids = itertools.count(1)


class FakeTwilio:
    """Twilio's call-update endpoint: records each hang-up; answers 404 for calls it is told are gone."""

    def __init__(self) -> None:
        self.hang_ups: list[tuple[str, str]] = []
        self.gone: set[str] = set()

    async def update_call(self, request: web.Request) -> web.Response:
        sid = request.match_info["call_sid"]
        if sid in self.gone:
            return web.json_response({"code": 20404, "message": "not found", "status": 404}, status=404)
        form = await request.post()
        self.hang_ups.append((sid, str(form.get("Status"))))
        return web.json_response({"sid": sid, "status": "completed"})


@pytest.fixture(scope="module")
async def twilio() -> AsyncIterator[tuple[FakeTwilio, str]]:
    fake = FakeTwilio()
    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{call_sid}.json", fake.update_call)
    async with serve(app) as base:
        yield fake, base


@pytest.fixture(scope="module")
async def api(db_url: str, twilio: tuple[FakeTwilio, str]) -> AsyncIterator[Api]:
    async with (
        running_engine(
            db_url, twilio_account_sid=ACCOUNT_SID, twilio_auth_token=TWILIO_TOKEN, twilio_api_base=twilio[1]
        ) as base,
        aiohttp.ClientSession() as session,
    ):
        yield Api(session, base)


@pytest.fixture(scope="module")
async def acme(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Acme")


async def add_call(
    pool: asyncpg.Pool,
    tenant: Tenant,
    *,
    call_type: CallType = CallType.INBOUND,
    status: CallStatus = CallStatus.COMPLETED,
    agent_id: str | None = None,
    campaign_id: str | None = None,
    at: datetime = DAY,
) -> str:
    """A call log started at `at` that ended (or not) in `status`; its id."""
    log = await call_logs.create_call_log(
        pool,
        organization_id=tenant.organization_id,
        call_type=call_type,
        call_id=f"CA{next(_sids):032d}",
        agent_id=agent_id,
        campaign_id=campaign_id,
        customer="+14155550123",
    )
    await pool.execute('UPDATE "CallLog" SET "timestamp" = $2 WHERE "id" = $1', log.id, at)
    if status is not CallStatus.IN_PROGRESS:
        await call_logs.finalize_call_log(
            pool, organization_id=tenant.organization_id, call_log_id=log.id, status=status, duration=60
        )
    return log.id


@pytest.fixture(scope="module")
async def history(pool: asyncpg.Pool) -> tuple[Tenant, dict[str, str]]:
    """A tenant with a known call history; the ids by name."""
    tenant = await make_tenant(pool, "History")
    sales = await agents.create_agent(pool, organization_id=tenant.organization_id, name="Sales", type="outbound-sales")
    desk = await agents.create_agent(pool, organization_id=tenant.organization_id, name="Desk")
    drive = await campaigns.create_campaign(
        pool, organization_id=tenant.organization_id, batch_name="November drive", agent_id=sales.id
    )
    ids = {
        "old_inbound": await add_call(pool, tenant, agent_id=desk.id, at=DAY - timedelta(days=40)),
        "missed": await add_call(pool, tenant, status=CallStatus.MISSED, agent_id=desk.id, at=DAY),
        "campaign_done": await add_call(
            pool,
            tenant,
            call_type=CallType.OUTBOUND,
            agent_id=sales.id,
            campaign_id=drive.id,
            at=DAY + timedelta(days=1),
        ),
        "campaign_failed": await add_call(
            pool,
            tenant,
            call_type=CallType.OUTBOUND,
            status=CallStatus.FAILED,
            agent_id=sales.id,
            campaign_id=drive.id,
            at=DAY + timedelta(days=2),
        ),
        "agentless": await add_call(pool, tenant, at=DAY + timedelta(days=3)),
    }
    ids["sales"], ids["desk"], ids["drive"] = sales.id, desk.id, drive.id
    return tenant, ids


async def listed(api: Api, tenant: Tenant, query: str) -> list[str]:
    status, body = await api.call("GET", f"/call-logs?{query}", tenant.owner_key)
    assert status == 200, body
    return [entry["id"] for entry in body["data"]]


async def test_call_logs_come_newest_first(api: Api, history: tuple[Tenant, dict[str, str]]) -> None:
    tenant, ids = history
    assert await listed(api, tenant, "") == [
        ids["agentless"],
        ids["campaign_failed"],
        ids["campaign_done"],
        ids["missed"],
        ids["old_inbound"],
    ]


async def test_call_logs_carry_agent_name_type_and_campaign_name(
    api: Api, history: tuple[Tenant, dict[str, str]]
) -> None:
    tenant, ids = history
    _, body = await api.call("GET", f"/call-logs/{ids['campaign_done']}", tenant.owner_key)
    assert (body["agentName"], body["agentType"], body["campaignBatchName"]) == (
        "Sales",
        "outbound-sales",
        "November drive",
    )
    _, page = await api.call("GET", "/call-logs?limit=1", tenant.owner_key)
    assert (page["data"][0]["agentName"], page["data"][0]["campaignBatchName"]) == (None, None)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("callType=OUTBOUND", ["campaign_failed", "campaign_done"]),
        ("status=MISSED", ["missed"]),
        ("callType=OUTBOUND&status=COMPLETED", ["campaign_done"]),
        ("agentId={desk}", ["missed", "old_inbound"]),
        ("campaignId={drive}", ["campaign_failed", "campaign_done"]),
        (
            "since=2026-11-01T00:00:00Z&until=2026-11-30T23:59:59Z",
            ["agentless", "campaign_failed", "campaign_done", "missed"],
        ),
        ("until=2026-11-01T12:00:00Z", ["missed", "old_inbound"]),
        ("since=2026-11-02T12:00:00%2B00:00&callType=INBOUND", ["agentless"]),
    ],
)
async def test_call_logs_filter_as_the_dashboard_does(
    api: Api, history: tuple[Tenant, dict[str, str]], query: str, expected: list[str]
) -> None:
    tenant, ids = history
    assert await listed(api, tenant, query.format(**ids)) == [ids[name] for name in expected]


async def test_call_logs_page_with_cursors(api: Api, history: tuple[Tenant, dict[str, str]]) -> None:
    tenant, _ = history
    everything = await listed(api, tenant, "")
    _, first = await api.call("GET", "/call-logs?limit=3", tenant.owner_key)
    _, second = await api.call("GET", f"/call-logs?limit=3&cursor={first['nextCursor']}", tenant.owner_key)
    assert [e["id"] for e in first["data"] + second["data"]] == everything
    assert second["nextCursor"] is None


async def test_call_log_filters_are_validated(api: Api, history: tuple[Tenant, dict[str, str]]) -> None:
    tenant, _ = history
    for query, field in (
        ("status=RINGING", "status"),
        ("since=yesterday", "since"),
        ("since=2026-11-01T00:00:00", "since"),  # no UTC offset: ambiguous
        ("until=0.5", "until"),  # a number is not a date, though pydantic would read seconds since 1970
        ("since=1764000000", "since"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("colour=red", "colour"),
    ):
        status, body = await api.call("GET", f"/call-logs?{query}", tenant.owner_key)
        assert status == 422, query
        assert_error(body, "validation_error", field)
    status, body = await api.call(
        "GET", "/call-logs?since=2026-12-01T00:00:00Z&until=2026-11-01T00:00:00Z", tenant.owner_key
    )
    assert status == 422


async def test_call_logs_are_read_only(api: Api, history: tuple[Tenant, dict[str, str]]) -> None:
    tenant, ids = history
    status, body = await api.call("DELETE", f"/call-logs/{ids['missed']}", tenant.owner_key)
    assert status == 405
    assert_error(body, "method_not_allowed")


async def test_another_organization_sees_none_of_the_call_logs(
    api: Api, acme: Tenant, history: tuple[Tenant, dict[str, str]]
) -> None:
    _, ids = history
    assert await listed(api, acme, "") == []
    assert (await api.call("GET", f"/call-logs/{ids['missed']}", acme.owner_key))[0] == 404


async def test_a_call_s_turns_are_listed_in_order_with_their_latency_and_cuts(api: Api, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Turns")
    call_log_id = await add_call(pool, tenant)
    reply = TurnRecord(
        index=1,
        speaker="agent",
        text="We open at",
        start_ms=2600,
        end_ms=3400,
        interrupted=True,
        latency_ms=410,
        latency={"sttEndOfTurn": 120, "firstFrameSent": 410},
    )
    question = TurnRecord(index=0, speaker="caller", text="When do you open?", start_ms=900, end_ms=2100)
    await call_turns.insert_turns(
        pool, organization_id=tenant.organization_id, call_log_id=call_log_id, turns=[reply, question]
    )
    status, body = await api.call("GET", f"/call-logs/{call_log_id}/turns", tenant.owner_key)
    assert status == 200
    assert [
        (t["index"], t["speaker"], t["text"], t["startMs"], t["endMs"], t["interrupted"], t["latencyMs"], t["latency"])
        for t in body["data"]
    ] == [
        (0, "caller", "When do you open?", 900, 2100, False, None, None),
        (1, "agent", "We open at", 2600, 3400, True, 410, {"sttEndOfTurn": 120, "firstFrameSent": 410}),
    ]


async def test_another_organization_s_call_turns_are_not_found(api: Api, acme: Tenant, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Private turns")
    call_log_id = await add_call(pool, tenant)
    status, body = await api.call("GET", f"/call-logs/{call_log_id}/turns", acme.owner_key)
    assert status == 404
    assert_error(body, "not_found")


async def test_live_calls_lists_the_calls_in_progress(api: Api, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Live")
    running = await add_call(pool, tenant, status=CallStatus.IN_PROGRESS, at=datetime.now(UTC))
    await add_call(pool, tenant, at=datetime.now(UTC))
    status, body = await api.call("GET", "/live-calls", tenant.owner_key)
    assert status == 200
    assert [(c["id"], c["status"], c["runsHere"]) for c in body["data"]] == [(running, "IN_PROGRESS", False)]


async def test_hang_up_ends_the_call_through_twilio(
    api: Api, pool: asyncpg.Pool, twilio: tuple[FakeTwilio, str]
) -> None:
    tenant = await make_tenant(pool, "Hangup")
    call_log_id = await add_call(pool, tenant, status=CallStatus.IN_PROGRESS, at=datetime.now(UTC))
    call_sid = await pool.fetchval('SELECT "callId" FROM "CallLog" WHERE "id" = $1', call_log_id)
    status, body = await api.call("POST", f"/live-calls/{call_log_id}/hangup", tenant.owner_key)
    assert status == 202
    assert body == {"callLogId": call_log_id, "endedBy": "twilio"}
    assert (call_sid, "completed") in twilio[0].hang_ups


async def test_hang_up_refuses_a_call_that_has_ended(api: Api, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Ended")
    call_log_id = await add_call(pool, tenant, status=CallStatus.COMPLETED)
    status, body = await api.call("POST", f"/live-calls/{call_log_id}/hangup", tenant.owner_key)
    assert status == 409
    assert_error(body, "conflict")


async def test_hang_up_reports_twilio_refusing(api: Api, pool: asyncpg.Pool, twilio: tuple[FakeTwilio, str]) -> None:
    tenant = await make_tenant(pool, "Refused")
    call_log_id = await add_call(pool, tenant, status=CallStatus.IN_PROGRESS, at=datetime.now(UTC))
    twilio[0].gone.add(await pool.fetchval('SELECT "callId" FROM "CallLog" WHERE "id" = $1', call_log_id))
    status, body = await api.call("POST", f"/live-calls/{call_log_id}/hangup", tenant.owner_key)
    assert status == 502
    assert_error(body, "twilio_error")


async def test_a_viewer_cannot_hang_up(api: Api, pool: asyncpg.Pool, twilio: tuple[FakeTwilio, str]) -> None:
    tenant = await make_tenant(pool, "Watcher")
    call_log_id = await add_call(pool, tenant, status=CallStatus.IN_PROGRESS, at=datetime.now(UTC))
    before = len(twilio[0].hang_ups)
    status, _ = await api.call("POST", f"/live-calls/{call_log_id}/hangup", tenant.viewer_key)
    assert status == 403
    assert len(twilio[0].hang_ups) == before
