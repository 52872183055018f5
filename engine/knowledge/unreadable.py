"""The error a knowledge document that cannot be read raises, apart from the parsers so that light modules (the
child process that only cuts text) can name it without importing them."""

from __future__ import annotations


class UnreadableDocument(ValueError):
    """The bytes are not a supported document, or hold no text; the message says which (shown to the user)."""
