"""The design mpstore replaces, kept runnable so tests and benchmarks can show what it gets wrong.

``UnsafeStore`` is what the reference application did before its fix: one pool of connections
shared by readers and writers, deferred ``BEGIN`` transactions, no gate, and SQLite's busy
handler left to sort writers out. Under concurrent writers it produces every failure mpstore
exists to prevent: pool timeouts (writers hold pooled connections while SQLite makes them wait),
"database is locked" (a deferred transaction that reads and then writes cannot wait for the
lock), and lost updates. It is not exported from ``mpstore``; never keep data in it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from . import _sqlite
from ._connection import Connection
from ._store import Store

T = TypeVar("T")

__all__ = ["UnsafeStore"]


class UnsafeStore(Store):
    """A Store with the gate taken out of the write path (see the module docstring).

    :param busy_timeout: SQLite's busy timeout in seconds (the reference app used 30 s, longer
        than its 5 s pool timeout: the combination that turns lock waits into pool timeouts).
    """

    _begin = "BEGIN"

    def __init__(self, path: Any, *, busy_timeout: float = 30.0, **settings: Any) -> None:
        self.busy_timeout = busy_timeout
        super().__init__(path, **settings)

    def _connect(self, readonly: bool, wal_limit: int | None = None) -> sqlite3.Connection:
        return _sqlite.connect(
            self.path,
            busy_timeout=self.busy_timeout,
            synchronous=self.synchronous,
            readonly=False,
            wal_limit=wal_limit,
        )

    @contextmanager
    def _write_turn(self, timeout: float | bool | None = True) -> Iterator[sqlite3.Connection]:
        if self._schema_ready:
            with self._pooled() as raw:
                yield raw
        else:
            with super()._write_turn(timeout) as raw:
                yield raw

    def _run_write(
        self, fn: Callable[[Connection], T], meanwhile: Callable[[], object] | None = None
    ) -> T:
        # No queue and no gate: every write takes a pooled connection and a deferred BEGIN.
        with self.write() as conn:
            return fn(conn)

    def _run_op(self, op: tuple[Any, ...]) -> int:
        # Nor the mailbox: collection upserts and deletes take the same unguarded path.
        return self._run_write(_sqlite.op_runner(op))

    @property
    def _schema_ready(self) -> bool:
        # Schema creation still goes through the gate, so the failures this store shows come
        # from the workload, not from sixteen processes creating the same tables.
        return not self._closed and getattr(self, "created_schema", None) is not None

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "busy_timeout": self.busy_timeout}
