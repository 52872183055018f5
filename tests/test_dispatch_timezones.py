"""Whose clock a campaign's window is read on, through the real dispatcher and dialer on the fake Twilio: a number whose
region spans several timezones, in a campaign whose timezone is not one of them, is called only while the window is
open in all of them (a New York campaign never rings an Australian mobile at night)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from engine.campaigns.dispatcher import CallingHours, CampaignDispatcher, DispatchTiming, PlaceCallDialer
from engine.campaigns.recipients_csv import make_recipient
from engine.campaigns.windows import CallingWindow, recipient_timezone
from engine.twilio.outbound_calls import OutboundDeps
from storage import campaigns, dial_policies, phone_numbers
from storage.campaign_dispatch import QueuedRecipient
from storage.campaigns import DialingRules
from tests.fakes.twilio import Busy, FakeTwilio
from tests.test_dial_policy import country_of
from tests.test_dispatch_do_not_call import deps, engine, new_organization  # noqa: F401 (fixtures)
from tests.test_outbound_calls import make_agent

AUSTRALIAN_MOBILE = "+61491570156"  # any of Australia's zones, Perth (UTC+8) to Lord Howe (UTC+11 in December)


class Clock:
    """A clock the test sets."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(autouse=True)
async def only_this_tests_campaigns(pool: asyncpg.Pool) -> None:
    """The test's dispatcher runs on its own clock: earlier tests' campaigns are stopped, not dialed by it."""
    await pool.execute("""UPDATE "Campaign" SET "status" = 'STOPPED' WHERE "status" IN ('PLANNED', 'CONTINUING')""")


async def new_york_campaign(pool: asyncpg.Pool, number: str) -> campaigns.Campaign:
    """A started campaign calling `number` 09:00-17:00 in New York's time, the recipient imported as the API does, by
    an organization with a New York number that dials `number`'s country too."""
    organization_id = await new_organization(pool)
    await phone_numbers.create_phone_number(pool, organization_id=organization_id, phone_number="+12125550420")
    policy = await dial_policies.set_policy(
        pool,
        organization_id=organization_id,
        allowed_kinds=(),
        allowed_countries=["US", country_of(number)],
        international_networks=False,
    )
    campaign = await campaigns.create_campaign(
        pool,
        organization_id=organization_id,
        batch_name="Renewals",
        agent_id=await make_agent(pool, organization_id),
        call_start_time="09:00",
        call_end_time="17:00",
        rules=DialingRules(timezone="America/New_York"),
    )
    recipient = make_recipient(
        "line 2", number, name=None, notes=None, variables={}, policy=policy, default_region=None
    )
    await campaigns.import_recipients(
        pool, organization_id=organization_id, campaign_id=campaign.id, recipients=[recipient]
    )
    return await campaigns.start_campaign(pool, organization_id=organization_id, campaign_id=campaign.id)


async def ticks(dispatcher: CampaignDispatcher) -> None:
    for _ in range(3):
        await dispatcher.tick()
        await dispatcher.drain()


async def test_a_mobile_of_a_country_of_several_timezones_is_called_only_while_the_window_is_open_in_all(
    pool: asyncpg.Pool,
    twilio: FakeTwilio,
    deps: OutboundDeps,  # noqa: F811
) -> None:
    twilio.behave(AUSTRALIAN_MOBILE, Busy())
    campaign = await new_york_campaign(pool, AUSTRALIAN_MOBILE)
    # Monday 10:00 in New York is Tuesday 02:00 in Sydney, 23:00 Monday in Perth.
    clock = Clock(datetime(2026, 12, 7, 15, 0, tzinfo=UTC))
    dispatcher = CampaignDispatcher(
        pool, PlaceCallDialer(deps), timing=DispatchTiming(interval=timedelta(seconds=1)), clock=clock
    )
    await ticks(dispatcher)
    assert twilio.creates[AUSTRALIAN_MOBILE] == 0
    waiting = await pool.fetchrow(
        'SELECT "state", "nextAttemptAt" FROM "CampaignRecipientDispatch" WHERE "campaignId" = $1', campaign.id
    )
    assert waiting is not None
    # The first stretch of 09:00-17:00 in every zone at once: 09:00 on the Cocos Islands (UTC+6:30), which the
    # number may be in too, to 17:00 in Sydney and on Lord Howe (UTC+11).
    assert (waiting["state"], waiting["nextAttemptAt"]) == ("QUEUED", datetime(2026, 12, 8, 2, 30, tzinfo=UTC))

    clock.now = datetime(2026, 12, 8, 3, 0, tzinfo=UTC)  # 14:00 in Sydney, 11:00 in Perth; 22:00 in New York
    await ticks(dispatcher)
    assert twilio.creates[AUSTRALIAN_MOBILE] == 1


def queued(number: str) -> QueuedRecipient:
    return QueuedRecipient(
        id="r", phone_number=number, name=None, timezone=recipient_timezone(number), variables={}, attempts=0
    )


OFFICE_HOURS = CallingWindow.from_strings("09:00", "17:00")
MONDAY_NOON_UTC = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_a_number_of_several_timezones_including_the_campaigns_is_called_on_the_campaigns() -> None:
    toll_free = queued("+18005550100")  # anywhere in North America (and Guam): New York is one of its zones
    hours = CallingHours(OFFICE_HOURS, "America/New_York")
    assert hours.period(toll_free, MONDAY_NOON_UTC) == (
        datetime(2026, 12, 7, 14, 0, tzinfo=UTC),
        datetime(2026, 12, 7, 22, 0, tzinfo=UTC),
    )


def test_zones_no_hour_of_the_window_is_common_to_fall_back_to_the_campaigns() -> None:
    russian_mobile = queued("+79161234567")  # Kaliningrad (UTC+2) to Kamchatka (UTC+12): 8 hours never overlap
    hours = CallingHours(OFFICE_HOURS, "Europe/Berlin")
    assert hours.period(russian_mobile, MONDAY_NOON_UTC) == (
        datetime(2026, 12, 7, 8, 0, tzinfo=UTC),
        datetime(2026, 12, 7, 16, 0, tzinfo=UTC),
    )
