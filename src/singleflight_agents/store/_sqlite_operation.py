"""What makes an SQLite store method a store operation: its errors leave as StoreError, a
damaged row is read again leniently, and no fork happens while it runs."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from ..models import StoreError
from ._connections import Connections, not_utf8

P = ParamSpec("P")
R = TypeVar("R")


class _Store(Protocol):
    url: str
    _conns: Connections


S = TypeVar("S", bound=_Store)


def operation(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """A store operation: its errors as StoreError, and no fork while it runs (see
    :mod:`._connections`)."""

    @functools.wraps(method)
    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        # translating() inlined: this wraps every warm hit
        conns = self._conns
        conns.enter()
        try:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not not_utf8(exc):
                    raise
            with conns.leniently():  # a damaged row: read again, tolerating it
                return method(self, *args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"store {self.url}: {exc}") from exc
        finally:
            conns.leave()

    return wrapper
