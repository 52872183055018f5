"""Ingestion as durable work, the call-time lookup, and the pieces they are made of, on real PostgreSQL.

A process that dies holding a document (a real child process, killed) loses nothing: its lease ends and another
worker finishes the document. Failures that may pass are retried; the rest end in ERROR with the reason.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web

from engine.knowledge.chunking import split_into_chunks
from engine.knowledge.crawl import CrawlLimits
from engine.knowledge.extract import extract_text, sniff_mime_type
from engine.knowledge.extract_process import IN_THREAD_MAX, ExtractLimits
from engine.knowledge.ingestion import IngestionSettings, IngestionWorker
from engine.knowledge.lookup import KnowledgeLookup
from engine.knowledge.unreadable import UnreadableDocument
from pipelines.knowledge import (
    NO_PASSAGES,
    SEARCH_UNAVAILABLE,
    KnowledgeFunction,
    KnowledgeUnavailable,
    PassageAnswerer,
    answer_from_passage,
)
from pipelines.llm.base import ConversationTurn, TextDelta
from pipelines.llm.conversation_path import ConversationPathLLM
from storage import knowledge_bases, knowledge_ingestion
from storage.enums import DocumentType
from storage.knowledge_search import search_passages
from storage.pool import create_pool
from tests.fakes.server import serve
from tests.test_repo_agents import insert_organization

REPO = str(Path(__file__).resolve().parent.parent)

# A child process that claims every due document for `lease` seconds, says which, then dies mid-ingestion.
_DIES_HOLDING = """
import asyncio, os, sys
from datetime import timedelta
import asyncpg
from storage import knowledge_ingestion

async def main() -> None:
    pool = await asyncpg.create_pool(sys.argv[1], min_size=1, max_size=1)
    claimed = await knowledge_ingestion.claim_due(pool, limit=10, lease=timedelta(seconds=float(sys.argv[2])))
    print(" ".join(claim.document_id for claim in claimed), flush=True)
    os._exit(9)

asyncio.run(main())
"""


def quick(**overrides: object) -> IngestionSettings:
    settings = {"chunk_chars": 200, "chunk_overlap": 40, "retry_initial": timedelta(milliseconds=50)}
    return IngestionSettings(**{**settings, **overrides})  # type: ignore[arg-type]


async def text_document(pool: asyncpg.Pool, org: str, content: str, *, kb_id: str | None = None) -> tuple[str, str]:
    if kb_id is None:
        kb_id = (await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="KB")).id
    document = await knowledge_bases.add_document(
        pool, organization_id=org, knowledge_base_id=kb_id, name="note", type=DocumentType.TEXT, content=content
    )
    return kb_id, document.id


async def status_of(pool: asyncpg.Pool, document_id: str) -> tuple[str, str | None]:
    row = await pool.fetchrow('SELECT "status", "error" FROM "KnowledgeBaseDocument" WHERE "id" = $1', document_id)
    assert row is not None
    return row["status"], row["error"]


@dataclass
class HeldPage:
    """A page that says `text` as it is when asked, but answers only once `release` is set; `fetched` once asked."""

    text: str
    fetched: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def held_page(text: str) -> AsyncIterator[tuple[str, HeldPage]]:
    """A site on loopback whose one page, `/`, is a HeldPage; its base URL and the page."""
    page = HeldPage(text)

    async def answer(request: web.Request) -> web.Response:
        body = f"<html><body><p>{page.text}</p></body></html>"
        page.fetched.set()
        await page.release.wait()
        return web.Response(text=body, content_type="text/html")

    site = web.Application()
    site.router.add_get("/", answer)
    async with serve(site) as base:
        yield base, page


async def test_a_process_that_dies_mid_ingestion_loses_nothing(pool: asyncpg.Pool, db_url: str) -> None:
    org = await insert_organization(pool)
    _, document_id = await text_document(pool, org, "The Carnelian ferry leaves at noon.")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DIES_HOLDING, db_url, "0.5", cwd=REPO, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    out, _ = await child.communicate()
    assert child.returncode == 9
    assert document_id in out.decode().split()
    worker = IngestionWorker(pool, quick())
    assert await status_of(pool, document_id) == ("PROCESSING", None)
    # Until the dead process's lease ends, nobody else takes the document; then another worker finishes it.
    for _ in range(100):
        if await worker.run_once():
            break
        await asyncio.sleep(0.05)
    assert await status_of(pool, document_id) == ("READY", None)
    assert (
        await pool.fetchval('SELECT count(*) FROM "KnowledgeBaseIngestion" WHERE "documentId" = $1', document_id) == 0
    )
    await worker.stop()


async def test_a_late_worker_cannot_overwrite_the_one_that_took_over(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    _, document_id = await text_document(pool, org, "The Agate bridge is closed on Sundays.")
    late = await knowledge_ingestion.claim_due(pool, limit=50, lease=timedelta(milliseconds=1))
    late_claim = next(c for c in late if c.document_id == document_id)
    await asyncio.sleep(0.01)
    worker = IngestionWorker(pool, quick(concurrency=50))
    await worker.run_once()
    assert await status_of(pool, document_id) == ("READY", None)
    assert not await knowledge_ingestion.record_ready(pool, late_claim, chunks=["stale"])
    assert not await knowledge_ingestion.record_error(pool, late_claim, error="stale", retry_in=None)
    contents = await pool.fetch('SELECT "content" FROM "KnowledgeBaseChunk" WHERE "documentId" = $1', document_id)
    assert [row["content"] for row in contents] == ["The Agate bridge is closed on Sundays."]
    await worker.stop()


async def test_a_site_that_cannot_be_reached_is_retried_then_marked_error(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    kb = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="Down")
    document = await knowledge_bases.add_document(
        pool, organization_id=org, knowledge_base_id=kb.id, name="down", type=DocumentType.WEBSITE,
        url="http://127.0.0.1:9/",  # the discard port: nothing listens
    )  # fmt: skip
    worker = IngestionWorker(pool, quick(max_attempts=2, crawl=CrawlLimits(allow_private=True, timeout=2.0)))
    worker.start()
    try:
        for _ in range(200):
            if (await status_of(pool, document.id))[0] != "PROCESSING":
                break
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    status, error = await status_of(pool, document.id)
    assert status == "ERROR" and error is not None and "could not be fetched" in error
    attempts = await pool.fetchval('SELECT count(*) FROM "KnowledgeBaseIngestion" WHERE "documentId" = $1', document.id)
    assert attempts == 0  # off the queue once given up


async def test_a_private_address_is_refused_unless_allowed(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    kb = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="Private")
    document = await knowledge_bases.add_document(
        pool, organization_id=org, knowledge_base_id=kb.id, name="lan", type=DocumentType.WEBSITE,
        url="http://127.0.0.1:9/admin",
    )  # fmt: skip
    worker = IngestionWorker(pool, quick(concurrency=50))
    await worker.run_once()
    await worker.stop()
    status, error = await status_of(pool, document.id)
    assert status == "ERROR" and error is not None and "127.0.0.1" in error


async def test_a_search_the_database_cannot_serve_in_time_is_unavailable_and_the_next_one_works(
    pool: asyncpg.Pool, db_url: str
) -> None:
    org = await insert_organization(pool)
    kb, document = await text_document(pool, org, "The Onyx vault code changes every Monday.")
    worker = IngestionWorker(pool, quick(concurrency=50))
    await worker.run_once()
    await worker.stop()
    busy = await create_pool(db_url, min_size=1, max_size=1)
    try:
        lookup = KnowledgeLookup(busy, organization_id=org, knowledge_base_ids=[kb], timeout_s=0.3)
        async with busy.acquire():  # every connection of the pool is taken: the search cannot get one
            with pytest.raises(KnowledgeUnavailable, match=r"the search took over 0\.3 s"):
                await asyncio.wait_for(lookup.passages("onyx vault"), 10)
            # The model is told the search could not be made, not that nothing matched; the offline answerer and a
            # path's knowledge node go on as with no passage.
            assert await asyncio.wait_for(KnowledgeFunction(lookup).run({"query": "onyx vault"}), 10) == (
                SEARCH_UNAVAILABLE
            )
            assert await asyncio.wait_for(PassageAnswerer(lookup)("where is the onyx vault"), 10) is None
        assert [p.document_id for p in await lookup.passages("onyx vault")] == [document]
    finally:
        await busy.close()


async def test_the_call_lookup_searches_only_its_organization_under_rls(pool: asyncpg.Pool) -> None:
    acme, globex = await insert_organization(pool), await insert_organization(pool)
    acme_kb, acme_doc = await text_document(pool, acme, "The Onyx vault code changes every Monday.")
    globex_kb, _ = await text_document(pool, globex, "The Onyx lounge is on the roof.")
    worker = IngestionWorker(pool, quick(concurrency=50))
    await worker.run_once()
    await worker.stop()
    lookup = KnowledgeLookup(pool, organization_id=acme, knowledge_base_ids=[acme_kb, globex_kb])
    passages = await lookup.passages("where is the onyx vault")
    assert [p.document_id for p in passages] == [acme_doc]  # globex's knowledge base id alone gives nothing
    assert await lookup.search("onyx") == ["The Onyx vault code changes every Monday."]
    assert [r.query for r in lookup.retrievals] == ["where is the onyx vault", "onyx"]
    assert lookup.retrievals[0].passages[0].chunk_id == passages[0].chunk_id
    stranger = KnowledgeLookup(pool, organization_id=globex, knowledge_base_ids=[acme_kb])
    assert await stranger.search("onyx vault") == []
    assert (
        await search_passages(pool, organization_id=globex, knowledge_base_ids=[acme_kb], query="onyx", limit=5) == []
    )
    function = KnowledgeFunction(lookup)
    assert "Monday" in await function.run({"query": "onyx vault code"})
    assert await function.run({"query": "zebra"}) == NO_PASSAGES
    assert (await function.run({})).startswith("error:")


async def test_passages_are_ranked_by_how_much_of_the_question_they_hold(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    kb, _ = await text_document(pool, org, "Tickets for the museum cost ten dollars.")
    await text_document(
        pool,
        org,
        "The museum opens at nine. The museum shop sells tickets for the museum bus, which cost three dollars.",
        kb_id=kb,
    )
    await text_document(pool, org, "The park is free.", kb_id=kb)
    worker = IngestionWorker(pool, quick(concurrency=50))
    await worker.run_once()
    await worker.stop()
    found = await search_passages(
        pool, organization_id=org, knowledge_base_ids=[kb], query="How much do museum tickets cost?", limit=5
    )
    assert len(found) == 2 and found[0].rank >= found[1].rank
    assert all("museum" in passage.content for passage in found)


def test_chunks_hold_whole_sentences_within_size_and_overlap() -> None:
    text = " ".join(f"Sentence {n} says something." for n in range(60))
    chunks = split_into_chunks(text, size=120, overlap=40)
    assert all(len(chunk) <= 120 for chunk in chunks)
    assert all(chunk.endswith(".") for chunk in chunks)
    for before, after in itertools.pairwise(chunks):
        assert after.split(". ")[0] + "." in before  # each starts with the previous one's last sentence
    assert " ".join(dict.fromkeys(" ".join(chunks).split(". "))).count("Sentence 59") == 1
    assert split_into_chunks("x" * 250, size=100, overlap=10) == ["x" * 100, "x" * 100, "x" * 50]
    assert split_into_chunks("  \n\n ", size=100, overlap=10) == []
    with pytest.raises(ValueError, match="overlap"):
        split_into_chunks("text", size=100, overlap=100)


def test_a_sentence_longer_than_the_size_is_cut_at_spaces_losing_no_word() -> None:
    words = [f"w{n}" + "x" * (n % 7) for n in range(3000)]
    chunks = split_into_chunks(" ".join(words), size=100, overlap=20)
    assert all(50 < len(chunk) <= 100 for chunk in chunks[:-1])  # at the last space past half the size
    assert " ".join(chunks).split() == words
    assert split_into_chunks("a" * 60 + " \u00a0\u00a0" + "b" * 60, size=100, overlap=10) == ["a" * 60, "b" * 60]


def test_unsupported_and_empty_files_are_named() -> None:
    with pytest.raises(UnreadableDocument, match="image/png"):
        sniff_mime_type(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    with pytest.raises(UnreadableDocument, match="UTF-8"):
        sniff_mime_type(b"\xff\xfe\x00\xd8" + bytes(range(128, 256)))
    with pytest.raises(UnreadableDocument, match="empty"):
        extract_text(b"")
    assert extract_text(b"a;b\n1;2\n3;4\n").mime_type == "text/csv"
    assert extract_text(b"one line, with a comma").mime_type == "text/plain"


def test_the_answer_is_the_passage_sentence_that_matches_the_question() -> None:
    passage = "Welcome to Acme. The premium plan costs 49 dollars a month. Support is open every day."
    assert answer_from_passage("How much is the premium plan?", passage) == "The premium plan costs 49 dollars a month."
    assert answer_from_passage("what about zebras", passage) is None


class _Source:
    def __init__(self, passages: list[str]) -> None:
        self.passages = passages
        self.asked: list[str] = []

    async def search(self, query: str) -> list[str]:
        self.asked.append(query)
        return self.passages


async def test_the_offline_path_answers_from_knowledge_what_no_edge_matches() -> None:
    nodes = [
        {"id": "start", "data": {"text": "Do you want sales or support?", "isStart": True}},
        {"id": "sales", "data": {"text": "Sales here."}},
    ]
    edges = [{"id": "e1", "source": "start", "target": "sales", "data": {"keywords": ["sales"]}}]
    source = _Source(["Our opening hours are nine to five. We are closed on holidays."])
    runner = ConversationPathLLM(nodes, edges, answer=PassageAnswerer(source))

    async def reply(text: str) -> str:
        events = [e async for e in runner.respond([ConversationTurn("caller", text)])]
        return "".join(e.text for e in events if isinstance(e, TextDelta))

    assert await reply("what are your opening hours") == "Our opening hours are nine to five."
    assert runner.current_node_id == "start"  # the answer keeps the caller where they were
    assert await reply("sales please") == "Sales here."
    assert source.asked == ["what are your opening hours"]  # a matched edge never waits for a search
    source.passages = []
    assert (await reply("something else entirely")).startswith("Sorry")


async def test_a_deleted_document_being_ingested_is_left_alone(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    kb, document_id = await text_document(pool, org, "The Jade tram runs hourly.")
    claims = await knowledge_ingestion.claim_due(pool, limit=50, lease=timedelta(seconds=30))
    claim = next(c for c in claims if c.document_id == document_id)
    await knowledge_bases.delete_document(pool, organization_id=org, knowledge_base_id=kb, document_id=document_id)
    assert not await knowledge_ingestion.record_ready(pool, claim, chunks=["The Jade tram runs hourly."])
    assert await pool.fetchval('SELECT count(*) FROM "KnowledgeBaseChunk" WHERE "documentId" = $1', document_id) == 0


async def test_rare_words_outweigh_words_most_passages_hold(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    kb, _ = await text_document(pool, org, "Our plan for every month: the plan costs little, the plan is monthly.")
    for n in range(24):
        await text_document(
            pool, org, f"The plan number {n} costs {n + 10} dollars a month, billed each month.", kb_id=kb
        )
    _, zircon = await text_document(pool, org, "Zircon members pay 99 dollars.", kb_id=kb)
    worker = IngestionWorker(pool, quick(concurrency=50))
    await worker.run_once()
    await worker.stop()
    found = await search_passages(
        pool, organization_id=org, knowledge_base_ids=[kb], query="What does the Zircon plan cost each month?", limit=3
    )
    assert found[0].document_id == zircon  # "plan", "cost" and "month" are in nearly every passage
    terms = await pool.fetchval(
        'SELECT "chunkCount" FROM "KnowledgeBaseTerm" WHERE "knowledgeBaseId" = $1 AND "lexeme" = $2', kb, "zircon"
    )
    assert terms == 1
    await knowledge_bases.delete_document(pool, organization_id=org, knowledge_base_id=kb, document_id=zircon)
    assert (
        await pool.fetchval(
            'SELECT count(*) FROM "KnowledgeBaseTerm" WHERE "knowledgeBaseId" = $1 AND "lexeme" = $2', kb, "zircon"
        )
        == 0
    )


async def test_a_document_that_stops_every_process_reading_it_ends_in_error(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    _, document_id = await text_document(pool, org, "The Garnet lift is out of order.")
    for _ in range(2):  # two processes claim it and die before finishing
        claims = await knowledge_ingestion.claim_due(pool, limit=100, lease=timedelta(milliseconds=1))
        assert document_id in {c.document_id for c in claims}
        await asyncio.sleep(0.01)
    worker = IngestionWorker(pool, quick(max_attempts=2, concurrency=100))
    await worker.run_once()
    await worker.stop()
    status, error = await status_of(pool, document_id)
    assert status == "ERROR" and error is not None and "did not finish in 2 attempts" in error


async def test_passages_keep_their_search_vector_in_the_row(pool: asyncpg.Pool) -> None:
    # Out of line, every search would read each candidate's tsvector from the TOAST table (migration 0022).
    storage = await pool.fetchval(
        "SELECT attstorage FROM pg_attribute WHERE attrelid = '\"KnowledgeBaseChunk\"'::regclass"
        " AND attname = 'searchVector'"
    )
    assert storage == b"m"


def _raw_pdf(content: bytes, *, pages: int = 1) -> bytes:
    """A PDF whose `pages` pages each draw `content` (one content stream, Flate-compressed), built byte by byte."""
    stream = zlib.compress(content)
    page = (
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R"
        b" /Resources << /Font << /F1 4 0 R >> >> >>"
    )
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % (5 + n) for n in range(pages)), pages),
        b"<< /Filter /FlateDecode /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        *[page] * pages,
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


async def file_document(pool: asyncpg.Pool, org: str, data: bytes) -> str:
    kb_id = (await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="KB")).id
    document = await knowledge_bases.add_document(
        pool, organization_id=org, knowledge_base_id=kb_id, name="file.pdf", type=DocumentType.FILE, data=data
    )
    return document.id


async def test_a_pdf_whose_text_holds_nul_characters_is_indexed_without_them(pool: asyncpg.Pool) -> None:
    # PostgreSQL text cannot hold NUL, which a PDF's strings may: the passages are stored without it.
    org = await insert_organization(pool)
    document_id = await file_document(
        pool, org, _raw_pdf(b"BT /F1 12 Tf 72 700 Td (Jasper\\000lounge opens at nine.) Tj ET")
    )
    worker = IngestionWorker(pool, quick())
    await worker.run_once()
    await worker.stop()
    assert await status_of(pool, document_id) == ("READY", None)
    passages = await pool.fetch('SELECT "content" FROM "KnowledgeBaseChunk" WHERE "documentId" = $1', document_id)
    assert [row["content"] for row in passages] == ["Jasperlounge opens at nine."]


async def test_a_pdf_stream_that_inflates_past_the_parsers_limit_ends_in_error_at_once(pool: asyncpg.Pool) -> None:
    # 80 MB of page content in a 78 KB file: the PDF reader stops at its limit, and the document is not retried.
    org = await insert_organization(pool)
    bomb = _raw_pdf(b"BT /F1 12 Tf 72 700 Td (Hello) Tj ET\n" + b" " * 80_000_000)
    document_id = await file_document(pool, org, bomb)
    worker = IngestionWorker(pool, quick())
    await worker.run_once()
    await worker.stop()
    status, error = await status_of(pool, document_id)
    assert status == "ERROR" and error is not None and "PDF" in error and "limit" in error.lower()
    assert (
        await pool.fetchval('SELECT count(*) FROM "KnowledgeBaseIngestion" WHERE "documentId" = $1', document_id) == 0
    )


async def test_a_file_that_reads_past_its_time_limit_ends_in_error_and_frees_the_worker(pool: asyncpg.Pool) -> None:
    # 3 KB of page content that takes seconds to parse: the reading process is killed at the limit.
    org = await insert_organization(pool)
    document_id = await file_document(
        pool, org, _raw_pdf(b"BT /F1 12 Tf 72 700 Td " + b"(word ) Tj " * 200_000 + b"ET")
    )
    worker = IngestionWorker(pool, quick(extract=ExtractLimits(timeout=0.5)))
    await worker.run_once()
    await worker.stop()
    status, error = await status_of(pool, document_id)
    assert status == "ERROR" and error == "the file took longer than 0.5 s to read"


async def test_a_file_that_needs_more_memory_than_allowed_ends_in_error(pool: asyncpg.Pool) -> None:
    # A stream inflating to 70 MB (within pypdf's own limit) in a reading process allowed less than that.
    org = await insert_organization(pool)
    bomb = _raw_pdf(b"BT /F1 12 Tf 72 700 Td (Hello) Tj ET\n" + b" " * 70_000_000)
    document_id = await file_document(pool, org, bomb)
    worker = IngestionWorker(pool, quick(extract=ExtractLimits(max_memory=150 * 1024 * 1024)))
    await worker.run_once()
    await worker.stop()
    status, error = await status_of(pool, document_id)
    assert status == "ERROR" and error == "the file needs more than 150 MB of memory to read"


async def test_a_long_text_is_cut_by_a_child_process_within_the_reading_limits(pool: asyncpg.Pool) -> None:
    # Cut in a thread of the engine, a long text held the calls' event loop (a regular expression over a whole
    # paragraph holds the GIL: a quarter of a second for 10 MB). Past IN_THREAD_MAX it is cut by a child process,
    # within the limits a file's reading has, into the same passages.
    org = await insert_organization(pool)
    content = " ".join(f"Crossing {n} of the Carnelian ferry leaves at noon." for n in range(2000))
    assert len(content) > IN_THREAD_MAX
    kb_id, document_id = await text_document(pool, org, content)
    worker = IngestionWorker(pool, quick())
    await worker.run_once()
    await worker.stop()
    assert await status_of(pool, document_id) == ("READY", None)
    rows = await pool.fetch(
        'SELECT "content" FROM "KnowledgeBaseChunk" WHERE "documentId" = $1 ORDER BY "position"', document_id
    )
    assert [row["content"] for row in rows] == split_into_chunks(content, size=200, overlap=40)

    _, slow_id = await text_document(pool, org, content, kb_id=kb_id)
    worker = IngestionWorker(pool, quick(extract=ExtractLimits(timeout=0.001)))
    await worker.run_once()
    await worker.stop()
    assert await status_of(pool, slow_id) == ("ERROR", "the text took longer than 0.001 s to cut into passages")


async def test_a_worker_told_to_stop_claiming_finishes_its_document_and_takes_no_other(pool: asyncpg.Pool) -> None:
    org = await insert_organization(pool)
    async with held_page("The Jasper pier opens at dawn.") as (base, page):
        fetched, release = page.fetched, page.release
        kb = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="Piers")
        held = await knowledge_bases.add_document(
            pool, organization_id=org, knowledge_base_id=kb.id, name="pier", type=DocumentType.WEBSITE, url=f"{base}/"
        )
        worker = IngestionWorker(pool, quick(concurrency=50, crawl=CrawlLimits(max_depth=0, allow_private=True)))
        worker.start()
        try:
            await asyncio.wait_for(fetched.wait(), 30)
            worker.stop_claiming()  # the engine drains
            _, queued_later = await text_document(pool, org, "The Opal ferry is late.", kb_id=kb.id)
            worker.wake()
            release.set()
            for _ in range(200):
                if (await status_of(pool, held.id))[0] != "PROCESSING":
                    break
                await asyncio.sleep(0.05)
            assert await status_of(pool, held.id) == ("READY", None)
            await asyncio.sleep(0.2)  # room for a claim that must not come
        finally:
            await worker.stop()
    assert await status_of(pool, queued_later) == ("PROCESSING", None)
    assert (
        await pool.fetchval('SELECT "attemptCount" FROM "KnowledgeBaseIngestion" WHERE "documentId" = $1', queued_later)
        == 0
    )


async def test_a_document_reingested_while_it_is_read_is_read_again(pool: asyncpg.Pool) -> None:
    # The read under way began before the request: recorded, it took the document off the queue, and the site as
    # it is now was never read (the document READY with what it said before).
    org = await insert_organization(pool)
    async with held_page("The Jasper pier opens at dawn.") as (base, page):
        kb = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="Piers")
        document = await knowledge_bases.add_document(
            pool, organization_id=org, knowledge_base_id=kb.id, name="pier", type=DocumentType.WEBSITE, url=f"{base}/"
        )
        worker = IngestionWorker(pool, quick(crawl=CrawlLimits(max_depth=0, allow_private=True)))
        worker.start()
        try:
            await asyncio.wait_for(page.fetched.wait(), 30)
            page.text = "The Jasper pier opens at noon."
            await knowledge_bases.reingest_document(
                pool, organization_id=org, knowledge_base_id=kb.id, document_id=document.id
            )
            page.release.set()
            for _ in range(200):
                queued = await pool.fetchval(
                    'SELECT count(*) FROM "KnowledgeBaseIngestion" WHERE "documentId" = $1', document.id
                )
                if not queued and (await status_of(pool, document.id))[0] != "PROCESSING":
                    break
                await asyncio.sleep(0.05)
        finally:
            await worker.stop()
    assert await status_of(pool, document.id) == ("READY", None)
    rows = await pool.fetch('SELECT "content" FROM "KnowledgeBaseChunk" WHERE "documentId" = $1', document.id)
    assert [row["content"] for row in rows] == ["The Jasper pier opens at noon."]
