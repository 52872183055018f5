"""The ingestion worker: every engine process reads queued documents, splits them into passages and indexes them.

Documents are claimed under a lease (storage.knowledge_ingestion), up to `concurrency` at once. A TEXT document's
content, a FILE's stored bytes (parsed by type, storage.knowledge_bases keeps them) or a WEBSITE's crawled pages
become overlapping chunks, written with their tsvectors in one transaction that marks the document READY. A
document that cannot be read (an unsupported file, robots.txt forbids the site) is marked ERROR at once with the
reason; other failures are retried with backoff and marked ERROR after `max_attempts`. A file is read and cut into
passages in a child process within time and memory limits (engine/knowledge/extract_process.py), and so is any
long crawled page or text (a page that cannot be read so is skipped); short ones are read in a thread: all of it off
the event loop that carries calls. The worker looks for due documents every `poll_interval`, and at once when this
process's API queues one (`wake`). With an embedder (vector search on), a second loop beside it embeds the passages
not yet embedded by its model, in batches (engine/knowledge/embeddings.py): new ones, and all of them after a change
of model; a slow or failing embedding API never holds new documents back. Why a round failed is kept in the
database until a round, this process's or another's, makes vectors again (storage.knowledge_embeddings.
record_embedding_failure): every engine's API tells it with the documents whose passages wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta

import aiohttp
from aiohttp import web

from config.settings import Settings
from engine.knowledge.crawl import USER_AGENT, CrawlFailed, CrawlLimits, crawl_site
from engine.knowledge.embeddings import EmbeddingFailed, OpenAIEmbedder, embed_pending_passages, embedder_from_settings
from engine.knowledge.extract_process import (
    ExtractLimits,
    PassageSizes,
    file_passages,
    page_passages,
    text_passages,
)
from engine.knowledge.unreadable import UnreadableDocument
from engine.server.appkeys import DATABASE, DRAIN, PROVIDER_CLIENTS, SETTINGS
from engine.server.metrics import KNOWLEDGE_EMBEDDING_FAILURES
from pipelines.http_bodies import decoded
from pipelines.url_safety import PublicAddressResolver
from storage import Pool, knowledge_ingestion
from storage.enums import DocumentType
from storage.errors import TRANSIENT_ERRORS
from storage.knowledge_embeddings import clear_embedding_failure, record_embedding_failure
from storage.knowledge_ingestion import ClaimedDocument

log = logging.getLogger(__name__)

_RETRY_MAX = timedelta(minutes=10)
_MIN_WAIT = 0.05


@dataclass(frozen=True, slots=True)
class IngestionSettings:
    """How documents are read and chunked, how many at once, and how claims are held and retried."""

    chunk_chars: int = 1000
    chunk_overlap: int = 150
    concurrency: int = 2
    lease: timedelta = timedelta(minutes=5)
    poll_interval: timedelta = timedelta(seconds=2)
    max_attempts: int = 3
    retry_initial: timedelta = timedelta(seconds=5)
    """The wait before the second attempt; each later one waits twice as long (at most ten minutes)."""
    crawl: CrawlLimits = field(default_factory=CrawlLimits)
    extract: ExtractLimits = field(default_factory=ExtractLimits)
    """How long, and with how much memory, an uploaded file may be read."""

    def __post_init__(self) -> None:
        if not 0 <= self.chunk_overlap < self.chunk_chars:
            raise ValueError(
                f"DIALTONE_KB_CHUNK_OVERLAP ({self.chunk_overlap}) must be less than "
                f"DIALTONE_KB_CHUNK_CHARS ({self.chunk_chars})"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestionSettings:
        """The worker's settings from the engine's."""
        return cls(
            chunk_chars=settings.kb_chunk_chars,
            chunk_overlap=settings.kb_chunk_overlap,
            concurrency=settings.kb_ingest_concurrency,
            lease=timedelta(seconds=settings.kb_ingest_lease),
            poll_interval=timedelta(seconds=settings.kb_ingest_poll_interval),
            max_attempts=settings.kb_ingest_max_attempts,
            crawl=CrawlLimits(
                max_depth=settings.kb_crawl_max_depth,
                max_pages=settings.kb_crawl_max_pages,
                timeout=settings.kb_fetch_timeout,
                max_bytes=settings.kb_fetch_max_bytes,
                allow_private=settings.allow_private_kb_urls,
            ),
        )


@dataclass(frozen=True, slots=True)
class _Read:
    chunks: list[str]
    file_size: int | None = None
    mime_type: str | None = None


class IngestionWorker:
    """Ingests the queue's due documents from this process until stopped."""

    def __init__(self, pool: Pool, settings: IngestionSettings, *, embedder: OpenAIEmbedder | None = None) -> None:
        """Work on `pool`'s database with `settings`, embedding passages with `embedder` if given; `start` begins."""
        self._pool = pool
        self._settings = settings
        self._embedder = embedder
        self._embedding_failures = 0
        self._embed_after = 0.0
        """Event-loop time before which embedding is not tried again, after a failure (backing off like documents)."""
        self._wake = asyncio.Event()
        self._embed_wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        if embedder is not None:
            embedder.on_key_accepted(self._key_accepted)

    def start(self) -> None:
        """Start ingesting on the running event loop."""
        if self._task is not None:
            raise RuntimeError("the ingestion worker is already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="knowledge-ingestion")

    def wake(self) -> None:
        """Look for due documents now (one was just queued)."""
        self._wake.set()

    def stop_claiming(self) -> None:
        """Claim no more documents; those in progress carry on to their end (the engine is draining before it stops).

        Their leases would otherwise hold new documents away from the other engines until they expire. No new round of
        embedding begins either.
        """
        self._stop.set()
        self._wake.set()
        self._embed_wake.set()

    async def stop(self) -> None:
        """Stop claiming and cancel documents in progress: their leases end and another process takes them."""
        self.stop_claiming()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            resolver = None if self._settings.crawl.allow_private else PublicAddressResolver()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=resolver, limit=8),
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    async def run_once(self) -> int:
        """Claim the documents due now (up to `concurrency`) and ingest them, then embed the passages waiting for
        it (with an embedder); how many documents were claimed."""
        claimed = await self._ingest_due()
        if self._embedder is not None and asyncio.get_running_loop().time() >= self._embed_after:
            await self._embed(self._embedder)
        return claimed

    async def _ingest_due(self) -> int:
        claimed = await knowledge_ingestion.claim_due(
            self._pool, limit=self._settings.concurrency, lease=self._settings.lease
        )
        await asyncio.gather(*(self._ingest(claim) for claim in claimed))
        return len(claimed)

    async def _embed(self, embedder: OpenAIEmbedder) -> None:
        try:
            embedded = await embed_pending_passages(self._pool, embedder)
        except EmbeddingFailed as exc:  # the passages keep full-text search and wait for a later round
            KNOWLEDGE_EMBEDDING_FAILURES.inc()
            self._embedding_failures += 1
            wait = min(self._settings.retry_initial * 2 ** (self._embedding_failures - 1), _RETRY_MAX)
            self._embed_after = asyncio.get_running_loop().time() + wait.total_seconds()
            log.warning("knowledge passages not embedded yet: %s; next try in %.0f s", exc, wait.total_seconds())
            await record_embedding_failure(self._pool, model=embedder.model, reason=str(exc))
        else:
            self._embedding_failures = 0
            # Not on a round that embedded nothing: another process may hold the waiting passages, failing alike.
            if embedded:
                await clear_embedding_failure(self._pool, model=embedder.model)

    def _key_accepted(self) -> None:
        """The embedding API takes the engine's key again (a caller's question got through): embed what waited now,
        not once the backoff of refused rounds is out."""
        self._embedding_failures = 0
        self._embed_after = 0.0
        self._embed_wake.set()

    async def _run(self) -> None:
        # Embedding runs beside ingestion, not after it: a slow or hanging embedding API, or every passage to embed
        # again after a change of model, must not keep new documents from being read and found by full-text.
        async with asyncio.TaskGroup() as tasks:
            if self._embedder is not None:
                tasks.create_task(self._embed_continually(self._embedder), name="knowledge-embedding")
            await self._ingest_continually()

    async def _ingest_continually(self) -> None:
        async def ingest_round() -> float:
            if await self._ingest_due():
                self._embed_wake.set()  # their passages wait for an embedding
                return 0.0
            wait = self._settings.poll_interval.total_seconds()
            due_in = await knowledge_ingestion.next_due_in(self._pool)
            if due_in is not None:
                wait = min(wait, due_in.total_seconds())
            return max(wait, _MIN_WAIT)

        await self._repeat(ingest_round, self._wake, doing="ingestion")

    async def _embed_continually(self, embedder: OpenAIEmbedder) -> None:
        async def embed_round() -> float:
            loop = asyncio.get_running_loop()
            if loop.time() >= self._embed_after:
                await self._embed(embedder)
            backing_off = self._embed_after - loop.time()  # after a failure: until the next try is due
            return backing_off if backing_off > 0 else self._settings.poll_interval.total_seconds()

        await self._repeat(embed_round, self._embed_wake, doing="embedding")

    async def _repeat(self, work: Callable[[], Awaitable[float]], wake: asyncio.Event, *, doing: str) -> None:
        """Run `work` until the worker stops, each time then waiting the seconds it returns or until `wake` is set."""
        poll = self._settings.poll_interval.total_seconds()
        while not self._stop.is_set():
            wake.clear()
            try:
                wait = await work()
            except TRANSIENT_ERRORS as exc:
                log.warning("knowledge %s: database unavailable (%s: %s)", doing, type(exc).__name__, exc)
                wait = poll
            except Exception:  # a bug must not end this work for the life of the process
                log.exception("knowledge %s: unexpected error; retrying", doing)
                wait = poll
            if wait > 0:
                await _wait(wake, wait)

    async def _ingest(self, claim: ClaimedDocument) -> None:
        if claim.attempt_count > self._settings.max_attempts:  # each earlier claim's process stopped mid-way
            reason = f"ingestion did not finish in {self._settings.max_attempts} attempts (the reading process stopped)"
            await self._failed(claim, reason, permanent=True)
            return
        try:
            read = await self._read(claim)
        except (UnreadableDocument, CrawlFailed) as exc:
            permanent = not isinstance(exc, CrawlFailed) or exc.permanent
            await self._failed(claim, str(exc), permanent=permanent)
            return
        except TRANSIENT_ERRORS:
            log.warning("knowledge document %s: database unavailable; its lease will pass it on", claim.document_id)
            return
        except Exception as exc:
            log.exception("knowledge document %s: ingestion failed", claim.document_id)
            await self._failed(claim, f"ingestion failed ({type(exc).__name__})", permanent=False)
            return
        if not read.chunks:
            await self._failed(claim, "the document has no text", permanent=True)
            return
        recorded = await knowledge_ingestion.record_ready(
            self._pool, claim, chunks=read.chunks, file_size=read.file_size, mime_type=read.mime_type
        )
        if not recorded:
            log.warning(
                "knowledge document %s: not indexed: its claim ended first (its lease ran out, or it was reingested or "
                "deleted meanwhile)",
                claim.document_id,
            )

    async def _read(self, claim: ClaimedDocument) -> _Read:
        sizes = PassageSizes(self._settings.chunk_chars, self._settings.chunk_overlap)
        limits = self._settings.extract
        if claim.type is DocumentType.TEXT:
            return _Read(await text_passages(claim.content or "", sizes=sizes, limits=limits))
        if claim.type is DocumentType.FILE:
            data = await knowledge_ingestion.stored_file(self._pool, claim)
            if data is None:
                raise UnreadableDocument("no file was uploaded for this document; upload it with the file endpoint")
            read = await file_passages(data, name=claim.name, sizes=sizes, limits=limits)
            return _Read(read.chunks, file_size=len(data), mime_type=read.mime_type)
        if claim.url is None:
            raise UnreadableDocument("a WEBSITE document needs its url")
        # A crawl ends within half the lease, so its document is recorded before another process may take it over
        # and crawl the site again.
        crawl = self._settings.crawl
        crawl = replace(crawl, total_timeout=min(crawl.total_timeout, self._settings.lease.total_seconds() / 2))
        chunks: list[str] = []
        unreadable = None
        async with contextlib.aclosing(crawl_site(self._http(), claim.url, crawl)) as pages:
            async for page in pages:  # cut page by page: a passage never joins two pages
                try:
                    if page.is_html:
                        chunks += await page_passages(page.body, url=page.url, sizes=sizes, limits=limits)
                    else:
                        chunks += await text_passages(decoded(page.body, page.charset), sizes=sizes, limits=limits)
                except UnreadableDocument as exc:  # like a page that cannot be fetched: the site goes on without it
                    log.info("knowledge document %s: skipped %s (%s)", claim.document_id, page.url, exc)
                    unreadable = UnreadableDocument(f"{page.url}: {exc}")
        if not chunks and unreadable is not None:
            raise unreadable
        return _Read(chunks)

    async def _failed(self, claim: ClaimedDocument, reason: str, *, permanent: bool) -> None:
        retry_in = None
        if not permanent and claim.attempt_count < self._settings.max_attempts:
            retry_in = min(self._settings.retry_initial * 2 ** (claim.attempt_count - 1), _RETRY_MAX)
        log.info(
            "knowledge document %s: %s (%s)", claim.document_id, reason, "will retry" if retry_in else "marked ERROR"
        )
        if not await knowledge_ingestion.record_error(self._pool, claim, error=reason, retry_in=retry_in):
            log.warning("knowledge document %s: its claim ended before the failure was recorded", claim.document_id)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set, or `seconds` have passed."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


INGESTION_WORKER = web.AppKey("knowledge_ingestion_worker", IngestionWorker)
"""The application's ingestion worker, which the API wakes when it queues a document."""
KNOWLEDGE_EMBEDDER = web.AppKey("knowledge_embedder", OpenAIEmbedder)
"""The engine's embedder, set only when vector search is on: calls embed their questions with it."""


async def ingestion_context(app: web.Application) -> AsyncIterator[None]:
    """Run this process's ingestion worker for the life of the application, and offer its embedder (if vector
    search is on) to the calls' knowledge lookups."""
    pool, settings = app[DATABASE].pool, app[SETTINGS]
    embedder = await embedder_from_settings(settings, app[PROVIDER_CLIENTS], pool)
    if embedder is not None:
        app[KNOWLEDGE_EMBEDDER] = embedder
    worker = IngestionWorker(pool, IngestionSettings.from_settings(settings), embedder=embedder)
    app[INGESTION_WORKER] = worker
    worker.start()
    app[DRAIN].on_start(worker.stop_claiming)
    try:
        yield
    finally:
        await worker.stop()
