"""Read a document's text from its bytes: PDF, DOCX, HTML, CSV, Markdown or plain text, told apart by the bytes.

The client's declared type is never trusted: binary formats are recognised by their signatures (`filetype`);
anything else must decode as text, and is then HTML when it is marked up as such, CSV when it parses as a table
of several consistent columns, Markdown when the file is named so, and plain text otherwise.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Final

import filetype
import trafilatura
from markdown_it import MarkdownIt

from engine.knowledge.unreadable import UnreadableDocument

PDF: Final = "application/pdf"
DOCX: Final = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
HTML: Final = "text/html"
CSV: Final = "text/csv"
MARKDOWN: Final = "text/markdown"
PLAIN: Final = "text/plain"
SUPPORTED: Final = (PDF, DOCX, HTML, CSV, MARKDOWN, PLAIN)

_HTML_START = re.compile(rb"^\s*(<!doctype\s+html|<html[\s>]|<head[\s>]|<body[\s>])", re.IGNORECASE)
_MARKDOWN_NAMES = (".md", ".markdown", ".mdown", ".mkd")
_CSV_SAMPLE = 64 * 1024


@dataclass(frozen=True, slots=True)
class DocumentText:
    """A document's text and the media type its bytes showed."""

    text: str
    mime_type: str


def sniff_mime_type(data: bytes, *, name: str = "") -> str:
    """The media type of `data`, from its bytes (the `name` only tells Markdown from plain text).

    UnreadableDocument for binary data of a kind not supported.
    """
    kind = filetype.guess(data)
    if kind is not None:
        if kind.mime in {PDF, DOCX}:
            return str(kind.mime)
        raise UnreadableDocument(f"{kind.mime} files are not supported; upload PDF, DOCX, HTML, CSV, Markdown or text")
    text = _decode(data)
    if _HTML_START.match(data[:1024]) or (b"<html" in data[:4096].lower() and b"</" in data):
        return HTML
    if name.lower().endswith(_MARKDOWN_NAMES):
        return MARKDOWN
    if _looks_like_csv(text):
        return CSV
    return PLAIN


def extract_text(data: bytes, *, name: str = "") -> DocumentText:
    """The text of an uploaded file, with the media type its bytes showed; UnreadableDocument if there is none."""
    if not data:
        raise UnreadableDocument("the file is empty")
    mime = sniff_mime_type(data, name=name)
    text = _READERS[mime](data)
    if not text.strip():
        raise UnreadableDocument(f"no text found in this {mime} file (a scanned PDF needs OCR first)")
    return DocumentText(text=text, mime_type=mime)


def html_main_text(html: str | bytes, *, url: str | None = None) -> str:
    """The main text of an HTML page (navigation, footers and scripts left out), by trafilatura."""
    text = trafilatura.extract(html, url=url, include_comments=False, include_tables=True, favor_recall=True)
    return text or ""


def _decode(data: bytes) -> str:
    for encoding in ("utf-8-sig", "utf-16"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if encoding == "utf-16" and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
            break
        if "\x00" not in text:
            return text
    raise UnreadableDocument("the file is neither a supported binary format nor UTF-8 text")


def _looks_like_csv(text: str) -> bool:
    sample = text[:_CSV_SAMPLE]
    lines = [line for line in sample.splitlines() if line.strip()][:20]
    if len(lines) < 2:
        return False
    try:
        dialect = csv.Sniffer().sniff("\n".join(lines), delimiters=",;\t|")
    except csv.Error:
        return False
    widths = {len(row) for row in csv.reader(lines, dialect)}
    return len(widths) == 1 and widths.pop() >= 2


def _read_pdf(data: bytes) -> str:
    """The pages' text, without NUL (a PDF string may hold it; PostgreSQL text cannot).

    PyPdfError covers pypdf's LimitReachedError too: a stream that inflates past its limit is refused for good.
    """
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        text = "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PyPdfError, ValueError, KeyError) as exc:
        raise UnreadableDocument(f"the PDF cannot be read ({exc})") from None
    return text.replace("\x00", "")


def _read_docx(data: bytes) -> str:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, ValueError, KeyError) as exc:
        raise UnreadableDocument(f"the DOCX file cannot be read ({exc})") from None
    parts = [paragraph.text for paragraph in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            parts.append(" | ".join(cell.text.strip() for cell in row.cells))
    return "\n\n".join(part for part in parts if part.strip())


def _read_html(data: bytes) -> str:
    return html_main_text(_decode(data))


def _read_csv(data: bytes) -> str:
    """Each row as a sentence naming its columns ("Plan: Premium; Price: $49"), so a row is found by its words."""
    text = _decode(data)
    lines = [line for line in text[:_CSV_SAMPLE].splitlines() if line.strip()][:20]
    dialect = csv.Sniffer().sniff("\n".join(lines), delimiters=",;\t|")
    rows = [row for row in csv.reader(io.StringIO(text), dialect) if any(cell.strip() for cell in row)]
    if not rows:
        return ""
    header, *body = rows
    if not body:
        return "; ".join(header)
    return "\n\n".join(
        "; ".join(f"{name.strip()}: {value.strip()}" for name, value in zip(header, row, strict=False) if value.strip())
        + "."
        for row in body
    )


def _read_markdown(data: bytes) -> str:
    blocks: list[str] = []
    for token in MarkdownIt().parse(_decode(data)):
        if token.type == "inline":
            words = (child.content for child in token.children or () if child.type in {"text", "code_inline"})
            blocks.append("".join(words))
        elif token.type in {"code_block", "fence"}:
            blocks.append(token.content)
    return "\n\n".join(blocks)


def _read_plain(data: bytes) -> str:
    return _decode(data)


_READERS = {
    PDF: _read_pdf,
    DOCX: _read_docx,
    HTML: _read_html,
    CSV: _read_csv,
    MARKDOWN: _read_markdown,
    PLAIN: _read_plain,
}
