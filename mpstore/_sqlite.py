"""Everything SQLite-specific: connections, pragmas, the SQL dialect and error translation.

This module and :mod:`mpstore._gate` are the seam a PostgreSQL backend would replace; the store
and collection layers speak to SQLite only through the functions and statements defined here.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

from . import _fork
from ._errors import (
    BusyTimeout,
    CorruptDatabase,
    DirectoryNotFound,
    DiskFull,
    InvalidName,
    MpstoreError,
    PermissionDenied,
    TransactionError,
)

__all__ = [
    "SCHEMA_VERSION",
    "SYNCHRONOUS_MODES",
    "CollectionSQL",
    "check_identifier",
    "connect",
    "create_file",
    "file_size_limit_reached",
    "last_batch",
    "op_runner",
    "record_batch",
    "run_op",
    "translate",
    "translating",
]

SCHEMA_VERSION = 1
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
META_TABLE = "_mpstore_meta"
COLLECTIONS_TABLE = "_mpstore_collections"


class SQLiteConnection(sqlite3.Connection):
    """sqlite3's connection, remembering what writes ask of the schema (as of one version of
    it): which indexed fields each collection table has, and whether a failed one-row write
    undoes itself. A write then asks the version instead, a cheaper statement."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schema_version: int | None = None
        self.table_fields: dict[str, frozenset[str]] = {}
        self.undo: tuple[int, bool] | None = None  # with the temporary schema's version


class Writer(Protocol):
    """What a write needs of a connection (sqlite3's own, or mpstore's guarded one)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> sqlite3.Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> sqlite3.Cursor: ...


_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}\Z")
_RESERVED_PREFIXES = ("sqlite_", "_mpstore")


def check_identifier(name: object, what: str) -> str:
    """Return ``name`` if it is a plain identifier that is safe to put into SQL.

    :raises InvalidName: otherwise (SQL metacharacters, spaces, reserved prefixes, non-strings).
    """
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise InvalidName(
            f"{what} must be a letter followed by up to 62 letters, digits or underscores; "
            f"got {name!r}"
        )
    if name.lower().startswith(_RESERVED_PREFIXES):
        raise InvalidName(f"{what} {name!r} uses a prefix reserved for SQLite and mpstore")
    return name


def json_path(key: object) -> str:
    """The JSON path of ``key`` in a record's top-level object, for ``json_extract``.

    :raises InvalidName: ``key`` is not a string, or holds what SQLite's JSON paths cannot
        name (a double quote, a backslash, a control character).
    """
    if not isinstance(key, str) or not key or any(c in '"\\' or c < " " for c in key):
        raise InvalidName(f"a record's JSON key must be a string SQLite can name; got {key!r}")
    return f'$."{key}"'


def literal(text: str) -> str:
    """``text`` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def json_keys_entry(collection: str) -> str:
    """The key under which the meta table records a collection's JSON keys (see
    :func:`recorded_json_keys`)."""
    return "json_keys:" + collection


def recorded_json_keys(conn: Any, collection: str) -> dict[str, str]:
    """The keys under which a collection's records hold its key and indexed fields, for those
    whose key is not their name (aliases): recorded by the collection, read by tools that work
    without its model.

    :raises MpstoreError: the record is damaged.
    """
    row = conn.execute(
        f"SELECT value FROM {META_TABLE} WHERE key = ?", (json_keys_entry(collection),)
    ).fetchone()
    if row is None:
        return {}
    try:
        keys = json.loads(row[0])
    except (TypeError, ValueError):
        keys = None
    if not isinstance(keys, dict) or not all(
        isinstance(f, str) and isinstance(k, str) for f, k in keys.items()
    ):
        raise MpstoreError(
            f"the JSON keys recorded for collection {collection!r} are damaged: "
            f"{str(row[0])[:80]!r}"
        )
    return keys


def create_file(path: str, mode: int) -> bool:
    """Create ``path`` empty with ``mode`` if it does not exist; True if this call created it.

    SQLite would create the database with 0644; conversations hold secrets, so mpstore creates
    the file first. SQLite gives the -wal and -shm files the database file's permissions.

    :raises PermissionDenied: the directory is not writable.
    :raises DirectoryNotFound: the directory is missing, or a part of its path is not one.
    :raises CorruptDatabase: the path is a directory.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except FileExistsError:
        if os.path.isdir(path):
            raise CorruptDatabase(f"{path} is a directory, not a database file", path) from None
        return False
    except IsADirectoryError:
        raise CorruptDatabase(f"{path} is a directory, not a database file", path) from None
    except PermissionError as exc:
        raise PermissionDenied(f"cannot create {path}: {exc.strerror}", path, exc.errno) from exc
    except FileNotFoundError as exc:
        raise DirectoryNotFound(
            f"cannot create {path}: its directory does not exist", path, exc.errno
        ) from exc
    except NotADirectoryError as exc:
        raise DirectoryNotFound(
            f"cannot create {path}: a component of its directory is not a directory",
            path,
            exc.errno,
        ) from exc
    os.close(fd)
    return True


def _keeps_read_only(
    action: int, arg1: str | None, arg2: str | None, database: str | None, trigger: str | None
) -> int:
    """A read connection's authorizer: SQLite asks it as it prepares each statement, so it
    refuses a change of ``query_only`` however the statement spells it (comments, quotes),
    which the statement check's patterns (see :mod:`mpstore._connection`) cannot promise."""
    if (
        action == sqlite3.SQLITE_PRAGMA
        and arg2 is not None
        and (arg1 or "").lower() == "query_only"
    ):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


_OFF = frozenset({"0", "false", "no", "off"})
#: Settings of the write connection a write block must not change, with the values it may
#: set: a change would outlive the block, for every later write of the store (query_only=1
#: fails each BEGIN; locking_mode=EXCLUSIVE keeps SQLite's lock from every other process;
#: wal_autocheckpoint would checkpoint inside the gate; writable_schema lets a statement damage
#: the schema; busy_timeout is the store's timeout; journal_size_limit is the store's wal_limit).
WRITE_CONNECTION_SETTINGS = {
    "query_only": _OFF,
    "locking_mode": frozenset({"normal"}),
    "wal_autocheckpoint": frozenset({"0"}),
    "writable_schema": _OFF,
    "busy_timeout": frozenset(),
    "journal_size_limit": frozenset(),
}


def _keeps_write_settings(
    action: int, arg1: str | None, arg2: str | None, database: str | None, trigger: str | None
) -> int:
    """The write connection's authorizer: refuses a change of the settings above, however the
    statement spells it."""
    if action == sqlite3.SQLITE_PRAGMA and arg2 is not None:
        allowed = WRITE_CONNECTION_SETTINGS.get((arg1 or "").lower())
        if allowed is not None and arg2.strip("'\"").lower() not in allowed:
            return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def connect(
    path: str,
    *,
    busy_timeout: float,
    synchronous: str,
    readonly: bool,
    wal_limit: int | None = None,
) -> sqlite3.Connection:
    """Open one connection with mpstore's pragmas.

    ``isolation_level=None`` leaves BEGIN/COMMIT to mpstore. Read connections are ``query_only``
    so a write can never slip past the gate through :meth:`Store.read`. A write connection given
    ``wal_limit`` cuts a WAL file it starts over back to that size (``journal_size_limit``),
    set before its authorizer refuses any change of it.

    :raises CorruptDatabase, PermissionDenied, DiskFull: translated from SQLite.
    """
    _fork.close_inherited()
    with translating(path):
        conn = sqlite3.connect(
            path,
            timeout=busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            factory=SQLiteConnection,
        )
        try:
            conn.execute(f"PRAGMA synchronous={synchronous}")
            if readonly:
                conn.execute("PRAGMA query_only=1")
                conn.set_authorizer(_keeps_read_only)
            else:
                if wal_limit is not None:
                    conn.execute(f"PRAGMA journal_size_limit={int(wal_limit)}")
                conn.set_authorizer(_keeps_write_settings)
        except BaseException:
            conn.close()
            raise
    return conn


_CODE_TO_ERROR: dict[int, type[MpstoreError]] = {
    sqlite3.SQLITE_CORRUPT: CorruptDatabase,
    sqlite3.SQLITE_NOTADB: CorruptDatabase,
    sqlite3.SQLITE_FULL: DiskFull,
    sqlite3.SQLITE_READONLY: PermissionDenied,
    sqlite3.SQLITE_PERM: PermissionDenied,
    sqlite3.SQLITE_CANTOPEN: PermissionDenied,
    sqlite3.SQLITE_AUTH: PermissionDenied,
    sqlite3.SQLITE_BUSY: BusyTimeout,
    # A conflict inside one connection (dropping a table a running statement reads): no wait
    # would end it, and no other program is to blame.
    sqlite3.SQLITE_LOCKED: TransactionError,
}


#: I/O errors that growing a file past the process's file size limit produces. SQLite reports
#: ENOSPC as SQLITE_FULL, but EFBIG (RLIMIT_FSIZE reached) only as one of these.
_GROWTH_IOERRS = frozenset(
    {sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_SHMSIZE, sqlite3.SQLITE_IOERR_TRUNCATE}
)
#: The most one SQLite write adds past a file's end: a 64 KiB page and its WAL frame header.
_LARGEST_WRITE = 65536 + 24
#: SQLite's files of a database: itself, its WAL, its shared memory, its rollback journal.
FILES = ("", "-wal", "-shm", "-journal")


def file_size_limit_reached(path: str) -> int | None:
    """The process's file size limit (bytes) if one of ``path``'s files has reached it, else None.

    A file counts as at the limit when one more SQLite write at its end would pass it: that is
    the only way SQLite's writes fail with EFBIG.
    """
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == resource.RLIM_INFINITY:
        return None
    for suffix in FILES:
        try:
            size = os.stat(path + suffix).st_size
        except OSError:
            continue
        if size + _LARGEST_WRITE >= soft:
            return int(soft)
    return None


def translate(exc: sqlite3.Error, path: str) -> Exception:
    """Map an ``sqlite3`` error to mpstore's typed error; others are returned unchanged.

    A write that failed because the process's file size limit was reached is :class:`DiskFull`;
    any other I/O error is left as SQLite reported it.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return exc
    name = getattr(exc, "sqlite_errorname", "")
    if code in _GROWTH_IOERRS:
        limit = file_size_limit_reached(path)
        if limit is None:
            return exc
        return DiskFull(
            f"{path}: {exc} ({name}): the database's files reached this process's file size "
            f"limit (RLIMIT_FSIZE = {limit} bytes)",
            path,
            errno.EFBIG,
        )
    cls = _CODE_TO_ERROR.get(code & 0xFF)
    if cls is None:
        return exc
    return cls(f"{path}: {exc} ({name})", path)


class translating:
    """Re-raise ``sqlite3`` errors inside the block as mpstore's typed errors where one fits.

    A class rather than a generator: it wraps every statement mpstore runs, and a generator
    costs several times as much to enter and leave.
    """

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, sqlite3.Error):
            mapped = translate(exc, self.path)
            if mapped is not exc:
                raise mapped from exc


def quote(identifier: str) -> str:
    """Quote an identifier already checked by :func:`check_identifier`."""
    return f'"{identifier}"'


def column_for(field: str) -> str:
    return f"f_{field}"


class CollectionSQL:
    """The statements one collection runs, built once from checked identifiers.

    A collection is a table ``(key TEXT PRIMARY KEY, value TEXT)`` holding each record as JSON,
    plus one real column per indexed field, written from Python so SQLite never parses the JSON.
    """

    def __init__(
        self,
        table: str,
        indexed: Sequence[str],
        indexes: Sequence[Sequence[str]],
        filled_by_sqlite: Sequence[str] = (),
        json_keys: Mapping[str, str] | None = None,
    ) -> None:
        self.table = table
        t = quote(table)
        self.indexed = tuple(indexed)
        self.indexed_set = frozenset(self.indexed)
        self.json_keys = dict(json_keys or {})
        cols = [quote(column_for(f)) for f in (*self.indexed, *filled_by_sqlite)]
        names = ", ".join(["key", "value", *cols])
        # Fields the caller does not know it must fill are taken from the record's JSON (the
        # second parameter), as when their column was added.
        marks = ", ".join(
            ["?"] * (2 + len(self.indexed))
            + [f"json_extract(?2, {self._path(f)})" for f in filled_by_sqlite]
        )
        updates = ", ".join(f"{c}=excluded.{c}" for c in ["value", *cols])
        self.upsert = (
            f"INSERT INTO {t} ({names}) VALUES ({marks}) ON CONFLICT(key) DO UPDATE SET {updates}"
        )
        self.get = f"SELECT value FROM {t} WHERE key = ?"
        self.delete = f"DELETE FROM {t} WHERE key = ?"
        self.count = f"SELECT count(*) FROM {t}"
        self.page = f"SELECT key, value FROM {t} WHERE key > ? ORDER BY key LIMIT ?"
        self.keys_page = f"SELECT key FROM {t} WHERE key > ? ORDER BY key LIMIT ?"
        self.create_table = (
            f"CREATE TABLE IF NOT EXISTS {t} (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)"
        )
        self.columns = f"SELECT name FROM pragma_table_info('{table}')"
        self.indexes = [self._index_ddl(fields) for fields in indexes]

    def _path(self, field: str) -> str:
        return literal(json_path(self.json_keys.get(field, field)))

    def add_column(self, field: str) -> tuple[str, str]:
        """DDL that adds an indexed field's column and fills it from the stored JSON."""
        t, c = quote(self.table), quote(column_for(field))
        return (
            f"ALTER TABLE {t} ADD COLUMN {c}",
            f"UPDATE {t} SET {c} = json_extract(value, {self._path(field)})",
        )

    def index_name(self, fields: Sequence[str]) -> str:
        return f"{self.table}__by_" + "_".join(f.lstrip("-") for f in fields)

    def _index_ddl(self, fields: Sequence[str]) -> tuple[str, str]:
        name = self.index_name(fields)
        parts = [
            quote(column_for(f.lstrip("-"))) + (" DESC" if f.startswith("-") else "")
            for f in fields
        ]
        return (
            name,
            f"CREATE INDEX IF NOT EXISTS {quote(name)} ON {quote(self.table)} ({', '.join(parts)})",
        )

    def find(self, where: Sequence[str], order_by: Sequence[str], limit: bool) -> str:
        """``SELECT value`` filtered by equality on indexed fields, ordered, optionally limited."""
        sql = f"SELECT value FROM {quote(self.table)}"
        if where:
            sql += " WHERE " + " AND ".join(f"{quote(column_for(f))} IS ?" for f in where)
        if order_by:
            sql += " ORDER BY " + ", ".join(
                quote(column_for(f.lstrip("-"))) + (" DESC" if f.startswith("-") else "")
                for f in order_by
            )
        if limit:
            sql += " LIMIT ?"
        return sql


# -- writes carried between processes (see _mailbox) ------------------------------------------

_BATCH_KEY = "last_batch"
_carried_sql: dict[tuple[object, ...], CollectionSQL] = {}


def run_op(conn: Writer, op: tuple[Any, ...]) -> int:
    """Run one collection write given as data, and return how many rows it changed.

    ``("upsert", table, indexed_fields, rows, json_keys)`` or ``("delete", table, key)``: what
    a collection sends through the mailbox to whichever process holds the gate. ``json_keys``
    pairs each field its model's JSON holds under another key with that key. Names are checked
    again here, so a damaged or forged slot can at worst fail its own write.

    :raises MpstoreError: the operation is not one of the above.
    """
    kind = op[0] if op else None
    if kind == "upsert" and len(op) == 5:
        _, table, indexed, rows, json_keys = op
        if not isinstance(rows, list):
            raise MpstoreError(f"a carried upsert into {table!r} has malformed rows")
        _upsert(conn, table, indexed, json_keys, rows)
        return len(rows)
    if kind == "delete" and len(op) == 3 and isinstance(op[2], str):
        cursor = conn.execute(_sql_for(op[1], ()).delete, (op[2],))
        count = cursor.rowcount
        cursor.close()
        return count
    raise MpstoreError(f"not a carried write: {str(op)[:80]!r}")


def upsert_target(op: object) -> tuple[Any, ...] | None:
    """The collection, fields and keys of ``op`` if it is a one-row upsert whose row has the
    width its fields ask (what :func:`run_upserts` may run with others into the same
    target); None for anything else."""
    if not (isinstance(op, tuple) and single_statement(op) and op[0] == "upsert"):
        return None
    _, table, indexed, rows, json_keys = op
    row = rows[0]
    if not isinstance(indexed, tuple) or not isinstance(row, tuple):
        return None
    return (table, indexed, json_keys) if len(row) == 2 + len(indexed) else None


def run_upserts(conn: Writer, ops: Sequence[tuple[Any, ...]]) -> None:
    """Run one-row upserts into one collection (:func:`single_statement` ``ops`` with the same
    table, fields and keys) as one statement over all their rows: what a batch does with
    writes that need no SAVEPOINT. A failure leaves the rows before the failed one written,
    as their own writes would have (see ``WriteQueue._run_together``).

    :raises MpstoreError: an op is malformed, or not one of the kind above.
    """
    target = upsert_target(ops[0])
    if target is None or any(upsert_target(op) != target for op in ops):
        raise MpstoreError(f"not a run of one-row upserts into one collection: {ops!r:.80}")
    table, indexed, json_keys = target
    _upsert(conn, table, indexed, json_keys, [op[3][0] for op in ops])


def _upsert(conn: Writer, table: object, indexed: Any, json_keys: object, rows: list[Any]) -> None:
    """Upsert ``rows`` into collection ``table``, checked as data from another process.

    :raises MpstoreError: a name or a row is malformed.
    """
    sql = _sql_for(table, indexed)
    width = 2 + len(indexed)  # a tuple: _sql_for checked it
    for row in rows:
        if not isinstance(row, tuple) or len(row) != width:
            raise MpstoreError(f"a carried upsert into {table!r} has malformed rows")
    fields = _table_fields(conn, sql.table)
    if not fields <= sql.indexed_set:
        # An index added since the writer's collection was opened (by another process, or
        # another opener here): its column must not go stale.
        unfilled = tuple(sorted(fields - sql.indexed_set))
        sql = _sql_for(table, indexed, unfilled, json_keys)
    conn.executemany(sql.upsert, rows).close()


def op_runner(op: tuple[Any, ...]) -> Callable[[Writer], int]:
    """``op`` as a write function: what the gate holder runs for it (see :func:`run_op`)."""
    return partial(run_op, op=op)  # called without a Python frame of its own


def _sql_for(
    table: object, indexed: object, unfilled: tuple[str, ...] = (), json_keys: object = ()
) -> CollectionSQL:
    if not isinstance(indexed, tuple):
        raise MpstoreError(f"a carried write names its indexed fields badly: {indexed!r}")
    if not unfilled:
        json_keys = ()  # only fields filled from the JSON need their keys
    elif not isinstance(json_keys, tuple):
        raise MpstoreError(f"a carried write names its JSON keys badly: {json_keys!r}")
    key = (table, indexed, unfilled, json_keys)
    unhashable: TypeError | None = None
    try:
        sql = _carried_sql.get(key)  # names in a key found here were checked when it was made
    except TypeError as exc:  # a list where a name belongs
        sql, unhashable = None, exc
    if sql is None:
        name = check_identifier(table, "collection name")
        if unhashable is not None:
            raise MpstoreError(f"a carried write into {table!r} is malformed") from unhashable
        key = (name, indexed, unfilled, json_keys)
        for field in indexed:
            check_identifier(field, "indexed field")
        try:
            keys = dict(json_keys)
        except (TypeError, ValueError) as exc:
            raise MpstoreError(f"a carried write names its JSON keys badly: {json_keys!r}") from exc
        if len(_carried_sql) > 1024:
            _carried_sql.clear()
        sql = _carried_sql[key] = CollectionSQL(name, indexed, (), unfilled, keys)
    return sql


def _table_fields(conn: Writer, table: str) -> frozenset[str]:
    """The fields of the indexes the file records for collection ``table`` now (a checked
    identifier); columns added to the table by hand are not mpstore's to fill.

    Remembered as of the schema's version (see :func:`_schema_memo`).
    """
    raw = _schema_memo(conn)
    memo = raw.table_fields if raw is not None else {}
    fields = memo.get(table)
    if fields is None:
        cursor = conn.execute(f"SELECT indexes FROM {COLLECTIONS_TABLE} WHERE name = ?", (table,))
        row = cursor.fetchone()
        cursor.close()
        fields = frozenset(registered_fields(row[0] if row else "[]", table))
        memo[table] = fields
    return fields


def registered_indexes(indexes: object, table: str) -> list[list[str]]:
    """A collection's registered indexes (JSON: lists of ``[-]field``), checked.

    :raises MpstoreError: the record is not such a list, or names a field unsafe for SQL.
    """
    try:
        parsed = json.loads(indexes if isinstance(indexes, str) else "")
        if not isinstance(parsed, list) or not all(isinstance(i, list) and i for i in parsed):
            raise TypeError("not a list of non-empty lists")
        for index in parsed:
            for field in index:
                check_identifier(field.lstrip("-"), "indexed field")
    except (ValueError, TypeError, AttributeError, InvalidName) as exc:
        raise MpstoreError(
            f"the indexes recorded for collection {table!r} are damaged: {str(indexes)[:80]!r}"
        ) from exc
    return parsed


def registered_fields(indexes: object, table: str) -> Iterator[str]:
    """The fields of a collection's registered indexes (see :func:`registered_indexes`).

    :raises MpstoreError: the record is damaged.
    """
    for index in registered_indexes(indexes, table):
        for field in index:
            yield field.lstrip("-")


def _schema_memo(conn: Writer) -> SQLiteConnection | None:
    """The connection that remembers what writes ask of the schema, with what it remembers
    still true; None for a connection that remembers nothing.

    The file's schema version is asked once per transaction of mpstore's guarded
    connection: under the gate only this connection changes the schema, and a change made by
    mpstore inside a transaction says so (:func:`schema_changed`).
    """
    raw = getattr(conn, "_conn", conn)  # mpstore's guarded connection wraps sqlite3's
    if not isinstance(raw, SQLiteConnection):
        return None
    if not getattr(conn, "schema_checked", False):
        # sqlite3's own connection, without the guarded one's checks (the write that follows
        # makes them), but with its typed errors.
        try:
            (version,) = raw.execute("PRAGMA schema_version").fetchone()
        except sqlite3.Error as exc:
            mapped = translate(exc, getattr(conn, "_path", ""))
            if mapped is exc:
                del mapped  # the traceback keeps this frame: no cycle
                raise
            raise mapped from exc
        if raw.schema_version != version:
            raw.schema_version, raw.table_fields, raw.undo = version, {}, None
        if hasattr(conn, "schema_checked"):
            conn.schema_checked = True
    return raw


def schema_changed(conn: Writer) -> None:
    """Note that the transaction of ``conn`` changed the schema, or rolled back what may have
    been a change: then the file's schema version goes back to a number another change can
    reach again, with another schema, so what was remembered is dropped too."""
    if hasattr(conn, "schema_checked"):
        conn.schema_checked = False
    raw = getattr(conn, "_conn", conn)
    if isinstance(raw, SQLiteConnection):
        raw.schema_version, raw.table_fields, raw.undo = None, {}, None


def single_statement(op: object) -> bool:
    """Whether :func:`run_op` runs ``op`` as one statement on one row (False for anything
    malformed: :func:`run_op` refuses that itself)."""
    if not isinstance(op, tuple) or not op:
        return False
    if op[0] == "delete":
        return len(op) == 3
    return op[0] == "upsert" and len(op) == 5 and isinstance(op[3], list) and len(op[3]) == 1


def statements_undo_themselves(conn: Writer, fresh: bool = False) -> bool:
    """Whether a failed one-row write leaves nothing behind in this schema: true unless a
    trigger (which may change other rows first, and RAISE(FAIL) keeps those) or a foreign key
    action could run.

    Remembered as of the versions of the file's schema (see :func:`_schema_memo`) and of
    the connection's temporary one, where a block may have created a trigger without
    changing the file's; ``fresh`` asks the schema itself, for a transaction in which code
    other than mpstore's has run (it may have created a trigger).
    """
    raw = None if fresh else _schema_memo(conn)
    temp = -1
    if raw is not None:
        (temp,) = conn.execute("PRAGMA temp.schema_version").fetchone()
        if raw.undo is not None and raw.undo[0] == temp:
            return raw.undo[1]
    cursor = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'trigger') "
        "OR EXISTS (SELECT 1 FROM sqlite_temp_master WHERE type = 'trigger') "
        "OR (SELECT foreign_keys FROM pragma_foreign_keys)"
    )
    (unsafe,) = cursor.fetchone()
    cursor.close()
    if raw is not None:
        raw.undo = (temp, not unsafe)
    return not unsafe


def record_batch(conn: Writer, batch: int) -> None:
    """Record, inside a batch's own transaction, that this batch committed (see _mailbox)."""
    conn.execute(
        f"INSERT INTO {META_TABLE} (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (_BATCH_KEY, str(batch)),
    ).close()


def last_batch(conn: sqlite3.Connection) -> int | None:
    """The id of the last committed batch that carried writes of other processes."""
    row = conn.execute(f"SELECT value FROM {META_TABLE} WHERE key = ?", (_BATCH_KEY,)).fetchone()
    return int(row[0]) if row is not None else None
