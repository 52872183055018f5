"""Split a document's text into overlapping passages of about a given size, on sentence boundaries where possible."""

from __future__ import annotations

import re
from collections.abc import Iterator

_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_LEADING_SPACE = re.compile(r"\s*")


def _pieces(text: str, size: int) -> list[str]:
    """Sentences (one paragraph's tail ends with a paragraph break), each cut to at most `size` characters."""
    pieces: list[str] = []
    for paragraph in _PARAGRAPHS.split(text):
        lines = " ".join(_SPACES.sub(" ", line).strip() for line in paragraph.splitlines())
        for raw in _SENTENCE_END.split(lines.strip()):
            pieces += _cut(raw.strip(), size)
    return pieces


def _cut(sentence: str, size: int) -> Iterator[str]:
    """`sentence` in pieces of at most `size` characters, each cut at its last space past half its size if any.

    It walks by index: slicing the rest off after each piece would copy the remainder once per piece, which made
    a long text with no sentence end cost time in the square of its length.
    """
    start, end = 0, len(sentence)
    while end - start > size:
        cut = sentence.rfind(" ", start, start + size)
        cut = cut if cut - start > size // 2 else start + size
        yield sentence[start:cut].strip()
        spaces = _LEADING_SPACE.match(sentence, cut)
        start = spaces.end() if spaces else cut
    if start < end:
        yield sentence[start:]


def split_into_chunks(text: str, *, size: int, overlap: int) -> list[str]:
    """Passages of at most `size` characters built from whole sentences, each starting with up to `overlap`
    characters of the previous passage's last sentences, so a fact cut by a boundary is whole in one of them.

    A sentence longer than `size` is cut at a space. Whitespace inside lines is collapsed.
    """
    if size < 1:
        raise ValueError(f"chunk size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"chunk overlap must be at least 0 and less than the size ({size}), got {overlap}")
    chunks: list[str] = []
    current: list[str] = []
    length = 0
    fresh = 0  # sentences in `current` not already in the previous chunk
    for piece in _pieces(text, size):
        if current and length + 1 + len(piece) > size:
            if fresh:
                chunks.append(" ".join(current))
            carried: list[str] = []
            carried_length = 0
            for sentence in reversed(current):
                if (
                    carried_length + len(sentence) + 1 > overlap
                    or carried_length + len(sentence) + len(piece) + 1 > size
                ):
                    break
                carried.insert(0, sentence)
                carried_length += len(sentence) + 1
            current, length, fresh = carried, carried_length, 0
        current.append(piece)
        length += len(piece) + (1 if length else 0)
        fresh += 1
    if current and fresh:
        chunks.append(" ".join(current))
    return chunks
