"""What ``mpstore info``, ``check``, ``export`` and ``import`` do, apart from argument parsing.

``info``, ``check`` and ``export`` read the file through a read-only SQLite connection of their
own: they never create a database, never take the write gate, and work while other processes
write. ``import`` writes through a :class:`Store`, under the gate, in one transaction.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import sqlite3
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any

from . import _sqlite
from ._collection import check_key
from ._errors import (
    CorruptDatabase,
    InvalidKey,
    InvalidName,
    MpstoreError,
    PermissionDenied,
    RecordTooLarge,
    RecordTypeError,
    TransactionError,
)
from ._gate import _read_holder, holder_on_record, holder_stopped
from ._mailbox import Snapshot, snapshot

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "GateState",
    "Info",
    "check",
    "export",
    "format_bytes",
    "format_info",
    "gate_state",
    "import_records",
    "info",
    "load_model",
]

#: Files larger than this show a progress line while they are imported.
PROGRESS_THRESHOLD = 1024 * 1024
_SCALARS = (str, int, float, bool, type(None))
_MISSING = object()

Progress = Callable[[int, int | None, int], None]


# -- opening ---------------------------------------------------------------------------------


@contextmanager
def _readonly(path: str, immutable: bool = False) -> Iterator[sqlite3.Connection]:
    """A read-only connection to an existing mpstore file, inside one read transaction.

    :raises MpstoreError: there is no file at ``path``, or it is not an mpstore store.
    :raises CorruptDatabase: the file is not an SQLite database.
    :raises PermissionDenied: see :func:`_connect_readonly`.
    """
    conn = _connect_readonly(path, immutable)
    try:
        with _sqlite.translating(path):
            conn.execute("BEGIN")
            if not _has_table(conn, _sqlite.META_TABLE):
                raise MpstoreError(
                    f"{path} is an SQLite database but not an mpstore store "
                    f"(it has no {_sqlite.META_TABLE} table)",
                    path,
                )
        yield conn
    finally:
        conn.close()


def _connect_readonly(path: str, immutable: bool = False) -> sqlite3.Connection:
    """A read-only connection; ``path`` is resolved (see :func:`resolve`).

    SQLite reads a WAL database through an index file (``-shm``) beside it, which it cannot
    create in a directory this user cannot write (a read-only medium, say). Only with
    ``immutable`` (the caller vouches that nothing writes the file meanwhile) is such a file
    then read without that index and without SQLite's locks.

    :raises PermissionDenied: the file cannot be read; or its index cannot be made and
        ``immutable`` is not given, or its ``-wal`` holds changes an immutable read would miss.
    """
    if os.path.isdir(path):
        raise CorruptDatabase(f"{path} is a directory, not a database file", path)
    if not os.path.exists(path):
        raise MpstoreError(f"no database at {path}", path)
    try:
        return _open_uri(path, "mode=ro")
    except PermissionDenied:
        if not os.access(path, os.R_OK):
            raise
        _check_immutable_read(path, immutable)
    return _open_uri(path, "immutable=1")


def _open_uri(path: str, query: str) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(path) + "?" + query
    with _sqlite.translating(path):
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        try:
            # The first read tells an SQLite file from anything else.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except BaseException:
            conn.close()
            raise
    return conn


def _check_immutable_read(path: str, immutable: bool) -> None:
    """:raises PermissionDenied: reading ``path`` as immutable is not asked for, or would miss
    the changes its ``-wal`` holds."""
    directory = os.path.dirname(path)
    read_only = _read_only_fs(directory)
    where = "a read-only file system" if read_only else "a directory it cannot write"
    code = errno.EROFS if read_only else errno.EACCES
    if not immutable:
        raise PermissionDenied(
            f"{path}: SQLite reads a WAL database through an index file (-shm) beside it, and "
            f"cannot create one in {directory} ({where}); if nothing can write the file "
            "meanwhile, read it with --immutable, else copy it with its -wal file to a "
            "writable directory",
            path,
            code,
        )
    wal = path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        raise PermissionDenied(
            f"{path}: its -wal file may hold changes that an immutable read would miss; copy "
            "the database with its -wal file to a writable directory and read it there",
            path,
            code,
        )


def _read_only_fs(directory: str) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): not known to be read-only
        return False


def resolve(path: str) -> str:
    """``path`` with symlinks resolved: SQLite keeps ``-wal`` and ``-shm`` beside the file
    itself, and mpstore its lock file and mailbox."""
    return os.path.realpath(path)


def _journal_mode(conn: sqlite3.Connection, path: str) -> str:
    """The file's journal mode. An immutable connection reports its own ("delete"), so a WAL
    file is told by its header (bytes 18 and 19 are 2 in WAL mode)."""
    (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return str(mode)
    return "wal" if header[18:20] == b"\x02\x02" else str(mode)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


@dataclass(frozen=True)
class Registration:
    """A collection as ``_mpstore_collections`` records it."""

    name: str
    model: str
    key_field: str
    indexes: tuple[tuple[str, ...], ...]
    json_keys: tuple[tuple[str, str], ...] = ()

    @property
    def indexed(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.lstrip("-") for idx in self.indexes for f in idx))

    def json_key(self, field: str) -> str:
        """The key under which the records' JSON holds ``field``."""
        return dict(self.json_keys).get(field, field)

    def json_path(self, field: str) -> str:
        """``json_extract``'s path to ``field`` in a record.

        :raises InvalidName: a recorded key SQLite cannot name.
        """
        return _sqlite.json_path(self.json_key(field))


def _registrations(conn: Any, json_keys: bool = False) -> dict[str, Registration]:
    """The registered collections, read through a raw or an mpstore connection; with the JSON
    keys they recorded if ``json_keys``.

    :raises MpstoreError: the registry cannot be read, or a record in it is damaged.
    """
    try:
        rows = conn.execute(
            f"SELECT name, model, key_field, indexes FROM {_sqlite.COLLECTIONS_TABLE} ORDER BY name"
        ).fetchall()
    except sqlite3.OperationalError as exc:
        raise MpstoreError(f"the collection registry cannot be read: {exc}") from exc
    found = {}
    for name, model, key, indexes in rows:
        try:
            _sqlite.check_identifier(name, "collection name")
            _sqlite.check_identifier(key, "key field")
            parsed = tuple(tuple(i) for i in _sqlite.registered_indexes(indexes, name))
        except MpstoreError as exc:
            raise MpstoreError(
                f"the registry's record of collection {name!r} is damaged: {exc.message}"
            ) from exc
        found[name] = Registration(
            name,
            model,
            key,
            parsed,
            tuple(sorted(_sqlite.recorded_json_keys(conn, name).items())) if json_keys else (),
        )
    return found


def _registration(conn: sqlite3.Connection, path: str, name: str) -> Registration:
    found = _registrations(conn)
    if name not in found:
        known = ", ".join(found) or "none"
        raise InvalidName(f"no collection {name!r} in {path} (collections: {known})", path)
    return found[name]


# -- info ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateState:
    """The write gate as seen from outside: whether someone holds it now, and who last took it.

    ``held`` is None where it cannot be tested (no ``flock``). ``pid`` and ``since`` (epoch
    seconds) come from the record the last holder wrote into the lock file or, where the
    holders use one, into the mailbox (the later of the two). ``stopped`` says
    why a holder that is stopped (``SIGSTOP``, Ctrl-Z, a debugger) keeps the gate.
    """

    lock_path: str
    exists: bool
    held: bool | None
    pid: int | None
    since: float | None
    stopped: str | None = None


def gate_state(lock_path: str) -> GateState:
    """Test whether the gate at ``lock_path`` is held, without waiting and without changing it.

    The test is a non-blocking shared ``flock`` on a descriptor of its own, released at once if
    granted; the lock file is only ever opened for reading, never created or truncated.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(lock_path, flags)
    except FileNotFoundError:
        return GateState(lock_path, False, False, None, None)
    try:
        held: bool | None = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held = True
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                held = False
        record = holder_on_record(_read_holder(fd), lock_path)
        pid, since = record if record is not None else (None, None)
        stopped = holder_stopped(pid, os.fstat(fd).st_ino) if held and pid is not None else None
    finally:
        os.close(fd)
    return GateState(lock_path, True, held, pid, since, stopped)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    rows: int | None
    key_field: str
    model: str
    indexes: list[list[str]]


@dataclass(frozen=True)
class Info:
    """What ``mpstore info`` reports about one file."""

    path: str
    sizes: dict[str, int | None]
    schema_version: int
    created_at: float | None
    journal_mode: str
    page_size: int
    pages: int
    free_pages: int
    collections: list[CollectionInfo]
    tables: dict[str, int | None]
    gate: GateState
    mailbox: Snapshot
    checked_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def info(path: str, immutable: bool = False) -> Info:
    """Collections and their row counts, file sizes, schema and journal mode, and the gate.

    :raises MpstoreError: no file at ``path``, or not an mpstore store.
    :raises CorruptDatabase: not an SQLite database.
    :raises PermissionDenied: see :func:`_connect_readonly` (``immutable`` too).
    """
    path = resolve(path)
    with _readonly(path, immutable) as conn, _sqlite.translating(path):
        meta = dict(conn.execute(f"SELECT key, value FROM {_sqlite.META_TABLE}").fetchall())
        regs = _registrations(conn)
        collections = [
            CollectionInfo(
                name,
                _count(conn, name),
                reg.key_field,
                reg.model,
                [list(i) for i in reg.indexes],
            )
            for name, reg in regs.items()
        ]
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%' "
                "ORDER BY name"
            )
        ]
        internal = {_sqlite.META_TABLE, _sqlite.COLLECTIONS_TABLE, *regs}
        tables = {n: _count(conn, n) for n in names if n not in internal}
        journal = _journal_mode(conn, path)
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    created = meta.get("created_at")
    return Info(
        path=path,
        sizes={s or "db": _size(path + s) for s in ("", "-wal", "-shm")},
        schema_version=int(meta.get("schema_version", "0")),
        created_at=float(created) if created is not None else None,
        journal_mode=str(journal),
        page_size=int(page_size),
        pages=int(pages),
        free_pages=int(free),
        collections=collections,
        tables=tables,
        gate=gate_state(path + ".lock"),
        mailbox=snapshot(path + ".mailbox"),
    )


def _count(conn: sqlite3.Connection, table: str) -> int | None:
    """The rows of ``table``, any name SQLite allows; None if SQLite cannot count them (a
    registered table that is missing, a virtual table whose module is not loaded here)."""
    quoted = '"' + table.replace('"', '""') + '"'
    try:
        return int(conn.execute(f"SELECT count(*) FROM {quoted}").fetchone()[0])
    except sqlite3.OperationalError:
        return None


def _rows_or_why(rows: int | None) -> str:
    return f"{rows} rows" if rows is not None else "rows not countable (table missing?)"


def format_bytes(n: int | None) -> str:
    """A size for people: bytes, KiB, MiB or GiB; ``absent`` for None."""
    if n is None:
        return "absent"
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} GiB"


def format_gate(gate: GateState, now: float) -> str:
    """One line about the gate: free, or held by whom and for how long."""
    if not gate.exists:
        return "free (no lock file yet)"
    if gate.held is None:
        return "unknown (this platform has no flock)"
    if not gate.held:
        return "free"
    if gate.pid is None or gate.since is None:
        return "held by a process that left no record (a tool using filelock?)"
    line = f"held by pid {gate.pid} for {max(0.0, now - gate.since):.3f} s"
    return line if gate.stopped is None else f"{line}, {gate.stopped}"


def format_mailbox(mailbox: Snapshot) -> str:
    """One line about the writes other processes left for the gate holder."""
    if not mailbox.exists:
        return "none yet"
    line = (
        f"{mailbox.waiting} waiting, {mailbox.carried} being committed by a holder, "
        f"{mailbox.done} done and not yet collected"
    )
    if mailbox.holder:
        line += f" (holder pid {mailbox.holder})"
    return line


def format_info(report: Info) -> str:
    """``report`` as the text ``mpstore info`` prints."""
    lines = [
        f"database        {report.path}",
        "files           "
        + ", ".join(f"{name} {format_bytes(size)}" for name, size in report.sizes.items()),
        f"pages           {report.pages} of {report.page_size} B, {report.free_pages} free",
        f"schema version  {report.schema_version}",
        f"journal mode    {report.journal_mode}",
        "synchronous     set by each connection, not stored in the file (Store's default: NORMAL)",
        f"write gate      {format_gate(report.gate, report.checked_at)}",
        f"mailbox         {format_mailbox(report.mailbox)}",
    ]
    if report.created_at is not None:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.created_at))
        lines.insert(4, f"created         {created}")
    lines.append(f"collections     {len(report.collections)}")
    for c in report.collections:
        indexes = ", ".join("(" + ", ".join(i) + ")" for i in c.indexes) or "none"
        lines.append(
            f"  {c.name}: {_rows_or_why(c.rows)}, key {c.key_field!r}, model {c.model}, "
            f"indexes {indexes}"
        )
    if report.tables:
        lines.append(f"other tables    {len(report.tables)}")
        lines.extend(f"  {name}: {_rows_or_why(rows)}" for name, rows in report.tables.items())
    return "\n".join(lines)


# -- check -----------------------------------------------------------------------------------


def check(path: str, immutable: bool = False) -> list[str]:
    """Everything wrong with the file; an empty list means healthy.

    SQLite's ``integrity_check``, then for an mpstore store: each registered collection's table
    and indexes exist, every value is a JSON object whose key field equals the row's key, and
    every indexed column holds what the JSON holds.

    :raises MpstoreError: there is no file at ``path``.
    :raises PermissionDenied: see :func:`_connect_readonly` (``immutable`` too).
    """
    path = resolve(path)
    try:
        conn = _connect_readonly(path, immutable)
    except CorruptDatabase as exc:
        return [exc.message]
    try:
        with _sqlite.translating(path):
            conn.execute("BEGIN")
            problems = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            if problems == ["ok"]:
                problems = []
            if not _has_table(conn, _sqlite.META_TABLE):
                return [*problems, f"not an mpstore store (no {_sqlite.META_TABLE} table)"]
            try:
                registered = _registrations(conn)
            except MpstoreError as exc:
                return [*problems, exc.message]
            for reg in registered.values():
                problems += _check_collection(conn, reg)
    except CorruptDatabase as exc:
        problems = [exc.message]
    finally:
        conn.close()
    return problems


def _check_collection(conn: sqlite3.Connection, reg: Registration) -> list[str]:
    if not _has_table(conn, reg.name):
        return [f"collection {reg.name!r} is registered but its table is missing"]
    problems = []
    try:
        keys = _sqlite.recorded_json_keys(conn, reg.name)
        reg = replace(reg, json_keys=tuple(sorted(keys.items())))
        paths = {f: reg.json_path(f) for f in (reg.key_field, *reg.indexed)}
    except MpstoreError as exc:
        return [f"collection {reg.name!r}: {exc.message}"]
    sql = _sqlite.CollectionSQL(reg.name, reg.indexed, reg.indexes)
    present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    for name, _ in sql.indexes:
        if name not in present:
            problems.append(f"collection {reg.name!r}: index {name} is missing")
    t = _sqlite.quote(reg.name)
    key_path = paths[reg.key_field]
    # SQLite's JSON functions fail on text that is not JSON, so the other checks look only at
    # the rows that hold an object (CASE, unlike AND, evaluates in the order written).
    an_object = "CASE WHEN json_valid(value) THEN json_type(value) = 'object' ELSE 0 END"
    (bad_json,) = conn.execute(f"SELECT count(*) FROM {t} WHERE NOT ({an_object})").fetchone()
    if bad_json:
        problems.append(f"collection {reg.name!r}: {bad_json} values are not JSON objects")
    (bad_keys,) = conn.execute(
        f"SELECT count(*) FROM {t} "
        f"WHERE CASE WHEN {an_object} THEN json_extract(value, ?) IS NOT key ELSE 0 END",
        (key_path,),
    ).fetchone()
    if bad_keys:
        problems.append(
            f"collection {reg.name!r}: {bad_keys} rows whose key differs from the record's "
            f"{reg.key_field!r}"
        )
    columns = {r[0] for r in conn.execute(sql.columns)}
    for fld in reg.indexed:
        column = _sqlite.column_for(fld)
        if column not in columns:
            problems.append(f"collection {reg.name!r}: indexed column {column} is missing")
            continue
        (stale,) = conn.execute(
            f"SELECT count(*) FROM {t} WHERE CASE WHEN {an_object} "
            f"THEN {_sqlite.quote(column)} IS NOT json_extract(value, ?) ELSE 0 END",
            (paths[fld],),
        ).fetchone()
        if stale:
            problems.append(
                f"collection {reg.name!r}: {stale} rows whose indexed column {column} differs "
                f"from the record's {fld!r}"
            )
    return problems


# -- export ----------------------------------------------------------------------------------


def export(path: str, name: str, out: IO[str], immutable: bool = False) -> int:
    """Write every record of collection ``name`` to ``out`` as JSON Lines, in key order, from one
    snapshot; return how many.

    :raises MpstoreError: no file, not an mpstore store, a damaged registry, or the
        collection's table is missing.
    :raises InvalidName: no such collection.
    :raises PermissionDenied: see :func:`_connect_readonly` (``immutable`` too).
    """
    path = resolve(path)
    count = 0
    with _readonly(path, immutable) as conn, _sqlite.translating(path):
        _registration(conn, path, name)
        if not _has_table(conn, name):
            raise MpstoreError(f"collection {name!r} is registered, but its table is missing", path)
        for (value,) in conn.execute(f"SELECT value FROM {_sqlite.quote(name)} ORDER BY key"):
            out.write(value)
            out.write("\n")
            count += 1
    return count


def export_to_file(path: str, name: str, target: str, immutable: bool = False) -> int:
    """:func:`export` into ``target``, which appears complete or not at all.

    :raises MpstoreError: ``target`` is the database or one of the files beside it, which the
        export would replace; and as :func:`export`.
    """
    database = resolve(path)
    beside = (*_sqlite.FILES, ".lock", ".mailbox")
    if os.path.realpath(target) in {database + suffix for suffix in beside}:
        raise MpstoreError(f"will not export onto {target}: it is part of the store", database)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".mpstore-export-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            count = export(path, name, f, immutable)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return count


# -- import ----------------------------------------------------------------------------------


def split_model_spec(spec: str) -> tuple[str, str]:
    """``package.module:Class`` (or ``package.module.Class``) as (module, attribute path).

    :raises InvalidName: ``spec`` has no module or no class part.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise InvalidName(f"--model must look like package.module:Class, got {spec!r}")
    return module_name, attr


def load_model(spec: str) -> type[Any]:
    """The pydantic model class named ``package.module:Class`` (or ``package.module.Class``).

    The current directory is searched first, as ``python -m`` would.

    :raises InvalidName: ``spec`` is malformed, the module or class cannot be found, or
        importing the module raised.
    :raises RecordTypeError: the object found is not a pydantic model.
    """
    from pydantic import BaseModel

    module_name, attr = split_model_spec(spec)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidName(f"cannot import {module_name!r} for --model: {exc}") from exc
    except Exception as exc:  # the module itself failed while it was being imported
        raise InvalidName(
            f"importing {module_name!r} for --model failed: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InvalidName(f"{module_name!r} has no {attr!r} (from --model {spec!r})")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise RecordTypeError(f"--model {spec!r} is not a pydantic BaseModel subclass")
    return obj


def _lines(source: IO[str], label: str) -> Iterator[tuple[int, str]]:
    number = 0
    try:
        for number, line in enumerate(source, 1):
            text = line.strip()
            if text:
                yield number, text
    except UnicodeDecodeError as exc:
        raise RecordTypeError(f"{label}: not UTF-8 text near line {number + 1}") from exc


def _one_line(error: Any) -> str:
    """The first problem pydantic reports, on one line."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "record"
    more = error.error_count() - 1
    return f"{where}: {first['msg']}" + (f" (and {more} more)" if more else "")


def import_records(
    path: str,
    name: str,
    source: IO[str],
    *,
    label: str,
    model: str | None = None,
    key: str | None = None,
    indexes: Sequence[Sequence[str]] = (),
    total_bytes: int | None = None,
    progress: Progress | None = None,
    max_record_bytes: int = 16 * 1024 * 1024,
) -> int:
    """Validate every JSON line of ``source``, then upsert them all into collection ``name`` in
    one transaction; return how many. One bad line imports nothing.

    With ``model`` each line is validated by that pydantic model and written through
    :meth:`Store.collection`, exactly as an application would; the database and the collection
    are created if missing (keyed by ``key``, default ``"id"``, or by the registered key), and
    ``indexes`` are declared beside those already registered.
    Without it the collection must exist: each line must be a JSON object whose key field is a
    non-empty string and whose indexed fields are present and scalar; the line is stored as it
    is and the indexed columns are computed from it by SQLite's ``json_extract``, the function
    mpstore uses to fill a newly indexed column.

    :raises MpstoreError: no file (without ``model``), or a file that is not an mpstore store.
    :raises InvalidName: no such collection, a bad ``model``, ``key`` differs from the
        registered key field, or ``indexes`` without ``model``.
    :raises RecordTypeError, InvalidKey, RecordTooLarge: a bad line (its number is in the
        message); nothing is written.
    :raises GateTimeout: the gate was not granted within the store's timeout.
    """
    path = resolve(path)
    wanted = tuple(tuple(i) for i in indexes)
    if wanted and model is None:
        raise InvalidName("declaring indexes needs --model, to compute them from records", path)
    reg: Registration | None = None
    if model is None or os.path.exists(path):
        with _readonly(path) as conn, _sqlite.translating(path):
            found = _registrations(conn, json_keys=True)
        reg = found.get(name)
        if reg is None and model is None:
            known = ", ".join(found) or "none"
            raise InvalidName(
                f"no collection {name!r} in {path} (collections: {known}); pass --model to "
                "create it",
                path,
            )
    if reg is not None and key is not None and key != reg.key_field:
        raise InvalidName(f"collection {name!r} is keyed by {reg.key_field!r}, not {key!r}", path)
    key_field = reg.key_field if reg is not None else (key or "id")
    registered = reg.indexes if reg is not None else ()
    declared = registered + tuple(i for i in wanted if i not in registered)
    if model is not None:
        return _import_with_model(
            path, name, source, label, load_model(model), key_field, declared, total_bytes, progress
        )
    assert reg is not None
    return _import_raw(path, reg, source, label, total_bytes, progress, max_record_bytes)


class _Counter:
    """Reports progress about every 1% of the input (or every 1000 records without a size)."""

    def __init__(self, total: int | None, progress: Progress | None) -> None:
        self.total, self.progress = total, progress
        self.done = self.records = 0
        self._reported = -1
        self._step = max(1, total // 100) if total else 0
        self._next = self._step

    def add(self, line: str) -> None:
        self.records += 1
        self.done += len(line.encode()) + 1
        if self.progress is None:
            return
        if (self.total and self.done >= self._next) or (
            not self.total and self.records % 1000 == 0
        ):
            self._next = self.done + self._step
            self._reported = self.records
            self.progress(self.done, self.total, self.records)

    def finish(self) -> None:
        if self.progress is not None and self._reported != self.records:
            self.progress(self.total or self.done, self.total, self.records)


def _import_with_model(
    path: str,
    name: str,
    source: IO[str],
    label: str,
    model: type[Any],
    key_field: str,
    indexes: tuple[tuple[str, ...], ...],
    total: int | None,
    progress: Progress | None,
) -> int:
    from pydantic import ValidationError

    from ._store import Store

    counter = _Counter(total, progress)
    records: list[tuple[int, Any]] = []
    for number, line in _lines(source, label):
        try:
            records.append((number, model.model_validate_json(line)))
        except ValidationError as exc:
            raise RecordTypeError(
                f"{label}:{number}: not a valid {model.__name__}: {_one_line(exc)}"
            ) from exc
        counter.add(line)
    counter.finish()
    # The rows are made on a scratch store, before the gate is taken (a refused import then
    # leaves no new file behind either), and made again under it only if the file's
    # collection fills other columns.
    with tempfile.TemporaryDirectory() as scratch, Store(os.path.join(scratch, "x")) as probe:
        made = probe.collection(name, model, key=key_field, indexes=indexes)
        rows = _rows(made, records, label, path)
        shape = (made.indexed, made._carried_keys)
    with Store(path) as store, store.write():
        # Creating the collection or its indexes is part of the import's transaction: a record
        # refused below leaves the file as it was.
        coll = store.collection(name, model, key=key_field, indexes=indexes)
        if (coll.indexed, coll._carried_keys) != shape:
            rows = _rows(coll, records, label, path)
        return store._run_op(coll._upsert_op(rows)) if rows else 0


def _rows(
    coll: Any, records: list[tuple[int, Any]], label: str, path: str
) -> list[tuple[Any, ...]]:
    """The rows of the numbered ``records`` for collection ``coll``, bound for ``path``.

    :raises InvalidKey, RecordTooLarge, RecordTypeError: a record cannot be stored; the
        message names its line.
    """
    from pydantic import ValidationError

    rows = []
    for number, record in records:
        try:
            rows.append(coll._row(record))
        except (InvalidKey, RecordTooLarge, RecordTypeError) as exc:
            raise type(exc)(f"{label}:{number}: {exc.message}", path) from exc
        except ValidationError as exc:
            raise RecordTypeError(f"{label}:{number}: {_one_line(exc)}", path) from exc
    return rows


def _import_raw(
    path: str,
    reg: Registration,
    source: IO[str],
    label: str,
    total: int | None,
    progress: Progress | None,
    max_record_bytes: int,
) -> int:
    from ._store import Store

    counter = _Counter(total, progress)
    rows: list[tuple[Any, ...]] = []
    numbers: list[int] = []
    fields = (reg.key_field, *reg.indexed)
    keys = {f: reg.json_key(f) for f in fields}
    for number, line in _lines(source, label):
        where = f"{label}:{number}"
        if len(line.encode()) > max_record_bytes:
            raise RecordTooLarge(
                f"{where}: the record is larger than the store's limit of {max_record_bytes} bytes",
                path,
            )
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordTypeError(f"{where}: not valid JSON: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise RecordTypeError(f"{where}: a record must be a JSON object")
        if keys[reg.key_field] not in record:
            raise InvalidKey(f"{where}: the record has no key field {keys[reg.key_field]!r}")
        try:
            record_key = check_key(record[keys[reg.key_field]])
        except InvalidKey as exc:
            raise InvalidKey(f"{where}: {exc.message}") from exc
        values: list[Any] = []
        for fld in reg.indexed:
            value = record.get(keys[fld], _MISSING)
            if value is _MISSING:
                raise RecordTypeError(
                    f"{where}: indexed field {keys[fld]!r} is missing; without --model "
                    "its default is unknown, so import with --model"
                )
            if not isinstance(value, _SCALARS):
                raise RecordTypeError(
                    f"{where}: indexed field {fld!r} must hold a scalar, got {value!r}"
                )
            values.append(int(value) if isinstance(value, bool) else value)
        rows.append((record_key, line, *values))
        numbers.append(number)
        counter.add(line)
    counter.finish()
    table = _sqlite.quote(reg.name)
    columns = [_sqlite.quote(_sqlite.column_for(f)) for f in reg.indexed]
    probe = "SELECT " + ", ".join(
        f"json_extract(?1, {_sqlite.literal(reg.json_path(f))})" for f in fields
    )
    updates = ", ".join(f"{c}=excluded.{c}" for c in ["value", *columns])
    sql = (
        f"INSERT INTO {table} ({', '.join(['key', 'value', *columns])}) "
        f"VALUES ({', '.join('?' * (2 + len(columns)))}) ON CONFLICT(key) DO UPDATE SET {updates}"
    )
    with Store(path) as store, store.write() as conn:
        # The registration is read again under the gate: the rows were checked against it.
        now = _registrations(conn, json_keys=True).get(reg.name)
        if now != reg:
            raise TransactionError(
                f"collection {reg.name!r} changed while the file was read; run the import again",
                path,
            )
        # The columns hold what Python read; SQLite must read each line's key and indexed
        # fields alike, or they (and check, and columns SQLite fills) would disagree with the
        # record: it does not match a key written with escapes ("\u00e9"), and of a key
        # written twice it takes the first.
        for number, row in zip(numbers, rows, strict=True):
            expected = (row[0], *row[2:])
            try:
                got = conn.execute(probe, (row[1],)).fetchone()
            except sqlite3.Error as exc:
                raise RecordTypeError(
                    f"{label}:{number}: SQLite cannot read this JSON: {exc}"
                ) from exc
            if tuple(got) != expected:
                raise RecordTypeError(
                    f"{label}:{number}: SQLite reads {fields} of this record as {tuple(got)!r}, "
                    f"not {expected!r}: a key written with escapes or twice? Write it plainly "
                    "(json.dumps(..., ensure_ascii=False)), or import with --model"
                )
        conn.executemany(sql, rows).close()
    return len(rows)
