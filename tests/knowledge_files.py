"""Documents of every supported type, made by the tests themselves, each stating one fact found nowhere else."""

from __future__ import annotations

import io

import docx
from fpdf import FPDF


def pdf(text: str) -> bytes:
    """A one-page PDF saying `text`."""
    document = FPDF()
    document.add_page()
    document.set_font("Helvetica", size=12)
    document.multi_cell(0, 10, text=text)
    return bytes(document.output())


def docx_file(text: str) -> bytes:
    """A Word document with `text` as a paragraph and a table row."""
    document = docx.Document()
    document.add_heading("Price list", level=1)
    document.add_paragraph(text)
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "Support"
    table.rows[0].cells[1].text = "Included"
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def html(text: str, *, links: tuple[str, ...] = ()) -> bytes:
    """A web page with navigation and a footer around `text` (the main text), linking to `links`."""
    anchors = "".join(f'<li><a href="{link}">{link}</a></li>' for link in links)
    return (
        "<!DOCTYPE html><html><head><title>Page</title></head><body>"
        f"<nav><ul><li>Home</li><li>Menu</li>{anchors}</ul></nav>"
        f"<main><article><h1>About us</h1><p>{text}</p>"
        "<p>We have served customers in the region for many years and are glad to help with any question.</p>"
        "</article></main><footer>Copyright footer text</footer></body></html>"
    ).encode()
