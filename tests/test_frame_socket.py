"""FrameSocket hands text frames to a callback as aiohttp parses them, in order, over a real loopback WebSocket."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from yarl import URL

from engine.call.frame_socket import FrameHandlerFailed, FrameSocket, TextFrames
from media.twilio_stream import MalformedMessage
from tests.fakes.server import serve


@dataclass
class Server:
    """What the server side saw: frames handed over, frames read from the iterator, how the iterator ended."""

    handed: list[str] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)
    """What was handed, as the callback got it: each read's frames at once."""
    read: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    """Both, in the order the server got them."""
    ended_with: BaseException | None = None
    handing: bool | None = None
    handed_over: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def server(
    *, hand_after: int, on_text: Callable[[Server, str], None] | None = None, settle: float = 0.0
) -> AsyncIterator[tuple[str, Server]]:
    """A WebSocket route that reads `hand_after` frames through the iterator, then hands the rest over."""
    seen = Server()

    def handle(texts: list[str]) -> None:
        seen.batches.append(list(texts))
        for text in texts:
            if on_text is not None:
                on_text(seen, text)
            seen.handed.append(text)
            seen.order.append(text)

    async def route(request: web.Request) -> web.StreamResponse:
        ws = FrameSocket()
        await ws.prepare(request)
        frames = TextFrames(ws)
        try:
            async for text in frames:
                seen.read.append(text)
                seen.order.append(text)
                if len(seen.read) == hand_after:
                    await asyncio.sleep(settle)  # let frames queue up before the hand-over
                    seen.handing = frames.hand_to(handle)
                    seen.handed_over.set()
                    await asyncio.sleep(settle)  # frames arriving meanwhile must not overtake those still queued
        except Exception as exc:
            seen.ended_with = exc
        finally:
            seen.done.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", route)
    async with serve(app) as url:
        yield url + "/ws", seen


async def send_all(
    url: str, frames: list[str], *, binary: bytes | None = None, seen: Server | None = None, interval: float = 0.0
) -> None:
    """Send `frames`, `interval` apart; with `seen`, wait after the first until the server has handed frames over."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for number, frame in enumerate(frames):
            if interval:
                await asyncio.sleep(interval)
            await ws.send_str(frame)
            if seen is not None and number == 0:
                await asyncio.wait_for(seen.handed_over.wait(), 5)
        if binary is not None:
            await ws.send_bytes(binary)
        await ws.close()


async def test_frames_after_the_hand_over_go_to_the_callback_in_order() -> None:
    frames = [f"frame {number}" for number in range(200)]
    async with server(hand_after=3, settle=0.05) as (url, seen):
        # Frames keep coming, a millisecond apart, while some wait in the queue at the hand-over and after.
        await send_all(url, frames, interval=0.001)
        await asyncio.wait_for(seen.done.wait(), 5)
    assert seen.handing is True
    # Whatever was queued when the hand-over happened still came through the iterator first: nothing reordered.
    assert seen.order == frames
    assert seen.read[:3] == frames[:3]
    assert len(seen.handed) >= 20
    assert seen.ended_with is None


def masked_text_frame(text: str) -> bytes:
    """One client-to-server WebSocket text frame (RFC 6455: masked), for payloads under 126 bytes."""
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_the_frames_of_one_read_are_handed_over_together_and_in_order() -> None:
    first, rest = "frame 0", [f"frame {number}" for number in range(1, 6)]
    async with server(hand_after=1) as (url, seen):
        address = URL(url)
        assert address.host is not None and address.port is not None
        reader, writer = await asyncio.open_connection(address.host, address.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {address.path} HTTP/1.1\r\nHost: {address.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.write(masked_text_frame(first))
        await asyncio.wait_for(seen.handed_over.wait(), 5)
        writer.write(b"".join(masked_text_frame(text) for text in rest))  # one write: one read on loopback
        await writer.drain()
        for _ in range(500):
            if len(seen.handed) == len(rest):
                break
            await asyncio.sleep(0.01)
        writer.close()
        await writer.wait_closed()
    assert seen.read == [first]
    assert seen.batches == [rest]


async def test_a_callback_that_raises_is_raised_by_the_iterator_and_frames_queue_again() -> None:
    def explode(seen: Server, text: str) -> None:
        if text == "bad":
            raise KeyError("boom")

    frames = ["a", "b", "bad", "c"]
    async with server(hand_after=1, on_text=explode) as (url, seen):
        await send_all(url, frames, seen=seen)
        await asyncio.wait_for(seen.done.wait(), 5)
    assert isinstance(seen.ended_with, FrameHandlerFailed)
    assert isinstance(seen.ended_with.__cause__, KeyError)
    assert seen.read == ["a"]
    assert seen.handed == ["b"]


async def test_a_binary_frame_is_a_protocol_error() -> None:
    async with server(hand_after=1) as (url, seen):
        await send_all(url, ["a", "b"], binary=b"\x00\x01")
        await asyncio.wait_for(seen.done.wait(), 5)
    assert isinstance(seen.ended_with, MalformedMessage)
    assert seen.read + seen.handed == ["a", "b"]


async def test_a_plain_websocket_response_is_read_through_the_iterator() -> None:
    seen: list[str] = []
    handing: list[bool] = []

    async def route(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        frames = TextFrames(ws)
        handing.append(frames.hand_to(seen.extend))
        async for text in frames:
            seen.append(text)
        return ws

    app = web.Application()
    app.router.add_get("/ws", route)
    async with serve(app) as url:
        await send_all(url + "/ws", ["x", "y", "z"])
        for _ in range(100):
            if len(seen) == 3:
                break
            await asyncio.sleep(0.01)
    assert handing == [False]
    assert seen == ["x", "y", "z"]
