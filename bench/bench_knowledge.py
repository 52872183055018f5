"""Knowledge retrieval during calls: search latency with 100 documents of ~10 pages across 10 knowledge bases,
at 100 concurrent calls each asking a question every turn.

On an embedded PostgreSQL (or DATABASE_URL), makes 10 knowledge bases of 10 TEXT documents, each about ten
pages (~30,000 characters) of generated prose with one price fact per page, and ingests them through the real
ingestion worker (chunking, tsvectors). Then runs 100 simulated calls at once, each with its agent's
KnowledgeLookup (the object calls use, under row-level security, through a pool the engine's size), asking one
question per turn with a turn gap, and a burst with no gap at all. Prints ingestion time and the p50/p95/p99 of
one search; the search is awaited on the turn's path, so it adds its own latency to voice-to-voice latency
for a turn that searches. With --vectors, passages are also embedded (by the fake OpenAI server's deterministic
embeddings, served on loopback by a child process, as OpenAI's servers would be elsewhere) and each search fuses
full-text and vector rankings, as calls do when DIALTONE_KB_EMBEDDING_MODEL is set. Prints the machine's load
average before and after. Asserts nothing.

Usage: python -m bench.bench_knowledge [--turns N] [--vectors]   (default: 8 turns per call, full-text alone)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from config.settings import Settings
from engine.knowledge.embeddings import EmbeddingSettings, OpenAIEmbedder
from engine.knowledge.ingestion import IngestionSettings, IngestionWorker
from engine.knowledge.lookup import KnowledgeLookup
from pipelines.clients import ProviderClients
from pipelines.knowledge import KnowledgeUnavailable
from storage import Pool, knowledge_bases
from storage.embedded import start_embedded
from storage.enums import DocumentType
from storage.knowledge_embeddings import EmbeddingModel
from storage.migrate import migrate
from storage.organizations import create_organization
from storage.pool import create_pool, ensure_database

REPO = str(Path(__file__).resolve().parent.parent)
KNOWLEDGE_BASES = 10
DOCUMENTS_PER_KB = 10
PAGES_PER_DOCUMENT = 10
PAGE_CHARS = 3000
CALLS = 100
TURN_GAP_S = (0.6, 1.4)
_COMMON = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "our",
    "your",
    "we",
    "you",
    "this",
    "that",
    "are",
    "be",
    "from",
    "at",
    "it",
    "can",
    "will",
    "each",
    "all",
    "customer",
    "service",
    "plan",
    "price",
    "support",
    "team",
    "office",
    "order",
    "delivery",
    "account",
    "month",
    "year",
    "week",
    "day",
    "hour",
    "policy",
    "product",
    "offer",
    "help",
    "call",
    "online",
    "store",
    "return",
    "refund",
    "warranty",
    "contract",
    "payment",
    "invoice",
    "discount",
    "member",
]


# The fake OpenAI server in a child process: its embeddings cost CPU that OpenAI's servers, not the engine, spend.
_FAKE_OPENAI = """
import asyncio
from tests.fakes.openai_chat import FakeOpenAI

async def main() -> None:
    async with FakeOpenAI(api_key="sk-bench") as fake:
        print(fake.base_url, flush=True)
        await asyncio.get_running_loop().create_future()

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def _fake_openai() -> AsyncIterator[str]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FAKE_OPENAI, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        yield (await child.stdout.readline()).decode().strip()
    finally:
        child.terminate()
        await child.wait()


def _words(rng: random.Random, count: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "tor", "va", "shi", "dun", "pel", "qua", "zor", "bri", "nex", "ul"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(count)]


def _document(rng: random.Random, vocabulary: list[str], names: list[str], facts: Sequence[str]) -> str:
    pages = []
    for page in range(PAGES_PER_DOCUMENT):
        sentences: list[str] = []
        length = 0
        while length < PAGE_CHARS:
            words = [rng.choice(_COMMON if rng.random() < 0.6 else vocabulary) for _ in range(rng.randint(8, 18))]
            sentence = " ".join(words).capitalize() + "."
            sentences.append(sentence)
            length += len(sentence) + 1
        name = names[page]
        sentences.insert(rng.randrange(len(sentences)), f"The {name} plan costs {rng.randint(5, 500)} dollars a month.")
        for fact in facts:
            sentences.insert(rng.randrange(len(sentences)), fact)
        pages.append(" ".join(sentences))
    return "\n\n".join(pages)


async def _database(tmp: Path) -> str:
    given = os.environ.get("DATABASE_URL")
    if given:
        url = given
    else:
        server = await asyncio.to_thread(start_embedded, tmp / "db")
        await ensure_database(server.url(), "bench_knowledge")
        url = server.url("bench_knowledge")
    pool = await create_pool(url, max_size=2)
    async with pool.acquire() as conn:
        await migrate(conn)
    await pool.close()
    return url


async def seed_knowledge_bases(
    pool: Pool, organization_id: str, rng: random.Random, *, facts: Sequence[str] = ()
) -> tuple[list[str], list[list[str]]]:
    """The benchmark's 10 knowledge bases of 10 documents of ~10 pages for the organization, queued for ingestion.

    Each page names one priced plan and holds each of `facts` (sentences callers may ask about) somewhere.
    Returns the knowledge bases' ids and, for each, the plan names its pages hold.
    """
    vocabulary = _words(rng, 3000)
    kb_ids: list[str] = []
    names_by_kb: list[list[str]] = []
    for k in range(KNOWLEDGE_BASES):
        kb = await knowledge_bases.create_knowledge_base(pool, organization_id=organization_id, name=f"KB {k}")
        kb_ids.append(kb.id)
        names: list[str] = []
        for d in range(DOCUMENTS_PER_KB):
            page_names = [
                f"{vocabulary[(k * 100 + d * 10 + p) % len(vocabulary)]}x{k}{d}{p}" for p in range(PAGES_PER_DOCUMENT)
            ]
            names += page_names
            await knowledge_bases.add_document(
                pool, organization_id=organization_id, knowledge_base_id=kb.id, name=f"doc {k}.{d}",
                type=DocumentType.TEXT, content=_document(rng, vocabulary, page_names, facts),
            )  # fmt: skip
        names_by_kb.append(names)
    return kb_ids, names_by_kb


async def ingest(pool: Pool, settings: Settings, embedder: OpenAIEmbedder | None = None) -> float:
    """Ingest (and embed, with `embedder`) every queued document through the real worker; the seconds it took."""
    worker = IngestionWorker(pool, IngestionSettings.from_settings(settings), embedder=embedder)
    began = time.perf_counter()
    try:
        while await worker.run_once():
            pass
    finally:
        await worker.stop()
    elapsed = time.perf_counter() - began
    await pool.execute('ANALYZE "KnowledgeBaseChunk", "KnowledgeBaseTerm"')  # as autovacuum soon would
    return elapsed


async def _call(
    lookup: KnowledgeLookup, names: list[str], turns: int, rng: random.Random, gap: tuple[float, float] | None
) -> tuple[list[float], int]:
    latencies: list[float] = []
    answered = 0
    for _ in range(turns):
        if gap is not None:
            await asyncio.sleep(rng.uniform(*gap))
        name = rng.choice(names)
        began = time.perf_counter()
        try:
            passages = await lookup.passages(f"how much does the {name} plan cost per month")
        except KnowledgeUnavailable:  # too slow or no connection: unanswered, its time counted all the same
            passages = []
        latencies.append((time.perf_counter() - began) * 1000)
        answered += bool(passages) and name in passages[0].content
    return latencies, answered


def _report(label: str, latencies: list[float], answered: int, elapsed: float) -> None:
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    print(
        f"{label}: {len(ordered)} searches in {elapsed:.1f} s ({len(ordered) / elapsed:.0f}/s); "
        f"ms p50 {pct(50):.1f}  p95 {pct(95):.1f}  p99 {pct(99):.1f}  max {ordered[-1]:.1f}  "
        f"mean {statistics.fmean(ordered):.1f}; right passage first {answered / len(ordered):.0%}"
    )


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


async def main(turns: int, vectors: bool) -> None:
    rng = random.Random(7)
    settings = Settings()
    print(f"before: {_load()}")
    async with contextlib.AsyncExitStack() as stack:
        embedder = None
        if vectors:
            base_url = await stack.enter_async_context(_fake_openai())
            clients = ProviderClients()  # the engine's shared SDK clients, as calls use them
            stack.push_async_callback(clients.aclose)
            client = clients.openai("sk-bench", base_url)
            chosen = EmbeddingSettings(model=EmbeddingModel("text-embedding-3-small", 1536))
            embedder = OpenAIEmbedder(client, chosen)
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-knowledge-"))
        url = await _database(Path(tmp))
        pool = await create_pool(url, max_size=settings.db_pool_max)
        stack.push_async_callback(pool.close)
        slug = f"bench-kb-{rng.randrange(10**9)}"
        org = (await create_organization(pool, name="Bench KB", slug=slug, credits=0)).id
        kb_ids, names_by_kb = await seed_knowledge_bases(pool, org, rng)
        ingest_s = await ingest(pool, settings, embedder)
        chunks = await pool.fetchval('SELECT count(*) FROM "KnowledgeBaseChunk" WHERE "organizationId" = $1', org)
        print(
            f"ingested {KNOWLEDGE_BASES * DOCUMENTS_PER_KB} documents ({PAGES_PER_DOCUMENT} pages of ~{PAGE_CHARS} "
            f"chars each) into {chunks} passages in {ingest_s:.1f} s"
            + (f", embedded by {embedder.model.key} (fake, loopback)" if embedder else "")
        )
        search = "full-text + vector (RRF)" if embedder else "full-text alone"
        for label, gap in (("turns every ~1 s", TURN_GAP_S), ("burst, no gap", None)):
            lookups = [
                KnowledgeLookup(
                    pool, organization_id=org, knowledge_base_ids=[kb_ids[c % KNOWLEDGE_BASES]], embedder=embedder
                )
                for c in range(CALLS)
            ]
            began = time.perf_counter()
            results = await asyncio.gather(
                *(
                    _call(lookup, names_by_kb[c % KNOWLEDGE_BASES], turns, random.Random(c), gap)
                    for c, lookup in enumerate(lookups)
                )
            )
            elapsed = time.perf_counter() - began
            _report(
                f"{search}, {CALLS} calls, {label} (pool of {settings.db_pool_max})",
                [ms for latencies, _ in results for ms in latencies],
                sum(answered for _, answered in results),
                elapsed,
            )
    print(f"after: {_load()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--turns", type=int, default=8, help="questions per call (default 8)")
    parser.add_argument("--vectors", action="store_true", help="embed passages and questions (fake OpenAI)")
    args = parser.parse_args()
    asyncio.run(main(args.turns, args.vectors))
