"""Read an uploaded file's text and cut long texts into passages in a child process, within a time and a memory limit.

A hostile or pathological file (a PDF of thousands of costly pages, a stream that inflates to the parser's limit)
can take minutes and hundreds of megabytes to read. In a thread of the engine it would hold the GIL the calls'
event loop needs, could not be stopped (the process could not even exit until it ended) and would share the engine's
memory; in a child process it runs on its own interpreter and is killed at its time limit.

Cutting a long text into passages holds the GIL too: each of its regular expressions runs over a whole paragraph in
one call, and a 10 MB text held the calls' event loop for a quarter of a second in a thread. So a file's text is cut
where it was read, and a long text (`IN_THREAD_MAX`) is cut in a child of its own; the engine only encodes the text
and decodes the passages, a few milliseconds for 10 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from engine.knowledge.chunking import split_into_chunks
from engine.knowledge.unreadable import UnreadableDocument

# The parsers (engine.knowledge.extract and its libraries, a quarter of a CPU second to import) are imported only
# where a file is read, so a child that only cuts text starts in a tenth of the time.

PARENT_CHECK_SECONDS = 0.5
"""How often a reading process checks that the engine that started it is still there to take its answer."""

IN_THREAD_MAX = 64 * 1024
"""The longest text (in characters) cut in a thread of the engine: its longest regular-expression call is well
under a millisecond. Longer texts are cut in a child process, whose start costs tens of milliseconds of CPU."""


@dataclass(frozen=True, slots=True)
class ExtractLimits:
    """How long a file may take to read, and how much memory (address space) its reading process may hold."""

    timeout: float = 120.0
    max_memory: int = 1024 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PassageSizes:
    """How long a passage may be, and how much of the one before it each passage repeats (in characters)."""

    size: int
    overlap: int


@dataclass(frozen=True, slots=True)
class FilePassages:
    """A file's passages and the media type its bytes showed."""

    chunks: list[str]
    mime_type: str


class ExtractionCrashed(Exception):
    """The reading process ended without an answer (killed from outside, or a bug): worth another attempt."""


async def file_passages(data: bytes, *, name: str, sizes: PassageSizes, limits: ExtractLimits) -> FilePassages:
    """An uploaded file's passages, read and cut by a child process; UnreadableDocument if it cannot be read within
    the limits, ExtractionCrashed if the process ended without saying why. A cancelled read kills the process."""
    answer = await _in_child(["file", name], data, sizes, limits, doing="read")
    return FilePassages(chunks=answer["chunks"], mime_type=answer["mime_type"])


async def text_passages(text: str, *, sizes: PassageSizes, limits: ExtractLimits) -> list[str]:
    """`text` cut into passages: in a thread when it is short, else by a child process within the limits (errors
    as `file_passages`)."""
    if len(text) <= IN_THREAD_MAX:
        return await asyncio.to_thread(split_into_chunks, text, size=sizes.size, overlap=sizes.overlap)
    answer = await _in_child(["text"], text.encode(errors="surrogatepass"), sizes, limits, doing="cut into passages")
    chunks: list[str] = answer["chunks"]
    return chunks


async def page_passages(html: bytes, *, url: str, sizes: PassageSizes, limits: ExtractLimits) -> list[str]:
    """A crawled web page's main text cut into passages: in a thread when the page is short, else by a child process
    within the limits (errors as `file_passages`)."""
    if len(html) <= IN_THREAD_MAX:
        return await asyncio.to_thread(_page_chunks, html, url, sizes)
    answer = await _in_child(["page", url], html, sizes, limits, doing="read")
    chunks: list[str] = answer["chunks"]
    return chunks


def _page_chunks(html: bytes, url: str, sizes: PassageSizes) -> list[str]:
    from engine.knowledge.extract import html_main_text

    return split_into_chunks(html_main_text(html, url=url), size=sizes.size, overlap=sizes.overlap)


async def _in_child(
    args: list[str], data: bytes, sizes: PassageSizes, limits: ExtractLimits, *, doing: str
) -> dict[str, Any]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", __name__, str(os.getpid()), str(limits.max_memory), str(sizes.size), str(sizes.overlap),
        *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(limits.timeout):
            out, _ = await child.communicate(data)
    except TimeoutError:
        raise UnreadableDocument(f"the {args[0]} took longer than {limits.timeout:g} s to {doing}") from None
    finally:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
    try:
        answer: dict[str, Any] = json.loads(out)
    except ValueError:
        raise ExtractionCrashed(
            f"the reading process ended without an answer (exit status {child.returncode})"
        ) from None
    if "error" in answer:
        raise UnreadableDocument(answer["error"])
    return answer


def _answer(data: bytes, args: list[str], sizes: PassageSizes, max_memory: int) -> dict[str, Any]:
    try:
        if args[0] == "page":
            return {"chunks": _page_chunks(data, args[1], sizes), "mime_type": None}
        if args[0] == "file":
            from engine.knowledge.extract import extract_text

            try:
                document = extract_text(data, name=args[1])
            except UnreadableDocument as exc:
                return {"error": str(exc)}
            text, mime_type = document.text, document.mime_type
        else:
            text, mime_type = data.decode(errors="surrogatepass"), None
        chunks = split_into_chunks(text, size=sizes.size, overlap=sizes.overlap)
    except MemoryError:
        return {"error": f"the {args[0]} needs more than {max_memory // (1024 * 1024)} MB of memory to read"}
    return {"chunks": chunks, "mime_type": mime_type}


def _end_with(parent: int) -> None:
    """End this process once `parent` is gone: the engine enforces the time limit, and an engine killed (SIGKILL, the
    OOM killer) would otherwise leave it reading a costly file on, for minutes or hours, for nobody."""

    def watch() -> None:
        while os.getppid() == parent:  # an orphan is adopted by init or a subreaper
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _main() -> None:
    parent, max_memory, size, overlap, *args = sys.argv[1:]
    _end_with(int(parent))
    data = sys.stdin.buffer.read()
    resource.setrlimit(resource.RLIMIT_AS, (int(max_memory), int(max_memory)))
    answer = _answer(data, args, PassageSizes(int(size), int(overlap)), int(max_memory))
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    _main()
