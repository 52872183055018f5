"""GET /monitor and its files over real HTTP: the page, its modules, a policy that allows no inline script, and
no file outside the page's folder; the page's scripts never parse call data as HTML."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser

import aiohttp
import pytest

from config.settings import load_settings
from engine.monitor.page import STATIC_DIR, content_security_policy, static_files
from tests.engine_server import running_engine


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    async with running_engine(db_url) as base:
        yield base


class _Tags(HTMLParser):
    """The page's <script> tags and any inline handlers or styles."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self.in_script = False
        self.script_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
            self.in_script = True
        self.inline += [f"{tag} {name}" for name, _ in attrs if name.startswith("on") or name == "style"]

    def handle_endtag(self, tag: str) -> None:
        self.in_script = self.in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self.in_script:
            self.script_text += data.strip()


async def test_the_page_is_served_with_a_policy_that_allows_no_inline_script(engine: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{engine}/monitor") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        policy = response.headers["Content-Security-Policy"]
        html = await response.text()
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["script-src"] == "'self'"
    assert directives["default-src"] == "'none'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy
    tags = _Tags()
    tags.feed(html)
    assert tags.scripts == [{"type": "module", "src": "/monitor/static/js/app.js"}]
    assert (tags.script_text, tags.inline) == ("", [])


async def test_every_module_the_page_imports_is_served_as_javascript(engine: str) -> None:
    modules = sorted(name for name in static_files() if name.endswith(".js"))
    imported = {"js/app.js"}
    for name in modules:
        source = (STATIC_DIR / name).read_text()
        imported |= {f"js/{target}" for target in re.findall(r'from "\./([\w.]+)"', source)}
    assert imported == set(modules)
    async with aiohttp.ClientSession() as session:
        for name in [*modules, "monitor.css"]:
            async with session.get(f"{engine}/monitor/static/{name}") as response:
                assert response.status == 200, name
                expected = "text/css" if name.endswith(".css") else "text/javascript"
                assert response.headers["Content-Type"] == f"{expected}; charset=utf-8"
                assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("name", ["nothing.js", "../page.py", "..%2Fpage.py", "%2e%2e/__init__.py", "js/../../page.py"])
async def test_no_other_file_is_served(engine: str, name: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{engine}/monitor/static/{name}", allow_redirects=False) as response,
    ):
        assert response.status == 404


def test_the_scripts_never_parse_text_as_html() -> None:
    for name in static_files():
        if name.endswith(".js"):
            source = (STATIC_DIR / name).read_text()
            assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(", source), name


def test_the_policy_lets_recordings_load_from_the_object_store_they_redirect_to() -> None:
    base = {"database_url": "postgresql://localhost/x", "s3_bucket": "calls"}
    public = load_settings(
        **base, s3_endpoint_url="http://minio:9000", s3_public_endpoint_url="https://files.example.com/"
    )
    assert "connect-src 'self' https://files.example.com;" in content_security_policy(public)
    assert "connect-src 'self' https://*.amazonaws.com;" in content_security_policy(load_settings(**base))
    assert "connect-src 'self';" in content_security_policy(load_settings(database_url="postgresql://localhost/x"))
