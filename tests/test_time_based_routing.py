"""Time-based routing: several agents on one number, each answering in its own `inboundHours`; outside every
agent's hours the caller hears the number's closed message and the CallLog ends MISSED with reason `closed`.

The real server (with a clock the test sets, never the time of day the tests run at) and real PostgreSQL; Twilio's
voice webhook signed as Twilio signs it."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
from twilio.request_validator import RequestValidator

from config.agent import parse_agent_configuration
from config.settings import load_settings
from engine.server.app import create_app
from storage import agents, phone_numbers
from storage.enums import AgentStatus, CallerType
from tests.fakes.server import serve
from tests.test_api_auth import Api, Tenant, assert_error, make_tenant

TOKEN = "routing-test-token-0123456789abcd"
CALLER = "+14155550142"
_numbers = itertools.count(1)

WEEKDAYS = ["mon", "tue", "wed", "thu", "fri"]
DAY = {"days": WEEKDAYS, "start": "09:00", "end": "17:00", "timezone": "Europe/Paris"}
NIGHT = {"days": WEEKDAYS, "start": "17:00", "end": "09:00", "timezone": "Europe/Paris"}

# Wednesday 2026-12-09: Paris is UTC+1 in winter.
WEDNESDAY_10_PARIS = datetime(2026, 12, 9, 9, 0, tzinfo=UTC)
WEDNESDAY_20_PARIS = datetime(2026, 12, 9, 19, 0, tzinfo=UTC)
SATURDAY_12_PARIS = datetime(2026, 12, 12, 11, 0, tzinfo=UTC)
SATURDAY_08_PARIS = datetime(2026, 12, 12, 7, 0, tzinfo=UTC)  # Friday night's window, still open


class SetClock:
    """The engine's clock: whatever instant the test sets."""

    def __init__(self) -> None:
        self.now = WEDNESDAY_10_PARIS

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def clock() -> SetClock:
    return SetClock()


@pytest.fixture(scope="module")
async def engine(db_url: str, clock: SetClock, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    settings = load_settings(
        database_url=db_url, twilio_auth_token=TOKEN, state_dir=str(tmp_path_factory.mktemp("routing"))
    )
    async with serve(create_app(settings, clock=clock)) as base:
        yield base


@pytest.fixture(scope="module")
async def api(engine: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine)


@pytest.fixture(scope="module")
async def tenant(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Routing", credits=100)


async def shared_number(pool: asyncpg.Pool, tenant: Tenant, **hours_by_agent: Any) -> tuple[str, dict[str, str]]:
    """A number and an INBOUND agent on it per keyword (its inboundHours, or None for none); (number, ids)."""
    number = await phone_numbers.create_phone_number(
        pool, organization_id=tenant.organization_id, phone_number=f"+1555558{next(_numbers):04d}"
    )
    ids = {}
    for name, hours in hours_by_agent.items():
        configuration = {"inboundHours": hours} if hours is not None else {}
        agent = await agents.create_agent(
            pool,
            organization_id=tenant.organization_id,
            name=name,
            status=AgentStatus.ACTIVE,
            caller_type=CallerType.INBOUND,
            phone_number_id=number.id,
            configuration=parse_agent_configuration(configuration).to_json(),
        )
        ids[name] = agent.id
    return number.phone_number, ids


def ringing(to: str) -> dict[str, str]:
    """The form of Twilio's voice webhook for a new call to `to`."""
    return {
        "CallSid": "CA" + secrets.token_hex(16),
        "AccountSid": "AC" + "4" * 32,
        "From": CALLER,
        "To": to,
        "CallStatus": "ringing",
        "Direction": "inbound",
    }


async def ring(
    engine: str, pool: asyncpg.Pool, to: str, form: dict[str, str] | None = None
) -> tuple[str, asyncpg.Record]:
    """Twilio's voice webhook for a call to `to` (or its `form` again): the TwiML answered and the CallLog written."""
    form = form or ringing(to)
    signature = RequestValidator(TOKEN).compute_signature(f"{engine}/twilio/voice", form)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{engine}/twilio/voice", data=form, headers={"X-Twilio-Signature": signature}) as response,
    ):
        assert response.status == 200
        twiml = await response.text()
    row = await pool.fetchrow('SELECT * FROM "CallLog" WHERE "callId" = $1', form["CallSid"])
    assert row is not None, twiml
    return twiml, row


async def test_each_agent_answers_in_its_own_hours(
    engine: str, pool: asyncpg.Pool, clock: SetClock, tenant: Tenant
) -> None:
    number, ids = await shared_number(pool, tenant, day=DAY, night=NIGHT)
    clock.now = WEDNESDAY_10_PARIS
    twiml, row = await ring(engine, pool, number)
    assert "<Connect><Stream" in twiml
    assert row["agentId"] == ids["day"]
    clock.now = WEDNESDAY_20_PARIS
    _, row = await ring(engine, pool, number)
    assert row["agentId"] == ids["night"]
    clock.now = SATURDAY_08_PARIS  # Friday 17:00 to Saturday 09:00 belongs to Friday
    _, row = await ring(engine, pool, number)
    assert row["agentId"] == ids["night"]


async def test_outside_every_agents_hours_the_caller_hears_the_closed_message(
    engine: str, pool: asyncpg.Pool, clock: SetClock, tenant: Tenant
) -> None:
    number, _ = await shared_number(pool, tenant, day=DAY, night=NIGHT)
    clock.now = SATURDAY_12_PARIS
    twiml, row = await ring(engine, pool, number)
    assert twiml.endswith(
        "<Response><Say>Sorry, we are closed right now. Please call back during our opening hours. Goodbye.</Say>"
        "<Hangup /></Response>"
    )
    assert (row["status"], row["agentId"], row["duration"]) == ("MISSED", None, 0)
    assert row["metadata"]["endReason"] == "closed"
    assert row["organizationId"] == tenant.organization_id


async def test_a_retried_webhook_of_a_closed_call_hears_the_closed_message_again_though_the_hours_opened_since(
    engine: str, pool: asyncpg.Pool, clock: SetClock, tenant: Tenant
) -> None:
    number, _ = await shared_number(pool, tenant, day=DAY)
    form = ringing(number)
    clock.now = SATURDAY_12_PARIS
    closed, _ = await ring(engine, pool, number, form)
    clock.now = WEDNESDAY_10_PARIS  # Twilio's retry comes when the agent would answer a new call
    retried, row = await ring(engine, pool, number, form)

    assert retried == closed and "we are closed" in closed
    assert (row["status"], row["metadata"]["endReason"]) == ("MISSED", "closed")
    assert await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "callId" = $1', form["CallSid"]) == 1


async def test_the_closed_message_is_the_numbers_own_set_through_the_api(
    engine: str, api: Api, pool: asyncpg.Pool, clock: SetClock, tenant: Tenant
) -> None:
    number, _ = await shared_number(pool, tenant, day=DAY)
    number_id = await pool.fetchval('SELECT "id" FROM "PhoneNumber" WHERE "phoneNumber" = $1', number)
    message = "Our office opens weekdays at nine, Paris time. Goodbye."
    status, body = await api.call(
        "PATCH", f"/phone-numbers/{number_id}", tenant.owner_key, json={"closedMessage": message}
    )
    assert status == 200 and body["closedMessage"] == message
    clock.now = SATURDAY_12_PARIS
    twiml, _ = await ring(engine, pool, number)
    assert twiml.endswith(f"<Response><Say>{message}</Say><Hangup /></Response>")


async def test_an_agent_with_hours_is_preferred_while_open_and_one_without_answers_otherwise(
    engine: str, pool: asyncpg.Pool, clock: SetClock, tenant: Tenant
) -> None:
    number, ids = await shared_number(pool, tenant, day=DAY, anytime=None)
    clock.now = WEDNESDAY_10_PARIS
    _, row = await ring(engine, pool, number)
    assert row["agentId"] == ids["day"]
    clock.now = SATURDAY_12_PARIS
    _, row = await ring(engine, pool, number)
    assert row["agentId"] == ids["anytime"]


async def test_hours_without_a_timezone_are_read_in_the_agents(
    engine: str, pool: asyncpg.Pool, clock: SetClock, tenant: Tenant
) -> None:
    number = await phone_numbers.create_phone_number(
        pool, organization_id=tenant.organization_id, phone_number=f"+1555558{next(_numbers):04d}"
    )
    configuration = {"timezone": "America/New_York", "inboundHours": [{"start": "09:00", "end": "12:00"}]}
    await agents.create_agent(
        pool,
        organization_id=tenant.organization_id,
        name="New York mornings",
        caller_type=CallerType.INBOUND,
        phone_number_id=number.id,
        configuration=parse_agent_configuration(configuration).to_json(),
    )
    clock.now = WEDNESDAY_10_PARIS  # 04:00 in New York
    _, row = await ring(engine, pool, number.phone_number)
    assert row["metadata"]["endReason"] == "closed"
    clock.now = datetime(2026, 12, 9, 15, 0, tzinfo=UTC)  # 10:00 in New York
    _, row = await ring(engine, pool, number.phone_number)
    assert row["status"] == "IN_PROGRESS"


async def test_a_new_number_has_a_default_closed_message_and_an_empty_one_is_refused(api: Api, tenant: Tenant) -> None:
    status, created = await api.call("POST", "/phone-numbers", tenant.owner_key, json={"phoneNumber": "+15555580999"})
    assert status == 201
    assert "closed" in created["closedMessage"]
    status, body = await api.call(
        "PATCH", f"/phone-numbers/{created['id']}", tenant.owner_key, json={"closedMessage": "   "}
    )
    assert status == 422
    assert_error(body, "validation_error", "closedMessage")
    status, body = await api.call(
        "POST",
        "/phone-numbers",
        tenant.owner_key,
        json={"phoneNumber": "+15555580998", "closedMessage": "Closed for the holidays."},
    )
    assert status == 201 and body["closedMessage"] == "Closed for the holidays."


async def test_bad_hours_are_refused_when_the_agent_is_saved(api: Api, tenant: Tenant) -> None:
    status, body = await api.call(
        "POST",
        "/agents",
        tenant.owner_key,
        json={"name": "Bad hours", "configuration": {"inboundHours": {"days": ["monday"], "start": "9"}}},
    )
    assert status == 422
    assert_error(body, "validation_error", "configuration.inboundHours.days[0]")
