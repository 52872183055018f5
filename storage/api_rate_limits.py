"""API rate limits: requests counted per API key in one-minute windows, in PostgreSQL so every engine process
shares the count.

Each key has one "ApiRateLimit" row; a request upserts it in one statement, which either adds one to the current
window's count or, in a new window, starts it again at one. The database's clock names the window, so engine
processes whose clocks drift still agree. The table never holds more than a row per key: there is nothing to
clean up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from storage.records import Queryable

WINDOW_SECONDS = 60
"""The length of a counting window: limits are requests per minute."""


@dataclass(frozen=True, slots=True)
class RequestCount:
    """How many requests a key has made in the current window, and when the window ends."""

    count: int
    reset_after: float
    """Seconds until the window ends and the count starts again."""

    def allowed(self, limit: int) -> bool:
        """Whether this request is within `limit` requests a window."""
        return self.count <= limit

    def remaining(self, limit: int) -> int:
        """Requests the key may still make in this window under `limit`."""
        return max(limit - self.count, 0)

    @property
    def retry_after(self) -> int:
        """Whole seconds until the window ends (at least 1), for a Retry-After header."""
        return max(math.ceil(self.reset_after), 1)


async def count_request(db: Queryable, *, api_key_id: str, organization_id: str) -> RequestCount:
    """Count one request of the key in the current window (one statement) and return the window's count."""
    row = await db.fetchrow(
        """
        INSERT INTO "ApiRateLimit" AS r ("apiKeyId", "organizationId", "windowStart", "count")
        VALUES ($1, $2, date_trunc('minute', CURRENT_TIMESTAMP), 1)
        ON CONFLICT ("apiKeyId", "organizationId") DO UPDATE SET
            "windowStart" = EXCLUDED."windowStart",
            "count" = CASE WHEN r."windowStart" = EXCLUDED."windowStart" THEN r."count" + 1 ELSE 1 END
        RETURNING r."count",
                  EXTRACT(EPOCH FROM r."windowStart" + interval '1 minute' - CURRENT_TIMESTAMP)::float8 AS "resetAfter"
        """,
        api_key_id,
        organization_id,
    )
    assert row is not None  # an upsert always returns its row
    return RequestCount(count=row["count"], reset_after=row["resetAfter"])
