"""Schema migrations: ordered SQL files, each applied once, in a transaction, under an advisory lock.

Files live in storage/migrations as `NNNN_name.sql`. Applied versions are recorded in "SchemaMigration"
with a checksum, so a file edited after it ran is caught instead of silently diverging. Several engine
processes may migrate at once: the advisory lock makes the others wait, and they then find nothing to do.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import asyncpg

from storage.errors import MigrationError
from storage.records import Connection

log = logging.getLogger(__name__)

# "dialtone" in ASCII: the key of the session-level advisory lock that serialises migrators.
MIGRATION_LOCK_KEY = 0x6469616C746F6E65
_FILENAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

_HISTORY_DDL = """
CREATE TABLE IF NOT EXISTS "SchemaMigration" (
    "version" INTEGER NOT NULL,
    "name" TEXT NOT NULL,
    "checksum" TEXT NOT NULL,
    "appliedAt" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "executionMs" INTEGER NOT NULL,
    CONSTRAINT "SchemaMigration_pkey" PRIMARY KEY ("version")
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text."""
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def label(self) -> str:
        """The file's name without .sql, e.g. 0001_platform_schema."""
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    """A migration the database records as applied."""

    version: int
    name: str
    checksum: str
    applied_at: datetime
    execution_ms: int


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    """What the database has applied, what the code would still apply, and what only the database knows."""

    applied: list[AppliedMigration]
    pending: list[Migration]
    unknown: list[AppliedMigration]

    @property
    def current_version(self) -> int:
        """The highest applied version, 0 for an empty database."""
        return max((m.version for m in self.applied), default=0)


def load_migrations() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    found: dict[int, Migration] = {}
    for entry in resources.files("storage.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILENAME.match(entry.name)
        if not match:
            raise MigrationError(f"migration file {entry.name}: name must look like 0001_what_it_does.sql")
        version = int(match["version"])
        if version in found:
            raise MigrationError(f"two migration files have version {version:04d}")
        found[version] = Migration(version=version, name=match["name"], sql=entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def _applied(conn: Connection) -> list[AppliedMigration]:
    exists = await conn.fetchval("SELECT to_regclass('\"SchemaMigration\"') IS NOT NULL")
    if not exists:
        return []
    rows = await conn.fetch(
        'SELECT "version", "name", "checksum", "appliedAt", "executionMs" FROM "SchemaMigration" ORDER BY "version"'
    )
    return [AppliedMigration(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def _compare(applied: list[AppliedMigration], shipped: list[Migration]) -> MigrationStatus:
    by_version = {m.version: m for m in shipped}
    done = {a.version for a in applied}
    for record in applied:
        migration = by_version.get(record.version)
        if migration is not None and migration.checksum != record.checksum:
            raise MigrationError(
                f"migration {migration.label} was changed after it was applied "
                f"(database has checksum {record.checksum[:12]}, file has {migration.checksum[:12]}); "
                "add a new migration instead of editing an applied one"
            )
    return MigrationStatus(
        applied=[a for a in applied if a.version in by_version],
        pending=[m for m in shipped if m.version not in done],
        unknown=[a for a in applied if a.version not in by_version],
    )


async def migration_status(conn: Connection, shipped: list[Migration] | None = None) -> MigrationStatus:
    """Compare the database's history with the shipped migrations."""
    return _compare(await _applied(conn), load_migrations() if shipped is None else shipped)


async def migrate(conn: Connection, shipped: list[Migration] | None = None) -> list[Migration]:
    """Apply every pending migration, each in its own transaction; return those this call applied."""
    migrations = load_migrations() if shipped is None else shipped
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_HISTORY_DDL)
        status = _compare(await _applied(conn), migrations)
        if status.unknown:
            log.warning(
                "the database has migrations this engine does not know (%s): it was migrated by a newer version",
                ", ".join(f"{m.version:04d}_{m.name}" for m in status.unknown),
            )
        if (
            status.pending
            and status.unknown
            and min(m.version for m in status.pending) < max(m.version for m in status.unknown)
        ):
            raise MigrationError("pending migrations are older than ones a newer engine already applied")
        for migration in status.pending:
            await _apply(conn, migration)
        return status.pending
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _apply(conn: Connection, migration: Migration) -> None:
    began = time.perf_counter()
    try:
        async with conn.transaction():
            await conn.execute(migration.sql)
            elapsed_ms = round((time.perf_counter() - began) * 1000)
            await conn.execute(
                'INSERT INTO "SchemaMigration" ("version", "name", "checksum", "executionMs") VALUES ($1, $2, $3, $4)',
                migration.version,
                migration.name,
                migration.checksum,
                elapsed_ms,
            )
    except asyncpg.PostgresError as exc:
        position = getattr(exc, "position", None)
        where = f" near character {position}" if position else ""
        raise MigrationError(f"migration {migration.label} failed{where}: {exc}") from None
    log.info("applied migration %s in %d ms", migration.label, elapsed_ms)
