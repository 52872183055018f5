"""One reader of the database catalog for the schema tests: enum types, tables' columns, indexes, foreign keys.

Everything is read for the connection's current schema, in a form the tests compare directly: types as format_type
spells them (an enum by its bare name), referential actions as SQL spells them (`CASCADE`, `SET NULL`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

# pg_constraint.confdeltype / confupdtype codes.
REFERENTIAL_ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}


@dataclass(frozen=True, slots=True)
class Column:
    """A column as the catalog describes it."""

    type: str  # format_type's spelling; an enum (or enum array) by its bare type name, e.g. CallStatus, CallStatus[]
    not_null: bool
    default: str | None  # pg_get_expr's text, e.g. 'free'::"Plan"


@dataclass(frozen=True, slots=True)
class Index:
    """An index (primary keys and uniques included) and its key columns, in order."""

    name: str
    table: str
    columns: tuple[str, ...]
    descending: tuple[bool, ...]  # one flag per column
    unique: bool
    primary: bool
    partial: bool

    @property
    def sorted_columns(self) -> tuple[str, ...]:
        """The columns, each with " DESC" when it sorts descending: `("organizationId", "timestamp DESC")`."""
        return tuple(c + (" DESC" if d else "") for c, d in zip(self.columns, self.descending, strict=True))

    def describe(self) -> str:
        """E.g. `UNIQUE (id, organizationId)`, `(organizationId, timestamp DESC)`, `(status) WHERE ...`."""
        kind = "PRIMARY KEY " if self.primary else "UNIQUE " if self.unique else ""
        return f"{kind}({', '.join(self.sorted_columns)}){' WHERE ...' if self.partial else ''}"


@dataclass(frozen=True, slots=True)
class ForeignKey:
    """A foreign key constraint."""

    name: str
    table: str
    columns: tuple[str, ...]
    referenced_table: str
    referenced_columns: tuple[str, ...]
    on_delete: str  # as SQL spells it: NO ACTION, RESTRICT, CASCADE, SET NULL, SET NULL (agentId), SET DEFAULT
    on_update: str

    def describe(self) -> str:
        """E.g. `(agentId) → Agent(id) ON DELETE SET NULL ON UPDATE CASCADE`."""
        return (
            f"({', '.join(self.columns)}) → {self.referenced_table}({', '.join(self.referenced_columns)}) "
            f"ON DELETE {self.on_delete} ON UPDATE {self.on_update}"
        )


@dataclass(frozen=True, slots=True)
class Catalog:
    """What the database holds in the current schema: enum types, tables' columns, indexes, foreign keys."""

    enums: dict[str, tuple[str, ...]]  # enum type → its values, in order
    tables: dict[str, dict[str, Column]]  # table → column name → column, columns in table order
    indexes: tuple[Index, ...]  # by table, then name
    foreign_keys: tuple[ForeignKey, ...]  # by table, then name (constraint names are unique per table only)


async def read_catalog(conn: asyncpg.Pool | asyncpg.Connection) -> Catalog:
    """Introspect pg_catalog for the current schema."""
    enums = await conn.fetch(
        """
        SELECT t.typname AS name, array_agg(e.enumlabel ORDER BY e.enumsortorder) AS values
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
        WHERE t.typnamespace = current_schema()::regnamespace
        GROUP BY t.typname
        ORDER BY t.typname
        """
    )
    columns = await conn.fetch(
        """
        SELECT c.relname AS table, a.attname AS column, a.attnotnull AS not_null,
               pg_get_expr(d.adbin, d.adrelid) AS default,
               CASE WHEN t.typtype = 'e' THEN t.typname
                    WHEN element.typtype = 'e' THEN element.typname || '[]'
                    ELSE format_type(a.atttypid, a.atttypmod) END AS type
        FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_type element ON element.oid = t.typelem
        LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
        ORDER BY c.relname, a.attnum
        """
    )
    indexes = await conn.fetch(
        """
        SELECT i.relname AS name, t.relname AS table, x.indisunique AS unique, x.indisprimary AS primary,
               x.indpred IS NOT NULL AS partial,
               array_agg(a.attname ORDER BY k.position) AS columns,
               array_agg(x.indoption[k.position::int - 1] & 1 = 1 ORDER BY k.position) AS descending
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, position)
        JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
        WHERE t.relnamespace = current_schema()::regnamespace AND k.position <= x.indnkeyatts
        GROUP BY i.relname, t.relname, x.indisunique, x.indisprimary, x.indpred
        ORDER BY t.relname, i.relname
        """
    )
    foreign_keys = await conn.fetch(
        """
        SELECT c.conname AS name, t.relname AS table, r.relname AS referenced_table,
               c.confdeltype::text AS on_delete, c.confupdtype::text AS on_update,
               ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY AS k(attnum, position)
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
                     ORDER BY k.position) AS columns,
               ARRAY(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY AS k(attnum, position)
                     JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum
                     ORDER BY k.position) AS referenced_columns,
               ARRAY(SELECT a.attname FROM unnest(c.confdelsetcols) WITH ORDINALITY AS k(attnum, position)
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
                     ORDER BY k.position) AS on_delete_columns
        FROM pg_constraint c
        JOIN pg_class t ON t.oid = c.conrelid
        JOIN pg_class r ON r.oid = c.confrelid
        WHERE c.contype = 'f' AND c.connamespace = current_schema()::regnamespace
        ORDER BY t.relname, c.conname
        """
    )
    tables: dict[str, dict[str, Column]] = {}
    for row in columns:
        tables.setdefault(row["table"], {})[row["column"]] = Column(row["type"], row["not_null"], row["default"])
    return Catalog(
        enums={row["name"]: tuple(row["values"]) for row in enums},
        tables=tables,
        indexes=tuple(
            Index(
                row["name"],
                row["table"],
                tuple(row["columns"]),
                tuple(row["descending"]),
                row["unique"],
                row["primary"],
                row["partial"],
            )
            for row in indexes
        ),
        foreign_keys=tuple(
            ForeignKey(
                row["name"],
                row["table"],
                tuple(row["columns"]),
                row["referenced_table"],
                tuple(row["referenced_columns"]),
                _with_columns(REFERENTIAL_ACTIONS[row["on_delete"]], row["on_delete_columns"]),
                REFERENTIAL_ACTIONS[row["on_update"]],
            )
            for row in foreign_keys
        ),
    )


def _with_columns(action: str, columns: list[str]) -> str:
    """`SET NULL (agentId)` for an action limited to some of the key's columns (PostgreSQL 15+), else `action`."""
    return f"{action} ({', '.join(columns)})" if columns else action
