"""The connection that `store.write()` and `store.read()` hand out: valid only inside its block."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ._errors import PermissionDenied, TransactionError
from ._sqlite import translating

__all__ = ["Connection"]

Params = Sequence[Any] | dict[str, Any]


class Connection:
    """A thin guard around an ``sqlite3.Connection`` for the length of one transaction.

    It refuses use from another thread or process, use after its block ended, and statements
    that end the transaction early (``COMMIT``/``ROLLBACK``), which would let later statements
    run outside the gate. ``writable`` tells a ``write()`` block from a ``read()`` block.

    :raises TransactionError: on any of the misuses above.
    """

    __slots__ = ("_active", "_conn", "_path", "_pid", "_thread", "writable")

    def __init__(self, conn: sqlite3.Connection, path: str, writable: bool) -> None:
        self._conn = conn
        self._path = path
        self._thread = threading.get_ident()
        self._pid = os.getpid()
        self._active = True
        self.writable = writable

    def _check(self) -> sqlite3.Connection:
        if not self._active:
            raise TransactionError("this connection's transaction block has ended", self._path)
        if self._thread != threading.get_ident() or self._pid != os.getpid():
            raise TransactionError(
                "a transaction's connection is used by another thread or process; "
                "open a write()/read() block in that thread instead",
                self._path,
            )
        return self._conn

    @contextmanager
    def _translating(self) -> Iterator[None]:
        try:
            with translating(self._path):
                yield
        except PermissionDenied as exc:
            if self.writable:
                raise
            raise TransactionError(
                "read() blocks are read-only (the write would bypass the gate); use write()",
                self._path,
            ) from exc

    def _after(self) -> None:
        if not self._conn.in_transaction:
            raise TransactionError(
                "a statement ended the transaction inside its block; let the block commit",
                self._path,
            )

    def execute(self, sql: str, parameters: Params = ()) -> sqlite3.Cursor:
        """Run one statement with bound parameters; returns the cursor with its rows.

        :raises TransactionError: misuse (see the class).
        :raises MpstoreError: typed SQLite failures (corruption, full disk, ...).
        """
        conn = self._check()
        with self._translating():
            cursor = conn.execute(sql, parameters)
        self._after()
        return cursor

    def executemany(self, sql: str, seq_of_parameters: Iterable[Params]) -> sqlite3.Cursor:
        """Run one statement once per parameter set.

        :raises TransactionError: misuse (see the class).
        """
        conn = self._check()
        with self._translating():
            cursor = conn.executemany(sql, seq_of_parameters)
        self._after()
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self._active and self._conn.in_transaction

    def _end(self) -> None:
        self._active = False
