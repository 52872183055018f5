"""Passage embedding of a `dialtone serve` killed mid-batch: the embedding API has the batch (its tokens are spent), the
engine has not stored the vectors. The fake OpenAI holds its answer; the process is SIGKILLed while it waits, and a
new process on the same database embeds what is left: the killed batch again (its passages' claim ended with the dead
process's transaction), every other passage once.
"""

from __future__ import annotations

import math
from pathlib import Path

import asyncpg

from tests.fakes.openai_chat import FakeOpenAI
from tests.test_drain_processes import engine
from tests.test_knowledge_ingestion import text_document
from tests.test_knowledge_vectors import MODEL, pending
from tests.test_outbound_post_call import OPENAI_KEY, openai
from tests.test_repo_agents import insert_organization
from tests.test_webhook_delivery import eventually
from tests.test_webhook_fairness import fresh

__all__ = ["fresh", "openai"]  # fixtures: a database per test, the fake OpenAI

BATCH = 3


async def test_a_batch_whose_engine_was_killed_before_storing_its_vectors_is_embedded_again_and_no_other(
    openai: FakeOpenAI, fresh: tuple[str, asyncpg.Pool], tmp_path: Path
) -> None:
    database_url, pool = fresh
    environment = {
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": openai.base_url,
        "DIALTONE_KB_EMBEDDING_MODEL": MODEL.name,
        "DIALTONE_KB_EMBEDDING_DIMENSIONS": str(MODEL.dimensions),
        "DIALTONE_KB_EMBEDDING_BATCH_SIZE": str(BATCH),
        "DIALTONE_KB_CHUNK_CHARS": "200",
        "DIALTONE_KB_CHUNK_OVERLAP": "40",
        "DIALTONE_KB_INGEST_POLL_INTERVAL": "0.2",
    }
    organization_id = await insert_organization(pool)
    sentences = " ".join(f"Locker {n} of the Basalt gym is opened with code {n * 7}." for n in range(12))
    _, document_id = await text_document(pool, organization_id, sentences)
    openai.embedding_delay_ms = 3_600_000  # the API has the batch; its vectors never come
    async with engine(database_url, tmp_path, drain_seconds=1, **environment) as doomed:

        async def asked() -> bool:
            return bool(openai.embedding_requests)

        await eventually(asked, "the engine to send a batch to the embedding API")
        doomed.process.kill()  # SIGKILL
        await doomed.process.wait()
    openai.embedding_delay_ms = 0
    passages = await pool.fetchval('SELECT count(*) FROM "KnowledgeBaseChunk" WHERE "documentId" = $1', document_id)
    assert passages > BATCH and await pending(pool) == passages  # indexed, and nothing embedded yet

    async with engine(database_url, tmp_path, drain_seconds=1, **environment):

        async def embedded() -> bool:
            return await pending(pool) == 0

        await eventually(embedded, "the next engine to embed every passage")
    killed, *rest = openai.embedding_requests
    assert len(rest) == math.ceil(passages / BATCH)
    assert killed["input"] == rest[0]["input"]  # the killed batch, sent again
    assert sorted(text for request in rest for text in request["input"]) == sorted(
        await pool.fetchval(
            'SELECT array_agg("content") FROM "KnowledgeBaseChunk" WHERE "documentId" = $1', document_id
        )
    )
