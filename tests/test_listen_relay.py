"""Listen-in across processes, with two command channels on a real database: a lease starts a call's audio on
the holding node, NOTIFYed chunks reach the listener's process in order with gaps heard as silence, the end
marker ends it, a lapsed lease stops the publishing, and a node that stops answering is reported lost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import asyncpg
import pytest

from engine.call import listen_relay
from engine.call.audio_tap import CALL_ENDED, NODE_LOST, SILENT_CHUNK, AudioTap, ListenerQueue, TapChunk
from engine.call.control_channel import Acknowledgement, ControlChannel
from engine.call.listen_relay import (
    LISTEN,
    LISTEN_AUDIO_CHANNEL,
    PUBLISH_BACKLOG,
    AudioPublisher,
    ListenRefused,
    ListenRelay,
    encode_chunk,
    encode_end,
)
from media.g711 import FRAME_BYTES, FRAME_MS
from tests.test_twilio_stream import FakeClock


class Node:
    """An engine process's command channel and relay; as a holder, it holds the calls in `taps`."""

    def __init__(self, db_url: str, pool: asyncpg.Pool, node_id: str) -> None:
        self.taps: dict[str, AudioTap] = {}

        async def listen(call_log_id: str, args: Mapping[str, Any]) -> Acknowledgement:
            tap = self.taps.get(call_log_id)
            if tap is None:
                return Acknowledgement(applied=False, detail=f"call {call_log_id} no longer runs here")
            self.relay.lease(call_log_id, tap, str(args["lease"]), float(args["seconds"]))
            return Acknowledgement(applied=True)

        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(db_url)

        self.channel = ControlChannel(connect, pool, node_id=node_id, handlers={LISTEN: listen})
        self.relay = ListenRelay(self.channel, control_timeout=1.0)


@pytest.fixture
async def nodes(db_url: str, pool: asyncpg.Pool) -> AsyncIterator[tuple[Node, Node]]:
    holder, listener = Node(db_url, pool, "node-holder"), Node(db_url, pool, "node-listener")
    await holder.channel.start()
    await listener.channel.start()
    try:
        yield holder, listener
    finally:
        for node in (holder, listener):
            await node.relay.close()
            await node.channel.stop()


async def chunks_of(queue: ListenerQueue, count: int) -> list[TapChunk]:
    """The next `count` chunks the queue gets."""
    got = []
    for _ in range(count):
        chunk = await asyncio.wait_for(queue.next(), timeout=5)
        assert chunk is not None, queue.ended
        got.append(chunk)
    return got


async def listening(nodes: tuple[Node, Node], call_log_id: str) -> tuple[AudioTap, ListenerQueue]:
    """A call held by the first node, and a listener on the second that holds a lease on its audio."""
    holder, listener = nodes
    tap = holder.taps[call_log_id] = AudioTap()
    queue = ListenerQueue(50)
    await listener.relay.listen("node-holder", call_log_id, queue)
    return tap, queue


def caller_frame(number: int) -> bytes:
    return bytes([number % 250 + 1]) * FRAME_BYTES


async def test_a_lease_brings_the_calls_chunks_to_the_other_process_until_the_end_marker(
    nodes: tuple[Node, Node],
) -> None:
    tap, queue = await listening(nodes, "call-a")
    assert tap.listening
    for number in range(20):  # 400 ms: three chunks out
        tap.write_caller(caller_frame(number), number * FRAME_MS)
    got = await chunks_of(queue, 3)
    assert [chunk.sequence for chunk in got] == [0, 1, 2]
    assert got[1].caller == b"".join(caller_frame(number) for number in range(5, 10))
    tap.close(CALL_ENDED)
    assert await asyncio.wait_for(queue.next(), timeout=5) is not None  # the fourth, flushed at the end
    assert await asyncio.wait_for(queue.next(), timeout=5) is None
    assert queue.ended == CALL_ENDED


async def test_the_last_listener_leaving_gives_the_lease_up_and_the_holder_stops_publishing(
    nodes: tuple[Node, Node],
) -> None:
    _, listener = nodes
    tap, queue = await listening(nodes, "call-q")
    listener.relay.leave("call-q", queue)
    number = 0
    while tap.listening and number < 500:  # the holder lets go at the first chunk after the lease is given up
        tap.write_caller(caller_frame(number), number * FRAME_MS)
        number += 1
        await asyncio.sleep(0.005)
    assert not tap.listening
    assert queue.ended is None  # it left; nobody told it anything


async def test_a_listener_joining_a_call_that_just_ended_hears_that_it_ended() -> None:
    tap, queue = AudioTap(), ListenerQueue(5)
    tap.close(CALL_ENDED)
    tap.add(queue)
    assert not tap.listening
    assert await queue.next() is None and queue.ended == CALL_ENDED


async def test_a_gap_in_the_numbering_is_heard_as_silence(nodes: tuple[Node, Node], pool: asyncpg.Pool) -> None:
    _, queue = await listening(nodes, "call-g")
    sound = bytes([0x42]) * len(SILENT_CHUNK)
    for sequence in (3, 6, 5):  # 4 and 5 lost; 5 arriving late is too late
        payload = encode_chunk("call-g", TapChunk(sequence, sound, sound))
        await pool.execute("SELECT pg_notify($1, $2)", LISTEN_AUDIO_CHANNEL, payload)
    await pool.execute("SELECT pg_notify($1, $2)", LISTEN_AUDIO_CHANNEL, encode_end("call-g", CALL_ENDED))
    got = await chunks_of(queue, 4)
    assert [(chunk.sequence, chunk.caller == sound) for chunk in got] == [(3, True), (4, False), (5, False), (6, True)]
    assert got[1] == TapChunk(4, SILENT_CHUNK, SILENT_CHUNK)
    assert await asyncio.wait_for(queue.next(), timeout=5) is None and queue.ended == CALL_ENDED


async def test_a_node_that_does_not_hold_the_call_refuses_the_lease(nodes: tuple[Node, Node]) -> None:
    _, listener = nodes
    with pytest.raises(ListenRefused, match="no longer runs"):
        await listener.relay.listen("node-holder", "call-x", ListenerQueue(5))


async def test_a_holding_node_that_stops_answering_is_reported_lost(
    nodes: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listen_relay, "RENEW_SECONDS", 0.1)
    _, queue = await listening(nodes, "call-l")
    await nodes[0].channel.stop()
    assert await asyncio.wait_for(queue.next(), timeout=10) is None
    assert queue.ended == NODE_LOST


# ------------------------------------------------------------------------------------ the publisher alone


def chunk(sequence: int) -> TapChunk:
    return TapChunk(sequence, SILENT_CHUNK, SILENT_CHUNK)


async def test_the_publisher_stops_once_every_lease_has_lapsed() -> None:
    clock, published = FakeClock(), list[str]()

    async def publish(payload: str) -> None:
        published.append(payload)

    publisher = AudioPublisher("call-p", publish, clock=clock)
    publisher.renew("lease-1", 10)
    publisher.renew("lease-2", 4)
    running = asyncio.create_task(publisher.run())
    assert publisher.hear(chunk(0))
    clock.now += 5  # lease-2 lapsed, lease-1 lives
    assert publisher.hear(chunk(1))
    clock.now += 6
    assert not publisher.hear(chunk(2))
    await asyncio.wait_for(running, timeout=5)
    assert publisher.over
    assert [json.loads(payload)["seq"] for payload in published] == [0, 1]


async def test_the_publisher_keeps_a_bounded_backlog_and_ends_with_the_marker() -> None:
    published: list[str] = []

    async def publish(payload: str) -> None:
        published.append(payload)

    publisher = AudioPublisher("call-b", publish)
    publisher.renew("lease", 10)
    for sequence in range(PUBLISH_BACKLOG + 5):  # the database is slow: nothing is published meanwhile
        publisher.hear(chunk(sequence))
    publisher.end(CALL_ENDED)
    await asyncio.wait_for(publisher.run(), timeout=5)
    messages = [json.loads(payload) for payload in published]
    assert [message["seq"] for message in messages[:-1]] == list(range(5, PUBLISH_BACKLOG + 5))
    assert messages[-1] == {"call": "call-b", "end": CALL_ENDED}
    assert all(len(payload.encode()) < 7000 for payload in published)
