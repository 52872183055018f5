"""The caller's socket read a few frames at a time: its receive low-water mark as the call's needs change.

Real loopback TCP sockets; the kernel's own SO_RCVLOWAT is read back. Linux only, as the pacing is.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from aiohttp import ClientSession, web

from engine.call import caller_reads
from engine.call.caller_reads import BATCH_FRAMES, RELAXED_LOW_WATER, SUPPORTED, CallerReads
from engine.call.frame_socket import FrameSocket
from tests.fakes.server import serve
from tests.test_realtime_session import until

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="SO_RCVLOWAT pacing is Linux only")


@pytest.fixture
def connected() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A loopback TCP connection: (the engine's end, the caller's end)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        caller = socket.create_connection(server.getsockname())
        engine, _ = server.accept()
    with engine, caller:
        yield engine, caller


def low_water(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


class Progress:
    """Twilio's sequence number as the call has seen it."""

    def __init__(self) -> None:
        self.number = 0

    def __call__(self) -> int:
        return self.number


async def test_the_socket_wakes_the_engine_for_a_batch_of_frames_unless_it_listens_closely(
    connected: tuple[socket.socket, socket.socket],
) -> None:
    engine, _ = connected
    reads = CallerReads(engine, Progress(), loop=asyncio.get_running_loop())
    assert low_water(engine) == 1 and not reads.relaxed

    reads.listen(closely=False)
    assert low_water(engine) == RELAXED_LOW_WATER and reads.relaxed
    reads.listen(closely=True)
    assert low_water(engine) == 1 and not reads.relaxed

    reads.listen(closely=False)
    reads.close()  # the call is over: its close handshake is read as it comes
    assert low_water(engine) == 1
    reads.listen(closely=False)
    assert low_water(engine) == 1 and not reads.relaxed


def test_the_low_water_mark_is_one_frame_short_of_a_batch() -> None:
    frame = (
        '{"event":"media","sequenceNumber":"%d","media":{"track":"inbound","chunk":"%d","timestamp":"%d",'
        '"payload":"%s"},"streamSid":"MZ%s"}'
    )
    for number in (3, 123_456, 9_999_999):  # a call's first frames, an hour in, two days in
        text = frame % (number, number - 1, number * 20, "/" * 216, "0" * 32)
        wire = len(text) + 8  # a masked client frame of this size: 2 + 2 length bytes + 4 mask bytes
        assert (BATCH_FRAMES - 1) * wire < RELAXED_LOW_WATER < BATCH_FRAMES * wire


async def test_a_socket_that_stops_sending_mid_batch_is_read_frame_by_frame_again(
    connected: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(caller_reads, "STALL_HOLD_SECONDS", 0.3)
    engine, _ = connected
    progress = Progress()
    reads = CallerReads(engine, progress, loop=asyncio.get_running_loop())
    reads.listen(closely=False)

    for _ in range(20):  # frames keep coming: the sweeps leave it relaxed
        await asyncio.sleep(0.02)
        progress.number += 1
        assert reads.relaxed
    # Nothing read since the last sweep: one byte until the hold is over, then a batch at a time again.
    await until(lambda: not reads.relaxed)
    assert low_water(engine) == 1
    await until(lambda: reads.relaxed)
    assert low_water(engine) == RELAXED_LOW_WATER
    reads.close()


async def test_a_socket_whose_options_cannot_be_set_is_read_frame_by_frame() -> None:
    broken = socket.socket()
    broken.close()
    reads = CallerReads(broken, Progress(), loop=asyncio.get_running_loop())
    reads.listen(closely=False)  # logged, not raised
    assert not reads.relaxed
    reads.listen(closely=True)
    reads.listen(closely=False)
    assert not reads.relaxed


async def test_a_last_frame_below_the_batch_still_reaches_the_call() -> None:
    """A peer that sends one frame and waits: the sweep lowers the mark, and the frame is read."""
    handed: asyncio.Queue[str] = asyncio.Queue()
    relaxed: list[bool] = []

    async def media(request: web.Request) -> web.StreamResponse:
        ws = FrameSocket()
        await ws.prepare(request)
        assert request.transport is not None
        progress = Progress()

        def on_text(texts: list[str]) -> None:
            for text in texts:
                progress.number += 1
                handed.put_nowait(text)

        assert ws.hand_to(on_text)
        reads = CallerReads(request.transport.get_extra_info("socket"), progress, loop=asyncio.get_running_loop())
        reads.listen(closely=False)
        relaxed.append(reads.relaxed)
        async for _ in ws:
            pass
        reads.close()
        return ws

    app = web.Application()
    app.router.add_get("/media", media)
    async with serve(app) as url, ClientSession() as http, http.ws_connect(f"{url}/media") as ws:
        await until(lambda: relaxed == [True])
        await ws.send_str('{"event":"mark","sequenceNumber":"9","mark":{"name":"1:500"}}')
        assert await asyncio.wait_for(handed.get(), timeout=5) == (
            '{"event":"mark","sequenceNumber":"9","mark":{"name":"1:500"}}'
        )
