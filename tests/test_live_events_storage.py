"""Live call events in PostgreSQL: ids become visible in increasing order whoever writes them, streams read only their
organization's, leases are read across organizations by the engine, and old events are pruned; a speculative
reply's path steps are recorded only once its turn is confirmed."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from engine.call.live_events import CallEvents, LiveEvents
from engine.call.path_trace import PathTrace
from pipelines.conversation.confirmation import hold_side_effects_until
from pipelines.paths.engine import PathEngine
from pipelines.paths.graph import read_path
from storage import call_logs, live_call_events
from storage.enums import CallType
from storage.errors import InvalidReference
from storage.live_call_events import NewEvent, Watch
from storage.tenancy import tenant_transaction
from tests.test_api_auth import make_tenant


async def new_call(pool: asyncpg.Pool, organization_id: str) -> str:
    log = await call_logs.create_call_log(
        pool, organization_id=organization_id, call_type=CallType.INBOUND, call_id=f"CA{secrets.token_hex(8)}"
    )
    return log.id


def said(organization_id: str, call_log_id: str, text: str) -> NewEvent:
    return NewEvent(organization_id, call_log_id, "caller.final", {"callLogId": call_log_id, "text": text})


async def test_a_batch_written_while_another_is_uncommitted_waits_for_it_so_ids_appear_in_order(
    pool: asyncpg.Pool,
) -> None:
    tenant = await make_tenant(pool, "Ordered")
    call_log_id = await new_call(pool, tenant.organization_id)
    async with pool.acquire() as first, first.transaction():
        earlier = await live_call_events.record_events(first, [said(tenant.organization_id, call_log_id, "one")])
        later = asyncio.create_task(
            live_call_events.record_events(pool, [said(tenant.organization_id, call_log_id, "two")])
        )
        done, _ = await asyncio.wait([later], timeout=0.3)
        assert not done  # held back until the first batch commits: no reader can see "two" before "one"
    assert await later > earlier
    async with tenant_transaction(pool, tenant.organization_id) as db:
        events = await live_call_events.events_after(
            db, organization_id=tenant.organization_id, call_log_id=None, after=0
        )
    assert [(event.id, event.data["text"]) for event in events] == [(earlier, "one"), (await later, "two")]


async def test_a_tenant_reads_only_its_own_events_even_by_another_organizations_call(pool: asyncpg.Pool) -> None:
    ours, theirs = await make_tenant(pool, "Reader"), await make_tenant(pool, "Writer")
    their_call = await new_call(pool, theirs.organization_id)
    await live_call_events.record_events(pool, [said(theirs.organization_id, their_call, "secret")])
    async with tenant_transaction(pool, ours.organization_id) as db:
        for organization_id in (ours.organization_id, theirs.organization_id):
            for call_log_id in (None, their_call):
                assert (
                    await live_call_events.events_after(
                        db, organization_id=organization_id, call_log_id=call_log_id, after=0
                    )
                    == []
                )
        assert await live_call_events.last_event_id(db, organization_id=theirs.organization_id, call_log_id=None) == 0


async def test_an_event_for_another_organizations_call_is_refused(pool: asyncpg.Pool) -> None:
    ours, theirs = await make_tenant(pool, "Forger"), await make_tenant(pool, "Victim")
    their_call = await new_call(pool, theirs.organization_id)
    with pytest.raises(InvalidReference, match='not present in table "CallLog"'):
        await live_call_events.record_events(pool, [said(ours.organization_id, their_call, "forged")])


async def test_leases_are_current_until_they_expire_and_closing_one_ends_it_sooner(pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Leases")
    call_log_id = await new_call(pool, tenant.organization_id)
    now = datetime.now(UTC)
    async with tenant_transaction(pool, tenant.organization_id) as db:
        whole = await live_call_events.open_watch(
            db, Watch(tenant.organization_id, None), node="n1", until=now + timedelta(seconds=30)
        )
        await live_call_events.open_watch(
            db, Watch(tenant.organization_id, call_log_id), node="n1", until=now + timedelta(seconds=5)
        )
        await live_call_events.expire_watch(
            db, organization_id=tenant.organization_id, watch_id=whole, until=now + timedelta(seconds=2)
        )
    mine = {
        w for w in await live_call_events.current_watches(pool, now=now) if w.organization_id == tenant.organization_id
    }
    assert mine == {Watch(tenant.organization_id, None), Watch(tenant.organization_id, call_log_id)}
    later = {
        w
        for w in await live_call_events.current_watches(pool, now=now + timedelta(seconds=3))
        if w.organization_id == tenant.organization_id
    }
    assert later == {Watch(tenant.organization_id, call_log_id)}


async def test_one_renewal_extends_a_process_s_leases_of_every_organization_and_no_other_process_s(
    pool: asyncpg.Pool,
) -> None:
    ours, theirs = await make_tenant(pool, "Renewed"), await make_tenant(pool, "AlsoRenewed")
    now = datetime.now(UTC).replace(microsecond=0)  # leases end at a millisecond
    soon, later = now + timedelta(seconds=5), now + timedelta(seconds=30)
    leases = {}
    for tenant in (ours, theirs):
        async with tenant_transaction(pool, tenant.organization_id) as db:
            for node in ("n1", "n2"):
                leases[tenant.organization_id, node] = await live_call_events.open_watch(
                    db, Watch(tenant.organization_id, None), node=node, until=soon
                )
    await live_call_events.renew_watches(pool, node="n1", watch_ids=list(leases.values()), until=later)
    ends = {
        key: await pool.fetchval('SELECT "expiresAt" FROM "LiveCallWatch" WHERE "id" = $1', watch_id)
        for key, watch_id in leases.items()
    }
    assert ends == {
        (ours.organization_id, "n1"): later,
        (theirs.organization_id, "n1"): later,
        (ours.organization_id, "n2"): soon,
        (theirs.organization_id, "n2"): soon,
    }


async def test_pruning_deletes_old_events_and_expired_leases(pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Pruned")
    call_log_id = await new_call(pool, tenant.organization_id)
    old = await live_call_events.record_events(pool, [said(tenant.organization_id, call_log_id, "old")])
    await pool.execute('UPDATE "LiveCallEvent" SET "createdAt" = now() - interval \'2 hours\' WHERE "id" = $1', old)
    recent = await live_call_events.record_events(pool, [said(tenant.organization_id, call_log_id, "recent")])
    await live_call_events.open_watch(
        pool, Watch(tenant.organization_id, None), node="n1", until=datetime.now(UTC) - timedelta(seconds=1)
    )
    assert await live_call_events.prune(pool, now=datetime.now(UTC), keep=timedelta(hours=1)) >= 1
    left = await pool.fetch('SELECT "id" FROM "LiveCallEvent" WHERE "callLogId" = $1', call_log_id)
    assert [row["id"] for row in left] == [recent]
    assert (
        await pool.fetchval('SELECT count(*) FROM "LiveCallWatch" WHERE "organizationId" = $1', tenant.organization_id)
        == 0
    )


SPECULATION_NODES = [
    {"id": "ask", "type": "speak", "data": {"isStart": True, "text": "Billing or sales?"}},
    {"id": "billing", "type": "speak", "data": {"text": "Billing it is."}},
    {"id": "sales", "type": "speak", "data": {"text": "Sales it is."}},
]
SPECULATION_EDGES = [
    {"id": "to-billing", "source": "ask", "target": "billing", "data": {"keywords": ["billing"]}},
    {"id": "to-sales", "source": "ask", "target": "sales", "data": {"keywords": ["sales"]}},
]


async def test_a_path_step_of_a_speculative_reply_is_told_once_confirmed_and_never_once_discarded(
    pool: asyncpg.Pool,
) -> None:
    tenant = await make_tenant(pool, "Speculating")
    call_log_id = await new_call(pool, tenant.organization_id)
    publisher = LiveEvents(pool, retention=timedelta(hours=1))
    publisher.announce(Watch(tenant.organization_id, call_log_id))  # a stream watches the call
    engine = PathEngine(read_path(SPECULATION_NODES, SPECULATION_EDGES))
    trace = PathTrace("path-1", engine, live=CallEvents(publisher, tenant.organization_id, call_log_id))

    await engine.begin()  # the opening: told at once

    async def speculative_reply(confirmed: asyncio.Event, way: str) -> None:
        hold_side_effects_until(confirmed)
        await engine.move(way)

    before = engine.checkpoint()
    await asyncio.create_task(speculative_reply(asyncio.Event(), "to-sales"))
    engine.rewind(before)  # the caller spoke on: the reply is thrown away, its step with it

    confirmed = asyncio.Event()
    await asyncio.create_task(speculative_reply(confirmed, "to-billing"))
    confirmed.set()
    trace.tell_steps()  # the turn is confirmed: the reply is the call's
    await publisher.stop()  # writes what is queued

    async with tenant_transaction(pool, tenant.organization_id) as db:
        events = await live_call_events.events_after(
            db, organization_id=tenant.organization_id, call_log_id=call_log_id, after=0
        )
    assert [(event.data["nodeId"], event.data["edgeId"]) for event in events if event.type == "path.node"] == [
        ("ask", None),
        ("billing", "to-billing"),
    ]


async def test_the_events_of_a_call_deleted_while_it_ran_cost_no_other_call_its_events(pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Deleted mid batch")
    kept, deleted = await new_call(pool, tenant.organization_id), await new_call(pool, tenant.organization_id)
    await pool.execute('DELETE FROM "CallLog" WHERE "id" = $1', deleted)  # as the platform's dashboard does
    batch = [said(tenant.organization_id, deleted, "gone"), said(tenant.organization_id, kept, "kept")]
    assert await live_call_events.record_events(pool, batch) > 0
    async with tenant_transaction(pool, tenant.organization_id) as db:
        events = await live_call_events.events_after(
            db, organization_id=tenant.organization_id, call_log_id=None, after=0
        )
    assert [(event.call_log_id, event.data["text"]) for event in events] == [(kept, "kept")]


async def test_a_calls_end_is_recorded_once_whoever_tells_it_first(pool: asyncpg.Pool) -> None:
    # Recovery told the end of a node's call as it closed it lost; the node, cut off from the database meanwhile,
    # writes its own end (and what came before it) when the database returns.
    tenant = await make_tenant(pool, "Ended twice")
    call_log_id = await new_call(pool, tenant.organization_id)
    ended = NewEvent(tenant.organization_id, call_log_id, "call.ended", {"status": "FAILED"})
    await live_call_events.record_events(pool, [ended])
    await live_call_events.record_events(pool, [said(tenant.organization_id, call_log_id, "goodbye"), ended])
    async with tenant_transaction(pool, tenant.organization_id) as db:
        events = await live_call_events.events_after(
            db, organization_id=tenant.organization_id, call_log_id=call_log_id, after=0
        )
    assert [event.type for event in events] == ["call.ended", "caller.final"]
