"""The credit meter on its own: a database that cannot be asked lets a call go on for a bounded number of minutes,
then has it say goodbye; one failure among paid minutes does not (each figure in tiny minutes of 20 ms)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import asyncpg

from engine.call.credit_meter import CreditMeter
from storage import credit_reservations
from storage.call_logs import CallLog
from storage.end_reasons import EndReason
from storage.pool import create_pool
from tests.databases import database_name
from tests.test_call_log_writer import OnOffProxy
from tests.test_credit_reservations import new_organization, open_paid_call

MINUTE = 0.02
SLOW_MINUTE = 0.4
"""A tiny minute long enough for a round trip to the test database."""


async def hung_up(reason: EndReason) -> None:
    """A call's hang-up, which these tests do not follow."""


async def metered(answers: list[bool | Exception], *, unpaid_minutes: int = 2) -> tuple[list[EndReason], int]:
    """Run a meter whose extensions answer `answers` in turn (then True); return its goodbyes and extensions asked."""
    goodbyes: list[EndReason] = []
    asked = 0

    async def extend() -> bool:
        nonlocal asked
        answer = answers[asked] if asked < len(answers) else True
        asked += 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    meter = CreditMeter(
        "CA1",
        extend,
        say_goodbye=goodbyes.append,
        hang_up=hung_up,
        minute_seconds=MINUTE,
        unpaid_minutes=unpaid_minutes,
    )
    task = asyncio.create_task(meter.run())
    for _ in range(200):
        if task.done() or asked >= len(answers) + 2:
            break
        await asyncio.sleep(MINUTE / 2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return goodbyes, asked


def meter_of(
    db: asyncpg.Pool,
    call: CallLog,
    *,
    say_goodbye: Callable[[EndReason], None],
    hang_up: Callable[[EndReason], Awaitable[None]],
) -> CreditMeter:
    """A meter of `call` in slow tiny minutes, its reservation extended in the database through `db`."""
    return CreditMeter(
        call.call_id,
        functools.partial(credit_reservations.extend_reservation, db, call_log_id=call.id),
        say_goodbye=say_goodbye,
        hang_up=hang_up,
        minute_seconds=SLOW_MINUTE,
    )


async def test_a_database_that_cannot_be_asked_ends_the_call_after_the_unpaid_minutes() -> None:
    down = ConnectionRefusedError("database unreachable")
    goodbyes, asked = await metered([down, down, down, down])

    assert goodbyes == [EndReason.INTERNAL_ERROR]
    assert asked == 3  # two unpaid minutes went on, the third failure ended it


async def test_a_failure_between_paid_minutes_does_not_end_the_call() -> None:
    down = ConnectionRefusedError("database unreachable")
    goodbyes, asked = await metered([down, down, True, down, down, True])

    assert goodbyes == []
    assert asked >= 6


async def test_credits_used_up_end_the_call_as_insufficient_credits() -> None:
    goodbyes, asked = await metered([True, False])

    assert goodbyes == [EndReason.INSUFFICIENT_CREDITS]
    assert asked == 2


async def test_a_database_that_stops_answering_ends_the_call_after_the_unpaid_minutes(
    pool: asyncpg.Pool, postgres_server_url: str, db_url: str
) -> None:
    org = await new_organization(pool, credits=100)
    call = await open_paid_call(pool, org)
    proxy = OnOffProxy(postgres_server_url)
    await proxy.up()
    stalled = await create_pool(proxy.url(database_name(db_url)), min_size=1, max_size=2, timeout=2)
    goodbyes: list[EndReason] = []
    meter = meter_of(stalled, call, say_goodbye=goodbyes.append, hang_up=hung_up)
    proxy.stall()  # a partition: the meter's queries get no answer, and no error either
    task = asyncio.create_task(meter.run())
    try:
        await asyncio.wait({task}, timeout=20 * SLOW_MINUTE)  # it says goodbye after about 3, or never
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stalled.terminate()
        await proxy.down()

    assert goodbyes == [EndReason.INTERNAL_ERROR]


async def test_a_call_whose_call_log_is_deleted_is_hung_up_at_its_next_extension_without_a_goodbye(
    pool: asyncpg.Pool,
) -> None:
    org = await new_organization(pool, credits=100)
    call = await open_paid_call(pool, org)
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', call.id)  # its reservation goes with it
    goodbyes: list[EndReason] = []
    hang_ups: list[EndReason] = []

    async def hang_up(reason: EndReason) -> None:
        hang_ups.append(reason)

    meter = meter_of(pool, call, say_goodbye=goodbyes.append, hang_up=hang_up)
    await asyncio.wait_for(meter.run(), 20 * SLOW_MINUTE)

    assert (goodbyes, hang_ups) == ([], [EndReason.CALL_DELETED])


async def test_a_call_out_of_credits_is_hung_up_before_its_paid_time_is_over() -> None:
    # Minutes of 4 s: the second one is paid, the third is refused at 6 s. Hanging up through Twilio takes a moment,
    # and a call that ends a moment into its third minute would be charged that minute: the hang-up starts before
    # the paid time is over (half a second before, in minutes this short; 2 s in real ones).
    loop = asyncio.get_running_loop()
    answers = iter([True, False])
    hung_up_at: list[float] = []

    async def extend() -> bool:
        return next(answers)

    async def hang_up(reason: EndReason) -> None:
        hung_up_at.append(loop.time())

    meter = CreditMeter("CA1", extend, say_goodbye=lambda reason: None, hang_up=hang_up, minute_seconds=4.0)
    started = loop.time()
    await asyncio.wait_for(meter.run(), 20)
    assert hung_up_at and hung_up_at[0] - started < 8.0
