"""Twilio's voice and status webhooks over real HTTP: who gets a media stream, who a polite refusal."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from twilio.request_validator import RequestValidator

from storage import agents, organizations, phone_numbers
from storage.enums import AgentStatus, CallerType, PhoneNumberStatus
from storage.events import create_event
from tests.engine_server import running_engine

TOKEN = "webhook-test-token-0123456789abcd"
CALLER = "+15005550006"


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    """The engine on loopback, checking signatures with TOKEN."""
    async with running_engine(db_url, twilio_auth_token=TOKEN) as base:
        yield base


async def _line(
    pool: asyncpg.Pool,
    *,
    credits: int = 100,
    agent_status: AgentStatus = AgentStatus.ACTIVE,
    inbound: PhoneNumberStatus = PhoneNumberStatus.ENABLED,
    configuration: Any = None,
) -> str:
    suffix = secrets.token_hex(4)
    org = await organizations.create_organization(pool, name="Hooks", slug=f"hooks-{suffix}", credits=credits)
    number = await phone_numbers.create_phone_number(
        pool, organization_id=org.id, phone_number=f"+1555{int(suffix, 16) % 10_000_000:07d}", inbound_status=inbound
    )
    await agents.create_agent(
        pool,
        organization_id=org.id,
        name="front desk",
        status=agent_status,
        caller_type=CallerType.INBOUND,
        phone_number_id=number.id,
        configuration={},
    )
    if configuration is not None:  # as another writer (the dashboard) may store it, unchecked
        await pool.execute(
            'UPDATE "Agent" SET "configuration" = $1 WHERE "phoneNumberId" = $2', configuration, number.id
        )
    return number.phone_number


async def _post(engine: str, path: str, form: dict[str, str]) -> tuple[int, str]:
    signature = RequestValidator(TOKEN).compute_signature(f"{engine}{path}", form)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{engine}{path}", data=form, headers={"X-Twilio-Signature": signature}) as response,
    ):
        return response.status, await response.text()


def _ring(to: str, call_sid: str | None = None) -> dict[str, str]:
    return {
        "CallSid": call_sid or "CA" + secrets.token_hex(16),
        "AccountSid": "AC" + "3" * 32,
        "From": CALLER,
        "To": to,
        "CallStatus": "ringing",
        "Direction": "inbound",
    }


async def test_an_answered_call_gets_a_media_stream_naming_its_new_call_log(engine: str, pool: asyncpg.Pool) -> None:
    number = await _line(pool)
    form = _ring(number)
    status, twiml = await _post(engine, "/twilio/voice", form)
    row = await pool.fetchrow('SELECT * FROM "CallLog" WHERE "callId" = $1', form["CallSid"])

    assert status == 200
    assert row is not None
    assert (row["status"], row["callType"], row["phoneNumber"]) == ("IN_PROGRESS", "INBOUND", CALLER)
    assert "<Connect><Stream" in twiml
    assert f'url="{engine.replace("http://", "ws://")}/twilio/media"' in twiml
    assert f'<Parameter name="callLogId" value="{row["id"]}" />' in twiml


async def _organization(pool: asyncpg.Pool, number: str) -> str:
    """The id of the organization holding `number`, with call.ended subscribed so its deliveries are queued."""
    org: str = await pool.fetchval('SELECT "organizationId" FROM "PhoneNumber" WHERE "phoneNumber" = $1', number)
    await create_event(pool, organization_id=org, name="call.ended", webhook_url="https://hooks.example.com/ended")
    return org


async def _calls_ended(pool: asyncpg.Pool, call_log_id: str) -> int:
    """How many call.ended deliveries were queued for the call."""
    count: int = await pool.fetchval(
        """
        SELECT count(*) FROM "WebhookDelivery"
        WHERE "event" = 'call.ended' AND "payload"->'data'->>'callLogId' = $1
        """,
        call_log_id,
    )
    return count


async def test_a_call_to_a_number_no_organization_holds_is_refused_politely_and_logged_nowhere(
    engine: str, pool: asyncpg.Pool
) -> None:
    form = _ring("+15555559876")
    status, twiml = await _post(engine, "/twilio/voice", form)
    retried = await _post(engine, "/twilio/voice", form)

    assert status == 200 and retried == (status, twiml)
    assert "<Say>" in twiml and "not in service" in twiml and twiml.rstrip().endswith("<Hangup /></Response>"), twiml
    assert await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "callId" = $1', form["CallSid"]) == 0


@dataclass(frozen=True)
class Refused:
    """A line that refuses calls for its organization's own reason: what the caller hears, the CallLog's reason."""

    line: dict[str, Any]
    heard: str
    reason: str
    by_agent: bool  # whether the CallLog names the number's agent


REFUSED_FOR_THE_ORGANIZATIONS_OWN_REASONS = pytest.mark.parametrize(
    "case",
    [
        Refused({"inbound": PhoneNumberStatus.DISABLED}, "not in service", "number_disabled", by_agent=False),
        Refused({"agent_status": AgentStatus.INACTIVE}, "nobody is available", "no_active_agent", by_agent=False),
        Refused({"credits": 0}, "cannot take calls", "insufficient_credits", by_agent=True),
    ],
    ids=["number disabled for inbound calls", "no active agent", "organization out of credits"],
)


@REFUSED_FOR_THE_ORGANIZATIONS_OWN_REASONS
async def test_a_call_refused_for_the_organizations_own_reasons_is_in_its_call_history_as_missed_naming_why(
    engine: str, pool: asyncpg.Pool, case: Refused
) -> None:
    number = await _line(pool, **case.line)
    org = await _organization(pool, number)
    credits = await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org)
    form = _ring(number)
    status, twiml = await _post(engine, "/twilio/voice", form)
    retried = await _post(engine, "/twilio/voice", form)  # Twilio retries: the refusal is heard again, logged once
    rows = await pool.fetch('SELECT * FROM "CallLog" WHERE "callId" = $1', form["CallSid"])
    agent_id = await pool.fetchval('SELECT "id" FROM "Agent" WHERE "organizationId" = $1', org)

    assert status == 200 and retried == (status, twiml)
    assert "<Say>" in twiml and case.heard in twiml and twiml.rstrip().endswith("<Hangup /></Response>"), twiml
    [row] = rows
    assert (row["organizationId"], row["status"], row["callType"], row["duration"]) == (org, "MISSED", "INBOUND", 0)
    assert (row["phoneNumber"], row["metadata"]["to"], row["metadata"]["endReason"]) == (CALLER, number, case.reason)
    assert row["agentId"] == (agent_id if case.by_agent else None)
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org) == credits
    assert await _calls_ended(pool, row["id"]) == 1


@REFUSED_FOR_THE_ORGANIZATIONS_OWN_REASONS
async def test_a_refused_call_whose_webhook_is_sent_twice_at_once_is_logged_once_and_refused_twice_alike(
    engine: str, pool: asyncpg.Pool, case: Refused
) -> None:
    number = await _line(pool, **case.line)
    form = _ring(number)
    # The load balancer retries a POST it gave up on while the first engine still answers it.
    first, second = await asyncio.gather(*(_post(engine, "/twilio/voice", form) for _ in range(2)))

    assert first == second and case.heard in first[1], (first, second)
    rows = await pool.fetch('SELECT "metadata" FROM "CallLog" WHERE "callId" = $1', form["CallSid"])
    assert [row["metadata"]["endReason"] for row in rows] == [case.reason]


@pytest.mark.parametrize(
    ("case", "configuration", "detail"),
    [
        ("a provider's key missing", {"stt": {"provider": "deepgram"}}, "DEEPGRAM_API_KEY, which is not set"),
        ("a configuration that cannot be read", ["sphinx", "espeak"], "the agent's configuration is invalid: "),
    ],
)
async def test_a_call_refused_because_its_agent_cannot_run_is_in_the_call_history_as_failed_naming_why(
    engine: str, pool: asyncpg.Pool, case: str, configuration: Any, detail: str
) -> None:
    number = await _line(pool, configuration=configuration)
    form = _ring(number)
    status, twiml = await _post(engine, "/twilio/voice", form)
    retried = await _post(engine, "/twilio/voice", form)  # Twilio retries: the refusal is logged once
    rows = await pool.fetch('SELECT * FROM "CallLog" WHERE "callId" = $1', form["CallSid"])
    agent_id = await pool.fetchval(
        'SELECT a."id" FROM "Agent" a JOIN "PhoneNumber" p ON p."id" = a."phoneNumberId" WHERE p."phoneNumber" = $1',
        number,
    )

    assert status == 200 and "not set up correctly" in twiml and retried == (status, twiml), case
    [row] = rows
    assert (row["status"], row["callType"], row["agentId"], row["duration"]) == ("FAILED", "INBOUND", agent_id, 0)
    assert (row["phoneNumber"], row["metadata"]["to"]) == (CALLER, number)
    assert row["metadata"]["endReason"] == "pipeline_unavailable"
    assert detail in row["metadata"]["endDetail"], row["metadata"]["endDetail"]


async def test_a_retried_webhook_answers_again_with_the_same_call_log(engine: str, pool: asyncpg.Pool) -> None:
    number = await _line(pool)
    form = _ring(number)
    first = await _post(engine, "/twilio/voice", form)
    again = await _post(engine, "/twilio/voice", form)

    assert first == again
    assert await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "callId" = $1', form["CallSid"]) == 1


@pytest.mark.parametrize(
    ("twilio_status", "status", "reason"),
    [("busy", "MISSED", "busy"), ("no-answer", "MISSED", "no-answer"), ("failed", "FAILED", "failed")],
)
async def test_status_callbacks_close_calls_that_never_streamed(
    engine: str, pool: asyncpg.Pool, twilio_status: str, status: str, reason: str
) -> None:
    number = await _line(pool)
    form = _ring(number)
    await _post(engine, "/twilio/voice", form)
    code, _ = await _post(
        engine,
        "/twilio/status",
        {"CallSid": form["CallSid"], "AccountSid": form["AccountSid"], "CallStatus": twilio_status},
    )
    row = await pool.fetchrow('SELECT * FROM "CallLog" WHERE "callId" = $1', form["CallSid"])

    assert code == 204
    assert row is not None
    assert (row["status"], row["metadata"]["endReason"]) == (status, reason)


async def test_twenty_calls_ringing_at_once_for_three_credits_get_three_streams_and_the_rest_a_refusal(
    engine: str, pool: asyncpg.Pool
) -> None:
    number = await _line(pool, credits=3)  # the free plan: one credit a minute
    org = await pool.fetchval('SELECT "organizationId" FROM "PhoneNumber" WHERE "phoneNumber" = $1', number)
    rings = [_ring(number) for _ in range(20)]

    answers = await asyncio.gather(*(_post(engine, "/twilio/voice", form) for form in rings))

    streamed = [form for form, (_, twiml) in zip(rings, answers, strict=True) if "<Connect><Stream" in twiml]
    refused = [twiml for _, twiml in answers if "cannot take calls" in twiml]
    assert (len(streamed), len(refused)) == (3, 17)
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org) == 0
    logged = await pool.fetch(
        """SELECT "status", "metadata"->>'endReason' AS "reason", count(*) FROM "CallLog" WHERE "organizationId" = $1
           GROUP BY 1, 2 ORDER BY "status"::text""",
        org,
    )
    assert [tuple(row) for row in logged] == [("IN_PROGRESS", None, 3), ("MISSED", "insufficient_credits", 17)]

    # Nobody picks up: each call's status callback closes it and returns its reserved minute.
    for form in streamed:
        await _post(
            engine,
            "/twilio/status",
            {"CallSid": form["CallSid"], "AccountSid": form["AccountSid"], "CallStatus": "no-answer"},
        )
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org) == 3


def _stream_start(form: dict[str, str], call_log_id: str) -> dict[str, Any]:
    """Twilio's `start` message of the call `form` rang for, naming its CallLog."""
    return {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": "MZ" + "4" * 32,
        "start": {
            "streamSid": "MZ" + "4" * 32,
            "accountSid": form["AccountSid"],
            "callSid": form["CallSid"],
            "tracks": ["inbound"],
            "customParameters": {"callLogId": call_log_id},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }


async def _answered(engine: str, pool: asyncpg.Pool) -> tuple[dict[str, str], str]:
    """A call rung to a new line and answered with a stream: the webhook's form and the call's CallLog id."""
    form = _ring(await _line(pool))
    _, twiml = await _post(engine, "/twilio/voice", form)
    return form, twiml.split('name="callLogId" value="')[1].split('"')[0]


def _media_url(engine: str) -> str:
    return engine.replace("http://", "ws://") + "/twilio/media"


async def test_a_media_socket_lost_without_stop_fails_the_call_with_that_reason(
    engine: str, pool: asyncpg.Pool
) -> None:
    form, call_log_id = await _answered(engine, pool)
    signature = RequestValidator(TOKEN).compute_signature(_media_url(engine), {})
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(_media_url(engine), headers={"X-Twilio-Signature": signature})
        await ws.send_str(json.dumps(_stream_start(form, call_log_id)))
        await ws.receive(timeout=10)  # the agent starts speaking
        await ws.close()
    for _ in range(100):
        row = await pool.fetchrow('SELECT * FROM "CallLog" WHERE "id" = $1', call_log_id)
        if row is not None and row["status"] != "IN_PROGRESS":
            break
        await asyncio.sleep(0.1)

    assert row is not None
    assert (row["status"], row["metadata"]["endReason"]) == ("FAILED", "stream_lost")


async def test_a_media_socket_without_twilios_signature_is_refused_and_the_call_waits_for_twilios(
    engine: str, pool: asyncpg.Pool
) -> None:
    # The signature was checked only when the header came: a socket without one, naming a ringing call's CallSid
    # and CallLog id, took the call's stream (its audio both ways) before Twilio's own socket could.
    form, call_log_id = await _answered(engine, pool)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            ws = await http.ws_connect(_media_url(engine))
            await ws.send_str(json.dumps(_stream_start(form, call_log_id)))
            await ws.receive(timeout=10)
    assert refused.value.status == 403
    row = await pool.fetchrow('SELECT "status", "metadata" FROM "CallLog" WHERE "id" = $1', call_log_id)
    assert row is not None and row["status"] == "IN_PROGRESS"
    assert "engineNode" not in row["metadata"]  # no stream has taken the call: Twilio's still can


# ------------------------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("CallSid", "CA" + "0" * 31 + "\x00"),
        ("CallSid", "CA" + "0" * 5000),
        ("From", "+1555\x000001"),
        ("From", "+1" + "5" * 5000),
        ("To", "+1555\x00"),
        ("AccountSid", "AC\x00"),
        ("CallerName", "Mallory\x00"),
        ("CallerName", "M" * 5000),
    ],
    ids=["CallSid with NUL", "CallSid of 5 KB", "From with NUL", "From of 5 KB", "To with NUL", "AccountSid with NUL",
         "CallerName with NUL", "CallerName of 5 KB"],
)  # fmt: skip
async def test_a_signed_voice_webhook_with_a_field_twilio_never_sends_is_a_400_and_creates_nothing(
    engine: str, pool: asyncpg.Pool, field: str, value: str
) -> None:
    number = await _line(pool)
    form = {**_ring(number), field: value}
    status, text = await _post(engine, "/twilio/voice", form)
    good_status, _ = await _post(engine, "/twilio/voice", _ring(number))  # the line answers the next call

    assert (status, good_status) == (400, 200)
    assert text.startswith(f"{field}: ")
    assert await pool.fetchval("""SELECT count(*) FROM "CallLog" WHERE "metadata"->>'to' = $1""", number) == 1


@pytest.mark.parametrize("duration", ["²", "9" * 5000, "-3", " 3"])
async def test_a_status_callback_with_a_duration_that_is_not_ascii_digits_is_a_400_and_changes_nothing(
    engine: str, pool: asyncpg.Pool, duration: str
) -> None:
    number = await _line(pool)
    form = _ring(number)
    await _post(engine, "/twilio/voice", form)
    status, _ = await _post(
        engine,
        "/twilio/status",
        {"CallSid": form["CallSid"], "AccountSid": form["AccountSid"], "CallStatus": "busy", "CallDuration": duration},
    )
    row = await pool.fetchrow('SELECT * FROM "CallLog" WHERE "callId" = $1', form["CallSid"])

    assert status == 400
    assert row is not None and row["status"] == "IN_PROGRESS"


@pytest.mark.parametrize("duration", ["²", "9" * 5000])
async def test_an_amd_verdict_with_a_detection_time_that_is_not_ascii_digits_is_a_400(
    engine: str, duration: str
) -> None:
    form = {
        "CallSid": "CA" + secrets.token_hex(16),
        "AccountSid": "AC" + "3" * 32,
        "AnsweredBy": "machine_start",
        "MachineDetectionDuration": duration,
    }
    status, text = await _post(engine, "/twilio/amd", form)

    assert (status, text.split(":")[0]) == (400, "MachineDetectionDuration")


async def test_a_body_that_is_not_utf8_is_refused_unsigned_with_403_and_signed_with_400(engine: str) -> None:
    body = b"CallSid=CA\xff\xfe&From=%2B15005550006"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    signed_url = RequestValidator(TOKEN).compute_signature(f"{engine}/twilio/voice", {})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{engine}/twilio/voice", data=body, headers=headers) as unsigned:
            unsigned_status = unsigned.status
        async with http.post(
            f"{engine}/twilio/voice", data=body, headers={**headers, "X-Twilio-Signature": signed_url}
        ) as signed:
            signed_status = signed.status
        async with http.get(f"{engine}/health") as health:
            health_status = health.status

    assert (unsigned_status, signed_status, health_status) == (403, 400, 200)
