"""The connection that `store.write()` and `store.read()` hand out: valid only inside its block."""

from __future__ import annotations

import re
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import _fork
from ._errors import PermissionDenied, TransactionError
from ._sqlite import WRITE_CONNECTION_SETTINGS, translate, translating

__all__ = ["Connection", "check_statement", "translating_reads"]

Params = Sequence[Any] | dict[str, Any]


_LEFT_READ_ONLY = (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_AUTH)


class translating_reads(translating):
    """:class:`translating` for a read-only connection, where SQLite's "readonly database"
    means a write that would have bypassed the gate, not a file the process may not write.

    :raises TransactionError: a statement tried to write.
    """

    __slots__ = ()

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, PermissionDenied):  # translated already, by a block inside this one
            denied = exc
        else:
            try:
                super().__exit__(kind, exc, tb)
            except PermissionDenied as mapped:
                denied = mapped
            else:
                return
        # SQLITE_AUTH: a read connection's authorizer refused to let it leave read-only.
        if getattr(denied.__cause__, "sqlite_errorcode", None) not in _LEFT_READ_ONLY:
            if denied is exc:
                return  # the file itself cannot be opened or read: as it is
            raise denied
        raise TransactionError(
            "reads (read() blocks, query()) are read-only: the write would bypass the gate; "
            "use write()",
            self.path,
        ) from denied


#: What SQLite skips before a statement: blanks, comments and empty statements (``;``). Matched
#: once and never given back (possessive): backtracking into it took time exponential in the
#: number of comments.
_LEAD = r"(?:\s|;|--[^\n]*(?:\n|$)|/\*.*?\*/)*+"
#: What separates two words for SQLite: blanks and comments (possessive, as above).
_GAP = r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)++"

#: Statements a block may not run: those that end its transaction (``BEGIN`` too, which fails
#: inside one anyway), and releasing or rolling back to mpstore's own savepoints. Refused before
#: they run: a COMMIT inside a group commit would make the writes before it durable, and
#: nothing could then undo them if the batch failed.
_ENDS_TRANSACTION = re.compile(
    _LEAD + rf"(?:begin\b|commit\b|end\b|rollback\b(?!{_GAP}(?:transaction{_GAP})?to\b)"
    rf"|(?:release|rollback{_GAP}(?:transaction{_GAP})?to)(?:{_GAP}savepoint)?{_GAP}"
    r"[\"`\[]?mpstore_sp)",
    re.IGNORECASE | re.DOTALL,
)

#: In a read, statements that would let a later one write: switching off ``query_only``, which
#: every read connection is opened with (it is per connection, and pooled connections are
#: reused).
_LEAVES_READ_ONLY = re.compile(
    _LEAD + rf"pragma{_GAP}(?:[^\s.]+\s*\.\s*)?[\"'`\[]?query_only[\"'`\]]?\s*[=(]",
    re.IGNORECASE | re.DOTALL,
)

#: Statements that may change the schema, or take a change back (a savepoint of the block's
#: own rolled back): what was found out about the schema in the block may no longer hold.
_MAY_CHANGE_SCHEMA = re.compile(
    _LEAD + r"(?:create|drop|alter|rollback|savepoint|release|reindex|vacuum|pragma|attach"
    r"|detach)\b",
    re.IGNORECASE | re.DOTALL,
)

#: Statements already found not to end a transaction (and, for reads, not to leave read-only):
#: most are run again and again (mpstore's own on every write), and a set lookup costs a
#: fraction of the patterns' match. Short texts only, and a bounded number of them, so that
#: texts with values in them cannot pile up.
_ALLOWED: dict[str, bool] = {}  # each with whether it may change the schema
_ALLOWED_READS: set[str] = set()
_ALLOWED_MAX = 1024
_ALLOWED_TEXT = 2048


def check_statement(sql: str, writable: bool, path: str) -> bool:
    """Refuse ``sql`` if it would end its block's transaction (or mpstore's own savepoint), or,
    in a read (``writable`` False), leave its connection able to write. Returns whether, in a
    write, it may change the schema (see :data:`_MAY_CHANGE_SCHEMA`).

    :raises TransactionError: it would.
    """
    if writable:
        known = _ALLOWED.get(sql)
        if known is not None:
            return known
    elif sql in _ALLOWED_READS:
        return False
    if _ENDS_TRANSACTION.match(sql):
        raise TransactionError(
            f"{sql.strip()[:40]!r} would end the block's transaction (or mpstore's own "
            "savepoint); leave the block to commit, raise to roll back",
            path,
        )
    if not writable and _LEAVES_READ_ONLY.match(sql):
        raise TransactionError(
            f"{sql.strip()[:40]!r} would let later reads write, bypassing the gate; use write()",
            path,
        )
    changes = writable and _MAY_CHANGE_SCHEMA.match(sql) is not None
    if len(sql) <= _ALLOWED_TEXT:
        allowed = _ALLOWED if writable else _ALLOWED_READS
        if len(allowed) >= _ALLOWED_MAX:
            allowed.clear()  # texts made on the fly: the ones run again come back
        if writable:
            _ALLOWED[sql] = changes
        else:
            _ALLOWED_READS.add(sql)
    return changes


class Connection:
    """A thin guard around an ``sqlite3.Connection`` for the length of one transaction.

    It refuses use from another thread or process, use after its block ended, statements that
    would end the transaction early (``COMMIT``/``ROLLBACK``/``END``), which would let later
    statements run outside the gate, and any statement once something else ended it (a
    ``RAISE(ROLLBACK)`` trigger, a full disk). ``writable`` tells a ``write()`` block from a
    ``read()`` block.

    :raises TransactionError: on any of the misuses above.
    """

    __slots__ = (
        "_active",
        "_conn",
        "_cursors",
        "_path",
        "_pid",
        "_thread",
        "schema_checked",
        "schema_epoch",
        "writable",
    )

    def __init__(self, conn: sqlite3.Connection, path: str, writable: bool) -> None:
        self._conn = conn
        self._path = path
        self._thread = threading.get_ident()
        self._pid = _fork.pid()
        self._active = True
        self.writable = writable
        self.schema_checked = False  # see _sqlite.schema_changed
        # Counts the statements run here that may have changed the schema (see Store.collection).
        self.schema_epoch = 0
        # Cursors with rows, closed when the block ends: one kept unfinished past it would
        # hold its connection's read snapshot (a pooled connection's, or the write
        # connection's, whose next transaction would then fail on a stale snapshot).
        self._cursors: weakref.WeakSet[sqlite3.Cursor] | None = None

    def _check(self, sql: str | None = None) -> sqlite3.Connection:
        if not self._active:
            raise TransactionError("this connection's transaction block has ended", self._path)
        if self._thread != threading.get_ident() or self._pid != _fork.pid():
            raise TransactionError(
                "a transaction's connection is used by another thread or process; "
                "open a write()/read() block in that thread instead",
                self._path,
            )
        if not self._conn.in_transaction:
            # Anything run now would run outside the gate's transaction, in autocommit.
            raise TransactionError(
                "this block's transaction was ended by an earlier statement; leave the block",
                self._path,
            )
        if sql is not None:
            changes = _ALLOWED.get(sql) if self.writable else None  # looked up, not matched
            if changes is None:
                changes = check_statement(sql, self.writable, self._path)
            if changes:
                self.schema_epoch += 1
        return self._conn

    def _call(self, run: Callable[..., sqlite3.Cursor], *args: Any) -> sqlite3.Cursor:
        """``run(*args)``, with SQLite's errors translated as :class:`translating` does."""
        if not self.writable:
            with translating_reads(self._path):
                return run(*args)
        try:
            return run(*args)
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_AUTH:
                # The write connection's authorizer (see _sqlite._keeps_write_settings).
                raise TransactionError(
                    "a write block must not change the write connection's settings "
                    f"({', '.join(WRITE_CONNECTION_SETTINGS)}): the change would outlive the "
                    "block, for every later write",
                    self._path,
                ) from exc
            # A try costs nothing until it fails; a translating block costs three calls each
            # time, on every statement of every write. Raised as translating raises it.
            mapped = translate(exc, self._path)
            if mapped is exc:
                del mapped  # the traceback keeps this frame: no cycle
                raise
            raise mapped from exc

    def _after(self) -> None:
        if not self._conn.in_transaction:
            raise TransactionError(
                "a statement ended the transaction inside its block; let the block commit",
                self._path,
            )

    def execute(self, sql: str, parameters: Params = ()) -> sqlite3.Cursor:
        """Run one statement with bound parameters; returns the cursor with its rows, which is
        closed when the block ends.

        :raises TransactionError: misuse (see the class).
        :raises MpstoreError: typed SQLite failures (corruption, full disk, ...).
        """
        cursor = self._call(self._check(sql).execute, sql, parameters)
        self._after()
        if cursor.description is not None:  # it has rows, maybe unread
            if self._cursors is None:
                self._cursors = weakref.WeakSet()
            self._cursors.add(cursor)
        return cursor

    def _control(self, sql: str) -> None:
        """Run one of mpstore's own savepoint statements (which :meth:`execute` refuses)."""
        self._call(self._check().execute, sql)
        self._after()

    def executemany(self, sql: str, seq_of_parameters: Iterable[Params]) -> sqlite3.Cursor:
        """Run one statement once per parameter set.

        :raises TransactionError: misuse (see the class).
        """
        cursor = self._call(self._check(sql).executemany, sql, seq_of_parameters)
        self._after()
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self._active and self._conn.in_transaction

    def _end(self) -> None:
        self._active = False
        cursors, self._cursors = self._cursors, None
        if cursors:
            for cursor in list(cursors):
                cursor.close()
