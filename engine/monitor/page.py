"""GET /monitor and its static files, each with a Content-Security-Policy that allows no inline script."""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from config.settings import Settings
from engine.server.appkeys import SETTINGS

MONITOR_PATH = "/monitor"
STATIC_PREFIX = f"{MONITOR_PATH}/static/"
STATIC_DIR = Path(__file__).resolve().parent / "static"

_TYPES: Mapping[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}


def static_files(folder: Path = STATIC_DIR) -> dict[str, Path]:
    """The files the page may load, by their path under `folder` (the only names the static route answers)."""
    return {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}


def content_security_policy(settings: Settings) -> str:
    """The page's policy: its own scripts and styles only, fetches to this engine (and to the object storage a
    recording link may redirect to), audio from blob: URLs it made, no frames, no forms, no plugins."""
    connect = ["'self'", *_object_storage_origins(settings)]
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {' '.join(connect)}",
            "media-src 'self' blob:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def _object_storage_origins(settings: Settings) -> list[str]:
    """Where `GET /recordings/{id}.wav` may redirect a fetch to: the object store's (public) endpoint."""
    if settings.s3_bucket is None:
        return []
    endpoint = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    if endpoint is None:
        return ["https://*.amazonaws.com"]
    parts = urlsplit(endpoint)
    return [f"{parts.scheme}://{parts.netloc}"]


def add_monitor_routes(app: web.Application) -> None:
    """Serve the page at /monitor and its files under /monitor/static/."""
    files = static_files()
    if "index.html" not in files:
        raise RuntimeError(f"the monitor page is missing: no index.html in {STATIC_DIR}")

    def headers(request: web.Request, name: str) -> dict[str, str]:
        suffix = Path(name).suffix
        return {
            "Content-Type": _TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream",
            "Content-Security-Policy": content_security_policy(request.app[SETTINGS]),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",  # revalidated each load (ETag), so an upgraded engine serves its new page
        }

    async def handle_page(request: web.Request) -> web.StreamResponse:
        """The page itself."""
        return web.FileResponse(files["index.html"], headers=headers(request, "index.html"))

    async def handle_static(request: web.Request) -> web.StreamResponse:
        """One of the page's files; 404 for any other name."""
        name = request.match_info["name"]
        path = files.get(name)
        if path is None:
            raise web.HTTPNotFound(text=f"no file {name!r} in the monitor page")
        return web.FileResponse(path, headers=headers(request, name))

    app.router.add_get(MONITOR_PATH, handle_page)
    app.router.add_get(STATIC_PREFIX + "{name:.+}", handle_static)
