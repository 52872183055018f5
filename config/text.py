"""Text as every layer can carry it: the one rule for what a UTF-8 body and a PostgreSQL text column can hold.

Text from outside (a recognizer's or a model's JSON, a webhook's reply in whatever charset it declares) can hold a
NUL or a lone surrogate; neither can be stored, and a lone surrogate cannot go out in any UTF-8 body (the model's
next request, a webhook, a live event). Where such text enters (the call's recognizer events, the replies read by
`pipelines.http_bodies`, the rows stored) it goes through `storable_text`.
"""

from __future__ import annotations


def storable_text(text: str) -> str:
    """`text` as a PostgreSQL text column or jsonb string can hold it: every NUL and lone surrogate (half an emoji,
    which JSON can carry) becomes U+FFFD, and a surrogate pair that arrived split is joined into its character."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text.replace("\x00", "\ufffd")
