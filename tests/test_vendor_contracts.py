"""The vendors' private or unusual surfaces the engine relies on, pinned: an upgrade that moves one fails here, by name.

Each failure says what to re-check before the version pin (or the recorded source hash) may move.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from aiohttp import web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.base_protocol import BaseProtocol
from openai import AsyncOpenAI
from websockets.exceptions import ConnectionClosed

from config.agent import DeepgramSTTConfig
from engine.call import frame_socket
from engine.call.frame_socket import CHECKED_SOURCES, FrameSocket, installed_sources
from pipelines.clients import ProviderClients
from pipelines.stt.deepgram import listen_parameters
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.openai_chat import FakeOpenAI

DG_KEY, OPENAI_KEY = "dg-contract", "sk-contract"


@pytest.fixture
async def clients() -> AsyncIterator[ProviderClients]:
    clients = ProviderClients()
    yield clients
    await clients.aclose()


# ------------------------------------------------------------------------------------------------------ aiohttp


def test_aiohttps_websocket_post_start_is_the_one_frame_socket_copies() -> None:
    source = inspect.getsource(web.WebSocketResponse._post_start)
    assert (
        hashlib.sha256(source.encode()).hexdigest() == CHECKED_SOURCES["aiohttp.web:WebSocketResponse._post_start"]
    ), (
        "aiohttp's WebSocketResponse._post_start changed: compare it with FrameSocket._post_start in "
        "engine/call/frame_socket.py, carry the change over, then record the new hash in CHECKED_SOURCES"
    )


def test_aiohttps_websocket_data_queue_is_the_one_frame_socket_subclasses() -> None:
    name = "aiohttp._websocket.reader_py:WebSocketDataQueue"
    assert installed_sources()[name] == CHECKED_SOURCES[name], (
        "aiohttp's WebSocketDataQueue changed: re-check _HandingQueue in engine/call/frame_socket.py (its "
        "constructor, feed_data and the _buffer it reads), then record the new hash in CHECKED_SOURCES"
    )


def test_frames_are_handed_over_on_the_installed_aiohttp() -> None:
    assert frame_socket.DIRECT, f"frame_socket runs the slower way on this aiohttp: {installed_sources()}"
    assert "_post_start" in vars(FrameSocket)


async def test_the_parser_calls_a_python_override_of_the_cython_queues_feed_data() -> None:
    # frame_socket's _HandingQueue overrides feed_data; the Cython reader must dispatch to it (a cpdef method).
    fed: list[str] = []

    class Recording(WebSocketDataQueue):
        def feed_data(self, data: Any, size: int) -> None:
            fed.append(data.data)

    loop = asyncio.get_running_loop()
    queue = Recording(BaseProtocol(loop), 2**16, loop=loop)
    reader = WebSocketReader(queue, 2**20, compress=False, decode_text=True)
    reader.feed_data(bytes([0x81, 5]) + b"hello")  # one unmasked text frame, as the client's would be once unmasked
    assert fed == ["hello"], (
        "aiohttp's WebSocket parser no longer calls a Python override of WebSocketDataQueue.feed_data: "
        "frame_socket's hand-over cannot work; re-check engine/call/frame_socket.py"
    )


# ----------------------------------------------------------------------------------------------------- Deepgram


async def test_deepgrams_socket_keeps_the_connection_that_the_recognizer_reads_raw(clients: ProviderClients) -> None:
    # pipelines/stt/deepgram.py reads `socket._websocket.recv()` (JSON text) instead of the SDK's typed recv().
    async with FakeDeepgram(api_key=DG_KEY) as fake:
        client = clients.deepgram(DG_KEY, fake.url)
        async with client.listen.v1.connect(**listen_parameters(DeepgramSTTConfig())) as socket:
            websocket = getattr(socket, "_websocket", None)
            assert websocket is not None and callable(getattr(websocket, "recv", None)), (
                "deepgram-sdk's AsyncV1SocketClient no longer keeps its connection as `_websocket`: re-check "
                "DeepgramSTT._receive in pipelines/stt/deepgram.py"
            )
            await socket.send_close_stream()
            messages = []
            with pytest.raises(ConnectionClosed):
                while True:
                    messages.append(await websocket.recv())
    assert messages and all(isinstance(message, str) for message in messages), (
        "deepgram-sdk's connection no longer gives messages as JSON text: re-check DeepgramSTT._receive"
    )
    assert json.loads(messages[-1])["type"] == "Metadata"


# ------------------------------------------------------------------------------------------------------- OpenAI


def test_openais_post_takes_what_the_chat_model_passes() -> None:
    parameters = inspect.signature(AsyncOpenAI.post).parameters
    for name in ("path", "cast_to", "body", "options", "stream"):
        assert name in parameters, (
            f"openai's AsyncOpenAI.post has no `{name}` any more: re-check OpenAIChatLLM._stream in "
            "pipelines/llm/openai_chat.py"
        )


async def test_openais_post_with_a_response_cast_streams_the_body_unread(clients: ProviderClients) -> None:
    # pipelines/llm/openai_chat.py posts the completion itself and reads the server-sent events from the response.
    async with FakeOpenAI(api_key=OPENAI_KEY, default_reply="Hello.") as fake:
        client = clients.openai(OPENAI_KEY, fake.base_url)
        response = await client.post(
            "/chat/completions",
            body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
            options={"security": {"bearer_auth": True}},
            cast_to=httpx2.Response,
            stream=True,
        )
        try:
            assert isinstance(response, httpx2.Response), (
                "openai's post(cast_to=httpx2.Response, stream=True) no longer returns the raw response: re-check "
                "OpenAIChatLLM._stream and _chunks in pipelines/llm/openai_chat.py"
            )
            body = b"".join([piece async for piece in response.aiter_bytes()])
        finally:
            await response.aclose()
    assert body.startswith(b"data: {") and b"data: [DONE]" in body
