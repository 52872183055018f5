"""schema.prisma and the migrated database agree: enums, tables, columns, keys, indexes and foreign keys.

The comparison follows what Prisma's schema engine would create for schema.prisma on PostgreSQL, so a Prisma-based
dashboard can share the database. Tables that are not models (the engine's own, e.g. "SchemaMigration") are fine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import asyncpg
import pytest

from tests.catalog import Catalog, Column, ForeignKey, Index, read_catalog
from tests.prisma_schema import SCHEMA_PATH, Field, Model, PrismaSchema, load_schema, parse_schema

# Prisma's PostgreSQL type for each scalar type of a field without a @db attribute (format_type's spelling).
SCALAR_TYPES = {
    "String": "text",
    "Int": "integer",
    "BigInt": "bigint",
    "Float": "double precision",
    "Decimal": "numeric(65,30)",
    "Boolean": "boolean",
    "Json": "jsonb",
    "Bytes": "bytea",
    "DateTime": "timestamp(3) without time zone",
}
NATIVE_TYPES = {"Date": "date", "Text": "text", "Uuid": "uuid", "JsonB": "jsonb", "DoublePrecision": "double precision"}
REFERENTIAL_ACTIONS = {
    "Cascade": "CASCADE",
    "SetNull": "SET NULL",
    "NoAction": "NO ACTION",
    "Restrict": "RESTRICT",
    "SetDefault": "SET DEFAULT",
}
# @default functions Prisma Client evaluates itself: the column gets no database default.
CLIENT_SIDE_DEFAULT = re.compile(r"(cuid|uuid|nanoid|ulid)\(.*\)")


def schema_differences(schema: PrismaSchema, catalog: Catalog) -> list[str]:
    """Every way the database differs from what Prisma would create for `schema`, one sentence each."""
    differences = [*enum_differences(schema, catalog)]
    for model in schema.models.values():
        columns = catalog.tables.get(model.name)
        if columns is None:
            differences.append(f'model {model.name}: the database has no table "{model.name}"')
            continue
        differences += column_differences(model, columns, schema.enums)
        differences += index_differences(model, catalog)
        differences += foreign_key_differences(model, catalog)
    return differences


def enum_differences(schema: PrismaSchema, catalog: Catalog) -> Iterable[str]:
    """Enums missing from the database, values missing on either side, values in another order."""
    for name, values in schema.enums.items():
        actual = catalog.enums.get(name)
        if actual is None:
            yield f"enum {name}: the database has no enum type {name}"
            continue
        yield from (f"enum {name}: value {v} is missing from the database" for v in values if v not in actual)
        yield from (f"enum {name}: database value {v} is not in schema.prisma" for v in actual if v not in values)
        common = [v for v in values if v in actual]
        if common != [v for v in actual if v in values]:
            yield f"enum {name}: values are in the order {', '.join(actual)} in the database, not {', '.join(values)}"


def column_differences(model: Model, columns: dict[str, Column], enums: dict[str, tuple[str, ...]]) -> Iterable[str]:
    """Each scalar field is a column of the right type, nullability and default; no other columns."""
    fields = {f.name: f for f in model.scalar_fields}
    yield from (f"model {model.name}: field {n} has no column in the database" for n in fields if n not in columns)
    yield from (
        f"model {model.name}: column {n} in the database is not a field in schema.prisma"
        for n in columns
        if n not in fields
    )
    for field in (f for f in model.scalar_fields if f.name in columns):
        column, where = columns[field.name], f"model {model.name}, field {field.name}"
        if column.type != (expected := expected_type(field, enums)):
            yield f"{where}: the column's type is {column.type}, schema.prisma means {expected}"
        # Prisma makes a scalar list (String[]) a nullable array column: lists cannot be optional in Prisma.
        if column.not_null != (not_null := not field.optional and not field.is_list):
            nullability = {True: "NOT NULL", False: "nullable"}
            yield f"{where}: the column is {nullability[column.not_null]}, schema.prisma means {nullability[not_null]}"
        if database_default(column.default) != (default := expected_default(field)):
            yield f"{where}: the column's default is {column.default}, schema.prisma means {default}"


def index_differences(model: Model, catalog: Catalog) -> Iterable[str]:
    """The primary key, unique keys and @@index are the table's indexes, under Prisma's names; no others."""
    expected: dict[str, Index] = {}

    def expect(
        suffix: str, columns: tuple[str, ...], descending: tuple[bool, ...], unique: bool, primary: bool
    ) -> None:
        """Prisma's index `<model>_<suffix>`: never partial."""
        name = f"{model.name}_{suffix}"
        expected[name] = Index(name, model.name, columns, descending, unique, primary, partial=False)

    expect("pkey", model.primary_key, (False,) * len(model.primary_key), True, True)
    for key in model.unique_keys:
        expect(f"{'_'.join(key)}_key", key, (False,) * len(key), True, False)
    for fields in model.indexes:
        columns, descending = tuple(f.name for f in fields), tuple(f.descending for f in fields)
        expect(f"{'_'.join(columns)}_idx", columns, descending, False, False)
    actual = {index.name: index for index in catalog.indexes if index.table == model.name}
    where = f"model {model.name}: index"
    for name, index in expected.items():
        if name not in actual:
            yield f"{where} {name} {index.describe()} is missing from the database"
        elif actual[name] != index:
            yield f"{where} {name} is {actual[name].describe()} in the database, not {index.describe()}"
    for name in sorted(actual.keys() - expected.keys()):
        yield f"{where} {name} {actual[name].describe()} in the database is not in schema.prisma"


def foreign_key_differences(model: Model, catalog: Catalog) -> Iterable[str]:
    """Each @relation(fields: ...) is a foreign key under Prisma's name, with Prisma's referential actions."""
    expected: dict[str, tuple[str, ForeignKey]] = {}
    for field in model.fields:
        if (relation := field.relation) is None:
            continue
        # Prisma's defaults: a required relation restricts deletes, an optional one sets null; updates cascade.
        on_delete = relation.on_delete or ("SetNull" if field.optional else "Restrict")
        action = REFERENTIAL_ACTIONS[on_delete]
        required = {f.name for f in model.scalar_fields if not f.optional}
        if on_delete == "SetNull" and required & set(relation.fields):
            # A composite tenant key (agentId, organizationId): clearing organizationId too, as Prisma's own DDL
            # would, breaks its NOT NULL, so the migration clears only the optional columns (PostgreSQL 15+).
            action += f" ({', '.join(f for f in relation.fields if f not in required)})"
        name = f"{model.name}_{'_'.join(relation.fields)}_fkey"
        foreign_key = ForeignKey(
            name,
            model.name,
            relation.fields,
            field.type,
            relation.references,
            action,
            REFERENTIAL_ACTIONS[relation.on_update or "Cascade"],
        )
        expected[name] = (field.name, foreign_key)
    actual = {key.name: key for key in catalog.foreign_keys if key.table == model.name}
    for name, (field_name, key) in expected.items():
        where = f"model {model.name}, field {field_name}"
        if name not in actual:
            yield f"{where}: foreign key {name} {key.describe()} is missing from the database"
        elif actual[name] != key:
            yield f"{where}: foreign key {name} is {actual[name].describe()} in the database, not {key.describe()}"
    for name in sorted(actual.keys() - expected.keys()):
        extra = actual[name]
        yield f"model {model.name}: foreign key {name} {extra.describe()} in the database is not in schema.prisma"


def expected_type(field: Field, enums: dict[str, tuple[str, ...]]) -> str:
    """The column type Prisma creates for a scalar field, in format_type's spelling (enums by bare name)."""
    if field.type in enums:
        base = field.type
    elif field.native_type is not None:
        base = native_type(field.native_type)
    else:
        base = SCALAR_TYPES.get(field.type, f"{field.type} (a type this test has no mapping for)")
    return f"{base}[]" if field.is_list else base


def native_type(written: str) -> str:
    """format_type's spelling of a @db type: `Timestamptz(3)` → `timestamp(3) with time zone`."""
    if timestamp := re.fullmatch(r"Timestamp(?P<tz>tz)?(?:\((?P<precision>\d+)\))?", written):
        precision = f"({timestamp['precision']})" if timestamp["precision"] else ""
        return f"timestamp{precision} with{'' if timestamp['tz'] else 'out'} time zone"
    return NATIVE_TYPES.get(written, f"@db.{written} (a type this test has no mapping for)")


def expected_default(field: Field) -> str | None:
    """The database default Prisma creates for @default, as database_default() would read it back."""
    written = field.default
    if written is None or CLIENT_SIDE_DEFAULT.fullmatch(written):
        return None
    if written == "now()":
        return "CURRENT_TIMESTAMP"
    if written.startswith('"'):
        value: str = json.loads(written)
        return value
    return "ARRAY[]" if written == "[]" else written


def database_default(expression: str | None) -> str | None:
    """A column default without its cast and quotes: `'free'::"Plan"` → `free`, `ARRAY[]::text[]` → `ARRAY[]`."""
    if expression is None:
        return None
    value = re.sub(r"::[^:']+$", "", expression)
    if len(value) >= 2 and value[0] == value[-1] == "'":
        value = value[1:-1].replace("''", "'")
    return value


@pytest.fixture(scope="module")
async def catalog(pool: asyncpg.Pool) -> Catalog:
    """The catalog of this module's freshly migrated database."""
    return await read_catalog(pool)


async def test_the_migrated_database_is_what_prisma_would_create_from_schema_prisma(catalog: Catalog) -> None:
    differences = schema_differences(load_schema(), catalog)
    assert differences == [], "schema.prisma and storage/migrations disagree:\n" + "\n".join(differences)


SCHEMA_TEXT = SCHEMA_PATH.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("written", "altered", "expected"),
    [
        pytest.param(
            "  MISSED\n  IN_PROGRESS\n",
            "  MISSED\n",
            ["enum CallStatus: database value IN_PROGRESS is not in schema.prisma"],
            id="enum value removed",
        ),
        pytest.param(
            "  ACTIVE\n  INACTIVE\n",
            "  INACTIVE\n  ACTIVE\n",
            ["enum AgentStatus: values are in the order ACTIVE, INACTIVE in the database, not INACTIVE, ACTIVE"],
            id="enum values reordered",
        ),
        pytest.param(
            "  batchName          String\n",
            "  campaignName       String\n",
            [
                "model Campaign: field campaignName has no column in the database",
                "model Campaign: column batchName in the database is not a field in schema.prisma",
            ],
            id="field renamed",
        ),
        pytest.param(
            "  webhookUrl     String\n",
            "  webhookUrl     String?\n",
            ["model Event, field webhookUrl: the column is NOT NULL, schema.prisma means nullable"],
            id="field made optional",
        ),
        pytest.param(
            "  duration       Int?\n",
            "  duration       Float?\n",
            ["model CallLog, field duration: the column's type is integer, schema.prisma means double precision"],
            id="field type changed",
        ),
        pytest.param(
            "  plan      Plan     @default(free)\n",
            "  plan      Plan     @default(pro)\n",
            ["model Organization, field plan: the column's default is 'free'::\"Plan\", schema.prisma means pro"],
            id="default changed",
        ),
        pytest.param(
            "  @@index([organizationId, timestamp(sort: Desc)])\n",
            "  @@index([organizationId, timestamp])\n",
            [
                "model CallLog: index CallLog_organizationId_timestamp_idx is (organizationId, timestamp DESC) "
                "in the database, not (organizationId, timestamp)"
            ],
            id="index sort order dropped",
        ),
        pytest.param(
            "  callId         String     @unique\n",
            "  callId         String\n",
            ["model CallLog: index CallLog_callId_key UNIQUE (callId) in the database is not in schema.prisma"],
            id="unique removed",
        ),
        pytest.param(
            "  agent        Agent?       @relation(fields: [agentId, organizationId], "
            "references: [id, organizationId], onDelete: Cascade)\n",
            "  agent        Agent?       @relation(fields: [agentId, organizationId], "
            "references: [id, organizationId])\n",
            [
                "model Event, field agent: foreign key Event_agentId_organizationId_fkey is (agentId, organizationId) "
                "→ Agent(id, organizationId) ON DELETE CASCADE ON UPDATE CASCADE in the database, not "
                "(agentId, organizationId) → Agent(id, organizationId) ON DELETE SET NULL (agentId) ON UPDATE CASCADE"
            ],
            id="onDelete left to Prisma's default",
        ),
        pytest.param(
            "model Event {\n",
            "model Webhook {\n  id String @id\n}\n\nmodel Event {\n",
            ['model Webhook: the database has no table "Webhook"'],
            id="model added",
        ),
    ],
)
async def test_each_kind_of_disagreement_is_reported(
    catalog: Catalog, written: str, altered: str, expected: list[str]
) -> None:
    assert SCHEMA_TEXT.count(written) == 1, f"schema.prisma no longer has exactly one {written!r}: update this case"
    schema = parse_schema(SCHEMA_TEXT.replace(written, altered))
    assert schema_differences(schema, catalog) == expected
