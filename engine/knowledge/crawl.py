"""Read a WEBSITE document: its page and the same-site pages it links to, within bounds and robots.txt.

Pages are fetched breadth-first from the document's URL, following links to the same scheme, host and port up to
`max_depth` links away and `max_pages` pages in all, within `total_timeout`. robots.txt is read first and its rules
for our user agent (or `*`) obeyed. Links that give no page (missing, broken, not a web page) are followed at most
`max_pages` times too, so a site of countless links cannot keep a crawl fetching; a page's links are read and sifted
off the event loop, and only as many kept as the crawl may still fetch. Every connection goes through the same
private-address guard as webhooks and tools (pipelines.url_safety), redirects included. A page that cannot be fetched
is skipped; the start page failing fails the crawl. Pages are given as they are fetched, their bodies as they came:
reading them is the caller's work (engine/knowledge/extract_process.py, off the event loop).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import urldefrag, urljoin, urlsplit
from urllib.robotparser import RobotFileParser

import aiohttp

from pipelines.http_bodies import read_at_most
from pipelines.url_safety import UnresolvedHost, UnsafeURL, ensure_public_url

log = logging.getLogger(__name__)

USER_AGENT = "Dialtone-KnowledgeBot/1.0"
_ROBOTS_AGENT = "Dialtone-KnowledgeBot"


class CrawlFailed(Exception):
    """The website cannot be read at all; the message says why (shown to the user)."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent
        """Whether trying again later cannot help (refused by robots.txt, a private address, not HTML)."""


@dataclass(frozen=True, slots=True)
class CrawlLimits:
    """How far and how much a crawl reads."""

    max_depth: int = 2
    max_pages: int = 20
    """The most pages read, and the most links that give no page followed, each."""
    timeout: float = 10.0
    """The longest one request may take."""
    total_timeout: float = 120.0
    """The longest the whole crawl may take: it ends there with the pages it has read."""
    max_bytes: int = 5 * 1024 * 1024
    allow_private: bool = False


@dataclass(frozen=True, slots=True)
class CrawledPage:
    """One page fetched: its address and its body, HTML or (`is_html` false) plain text in the charset its reply
    declared (None: none)."""

    url: str
    body: bytes
    is_html: bool
    charset: str | None


@dataclass(frozen=True, slots=True)
class _Fetched:
    url: str
    status: int
    content_type: str
    charset: str | None
    body: bytes


def _site(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


_MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def _fetch(session: aiohttp.ClientSession, url: str, limits: CrawlLimits) -> _Fetched:
    """GET `url`, following redirects one by one so each address passes the guard (aiohttp asks no resolver
    about an IP literal a redirect may name)."""
    timeout = aiohttp.ClientTimeout(total=limits.timeout)
    for _ in range(_MAX_REDIRECTS + 1):
        await ensure_public_url(url, allow_private=limits.allow_private)
        async with session.get(url, timeout=timeout, allow_redirects=False) as response:
            location = response.headers.get("Location")
            if response.status in _REDIRECTS and location:
                try:
                    url = urljoin(url, location)
                except ValueError:  # "http://[oops": no address a request could be made to
                    raise CrawlFailed(f"{url} redirects to {location!r}, which is not a URL", permanent=True) from None
                continue
            body = await read_at_most(response, limits.max_bytes + 1)
            if len(body) > limits.max_bytes:
                raise CrawlFailed(f"{url} is larger than {limits.max_bytes} bytes", permanent=True)
            return _Fetched(url, response.status, response.content_type, response.charset, body)
    raise CrawlFailed(f"{url}: more than {_MAX_REDIRECTS} redirects", permanent=True)


async def _robots(session: aiohttp.ClientSession, start: str, limits: CrawlLimits) -> RobotFileParser:
    scheme, netloc = _site(start)
    robots_url = f"{scheme}://{netloc}/robots.txt"
    parser = RobotFileParser(robots_url)
    # A site whose rules cannot be read now may forbid what it serves: it is read once they can be (RFC 9309 2.3.1.4).
    unreachable = f"{robots_url} could not be fetched"
    try:
        fetched = await _fetch(session, robots_url, limits)
    except (aiohttp.ClientError, TimeoutError, OSError, UnresolvedHost) as exc:  # a network error: unreachable
        raise CrawlFailed(f"{unreachable} ({exc or type(exc).__name__})", permanent=False) from None
    except (CrawlFailed, ValueError) as exc:  # UnsafeURL among them, and a host name that cannot be encoded
        # Too many redirects, a redirect to an address the guard refuses, too large: none to be had, which RFC 9309
        # (2.3.1.2, 2.3.1.3) calls unavailable, as a missing one is: nothing is forbidden. The guard still holds for
        # every page.
        log.info("knowledge crawl: %s taken as no robots.txt (%s)", robots_url, exc)
        parser.parse([])
        return parser
    if fetched.status in {401, 403}:  # as urllib.robotparser reads it: a site that hides its rules forbids all
        parser.parse(["User-agent: *", "Disallow: /"])
    elif fetched.status >= 500:
        raise CrawlFailed(f"{unreachable} (HTTP {fetched.status})", permanent=False)
    elif fetched.status >= 400:  # no robots.txt: nothing is forbidden
        parser.parse([])
    else:
        parser.parse(fetched.body.decode("utf-8", errors="replace").splitlines())
    return parser


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href.strip())


def _new_links(
    html: bytes, base: str, *, site: tuple[str, str], robots: RobotFileParser, seen: set[str], room: int
) -> list[str]:
    """Up to `room` links of the page not in `seen`, on `site` and allowed by `robots`, in the page's order.

    Run in a thread: a page of hundreds of thousands of links takes seconds of parsing and robots.txt matching.
    """
    parser = _LinkParser()
    parser.feed(html.decode("utf-8", errors="replace"))
    parser.close()
    found: list[str] = []
    for href in parser.hrefs:
        if len(found) >= room:
            break
        try:
            link = urldefrag(urljoin(base, href)).url
        except ValueError:  # not a URL ("http://[oops"): one bad link costs only itself
            continue
        if link not in seen and link not in found and _site(link) == site and robots.can_fetch(_ROBOTS_AGENT, link):
            found.append(link)
    return found


async def _allowed_start(
    session: aiohttp.ClientSession, start: str, limits: CrawlLimits, deadline: float
) -> RobotFileParser:
    """The site's robots.txt, once `start` is known to be a public http(s) address it allows (else CrawlFailed)."""
    if urlsplit(start).scheme not in {"http", "https"}:
        raise CrawlFailed(f"{start} is not an http(s) address", permanent=True)
    try:
        await ensure_public_url(start, allow_private=limits.allow_private)
    except UnsafeURL as exc:
        # A name DNS does not resolve now may resolve later (a resolver's hiccup): tried again, as network errors are.
        raise CrawlFailed(f"{start}: {exc}", permanent=not isinstance(exc, UnresolvedHost)) from None
    try:
        async with asyncio.timeout_at(deadline):
            robots = await _robots(session, start, limits)
    except TimeoutError:
        raise CrawlFailed(f"{start}: robots.txt took longer than {limits.total_timeout:g} s", permanent=False) from None
    if not robots.can_fetch(_ROBOTS_AGENT, start):
        raise CrawlFailed(f"{start} is disallowed by the site's robots.txt", permanent=True)
    return robots


async def crawl_site(
    session: aiohttp.ClientSession, start_url: str, limits: CrawlLimits
) -> AsyncGenerator[CrawledPage]:
    """The site's pages reachable from `start_url` within `limits`, start page first, each as it is fetched (the
    time the caller takes between them counts in `total_timeout`).

    CrawlFailed when the start page is refused (robots.txt, a private address) or cannot be fetched.
    """
    start = urldefrag(start_url).url
    deadline = asyncio.get_running_loop().time() + limits.total_timeout
    robots = await _allowed_start(session, start, limits, deadline)
    site = _site(start)
    queue: deque[tuple[str, int]] = deque([(start, 0)])
    seen = {start}
    pages = fetches = 0
    while queue and pages < limits.max_pages and fetches - pages < limits.max_pages:
        if asyncio.get_running_loop().time() >= deadline:
            log.info("knowledge crawl of %s: %g s passed, ended with %d pages", start, limits.total_timeout, pages)
            break
        url, depth = queue.popleft()
        fetches += 1
        try:
            async with asyncio.timeout_at(deadline):
                fetched = await _fetch(session, url, limits)
        # ValueError: UnsafeURL, and a host name that cannot be encoded ("docs..example.com") behind a redirect.
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, CrawlFailed) as exc:
            if url == start:
                permanent = isinstance(exc, ValueError | CrawlFailed) and not isinstance(exc, UnresolvedHost)
                raise CrawlFailed(
                    f"{url} could not be fetched ({exc or type(exc).__name__})", permanent=permanent
                ) from None
            log.info("knowledge crawl: skipped %s (%s)", url, type(exc).__name__)
            continue
        if fetched.status >= 400:
            if url == start:
                raise CrawlFailed(f"{url} answered HTTP {fetched.status}", permanent=fetched.status < 500)
            continue
        if _site(fetched.url) != site:
            if url != start:
                continue  # redirected off the site
            # The start page moved (http to https, example.com to www.example.com): the site is where it is now, under
            # that host's robots.txt.
            robots = await _allowed_start(session, fetched.url, limits, deadline)
            site = _site(fetched.url)
            seen.add(fetched.url)
        is_html = fetched.content_type in {"text/html", "application/xhtml+xml"}
        if not is_html and fetched.content_type != "text/plain":
            if url == start:
                raise CrawlFailed(f"{url} is {fetched.content_type}, not a web page", permanent=True)
            continue
        # Links beyond what the crawl may still fetch would never be fetched: they are not kept.
        room = 2 * limits.max_pages - fetches - len(queue)
        if is_html and depth < limits.max_depth and room > 0:
            links = await asyncio.to_thread(
                _new_links, fetched.body, fetched.url, site=site, robots=robots, seen=seen, room=room
            )
            seen.update(links)
            queue.extend((link, depth + 1) for link in links)
        pages += 1
        yield CrawledPage(fetched.url, fetched.body, is_html, fetched.charset)
