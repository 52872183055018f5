"""A webhook receiver on loopback for tests: records every POST, fails or holds requests when told to."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.server import serve


@dataclass(frozen=True, slots=True)
class Received:
    """One POST as the receiver saw it, and the status it answered."""

    path: str
    delivery_id: str
    event: str
    signature: str
    user_agent: str
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, Any]:
        """The body, parsed."""
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class WebhookReceiver:
    """Answers 200, except the first `fail_first` POSTs of each delivery (503) and held deliveries (wait).

    With `redirect_to`, answers every POST with a 307 to that URL instead.
    """

    base_url: str = ""
    fail_first: int = 0
    redirect_to: str | None = None
    received: list[Received] = field(default_factory=list)
    held: dict[str, asyncio.Event] = field(default_factory=dict)
    hold_next: bool = False

    def url(self, path: str = "hook") -> str:
        """Where a subscription should point."""
        return f"{self.base_url}/{path}"

    def accepted(self, path: str | None = None) -> list[Received]:
        """The POSTs answered 2xx, in arrival order (optionally only those to `path`)."""
        return [r for r in self.received if 200 <= r.status < 300 and (path is None or r.path == f"/{path}")]

    def accepted_ids(self) -> Counter[str]:
        """How many times each occurrence id was accepted."""
        return Counter(r.json["id"] for r in self.accepted())

    def attempts_of(self, delivery_id: str) -> int:
        """How many POSTs of one delivery arrived."""
        return sum(1 for r in self.received if r.delivery_id == delivery_id)

    async def handle(self, request: web.Request) -> web.Response:
        """Record the POST, then answer as configured."""
        body = await request.read()
        delivery_id = request.headers.get("Dialtone-Delivery", "")
        status = 503 if self.attempts_of(delivery_id) < self.fail_first else 200
        if self.hold_next and delivery_id not in self.held:
            self.hold_next = False
            self.held[delivery_id] = asyncio.Event()
        if self.redirect_to is not None:
            status = 307
        self.received.append(
            Received(
                path=request.path,
                delivery_id=delivery_id,
                event=request.headers.get("Dialtone-Event", ""),
                signature=request.headers.get("Dialtone-Signature", ""),
                user_agent=request.headers.get("User-Agent", ""),
                body=body,
                status=status,
            )
        )
        if delivery_id in self.held:
            await self.held[delivery_id].wait()
        if self.redirect_to is not None:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        return web.Response(status=status, text="ok" if status == 200 else "try later")


@asynccontextmanager
async def webhook_receiver(*, fail_first: int = 0) -> AsyncIterator[WebhookReceiver]:
    """A receiver listening on 127.0.0.1 for as long as the block runs."""
    receiver = WebhookReceiver(fail_first=fail_first)
    app = web.Application()
    app.router.add_post("/{path:.*}", receiver.handle)
    async with serve(app) as base:
        receiver.base_url = base
        try:
            yield receiver
        finally:
            for event in receiver.held.values():  # a held request would keep the server from closing
                event.set()
