"""Read an uploaded file's text in a child process, within a time and a memory limit.

A hostile or pathological file (a PDF of thousands of costly pages, a stream that inflates to the parser's limit)
can take minutes and hundreds of megabytes to read. In a thread of the engine it would hold the GIL the calls'
event loop needs, could not be stopped (the process could not even exit until it ended) and would share the engine's
memory; in a child process it runs on its own interpreter and is killed at its time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
from dataclasses import dataclass

from engine.knowledge.extract import DocumentText, UnreadableDocument, extract_text


@dataclass(frozen=True, slots=True)
class ExtractLimits:
    """How long a file may take to read, and how much memory (address space) its reading process may hold."""

    timeout: float = 120.0
    max_memory: int = 1024 * 1024 * 1024


class ExtractionCrashed(Exception):
    """The reading process ended without an answer (killed from outside, or a bug): worth another attempt."""


async def extract_text_in_process(data: bytes, *, name: str, limits: ExtractLimits) -> DocumentText:
    """The text of an uploaded file, read by a child process; UnreadableDocument if it cannot be read within the
    limits, ExtractionCrashed if the process ended without saying why. A cancelled read kills the process."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", __name__, name, str(limits.max_memory),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(limits.timeout):
            out, _ = await child.communicate(data)
    except TimeoutError:
        raise UnreadableDocument(f"the file took longer than {limits.timeout:g} s to read") from None
    finally:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
    try:
        answer = json.loads(out)
    except ValueError:
        raise ExtractionCrashed(
            f"the reading process ended without an answer (exit status {child.returncode})"
        ) from None
    if "error" in answer:
        raise UnreadableDocument(answer["error"])
    return DocumentText(text=answer["text"], mime_type=answer["mime_type"])


def _answer(data: bytes, name: str, max_memory: int) -> dict[str, str]:
    try:
        document = extract_text(data, name=name)
    except UnreadableDocument as exc:
        return {"error": str(exc)}
    except MemoryError:
        return {"error": f"the file needs more than {max_memory // (1024 * 1024)} MB of memory to read"}
    return {"text": document.text, "mime_type": document.mime_type}


def _main() -> None:
    name, max_memory = sys.argv[1], int(sys.argv[2])
    data = sys.stdin.buffer.read()
    resource.setrlimit(resource.RLIMIT_AS, (max_memory, max_memory))
    sys.stdout.write(json.dumps(_answer(data, name, max_memory)))


if __name__ == "__main__":
    _main()
