"""Tenant isolation through HTTP: every /v1 operation, called with organization A's key, finds none of B's rows.

The operations are read from the API's own route table (engine.api.routes.RESOURCES), so an endpoint added later
is walked without editing this file: one whose path names a parameter this file cannot resolve to a table, or
whose body it cannot fill, fails with a message saying what to add. The engine runs for real on loopback, with
the database row-level security of migration 0005 beneath it; tests/test_tenant_isolation.py checks that layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.api.operations import Operation
from engine.api.routes import PREFIX, RESOURCES
from storage import api_keys, do_not_call, events, users
from storage.enums import UserRole, UserStatus
from storage.records import new_id
from storage.webhook_outbox import WebhookEvent, enqueue_event
from tests.catalog import read_catalog
from tests.engine_server import running_engine
from tests.fakes.twilio import FakeTwilio
from tests.test_tenant_isolation import seed_organization, snapshot, tenant_tables

# Path parameters whose table is not their name without "Id" ("agentId" → "Agent").
PARAMETER_TABLES = {
    "documentId": "KnowledgeBaseDocument",
    "deliveryId": "WebhookDelivery",
    "recipientId": "CampaignRecipient",
    "entryId": "DoNotCallEntry",
}
# A body value for a field the generic filler cannot guess, by the field's JSON name (None: leave it out).
FIELD_SAMPLES: dict[str, Any] = {
    "type": "TEXT",
    "webhookUrl": "https://example.com/hook",
    "url": None,
    "recipients": [{"phoneNumber": "+12125550100"}],
    "csv": None,
    "defaultRegion": None,
    "to": "+12125550100",
    "fromNumber": None,
    "startDate": None,
    "startTime": None,
    "callStartTime": None,
    "callEndTime": None,
    "daysOfWeek": None,
    "timezone": None,
    "retry": None,
}


@dataclass(frozen=True, slots=True)
class Tenant:
    """An organization seeded with every resource the API serves, and an OWNER's API key."""

    organization_id: str
    key: str


@dataclass(frozen=True, slots=True)
class Walk:
    """The two organizations, and every id of B's rows by table."""

    a: Tenant
    b: Tenant
    ids_of_b: dict[str, list[str]]

    def all_ids_of_b(self) -> set[str]:
        """B's organization id and the id of every row B owns."""
        return {self.b.organization_id, *(i for ids in self.ids_of_b.values() for i in ids)}


async def seed_tenant(pool: asyncpg.Pool) -> Tenant:
    """An organization with what the storage helpers make (every resource the API serves) and an OWNER's key.

    Not the generic rows of the engine's own tables (webhook outbox, campaign dispatch): the running engine's
    background workers would act on them (deliver webhooks to the internet, dial) and change them as they should.
    """
    organization_id, _ = await seed_organization(pool)
    owner = await users.create_user(pool, email=f"{new_id()}@example.com", status=UserStatus.ACTIVE)
    await users.add_member(pool, user_id=owner.id, organization_id=organization_id, role=UserRole.OWNER)
    created = await api_keys.create_api_key(
        pool, organization_id=organization_id, user_id=owner.id, name="isolation", live=True
    )
    # A delivery in the log, given up already so the engine's delivery worker leaves it as it is.
    await events.create_event(
        pool, organization_id=organization_id, name="call.ended", webhook_url="https://example.com/hook"
    )
    async with pool.acquire() as conn, conn.transaction():
        await enqueue_event(
            conn, organization_id=organization_id, event=WebhookEvent.CALL_ENDED, data={"callLogId": "x"}
        )
        await conn.execute(
            """UPDATE "WebhookDelivery" SET "status" = 'FAILED' WHERE "organizationId" = $1""", organization_id
        )
    await do_not_call.add_entry(
        pool, organization_id=organization_id, phone_number="+12125550199", source=do_not_call.DoNotCallSource.API
    )
    # Agents that may place calls, so that POST /v1/calls with one of them gets as far as the ids it names.
    await pool.execute(
        """UPDATE "Agent" SET "callerType" = 'OUTBOUND', "status" = 'ACTIVE' WHERE "organizationId" = $1""",
        organization_id,
    )
    return Tenant(organization_id, created.plaintext)


async def ids_by_table(pool: asyncpg.Pool, organization_id: str) -> dict[str, list[str]]:
    """The "id" of every row the organization owns, by table (tables without an "id" column left out)."""
    catalog = await read_catalog(pool)
    found: dict[str, list[str]] = {}
    for table in await tenant_tables(pool):
        if "id" in catalog.tables[table]:
            rows = await pool.fetch(f'SELECT "id" FROM "{table}" WHERE "organizationId" = $1', organization_id)
            found[table] = [row["id"] for row in rows]
    return found


@pytest.fixture(scope="module")
async def walk(pool: asyncpg.Pool) -> Walk:
    """Organizations A and B, seeded alike."""
    a = await seed_tenant(pool)
    b = await seed_tenant(pool)
    return Walk(a, b, await ids_by_table(pool, b.organization_id))


@pytest.fixture(scope="module")
async def http(db_url: str, twilio: FakeTwilio) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A client session and the base URL of the engine running on loopback, with a Twilio account (the fake's), so
    that POST /v1/calls reads its body."""
    engine = running_engine(
        db_url,
        dispatch_enabled=False,
        twilio_auth_token=twilio.auth_token,
        twilio_account_sid=twilio.account_sid,
        twilio_api_base=twilio.api_base,
    )
    async with engine as base, aiohttp.ClientSession() as session:
        yield session, base


def operations() -> list[Operation]:
    """Every operation the API serves."""
    return [operation for resource in RESOURCES for operation in resource.operations]


def table_of(parameter: str) -> str:
    """The table a path parameter names a row of."""
    return PARAMETER_TABLES.get(parameter, parameter[0].upper() + parameter[1:].removesuffix("Id"))


def sample_body(operation: Operation, own_ids: dict[str, list[str]]) -> dict[str, Any] | None:
    """A body the operation's model accepts: every field filled (an update: its first field only), references to
    other resources with the ids of the caller's own rows."""
    if operation.body is None:
        return None
    schema = operation.body.model_json_schema(by_alias=True)
    body = {
        name: own_ids[table_of(name)][0] if own_ids.get(table_of(name)) else _sample(name, prop, schema)
        for name, prop in schema.get("properties", {}).items()
    }
    body = {name: value for name, value in body.items() if value is not None}
    if operation.method == "PATCH":
        return dict(list(body.items())[:1])
    return body


def _sample(name: str, prop: dict[str, Any], schema: dict[str, Any]) -> Any:
    if name in FIELD_SAMPLES:
        return FIELD_SAMPLES[name]
    if "$ref" in prop:
        return _sample(name, schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]], schema)
    options = [option for option in prop.get("anyOf", ()) if option.get("type") != "null"]
    if options:
        return _sample(name, options[0], schema)
    if "enum" in prop:
        return prop["enum"][0]
    kind = prop.get("type")
    if kind == "string":
        if prop.get("format") == "date-time":
            return "2099-01-01T00:00:00Z"
        return "isolation-probe"
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        return 1
    if kind == "object":
        return {}
    if kind == "array":
        return []
    raise AssertionError(f"no sample for body field {name!r} ({prop}): add it to FIELD_SAMPLES")


async def call(
    http: tuple[aiohttp.ClientSession, str], method: str, path: str, key: str, body: Any = None
) -> tuple[int, str]:
    """Send a request to /v1 with the key; the status and the raw response text."""
    session, base = http
    headers = {"Authorization": f"Bearer {key}"}
    async with session.request(method, f"{base}{PREFIX}{path}", json=body, headers=headers) as response:
        return response.status, await response.text()


def path_with(operation: Operation, ids: dict[str, str]) -> str:
    """The operation's path with its parameters replaced by the given ids."""
    return re.sub(r"\{(\w+)\}", lambda m: ids[m[1]], operation.path)


async def test_no_operation_reaches_another_organizations_row_by_its_id(
    pool: asyncpg.Pool, walk: Walk, http: tuple[aiohttp.ClientSession, str]
) -> None:
    before = await snapshot(pool, walk.b.organization_id)
    own_ids = await ids_by_table(pool, walk.a.organization_id)
    answered = []
    walked = 0
    for operation in operations():
        if not operation.path_params:
            continue
        ids = {}
        for parameter in operation.path_params:
            table = table_of(parameter)
            assert walk.ids_of_b.get(table), f"{operation.path}: no row of B for {{{parameter}}} (table {table})"
            ids[parameter] = walk.ids_of_b[table][0]
        if "documentId" in ids:  # the document's own knowledge base, so only the organization differs
            ids["knowledgeBaseId"] = await pool.fetchval(
                'SELECT "knowledgeBaseId" FROM "KnowledgeBaseDocument" WHERE "id" = $1', ids["documentId"]
            )
        status, text = await call(
            http, operation.method, path_with(operation, ids), walk.a.key, sample_body(operation, own_ids)
        )
        walked += 1
        if status != 404:
            answered.append(f"{operation.method} {operation.path}: {status} {text[:200]}")
    assert walked > 0
    assert answered == [], "operations that did not answer 404 for B's row:\n" + "\n".join(answered)
    assert await snapshot(pool, walk.b.organization_id) == before


async def test_no_read_shows_another_organizations_rows(
    pool: asyncpg.Pool, walk: Walk, http: tuple[aiohttp.ClientSession, str]
) -> None:
    # Reads without path parameters (lists, the organization): B's ids must appear nowhere in the answer, even
    # when a filter names one of B's rows.
    secrets_of_b = walk.all_ids_of_b()
    leaks = []
    for operation in operations():
        if operation.method != "GET" or operation.path_params:
            continue
        if operation.streamed is not None:  # answers for as long as it is read: test_live_events checks its rows
            continue
        variants = [""]
        if operation.query is not None:
            fields = operation.query.model_json_schema(by_alias=True).get("properties", {})
            variants += [
                f"?{name}={walk.ids_of_b[table_of(name)][0]}"
                for name in fields
                if name.endswith("Id") and walk.ids_of_b.get(table_of(name))
            ]
        for query in variants:
            status, text = await call(http, "GET", operation.path + query, walk.a.key)
            if status != 200:
                leaks.append(f"GET {operation.path}{query}: {status} {text[:200]}")
            shown = secrets_of_b & set(re.findall(r"[A-Za-z0-9_-]{20,}", text))
            if shown:
                leaks.append(f"GET {operation.path}{query}: shows B's ids {sorted(shown)}")
    assert leaks == [], "\n".join(leaks)


async def test_no_write_attaches_another_organizations_rows(
    pool: asyncpg.Pool, walk: Walk, http: tuple[aiohttp.ClientSession, str]
) -> None:
    # Creations and updates whose body names another resource by id: naming B's must be refused, not stored, and
    # refused by the one rule for an id in a body: 422 `invalid_reference` naming the field (a path's id is a 404).
    before = await snapshot(pool, walk.b.organization_id)
    accepted = []
    own_ids = await ids_by_table(pool, walk.a.organization_id)
    for operation in operations():
        body = sample_body(operation, own_ids)
        if operation.body is None or body is None:
            continue
        fields = operation.body.model_json_schema(by_alias=True).get("properties", {})
        references = [name for name in fields if name.endswith("Id") and walk.ids_of_b.get(table_of(name))]
        path_ids = {p: own_ids[table_of(p)][0] for p in operation.path_params}
        for reference in references:
            foreign = {reference: walk.ids_of_b[table_of(reference)][0]}
            forged = foreign if operation.method == "PATCH" else {**body, **foreign}
            status, text = await call(http, operation.method, path_with(operation, path_ids), walk.a.key, forged)
            error = json.loads(text).get("error", {}) if status >= 400 else {}
            if (status, error.get("code"), error.get("field")) != (422, "invalid_reference", reference):
                accepted.append(f"{operation.method} {operation.path} with B's {reference}: {status} {text[:200]}")
    assert accepted == [], "\n".join(accepted)
    assert await snapshot(pool, walk.b.organization_id) == before
    referencing = await _rows_of_a_referencing_b(pool, walk)
    assert referencing == [], f"rows of A that reference B's: {referencing}"


async def _rows_of_a_referencing_b(pool: asyncpg.Pool, walk: Walk) -> list[str]:
    catalog = await read_catalog(pool)
    tenant = set(await tenant_tables(pool))
    found = []
    for fk in catalog.foreign_keys:
        if fk.table not in tenant or fk.referenced_table not in tenant or len(fk.columns) != 1:
            continue
        count = await pool.fetchval(
            f'SELECT count(*) FROM "{fk.table}" t JOIN "{fk.referenced_table}" r ON r."{fk.referenced_columns[0]}" = '
            f't."{fk.columns[0]}" WHERE t."organizationId" = $1 AND r."organizationId" = $2',
            walk.a.organization_id,
            walk.b.organization_id,
        )
        if count:
            found.append(f"{fk.table}.{fk.columns[0]}: {count}")
    return found
