"""/v1/campaigns/{id}/recipients through the real server: each recipient's dispatch state as the dispatcher moves it.

The campaign is made and started through the API; a dispatcher in the test (a recording dialer, the test's
clock) dials it against the same database, and calls are ended as Twilio's callbacks would end them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.api.resources.campaign_recipients import API_STATES
from storage.campaign_states import RecipientDispatchState
from storage.enums import CallStatus
from storage.phone_numbers import create_phone_number
from tests.engine_server import running_engine
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_dispatch_claims import Clock, RecordingDialer, dispatcher, end_call, new_id_digits, tick
from tests.test_outbound_calls import make_agent

REACHED, BUSY, RINGING = "+12125550201", "+12125550202", "+12125550203"


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    async with running_engine(db_url, dispatch_enabled=False) as base:
        yield base


@pytest.fixture
async def api(engine: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine)


@pytest.fixture(scope="module")
async def tenant(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Recipients")


async def started_campaign(api: Api, pool: asyncpg.Pool, tenant: Tenant) -> dict[str, Any]:
    """A started campaign of three good recipients and two bad rows (one from a list, one from a CSV file)."""
    await pool.execute("""UPDATE "Campaign" SET "status" = 'STOPPED' WHERE "status" IN ('PLANNED', 'CONTINUING')""")
    agent_id = await make_agent(pool, tenant.organization_id)
    await pool.execute('UPDATE "Organization" SET "credits" = 100 WHERE "id" = $1', tenant.organization_id)
    caller_id = f"+1212555{new_id_digits()}"
    await create_phone_number(pool, organization_id=tenant.organization_id, phone_number=caller_id)
    fields = {
        "batchName": "States",
        "agentId": agent_id,
        "fromNumber": caller_id,
        "maxConcurrentCalls": 5,
        "callsPerSecond": 100,
        "retry": {"maxAttempts": 2, "retryOn": ["busy"], "delaysSeconds": [600]},
    }
    status, campaign = await api.call("POST", "/campaigns", tenant.owner_key, json=fields)
    assert status == 201, campaign
    path = f"/campaigns/{campaign['id']}/recipients"
    rows = {"recipients": [{"phoneNumber": REACHED, "name": "Ann"}, {"phoneNumber": "12"}, {"phoneNumber": BUSY}]}
    status, summary = await api.call("POST", path, tenant.owner_key, json=rows)
    assert status == 200 and summary["errors"] == 1, summary
    status, summary = await api.call("POST", path, tenant.owner_key, json={"csv": f"phone\n{RINGING}\nnope\n"})
    assert status == 200 and summary["errors"] == 1, summary
    status, started = await api.call("POST", f"/campaigns/{campaign['id']}/start", tenant.owner_key)
    assert status == 200, started
    result: dict[str, Any] = campaign
    return result


async def by_number(api: Api, key: str, path: str) -> dict[str, dict[str, Any]]:
    status, page = await api.call("GET", path, key)
    assert status == 200, page
    return {r["phoneNumber"]: r for r in page["data"]}


async def test_recipients_show_where_their_dialing_stands(api: Api, pool: asyncpg.Pool, tenant: Tenant) -> None:
    campaign = await started_campaign(api, pool, tenant)
    path = f"/campaigns/{campaign['id']}/recipients"
    before = await by_number(api, tenant.viewer_key, path)
    assert {n: (r["state"], r["attempts"]) for n, r in before.items()} == {
        REACHED: ("waiting", 0),
        BUSY: ("waiting", 0),
        RINGING: ("waiting", 0),
        "12": ("error", 0),
        "nope": ("error", 0),
    }
    assert before["12"]["error"]["at"] == "recipients[1]" and before["12"]["error"]["line"] is None
    assert before["nope"]["error"]["at"] == "line 3" and before["nope"]["error"]["line"] == 3
    assert before["nope"]["error"]["reason"] and before["nope"]["lastReason"] is None
    assert before[REACHED]["lastAttemptAt"] is None
    # Due at once since it was added: shown as then, not as the dispatcher's marker for "at once", 1970.
    assert before[REACHED]["nextAttemptAt"] == before[REACHED]["createdAt"]

    clock = Clock(datetime.now(UTC))
    dialer = RecordingDialer(pool)
    engine = dispatcher(pool, dialer, clock)
    await tick(engine)
    claims = {claim.phone_number: claim for claim in dialer.dials}
    assert sorted(claims) == [REACHED, BUSY, RINGING]
    dialing = await by_number(api, tenant.viewer_key, f"{path}?state=in_call")
    assert sorted(dialing) == [REACHED, BUSY, RINGING]
    assert all(r["attempts"] == 1 and r["lastCallLogId"] and r["lastAttemptAt"] for r in dialing.values())
    assert all(r["nextAttemptAt"] is None for r in dialing.values())

    await end_call(pool, claims[REACHED], CallStatus.COMPLETED, "path_end")
    await end_call(pool, claims[BUSY], CallStatus.MISSED, "busy")
    await tick(engine)
    after = await by_number(api, tenant.viewer_key, path)
    assert (after[REACHED]["state"], after[REACHED]["lastOutcome"]) == ("done", "completed")
    assert (after[BUSY]["state"], after[BUSY]["attempts"], after[BUSY]["lastOutcome"]) == ("waiting", 1, "busy")
    due = datetime.fromisoformat(after[BUSY]["nextAttemptAt"])
    assert timedelta(seconds=590) < due - clock.now < timedelta(seconds=610)
    assert after[BUSY]["lastCallLogId"] == dialing[BUSY]["lastCallLogId"]

    status, one = await api.call("GET", f"{path}/{after[RINGING]['id']}", tenant.viewer_key)
    assert status == 200 and (one["state"], one["attempts"]) == ("in_call", 1)
    assert one["lastCallLogId"] == dialing[RINGING]["lastCallLogId"]
    waiting = await by_number(api, tenant.viewer_key, f"{path}?state=waiting")
    assert sorted(waiting) == [BUSY]
    errors = await by_number(api, tenant.viewer_key, f"{path}?state=error")
    assert sorted(errors) == ["12", "nope"]
    assert sorted(await by_number(api, tenant.viewer_key, f"{path}?status=ERROR")) == ["12", "nope"]

    status, first = await api.call("GET", f"{path}?limit=2", tenant.viewer_key)
    assert status == 200 and len(first["data"]) == 2 and first["nextCursor"]
    seen = [r["id"] for r in first["data"]]
    cursor = first["nextCursor"]
    while cursor:
        _, page = await api.call("GET", f"{path}?limit=2&cursor={cursor}", tenant.viewer_key)
        seen += [r["id"] for r in page["data"]]
        cursor = page["nextCursor"]
    assert sorted(seen) == sorted(r["id"] for r in after.values()) and len(seen) == len(set(seen)) == 5


async def test_bad_filters_and_unknown_or_foreign_recipients(api: Api, pool: asyncpg.Pool, tenant: Tenant) -> None:
    campaign = await started_campaign(api, pool, tenant)
    path = f"/campaigns/{campaign['id']}/recipients"
    recipient = (await by_number(api, tenant.owner_key, path))[REACHED]
    status, body = await api.call("GET", f"{path}?state=ringing", tenant.owner_key)
    assert (status, body["error"]["field"]) == (422, "state")

    status, _ = await api.call("GET", f"{path}/nosuchrecipient", tenant.owner_key)
    assert status == 404
    other_campaign = await started_campaign(api, pool, tenant)
    status, _ = await api.call(
        "GET", f"/campaigns/{other_campaign['id']}/recipients/{recipient['id']}", tenant.owner_key
    )
    assert status == 404, "a recipient is only found under its own campaign"

    rival = await make_tenant(pool, "Rival recipients")
    for suffix in ("", f"/{recipient['id']}"):
        status, _ = await api.call("GET", f"{path}{suffix}", rival.owner_key)
        assert status == 404, suffix


def test_every_stored_dispatch_state_has_an_api_name() -> None:
    assert set(RecipientDispatchState) <= set(API_STATES)
