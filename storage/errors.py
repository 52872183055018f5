"""The storage layer's errors: what went wrong in words a caller can act on, never a driver traceback."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg


class StorageError(Exception):
    """Base of every error the storage layer raises."""


class DatabaseUnavailable(StorageError):
    """The database cannot be reached; the message names the server and the cause."""


class MigrationError(StorageError):
    """The migrations cannot be applied as they stand."""


class SchemaNotMigrated(StorageError):
    """A table a query needs does not exist: the database's schema has not been migrated."""


class NotFound(StorageError):
    """No row has that key (or it belongs to another organization)."""

    def __init__(self, entity: str, key: str) -> None:
        super().__init__(f"{entity} {key} not found")
        self.entity = entity
        self.key = key


class AlreadyExists(StorageError):
    """A unique field already holds that value."""

    def __init__(self, entity: str, field: str, value: str | None) -> None:
        shown = f" {value!r}" if value is not None else ""
        super().__init__(f"{entity} with {field}{shown} already exists")
        self.entity = entity
        self.field = field
        self.value = value


class InvalidReference(StorageError):
    """A row points at a parent that does not exist, or that another row still needs.

    `entity` and `key` name the parent when the refusal is of one reference the caller gave (an agent's phone number,
    a campaign's agent): none by that id, or another organization's, which is never told apart.
    """

    def __init__(self, message: str, *, entity: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.entity = entity
        self.key = key


class ConstraintViolation(StorageError):
    """A value is outside what the schema allows (a CHECK constraint or a NOT NULL column)."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    DatabaseUnavailable,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # includes a connection closed under a query
    # A pooled connection the server ended (an administrator, a failover) taken for a query before asyncpg saw the
    # end: "cannot switch to state 12; another operation (2) is in progress" (MagicStack/asyncpg#1069).
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # server shutting down, or starting up (cannot connect now)
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    # Refusals a connection meets as it opens, never a query: the database dropped or renamed, the role or its
    # password changed. An operator's to fix; until then the database is as unavailable as a server that is down.
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # and InvalidPasswordError
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    OSError,
    TimeoutError,
)
"""Failures after which the same database operation may succeed later: retry them, after a pause."""

DATABASE_ERRORS: tuple[type[BaseException], ...] = (StorageError, asyncpg.PostgresError, *TRANSIENT_ERRORS)
"""Every way a database operation fails: transient, or refused (a constraint, a query the schema does not fit)."""


_KEY_DETAIL = re.compile(r"Key \((?P<fields>[^)]*)\)=\((?P<values>.*)\) already exists")
_CHECK_NAME = re.compile(r"^(?P<table>[A-Za-z]+)_(?P<what>.+)_check$")


@contextmanager
def translate_errors(*, hide_values: frozenset[str] = frozenset()) -> Iterator[None]:
    """Turn asyncpg's integrity errors raised inside the block into the domain errors above.

    Values of fields named in `hide_values` (secrets, key hashes) never appear in messages.
    """
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        table = exc.table_name or "row"
        match = _KEY_DETAIL.search(exc.detail or "")
        fields = match["fields"].replace('"', "") if match else (exc.constraint_name or "key")
        value = match["values"] if match and fields not in hide_values else None
        raise AlreadyExists(table, fields, value) from exc
    except asyncpg.ForeignKeyViolationError as exc:
        raise InvalidReference(exc.detail or str(exc)) from exc
    except asyncpg.CheckViolationError as exc:
        match = _CHECK_NAME.match(exc.constraint_name or "")
        what = f"{match['table']}.{match['what']}" if match else (exc.constraint_name or "value")
        raise ConstraintViolation(f"{what} is out of range") from exc
    except asyncpg.NotNullViolationError as exc:
        raise ConstraintViolation(f"{exc.table_name}.{exc.column_name} is required") from exc
    except asyncpg.InvalidTextRepresentationError as exc:
        # e.g. an enum value the schema does not have
        raise ConstraintViolation(str(exc)) from exc
    except asyncpg.UndefinedTableError as exc:
        raise SchemaNotMigrated(f"{exc}; apply the migrations (`dialtone db migrate`)") from exc
