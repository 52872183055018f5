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

`tenant_read_transaction` is the same isolation for a call's reads on its turn (knowledge search), in three round
trips instead of five: BEGIN with the role and the organization in one message, the reads, then COMMIT with the
pool's reset query in one message.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import asyncpg

from storage.pool import PooledConnection
from storage.records import Connection

API_ROLE = "dialtone_api"
ORGANIZATION_SETTING = "app.organization_id"

_SET_TENANT = "SELECT set_config('role', $1, true), set_config($2, $3, true)"
"""Both transaction-local settings in one statement (set_config('role', ...) is SET LOCAL ROLE)."""

_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""Organization ids that may be written into SQL as a literal: CUIDs and the like, nothing that could end it."""


@asynccontextmanager
async def tenant_transaction(pool: asyncpg.Pool, organization_id: str) -> AsyncIterator[Connection]:
    """A transaction that sees and changes only `organization_id`'s rows, enforced by PostgreSQL."""
    async with pool.acquire() as conn, conn.transaction():
        # One round trip for both (set_config('role', ...) is SET LOCAL ROLE): a call's knowledge search pays
        # for every round trip on the caller's turn.
        await conn.execute(_SET_TENANT, API_ROLE, ORGANIZATION_SETTING, organization_id)
        yield conn


@asynccontextmanager
async def tenant_read_transaction(pool: asyncpg.Pool, organization_id: str) -> AsyncIterator[Connection]:
    """A READ ONLY transaction that sees only `organization_id`'s rows, in three round trips (module docstring).

    For a few reads on a call's turn. The transaction is begun by hand, so the connection refuses a nested
    `transaction()`; the pool must be storage.pool.create_pool's, whose connections can be reset as they commit.
    """
    async with pool.acquire() as conn:
        pooled = cast(PooledConnection, conn)  # the pool's proxy passes PooledConnection's own methods through
        try:
            if _PLAIN_ID.fullmatch(organization_id):
                await conn.execute(
                    f"BEGIN READ ONLY; SELECT set_config('role', '{API_ROLE}', true), "
                    f"set_config('{ORGANIZATION_SETTING}', '{organization_id}', true)"
                )
            else:  # an id shaped otherwise travels as a bind parameter, at the cost of a round trip
                await conn.execute("BEGIN READ ONLY")
                await conn.execute(_SET_TENANT, API_ROLE, ORGANIZATION_SETTING, organization_id)
            yield conn
        except BaseException:
            if not conn.is_closed():
                await pooled.end_transaction_and_reset("ROLLBACK")
            raise
        await pooled.end_transaction_and_reset("COMMIT")
