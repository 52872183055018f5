"""A campaign end to end in one process: the dispatcher's real dialer (place_call), the engine's webhooks and
media session on loopback, and the fake Twilio answering, ringing busy and refusing.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from config.agent import parse_agent_configuration
from config.settings import load_settings
from engine.campaigns.dispatcher import CampaignDispatcher, DispatchTiming, PlaceCallDialer
from engine.campaigns.recipients_csv import read_recipients
from engine.simulator import Pause, Say
from engine.twilio.outbound_calls import OutboundDeps
from engine.twilio.rest import TwilioCalls
from storage import agents, campaigns, conversation_paths, dial_policies, organizations, phone_numbers
from storage.campaigns import STOPPED_REASON, CampaignRetryPolicy, DialingRules, NewRecipient
from storage.demo import DEMO_PATH_EDGES, DEMO_PATH_NODES
from storage.enums import CallerType, CampaignStatus
from storage.events import create_event
from tests.engine_server import running_engine
from tests.fakes.twilio import Answer, Busy, FakeTwilio, NoAnswer, Refuse

OFFLINE = {"stt": {"provider": "sphinx"}, "llm": {"provider": "conversation_path"}, "tts": {"provider": "espeak"}}
ANSWERS, BUSY, REFUSED = "+12125550171", "+12125550172", "+12125550173"


@pytest.fixture(scope="module")
async def deps(db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio) -> AsyncIterator[OutboundDeps]:
    """The engine serving webhooks and media (its own dispatcher off), and what the test's dispatcher dials with."""
    credentials: dict[str, Any] = {
        "twilio_auth_token": twilio.auth_token,
        "twilio_account_sid": twilio.account_sid,
        "twilio_api_base": twilio.api_base,
    }
    async with running_engine(db_url, dispatch_enabled=False, **credentials) as engine:
        client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
        try:
            settings = load_settings(database_url=db_url, **credentials)
            yield OutboundDeps(pool=pool, settings=settings, twilio=client, public_url=engine)
        finally:
            await client.close()


async def calling_organization(pool: asyncpg.Pool, slug: str, caller_id: str) -> tuple[str, str]:
    """An organization with the US number `caller_id` and an offline OUTBOUND agent: (its id, the agent's id)."""
    org = (await organizations.create_organization(pool, name=slug.title(), slug=slug, credits=500)).id
    await phone_numbers.create_phone_number(pool, organization_id=org, phone_number=caller_id)
    agent = await agents.create_agent(
        pool,
        organization_id=org,
        name="Caller",
        caller_type=CallerType.OUTBOUND,
        configuration=parse_agent_configuration(OFFLINE).to_json(),
    )
    return org, agent.id


async def booking_campaign(pool: asyncpg.Pool) -> campaigns.Campaign:
    org, agent_id = await calling_organization(pool, "clinic", "+12125550170")
    path = await conversation_paths.create_conversation_path(
        pool, organization_id=org, name="booking", nodes=DEMO_PATH_NODES, edges=DEMO_PATH_EDGES
    )
    await agents.link_conversation_path(pool, organization_id=org, agent_id=agent_id, conversation_path_id=path.id)
    campaign = await campaigns.create_campaign(
        pool,
        organization_id=org,
        batch_name="Checkups",
        agent_id=agent_id,
        rules=DialingRules(max_concurrent_calls=3, calls_per_second=5),
    )
    csv = f"name,phone,doctor\nAnn,{ANSWERS},Dr Who\nBob,{BUSY},\nCy,{REFUSED},\n"
    await campaigns.import_recipients(
        pool,
        organization_id=org,
        campaign_id=campaign.id,
        recipients=[
            row.recipient
            for row in read_recipients(
                io.StringIO(csv), policy=await dial_policies.get_policy(pool, organization_id=org)
            )
        ],
    )
    return await campaigns.start_campaign(pool, organization_id=org, campaign_id=campaign.id)


async def test_a_campaign_places_real_calls_and_completes_from_their_outcomes(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    twilio.behave(ANSWERS, Answer(greeting="Hello?", script=[Say("I would like to book an appointment")]))
    twilio.behave(BUSY, Busy())
    twilio.behave(REFUSED, Refuse())
    campaign = await booking_campaign(pool)
    dispatcher = CampaignDispatcher(pool, PlaceCallDialer(deps), timing=DispatchTiming(interval=timedelta(seconds=0.2)))
    dispatcher.start()
    try:
        for _ in range(600):
            status = await pool.fetchval('SELECT "status" FROM "Campaign" WHERE "id" = $1', campaign.id)
            if status == CampaignStatus.COMPLETED:
                break
            await asyncio.sleep(0.1)
    finally:
        await dispatcher.close()
    assert status == CampaignStatus.COMPLETED

    rows = await pool.fetch(
        """
        SELECT r."phoneNumber", d."state", d."lastOutcome", l."status" AS "callStatus", l."metadata"
        FROM "CampaignRecipient" r
        JOIN "CampaignRecipientDispatch" d ON d."recipientId" = r."id"
        JOIN "CampaignAttempt" a ON a."recipientId" = r."id"
        LEFT JOIN "CallLog" l ON l."id" = a."callLogId"
        WHERE r."campaignId" = $1
        """,
        campaign.id,
    )
    by_number = {row["phoneNumber"]: row for row in rows}
    assert (by_number[ANSWERS]["state"], by_number[ANSWERS]["callStatus"]) == ("DONE", "COMPLETED")
    assert by_number[ANSWERS]["metadata"]["variables"] == {"name": "Ann", "doctor": "Dr Who"}
    assert (by_number[BUSY]["state"], by_number[BUSY]["lastOutcome"]) == ("FAILED", "busy")
    assert (by_number[REFUSED]["state"], by_number[REFUSED]["callStatus"]) == ("FAILED", "FAILED")
    assert {number: twilio.creates[number] for number in (ANSWERS, BUSY, REFUSED)} == {
        ANSWERS: 1,
        BUSY: 1,
        REFUSED: 1,
    }
    done = await campaigns.get_campaign(pool, organization_id=campaign.organization_id, campaign_id=campaign.id)
    assert (done.completed_calls, done.total_calls, done.progress) == (3, 3, 100)


async def retrying_campaign(
    pool: asyncpg.Pool, slug: str, caller_id: str, number: str, retry_on: str
) -> campaigns.Campaign:
    """A started campaign calling `number` up to 3 times, again at once after a `retry_on` outcome; its organization
    subscribed to recipient.failed."""
    org, agent_id = await calling_organization(pool, slug, caller_id)
    await create_event(pool, organization_id=org, name="recipient.failed", webhook_url="https://hooks.example.com/x")
    retry = CampaignRetryPolicy(max_attempts=3, retry_on=frozenset({retry_on}), delays_seconds=(0,))
    campaign = await campaigns.create_campaign(
        pool, organization_id=org, batch_name=f"{slug} calls", agent_id=agent_id, rules=DialingRules(retry=retry)
    )
    await campaigns.import_recipients(
        pool, organization_id=org, campaign_id=campaign.id, recipients=[NewRecipient(phone_number=number)]
    )
    return await campaigns.start_campaign(pool, organization_id=org, campaign_id=campaign.id)


async def the_recipient(pool: asyncpg.Pool, campaign_id: str) -> dict[str, Any]:
    """Where the campaign's one recipient stands: its state, attempts, last outcome and last reason."""
    row = await pool.fetchrow(
        'SELECT "state", "attempts", "lastOutcome", "lastReason" FROM "CampaignRecipientDispatch" '
        'WHERE "campaignId" = $1',
        campaign_id,
    )
    assert row is not None
    return dict(row)


RINGING = "+12125550174"


async def test_a_call_ringing_when_its_campaign_is_stopped_cancels_its_recipient_when_nobody_answers(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    # No-answer is retried, but the stop ends the campaign's calls: the recipient is CANCELED, like those the stop
    # found waiting, not FAILED (nor counted, nor announced as recipient.failed).
    campaign = await retrying_campaign(pool, "stopped-clinic", "+12125550179", RINGING, "no-answer")
    org = campaign.organization_id
    answered = asyncio.Event()  # never: it rings until the test lets it end unanswered
    twilio.behave(RINGING, NoAnswer(until=answered))
    dispatcher = CampaignDispatcher(pool, PlaceCallDialer(deps), timing=DispatchTiming(interval=timedelta(seconds=0.2)))
    dispatcher.start()
    try:
        assert await recipient_state_becomes(pool, campaign.id, "IN_CALL")
        await campaigns.stop_campaign(pool, organization_id=org, campaign_id=campaign.id)
        answered.set()
        assert await recipient_state_becomes(pool, campaign.id, "CANCELED")
    finally:
        await dispatcher.close()

    assert await the_recipient(pool, campaign.id) == {
        "state": "CANCELED",
        "attempts": 1,
        "lastOutcome": "no-answer",
        "lastReason": STOPPED_REASON,
    }
    assert twilio.creates[RINGING] == 1
    stopped = await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)
    assert (stopped.status, stopped.completed_calls) == (CampaignStatus.STOPPED, 0)
    failed = await pool.fetchval(
        """SELECT count(*) FROM "WebhookDelivery" WHERE "organizationId" = $1 AND "event" = 'recipient.failed'""", org
    )
    assert failed == 0


async def recipient_state_becomes(pool: asyncpg.Pool, campaign_id: str, state: str) -> bool:
    """Whether the campaign's one recipient reaches `state` within a minute."""
    for _ in range(600):
        now = await pool.fetchval(
            'SELECT "state" FROM "CampaignRecipientDispatch" WHERE "campaignId" = $1', campaign_id
        )
        if now == state:
            return True
        await asyncio.sleep(0.1)
    return False


async def failed_for_its_deleted_call(
    pool: asyncpg.Pool, twilio: FakeTwilio, campaign: campaigns.Campaign, number: str
) -> None:
    """The campaign's one recipient, `number`, was dialed once and ended FAILED for its deleted call, counted; the
    campaign completed."""
    assert await the_recipient(pool, campaign.id) == {
        "state": "FAILED",
        "attempts": 1,
        "lastOutcome": "failed",
        "lastReason": "call_deleted",
    }
    assert twilio.creates[number] == 1
    for placed in twilio.calls_to(number):
        await twilio.finished(placed.sid)  # hung up by the engine, or its stream closed: it ends
    done = await campaigns.get_campaign(pool, organization_id=campaign.organization_id, campaign_id=campaign.id)
    assert (done.status, done.completed_calls, done.progress) == (CampaignStatus.COMPLETED, 1, 100)


DELETED = "+12125550175"


async def test_a_call_deleted_while_it_runs_fails_its_recipient_without_a_retry_and_the_campaign_completes(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    # The dashboard deletes CallLog rows in SQL, also of running calls: the attempt's CallLog is gone (its link set to
    # NULL). The recipient ends FAILED for call_deleted though its policy retries failures: the organization deleted
    # that call, and nothing tells whether it reached them.
    campaign = await retrying_campaign(pool, "deleting-clinic", "+12125550178", DELETED, "failed")
    org = campaign.organization_id
    twilio.behave(DELETED, Answer(greeting="Hello?", script=[Say("Who is this?"), Pause(60_000)]))
    dispatcher = CampaignDispatcher(pool, PlaceCallDialer(deps), timing=DispatchTiming(interval=timedelta(seconds=0.2)))
    dispatcher.start()
    try:
        assert await recipient_state_becomes(pool, campaign.id, "IN_CALL")
        call_log_id = None
        for _ in range(600):  # the call is answered and its media session runs
            call_log_id = await pool.fetchval(
                """SELECT l."id" FROM "CallLog" l JOIN "CampaignAttempt" a ON a."callLogId" = l."id"
                   WHERE a."campaignId" = $1 AND l."metadata" ? 'engineNode'""",
                campaign.id,
            )
            if call_log_id is not None:
                break
            await asyncio.sleep(0.1)
        assert call_log_id is not None
        await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call_log_id)
        assert await recipient_state_becomes(pool, campaign.id, "FAILED")
    finally:
        await dispatcher.close()

    await failed_for_its_deleted_call(pool, twilio, campaign, DELETED)
    failed = await pool.fetch(
        """SELECT "payload" FROM "WebhookDelivery" WHERE "organizationId" = $1 AND "event" = 'recipient.failed'""", org
    )
    assert [row["payload"]["data"]["reason"] for row in failed] == ["call_deleted"]


DELETED_WHILE_DIALED = "+12125550176"


async def test_a_call_deleted_while_twilio_is_asked_for_it_fails_its_recipient_without_a_retry(
    deps: OutboundDeps, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    # The dialer writes the CallLog before it asks Twilio for the call: deleted in between, the call is placed all
    # the same, and its recipient ends as one whose call was deleted while it ran.
    campaign = await retrying_campaign(pool, "dialing-clinic", "+12125550177", DELETED_WHILE_DIALED, "failed")
    twilio.behave(DELETED_WHILE_DIALED, Answer(greeting="Hello?", script=[Say("Who is this?"), Pause(20_000)]))
    held = twilio.hold_create(DELETED_WHILE_DIALED)
    dispatcher = CampaignDispatcher(pool, PlaceCallDialer(deps), timing=DispatchTiming(interval=timedelta(seconds=0.2)))
    dispatcher.start()
    try:
        await asyncio.wait_for(held.arrived.wait(), 60)
        await pool.execute('DELETE FROM "CallLog" WHERE "campaignId" = $1', campaign.id)
        held.release(create=True)
        assert await recipient_state_becomes(pool, campaign.id, "FAILED")
    finally:
        await dispatcher.close()

    await failed_for_its_deleted_call(pool, twilio, campaign, DELETED_WHILE_DIALED)
