"""One object per event loop, made on first use and forgotten with the loop."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """`of(loop)`: the loop's own object, made by `make(loop)` the first time it is asked for."""

    def __init__(self, make: Callable[[asyncio.AbstractEventLoop], T]) -> None:
        self._make = make
        self._objects: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()

    def of(self, loop: asyncio.AbstractEventLoop) -> T:
        found = self._objects.get(loop)
        if found is None:
            found = self._objects[loop] = self._make(loop)
        return found
