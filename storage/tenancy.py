"""Tenant-scoped transactions: the API's queries run as a role that row-level security applies to.

Migration 0004 creates the role `dialtone_api` (neither superuser nor BYPASSRLS); each tenant table's
policy compares its "organizationId" with the transaction-local setting `app.organization_id`. Both are
set with SET LOCAL semantics, so they end with the transaction and a pooled connection carries nothing
over to the next request.

What this defends against: a query of the API's that forgets its organization filter, or an endpoint that
looks a row up by id alone, still sees only the caller's rows. What it does not: SQL the API did not write
could RESET ROLE, as it could set app.organization_id to another organization under any login role, so
injection stays excluded the usual way (every value a bind parameter, no SQL built from input). This is the
pattern PostgREST uses (an authenticator connection switching to the request's role).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from storage.records import Connection

API_ROLE = "dialtone_api"
ORGANIZATION_SETTING = "app.organization_id"


@asynccontextmanager
async def tenant_transaction(pool: asyncpg.Pool, organization_id: str) -> AsyncIterator[Connection]:
    """A transaction that sees and changes only `organization_id`'s rows, enforced by PostgreSQL."""
    async with pool.acquire() as conn, conn.transaction():
        # One round trip for both (set_config('role', ...) is SET LOCAL ROLE): a call's knowledge search pays
        # for every round trip on the caller's turn.
        await conn.execute(
            "SELECT set_config('role', $1, true), set_config($2, $3, true)",
            API_ROLE,
            ORGANIZATION_SETTING,
            organization_id,
        )
        yield conn
