"""Vector search over knowledge bases on real PostgreSQL with pgvector, embeddings from the fake OpenAI server.

The fake's embeddings are hashed character trigrams (tests/fakes/embeddings.py), so "carpark" is near "car park"
where full-text search sees different words: the tests exercise real vector ranking, not a scripted order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from openai import AsyncOpenAI
from pydantic import ValidationError

from config.settings import Settings
from engine.knowledge.embeddings import (
    KEY_RETRY_INITIAL,
    KEY_RETRY_MAX,
    EmbeddingFailed,
    EmbeddingSettings,
    OpenAIEmbedder,
    embed_pending_passages,
    embedder_from_settings,
)
from engine.knowledge.ingestion import IngestionWorker
from engine.knowledge.lookup import KnowledgeLookup
from engine.server import metrics
from pipelines.clients import ProviderClients
from storage import knowledge_bases
from storage.knowledge_embeddings import (
    EmbeddingModel,
    claim_pending,
    embedding_failure,
    nearest_passages,
    vector_search_available,
)
from storage.knowledge_search import Passage, fuse_rankings, search_passages
from storage.migrate import migrate
from storage.pool import create_pool
from storage.tenancy import tenant_transaction
from tests.databases import TestDatabases, with_database
from tests.fakes.embeddings import hashed_embedding
from tests.fakes.openai_chat import FakeOpenAI
from tests.test_knowledge_ingestion import quick, status_of, text_document
from tests.test_repo_agents import insert_organization

MODEL = EmbeddingModel("text-embedding-3-small", 256)
"""Short vectors (the API is asked for 256 dimensions) keep the tests light; the ranking works the same."""


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key="sk-embed") as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(api_key="sk-embed", base_url=fake.base_url)
    yield client
    await client.close()


def embedder(client: AsyncOpenAI, waits: list[float] | None = None, **overrides: Any) -> OpenAIEmbedder:
    settings = replace(EmbeddingSettings(model=MODEL, send_dimensions=True, question_timeout=2.0), **overrides)

    async def sleep(seconds: float) -> None:
        if waits is not None:
            waits.append(seconds)

    return OpenAIEmbedder(client, settings, sleep=sleep)


async def ingest(pool: asyncpg.Pool, with_embedder: OpenAIEmbedder | None) -> None:
    worker = IngestionWorker(pool, quick(concurrency=50), embedder=with_embedder)
    await worker.run_once()
    await worker.stop()


async def pending(pool: asyncpg.Pool) -> int:
    """How many passages wait for an embedding by MODEL (neither embedded nor refused by it)."""
    count: int = await pool.fetchval(
        """SELECT count(*) FROM "KnowledgeBaseChunk" WHERE coalesce("embeddingModel", '') <> ALL($1::text[])""",
        [MODEL.key, MODEL.refused_key],
    )
    return count


async def test_the_worker_embeds_new_passages_in_batches(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    org = await insert_organization(pool)
    sentences = " ".join(f"Locker {n} of the Basalt gym is opened with code {n * 7}." for n in range(12))
    _, document_id = await text_document(pool, org, sentences)
    await ingest(pool, embedder(client, batch_size=3))
    chunks = await pool.fetch(
        'SELECT "content", "embedding"::text AS v, "embeddingModel" FROM "KnowledgeBaseChunk" WHERE "documentId" = $1',
        document_id,
    )
    assert len(chunks) >= 4  # 200-character chunks: several batches of 3
    assert len(fake.embedding_requests) == math.ceil(len(chunks) / 3)
    assert all(len(request["input"]) <= 3 and request["dimensions"] == 256 for request in fake.embedding_requests)
    assert {row["embeddingModel"] for row in chunks} == {"text-embedding-3-small/256"}
    stored = [float(value) for value in chunks[0]["v"].strip("[]").split(",")]
    assert stored == pytest.approx(hashed_embedding(chunks[0]["content"], 256), abs=1e-6)
    await ingest(pool, embedder(client, batch_size=3))  # nothing left to embed: no request
    assert len(fake.embedding_requests) == math.ceil(len(chunks) / 3)


async def test_a_change_of_model_embeds_every_passage_again(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    org = await insert_organization(pool)
    _, document_id = await text_document(pool, org, "The Jasper pool opens at dawn.")
    await ingest(pool, embedder(client))
    longer = EmbeddingModel(MODEL.name, 96)
    await ingest(pool, embedder(client, model=longer))
    row = await pool.fetchrow(
        'SELECT "embeddingModel", vector_dims("embedding") AS n FROM "KnowledgeBaseChunk" WHERE "documentId" = $1',
        document_id,
    )
    assert row is not None and (row["embeddingModel"], row["n"]) == ("text-embedding-3-small/96", 96)
    assert fake.embedding_requests[-1]["dimensions"] == 96
    await ingest(pool, embedder(client))  # back to 256 dimensions, for the other tests of this module


async def test_rate_limits_and_server_errors_are_retried_with_backoff(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    org = await insert_organization(pool)
    await text_document(pool, org, "The Garnet tram runs every six minutes.")
    fake.embedding_failures.extend([429, 500])
    waits: list[float] = []
    await ingest(pool, embedder(client, waits, retry_initial=0.5))
    tram = ["The Garnet tram runs every six minutes."]
    assert [request["input"] for request in fake.embedding_requests] == [tram, tram, tram]
    assert waits == [0.5, 1.0]
    assert await pending(pool) == 0


async def test_passages_whose_embedding_keeps_failing_wait_for_a_later_round(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    org = await insert_organization(pool)
    kb, document_id = await text_document(pool, org, "The Beryl library lends telescopes.")
    fake.embedding_failures.extend([503, 503])
    backing_off = quick(retry_initial=timedelta(milliseconds=500))
    worker = IngestionWorker(pool, backing_off, embedder=embedder(client, max_attempts=2))
    failed_rounds = metrics.REGISTRY.get_sample_value("dialtone_knowledge_embedding_failures_total") or 0.0
    await worker.run_once()
    await worker.run_once()  # within the wait after a failed round: no request
    assert await pending(pool) == 1 and len(fake.embedding_requests) == 2
    assert metrics.REGISTRY.get_sample_value("dialtone_knowledge_embedding_failures_total") == failed_rounds + 1
    found = await search_passages(pool, organization_id=org, knowledge_base_ids=[kb], query="telescopes", limit=3)
    assert [passage.document_id for passage in found] == [document_id]  # full-text search does not wait for them
    await asyncio.sleep(0.55)
    await worker.run_once()
    await worker.stop()
    assert await pending(pool) == 0 and len(fake.embedding_requests) == 3


async def test_a_passage_the_api_refuses_is_set_aside_and_every_other_passage_is_embedded(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    fake.embedding_refused_marker = "OVERSIZED"
    first, second = await insert_organization(pool), await insert_organization(pool)
    benches = [f"Bench {n} of the Onyx park faces the lake at dawn." for n in range(9)]
    benches[4] = "The Onyx fountain plays OVERSIZED music every hour."
    _, refused_document = await text_document(pool, first, " ".join(benches))
    await ingest(pool, None)  # the oldest passages, ahead of the other organization's
    _, later_document = await text_document(pool, second, "The Opal ferry sails at nine.")
    await ingest(pool, embedder(client, batch_size=3))
    rows = await pool.fetch(
        'SELECT "documentId", "content", "embeddingModel", "embedding" IS NULL AS bare FROM "KnowledgeBaseChunk" '
        'WHERE "documentId" = ANY($1::text[])',
        [refused_document, later_document],
    )
    refused = [row for row in rows if "OVERSIZED" in row["content"]]
    assert refused and all(row["bare"] and row["embeddingModel"] != MODEL.key for row in refused)
    embedded = [row for row in rows if "OVERSIZED" not in row["content"]]
    assert {row["documentId"] for row in embedded} == {refused_document, later_document}
    assert all(row["embeddingModel"] == MODEL.key for row in embedded)
    status, error = await status_of(pool, refused_document)
    assert status == "READY" and error is not None and "maximum context length" in error
    requests = len(fake.embedding_requests)
    await ingest(pool, embedder(client, batch_size=3))  # a refused passage is not sent again
    assert len(fake.embedding_requests) == requests and await pending(pool) == 0


async def test_a_refusal_of_every_passage_is_taken_for_a_setting_and_sets_none_aside(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    fake.embedding_refused_marker = "Quartz"  # in every passage, as a `dimensions` the model refuses would be
    organization = await insert_organization(pool)
    _, document = await text_document(
        pool, organization, " ".join(f"Quartz bench {n} faces the lake." for n in range(6))
    )
    await ingest(pool, embedder(client, batch_size=3))
    models = await pool.fetch('SELECT "embeddingModel" FROM "KnowledgeBaseChunk" WHERE "documentId" = $1', document)
    assert models and all(row["embeddingModel"] is None for row in models), "waiting, none set aside"


def passage(chunk_id: str) -> Passage:
    return Passage(
        chunk_id=chunk_id, document_id="d", document_name="n", knowledge_base_id="k", position=0, content="", rank=0
    )


def test_reciprocal_rank_fusion_favours_passages_high_in_both_rankings() -> None:
    full_text = [passage("a"), passage("b"), passage("c")]
    by_vector = [passage("b"), passage("d"), passage("a")]
    fused = fuse_rankings([full_text, by_vector], limit=3)
    assert [p.chunk_id for p in fused] == ["b", "a", "d"]
    assert fused[0].rank == pytest.approx(1 / 62 + 1 / 61)
    assert [p.chunk_id for p in fuse_rankings([full_text, []], limit=2)] == ["a", "b"]


CARPARK = [
    "Museum fees: adults pay the museum fee at the entrance of the museum.",
    "What are the car park fees? The car park beside the museum charges fees by the hour.",
    "What are the car park hours? The car park opens at eight.",
    "What are the car parking rules at the back?",
    "The gift shop sells postcards.",
]


async def carpark_documents(pool: asyncpg.Pool, org: str) -> tuple[str, list[str]]:
    """A knowledge base with a document per CARPARK text (queued for ingestion): its id and theirs, in order."""
    kb, museum = await text_document(pool, org, CARPARK[0])
    return kb, [museum] + [(await text_document(pool, org, text, kb_id=kb))[1] for text in CARPARK[1:]]


async def test_the_fused_ranking_finds_what_full_text_alone_ranks_lower(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    org = await insert_organization(pool)
    kb, ids = await carpark_documents(pool, org)
    await ingest(pool, with_embedder := embedder(client))
    question = "what are the carpark fees at the museum"
    full_text = await search_passages(pool, organization_id=org, knowledge_base_ids=[kb], query=question, limit=3)
    assert [p.document_id for p in full_text] == [ids[0], ids[1]]  # "carpark" is no word of theirs
    lookup = KnowledgeLookup(pool, organization_id=org, knowledge_base_ids=[kb], limit=3, embedder=with_embedder)
    fused = await lookup.passages(question)
    assert fused[0].document_id == ids[1]  # near the top of both rankings
    assert ids[2] in [p.document_id for p in fused]  # found by vector alone
    assert fake.embedding_requests[-1]["input"] == [question]


async def test_a_question_whose_embedding_is_late_or_fails_is_answered_by_full_text(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    org = await insert_organization(pool)
    kb, _ = await text_document(pool, org, CARPARK[0])
    for text in CARPARK[1:]:
        await text_document(pool, org, text, kb_id=kb)
    await ingest(pool, embedder(client))
    question = "what are the carpark fees at the museum"
    full_text = await search_passages(pool, organization_id=org, knowledge_base_ids=[kb], query=question, limit=3)
    impatient = embedder(client, question_timeout=0.05)
    lookup = KnowledgeLookup(pool, organization_id=org, knowledge_base_ids=[kb], limit=3, embedder=impatient)
    fallbacks = metrics.KNOWLEDGE_VECTOR_FALLBACKS.labels("timeout")
    before = fallbacks._value.get()
    fake.embedding_delay_ms = 500
    assert await lookup.passages(question) == full_text
    assert fallbacks._value.get() == before + 1
    fake.embedding_delay_ms = 0
    errors = metrics.KNOWLEDGE_VECTOR_FALLBACKS.labels("error")
    before_errors = errors._value.get()
    fake.embedding_failures.append(500)
    assert await lookup.passages(question) == full_text
    assert errors._value.get() == before_errors + 1


async def test_vector_search_never_finds_another_organizations_passages(
    pool: asyncpg.Pool, client: AsyncOpenAI
) -> None:
    acme, globex = await insert_organization(pool), await insert_organization(pool)
    acme_kb, acme_doc = await text_document(pool, acme, "The car park of Acme is free for visitors.")
    globex_kb, _ = await text_document(pool, globex, "The carpark of Globex costs a carpark fee.")
    await ingest(pool, with_embedder := embedder(client))
    question = hashed_embedding("carpark fee", MODEL.dimensions)
    both = [acme_kb, globex_kb]
    lookup = KnowledgeLookup(pool, organization_id=acme, knowledge_base_ids=both, embedder=with_embedder)
    assert {p.document_id for p in await lookup.passages("carpark fee")} == {acme_doc}
    async with tenant_transaction(pool, acme) as conn:  # row-level security, even asked for the other's rows
        assert not await nearest_passages(
            conn, organization_id=globex, knowledge_base_ids=[globex_kb], model=MODEL, embedding=question, limit=5
        )


async def assert_full_text_finds_a_new_document(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    kb, document_id = await text_document(pool, org, "The Topaz ferry sails at noon.")
    await ingest(pool, None)
    found = await search_passages(pool, organization_id=org, knowledge_base_ids=[kb], query="ferry", limit=3)
    assert [passage.document_id for passage in found] == [document_id]


async def test_without_pgvector_vector_search_is_off_and_said_so(
    databases: TestDatabases, provider_clients: ProviderClients, caplog: pytest.LogCaptureFixture
) -> None:
    url = await databases.migrated()
    pool = await databases.pool(url)
    try:
        # What migration 0021 leaves on a server without pgvector: no embedding column.
        await pool.execute('ALTER TABLE "KnowledgeBaseChunk" DROP COLUMN "embedding"')
        settings = Settings(openai_api_key="sk-embed", kb_embedding_model="text-embedding-3-small")
        with caplog.at_level(logging.INFO, logger="engine.knowledge.embeddings"):
            assert await embedder_from_settings(settings, provider_clients, pool) is None
        assert "vector search off: the database has no pgvector" in caplog.text
        await assert_full_text_finds_a_new_document(pool)
    finally:
        await pool.close()


def test_embedding_settings_name_what_is_wrong() -> None:
    with pytest.raises(ValidationError, match="DIALTONE_KB_EMBEDDING_DIMENSIONS"):
        Settings(kb_embedding_model="my-own-model")
    with pytest.raises(ValidationError, match="env:<VARIABLE>"):
        Settings(kb_embedding_key_ref="tool:abc")
    chosen = EmbeddingSettings.from_settings(Settings(kb_embedding_model="text-embedding-3-large"))
    assert chosen is not None and chosen.model.key == "text-embedding-3-large/3072" and not chosen.send_dimensions
    assert EmbeddingSettings.from_settings(Settings()) is None


async def test_where_pgvector_cannot_be_created_migrations_and_full_text_search_still_work(
    postgres_server_url: str, databases: TestDatabases
) -> None:
    # A database owned by a role that is no superuser: CREATE EXTENSION vector (not a trusted extension) is refused,
    # as on a managed server without pgvector allowed; migration 0021 must go through without the embedding column.
    role, name = f"dialtone_owner_{secrets.token_hex(3)}", f"dialtone_test_novector_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN CREATEROLE PASSWORD '{role}'")
        await databases.migrated()  # the API role exists: the owner administers it, as migration 0004 needs
        await admin.execute(f"GRANT dialtone_api TO {role} WITH ADMIN OPTION")
        await admin.execute(f'CREATE DATABASE "{name}" OWNER {role}')
        parts = urlsplit(with_database(postgres_server_url, name))
        host = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=f"{role}:{role}@{host}"))
        try:
            conn = await asyncpg.connect(url)
        except (OSError, asyncpg.PostgresError) as exc:
            pytest.skip(f"cannot log in as a new role on this server ({exc})")
        try:
            await migrate(conn)
            assert not await vector_search_available(conn)
        finally:
            await conn.close()
        pool = await create_pool(url, min_size=1, max_size=2)
        try:
            await assert_full_text_finds_a_new_document(pool)
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_a_document_is_deleted_at_once_while_its_passages_are_being_embedded(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    # The batch's passages were locked FOR UPDATE while their request ran: deleting their document (or reingesting
    # it) waited for the embedding API, up to its timeout times its attempts (two minutes by default), holding the
    # knowledge base's lock, so every change to that knowledge base waited too.
    org = await insert_organization(pool)
    kb, document_id = await text_document(pool, org, "The Onyx ferry leaves at noon.")
    await ingest(pool, None)
    fake.embedding_delay_ms = 3000
    requests = len(fake.embedding_requests)
    embedding = asyncio.create_task(embed_pending_passages(pool, embedder(client)))
    for _ in range(200):
        if len(fake.embedding_requests) > requests:
            break
        await asyncio.sleep(0.02)
    assert len(fake.embedding_requests) > requests  # the request is in flight
    await knowledge_bases.delete_document(pool, organization_id=org, knowledge_base_id=kb, document_id=document_id)
    # Had the delete waited for the API's answer, the passage would have been embedded first.
    assert await embedding == 0
    fake.embedding_delay_ms = 0


async def test_two_processes_embedding_at_once_never_embed_the_same_passage(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    org = await insert_organization(pool)
    await text_document(
        pool, org, " ".join(f"Berth {n} of the Topaz marina takes boats of {n} metres." for n in range(24))
    )
    await ingest(pool, None)
    waiting = await pending(pool)
    assert waiting >= 4
    fake.embedding_delay_ms = 200  # both processes' requests overlap
    requests = len(fake.embedding_requests)
    counts = await asyncio.gather(*(embed_pending_passages(pool, embedder(client, batch_size=2)) for _ in range(2)))
    fake.embedding_delay_ms = 0
    sent = [text for request in fake.embedding_requests[requests:] for text in request["input"]]
    assert len(sent) == len(set(sent)) == sum(counts) == waiting
    assert all(counts)  # each process took its share
    assert await pending(pool) == 0


async def test_a_new_document_is_indexed_while_a_slow_embedding_api_works_through_older_passages(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    # The worker embedded every waiting passage before it claimed another document: with a slow or hanging API (or
    # after a change of model, every passage to embed again), new documents stayed PROCESSING until it was done.
    org = await insert_organization(pool)
    kb, older = await text_document(
        pool, org, " ".join(f"Berth {n} of the Zircon marina takes boats of {n} metres." for n in range(40))
    )
    await ingest(pool, None)
    not_embedded = """SELECT count(*) FROM "KnowledgeBaseChunk" WHERE "documentId" = $1 AND "embeddingModel" IS NULL"""
    assert await pool.fetchval(not_embedded, older) >= 8
    fake.embedding_delay_ms = 300
    requests = len(fake.embedding_requests)
    worker = IngestionWorker(pool, quick(), embedder=embedder(client, batch_size=1))
    worker.start()
    try:
        for _ in range(200):
            if len(fake.embedding_requests) > requests:
                break
            await asyncio.sleep(0.02)
        _, document_id = await text_document(pool, org, "The Zircon lighthouse is lit at dusk.", kb_id=kb)
        worker.wake()
        for _ in range(400):
            if (await status_of(pool, document_id))[0] != "PROCESSING":
                break
            await asyncio.sleep(0.05)
        assert await status_of(pool, document_id) == ("READY", None)
        assert await pool.fetchval(not_embedded, older) > 0  # the older passages are still being embedded
    finally:
        await worker.stop()
        fake.embedding_delay_ms = 0


async def test_why_embedding_fails_is_kept_until_vectors_are_made_not_cleared_by_a_round_that_found_none_free(
    pool: asyncpg.Pool, fake: FakeOpenAI
) -> None:
    org = await insert_organization(pool)
    await text_document(pool, org, "The Agate kiosk sells maps.")
    await ingest(pool, None)
    refused = AsyncOpenAI(api_key="sk-revoked", base_url=fake.base_url)
    worker = IngestionWorker(pool, quick(retry_initial=timedelta(0)), embedder=embedder(refused))
    try:
        await worker.run_once()
        assert await embedding_failure(pool, model=MODEL) == (
            "the embedding API refused the engine's key (HTTP 401); vectors resume once the key works"
        )
        fake.api_key = "sk-revoked"  # the provider takes the key again, but another process holds every passage
        async with pool.acquire() as conn, conn.transaction():
            assert await claim_pending(conn, model=MODEL, limit=1000)
            await worker.run_once()
            assert await embedding_failure(pool, model=MODEL) is not None, "nothing was embedded: the passages wait"
        await worker.run_once()
        assert await embedding_failure(pool, model=MODEL) is None and await pending(pool) == 0
    finally:
        fake.api_key = "sk-embed"
        await worker.stop()
        await refused.close()


class Clock:
    """A clock the test moves forward by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_questions_are_not_sent_while_the_key_is_refused_but_one_now_and_then_until_it_works(
    fake: FakeOpenAI,
) -> None:
    refused = AsyncOpenAI(api_key="sk-revoked", base_url=fake.base_url)
    clock = Clock()
    settings = EmbeddingSettings(model=MODEL, send_dimensions=True, question_timeout=2.0)
    questions = OpenAIEmbedder(refused, settings, clock=clock)

    async def asked(text: str) -> bool:
        """Whether the question reached the API (it fails either way while the key is refused)."""
        before = len(fake.embedding_requests)
        with pytest.raises(EmbeddingFailed, match="refused the engine's key"):
            await questions.embed_question(text)
        return len(fake.embedding_requests) > before

    try:
        assert await asked("the first question")  # how the engine learns its key is refused
        assert questions.key_refused == "the embedding API refused the engine's key (HTTP 401)"
        assert not await asked("a second")
        clock.now += KEY_RETRY_INITIAL - 1
        assert not await asked("a third")
        clock.now += 1
        assert await asked("one to learn whether the key works now")
        clock.now += KEY_RETRY_INITIAL  # refused again: the wait doubled
        assert not await asked("too soon")
        clock.now += KEY_RETRY_INITIAL
        assert await asked("one more")
        for _ in range(4):  # however many refusals, never longer apart than KEY_RETRY_MAX
            clock.now += KEY_RETRY_MAX
            assert await asked("and one more")

        fake.api_key = "sk-revoked"  # the provider takes the key again
        assert not await asked("still within the wait")
        clock.now += KEY_RETRY_MAX
        assert await questions.embed_question("the premium plan") == pytest.approx(
            hashed_embedding("the premium plan", MODEL.dimensions), abs=1e-6
        )
        assert questions.key_refused is None
        requests = len(fake.embedding_requests)
        await questions.embed_question("the basic plan")  # every question is sent again
        assert len(fake.embedding_requests) == requests + 1
    finally:
        fake.api_key = "sk-embed"
        await refused.close()


async def test_a_key_refused_to_the_passages_stops_the_questions_and_a_question_it_takes_wakes_the_passages(
    pool: asyncpg.Pool, fake: FakeOpenAI
) -> None:
    org = await insert_organization(pool)
    await text_document(pool, org, "The Peridot ferry sails at dawn.")
    await ingest(pool, None)
    refused = AsyncOpenAI(api_key="sk-revoked", base_url=fake.base_url)
    clock = Clock()
    shared = OpenAIEmbedder(refused, EmbeddingSettings(model=MODEL, send_dimensions=True), clock=clock)
    # The worker would try its passages again only in an hour: only the question that gets through can wake it.
    worker = IngestionWorker(pool, quick(retry_initial=timedelta(hours=1)), embedder=shared)
    worker.start()
    try:
        for _ in range(400):
            if shared.key_refused is not None:
                break
            await asyncio.sleep(0.05)
        assert shared.key_refused is not None, "the worker's round was never refused"
        requests = len(fake.embedding_requests)
        with pytest.raises(EmbeddingFailed):
            await shared.embed_question("when does the ferry sail")
        assert len(fake.embedding_requests) == requests  # the worker's refusal was enough to know

        fake.api_key = "sk-revoked"
        clock.now += KEY_RETRY_INITIAL
        await shared.embed_question("when does the ferry sail")
        for _ in range(400):
            if not await pending(pool):
                break
            await asyncio.sleep(0.05)
        assert await pending(pool) == 0
        assert await embedding_failure(pool, model=MODEL) is None
    finally:
        fake.api_key = "sk-embed"
        await worker.stop()
        await refused.close()


async def test_a_key_without_quota_is_taken_as_refused_not_as_a_passing_rate_limit(
    pool: asyncpg.Pool, fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    # OpenAI answers a key whose account has no quota left with 429 insufficient_quota, on every request until the
    # billing is fixed: it was retried like a rate limit, and every caller's question was still sent.
    org = await insert_organization(pool)
    await text_document(pool, org, "The Jasper quay is open all night.")
    await ingest(pool, None)
    clock = Clock()
    shared = OpenAIEmbedder(client, EmbeddingSettings(model=MODEL, send_dimensions=True), clock=clock)
    worker = IngestionWorker(pool, quick(retry_initial=timedelta(hours=1)), embedder=shared)
    fake.embedding_quota_exhausted = True
    try:
        await worker.run_once()
        assert len(fake.embedding_requests) == 1  # not retried: a few seconds later it has no quota either
        reason = await embedding_failure(pool, model=MODEL)
        assert reason is not None and "quota" in reason and "HTTP 429" in reason
        assert shared.key_refused is not None
        with pytest.raises(EmbeddingFailed, match="quota"):
            await shared.embed_question("is the quay open at night")
        assert len(fake.embedding_requests) == 1  # no question sent meanwhile
    finally:
        fake.embedding_quota_exhausted = False
        await worker.stop()
