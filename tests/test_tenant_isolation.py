"""Tenant isolation enforced by PostgreSQL: as dialtone_api, no organization reads, changes or deletes another's rows.

Tenant tables are found in the catalog at run time (every table with an "organizationId" column), so tables that
later migrations add are held to the same rules without editing this file: they must carry row-level security,
and every attack below is run against each of them. Rows for tables the storage helpers do not fill are made
by a generic factory that follows the catalog's NOT NULL columns and foreign keys.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from storage import api_keys, call_turns, users
from storage.call_turns import TurnRecord
from storage.enums import UserRole, UserStatus
from storage.records import Connection, Queryable, new_id
from storage.tenancy import API_ROLE, ORGANIZATION_SETTING, tenant_transaction
from tests.catalog import Catalog, Column, read_catalog
from tests.test_cascades import build_tenant
from tests.test_repo_agents import insert_voice

# The one policy expression every tenant table carries, as pg_get_expr spells it.
TENANT_EXPRESSION = "(\"organizationId\" = current_setting('app.organization_id'::text, true))"
TENANT_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
# Tables without "organizationId" the API may reach, and how: its own organization (read, rename) and the
# users who are its members (read).
ORGANIZATION_PRIVILEGES = frozenset({"SELECT"})
ORGANIZATION_UPDATABLE_COLUMNS = frozenset({"name", "slug"})
READ_ONLY_TABLES = frozenset({"User"})
BILLING_TABLES = frozenset({"CreditReturn", "DetachedTransferLeg"})
"""Tables with an "organizationId" that only the owner role touches (billing: a row the API role could write would
be credits it could make up): no grant at all, row-level security on all the same."""
USER_SECRET_COLUMNS = frozenset({"password", "twoFactorSecret"})
"""Columns of "User" the API role may not read at all (0009)."""
# Permissive policies besides the tenant policy; each may only widen what is read, never what is written.
EXTRA_READ_POLICIES = frozenset({("Voice", "Voice_system_voices_readable")})
# References by "id" alone that no policy keeps inside the organization: none (0005 and 0008 guard them all). The
# test below fails for any unguarded reference a later migration adds.
KNOWN_UNGUARDED_REFERENCES: frozenset[tuple[str, str]] = frozenset()
RLS_VIOLATION = "violates row-level security policy"
PERMISSION_DENIED = "permission denied"


@dataclass(frozen=True, slots=True)
class Organizations:
    """Two organizations with at least one row in every tenant table, and a system voice."""

    a: str
    b: str
    member_of_b: str  # a user who belongs to B only
    system_voice: str


class _RolledBack(Exception):
    """Ends an attack's transaction so what the attacker could change to its own rows is undone."""


# -- The catalog ------------------------------------------------------------------------------------------------


async def tenant_tables(db: Queryable, *, billing: bool = False) -> list[str]:
    """Every table of the current schema with an "organizationId" column, the `billing` ones (BILLING_TABLES) only
    if asked for."""
    rows = await db.fetch(
        """
        SELECT c.relname FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'organizationId' AND NOT a.attisdropped
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
          AND ($1 OR c.relname <> ALL($2::text[]))
        ORDER BY c.relname
        """,
        billing,
        sorted(BILLING_TABLES),
    )
    return [row["relname"] for row in rows]


async def listed_choices(db: Queryable) -> dict[tuple[str, str], str]:
    """(table, column) → the first value a single-column CHECK ("col" IN ('A', 'B', ...)) allows."""
    rows = await db.fetch(
        """
        SELECT c.conrelid::regclass::text AS table, a.attname AS column, pg_get_constraintdef(c.oid) AS definition
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        WHERE c.contype = 'c' AND cardinality(c.conkey) = 1 AND c.connamespace = current_schema()::regnamespace
        """
    )
    choices: dict[tuple[str, str], str] = {}
    for row in rows:
        literal = re.search(r"= ANY \(ARRAY\['((?:[^']|'')*)'", row["definition"])
        if literal:
            choices[(row["table"].strip('"'), row["column"])] = literal[1].replace("''", "'")
    return choices


# -- Rows for every tenant table -----------------------------------------------------------------------------------


class RowFactory:
    """Finds or makes one row of a table for an organization, making the rows it references first."""

    def __init__(self, db: Queryable, catalog: Catalog, choices: dict[tuple[str, str], str]) -> None:
        self.db = db
        self.catalog = catalog
        self.choices = choices

    async def row(self, table: str, organization_id: str) -> dict[str, Any]:
        """A row of `table` belonging to the organization (a member, for "User"), made if there is none."""
        if table == "Organization":
            return {"id": organization_id}
        if table == "User":
            found = await self.db.fetchrow(
                'SELECT u.* FROM "User" u JOIN "UserOrganization" m ON m."userId" = u."id" '
                'WHERE m."organizationId" = $1 LIMIT 1',
                organization_id,
            )
            assert found is not None, f"organization {organization_id} has no member to reference"
            return dict(found)
        columns = self.catalog.tables[table]
        assert "organizationId" in columns, f'no rule for making a row of "{table}": extend RowFactory'
        found = await self.db.fetchrow(f'SELECT * FROM "{table}" WHERE "organizationId" = $1 LIMIT 1', organization_id)
        if found is not None:
            return dict(found)
        return await self._make(table, organization_id, columns)

    async def _make(self, table: str, organization_id: str, columns: dict[str, Column]) -> dict[str, Any]:
        values: dict[str, Any] = {"organizationId": organization_id}
        for fk in self.catalog.foreign_keys:
            if fk.table != table or fk.referenced_table == table:
                continue
            if not any(columns[c].not_null for c in fk.columns if c != "organizationId"):
                continue  # an optional reference: left empty
            target = await self.row(fk.referenced_table, organization_id)
            for fk_column, referenced in zip(fk.columns, fk.referenced_columns, strict=True):
                values[fk_column] = target[referenced]
        for name, column in columns.items():
            if name not in values and column.not_null and column.default is None:
                values[name] = self._value(table, name, column)
        made = await insert_from_json(self.db, table, values)
        return dict(made)

    def _value(self, table: str, name: str, column: Column) -> Any:
        if (table, name) in self.choices:
            return self.choices[(table, name)]
        if column.type in self.catalog.enums:
            return self.catalog.enums[column.type][0]
        if column.type.endswith("[]"):
            return []
        if column.type == "text" or column.type.startswith("character varying"):
            return new_id()
        if column.type in ("integer", "bigint", "smallint", "double precision", "real") or column.type.startswith(
            "numeric"
        ):
            return 1
        if column.type == "boolean":
            return False
        if column.type in ("jsonb", "json"):
            return {}
        if column.type.startswith("timestamp"):
            return datetime.now(UTC).isoformat()
        if column.type == "tsvector":
            return "probe"
        if column.type == "bytea":
            return "\\x00"
        raise AssertionError(f'no generic value for "{table}"."{name}" of type {column.type}: extend RowFactory')


async def insert_from_json(db: Queryable, table: str, values: dict[str, Any]) -> asyncpg.Record:
    """Insert a row given as JSON-able values (columns left out take their defaults); the row inserted.

    The pool's jsonb codec serialises the values (datetimes as text), and jsonb_populate_record casts each to its
    column's type, so one statement fits every table.
    """
    # bytea travels as its hex text form, which jsonb_populate_record casts back.
    values = {name: "\\x" + value.hex() if isinstance(value, bytes) else value for name, value in values.items()}
    columns = ", ".join(f'"{name}"' for name in values)
    row = await db.fetchrow(
        f'INSERT INTO "{table}" ({columns}) SELECT {columns} FROM jsonb_populate_record(NULL::"{table}", $1::jsonb) '
        "RETURNING *",
        values,
    )
    assert row is not None
    return row


async def seed_organization(pool: asyncpg.Pool) -> tuple[str, str]:
    """An organization with one of everything the storage helpers make; its id and its OWNER's user id."""
    tenant = await build_tenant(pool)
    organization_id = tenant.organization_id
    user = await users.create_user(pool, email=f"{new_id()}@example.com", status=UserStatus.ACTIVE)
    await users.add_member(pool, user_id=user.id, organization_id=organization_id, role=UserRole.OWNER)
    await api_keys.create_api_key(pool, organization_id=organization_id, user_id=user.id, name="CI", live=False)
    await call_turns.insert_turns(
        pool,
        organization_id=organization_id,
        call_log_id=tenant.call_log.id,
        turns=[TurnRecord(index=0, speaker="caller", text="Hello?", start_ms=0, end_ms=900)],
    )
    return organization_id, user.id


@pytest.fixture(scope="module")
async def orgs(pool: asyncpg.Pool) -> Organizations:
    """Organizations A and B, seeded alike as the owner role: the storage helpers' rows, then a generic row in
    every tenant table they leave empty."""
    factory = RowFactory(pool, await read_catalog(pool), await listed_choices(pool))
    a, _ = await seed_organization(pool)
    b, member_of_b = await seed_organization(pool)
    for table in await tenant_tables(pool):
        await factory.row(table, a)
        await factory.row(table, b)
    return Organizations(a=a, b=b, member_of_b=member_of_b, system_voice=await insert_voice(pool, None))


# -- Helpers for the attacks ---------------------------------------------------------------------------------------


async def snapshot(pool: asyncpg.Pool, organization_id: str) -> dict[str, list[str]]:
    """Everything the owner role sees of an organization: its row, its members and every tenant table's rows."""
    found: dict[str, list[str]] = {}
    found["Organization"] = await _texts(
        pool, 'SELECT to_jsonb(t)::text FROM "Organization" t WHERE "id" = $1', organization_id
    )
    found["User"] = await _texts(
        pool,
        'SELECT to_jsonb(u)::text FROM "User" u JOIN "UserOrganization" m ON m."userId" = u."id" '
        'WHERE m."organizationId" = $1',
        organization_id,
    )
    for table in await tenant_tables(pool):
        found[table] = await _texts(
            pool, f'SELECT to_jsonb(t)::text FROM "{table}" t WHERE "organizationId" = $1', organization_id
        )
    return found


async def _texts(db: Queryable, sql: str, *args: Any) -> list[str]:
    return sorted(row[0] for row in await db.fetch(sql, *args))


@asynccontextmanager
async def attack(pool: asyncpg.Pool, organization_id: str) -> AsyncIterator[Connection]:
    """A tenant transaction of `organization_id` that is rolled back at the end, whatever it did."""
    try:
        async with tenant_transaction(pool, organization_id) as conn:
            yield conn
            raise _RolledBack
    except _RolledBack:
        pass


async def refusal(conn: Connection, sql: str, *args: Any) -> str | None:
    """Run `sql` in a savepoint; PostgreSQL's error if it refused, None if it ran."""
    try:
        async with conn.transaction():
            await conn.execute(sql, *args)
    except asyncpg.PostgresError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def visible_row(conn: Connection, table: str) -> dict[str, Any]:
    """One row of `table` the transaction sees: the attacker's own, to forge others from."""
    row = await conn.fetchrow(f'SELECT * FROM "{table}" WHERE "organizationId" IS NOT NULL LIMIT 1')
    assert row is not None, f"the tenant sees no row of its own in {table}"
    return dict(row)


def affected(status: str) -> int:
    """The row count of a command status such as `UPDATE 3`."""
    return int(status.rsplit(" ", 1)[-1])


# -- The role -------------------------------------------------------------------------------------------------------


async def test_the_api_role_is_neither_superuser_nor_bypassrls_and_cannot_log_in(pool: asyncpg.Pool) -> None:
    role = await pool.fetchrow(
        "SELECT rolsuper, rolbypassrls, rolinherit, rolcanlogin, rolcreaterole, rolcreatedb, rolreplication "
        "FROM pg_roles WHERE rolname = $1",
        API_ROLE,
    )
    assert role is not None, f"role {API_ROLE} does not exist"
    assert dict(role) == {
        "rolsuper": False,
        "rolbypassrls": False,
        "rolinherit": False,
        "rolcanlogin": False,
        "rolcreaterole": False,
        "rolcreatedb": False,
        "rolreplication": False,
    }


async def test_the_api_role_belongs_to_no_role_so_it_gains_no_ones_privileges(pool: asyncpg.Pool) -> None:
    memberships = await pool.fetch(
        "SELECT m.roleid::regrole::text FROM pg_auth_members m "
        "WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = $1)",
        API_ROLE,
    )
    assert memberships == []
    owner = await pool.fetchval(
        "SELECT tableowner FROM pg_tables WHERE tablename = 'Agent' AND schemaname = current_schema()"
    )
    assert not await pool.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", API_ROLE, owner)
    assert not await pool.fetchval("SELECT pg_has_role($1, $2, 'USAGE')", API_ROLE, owner)


async def test_a_session_authorized_as_the_api_role_cannot_set_role_to_the_owner(pool: asyncpg.Pool) -> None:
    # SET ROLE is checked against the session user, not the current role. tenant_transaction's connections log
    # in as the owner and only SET LOCAL ROLE, so there a RESET ROLE would leave the API role: the API must never
    # run SQL it did not write. A session that is the API role from the start cannot get out, as checked here.
    # SET SESSION AUTHORIZATION needs a superuser, which the test server's user is.
    owner = await pool.fetchval(
        "SELECT tableowner FROM pg_tables WHERE tablename = 'Agent' AND schemaname = current_schema()"
    )
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = session_user"):
            pytest.skip("the test server's user is not a superuser, so it cannot become the API role's session")
        await conn.execute(f"SET LOCAL SESSION AUTHORIZATION {API_ROLE}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f'SET LOCAL ROLE "{owner}"')


# -- The catalog: every tenant table is covered --------------------------------------------------------------------


async def test_every_tenant_table_has_row_level_security_enabled_not_forced(pool: asyncpg.Pool) -> None:
    tables = await tenant_tables(pool, billing=True)
    assert "Agent" in tables and "CallTurn" in tables and set(tables) >= BILLING_TABLES
    rows = await pool.fetch(
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
        "WHERE relnamespace = current_schema()::regnamespace AND relname = ANY($1::text[])",
        [*tables, "Organization", "User"],
    )
    disabled = sorted(row["relname"] for row in rows if not row["relrowsecurity"])
    forced = sorted(row["relname"] for row in rows if row["relforcerowsecurity"])
    assert disabled == [], f"tables without row-level security: {disabled}"
    # Forced, it would hold the owner role too: the engine's cross-organization work would see nothing.
    assert forced == [], f"tables whose row-level security is forced: {forced}"


async def test_every_tenant_table_has_the_tenant_policy_for_every_command(pool: asyncpg.Pool) -> None:
    policies = await pool.fetch(
        "SELECT tablename, policyname, permissive, roles::text[] AS roles, cmd, qual, with_check "
        "FROM pg_policies WHERE schemaname = current_schema()"
    )
    missing = []
    for table in await tenant_tables(pool, billing=True):
        if not any(
            p["tablename"] == table
            and p["permissive"] == "PERMISSIVE"
            and p["cmd"] == "ALL"
            and p["qual"] == TENANT_EXPRESSION
            and p["with_check"] == TENANT_EXPRESSION
            and ("public" in p["roles"] or API_ROLE in p["roles"])
            for p in policies
        ):
            missing.append(table)
    assert missing == [], f"tenant tables without the tenant policy: {missing}"


async def test_no_permissive_policy_lets_a_tenant_write_beyond_its_organization(pool: asyncpg.Pool) -> None:
    # Permissive policies are OR-ed: one looser policy would undo the tenant policy. Restrictive ones only narrow.
    policies = await pool.fetch(
        "SELECT tablename, policyname, cmd, qual, with_check FROM pg_policies "
        "WHERE schemaname = current_schema() AND permissive = 'PERMISSIVE'"
    )
    organization_expression = TENANT_EXPRESSION.replace('"organizationId"', "id")
    loose = []
    for p in policies:
        expected = organization_expression if p["tablename"] == "Organization" else TENANT_EXPRESSION
        if (p["tablename"], p["policyname"]) in EXTRA_READ_POLICIES and p["cmd"] == "SELECT":
            continue
        if p["tablename"] == "User" and p["cmd"] == "SELECT":
            continue  # reads of members; no write is granted on "User" (checked below)
        if p["qual"] != expected or p["with_check"] not in (expected, None):
            loose.append(f"{p['tablename']}.{p['policyname']} ({p['cmd']}): {p['qual']} / {p['with_check']}")
    assert loose == [], "permissive policies other than the tenant policy:\n" + "\n".join(loose)


async def test_the_api_role_has_exactly_the_privileges_meant_for_it(pool: asyncpg.Pool) -> None:
    tenant = set(await tenant_tables(pool))
    relations = await pool.fetch(
        """
        SELECT c.relname, ARRAY(
            SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) p
            WHERE has_table_privilege($1, c.oid, p)) AS privileges
        FROM pg_class c
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
        """,
        API_ROLE,
    )
    wrong = []
    for row in relations:
        table, granted = row["relname"], frozenset(row["privileges"])
        if table in tenant:
            expected = TENANT_PRIVILEGES
        elif table == "Organization":
            expected = ORGANIZATION_PRIVILEGES
        elif table in READ_ONLY_TABLES:
            expected = frozenset()  # column by column, below
        else:
            expected = frozenset()  # engine-internal and anything not yet decided: out of reach
        if granted != expected:
            wrong.append(f"{table}: has {sorted(granted)}, expected {sorted(expected)}")
    assert wrong == [], "\n".join(wrong)
    column_grants = await pool.fetch(
        "SELECT table_name, column_name, privilege_type FROM information_schema.column_privileges "
        "WHERE grantee = $1 AND table_schema = current_schema() AND table_name <> ALL($2::text[])",
        API_ROLE,
        [*tenant, "Organization", *READ_ONLY_TABLES],
    )
    assert column_grants == [], f"column privileges outside the tenant tables: {[dict(r) for r in column_grants]}"
    updatable = await pool.fetch(
        "SELECT column_name FROM information_schema.column_privileges "
        "WHERE grantee = $1 AND table_schema = current_schema() AND table_name = 'Organization' "
        "AND privilege_type = 'UPDATE'",
        API_ROLE,
    )
    assert {r["column_name"] for r in updatable} == ORGANIZATION_UPDATABLE_COLUMNS
    catalog = await read_catalog(pool)
    user_grants = await pool.fetch(
        "SELECT column_name, privilege_type FROM information_schema.column_privileges "
        "WHERE grantee = $1 AND table_schema = current_schema() AND table_name = 'User'",
        API_ROLE,
    )
    assert {r["privilege_type"] for r in user_grants} == {"SELECT"}
    assert {r["column_name"] for r in user_grants} == set(catalog.tables["User"]) - USER_SECRET_COLUMNS


async def test_the_api_role_cannot_read_a_password_hash_or_a_second_factor_secret(
    pool: asyncpg.Pool, orgs: Organizations
) -> None:
    async with attack(pool, orgs.a) as conn:
        for column in sorted(USER_SECRET_COLUMNS):
            message = await refusal(conn, f'SELECT "{column}" FROM "User"')
            assert message is not None and PERMISSION_DENIED in message, column


async def test_the_api_role_can_call_no_security_definer_function(pool: asyncpg.Pool) -> None:
    # A SECURITY DEFINER function runs as its owner, past every policy.
    functions = await pool.fetch(
        "SELECT proname FROM pg_proc WHERE pronamespace = current_schema()::regnamespace AND prosecdef "
        "AND has_function_privilege($1, oid, 'EXECUTE')",
        API_ROLE,
    )
    assert functions == []


# -- The data: what organization A can do to organization B's rows ------------------------------------------------


async def test_both_organizations_have_rows_in_every_tenant_table(pool: asyncpg.Pool, orgs: Organizations) -> None:
    for organization_id in (orgs.a, orgs.b):
        empty = [table for table, rows in (await snapshot(pool, organization_id)).items() if not rows]
        assert empty == [], f"organization {organization_id} has no rows in {empty}: the attacks would prove nothing"


async def test_a_tenant_sees_its_own_rows_and_none_of_another_organizations(
    pool: asyncpg.Pool, orgs: Organizations
) -> None:
    own = await snapshot(pool, orgs.a)
    leaks = []
    async with attack(pool, orgs.a) as conn:
        for table in await tenant_tables(pool):
            owners = [row[0] for row in await conn.fetch(f'SELECT "organizationId" FROM "{table}"')]
            if any(owner not in (orgs.a, None) for owner in owners) or owners.count(orgs.a) != len(own[table]):
                leaks.append(f"{table}: sees {len(owners)} rows, of which {owners.count(orgs.a)} its own")
            if await conn.fetchval(f'SELECT count(*) FROM "{table}" WHERE "organizationId" = $1', orgs.b):
                leaks.append(f"{table}: finds B's rows by their organizationId")
            if table != "Voice" and None in owners:
                leaks.append(f"{table}: sees rows of no organization")
    assert leaks == [], "\n".join(leaks)


async def test_a_tenant_cannot_update_another_organizations_rows(pool: asyncpg.Pool, orgs: Organizations) -> None:
    before = await snapshot(pool, orgs.b)
    own = await snapshot(pool, orgs.a)
    changed = []
    async with attack(pool, orgs.a) as conn:
        for table in await tenant_tables(pool):
            aimed = await conn.execute(
                f'UPDATE "{table}" SET "organizationId" = $1 WHERE "organizationId" = $1', orgs.b
            )
            unaimed = await conn.execute(f'UPDATE "{table}" SET "organizationId" = "organizationId"')
            if affected(aimed) != 0 or affected(unaimed) != len(own[table]):
                changed.append(f"{table}: {aimed} aimed at B, {unaimed} unaimed (A has {len(own[table])})")
    assert changed == [], "\n".join(changed)
    assert await snapshot(pool, orgs.b) == before


async def test_a_tenant_cannot_delete_another_organizations_rows(pool: asyncpg.Pool, orgs: Organizations) -> None:
    before = await snapshot(pool, orgs.b)
    own = await snapshot(pool, orgs.a)
    deleted = []
    async with attack(pool, orgs.a) as conn:
        for table in await tenant_tables(pool):
            aimed = await conn.execute(f'DELETE FROM "{table}" WHERE "organizationId" = $1', orgs.b)
            if affected(aimed) != 0:
                deleted.append(f"{table}: {aimed} aimed at B")
            # A's own rows, rolled back at the end; counted by owner, not against the snapshot: deletes earlier in the
            # loop queue A's recordings for removal (0030), rows A owns that the snapshot did not have.
            unaimed = await _delete_everything_visible(conn, table)
            if others := {str(owner) for owner in unaimed if owner != orgs.a}:
                deleted.append(f"{table}: deleted unaimed {len(unaimed)} rows, some owned by {sorted(others)}")
    assert deleted == [], "\n".join(deleted)
    assert await snapshot(pool, orgs.b) == before
    assert await snapshot(pool, orgs.a) == own


async def _delete_everything_visible(conn: Connection, table: str) -> list[str | None]:
    """DELETE without WHERE in a savepoint; the organizations of the rows it took (none if A's own references
    blocked it)."""
    try:
        async with conn.transaction():
            return [row[0] for row in await conn.fetch(f'DELETE FROM "{table}" RETURNING "organizationId"')]
    except asyncpg.ForeignKeyViolationError:
        return []  # a NO ACTION reference between A's own rows; the whole statement was undone


async def test_a_tenant_cannot_insert_a_row_for_another_organization(pool: asyncpg.Pool, orgs: Organizations) -> None:
    before = await snapshot(pool, orgs.b)
    accepted = []
    async with attack(pool, orgs.a) as conn:
        for table in await tenant_tables(pool):
            template = await visible_row(conn, table)
            for claimed in (orgs.b, None):
                forged = {**template, "organizationId": claimed}
                if "id" in forged:  # a text id, or a sequence's ("LiveCallEvent"), which the API role never draws
                    forged["id"] = new_id() if isinstance(forged["id"], str) else forged["id"] + 1_000_000
                message = await _refused_insert(conn, table, forged)
                if message is None or RLS_VIOLATION not in message:
                    accepted.append(f"{table} claiming {claimed}: {message or 'inserted'}")
    assert accepted == [], "\n".join(accepted)
    assert await snapshot(pool, orgs.b) == before


async def _refused_insert(conn: Connection, table: str, values: dict[str, Any]) -> str | None:
    """Insert in a savepoint; PostgreSQL's message if it refused the row, None if it was inserted."""
    try:
        async with conn.transaction():
            await insert_from_json(conn, table, values)
    except asyncpg.PostgresError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def test_a_tenant_cannot_move_its_rows_to_another_organization(pool: asyncpg.Pool, orgs: Organizations) -> None:
    before = await snapshot(pool, orgs.b)
    own = await snapshot(pool, orgs.a)
    moved = []
    async with attack(pool, orgs.a) as conn:
        for table in await tenant_tables(pool):
            for target in (orgs.b, None):
                message = await refusal(
                    conn, f'UPDATE "{table}" SET "organizationId" = $2 WHERE "organizationId" = $1', orgs.a, target
                )
                if message is None or RLS_VIOLATION not in message:
                    moved.append(f"{table} to {target}: {message or 'moved'}")
    assert moved == [], "\n".join(moved)
    assert await snapshot(pool, orgs.b) == before
    assert await snapshot(pool, orgs.a) == own


async def test_without_an_organization_a_tenant_transaction_sees_and_changes_nothing(
    pool: asyncpg.Pool, orgs: Organizations
) -> None:
    before = await snapshot(pool, orgs.b)
    system_voices = await pool.fetchval('SELECT count(*) FROM "Voice" WHERE "organizationId" IS NULL')
    seen = []
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {API_ROLE}")
                assert not await conn.fetchval("SELECT current_setting($1, true)", ORGANIZATION_SETTING)
                for table in ["Organization", "User", *await tenant_tables(pool)]:
                    visible = await conn.fetchval(f'SELECT count(*) FROM "{table}"')
                    if visible != (system_voices if table == "Voice" else 0):
                        seen.append(f"{table}: sees {visible} rows")
                    if table not in ("Organization", "User"):
                        deleted = affected(await conn.execute(f'DELETE FROM "{table}"'))
                        if deleted:
                            seen.append(f"{table}: deleted {deleted} rows")
                raise _RolledBack
        except _RolledBack:
            pass
    assert seen == [], "\n".join(seen)
    assert await snapshot(pool, orgs.b) == before


# -- The tables without "organizationId" ---------------------------------------------------------------------------


async def test_a_tenant_reads_and_renames_only_its_own_organization(pool: asyncpg.Pool, orgs: Organizations) -> None:
    before = await snapshot(pool, orgs.b)
    async with attack(pool, orgs.a) as conn:
        assert [r["id"] for r in await conn.fetch('SELECT "id" FROM "Organization"')] == [orgs.a]
        assert (
            affected(await conn.execute('UPDATE "Organization" SET "name" = $2 WHERE "id" = $1', orgs.b, "Mine")) == 0
        )
        assert (
            affected(await conn.execute('UPDATE "Organization" SET "name" = $2 WHERE "id" = $1', orgs.a, "Ours")) == 1
        )
        for sql, args in (
            ('UPDATE "Organization" SET "credits" = 1000000 WHERE "id" = $1', (orgs.a,)),
            ('UPDATE "Organization" SET "plan" = \'enterprise\' WHERE "id" = $1', (orgs.a,)),
            ('UPDATE "Organization" SET "id" = $2 WHERE "id" = $1', (orgs.a, orgs.b)),
            ('DELETE FROM "Organization" WHERE "id" = $1', (orgs.b,)),
            ('INSERT INTO "Organization" ("id", "name", "slug") VALUES ($1, \'New\', $1)', (new_id(),)),
            ('TRUNCATE "Organization" CASCADE', ()),
        ):
            message = await refusal(conn, sql, *args)
            assert message is not None and PERMISSION_DENIED in message, sql
    assert await snapshot(pool, orgs.b) == before


async def test_a_tenant_sees_only_its_members_and_changes_no_user(pool: asyncpg.Pool, orgs: Organizations) -> None:
    before = await snapshot(pool, orgs.b)
    members_of_a = {
        r[0] for r in await pool.fetch('SELECT "userId" FROM "UserOrganization" WHERE "organizationId" = $1', orgs.a)
    }
    async with attack(pool, orgs.a) as conn:
        assert {r[0] for r in await conn.fetch('SELECT "id" FROM "User"')} == members_of_a
        assert await conn.fetchval('SELECT count(*) FROM "User" WHERE "id" = $1', orgs.member_of_b) == 0
        for sql, args in (
            ('UPDATE "User" SET "password" = NULL WHERE "id" = $1', (orgs.member_of_b,)),
            ('UPDATE "User" SET "firstName" = \'Eve\' WHERE "id" = ANY($1::text[])', (list(members_of_a),)),
            ('DELETE FROM "User" WHERE "id" = $1', (orgs.member_of_b,)),
            ('INSERT INTO "User" ("id", "email") VALUES ($1, $1 || \'@example.com\')', (new_id(),)),
        ):
            message = await refusal(conn, sql, *args)
            assert message is not None and PERMISSION_DENIED in message, sql
    assert await snapshot(pool, orgs.b) == before


async def test_system_voices_are_read_by_every_tenant_and_written_by_none(
    pool: asyncpg.Pool, orgs: Organizations
) -> None:
    for organization_id in (orgs.a, orgs.b):
        async with attack(pool, organization_id) as conn:
            assert await conn.fetchval('SELECT count(*) FROM "Voice" WHERE "id" = $1', orgs.system_voice) == 1
            assert (
                affected(await conn.execute('UPDATE "Voice" SET "name" = \'Mine\' WHERE "id" = $1', orgs.system_voice))
                == 0
            )
            assert affected(await conn.execute('DELETE FROM "Voice" WHERE "id" = $1', orgs.system_voice)) == 0
            message = await refusal(
                conn, 'UPDATE "Voice" SET "organizationId" = NULL WHERE "organizationId" = $1', organization_id
            )
            assert message is not None and RLS_VIOLATION in message
    assert await pool.fetchval('SELECT "name" FROM "Voice" WHERE "id" = $1', orgs.system_voice) == "June"


async def test_engine_tables_are_out_of_the_api_roles_reach(pool: asyncpg.Pool, orgs: Organizations) -> None:
    async with attack(pool, orgs.a) as conn:
        for sql in (
            'SELECT * FROM "EngineNode"',
            'DELETE FROM "EngineNode"',
            'SELECT * FROM "SchemaMigration"',
            'DELETE FROM "SchemaMigration"',
            'SELECT * FROM "KnowledgeEmbeddingFailure"',
            'DELETE FROM "KnowledgeEmbeddingFailure"',
            *(f'TRUNCATE "{table}" CASCADE' for table in await tenant_tables(pool)),
        ):
            message = await refusal(conn, sql)
            assert message is not None and PERMISSION_DENIED in message, sql


# -- References: a tenant's rows point only at its own --------------------------------------------------------------


async def test_a_tenant_cannot_point_its_rows_at_another_organizations_rows(
    pool: asyncpg.Pool, orgs: Organizations
) -> None:
    # Foreign-key checks ignore row-level security. Composite keys with "organizationId" keep a reference inside
    # the organization; a reference by "id" alone needs a policy (0005's *_own_references_*), or it is listed.
    catalog = await read_catalog(pool)
    tenant = set(await tenant_tables(pool))
    factory = RowFactory(pool, catalog, await listed_choices(pool))
    before = await snapshot(pool, orgs.b)
    unguarded: dict[tuple[str, str], str] = {}
    async with attack(pool, orgs.a) as conn:
        for fk in catalog.foreign_keys:
            if fk.table not in tenant or fk.referenced_table not in tenant or "organizationId" in fk.columns:
                continue
            foreign = await factory.row(fk.referenced_table, orgs.b)
            template = await visible_row(conn, fk.table)
            forged = {**template, **{c: foreign[r] for c, r in zip(fk.columns, fk.referenced_columns, strict=True)}}
            if "id" in forged and "id" not in fk.columns:
                forged["id"] = new_id()
            # PostgreSQL checks a new row against the policies before constraints, unique indexes and foreign
            # keys: any other outcome than a policy violation means no policy stood in the row's way.
            message = await _refused_insert(conn, fk.table, forged)
            if message is None or RLS_VIOLATION not in message:
                unguarded[(fk.table, ",".join(fk.columns))] = message or "inserted"
    new = [
        f"{table}({columns}): {outcome}"
        for (table, columns), outcome in sorted(unguarded.items())
        if (table, columns) not in KNOWN_UNGUARDED_REFERENCES
    ]
    assert new == [], "rows of A may reference B's rows through:\n" + "\n".join(new)
    assert await snapshot(pool, orgs.b) == before
