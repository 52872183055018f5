"""The webhook delivery worker: every engine process POSTs due outbox deliveries, signed, and records each outcome.

The worker claims due deliveries under a lease (storage.webhook_outbox), never more than `per_organization` of one
organization's in flight across all processes, so one slow endpoint cannot hold every slot; POSTs up to
`concurrency` at once, each with a timeout; and records a 2xx as delivered and anything else as a failed attempt to
retry with backoff. It wakes when a transaction that queued deliveries commits (LISTEN on WEBHOOK_CHANNEL), when the
next delivery it may claim falls due, and at least every `poll_interval` in case a notification was missed. Hosts
that resolve to loopback, private or link-local addresses are refused unless allowed, at connect time (see
pipelines.url_safety). At start and then hourly it deletes the finished deliveries older than the history period
(DIALTONE_WEBHOOK_HISTORY_DAYS) with their attempts, so the delivery log does not grow for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from config.settings import Settings
from engine.server.appkeys import DATABASE, SETTINGS
from pipelines.url_safety import PublicAddressResolver, UnsafeURL, check_public_address, literal_address
from storage import Pool, webhook_outbox
from storage.errors import TRANSIENT_ERRORS
from storage.webhook_outbox import WEBHOOK_CHANNEL, ClaimedDelivery, DeliveryRetryPolicy, DeliveryStatus

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Dialtone-Signature"
EVENT_HEADER = "Dialtone-Event"
DELIVERY_HEADER = "Dialtone-Delivery"
USER_AGENT = "Dialtone-Webhooks/1.0"
_ERROR_BODY_CHARS = 200
_MIN_WAIT = 0.05  # s: rows due but being claimed by another worker must not make this one spin
HISTORY_SWEEP_INTERVAL = timedelta(hours=1)


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body, keyed with the organization's secret>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How the worker sends: parallelism (per process, and per organization across processes), per-request timeout,
    lease, polling, retries, the address policy, and how long finished deliveries stay in the log."""

    concurrency: int = 16
    per_organization: int = 4
    timeout: timedelta = timedelta(seconds=10)
    lease: timedelta = timedelta(seconds=60)
    poll_interval: timedelta = timedelta(seconds=5)
    retry: DeliveryRetryPolicy = field(default_factory=DeliveryRetryPolicy)
    allow_private: bool = False
    history: timedelta = timedelta(days=30)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.per_organization < 1:
            raise ValueError(f"per_organization must be at least 1, got {self.per_organization}")
        if self.history <= timedelta(0):
            raise ValueError(f"history must be positive, got {self.history}")
        if self.lease <= self.timeout:
            # A lease shorter than a request would let a second worker send while the first still waits.
            raise ValueError(
                f"DIALTONE_WEBHOOK_LEASE ({self.lease.total_seconds():g} s) must be longer than "
                f"DIALTONE_WEBHOOK_TIMEOUT ({self.timeout.total_seconds():g} s)"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliverySettings:
        """The worker's settings from the engine's."""
        return cls(
            concurrency=settings.webhook_concurrency,
            per_organization=settings.webhook_organization_concurrency,
            timeout=timedelta(seconds=settings.webhook_timeout),
            lease=timedelta(seconds=settings.webhook_lease),
            poll_interval=timedelta(seconds=settings.webhook_poll_interval),
            retry=DeliveryRetryPolicy(
                initial=timedelta(seconds=settings.webhook_retry_initial),
                maximum=timedelta(seconds=max(settings.webhook_retry_max, settings.webhook_retry_initial)),
                give_up_after=timedelta(seconds=settings.webhook_give_up_after),
            ),
            allow_private=settings.allow_private_webhook_urls,
            history=timedelta(days=settings.webhook_history_days),
        )


@dataclass(frozen=True, slots=True)
class _Response:
    code: int | None
    error: str | None
    duration_ms: int


class WebhookDeliveryWorker:
    """Delivers the outbox's due webhooks from this process until stopped."""

    def __init__(
        self,
        pool: Pool,
        settings: DeliverySettings,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._clock = clock
        self._jitter = jitter
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        """Start listening and delivering on the running event loop."""
        if self._tasks:
            raise RuntimeError("the webhook delivery worker is already started")
        resolver = None if self._settings.allow_private else PublicAddressResolver()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=resolver, limit=self._settings.concurrency),
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(), name="webhook-listen"),
            loop.create_task(self._run(), name="webhook-deliver"),
            loop.create_task(self._sweep_history_hourly(), name="webhook-history"),
        ]

    async def stop(self) -> None:
        """Stop claiming, let deliveries in flight finish (within one timeout), and close the HTTP session.

        A delivery cut off here keeps its lease and is sent again, by any process, once the lease ends.
        """
        self._stop.set()
        self._wake.set()
        if self._tasks:
            listen, run, history = self._tasks
            for task in (listen, history):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await run
        if self._in_flight:
            _, unfinished = await asyncio.wait(self._in_flight, timeout=self._settings.timeout.total_seconds() + 1)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _listen(self) -> None:
        """Hold a LISTEN connection, re-opening it when it drops; each notification wakes the worker."""
        delay = 0.5
        while True:
            try:
                await self._listen_until_closed()
                log.warning("webhook notifications: the database connection closed; re-opening it")
                delay = 0.5
            except TRANSIENT_ERRORS as exc:
                log.warning("webhook notifications unavailable (%s: %s); polling meanwhile", type(exc).__name__, exc)
            except Exception:  # polling still delivers; keep trying to listen
                log.exception("webhook notifications failed; polling meanwhile")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _listen_until_closed(self) -> None:
        async with self._pool.acquire() as conn:
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def on_termination(_: object) -> None:
                if not lost.done():
                    lost.set_result(None)

            conn.add_termination_listener(on_termination)
            try:
                await conn.add_listener(WEBHOOK_CHANNEL, self._on_notification)
                self._wake.set()  # deliveries queued while nobody listened
                await lost
            finally:
                conn.remove_termination_listener(on_termination)
                if not conn.is_closed():
                    with contextlib.suppress(*TRANSIENT_ERRORS):
                        await conn.remove_listener(WEBHOOK_CHANNEL, self._on_notification)

    async def sweep_history(self) -> int:
        """Delete the finished deliveries older than the history period, with their attempts; how many deliveries."""
        created_before = datetime.fromtimestamp(self._clock(), UTC) - self._settings.history
        deleted = await webhook_outbox.delete_finished_deliveries(self._pool, created_before=created_before)
        if deleted:
            log.info("webhook history: deleted %d finished deliveries older than %s", deleted, self._settings.history)
        return deleted

    async def _sweep_history_hourly(self) -> None:
        while True:
            try:
                await self.sweep_history()
            except TRANSIENT_ERRORS as exc:
                log.warning("webhook history: database unavailable (%s: %s)", type(exc).__name__, exc)
            except Exception:  # the next sweep tries again; delivery goes on meanwhile
                log.exception("webhook history: sweep failed")
            await asyncio.sleep(HISTORY_SWEEP_INTERVAL.total_seconds())

    def _on_notification(self, *_: Any) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._claim_and_wait()
            except TRANSIENT_ERRORS as exc:
                log.warning("webhook delivery: database unavailable (%s: %s)", type(exc).__name__, exc)
                await self._wait(self._settings.poll_interval.total_seconds())
            except Exception:  # a bug must not end delivery for the life of the process
                log.exception("webhook delivery: unexpected error; retrying")
                await self._wait(self._settings.poll_interval.total_seconds())

    async def _claim_and_wait(self) -> None:
        free = self._settings.concurrency - len(self._in_flight)
        claimed: list[ClaimedDelivery] = []
        if free > 0:
            self._wake.clear()
            claimed = await webhook_outbox.claim_due(
                self._pool, limit=free, per_organization=self._settings.per_organization, lease=self._settings.lease
            )
            for delivery in claimed:
                task = asyncio.get_running_loop().create_task(self._deliver(delivery), name=f"webhook-{delivery.id}")
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
        if len(self._in_flight) >= self._settings.concurrency:
            # Every slot is busy: more may be due, so claim again as soon as one frees.
            stopping = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({stopping, *self._in_flight}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            return
        wait = self._settings.poll_interval.total_seconds()
        due_in = await webhook_outbox.next_due_in(self._pool, per_organization=self._settings.per_organization)
        if due_in is not None:
            wait = min(wait, due_in.total_seconds())
        await self._wait(max(wait, _MIN_WAIT))

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _deliver(self, delivery: ClaimedDelivery) -> None:
        try:
            if not delivery.subscription_enabled:
                await self._record(delivery, _Response(None, "the subscription was disabled before delivery", 0))
                return
            secret = await webhook_outbox.signing_secret(self._pool, organization_id=delivery.organization_id)
            await self._record(delivery, await self._post(delivery, secret))
        except Exception:
            # The lease ends and another attempt follows; nothing is lost.
            log.exception("webhook delivery %s: could not be attempted", delivery.id)
        finally:
            self._wake.set()  # a retry may now be due sooner than what the worker is waiting for

    async def _post(self, delivery: ClaimedDelivery, secret: str) -> _Response:
        assert self._session is not None
        body = json.dumps(delivery.payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            SIGNATURE_HEADER: signature_header(secret, int(self._clock()), body),
            EVENT_HEADER: delivery.event,
            DELIVERY_HEADER: delivery.id,
        }
        began = time.monotonic()

        def elapsed_ms() -> int:
            return round((time.monotonic() - began) * 1000)

        try:
            if not self._settings.allow_private:
                host = urlsplit(delivery.webhook_url).hostname or ""
                address = literal_address(host)
                if address is not None:  # aiohttp asks no resolver about IP literals
                    check_public_address(host, address)
            async with self._session.post(
                delivery.webhook_url,
                data=body,
                headers=headers,
                allow_redirects=False,  # a redirect could lead to an address nobody checked
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout.total_seconds()),
            ) as response:
                if 200 <= response.status < 300:
                    return _Response(response.status, None, elapsed_ms())
                text = (await response.content.read(_ERROR_BODY_CHARS)).decode(errors="replace")
                # PostgreSQL text cannot hold NUL: a receiver's body must not keep its failure from being recorded.
                text = text.replace("\x00", "\ufffd")
                return _Response(response.status, f"HTTP {response.status}: {text}".strip(), elapsed_ms())
        except UnsafeURL as exc:
            return _Response(None, f"refused: {exc} (set DIALTONE_ALLOW_PRIVATE_WEBHOOK_URLS to allow)", elapsed_ms())
        except ValueError as exc:  # a URL stored past the API's check (the dashboard shares the table)
            return _Response(None, f"invalid webhook URL {delivery.webhook_url!r}: {exc}", elapsed_ms())
        except TimeoutError:
            timeout = self._settings.timeout.total_seconds()
            return _Response(None, f"no response within {timeout:g} s", elapsed_ms())
        except (aiohttp.ClientError, OSError) as exc:
            return _Response(None, f"{type(exc).__name__}: {exc}", elapsed_ms())

    async def _record(self, delivery: ClaimedDelivery, response: _Response) -> None:
        if response.error is None and response.code is not None:
            status = await webhook_outbox.record_success(
                self._pool, delivery=delivery, response_code=response.code, duration_ms=response.duration_ms
            )
        else:
            status = await webhook_outbox.record_failure(
                self._pool,
                delivery=delivery,
                response_code=response.code,
                error=response.error or "no response",
                duration_ms=response.duration_ms,
                policy=self._settings.retry,
                jitter=self._jitter(),
                give_up=not delivery.subscription_enabled,
            )
        if status is None:
            log.warning("webhook delivery %s: its lease ran out before the outcome was recorded", delivery.id)
        elif status is DeliveryStatus.FAILED:
            log.warning(
                "webhook delivery %s (%s) given up after attempt %d: %s",
                delivery.id,
                delivery.event,
                delivery.attempt_count + 1,
                response.error,
            )
        elif status is DeliveryStatus.PENDING:
            log.info("webhook delivery %s (%s) failed, will retry: %s", delivery.id, delivery.event, response.error)


async def webhook_delivery_context(app: web.Application) -> AsyncIterator[None]:
    """Run this process's webhook delivery worker for the life of the application."""
    worker = WebhookDeliveryWorker(app[DATABASE].pool, DeliverySettings.from_settings(app[SETTINGS]))
    worker.start()
    try:
        yield
    finally:
        await worker.stop()
