"""A transfer Twilio carries out by leaving the media stream before it answers the request that asked for it (the
fake Twilio does what Twilio may: `stop` on the stream, then the REST answer): the call ends `transferred`, and its
leg stays reserved for the dial's settlement; a transfer asked through the API meanwhile is refused (409), not
made twice. Outbound calls placed through the fake Twilio, the Deepgram and OpenAI fakes behind their real SDKs, real
PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import asyncpg
import pytest

from config.agent import parse_agent_configuration
from config.settings import load_settings
from engine.simulator import Pause, Say
from engine.twilio.outbound_calls import OutboundDeps, PlacedCall, place_call
from engine.twilio.rest import TwilioCalls
from storage import agents, organizations, phone_numbers, transfer_legs
from storage.enums import AgentStatus, CallerType
from tests.engine_server import running_engine
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.openai_chat import FakeOpenAI, ToolCall
from tests.fakes.twilio import Answer, FakeCall, FakeTwilio, dialed_number
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_dispatch_do_not_call import twilio_settings
from tests.test_live_call_control_channel import held_by_a_node
from tests.test_opt_out_calls import CLOUD, DG_KEY, OPENAI_KEY, deepgram, openai
from tests.test_outbound_calls import finished_log

__all__ = ["deepgram", "openai"]  # that module's fixtures: the fakes behind the engine's Deepgram and OpenAI SDKs

Fakes = tuple[FakeTwilio, FakeDeepgram, FakeOpenAI]
BILLING = "+14155550199"
RATE = 10
CONTROL_TIMEOUT = 1.0
"""The API node's control timeout in the relay test: Twilio answers the holding node after it has passed."""
_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def settings(twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI) -> dict[str, Any]:
    """The engine's settings: the fakes, and one rate on every plan."""
    return {
        "dispatch_enabled": False,
        "deepgram_api_key": DG_KEY,
        "openai_api_key": OPENAI_KEY,
        "deepgram_url": deepgram.url,
        "openai_base_url": openai.base_url,
        "credits_per_minute_free": RATE,
        "credits_per_minute_pro": RATE,
        "credits_per_minute_enterprise": RATE,
        **twilio_settings(twilio),
    }


@pytest.fixture(scope="module")
async def deps(
    db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, settings: dict[str, Any]
) -> AsyncIterator[OutboundDeps]:
    """The engine on loopback, and what place_call needs to place its calls through the fake Twilio."""
    client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
    async with running_engine(db_url, **settings) as engine:
        try:
            yield OutboundDeps(
                pool=pool, settings=load_settings(database_url=db_url, **settings), twilio=client, public_url=engine
            )
        finally:
            await client.close()


async def transfer_to_billing(
    deps: OutboundDeps,
    pool: asyncpg.Pool,
    *,
    twilio: FakeTwilio,
    deepgram: FakeDeepgram,
    openai: FakeOpenAI,
    organization_id: str,
    model_transfers: bool = True,
    asks_after_ms: int = 1500,
    stays_ms: int = 20_000,
    agent_settings: Mapping[str, Any] | None = None,
    ring_ms: int = 100,
) -> PlacedCall:
    """An outbound call of the organization whose callee answers after `ring_ms`, asks for billing, then stays
    `stays_ms` on the line; the model transfers them there (or, not `model_transfers`, only says it will).
    `agent_settings` are the agent's configuration beyond its transfers."""
    caller_id = await phone_numbers.create_phone_number(
        pool, organization_id=organization_id, phone_number=f"+1555019{next(_numbers):04d}"
    )
    configuration = {
        **CLOUD,
        "firstSentence": "Hi, this is the clinic.",
        "transfer": {"destinations": [{"number": BILLING, "label": "Billing"}], "maxMinutes": 5},
        **(agent_settings or {}),
    }
    agent = await agents.create_agent(
        pool,
        organization_id=organization_id,
        name="caller",
        status=AgentStatus.ACTIVE,
        caller_type=CallerType.OUTBOUND,
        configuration=parse_agent_configuration(configuration).to_json(),
    )
    deepgram.transcripts.extend(["Hello?", "Put me through to billing."])
    transfer = ToolCall("transfer_call", {"phone_number": BILLING, "reason": "billing"})
    openai.replies.append(["Transferring you now.", transfer] if model_transfers else ["One moment, please."])
    callee = f"+1646555{next(_numbers):04d}"
    asks = Say("put me through to billing")
    twilio.behave(
        callee, Answer(greeting="Hello?", script=[Pause(asks_after_ms), asks, Pause(stays_ms)], ring_ms=ring_ms)
    )
    placed = await place_call(
        deps, organization_id=organization_id, agent_id=agent.id, from_number=caller_id.phone_number, to=callee
    )
    assert isinstance(placed, PlacedCall)
    return placed


async def held_call(
    deps: OutboundDeps, pool: asyncpg.Pool, tenant: Tenant, fakes: Fakes, **options: Any
) -> tuple[PlacedCall, FakeCall, asyncio.Event]:
    """transfer_to_billing's call of the tenant (with `options`), once its node holds it; Twilio holds the call's
    updates until the gate returned is set."""
    twilio, deepgram, openai = fakes
    placed = await transfer_to_billing(
        deps, pool, twilio=twilio, deepgram=deepgram, openai=openai, organization_id=tenant.organization_id, **options
    )
    call = twilio.calls[placed.call_sid]
    gate = call.update_gate = asyncio.Event()
    await held_by_a_node(pool, tenant.organization_id)
    return placed, call, gate


async def transfer_answered_late(
    deps: OutboundDeps, pool: asyncpg.Pool, fakes: Fakes, organization_id: str
) -> tuple[PlacedCall, asyncpg.Record]:
    """transfer_to_billing's call of the organization, whose transfer Twilio makes (`stop`, then its `<Dial>`) but
    answers only once the request has timed out; and its CallLog once it has ended."""
    twilio, deepgram, openai = fakes
    placed = await transfer_to_billing(
        deps, pool, twilio=twilio, deepgram=deepgram, openai=openai, organization_id=organization_id
    )
    call = twilio.calls[placed.call_sid]
    call.answer_gate = asyncio.Event()
    try:
        return placed, await finished_log(pool, placed.call_log_id)
    finally:
        call.answer_gate.set()


async def model_answered(openai: FakeOpenAI) -> None:
    """Once the model has taken the reply queued for it."""
    for _ in range(600):
        if not openai.replies:
            return
        await asyncio.sleep(0.05)


async def test_a_transfer_twilio_makes_before_it_answers_the_request_ends_the_call_transferred(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    org = (await organizations.create_organization(pool, name="Stop", slug="transfer-stop", credits=1000)).id
    placed = await transfer_to_billing(deps, pool, twilio=twilio, deepgram=deepgram, openai=openai, organization_id=org)

    call = await twilio.finished(placed.call_sid)
    log = await finished_log(pool, placed.call_log_id)
    [update] = call.updates
    assert dialed_number(update["Twiml"]) == BILLING
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred"), log["metadata"]
    assert log["metadata"]["endDetail"] == "billing"
    # The leg waits for the dial's action request (or the sweep): five minutes of credits held.
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=placed.call_log_id) == 5 * RATE


async def test_a_transfer_through_the_api_while_the_models_is_under_way_is_a_conflict(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    tenant = await make_tenant(pool, "Both", credits=1000)
    placed = await transfer_to_billing(
        deps, pool, twilio=twilio, deepgram=deepgram, openai=openai, organization_id=tenant.organization_id
    )
    call = twilio.calls[placed.call_sid]
    call.update_gate = asyncio.Event()  # Twilio holds the model's transfer request, unanswered
    await asyncio.wait_for(call.updated.wait(), 60)
    async with aiohttp.ClientSession() as session:
        status, body = await Api(session, deps.public_url).call(
            "POST", f"/live-calls/{placed.call_log_id}/transfer", tenant.owner_key, json={"to": BILLING}
        )
    call.update_gate.set()

    assert status == 409, body
    assert "a transfer is under way" in body["error"]["message"]
    await twilio.finished(placed.call_sid)
    log = await finished_log(pool, placed.call_log_id)
    assert (log["status"], log["metadata"]["endReason"], log["metadata"]["endDetail"]) == (
        "COMPLETED",
        "transferred",
        "billing",
    )
    assert len(call.updates) == 1


async def test_a_transfer_relayed_to_the_node_holding_the_call_waits_for_twilios_answer(  # noqa: PLR0917 (fixtures)
    deps: OutboundDeps,
    db_url: str,
    pool: asyncpg.Pool,
    twilio: FakeTwilio,
    deepgram: FakeDeepgram,
    openai: FakeOpenAI,
) -> None:
    """The API's node waits for the holding node's acknowledgement as long as Twilio's request may take there: a
    transfer Twilio answers after the control timeout is a 202, not a 409 'did not acknowledge' for a transfer made."""
    tenant = await make_tenant(pool, "Relayed", credits=1000)
    fakes = (twilio, deepgram, openai)
    # Twilio will answer the transfer after the relay's control timeout.
    placed, call, gate = await held_call(deps, pool, tenant, fakes, model_transfers=False)
    await model_answered(openai)  # the callee asks for billing; the model answers without transferring
    async with (
        running_engine(db_url, dispatch_enabled=False, control_timeout=CONTROL_TIMEOUT) as other,
        aiohttp.ClientSession() as session,
    ):
        asked = asyncio.create_task(
            Api(session, other).call(
                "POST", f"/live-calls/{placed.call_log_id}/transfer", tenant.owner_key, json={"to": BILLING}
            )
        )
        await asyncio.wait_for(call.updated.wait(), 60)
        await asyncio.sleep(2 * CONTROL_TIMEOUT)
        gate.set()
        status, body = await asked

    assert (status, body) == (202, {"callLogId": placed.call_log_id, "to": BILLING})
    await twilio.finished(placed.call_sid)
    log = await finished_log(pool, placed.call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred"), log["metadata"]
    assert [dialed_number(update["Twiml"]) for update in call.updates] == [BILLING]


async def test_a_transfer_twilio_makes_without_answering_the_request_in_time_ends_the_call_transferred(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """Twilio leaves the stream for the `<Dial>` but its answer to the request comes after the client gave up: its
    record of the calls the `<Dial>` made says the call was transferred, and the leg stays held for its settlement."""
    org = (await organizations.create_organization(pool, name="Late", slug="transfer-late", credits=1000)).id
    placed, log = await transfer_answered_late(deps, pool, (twilio, deepgram, openai), org)

    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred"), log["metadata"]
    assert log["metadata"]["endDetail"] == "billing"
    assert [dialed_number(update["Twiml"]) for update in twilio.calls[placed.call_sid].updates] == [BILLING]
    [dial] = twilio.dialed_calls[placed.call_sid]
    assert dial.to == BILLING
    # Billed once: the call's started minute, and the leg's five held until the dial's action request settles them.
    assert await transfer_legs.reserved_leg_credits(pool, call_log_id=placed.call_log_id) == 5 * RATE
    assert await pool.fetchval('SELECT "credits" FROM "Organization" WHERE "id" = $1', org) == 1000 - RATE - 5 * RATE


async def test_a_transfer_twilio_makes_without_answering_the_request_in_time_tells_the_caller_no_failure(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """Twilio has left the stream for the `<Dial>` when its answer to the model's transfer request fails to come: the
    agent does not begin telling a caller who is gone (and may be talking to billing) that the transfer failed."""
    org = (await organizations.create_organization(pool, name="Quiet", slug="transfer-quiet", credits=1000)).id
    placed, log = await transfer_answered_late(deps, pool, (twilio, deepgram, openai), org)

    assert log["metadata"]["endReason"] == "transferred", log["metadata"]
    said = await pool.fetch(
        """SELECT "text" FROM "CallTurn" WHERE "callLogId" = $1 AND "speaker" = 'agent' ORDER BY "index" """,
        placed.call_log_id,
    )
    assert [row["text"] for row in said] == ["Hi, this is the clinic.", "Transferring you now."]


async def test_a_transfer_through_the_api_that_twilio_makes_without_answering_in_time_is_answered_as_made(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """Twilio leaves the stream for the `<Dial>` but answers the API's transfer request only after it timed out: its
    record shows the dialed call, and the API answers what happened, a transfer made (202), neither a refusal (502)
    nor a transfer still in doubt (504)."""
    tenant = await make_tenant(pool, "Unanswered", credits=1000)
    placed = await transfer_to_billing(
        deps,
        pool,
        twilio=twilio,
        deepgram=deepgram,
        openai=openai,
        organization_id=tenant.organization_id,
        model_transfers=False,
    )
    call = twilio.calls[placed.call_sid]
    gate = call.answer_gate = asyncio.Event()  # Twilio acts on the request, then holds its answer
    await held_by_a_node(pool, tenant.organization_id)
    await model_answered(openai)
    try:
        async with aiohttp.ClientSession() as session:
            status, body = await Api(session, deps.public_url).call(
                "POST", f"/live-calls/{placed.call_log_id}/transfer", tenant.owner_key, json={"to": BILLING}
            )
    finally:
        gate.set()

    assert (status, body) == (202, {"callLogId": placed.call_log_id, "to": BILLING})
    log = await finished_log(pool, placed.call_log_id)
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "transferred"), log["metadata"]
    assert [dialed_number(update["Twiml"]) for update in call.updates] == [BILLING]


async def test_the_models_transfer_while_the_apis_is_under_way_waits_for_it_and_tells_no_failure(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio, deepgram: FakeDeepgram, openai: FakeOpenAI
) -> None:
    """The model asks for a transfer while one asked through the API waits for Twilio: it does not ask a second one
    (whose leg is taken, so refused), nor tell the caller a transfer failed; the caller goes where the API's takes
    them."""
    tenant = await make_tenant(pool, "Second", credits=1000)
    fakes = (twilio, deepgram, openai)
    # The callee asks for billing once the API's transfer waits for Twilio.
    placed, call, gate = await held_call(deps, pool, tenant, fakes, asks_after_ms=4000)
    async with aiohttp.ClientSession() as session:
        asked = asyncio.create_task(
            Api(session, deps.public_url).call(
                "POST", f"/live-calls/{placed.call_log_id}/transfer", tenant.owner_key, json={"to": BILLING}
            )
        )
        await asyncio.wait_for(call.updated.wait(), 60)
        await model_answered(openai)  # the callee asks for billing meanwhile; the model transfers
        await asyncio.sleep(4)  # the agent says "Transferring you now.", then asks for its transfer
        gate.set()
        status, _ = await asked

    assert status == 202
    await twilio.finished(placed.call_sid)
    log = await finished_log(pool, placed.call_log_id)
    assert (log["status"], log["metadata"]["endReason"], log["metadata"]["endDetail"]) == (
        "COMPLETED",
        "transferred",
        "transferred through the API",
    )
    said = await pool.fetch(
        """SELECT "text" FROM "CallTurn" WHERE "callLogId" = $1 AND "speaker" = 'agent' """, placed.call_log_id
    )
    assert not [row["text"] for row in said if row["text"].startswith("I'm sorry")]
    assert len(call.updates) == 1
