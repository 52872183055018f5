"""Crawling a WEBSITE document within its bounds, through the ingestion worker, real PostgreSQL and a site on loopback.

A site can be hostile or merely broken: a page of countless links, pages that answer slowly, links that are not
URLs. The crawl stays within its number of pages and its time, and a bad link costs only itself.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from engine.knowledge.crawl import CrawlFailed, CrawlLimits, crawl_site
from engine.knowledge.extract_process import IN_THREAD_MAX, ExtractLimits
from engine.knowledge.ingestion import IngestionSettings, IngestionWorker
from storage import knowledge_bases
from storage.enums import DocumentType
from tests.fakes.server import serve
from tests.test_knowledge_ingestion import quick, status_of
from tests.test_repo_agents import insert_organization


@dataclass
class Site:
    """A site on loopback: its address, its pages (path to HTML; any other path is missing), how long each page
    takes to answer, paths that redirect (to their Location) or answer an error status, paths served as bytes with
    their Content-Type, and how many times each path was asked for."""

    base: str
    pages: dict[str, str] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    raw: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    asked: Counter[str] = field(default_factory=Counter)


def html(text: str, *links: str) -> str:
    anchors = "".join(f'<a href="{link}">more</a>' for link in links)
    return f"<html><body><p>{text}</p>{anchors}</body></html>"


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    served = Site(base="")

    async def handle(request: web.Request) -> web.Response:
        served.asked[request.path] += 1
        await asyncio.sleep(served.delays.get(request.path, 0.0))
        if request.path in served.statuses:
            return web.Response(status=served.statuses[request.path])
        if request.path in served.redirects:
            return web.Response(status=302, headers={"Location": served.redirects[request.path]})
        if request.path in served.raw:
            data, content_type = served.raw[request.path]
            return web.Response(body=data, headers={"Content-Type": content_type})
        page = served.pages.get(request.path)
        if page is None:
            raise web.HTTPNotFound()
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    async with serve(app) as base:
        served.base = base
        yield served


async def website_document(pool: asyncpg.Pool, url: str) -> str:
    org = await insert_organization(pool)
    kb = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="Site")
    document = await knowledge_bases.add_document(
        pool, organization_id=org, knowledge_base_id=kb.id, name="site", type=DocumentType.WEBSITE, url=url
    )
    return document.id


async def ingest_once(pool: asyncpg.Pool, settings: IngestionSettings) -> None:
    """One round of an ingestion worker with `settings`: the documents due now, read to their end."""
    worker = IngestionWorker(pool, settings)
    await worker.run_once()
    await worker.stop()


async def text_of(pool: asyncpg.Pool, document_id: str) -> str:
    """The document's passages, joined."""
    rows = await pool.fetch(
        'SELECT "content" FROM "KnowledgeBaseChunk" WHERE "documentId" = $1 ORDER BY "position"', document_id
    )
    return " ".join(row["content"] for row in rows)


async def settled(pool: asyncpg.Pool, document_id: str) -> tuple[str, str | None]:
    for _ in range(1200):
        if (status := await status_of(pool, document_id))[0] != "PROCESSING":
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"document {document_id} still PROCESSING after a minute")


async def test_a_page_of_countless_links_to_missing_pages_costs_a_bounded_crawl(pool: asyncpg.Pool, site: Site) -> None:
    # Every link used to be queued and fetched, each one missing: 20,000 requests for one document (and their
    # robots.txt matching on the event loop). Links that give no page count against the pages allowed.
    site.pages["/"] = html("The Agate bridge is closed on Sundays.", *(f"/missing/{n}" for n in range(20_000)))
    document_id = await website_document(pool, f"{site.base}/")
    await ingest_once(pool, quick(crawl=CrawlLimits(max_pages=3, allow_private=True)))
    assert await status_of(pool, document_id) == ("READY", None)
    missing = sum(count for path, count in site.asked.items() if path.startswith("/missing/"))
    assert missing == 3


async def test_a_crawl_slower_than_the_lease_ends_within_it_and_reads_the_site_once(
    pool: asyncpg.Pool, site: Site
) -> None:
    # A crawl that outlived its lease was taken over by a second process, which crawled the site again, and so on
    # until the document ended in ERROR. It now ends within half the lease, keeping the pages it has read.
    slow = [f"/slow/{n}" for n in range(14)]
    site.pages["/"] = html("The Agate bridge is closed on Sundays.", *slow)
    for path in slow:
        site.pages[path] = html(f"Page {path} of the Agate bridge guide.")
        site.delays[path] = 0.5
    document_id = await website_document(pool, f"{site.base}/")
    settings = quick(lease=timedelta(seconds=4), crawl=CrawlLimits(allow_private=True))
    workers = [IngestionWorker(pool, settings), IngestionWorker(pool, settings)]  # two engine processes
    for worker in workers:
        worker.start()
    try:
        status = await settled(pool, document_id)
    finally:
        for worker in workers:
            await worker.stop()
    assert status == ("READY", None)
    assert site.asked["/"] == 1
    assert 1 < sum(site.asked[path] for path in slow) < len(slow)


# urljoin refuses "http://[oops" (ValueError), and aiohttp a host with an empty label (UnicodeError): one such link,
# or such a Location, failed the whole site.
@pytest.mark.parametrize("location", ["http://[oops", "http://docs..example.com/"])
async def test_a_link_or_a_redirect_that_is_not_a_url_costs_only_itself(
    pool: asyncpg.Pool, site: Site, location: str
) -> None:
    site.pages["/"] = html("The Agate bridge is closed on Sundays.", "http://[oops/", "/moved", "/ferry")
    site.pages["/ferry"] = html("The Jasper ferry leaves at noon.")
    site.redirects["/moved"] = location
    document_id = await website_document(pool, f"{site.base}/")
    await ingest_once(pool, quick(crawl=CrawlLimits(allow_private=True)))
    assert await status_of(pool, document_id) == ("READY", None)
    assert "Jasper ferry" in await text_of(pool, document_id)
    assert site.asked["/moved"] == 1


async def test_a_start_page_whose_host_name_cannot_be_encoded_fails_for_good_saying_so() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(CrawlFailed) as failed:
            [page.url async for page in crawl_site(session, "http://docs..example.com/", CrawlLimits())]
    assert failed.value.permanent
    assert "docs..example.com is not a valid host name" in str(failed.value)


async def test_a_long_page_is_read_within_the_reading_limits_of_a_file(pool: asyncpg.Pool, site: Site) -> None:
    # trafilatura over a page of megabytes, in a thread of the engine, held the calls' event loop for a quarter of
    # a second at a time. A page past IN_THREAD_MAX is read by a child process, within the limits a file has.
    scripts = "".join(f"<script>var crossing{n} = 'noon';</script>" for n in range(3000))  # no text to read
    site.pages["/"] = html(f"The Carnelian ferry leaves at noon.{scripts}")
    assert len(site.pages["/"]) > IN_THREAD_MAX
    document_id = await website_document(pool, f"{site.base}/")
    await ingest_once(pool, quick(crawl=CrawlLimits(allow_private=True), extract=ExtractLimits(timeout=0.001)))
    assert await status_of(pool, document_id) == (
        "ERROR",
        f"{site.base}/: the page took longer than 0.001 s to read",
    )


async def test_a_site_whose_robots_txt_cannot_be_read_now_is_not_crawled_until_it_can(
    pool: asyncpg.Pool, site: Site
) -> None:
    # A robots.txt answering 503 was taken for none: the site was crawled as if it forbade nothing.
    site.pages["/"] = html("The Agate bridge is closed on Sundays.", "/private/")
    site.pages["/private/"] = html("Internal: the Basalt discount code is SECRET42.")
    site.statuses["/robots.txt"] = 503
    document_id = await website_document(pool, f"{site.base}/")
    await ingest_once(pool, quick(max_attempts=1, crawl=CrawlLimits(allow_private=True)))
    status, error = await status_of(pool, document_id)
    assert status == "ERROR" and error == f"{site.base}/robots.txt could not be fetched (HTTP 503)"
    assert site.asked["/"] == site.asked["/private/"] == 0


async def test_a_start_page_that_redirects_to_another_host_is_crawled_there(pool: asyncpg.Pool, site: Site) -> None:
    # http:// to https://, example.com to www.example.com: the commonest redirect of all took the start page "off the
    # site", and the document ended in ERROR with no text.
    moved = site.base.replace("127.0.0.1", "localhost")
    site.redirects["/"] = f"{moved}/home"
    site.pages["/home"] = html("The Agate bridge is closed on Sundays.", "/hours")
    site.pages["/hours"] = html("The Jasper ferry leaves at noon.")
    document_id = await website_document(pool, f"{site.base}/")
    await ingest_once(pool, quick(crawl=CrawlLimits(allow_private=True)))
    assert await status_of(pool, document_id) == ("READY", None)
    read = await text_of(pool, document_id)
    assert "Agate bridge" in read and "Jasper ferry" in read  # the start page, and the page it links to


async def test_a_text_page_is_read_in_the_charset_it_declares(pool: asyncpg.Pool, site: Site) -> None:
    # Every text/plain page was decoded as UTF-8: one in Latin-1 lost each accented letter to U+FFFD.
    site.raw["/menu.txt"] = (
        "Crème brûlée costs four euros at the Café Opale.".encode("latin-1"),
        "text/plain; charset=iso-8859-1",
    )
    document_id = await website_document(pool, f"{site.base}/menu.txt")
    await ingest_once(pool, quick(crawl=CrawlLimits(allow_private=True)))
    assert await status_of(pool, document_id) == ("READY", None)
    assert await text_of(pool, document_id) == "Crème brûlée costs four euros at the Café Opale."


PUBLIC_SITE = "http://93.184.215.14"
"""A public address for the site, which the private-address guard lets through: the test reaches it through a
forward proxy on loopback (the `site` server answers for any host), so nothing leaves the machine."""


async def test_a_robots_txt_that_redirects_to_a_private_address_is_not_followed_and_taken_as_none(site: Site) -> None:
    # The crawl failed for good ("robots.txt could not be fetched (10.0.0.7 is not a public address)"): a site whose
    # server sends robots.txt to an internal host (a proxy's misconfigured base URL) could never be read. As RFC 9309
    # has a robots.txt behind redirects a crawler does not follow (more than five) "unavailable", it forbids nothing.
    site.redirects["/robots.txt"] = "http://10.0.0.7/robots.txt"
    site.pages["/"] = html("The Agate bridge is closed on Sundays.", "/hours")
    site.pages["/hours"] = html("The Jasper ferry leaves at noon.")
    async with aiohttp.ClientSession(proxy=site.base) as session:
        crawled = [page.url async for page in crawl_site(session, f"{PUBLIC_SITE}/", CrawlLimits())]
    assert crawled == [f"{PUBLIC_SITE}/", f"{PUBLIC_SITE}/hours"]
    assert site.asked["/robots.txt"] == 1, "the redirect to the private address is not followed"


async def test_a_robots_txt_on_a_host_that_cannot_be_resolved_holds_the_crawl_back(site: Site) -> None:
    # A robots.txt whose host DNS did not resolve (behind a redirect here; the site's own host, asked again, alike)
    # was taken as none, as one redirected to a private address is: the site was crawled as if it forbade nothing.
    # No answer from DNS is a network error, so the rules are unreachable (RFC 9309 2.3.1.4): retried, not ignored.
    site.redirects["/robots.txt"] = "http://robots.invalid/robots.txt"
    site.pages["/"] = html("The Agate bridge is closed on Sundays.", "/private/")
    site.pages["/private/"] = html("Internal: the Basalt discount code is SECRET42.")
    async with aiohttp.ClientSession(proxy=site.base) as session:
        with pytest.raises(CrawlFailed) as failed:
            [page.url async for page in crawl_site(session, f"{PUBLIC_SITE}/", CrawlLimits())]
    assert not failed.value.permanent
    assert str(failed.value).startswith(f"{PUBLIC_SITE}/robots.txt could not be fetched (robots.invalid: cannot be")
    assert site.asked["/"] == site.asked["/private/"] == 0


async def test_a_start_page_whose_host_cannot_be_resolved_is_tried_again_not_failed_for_good() -> None:
    # DNS not answering for the site's own name (a resolver's hiccup as much as a typo) is a network error: the
    # document is retried like one, and ends ERROR only once its attempts are spent.
    async with aiohttp.ClientSession() as session:
        with pytest.raises(CrawlFailed) as failed:
            [page.url async for page in crawl_site(session, "http://start.invalid/", CrawlLimits())]
    assert not failed.value.permanent
    assert "start.invalid: cannot be" in str(failed.value)
