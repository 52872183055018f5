"""Knowledge bases through the real server: documents of every kind ingested in the background, then searched.

Files are made by the tests (PDF, DOCX, HTML, CSV, Markdown, text); the website is served on loopback with links,
a robots.txt that forbids a path, a missing page and a broken one. Every fact is one no other document states.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from storage import agents
from storage.knowledge_bases import DOCUMENT_LIMIT
from tests.engine_server import running_engine
from tests.fakes.server import serve
from tests.knowledge_files import docx_file, html, pdf
from tests.test_api_auth import Api, Tenant, assert_error, make_tenant

MAX_FILE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
async def api(db_url: str) -> AsyncIterator[Api]:
    async with (
        running_engine(
            db_url,
            kb_ingest_poll_interval=0.05,
            kb_max_file_bytes=MAX_FILE_BYTES,
            kb_chunk_chars=400,
            kb_chunk_overlap=80,
            kb_fetch_timeout=2.0,
            allow_private_kb_urls=True,  # the test's website listens on 127.0.0.1
        ) as base,
        aiohttp.ClientSession() as session,
    ):
        yield Api(session, base)


@pytest.fixture(scope="module")
async def acme(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Acme")


@pytest.fixture(scope="module")
async def globex(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Globex")


async def new_kb(api: Api, tenant: Tenant, name: str = "Docs", **fields: Any) -> dict[str, Any]:
    status, kb = await api.call("POST", "/knowledge-bases", tenant.owner_key, json={"name": name, **fields})
    assert status == 201, kb
    return kb  # type: ignore[no-any-return]


async def upload(
    api: Api, tenant: Tenant, kb_id: str, data: bytes, filename: str, *, content_type: str = "application/pdf"
) -> tuple[int, Any]:
    """POST a file as multipart/form-data, declaring a content type the server must not trust."""
    form = aiohttp.FormData()
    form.add_field("file", data, filename=filename, content_type=content_type)
    async with api.session.post(
        f"{api.base}/v1/knowledge-bases/{kb_id}/files",
        data=form,
        headers={"Authorization": f"Bearer {tenant.owner_key}"},
    ) as response:
        return response.status, await response.json()


async def settled(api: Api, tenant: Tenant, kb_id: str, document_id: str) -> dict[str, Any]:
    """The document once ingestion has finished with it (READY or ERROR)."""
    for _ in range(300):
        status, document = await api.call("GET", f"/knowledge-bases/{kb_id}/documents/{document_id}", tenant.owner_key)
        assert status == 200, document
        if document["status"] != "PROCESSING":
            return document  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError(f"document {document_id} is still PROCESSING")


async def search(api: Api, tenant: Tenant, kb_id: str, q: str) -> list[dict[str, Any]]:
    status, body = await api.call("GET", f"/knowledge-bases/{kb_id}/search?q={q}", tenant.owner_key)
    assert status == 200, body
    return body["data"]  # type: ignore[no-any-return]


FILES = [
    ("prices.pdf", pdf("The Zircon plan costs 77 dollars per month."), "application/pdf", "zircon plan cost", "77"),
    (
        "prices.docx",
        docx_file("The Quartz plan costs 88 dollars per month."),
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "quartz plan",
        "88",
    ),
    (
        "about.html",
        html("Our warehouse in Tromso opens at seven in the morning on weekdays."),
        "text/html",
        "tromso warehouse open",
        "seven",
    ),
    ("plans.csv", b"plan,price\nBasalt,31 dollars\nGranite,45 dollars\n", "text/csv", "granite price", "45"),
    ("faq.md", b"# Returns\n\nReturns of **Obsidian** kettles are free within *60 days*.\n", "text/markdown",
     "obsidian kettle returns", "60 days"),
    ("note.txt", b"Parking at the Feldspar office is behind the bakery.", "text/plain", "feldspar parking", "bakery"),
]  # fmt: skip


@pytest.mark.parametrize("case", FILES, ids=[f[0] for f in FILES])
async def test_each_file_type_is_read_from_its_bytes_and_found_by_search(
    api: Api, acme: Tenant, case: tuple[str, bytes, str, str, str]
) -> None:
    filename, data, mime_type, question, fact = case
    kb = await new_kb(api, acme, filename)
    # Every upload claims to be a PDF: the type stored is the one the bytes show.
    status, document = await upload(api, acme, kb["id"], data, filename, content_type="application/pdf")
    assert status == 201, document
    assert (document["type"], document["status"], document["name"]) == ("FILE", "PROCESSING", filename)
    ready = await settled(api, acme, kb["id"], document["id"])
    assert (ready["status"], ready["error"]) == ("READY", None)
    assert (ready["mimeType"], ready["fileSize"]) == (mime_type, len(data))
    passages = await search(api, acme, kb["id"], question)
    assert passages, f"nothing found for {question!r}"
    assert fact in passages[0]["content"]
    assert passages[0]["documentId"] == document["id"] and passages[0]["documentName"] == filename
    _, counted = await api.call("GET", f"/knowledge-bases/{kb['id']}", acme.owner_key)
    assert (counted["fileCount"], counted["status"]) == (1, "READY")


async def test_html_main_text_leaves_navigation_and_footer_out(api: Api, acme: Tenant) -> None:
    kb = await new_kb(api, acme, "Main text")
    page = html("Our Basalt lounge serves tea until midnight.")
    status, document = await upload(api, acme, kb["id"], page, "lounge.html", content_type="text/html")
    assert status == 201
    assert (await settled(api, acme, kb["id"], document["id"]))["status"] == "READY"
    assert await search(api, acme, kb["id"], "copyright footer") == []
    assert "midnight" in (await search(api, acme, kb["id"], "basalt lounge tea"))[0]["content"]


async def test_form_fields_past_their_limit_together_are_a_413(api: Api, acme: Tenant) -> None:
    kb = await new_kb(api, acme)
    form = aiohttp.FormData()
    for index in range(100):  # each small, together past 64 KB
        form.add_field(f"f{index}", "x" * 1000)
    form.add_field("file", b"hello", filename="a.txt", content_type="text/plain")
    async with api.session.post(
        f"{api.base}/v1/knowledge-bases/{kb['id']}/files",
        data=form,
        headers={"Authorization": f"Bearer {acme.owner_key}"},
    ) as response:
        assert response.status == 413
        assert_error(await response.json(), "payload_too_large")


async def test_bad_uploads_are_refused_and_store_nothing(api: Api, pool: asyncpg.Pool, acme: Tenant) -> None:
    kb = await new_kb(api, acme, "Refusals")
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    status, body = await upload(api, acme, kb["id"], png, "photo.pdf")
    assert status == 422
    assert_error(body, "unsupported_file", "file")
    assert "image/png" in body["error"]["message"]
    status, body = await upload(api, acme, kb["id"], b"x" * (MAX_FILE_BYTES + 1), "big.txt")
    assert status == 413
    assert_error(body, "payload_too_large")
    assert "DIALTONE_KB_MAX_FILE_BYTES" in body["error"]["message"]
    status, body = await upload(api, acme, kb["id"], b"", "empty.txt")
    assert status == 422
    status, body = await api.call(
        "POST", f"/knowledge-bases/{kb['id']}/files", acme.owner_key, json={"name": "not a form"}
    )
    assert status == 415
    assert_error(body, "unsupported_media_type")
    status, body = await api.call(
        "POST",
        f"/knowledge-bases/{kb['id']}/documents",
        acme.owner_key,
        json={"name": "f", "type": "FILE", "url": "https://example.com/f.pdf"},
    )
    assert status == 422
    assert "files" in body["error"]["message"]
    assert (
        await pool.fetchval('SELECT count(*) FROM "KnowledgeBaseDocument" WHERE "knowledgeBaseId" = $1', kb["id"]) == 0
    )
    _, unchanged = await api.call("GET", f"/knowledge-bases/{kb['id']}", acme.owner_key)
    assert (unchanged["fileCount"], unchanged["status"]) == (0, "EMPTY")


@pytest.mark.parametrize(
    ("disposition", "stored_name"),
    [
        (b'filename="caf\xe9.txt"', "caf\ufffd.txt"),  # Latin-1, as an older browser or a script may send it
        (b'filename="\xed\xa0\x80.txt"', "\ufffd\ufffd\ufffd.txt"),  # a UTF-16 surrogate, encoded anyway
        (b"filename*=UTF-8''a%00b.txt", "a\ufffdb.txt"),
    ],
    ids=["latin-1", "surrogate", "NUL"],
)
async def test_a_file_name_the_database_cannot_hold_is_stored_with_those_characters_replaced(
    api: Api, acme: Tenant, disposition: bytes, stored_name: str
) -> None:
    kb = await new_kb(api, acme, "Odd names")
    body = (
        b'--XX\r\nContent-Disposition: form-data; name="file"; '
        + disposition
        + b"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XX--\r\n"
    )
    headers = {"Authorization": f"Bearer {acme.owner_key}", "Content-Type": "multipart/form-data; boundary=XX"}
    async with api.session.post(f"{api.base}/v1/knowledge-bases/{kb['id']}/files", data=body, headers=headers) as sent:
        assert sent.status == 201, await sent.text()
        assert (await sent.json())["name"] == stored_name


async def test_an_unreadable_file_ends_in_error_with_the_reason(api: Api, acme: Tenant) -> None:
    kb = await new_kb(api, acme, "Broken")
    status, document = await upload(api, acme, kb["id"], b"%PDF-1.4\n" + b"garbage " * 50, "broken.pdf")
    assert status == 201 and document["mimeType"] == "application/pdf"
    failed = await settled(api, acme, kb["id"], document["id"])
    assert failed["status"] == "ERROR"
    assert failed["error"] and "PDF" in failed["error"]
    _, kb_now = await api.call("GET", f"/knowledge-bases/{kb['id']}", acme.owner_key)
    assert (kb_now["fileCount"], kb_now["status"]) == (1, "READY")  # settled, if with nothing to search


@pytest.fixture
async def website() -> AsyncIterator[tuple[str, dict[str, bytes]]]:
    """A small site on loopback: pages by path (editable by the test), robots.txt forbidding /private/."""
    pages: dict[str, bytes] = {
        "/": html(
            "Welcome to Pumice Travel, the agency for island trips.",
            links=("/about", "/private/", "/gone", "/broken", "https://elsewhere.example/"),
        ),
        "/about": html("Pumice Travel was founded in Reykjavik in 1998.", links=("/about/team",)),
        "/about/team": html("Our guide Sigrun speaks four languages.", links=("/about/team/deeper",)),
        "/about/team/deeper": html("The deepest page mentions the Lavafield Lodge."),
        "/private/": html("Internal: the Basalt discount code is SECRET42."),
    }

    async def page(request: web.Request) -> web.StreamResponse:
        if request.path == "/robots.txt":
            return web.Response(text="User-agent: *\nDisallow: /private/\n")
        if request.path == "/start-here":
            raise web.HTTPFound("/about")
        if request.path == "/broken":
            assert request.transport is not None
            request.transport.close()  # the connection drops: an unreachable page
            return web.Response()
        body = pages.get(request.path)
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="text/html")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", page)
    async with serve(app) as base:
        yield base, pages


async def crawled(api: Api, acme: Tenant, kb_id: str, url: str) -> dict[str, Any]:
    """Add the website at `url` to the knowledge base; the document once its crawl has settled."""
    status, document = await api.call(
        "POST", f"/knowledge-bases/{kb_id}/documents", acme.owner_key, json={"name": url, "type": "WEBSITE", "url": url}
    )
    assert status == 201, document
    return await settled(api, acme, kb_id, document["id"])


async def test_a_website_is_crawled_within_depth_and_robots_and_recrawled_on_request(
    api: Api, acme: Tenant, website: tuple[str, dict[str, bytes]]
) -> None:
    base, pages = website
    kb = await new_kb(api, acme, "Site")
    status, document = await api.call(
        "POST",
        f"/knowledge-bases/{kb['id']}/documents",
        acme.owner_key,
        json={"name": "Pumice", "type": "WEBSITE", "url": f"{base}/"},
    )
    assert status == 201, document
    assert (await settled(api, acme, kb["id"], document["id"]))["status"] == "READY"
    assert "1998" in (await search(api, acme, kb["id"], "when was pumice travel founded"))[0]["content"]
    assert "four languages" in (await search(api, acme, kb["id"], "guide sigrun languages"))[0]["content"]
    assert await search(api, acme, kb["id"], "basalt discount code") == []  # robots.txt forbids /private/
    assert await search(api, acme, kb["id"], "lavafield lodge") == []  # three links deep: past the depth of 2

    pages["/about"] = html("Pumice Travel moved its office to Akureyri.")
    status, again = await api.call(
        "POST", f"/knowledge-bases/{kb['id']}/documents/{document['id']}/reingest", acme.owner_key
    )
    assert (status, again["status"]) == (200, "PROCESSING")
    assert (await settled(api, acme, kb["id"], document["id"]))["status"] == "READY"
    assert "Akureyri" in (await search(api, acme, kb["id"], "pumice office akureyri"))[0]["content"]
    assert await search(api, acme, kb["id"], "founded reykjavik 1998") == []


async def test_a_long_page_is_read_to_its_end(api: Api, acme: Tenant, website: tuple[str, dict[str, bytes]]) -> None:
    base, pages = website
    days = " ".join(f"On day {day} the tour visits a glacier." for day in range(4000))  # about 150 KB
    pages["/long"] = html(f"{days} The Lavafield Lodge serves breakfast at seven.")
    kb = await new_kb(api, acme, "Long page")
    assert (await crawled(api, acme, kb["id"], f"{base}/long"))["status"] == "READY"
    assert "breakfast at seven" in (await search(api, acme, kb["id"], "lodge breakfast"))[0]["content"]


async def test_a_redirect_is_followed_within_the_site(
    api: Api, acme: Tenant, website: tuple[str, dict[str, bytes]]
) -> None:
    base, _ = website
    kb = await new_kb(api, acme, "Moved")
    assert (await crawled(api, acme, kb["id"], f"{base}/start-here"))["status"] == "READY"
    assert "1998" in (await search(api, acme, kb["id"], "pumice travel founded"))[0]["content"]


async def test_a_website_refused_by_robots_or_missing_ends_in_error(
    api: Api, acme: Tenant, website: tuple[str, dict[str, bytes]]
) -> None:
    base, _ = website
    kb = await new_kb(api, acme, "Refused sites")
    for path, reason in (("/private/", "robots.txt"), ("/gone", "404")):
        status, document = await api.call(
            "POST",
            f"/knowledge-bases/{kb['id']}/documents",
            acme.owner_key,
            json={"name": path, "type": "WEBSITE", "url": f"{base}{path}"},
        )
        assert status == 201
        failed = await settled(api, acme, kb["id"], document["id"])
        assert failed["status"] == "ERROR" and reason in failed["error"]


async def test_the_hundred_and_first_document_is_refused(api: Api, pool: asyncpg.Pool, acme: Tenant) -> None:
    kb = await new_kb(api, acme, "Full")
    for n in range(DOCUMENT_LIMIT):
        status, _ = await api.call(
            "POST",
            f"/knowledge-bases/{kb['id']}/documents",
            acme.owner_key,
            json={"name": f"note {n}", "type": "TEXT", "content": f"Note number {n}."},
        )
        assert status == 201
    status, body = await api.call(
        "POST",
        f"/knowledge-bases/{kb['id']}/documents",
        acme.owner_key,
        json={"name": "one too many", "type": "TEXT", "content": "Overflow."},
    )
    assert status == 409
    assert_error(body, "document_limit")
    assert "100" in body["error"]["message"]
    status, body = await upload(api, acme, kb["id"], b"Also too many.", "more.txt")
    assert status == 409
    _, full = await api.call("GET", f"/knowledge-bases/{kb['id']}", acme.owner_key)
    assert full["textCount"] == DOCUMENT_LIMIT
    count = await pool.fetchval('SELECT count(*) FROM "KnowledgeBaseDocument" WHERE "knowledgeBaseId" = $1', kb["id"])
    assert count == DOCUMENT_LIMIT


async def test_status_and_counts_follow_documents_and_agents(api: Api, pool: asyncpg.Pool, acme: Tenant) -> None:
    kb = await new_kb(api, acme, "Lifecycle")
    assert kb["status"] == "EMPTY" and kb["language"] == "english"
    status, text = await api.call(
        "POST",
        f"/knowledge-bases/{kb['id']}/documents",
        acme.owner_key,
        json={"name": "Hours", "type": "TEXT", "content": "The Chert shop opens at nine."},
    )
    assert status == 201
    assert (await settled(api, acme, kb["id"], text["id"]))["status"] == "READY"
    _, ready = await api.call("GET", f"/knowledge-bases/{kb['id']}", acme.owner_key)
    assert (ready["textCount"], ready["status"]) == (1, "READY")
    agent = await agents.create_agent(pool, organization_id=acme.organization_id, name="Uses it")
    await agents.link_knowledge_base(
        pool, organization_id=acme.organization_id, agent_id=agent.id, knowledge_base_id=kb["id"]
    )
    _, active = await api.call("GET", f"/knowledge-bases/{kb['id']}", acme.owner_key)
    assert active["status"] == "ACTIVE"
    chunks = 'SELECT count(*) FROM "KnowledgeBaseChunk" WHERE "documentId" = $1'
    assert await pool.fetchval(chunks, text["id"]) == 1
    assert (await api.call("DELETE", f"/knowledge-bases/{kb['id']}/documents/{text['id']}", acme.owner_key))[0] == 204
    assert await pool.fetchval(chunks, text["id"]) == 0
    _, emptied = await api.call("GET", f"/knowledge-bases/{kb['id']}", acme.owner_key)
    assert (emptied["textCount"], emptied["status"]) == (0, "EMPTY")
    assert await search(api, acme, kb["id"], "chert shop") == []


async def test_another_organizations_documents_are_never_found(api: Api, acme: Tenant, globex: Tenant) -> None:
    acme_kb = await new_kb(api, acme, "Acme secrets")
    _, secret = await api.call(
        "POST",
        f"/knowledge-bases/{acme_kb['id']}/documents",
        acme.owner_key,
        json={"name": "Secret", "type": "TEXT", "content": "The Jasper merger closes in March."},
    )
    assert (await settled(api, acme, acme_kb["id"], secret["id"]))["status"] == "READY"
    assert await search(api, acme, acme_kb["id"], "jasper merger")
    globex_kb = await new_kb(api, globex, "Globex notes")
    assert await search(api, globex, globex_kb["id"], "jasper merger") == []
    status, body = await api.call("GET", f"/knowledge-bases/{acme_kb['id']}/search?q=jasper", globex.owner_key)
    assert status == 404
    assert_error(body, "not_found")
    for method, path in (
        ("GET", f"/knowledge-bases/{acme_kb['id']}/documents/{secret['id']}"),
        ("POST", f"/knowledge-bases/{acme_kb['id']}/documents/{secret['id']}/reingest"),
        ("GET", f"/knowledge-bases/{globex_kb['id']}/documents/{secret['id']}"),
    ):
        assert (await api.call(method, path, globex.owner_key))[0] == 404
    status, _ = await upload(api, globex, acme_kb["id"], b"Planted.", "plant.txt")
    assert status == 404


async def test_search_needs_a_question(api: Api, acme: Tenant) -> None:
    kb = await new_kb(api, acme, "Questions")
    status, body = await api.call("GET", f"/knowledge-bases/{kb['id']}/search", acme.owner_key)
    assert status == 422
    assert_error(body, "validation_error", "q")
    assert await search(api, acme, kb["id"], "the and of") == []  # stop words alone find nothing
    status, body = await api.call("GET", f"/knowledge-bases/{kb['id']}/search?q={'a' * 2001}", acme.owner_key)
    assert status == 422  # the documented limit, refused by the API itself (not by the server's request line)
    assert_error(body, "validation_error", "q")
    status, body = await api.call("POST", "/knowledge-bases", acme.owner_key, json={"name": "X", "language": "klingon"})
    assert status == 422
    assert_error(body, "validation_error", "language")


@asynccontextmanager
async def passages_locked(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """Every passage locked away (as a migration or VACUUM FULL would): a search waits for as long as this lasts."""
    conn = await asyncpg.connect(db_url)
    try:
        async with conn.transaction():
            await conn.execute('LOCK TABLE "KnowledgeBaseChunk" IN ACCESS EXCLUSIVE MODE')
            yield conn
    finally:
        await conn.close()


async def searchable_kb(api: Api, tenant: Tenant, name: str, content: str) -> str:
    kb = await new_kb(api, tenant, name)
    _, document = await api.call(
        "POST",
        f"/knowledge-bases/{kb['id']}/documents",
        tenant.owner_key,
        json={"name": name, "type": "TEXT", "content": content},
    )
    assert (await settled(api, tenant, kb["id"], document["id"]))["status"] == "READY"
    return kb["id"]  # type: ignore[no-any-return]


async def test_a_search_the_database_cannot_serve_in_time_is_a_503_not_an_empty_list(
    api: Api, db_url: str, acme: Tenant
) -> None:
    # It answered 200 with no passage, as if nothing matched, while a call's model is told the knowledge base
    # cannot be searched right now.
    kb_id = await searchable_kb(api, acme, "Tide tables", "The Basalt pier floods at high tide.")
    async with passages_locked(db_url):
        status, body = await api.call("GET", f"/knowledge-bases/{kb_id}/search?q=basalt+pier", acme.owner_key)
    assert status == 503
    assert_error(body, "unavailable")
    assert body["error"]["message"] == (
        "the knowledge base cannot be searched right now: the search took over 2 s; try again"
    )
    assert [passage["content"] for passage in await search(api, acme, kb_id, "basalt+pier")] == [
        "The Basalt pier floods at high tide."
    ]


async def test_a_search_whose_database_connection_is_lost_is_a_503_not_an_empty_list(
    api: Api, db_url: str, acme: Tenant
) -> None:
    kb_id = await searchable_kb(api, acme, "Ferries", "The Gneiss ferry leaves at dawn.")
    async with passages_locked(db_url) as admin:
        searching = asyncio.create_task(
            api.call("GET", f"/knowledge-bases/{kb_id}/search?q=gneiss+ferry", acme.owner_key)
        )
        for _ in range(100):  # the search's connection, waiting for the lock, is cut (a server restart, a failover)
            if await admin.fetchval(
                """SELECT count(pg_terminate_backend("pid")) FROM pg_stat_activity
                   WHERE "wait_event_type" = 'Lock' AND "query" LIKE '%KnowledgeBaseTerm%'"""
            ):
                break
            await asyncio.sleep(0.01)
            await admin.execute("SELECT pg_stat_clear_snapshot()")  # else the transaction sees its first reading
        else:
            raise AssertionError("the search never reached the database")
        status, body = await searching
    assert status == 503
    assert_error(body, "unavailable")
    assert body["error"]["message"].startswith("the knowledge base cannot be searched right now: the database is")
