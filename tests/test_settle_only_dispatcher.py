"""An engine with Twilio credentials but no public URL dials no campaign, yet settles its unconfirmed API calls.

`POST /v1/calls` places calls without `DIALTONE_PUBLIC_URL` (Twilio calls back at the request's URL), but campaigns
need it, so such an engine runs its dispatcher settling only: ended calls, expired leases and the placement lookup.
An API call whose create Twilio never answered is closed within seconds of its request, not after recovery's
ten-minute stream timeout. The only engine on this database is that one, so nothing else could have settled it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from tests.engine_server import running_engine
from tests.fakes.twilio import FakeTwilio
from tests.test_api_auth import Api
from tests.test_api_placement_lookup import CREDITS, calls_ended, credits, dialer, settled, unconfirmed_by_the_api
from tests.test_dispatch_do_not_call import twilio_settings
from tests.test_outbound_calls import call_log_row, callee


@pytest.fixture(scope="module")
async def engine(db_url: str, twilio: FakeTwilio) -> AsyncIterator[str]:
    """The engine with Twilio's credentials and no public URL, its dispatcher ticking every 0.2 s."""
    async with running_engine(db_url, dispatch_interval=0.2, call_slot_wait=0, **twilio_settings(twilio)) as url:
        yield url


@pytest.fixture
async def api(engine: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine)


async def test_an_api_call_twilio_never_made_is_closed_by_the_settling_dispatcher(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    caller = await dialer(pool, "NoPublicUrl")
    to = callee()
    held = twilio.hold_create(to)
    call_log_id = await unconfirmed_by_the_api(api, caller, to)
    held.release(create=False)
    await asyncio.wait_for(held.settled.wait(), 10)
    assert (await call_log_row(pool, call_log_id))["status"] == "IN_PROGRESS"

    log = await settled(pool, call_log_id)

    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "not_placed")
    assert await credits(pool, caller.organization_id) == CREDITS
    assert await calls_ended(pool, call_log_id) == 1
    assert twilio.creates[to] == 0
