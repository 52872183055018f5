"""The database driver stays behind storage/: the engine works with storage's types and errors only."""

from __future__ import annotations

import ast
from pathlib import Path

import asyncpg
import pytest

from storage.errors import TRANSIENT_ERRORS, DatabaseUnavailable, NotFound

ENGINE = Path(__file__).resolve().parent.parent / "engine"


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            modules.add(node.module)
    return modules


def test_no_engine_module_imports_the_database_driver() -> None:
    importers = sorted(
        str(path.relative_to(ENGINE.parent))
        for path in ENGINE.rglob("*.py")
        if any(module == "asyncpg" or module.startswith("asyncpg.") for module in _imported_modules(path))
    )
    assert importers == []


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError("refused"),
        TimeoutError(),
        asyncpg.InterfaceError("connection closed"),
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        DatabaseUnavailable("DATABASE_URL: could not connect"),
    ],
)
def test_a_lost_busy_or_slow_database_is_transient(error: BaseException) -> None:
    assert isinstance(error, TRANSIENT_ERRORS)


@pytest.mark.parametrize("error", [NotFound("CallLog", "x"), asyncpg.exceptions.UniqueViolationError("duplicate key")])
def test_a_refused_operation_is_not_transient(error: BaseException) -> None:
    assert not isinstance(error, TRANSIENT_ERRORS)
