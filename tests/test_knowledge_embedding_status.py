"""Through the real server: a knowledge base whose passages cannot be embedded says so, and why, where its owner
looks (its documents and the knowledge base itself), and says no more once their vectors are made.

The engine embeds with its operator's key (OPENAI_API_KEY here) against the fake OpenAI server, which accepts only
the key it was made with: until it is told to accept the engine's, every embedding request is answered 401.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.server import metrics
from tests.engine_server import running_engine
from tests.fakes.openai_chat import FakeOpenAI
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_knowledge_api import new_kb, search, settled

ENGINE_KEY = "sk-engine"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key="sk-some-other-key") as server:
        yield server


@asynccontextmanager
async def engine_api(db_url: str, fake: FakeOpenAI, *, key: str | None = ENGINE_KEY) -> AsyncIterator[Api]:
    """An engine embedding with `key` (None: no key, so vector search is off) through `fake`, and a client of it."""
    async with (
        running_engine(
            db_url,
            openai_api_key=key,
            openai_base_url=fake.base_url,
            kb_embedding_model="text-embedding-3-small",
            kb_embedding_dimensions=256,
            kb_ingest_poll_interval=0.05,
        ) as base,
        aiohttp.ClientSession() as session,
    ):
        yield Api(session, base)


@pytest.fixture
async def api(db_url: str, fake: FakeOpenAI) -> AsyncIterator[Api]:
    async with engine_api(db_url, fake) as api:
        yield api


@pytest.fixture
async def acme(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Acme")


async def vectors_of(api: Api, tenant: Tenant, path: str, status: str) -> dict[str, Any]:
    """The `vectors` of the resource at `path` once their status is `status` (within 30 s)."""
    body: Any = None
    for _ in range(600):
        code, body = await api.call("GET", path, tenant.owner_key)
        assert code == 200, body
        if (body.get("vectors") or {}).get("status") == status:
            return body["vectors"]  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path}: vectors never {status}: {body}")


async def text_document(api: Api, tenant: Tenant, kb_id: str, content: str) -> str:
    """Add a TEXT document and wait until it is READY; its id."""
    status, document = await api.call(
        "POST",
        f"/knowledge-bases/{kb_id}/documents",
        tenant.owner_key,
        json={"name": "Hours", "type": "TEXT", "content": content},
    )
    assert status == 201, document
    assert (await settled(api, tenant, kb_id, document["id"]))["status"] == "READY"
    return document["id"]  # type: ignore[no-any-return]


async def test_a_refused_key_is_shown_on_the_documents_and_cleared_once_the_key_works(
    api: Api, fake: FakeOpenAI, pool: asyncpg.Pool, acme: Tenant
) -> None:
    kb = await new_kb(api, acme)
    document_id = await text_document(api, acme, kb["id"], "The Larimar gallery opens at ten on Sundays.")
    document_path = f"/knowledge-bases/{kb['id']}/documents/{document_id}"

    waiting = await vectors_of(api, acme, document_path, "WAITING")
    assert waiting["waitingPassages"] == 1
    assert "refused the engine's key (HTTP 401)" in waiting["reason"]
    assert ENGINE_KEY not in waiting["reason"]
    assert await vectors_of(api, acme, f"/knowledge-bases/{kb['id']}", "WAITING") == waiting
    code, listed = await api.call("GET", f"/knowledge-bases/{kb['id']}/documents", acme.owner_key)
    assert code == 200 and listed["data"][0]["vectors"] == waiting
    # Meanwhile the knowledge base is searched by full-text: the question's embedding is refused too.
    fallbacks = metrics.KNOWLEDGE_VECTOR_FALLBACKS.labels("error")
    before = fallbacks._value.get()
    assert [p["documentId"] for p in await search(api, acme, kb["id"], "larimar+gallery")] == [document_id]
    assert fallbacks._value.get() == before + 1

    fake.api_key = ENGINE_KEY  # the provider takes the key again: nothing to upload again
    ready = await vectors_of(api, acme, document_path, "READY")
    assert ready == {"status": "READY", "waitingPassages": 0, "reason": None}
    assert await vectors_of(api, acme, f"/knowledge-bases/{kb['id']}", "READY") == ready
    embedded = await pool.fetchval(
        'SELECT "embeddingModel" FROM "KnowledgeBaseChunk" WHERE "documentId" = $1', document_id
    )
    assert embedded == "text-embedding-3-small/256"


async def test_an_engine_restarted_with_a_working_key_embeds_what_waited(
    db_url: str, fake: FakeOpenAI, acme: Tenant
) -> None:
    async with engine_api(db_url, fake) as api:
        kb = await new_kb(api, acme)
        document_id = await text_document(api, acme, kb["id"], "The Howlite pier is closed in storms.")
        document_path = f"/knowledge-bases/{kb['id']}/documents/{document_id}"
        await vectors_of(api, acme, document_path, "WAITING")
    async with engine_api(db_url, fake, key=fake.api_key) as api:
        assert (await vectors_of(api, acme, document_path, "READY"))["reason"] is None


async def test_without_a_key_vector_search_is_off_and_documents_claim_no_vectors(
    db_url: str, fake: FakeOpenAI, acme: Tenant
) -> None:
    async with engine_api(db_url, fake, key=None) as api:
        kb = await new_kb(api, acme)
        document_id = await text_document(api, acme, kb["id"], "The Jet harbour charges ten dollars a night.")
        code, document = await api.call("GET", f"/knowledge-bases/{kb['id']}/documents/{document_id}", acme.owner_key)
        assert code == 200 and document["vectors"] is None
        code, body = await api.call("GET", f"/knowledge-bases/{kb['id']}", acme.owner_key)
        assert code == 200 and body["vectors"] is None
        assert [p["documentId"] for p in await search(api, acme, kb["id"], "jet+harbour")] == [document_id]
    assert not fake.embedding_requests


async def test_a_setting_the_api_refuses_for_every_passage_is_shown_as_the_reason_they_wait(
    db_url: str, fake: FakeOpenAI, pool: asyncpg.Pool, acme: Tenant
) -> None:
    fake.api_key = ENGINE_KEY
    async with engine_api(db_url, fake) as api:
        for _ in range(600):  # what earlier tests left waiting is embedded: the refused passage is on its own
            if not await pool.fetchval('SELECT count(*) FROM "KnowledgeBaseChunk" WHERE "embeddingModel" IS NULL'):
                break
            await asyncio.sleep(0.05)
        fake.embedding_refused_marker = "Amber"  # as a `dimensions` the model refuses would refuse every passage
        kb = await new_kb(api, acme)
        document_id = await text_document(api, acme, kb["id"], "The Amber hall seats two hundred.")
        waiting = await vectors_of(api, acme, f"/knowledge-bases/{kb['id']}/documents/{document_id}", "WAITING")
        assert waiting["reason"].startswith("the embedding API refused every passage of a batch")


@asynccontextmanager
async def passages_held(pool: asyncpg.Pool, document_id: str) -> AsyncIterator[None]:
    """Hold the document's passages as an embedding round of another engine does while its request runs (the
    advisory locks of storage.knowledge_embeddings.claim_pending), so no engine under test claims them."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """SELECT pg_advisory_xact_lock(hashtext('dialtone.embedding:' || "id"))
               FROM "KnowledgeBaseChunk" WHERE "documentId" = $1""",
            document_id,
        )
        yield


async def test_why_vectors_wait_is_told_by_a_process_that_has_not_failed_a_round_itself(
    db_url: str, fake: FakeOpenAI, pool: asyncpg.Pool, acme: Tenant
) -> None:
    async with engine_api(db_url, fake) as api:
        kb = await new_kb(api, acme)
        document_id = await text_document(api, acme, kb["id"], "The Obsidian ferry leaves at noon.")
        document_path = f"/knowledge-bases/{kb['id']}/documents/{document_id}"
        waiting = await vectors_of(api, acme, document_path, "WAITING")
    # A restarted engine, or another node, whose rounds find the passages held by another node's: the reason is
    # the one the failing round recorded, not EMBEDDING as if all were well.
    async with passages_held(pool, document_id), engine_api(db_url, fake) as api:
        code, document = await api.call("GET", document_path, acme.owner_key)
        assert code == 200 and document["vectors"] == waiting
        code, body = await api.call("GET", f"/knowledge-bases/{kb['id']}", acme.owner_key)
        assert code == 200 and body["vectors"] == waiting
