"""`dialtone kb add-file | add-url | add-text | search`: fill a knowledge base and ask it questions.

Documents are added to the database as the API adds them (files sniffed and size-checked the same way), then this
process works the ingestion queue itself, as any engine process would, drawing a progress bar until every
document it added is READY or ERROR (`--no-wait` leaves them to the running engines).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any, TextIO

from config.settings import Settings
from engine.knowledge.embeddings import embedder_from_settings
from engine.knowledge.extract import sniff_mime_type
from engine.knowledge.ingestion import IngestionSettings, IngestionWorker
from engine.knowledge.lookup import KnowledgeLookup
from engine.knowledge.unreadable import UnreadableDocument
from pipelines.clients import ProviderClients
from pipelines.knowledge import KnowledgeUnavailable
from storage import Pool, knowledge_bases, organizations
from storage.enums import DocumentType
from storage.errors import DatabaseUnavailable
from storage.knowledge_bases import KnowledgeBaseDocument
from storage.migrate import migrate
from storage.pool import database
from storage.tenancy import tenant_transaction

_BAR_WIDTH = 30
_POLL = 0.1


def add_kb_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `kb` and its actions on the `dialtone` parser."""
    kb = commands.add_parser("kb", help="knowledge bases: add files, web sites and texts; search them")
    actions = kb.add_subparsers(dest="kb_command", required=True, metavar="ACTION")
    add_file = actions.add_parser("add-file", help="upload files (PDF, DOCX, HTML, CSV, Markdown, text)")
    add_file.add_argument("files", nargs="+", type=Path)
    add_url = actions.add_parser("add-url", help="crawl a web site from this address")
    add_url.add_argument("url")
    add_url.add_argument("--name", help="the document's name (default: the address)")
    add_text = actions.add_parser("add-text", help="add a text")
    add_text.add_argument("text", help="the text, or - to read it from standard input")
    add_text.add_argument("--name", required=True, help="the document's name")
    search = actions.add_parser("search", help="the passages that best answer a question")
    search.add_argument("query")
    search.add_argument("--limit", type=int, default=5, help="passages to show (default 5)")
    for action in (add_file, add_url, add_text, search):
        action.add_argument("--org", required=True, help="the organization's id or slug")
        action.add_argument("--kb", required=True, help="the knowledge base's id")
    for action in (add_file, add_url, add_text):
        action.add_argument("--no-wait", action="store_true", help="queue the documents and exit")


async def run_kb_command(args: argparse.Namespace, settings: Settings) -> None:
    """Run one `kb` action; ValueError or a storage error (printed by the CLI) for what is wrong."""
    async with database(settings) as db:
        async with db.pool.acquire() as conn:
            await migrate(conn)
        organization_id = await _organization_id(db.pool, args.org)
        async with tenant_transaction(db.pool, organization_id) as conn:
            kb = await knowledge_bases.get_knowledge_base(
                conn, organization_id=organization_id, knowledge_base_id=args.kb
            )
        if args.kb_command == "search":
            await _search(db.pool, args, settings, organization_id, kb.id)
            return
        added = await _add(db.pool, args, settings, organization_id, kb.id)
        for document in added:
            print(f"{document.id}  {document.name}")
        if not args.no_wait:
            await ingest_with_progress(db.pool, settings, [d.id for d in added], sys.stderr)


async def _search(pool: Pool, args: argparse.Namespace, settings: Settings, organization_id: str, kb_id: str) -> None:
    """Print the passages a call asking `args.query` would be given: the same lookup, by vector too when the settings
    turn vector search on (what search it was is said on standard error)."""
    clients = ProviderClients()
    try:
        embedder = await embedder_from_settings(settings, clients, pool)
        print(f"search by {'full-text and vector' if embedder else 'full-text'}", file=sys.stderr)
        lookup = KnowledgeLookup(
            pool, organization_id=organization_id, knowledge_base_ids=[kb_id], limit=args.limit, embedder=embedder
        )
        passages = await lookup.passages(args.query)
    except KnowledgeUnavailable as exc:
        raise DatabaseUnavailable(f"the knowledge base cannot be searched right now: {exc}") from None
    finally:
        await clients.aclose()
    for passage in passages:
        print(f"{passage.rank:.3f}  {passage.document_name} ({passage.document_id}, chunk {passage.position})")
        print(f"       {passage.content}")
    if not passages:
        print("no passage matches")


async def _add(
    pool: Pool, args: argparse.Namespace, settings: Settings, organization_id: str, kb_id: str
) -> list[KnowledgeBaseDocument]:
    common: dict[str, Any] = {"organization_id": organization_id, "knowledge_base_id": kb_id}
    if args.kb_command == "add-url":
        url = args.url
        return [
            await knowledge_bases.add_document(
                pool, **common, name=args.name or url, type=DocumentType.WEBSITE, url=url
            )
        ]
    if args.kb_command == "add-text":
        text = sys.stdin.read() if args.text == "-" else args.text
        if not text.strip():
            raise ValueError("the text is empty")
        return [
            await knowledge_bases.add_document(pool, **common, name=args.name, type=DocumentType.TEXT, content=text)
        ]
    files = []
    for path in args.files:  # every file checked before any is added
        data = path.read_bytes()
        if len(data) > settings.kb_max_file_bytes:
            raise ValueError(f"{path}: larger than DIALTONE_KB_MAX_FILE_BYTES ({settings.kb_max_file_bytes} bytes)")
        try:
            mime_type = sniff_mime_type(data, name=path.name)
        except UnreadableDocument as exc:
            raise ValueError(f"{path}: {exc}") from None
        files.append((path, data, mime_type))
    return [
        await knowledge_bases.add_document(
            pool, **common, name=path.name, type=DocumentType.FILE, file_size=len(data), mime_type=mime_type, data=data
        )
        for path, data, mime_type in files
    ]


async def ingest_with_progress(pool: Pool, settings: Settings, document_ids: list[str], out: TextIO) -> None:
    """Work the ingestion queue until the documents are settled, drawing a bar on `out`; a line per failure."""
    worker = IngestionWorker(pool, IngestionSettings.from_settings(settings))
    worker.start()
    try:
        while True:
            rows = await pool.fetch(
                'SELECT "name", "status", "error" FROM "KnowledgeBaseDocument" WHERE "id" = ANY($1::text[])',
                document_ids,
            )
            done = sum(row["status"] != "PROCESSING" for row in rows)
            filled = done * _BAR_WIDTH // max(len(document_ids), 1)
            out.write(f"\ringesting [{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {done}/{len(document_ids)}")
            out.flush()
            if done == len(rows):
                break
            await asyncio.sleep(_POLL)
    finally:
        await worker.stop()
    out.write("\n")
    failed = [row for row in rows if row["status"] == "ERROR"]
    for row in failed:
        out.write(f"{row['name']}: ERROR {row['error']}\n")
    if failed:
        raise ValueError(f"{len(failed)} of {len(document_ids)} documents could not be ingested")


async def _organization_id(pool: Pool, given: str) -> str:
    by_slug = await organizations.get_organization_by_slug(pool, slug=given)
    if by_slug is not None:
        return by_slug.id
    return (await organizations.get_organization(pool, organization_id=given)).id
