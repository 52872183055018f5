"""The Idempotency-Key header on POST /v1/calls and POST /v1/campaigns, through the real server: a retry gets the
first answer and dials or creates nothing again, even when the retries race the first request."""

from __future__ import annotations

import asyncio
import json
import secrets
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.api.idempotency import IN_FLIGHT_LIMIT
from storage import call_logs
from storage.enums import CallStatus
from tests.engine_server import running_engine
from tests.fakes.engine_processes import engine_environment, free_port, start_engine, wait_healthy
from tests.fakes.twilio import FakeTwilio, NoAnswer
from tests.test_api_auth import Tenant, make_tenant
from tests.test_outbound_calls import callee, make_agent
from tests.test_plan_limits import open_call, outbound_tenant


@pytest.fixture(scope="module")
async def engine(db_url: str, twilio: FakeTwilio) -> AsyncIterator[str]:
    async with running_engine(
        db_url,
        dispatch_enabled=False,
        call_slot_wait=0,
        max_concurrent_calls_free=2,
        twilio_auth_token=twilio.auth_token,
        twilio_account_sid=twilio.account_sid,
        twilio_api_base=twilio.api_base,
    ) as base:
        yield base


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


Answer = tuple[int, dict[str, str], Any]


async def post(
    http: aiohttp.ClientSession, engine: str, path: str, tenant: Tenant, body: Any, *, key: str | None
) -> Answer:
    """POST to /v1 with the owner's key and an Idempotency-Key: status, headers and JSON body."""
    headers = {"Authorization": f"Bearer {tenant.owner_key}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    async with http.post(f"{engine}/v1{path}", json=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


def new_key() -> str:
    return secrets.token_urlsafe(16)


async def dialer(pool: asyncpg.Pool, twilio: FakeTwilio) -> tuple[Tenant, dict[str, str]]:
    """A free-plan organization and the body of a call to a fresh number that rings unanswered."""
    tenant, agent_id, caller_id = await outbound_tenant(pool)
    to = callee()
    twilio.behave(to, NoAnswer(ring_ms=200))
    return tenant, {"agentId": agent_id, "fromNumber": caller_id, "to": to}


async def call_logs_to(pool: asyncpg.Pool, number: str) -> int:
    count: int = await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "phoneNumber" = $1', number)
    return count


# -- POST /v1/calls --------------------------------------------------------------------------------------------------


async def test_a_retried_call_gets_the_first_answer_and_dials_once(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant, body = await dialer(pool, twilio)
    key = new_key()

    first = await post(http, engine, "/calls", tenant, body, key=key)
    again = await post(http, engine, "/calls", tenant, {**body}, key=key)

    assert first[0] == 201, first[2]
    assert (again[0], again[2]) == (201, first[2])
    assert "Idempotent-Replayed" not in first[1] and again[1]["Idempotent-Replayed"] == "true"
    assert twilio.creates[body["to"]] == 1
    assert await call_logs_to(pool, body["to"]) == 1


async def test_retries_racing_the_first_request_never_dial_twice(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant, body = await dialer(pool, twilio)
    key = new_key()

    answers = await asyncio.gather(*(post(http, engine, "/calls", tenant, body, key=key) for _ in range(8)))

    assert twilio.creates[body["to"]] == 1
    assert await call_logs_to(pool, body["to"]) == 1
    placed = [answer for answer in answers if answer[0] == 201]
    in_flight = [answer for answer in answers if answer[0] == 409]
    assert len(placed) + len(in_flight) == 8 and placed
    assert len({answer[2]["callLogId"] for answer in placed}) == 1
    for _, headers, error in in_flight:
        assert error["error"]["code"] == "idempotency_key_in_flight" and headers["Retry-After"] == "1"
    # Once the first has answered, every retry gets that answer.
    status, headers, replay = await post(http, engine, "/calls", tenant, body, key=key)
    assert (status, replay, headers["Idempotent-Replayed"]) == (201, placed[0][2], "true")


async def test_the_same_key_with_another_body_is_refused_and_dials_nothing(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant, body = await dialer(pool, twilio)
    key = new_key()
    assert (await post(http, engine, "/calls", tenant, body, key=key))[0] == 201
    other = {**body, "to": callee()}

    status, _, error = await post(http, engine, "/calls", tenant, other, key=key)

    assert status == 422
    assert error["error"]["code"] == "idempotency_key_reused" and error["error"]["field"] == "Idempotency-Key"
    assert twilio.creates[other["to"]] == 0


async def test_the_body_is_compared_as_json_not_as_bytes(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant, body = await dialer(pool, twilio)
    key = new_key()
    headers = {"Authorization": f"Bearer {tenant.owner_key}", "Idempotency-Key": key}
    answers = []
    for text in (json.dumps(body), json.dumps(dict(reversed(body.items())), indent=2)):
        async with http.post(
            f"{engine}/v1/calls", data=text, headers={**headers, "Content-Type": "application/json"}
        ) as response:
            answers.append((response.status, await response.json()))
    assert answers[0] == answers[1] and answers[0][0] == 201
    assert twilio.creates[body["to"]] == 1


async def test_a_429_for_a_full_plan_is_not_kept_so_the_retry_dials_once_a_slot_frees(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant, body = await dialer(pool, twilio)
    held = [await open_call(pool, tenant.organization_id) for _ in range(2)]
    key = new_key()
    assert (await post(http, engine, "/calls", tenant, body, key=key))[0] == 429

    await call_logs.finalize_call_log(
        pool, organization_id=tenant.organization_id, call_log_id=held[0], status=CallStatus.COMPLETED, duration=1
    )
    status, headers, _ = await post(http, engine, "/calls", tenant, body, key=key)

    assert status == 201 and "Idempotent-Replayed" not in headers
    assert twilio.creates[body["to"]] == 1


async def test_an_error_answer_is_kept_like_a_success(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant, body = await dialer(pool, twilio)
    inactive = {**body, "agentId": "no-such-agent"}
    key = new_key()
    first = await post(http, engine, "/calls", tenant, inactive, key=key)
    again = await post(http, engine, "/calls", tenant, inactive, key=key)
    assert first[0] == 422 and (again[0], again[2]) == (first[0], first[2])
    assert again[1]["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize(
    "unreadable", ["[" * 5_000 + "]" * 5_000, '{"agentId": 1' + "0" * 5_000 + "}"], ids=["nested", "long number"]
)
async def test_a_body_json_cannot_read_is_a_400_with_a_key_too(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool, twilio: FakeTwilio, unreadable: str
) -> None:
    tenant, _ = await dialer(pool, twilio)
    headers = {"Authorization": f"Bearer {tenant.owner_key}", "Idempotency-Key": new_key()}
    async with http.post(f"{engine}/v1/calls", data=unreadable, headers=headers) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "naïve"])
async def test_an_unusable_key_is_a_422_naming_the_header(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool, twilio: FakeTwilio, key: str
) -> None:
    tenant, body = await dialer(pool, twilio)
    headers = {"Authorization": f"Bearer {tenant.owner_key}", "Idempotency-Key": key}
    async with http.post(f"{engine}/v1/calls", json=body, headers=headers) as response:
        error = await response.json()
        assert response.status == 422
    assert error["error"]["field"] == "Idempotency-Key"
    assert twilio.creates[body["to"]] == 0


@asynccontextmanager
async def doomed_engine(db_url: str, twilio: FakeTwilio, tmp_path: Path) -> AsyncIterator[tuple[str, Process]]:
    """`dialtone serve` in a process of its own, to be killed mid-request: its URL and its process."""
    env = engine_environment(
        db_url,
        DIALTONE_STATE_DIR=str(tmp_path / "state"),
        DIALTONE_DISPATCH="false",
        TWILIO_ACCOUNT_SID=twilio.account_sid,
        TWILIO_AUTH_TOKEN=twilio.auth_token,
        TWILIO_API_BASE=twilio.api_base,
    )
    port = free_port()
    process = await start_engine(port, env, tmp_path)
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", process)
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_a_key_whose_process_died_mid_request_answers_the_unknown_outcome_once_it_cannot_be_running(  # noqa: PLR0917 (fixtures)
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool, twilio: FakeTwilio, db_url: str, tmp_path: Path
) -> None:
    tenant, body = await dialer(pool, twilio)
    held = twilio.hold_create(body["to"])
    key = new_key()
    async with doomed_engine(db_url, twilio, tmp_path) as (doomed, process):
        first = asyncio.create_task(post(http, doomed, "/calls", tenant, body, key=key))
        await asyncio.wait_for(held.arrived.wait(), 60)  # the key is claimed and Twilio asked: then the host dies
        process.kill()
        await process.wait()
    with pytest.raises(aiohttp.ClientError):
        await first
    held.release(create=False)
    assert (await post(http, engine, "/calls", tenant, body, key=key))[0] == 409  # it might still be running...

    # ...until it has been claimed for longer than any request runs.
    await pool.execute(
        """UPDATE "IdempotencyKey" SET "createdAt" = "createdAt" - $2::interval WHERE "key" = $1""",
        key,
        IN_FLIGHT_LIMIT,
    )
    status, _, answer = await post(http, engine, "/calls", tenant, body, key=key)
    assert (status, answer["error"]["code"]) == (500, "internal_error")
    assert "unknown" in answer["error"]["message"]
    again = await post(http, engine, "/calls", tenant, body, key=key)
    assert (again[0], again[2], again[1]["Idempotent-Replayed"]) == (500, answer, "true")
    assert len(twilio.calls_to(body["to"])) == 0  # and nothing was dialed again


# -- POST /v1/campaigns ----------------------------------------------------------------------------------------------


async def campaign_body(pool: asyncpg.Pool, tenant: Tenant) -> dict[str, str]:
    return {"batchName": f"Reminders {secrets.token_hex(2)}", "agentId": await make_agent(pool, tenant.organization_id)}


async def campaigns_named(pool: asyncpg.Pool, tenant: Tenant, name: str) -> int:
    count: int = await pool.fetchval(
        'SELECT count(*) FROM "Campaign" WHERE "organizationId" = $1 AND "batchName" = $2', tenant.organization_id, name
    )
    return count


async def test_campaign_creation_retried_concurrently_creates_one_campaign(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Campaigner")
    body = await campaign_body(pool, tenant)
    key = new_key()

    answers = await asyncio.gather(*(post(http, engine, "/campaigns", tenant, body, key=key) for _ in range(6)))

    assert {status for status, _, _ in answers} <= {201, 409}
    assert await campaigns_named(pool, tenant, body["batchName"]) == 1
    created = {answer[2]["id"] for answer in answers if answer[0] == 201}
    assert len(created) == 1


async def test_keys_belong_to_one_organization_and_one_operation(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    first, second = await make_tenant(pool, "First"), await make_tenant(pool, "Second")
    key = new_key()
    one = await post(http, engine, "/campaigns", first, await campaign_body(pool, first), key=key)
    other = await post(http, engine, "/campaigns", second, await campaign_body(pool, second), key=key)
    assert (one[0], other[0]) == (201, 201) and one[2]["id"] != other[2]["id"]
    assert "Idempotent-Replayed" not in other[1]


async def test_an_expired_key_runs_the_request_again(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Expiring")
    body = await campaign_body(pool, tenant)
    key = new_key()
    assert (await post(http, engine, "/campaigns", tenant, body, key=key))[0] == 201
    await pool.execute(
        """UPDATE "IdempotencyKey" SET "expiresAt" = now() - interval '1 second' WHERE "key" = $1""", key
    )

    status, headers, _ = await post(http, engine, "/campaigns", tenant, body, key=key)

    assert status == 201 and "Idempotent-Replayed" not in headers
    assert await campaigns_named(pool, tenant, body["batchName"]) == 2
    assert await pool.fetchval('SELECT count(*) FROM "IdempotencyKey" WHERE "key" = $1', key) == 1


async def test_without_the_header_every_request_creates(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Plain")
    body = await campaign_body(pool, tenant)
    for _ in range(2):
        assert (await post(http, engine, "/campaigns", tenant, body, key=None))[0] == 201
    assert await campaigns_named(pool, tenant, body["batchName"]) == 2


async def test_the_openapi_document_offers_the_header_on_both_operations(
    engine: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{engine}/v1/openapi.json") as response:
        document = await response.json()
    for path in ("/v1/calls", "/v1/campaigns"):
        operation = document["paths"][path]["post"]
        header = [p for p in operation["parameters"] if p["in"] == "header"]
        assert [p["name"] for p in header] == ["Idempotency-Key"]
        assert {"409", "422", "429"} <= set(operation["responses"])
    assert "parameters" not in document["paths"]["/v1/agents"]["post"] or all(
        p["in"] != "header" for p in document["paths"]["/v1/agents"]["post"]["parameters"]
    )


async def test_a_refused_campaign_is_replayed_with_its_first_answer(
    engine: str, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    # The database refuses the agent (not the organization's): the retry must hear that 422 again, not a 500
    # saying the outcome is unknown.
    tenant = await make_tenant(pool, "Refused")
    body = {"batchName": "Nobody's agent", "agentId": "no-such-agent"}
    key = new_key()
    first = await post(http, engine, "/campaigns", tenant, body, key=key)
    again = await post(http, engine, "/campaigns", tenant, body, key=key)
    assert first[0] == 422
    assert (again[0], again[2]) == (first[0], first[2])
    assert again[1]["Idempotent-Replayed"] == "true"
