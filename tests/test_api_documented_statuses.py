"""Every status an operation can answer is in its OpenAPI responses: a walk of each declared handler's code.

The walk follows the handler into the functions it calls in engine.api and storage (not the engine's other
rooms, whose errors the handlers translate themselves) and collects each `ApiError(status, ...)` it builds and
each storage error it raises and no `except` of its own catches, as error_middleware would answer it. A status
found and not documented is a gap.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
import types
from collections.abc import Callable
from typing import Any

import pytest

from engine.api.errors import ApiError, storage_error_status
from engine.api.openapi import openapi_document
from engine.api.operations import Operation
from engine.api.routes import PREFIX, RESOURCES
from storage.errors import StorageError, translate_errors

FOLLOWED = ("engine.api", "storage")
"""Packages whose functions the walk follows."""
OPAQUE = {translate_errors}
"""Not followed: the generic translation of integrity errors, whose outcome depends on the SQL it wraps (the
resources that can violate a key declare and test those statuses themselves)."""


Raised = int | type[StorageError]
"""What a piece of code can raise: an ApiError's status, or a storage error's class."""


def reachable_statuses(function: Callable[..., Any]) -> set[int]:
    """The error statuses `function` or the functions it calls (in FOLLOWED packages) can make the API answer."""
    kinds = _raised_by(function, set())
    return {kind if isinstance(kind, int) else storage_error_status(kind) for kind in kinds}


def _raised_by(function: Callable[..., Any], seen: set[Callable[..., Any]]) -> set[Raised]:
    function = inspect.unwrap(function)
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return _raised_in(tree, getattr(function, "__globals__", {}), seen)


def _raised_in(node: ast.AST, namespace: dict[str, Any], seen: set[Callable[..., Any]]) -> set[Raised]:
    """What `node` can raise, less what its own `try ... except` clauses catch."""
    if isinstance(node, ast.Try):
        body = set().union(*(_raised_in(child, namespace, seen) for child in node.body))
        caught = tuple(
            kind for handler in node.handlers for kind in _caught(handler.type, namespace) if isinstance(kind, type)
        )
        escaping = {kind for kind in body if isinstance(kind, int) or not issubclass(kind, caught)}
        rest = [*node.handlers, *node.orelse, *node.finalbody]
        return escaping.union(*(_raised_in(child, namespace, seen) for child in rest))
    kinds: set[Raised] = set()
    if isinstance(node, ast.Call):
        target = _resolve(node.func, namespace)
        status = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
        if target is ApiError and isinstance(status, int):
            kinds.add(status)
        elif isinstance(target, type) and issubclass(target, StorageError):
            kinds.add(target)
        elif (
            inspect.isfunction(target)
            and inspect.unwrap(target).__module__.startswith(FOLLOWED)
            and target not in seen | OPAQUE
        ):
            seen.add(target)
            kinds |= _raised_by(target, seen)
    for child in ast.iter_child_nodes(node):
        kinds |= _raised_in(child, namespace, seen)
    return kinds


def _caught(node: ast.expr | None, namespace: dict[str, Any]) -> list[Any]:
    """The exception classes an `except` clause names (a bare `except` catches everything)."""
    if node is None:
        return [BaseException]
    if isinstance(node, ast.Tuple):
        return [_resolve(element, namespace) for element in node.elts]
    return [_resolve(node, namespace)]


def _resolve(node: ast.expr, namespace: dict[str, Any]) -> Any:
    """What a called name (`name` or `module.name`) refers to in the function's module, or None."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id, getattr(builtins, node.id, None))
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        owner = namespace.get(node.value.id)
        return getattr(owner, node.attr, None) if isinstance(owner, types.ModuleType) else None
    return None


OPERATIONS = [operation for resource in RESOURCES for operation in resource.operations]
DOCUMENT = openapi_document(RESOURCES, prefix=PREFIX, title="Dialtone", version="test")


@pytest.mark.parametrize("operation", OPERATIONS, ids=[f"{o.method} {o.path}" for o in OPERATIONS])
def test_every_status_an_operation_can_answer_is_documented(operation: Operation) -> None:
    documented = {
        int(status) for status in DOCUMENT["paths"][PREFIX + operation.path][operation.method.lower()]["responses"]
    }
    reachable = reachable_statuses(operation.handler)
    assert reachable - documented == set(), f"{operation.method} {operation.path} can answer undocumented statuses"


def test_the_walk_finds_a_storage_error_raised_below_a_handler() -> None:
    start = next(o for o in OPERATIONS if o.method == "POST" and o.path == "/campaigns/{campaignId}/start")
    assert 422 in reachable_statuses(start.handler)  # ConstraintViolation: a campaign with no recipient
