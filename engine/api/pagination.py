"""Cursor pagination, newest first: opaque cursors over a row's (time, id), and the page every list returns."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, Field

from engine.api.errors import ApiError
from engine.api.models import ID_PATTERN, RequestModel, ResponseModel

T = TypeVar("T", bound=BaseModel)

DEFAULT_LIMIT = 50
MAX_LIMIT = 100

_ID = re.compile(ID_PATTERN)

Cursor = Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z0-9_-]*$")]
"""An opaque position in a list: the `nextCursor` of the previous page."""


class PageQuery(RequestModel):
    """The query parameters every list takes: how many items, and where the previous page stopped."""

    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="How many items to return (1-100).")
    cursor: Cursor | None = Field(None, description="The `nextCursor` of the previous page; absent for the first.")

    @property
    def fetch_limit(self) -> int:
        """How many rows to fetch: one more than the page holds, to tell whether another page follows."""
        return self.limit + 1

    def position(self) -> tuple[datetime, str] | None:
        """The (time, id) the page starts after, or None for the first page; 422 for a cursor not ours."""
        return None if not self.cursor else decode_cursor(self.cursor)


def encode_cursor(when: datetime, id: str) -> str:
    """The opaque cursor for the position just after (when, id)."""
    raw = json.dumps([when.isoformat(), id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (when, id) a cursor stands for; 422 naming `cursor` for anything this API did not hand out."""
    not_ours = ApiError(422, "validation_error", "query cursor: not a cursor this API returned", "cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, id = json.loads(raw)
        at = datetime.fromisoformat(when)
        # An id of another shape (a NUL, a lone surrogate) is no row's, and could not even be sent to the database.
        if at.tzinfo is None or not isinstance(id, str) or not _ID.fullmatch(id):
            raise not_ours
        # In UTC, as the API writes it: an offset that takes the time past year 1 or 9999 cannot be compared.
        return at.astimezone(UTC), id
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, OverflowError):
        raise not_ours from None


def next_cursor(items: Sequence[T], limit: int, position: Callable[[T], tuple[datetime, str]]) -> str | None:
    """The cursor of the page after `items` (fetched with limit + 1 rows), or None when this page is the last."""
    if len(items) <= limit:
        return None
    return encode_cursor(*position(items[limit - 1]))


class Page(ResponseModel, Generic[T]):
    """One page of a list, newest first; pass `nextCursor` back as `cursor` for the next (null on the last page)."""

    data: list[T]
    next_cursor: str | None


def by_creation(item: Any) -> tuple[datetime, str]:
    """The position of a row listed by (createdAt, id)."""
    return item.created_at, item.id


def to_page(
    page_type: type[Page[T]],
    rows: Sequence[T],
    query: PageQuery,
    position: Callable[[T], tuple[datetime, str]] = by_creation,
) -> Page[T]:
    """The page of `rows`, which were fetched with `query.limit + 1` so that whether more follow is known."""
    return page_type(data=list(rows[: query.limit]), next_cursor=next_cursor(rows, query.limit, position))
