"""/v1/do-not-call through the real server and PostgreSQL: add, list, filter, delete, import CSV with bad lines,
another organization's key seeing and deleting nothing, and POST /v1/calls refusing a listed number."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from storage import phone_numbers
from tests.engine_server import running_engine
from tests.fakes.twilio import FakeTwilio
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_outbound_calls import make_agent


@pytest.fixture(scope="module")
async def engine(db_url: str, twilio: FakeTwilio) -> AsyncIterator[str]:
    async with running_engine(
        db_url,
        dispatch_enabled=False,
        twilio_auth_token=twilio.auth_token,
        twilio_account_sid=twilio.account_sid,
        twilio_api_base=twilio.api_base,
    ) as base:
        yield base


@pytest.fixture
async def api(engine: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine)


@pytest.fixture
async def tenant(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Quiet")


async def test_a_number_is_added_normalized_listed_found_and_removed(api: Api, tenant: Tenant) -> None:
    status, entry = await api.call(
        "POST", "/do-not-call", tenant.owner_key, json={"phoneNumber": "+1 (415) 555-0101", "reason": "asked by mail"}
    )
    assert status == 201, entry
    assert entry["phoneNumber"] == "+14155550101"
    assert (entry["reason"], entry["source"], entry["callLogId"]) == ("asked by mail", "API", None)

    status, again = await api.call("POST", "/do-not-call", tenant.owner_key, json={"phoneNumber": "+14155550101"})
    assert status == 201 and again["id"] == entry["id"] and again["reason"] == "asked by mail"

    await api.call("POST", "/do-not-call", tenant.owner_key, json={"phoneNumber": "+14155550102"})
    status, page = await api.call("GET", "/do-not-call?limit=1", tenant.owner_key)
    assert status == 200 and [e["phoneNumber"] for e in page["data"]] == ["+14155550102"]
    status, rest = await api.call("GET", f"/do-not-call?limit=1&cursor={page['nextCursor']}", tenant.owner_key)
    assert [e["phoneNumber"] for e in rest["data"]] == ["+14155550101"]

    status, found = await api.call("GET", "/do-not-call?phoneNumber=%2B1%20415%20555%200101", tenant.owner_key)
    assert status == 200 and [e["id"] for e in found["data"]] == [entry["id"]]

    status, _ = await api.call("DELETE", f"/do-not-call/{entry['id']}", tenant.owner_key)
    assert status == 204
    status, gone = await api.call("GET", f"/do-not-call/{entry['id']}", tenant.owner_key)
    assert status == 404, gone
    _, left = await api.call("GET", "/do-not-call", tenant.owner_key)
    assert [e["phoneNumber"] for e in left["data"]] == ["+14155550102"]


async def test_a_value_that_is_not_a_phone_number_is_refused_naming_the_field(api: Api, tenant: Tenant) -> None:
    status, error = await api.call("POST", "/do-not-call", tenant.owner_key, json={"phoneNumber": "call me maybe"})
    assert status == 422 and error["error"]["field"] == "phoneNumber", error
    status, error = await api.call("GET", "/do-not-call?phoneNumber=12", tenant.owner_key)
    assert status == 422 and error["error"]["field"] == "phoneNumber", error
    _, page = await api.call("GET", "/do-not-call", tenant.owner_key)
    assert page["data"] == []


async def test_a_viewer_may_read_the_list_but_not_change_it(api: Api, tenant: Tenant) -> None:
    status, _ = await api.call("POST", "/do-not-call", tenant.viewer_key, json={"phoneNumber": "+14155550103"})
    assert status == 403
    status, page = await api.call("GET", "/do-not-call", tenant.viewer_key)
    assert status == 200 and page["data"] == []


async def test_a_csv_import_lists_valid_lines_reports_bad_ones_by_line_and_is_idempotent(
    api: Api, tenant: Tenant
) -> None:
    await api.call("POST", "/do-not-call", tenant.owner_key, json={"phoneNumber": "+14155550110", "reason": "first"})
    csv = (
        "name,phoneNumber,reason\n"
        "Ann,+1 415 555 0110,again\n"  # already listed: keeps its entry
        "Bob,not a number,\n"
        "Cy,(415) 555-0111,moved away\n"
        "\n"
        "Di,+14155550111,\n"  # the same number twice
        "Ed,,\n"
        "Flo,+44 20 7946 0958,\n"
    )
    status, result = await api.call(
        "POST", "/do-not-call/import", tenant.owner_key, json={"csv": csv, "defaultRegion": "US", "reason": "import"}
    )
    assert status == 200, result
    assert (result["rows"], result["added"], result["alreadyListed"]) == (6, 2, 1)
    assert (result["duplicates"], result["invalid"]) == (1, 2)
    assert [(line["line"], line["value"]) for line in result["invalidLines"]] == [(3, "not a number"), (7, "")]
    assert all(line["reason"] for line in result["invalidLines"])

    _, page = await api.call("GET", "/do-not-call", tenant.owner_key)
    listed = {e["phoneNumber"]: (e["reason"], e["source"]) for e in page["data"]}
    assert listed == {
        "+14155550110": ("first", "API"),
        "+14155550111": ("moved away", "CSV_IMPORT"),
        "+442079460958": ("import", "CSV_IMPORT"),
    }

    status, again = await api.call(
        "POST", "/do-not-call/import", tenant.owner_key, json={"csv": csv, "defaultRegion": "US"}
    )
    assert status == 200 and (again["added"], again["alreadyListed"]) == (0, 3)


async def test_a_csv_without_a_header_is_read_from_its_first_column(api: Api, tenant: Tenant) -> None:
    status, result = await api.call(
        "POST", "/do-not-call/import", tenant.owner_key, json={"csv": "+14155550120;x\n+14155550121;y\n"}
    )
    assert status == 200 and (result["rows"], result["added"], result["invalid"]) == (2, 2, 0), result


async def test_a_csv_field_past_the_csv_modules_limit_is_a_422_naming_its_line(api: Api, tenant: Tenant) -> None:
    csv = f"phoneNumber,reason\n+14155550122,moved\n+14155550123,{'z' * 140_000}\n"
    status, body = await api.call("POST", "/do-not-call/import", tenant.owner_key, json={"csv": csv})
    assert (status, body["error"]["field"]) == (422, "csv"), body
    assert body["error"]["message"].startswith("line 3: not readable as CSV (field larger than field limit")
    _, page = await api.call("GET", "/do-not-call", tenant.owner_key)
    assert page["data"] == []  # nothing listed


async def test_another_organizations_key_sees_nothing_and_cannot_delete(
    api: Api, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    _, entry = await api.call("POST", "/do-not-call", tenant.owner_key, json={"phoneNumber": "+14155550130"})
    other = await make_tenant(pool, "Other")
    status, page = await api.call("GET", "/do-not-call", other.owner_key)
    assert status == 200 and page["data"] == []
    status, _ = await api.call("GET", f"/do-not-call/{entry['id']}", other.owner_key)
    assert status == 404
    status, _ = await api.call("DELETE", f"/do-not-call/{entry['id']}", other.owner_key)
    assert status == 404
    # The other organization listing the same number is its own entry; the first one is untouched.
    status, own = await api.call("POST", "/do-not-call", other.owner_key, json={"phoneNumber": "+14155550130"})
    assert status == 201 and own["id"] != entry["id"]
    status, still = await api.call("GET", f"/do-not-call/{entry['id']}", tenant.owner_key)
    assert status == 200 and still["organizationId"] == tenant.organization_id


async def test_a_call_to_a_listed_number_is_refused_with_a_clear_message(
    api: Api, pool: asyncpg.Pool, tenant: Tenant, twilio: FakeTwilio
) -> None:
    agent_id = await make_agent(pool, tenant.organization_id)
    await phone_numbers.create_phone_number(pool, organization_id=tenant.organization_id, phone_number="+15550188101")
    await api.call("POST", "/do-not-call", tenant.owner_key, json={"phoneNumber": "+14155550140", "reason": "lawyer"})
    status, error = await api.call(
        "POST",
        "/calls",
        tenant.owner_key,
        json={"agentId": agent_id, "fromNumber": "+15550188101", "to": "+1 415 555 0140"},
    )
    assert status == 422, error
    assert error["error"]["field"] == "to"
    assert "do-not-call list" in error["error"]["message"] and "lawyer" in error["error"]["message"]
    rows = await pool.fetchval(
        'SELECT count(*) FROM "CallLog" WHERE "organizationId" = $1 AND "phoneNumber" = $2',
        tenant.organization_id,
        "+14155550140",
    )
    assert rows == 0 and twilio.calls_to("+14155550140") == []
