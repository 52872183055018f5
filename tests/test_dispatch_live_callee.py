"""A number the organization is already on the phone with is not dialed again by another campaign: through the real
dispatcher and dialer, the engine's webhooks and media on loopback, the fake Twilio answering. The recipient waits,
its attempt not counted, and is called once that call has ended."""

from __future__ import annotations

import asyncpg

from engine.simulator import HangUp, Pause
from engine.twilio.outbound_calls import OutboundDeps
from tests.fakes.twilio import Answer, FakeTwilio
from tests.test_dispatch_do_not_call import (  # noqa: F401 (fixtures)
    deps,
    dispatcher_for,
    engine,
    new_organization,
    run_to_completion,
    started_campaign,
)


async def recipient(pool: asyncpg.Pool, campaign_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        'SELECT "state", "attempts", "lastReason" FROM "CampaignRecipientDispatch" WHERE "campaignId" = $1',
        campaign_id,
    )
    assert row is not None
    return row


async def test_two_campaigns_calling_one_number_call_it_one_after_the_other(
    pool: asyncpg.Pool,
    twilio: FakeTwilio,
    deps: OutboundDeps,  # noqa: F811
) -> None:
    number = "+12125550431"
    twilio.behave(number, Answer(greeting=None, script=[Pause(1500), HangUp()]))
    org = await new_organization(pool)
    first = await started_campaign(pool, org, [number])
    second = await started_campaign(pool, org, [number])
    dispatcher = dispatcher_for(pool, deps)

    claims = await dispatcher.tick()  # one tick claims for both campaigns
    await dispatcher.drain()
    assert sorted(claim.campaign_id for claim in claims) == sorted([first.id, second.id])
    assert twilio.creates[number] == 1
    states = {campaign.id: await recipient(pool, campaign.id) for campaign in (first, second)}
    [(waiting_id, waiting)] = [(cid, row) for cid, row in states.items() if row["state"] == "QUEUED"]
    assert waiting["attempts"] == 0
    assert waiting["lastReason"] == f"{number} is already in a call with this organization; called once it ends"

    dispatcher.start()
    try:
        for campaign in (first, second):
            await run_to_completion(pool, campaign.id)
    finally:
        await dispatcher.close()
    assert twilio.creates[number] == 2
    assert [(await recipient(pool, c.id))["state"] for c in (first, second)] == ["DONE", "DONE"]
    assert (await recipient(pool, waiting_id))["attempts"] == 1
    # Given back once, at the dial; never claimed again while the first call lasted.
    attempts = await pool.fetch(
        'SELECT "state" FROM "CampaignAttempt" WHERE "campaignId" = $1 ORDER BY "startedAt"', waiting_id
    )
    assert [a["state"] for a in attempts] == ["ABANDONED", "ENDED"]
