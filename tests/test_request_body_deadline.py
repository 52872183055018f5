"""Request bodies have a deadline: a client that sends its headers and then trickles or stalls its body is answered
408 (the API's error shape under /v1) and its connection closed, on every route that reads a body; a connection
whose headers never finish is closed too.

Spoken over raw sockets to the real engine on loopback, since an HTTP client library sends its bodies whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest
from yarl import URL

from engine.server import app, body_deadline
from tests.engine_server import running_engine
from tests.test_api_auth import Api, Tenant, assert_error, make_tenant
from tests.test_call_log_writer import eventually

DEADLINE_SECONDS = 0.5
"""The engine's body deadline in these tests (a minute in production), set by the `short_deadline` fixture."""
HANG_GUARD_SECONDS = 30
"""How long a test waits for an answer before calling the engine hung: a failure, never a measure of speed."""
POOL_SIZE = 2
"""The engine's database connections in the test of what a slow body holds."""
DECLARED_LENGTH = 1000
"""The Content-Length the slow requests declare: more than they ever send."""


@dataclass(frozen=True)
class Answer:
    """What the server sent back before it closed the connection."""

    status: int
    headers: dict[str, str]
    body: bytes


class SlowClient:
    """One HTTP/1.1 connection on which a request's headers go out at once and its body as the test chooses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send_head(self, path: str, headers: dict[str, str], length: int = DECLARED_LENGTH) -> None:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def trickle(self, byte: bytes) -> None:
        """One byte after another, until the server stops reading: a body that is always arriving, never whole."""
        with contextlib.suppress(ConnectionError):
            while not self.reader.at_eof():
                await self.send(byte)
                await asyncio.sleep(DEADLINE_SECONDS / 10)

    async def answer_then_close(self) -> Answer:
        """Everything the server sends until it closes the connection."""
        raw = await asyncio.wait_for(self.reader.read(), HANG_GUARD_SECONDS)
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
        return Answer(int(status_line.split()[1]), headers, body)


@asynccontextmanager
async def slow_client(base: str) -> AsyncIterator[SlowClient]:
    url = URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        yield SlowClient(reader, writer)
    finally:
        writer.close()


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(body_deadline, "BODY_SECONDS", DEADLINE_SECONDS)
    return DEADLINE_SECONDS


@pytest.fixture(scope="module")
async def acme(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Acme")


def _api_headers(tenant: Tenant, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.owner_key}", "Content-Type": "application/json", **extra}


def assert_timed_out_in_the_api_shape(answer: Answer) -> None:
    assert answer.status == 408, answer
    assert answer.headers["connection"].lower() == "close"
    assert_error(json.loads(answer.body), "request_timeout")


@pytest.mark.parametrize(
    ("path", "headers"),
    [("/v1/knowledge-bases", {}), ("/v1/calls", {"Idempotency-Key": "slow-body"})],
    ids=["json", "json under an idempotency key"],
)
async def test_a_stalled_json_body_is_a_408_and_the_connection_is_closed(
    api: Api, acme: Tenant, short_deadline: float, path: str, headers: dict[str, str]
) -> None:
    async with slow_client(api.base) as client:
        await client.send_head(path, _api_headers(acme, **headers))
        await client.send(b'{"name": "Sl')
        answer = await client.answer_then_close()
    assert_timed_out_in_the_api_shape(answer)
    assert f"within {short_deadline:g} s" in json.loads(answer.body)["error"]["message"]


async def test_a_trickled_json_body_is_a_408_though_every_byte_comes_in_time(
    api: Api, acme: Tenant, short_deadline: float
) -> None:
    async with slow_client(api.base) as client:
        await client.send_head("/v1/knowledge-bases", _api_headers(acme))
        await client.send(b'{"name": "Slow", "description": "')
        trickling = asyncio.create_task(client.trickle(b"x"))
        try:
            answer: Answer | None = await client.answer_then_close()
        except ConnectionResetError:
            # Cut off with the client's bytes still coming: the kernel may answer them with a reset that drops the
            # 408 before the client reads it. Cut off all the same (the old code held the connection for ever).
            answer = None
        await trickling
    if answer is not None:
        assert_timed_out_in_the_api_shape(answer)


async def test_a_stalled_upload_is_a_408(api: Api, acme: Tenant, short_deadline: float) -> None:
    status, kb = await api.call("POST", "/knowledge-bases", acme.owner_key, json={"name": "Uploads"})
    assert status == 201, kb
    boundary = "slowboundary"
    headers = {"Authorization": f"Bearer {acme.owner_key}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with slow_client(api.base) as client:
        await client.send_head(f"/v1/knowledge-bases/{kb['id']}/files", headers, length=100_000)
        await client.send(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n'
            "Content-Type: text/plain\r\n\r\nthe first words of a long file".encode()
        )
        answer = await client.answer_then_close()
    assert_timed_out_in_the_api_shape(answer)


async def test_a_stalled_twilio_webhook_body_is_a_408_and_the_connection_is_closed(
    api: Api, short_deadline: float
) -> None:
    async with slow_client(api.base) as client:
        await client.send_head("/twilio/voice", {"Content-Type": "application/x-www-form-urlencoded"})
        await client.send(b"CallSid=CA0123&From=%2B1500")
        answer = await client.answer_then_close()
    assert answer.status == 408, answer
    assert answer.headers["connection"].lower() == "close"
    assert b"did not arrive whole" in answer.body


async def test_a_body_sent_in_pieces_that_completes_is_read_as_usual(api: Api, acme: Tenant) -> None:
    body = b'{"name": "In pieces"}'
    async with slow_client(api.base) as client:
        await client.send_head("/v1/knowledge-bases", _api_headers(acme), length=len(body))
        await client.send(body[:5])
        await asyncio.sleep(0.05)
        await client.send(body[5:])
        status_line = await asyncio.wait_for(client.reader.readline(), HANG_GUARD_SECONDS)
    assert status_line.split()[1] == b"201"


async def test_slow_idempotent_bodies_hold_no_database_connection_while_they_arrive(
    db_url: str, pool: asyncpg.Pool
) -> None:
    # As many slow requests as the engine's pool has connections: had they taken them, the next request would wait
    # for their deadline (a minute).
    tenant = await make_tenant(pool, "Pooled")
    async with (
        asyncio.timeout(HANG_GUARD_SECONDS),
        running_engine(db_url, db_pool_min=1, db_pool_max=POOL_SIZE) as base,
        aiohttp.ClientSession() as session,
        contextlib.AsyncExitStack() as clients,
    ):
        slow = [await clients.enter_async_context(slow_client(base)) for _ in range(POOL_SIZE)]
        for n, client in enumerate(slow):
            await client.send_head("/v1/calls", _api_headers(tenant, **{"Idempotency-Key": f"slow-body-{n}"}))
            await client.send(b'{"agentId": "')
        # The engine checked the key: both requests have reached their handlers, which wait for the bodies.
        await eventually(
            lambda: pool.fetchval('SELECT "lastUsedAt" IS NOT NULL FROM "ApiKey" WHERE id = $1', tenant.owner_key_id),
            timeout=HANG_GUARD_SECONDS,
        )
        status, organization = await Api(session, base).call("GET", "/organization", tenant.owner_key)
        assert status == 200, organization
        assert not any(client.reader.at_eof() for client in slow)  # still waiting for their bodies


async def test_a_connection_whose_headers_never_finish_is_closed(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "IDLE_CONNECTION_SECONDS", DEADLINE_SECONDS)  # read as the engine starts
    async with running_engine(db_url) as base, slow_client(base) as client:
        await client.send(b"POST /twilio/voice HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-")
        assert await asyncio.wait_for(client.reader.read(), HANG_GUARD_SECONDS) == b""


async def test_an_upload_arriving_steadily_for_longer_than_the_deadline_is_read_whole(
    api: Api, acme: Tenant, short_deadline: float
) -> None:
    # A large file on a slow uplink (10 MiB at 1 Mbit/s takes 84 s) is no stalled body: each piece comes well above
    # the least rate a body must keep, so the whole upload may take several deadlines.
    status, kb = await api.call("POST", "/knowledge-bases", acme.owner_key, json={"name": "Steady"})
    assert status == 201, kb
    boundary = "steadyboundary"
    pieces = [f"line {n}: ".encode() + b"x" * 4000 + b"\n" for n in range(16)]
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="long.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n".encode()
        + b"".join(pieces)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Authorization": f"Bearer {acme.owner_key}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    piece_bytes = -(-len(body) // len(pieces))
    async with slow_client(api.base) as client:
        await client.send_head(f"/v1/knowledge-bases/{kb['id']}/files", headers, length=len(body))
        for start in range(0, len(body), piece_bytes):  # four deadlines' time in all
            await client.send(body[start : start + piece_bytes])
            await asyncio.sleep(short_deadline / 4)
        status_line = await asyncio.wait_for(client.reader.readline(), HANG_GUARD_SECONDS)
    assert status_line.split()[1] == b"201", status_line
