"""A Hypothesis example database in an mpstore file, safe for many processes at once.

Hypothesis keeps the examples that made a test fail in an example database and replays them on
the next run. Under pytest-xdist every worker shares that database; Hypothesis's directory
database takes no lock and ignores write errors. :class:`SQLiteExampleDatabase` keeps the
examples in one SQLite file behind mpstore's write gate instead: every ``save``, ``delete`` and
``move`` is one transaction, so concurrent workers never lose or duplicate a value.

.. code-block:: python

    from hypothesis import settings
    from mpstore.hypothesis import SQLiteExampleDatabase

    settings.register_profile("shared", database=SQLiteExampleDatabase(".hypothesis/examples.db"))
    settings.load_profile("shared")  # or run pytest --hypothesis-profile=shared
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from hypothesis.database import ExampleDatabase, ListenerEventT, ListenerT

from . import _fork, _sqlite
from ._errors import (
    DirectoryNotFound,
    MpstoreError,
    PermissionDenied,
    RecordTooLarge,
    RecordTypeError,
    StoreClosed,
    TransactionError,
)
from ._gate import check_kind
from ._store import Store

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["ExampleDatabaseWarning", "SQLiteExampleDatabase"]

_T = TypeVar("_T")


class ExampleDatabaseWarning(UserWarning):
    """An example could not be saved, deleted, moved or fetched (the file or the gate failed);
    the run goes on without it, as with Hypothesis's own databases."""


#: The table of examples: one row per (key, value) pair, so a value is never stored twice.
EXAMPLES_TABLE = "_mpstore_hypothesis_examples"
#: The change log: one row per change, written in the transaction that makes the change, so a
#: listener in another process can replay every change in commit order.
CHANGES_TABLE = "_mpstore_hypothesis_changes"

_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {EXAMPLES_TABLE} (key BLOB NOT NULL, value BLOB NOT NULL, "
    "PRIMARY KEY (key, value)) WITHOUT ROWID",
    f"CREATE TABLE IF NOT EXISTS {CHANGES_TABLE} (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "event TEXT NOT NULL CHECK (event IN ('save', 'delete')), key BLOB NOT NULL, "
    "value BLOB NOT NULL, origin TEXT NOT NULL, at REAL NOT NULL)",
)
_INSERT = f"INSERT OR IGNORE INTO {EXAMPLES_TABLE} (key, value) VALUES (?, ?)"
_DELETE = f"DELETE FROM {EXAMPLES_TABLE} WHERE key = ? AND value = ?"
_LOG = f"INSERT INTO {CHANGES_TABLE} (event, key, value, origin, at) VALUES (?, ?, ?, ?, ?)"
_PRUNE = f"DELETE FROM {CHANGES_TABLE} WHERE at < ?"
_PRUNE_EVERY = 256
_READ_LOG = (
    f"SELECT seq, event, key, value FROM {CHANGES_TABLE} WHERE seq > ? AND seq <= ? ORDER BY seq"
)

#: Every instance alive in this process (by identity: equal instances are distinct objects),
#: so a forked child can drop the parent's listeners.
_instances: weakref.WeakValueDictionary[int, SQLiteExampleDatabase] = weakref.WeakValueDictionary()

#: What a failing file or gate raises. Hypothesis calls its database without a safety net, and
#: its own databases carry on without the example; so does this one, with a warning.
_CARRY_ON = (MpstoreError, OSError, sqlite3.Error)
#: ... but not a misuse of mpstore or of sqlite3, which is a bug to see, not a file to forgive.
_MISUSE = (TransactionError, StoreClosed, sqlite3.ProgrammingError, sqlite3.InterfaceError)


def _after_fork_in_child() -> None:
    for db in list(_instances.values()):
        db._forget_listeners()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _as_bytes(data: object, what: str) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise RecordTypeError(
        f"Hypothesis example database {what}s must be bytes, got {type(data).__name__}"
    )


class SQLiteExampleDatabase(ExampleDatabase):
    """Hypothesis's ``ExampleDatabase`` in an mpstore file that many processes share safely.

    The file is opened on first use (and its directory created), so building one in a settings
    profile costs nothing. An instance can be pickled (it travels as its path and settings) and
    survives ``fork``; listeners stay with the process that added them.

    Change listeners hear every change in commit order, each once: this instance's own saves
    and deletes before the call returns (with any change committed before them), and changes
    committed by any other instance or process within about ``poll_interval`` seconds, from a
    background thread (it checks SQLite's ``PRAGMA data_version``, then reads the change log).
    A move is a ``delete`` event followed by a ``save`` event. A listener's error is reported
    through ``threading.excepthook`` and the others still hear. Changes are logged for
    ``retention`` seconds; a listener held up for longer misses the older ones. The log is
    the file's: every instance prunes what is older than its own ``retention``, so the
    shortest among the writers holds.

    A save, delete or move that the file or the gate refuses (a timeout, a full disk, a
    damaged file, an example over ``max_record_bytes``) is dropped with an
    :class:`ExampleDatabaseWarning`, and a fetch that fails finds nothing, as Hypothesis's own
    databases do: a test's own failure is never replaced by the database's. (Where warnings
    are errors, the report goes to the ``mpstore.hypothesis`` logger instead.)

    :param path: the database file; created with mode ``0o600`` if missing.
    :param poll_interval: seconds between checks for other processes' changes while listening.
    :param retention: seconds the change log keeps a change for listeners to read.
    :param timeout: seconds a write waits for the gate before raising ``GateTimeout``.
    :param gate: the write gate's kind, as :class:`mpstore.Store`'s; in a process whose
        application stores share the file, theirs (every store of one process on one file
        uses one gate).
    :raises ValueError: a setting is not a positive number, or ``gate`` is not a kind.
    :raises RecordTypeError: (from every method) a key or value is not bytes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_interval: float = 0.05,
        retention: float = 600.0,
        timeout: float = 30.0,
        gate: str = "auto",
    ) -> None:
        super().__init__()
        self.path = os.path.realpath(os.fspath(path))
        self.poll_interval = _positive(poll_interval, "poll_interval")
        self.retention = _positive(retention, "retention")
        self.timeout = _positive(timeout, "timeout")
        self.gate = check_kind(gate)
        self._open_lock = threading.Lock()
        self._store: Store | None = None
        self._origin = ""
        self._origin_pid = 0
        self._poller: _Poller | None = None
        self._delivery = threading.RLock()  # see _deliver
        self._delivered = 0  # the last change log seq handed to the listeners
        self._wanted = 0  # the last seq a delivery was asked for
        self._delivering = False
        # One entry per add_listener() call, told apart by identity: a listener removed and
        # added back during a delivery is a new entry, which does not hear the batch under way.
        self._entries: list[_Entry] = []
        _instances[id(self)] = self

    # -- identity, pickling, lifetime ------------------------------------------------------

    def __repr__(self) -> str:
        return f"SQLiteExampleDatabase({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SQLiteExampleDatabase) and self.path == other.path

    def __hash__(self) -> int:
        return hash((SQLiteExampleDatabase, self.path))

    def __reduce__(self) -> tuple[Any, ...]:
        settings: dict[str, Any] = {
            "poll_interval": self.poll_interval,
            "retention": self.retention,
            "timeout": self.timeout,
            "gate": self.gate,
        }
        return (_rebuild, (self.__class__, self.path, settings))

    def close(self) -> None:
        """Stop listening and close the file; a later call opens it again. Idempotent."""
        self.clear_listeners()
        with self._open_lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    def _open(self) -> Store:
        store = self._store
        if store is not None:
            return store
        with self._open_lock:
            if self._store is None:
                self._make_directory()
                store = Store(self.path, timeout=self.timeout, pool_size=2, gate=self.gate)
                try:
                    # Only the first opener of a file waits for the gate to create the tables.
                    if not self._has_tables(store):
                        with store.write() as conn:
                            for statement in _SCHEMA:
                                conn.execute(statement)
                except BaseException:
                    store.close()
                    raise
                self._store = store
            return self._store

    def _make_directory(self) -> None:
        """:raises DirectoryNotFound, PermissionDenied: the directory cannot be made."""
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise DirectoryNotFound(
                f"cannot make the directory of {self.path}: a file is in the way",
                self.path,
                exc.errno,
            ) from exc
        except PermissionError as exc:
            raise PermissionDenied(
                f"cannot make the directory of {self.path}: {exc.strerror}", self.path, exc.errno
            ) from exc

    @staticmethod
    def _has_tables(store: Store) -> bool:
        wanted = (EXAMPLES_TABLE, CHANGES_TABLE)
        found = store.query("SELECT count(*) FROM sqlite_master WHERE name IN (?, ?)", wanted)
        return bool(found[0][0] == len(wanted))

    def _me(self) -> str:
        """This instance's name in the change log; a forked child gets a name of its own."""
        pid = os.getpid()
        if self._origin_pid != pid:
            self._origin, self._origin_pid = f"{pid}-{uuid.uuid4().hex}", pid
        return self._origin

    def _check_size(self, store: Store, *items: bytes) -> None:
        size = sum(len(item) for item in items)
        if size > store.max_record_bytes:
            raise RecordTooLarge(
                f"an example of {size} bytes is larger than the store's limit of "
                f"{store.max_record_bytes} bytes (max_record_bytes)",
                self.path,
            )

    # -- the ExampleDatabase interface -----------------------------------------------------

    def fetch(self, key: bytes) -> Iterable[bytes]:
        """Every value saved under ``key``, in byte order (none, with a warning, if the file
        cannot be read).

        :raises RecordTypeError: ``key`` is not bytes.
        """
        key = _as_bytes(key, "key")
        sql = f"SELECT value FROM {EXAMPLES_TABLE} WHERE key = ? ORDER BY value"
        try:
            rows = self._with_store(lambda store: store.query(sql, (key,)))
        except _CARRY_ON as exc:
            if isinstance(exc, _MISUSE):
                raise
            self._carry_on("fetch skipped, Hypothesis goes on without it", exc, stacklevel=3)
            return iter(())
        return (bytes(value) for (value,) in rows)

    def save(self, key: bytes, value: bytes) -> None:
        """Save ``value`` under ``key``; nothing happens if it is there already.

        :raises RecordTypeError: ``key`` or ``value`` is not bytes.
        """
        key, value = _as_bytes(key, "key"), _as_bytes(value, "value")
        self._change("save", [("save", key, value)])

    def delete(self, key: bytes, value: bytes) -> None:
        """Remove ``value`` from ``key``; nothing happens if it is not there.

        :raises RecordTypeError: ``key`` or ``value`` is not bytes.
        """
        key, value = _as_bytes(key, "key"), _as_bytes(value, "value")
        self._change("delete", [("delete", key, value)])

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        """Move ``value`` from ``src`` to ``dest`` in one transaction.

        As in Hypothesis, ``value`` ends up under ``dest`` whether or not it was under ``src``;
        when ``src == dest`` this is a save. Concurrent moves never lose or duplicate a value.

        :raises RecordTypeError: a key or ``value`` is not bytes.
        """
        src, dest = _as_bytes(src, "key"), _as_bytes(dest, "key")
        value = _as_bytes(value, "value")
        if src == dest:
            self._change("move", [("save", dest, value)])
        else:
            self._change("move", [("delete", src, value), ("save", dest, value)])

    def _change(self, what: str, changes: list[tuple[str, bytes, bytes]]) -> None:
        """Apply ``changes`` in one write transaction, logging the ones that changed something,
        then hand the listeners every change committed up to them."""

        def write(store: Store) -> int:
            for event, key, value in changes:
                if event == "save":
                    self._check_size(store, key, value)
            origin = self._me()
            last = 0
            with store.write() as conn:
                for event, key, value in changes:
                    statement = _INSERT if event == "save" else _DELETE
                    if conn.execute(statement, (key, value)).rowcount:
                        last = self._log(conn, event, key, value, origin)
            return last

        def read(after: int, upto: int) -> list[tuple[Any, ...]]:
            # Through the store open now: a listener may have closed the one written to.
            return self._with_store(lambda store: store.query(_READ_LOG, (after, upto)))

        try:
            last = self._with_store(write)
        except _CARRY_ON as exc:
            if isinstance(exc, _MISUSE):
                raise
            self._carry_on(f"{what} skipped, Hypothesis goes on without it", exc)
            return
        if not last:
            return
        try:
            self._deliver(read, last)
        except _CARRY_ON as exc:
            if isinstance(exc, _MISUSE):
                raise
            # Committed: the polling thread hands it out instead (the delivery is behind).
            self._carry_on(f"{what} made; its listeners hear of it later", exc)

    def _with_store(self, fn: Callable[[Store], _T]) -> _T:
        """``fn(store)`` on the open store; once more if :meth:`close` (from a listener in
        another thread) closed it before ``fn`` could start, which writes nothing.

        :raises StoreClosed: the store closed under ``fn`` otherwise (a misuse).
        """
        store = self._open()
        try:
            return fn(store)
        except StoreClosed:
            if store is self._store:
                raise
            return fn(self._open())

    def _carry_on(self, what: str, exc: BaseException, stacklevel: int = 4) -> None:
        """Warn that ``exc`` cut ``what`` short (``stacklevel`` names the caller of the public
        method). Where warnings are errors (``-W error``, ``filterwarnings = error``) the
        warning, raised into Hypothesis's engine, would replace the test's own outcome: it
        goes to the ``mpstore.hypothesis`` logger instead."""
        message = f"{self!r}: {what}: {type(exc).__name__}: {exc}"
        try:
            warnings.warn(message, ExampleDatabaseWarning, stacklevel=stacklevel)
        except ExampleDatabaseWarning:
            logging.getLogger(__name__).warning("%s", message)

    def _log(self, conn: Connection, event: str, key: bytes, value: bytes, origin: str) -> int:
        """Log one change; its seq."""
        now = time.time()
        seq = conn.execute(_LOG, (event, key, value, origin, now)).lastrowid
        assert seq is not None  # an INSERT into a table with an INTEGER PRIMARY KEY
        if seq % _PRUNE_EVERY == 0:
            conn.execute(_PRUNE, (now - self.retention,))
        return seq

    # -- change listening ------------------------------------------------------------------
    #
    # One re-entrant lock, _delivery, orders everything listeners see: deliveries, and adding
    # or removing listeners (a listener may do either, or save, from inside a delivery).

    def _deliver(self, read: Callable[[int, int], list[tuple[Any, ...]]], upto: int) -> None:
        """Hand the listeners the logged changes after the last one delivered, up to seq
        ``upto``, in commit order; ``read(after, upto)`` reads them from the log.

        Whoever comes first (the thread that committed a change, or the polling thread)
        delivers; each change goes out once. A change that a listener makes is handed out by
        the delivery under way, after the one that listener was hearing.
        """
        with self._delivery:
            self._wanted = max(self._wanted, upto)
            if self._delivering:
                return  # a listener's own change: the loop below hands it out
            self._delivering = True
            try:
                while self._poller is not None and self._wanted > self._delivered:
                    rows = read(self._delivered, self._wanted)
                    if not rows:
                        break
                    # Those listening when these changes were read: one added by a listener
                    # meanwhile hears only what is read after it was added.
                    audience = list(self._entries)
                    for seq, event, key, value in rows:
                        if self._poller is None or seq <= self._delivered:
                            break  # stopped, or listening started again further on
                        self._delivered = seq
                        self._broadcast_change(
                            ("save", (bytes(key), bytes(value)))
                            if event == "save"
                            else ("delete", (bytes(key), bytes(value))),
                            audience,
                        )
                self._wanted = self._delivered
            finally:
                self._delivering = False

    def _behind(self) -> bool:
        """Whether a delivery stopped short (a listener raised KeyboardInterrupt)."""
        return self._wanted > self._delivered

    def _broadcast_change(
        self, event: ListenerEventT, audience: list[_Entry] | None = None
    ) -> None:
        """Call each listener of ``audience`` (all of them by default) that is still listening:
        one that a listener removed meanwhile hears nothing more."""
        stop: BaseException | None = None
        entries = self._entries
        for entry in list(entries) if audience is None else audience:
            if entry not in entries:
                continue
            try:
                entry.listener(event)
            except Exception:
                # Reported as an uncaught error of this thread; one failing listener must not
                # silence the others or later changes.
                threading.excepthook(_hook_args())
            except BaseException as exc:  # KeyboardInterrupt: the others still hear first
                stop = stop or exc
        if stop is not None:
            raise stop

    def add_listener(self, f: ListenerT, /) -> None:
        """Add a change listener (see the class); the first starts the polling thread.

        :raises MpstoreError: the file cannot be opened; ``f`` is not added.
        """
        with self._delivery:
            entry = _Entry(f)
            self._entries.append(entry)
            self._listeners.append(f)
            if self._poller is None:
                try:
                    self._start_listening()
                except BaseException:
                    self._entries.remove(entry)
                    self._listeners.remove(f)
                    raise

    def remove_listener(self, f: ListenerT, /) -> None:
        """Remove ``f`` (nothing happens if it is not a listener); the last stops the thread."""
        with self._delivery:
            if f not in self._listeners:
                return
            self._listeners.remove(f)
            # The entry list.remove() would take: the first whose listener equals f.
            self._entries.remove(next(e for e in self._entries if e.listener == f))
            if not self._listeners:
                self._stop_listening()

    def clear_listeners(self) -> None:
        """Remove every listener and stop the polling thread."""
        with self._delivery:
            self._listeners.clear()
            self._entries.clear()
            self._stop_listening()

    def _start_listening(self) -> None:
        store = self._open()
        with self._delivery:
            # Read where the log ends now, before returning: every change committed after
            # add_listener() returns is then delivered.
            (last,) = store.query(f"SELECT coalesce(max(seq), 0) FROM {CHANGES_TABLE}")[0]
            self._delivered = self._wanted = int(last)
            poller = self._poller = _Poller(self)
            try:
                poller.start()
            except BaseException:
                self._poller = None  # no thread: the next listener starts one
                raise

    def _stop_listening(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.stop()

    def _forget_listeners(self) -> None:
        """In a forked child: the polling thread did not survive the fork, so neither do the
        listeners; the child adds its own. Locks a lost thread may have held are new."""
        self._listeners.clear()
        self._entries.clear()
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.after_fork_in_child()
        self._open_lock = threading.Lock()
        self._delivery = threading.RLock()
        self._delivering = False


#: The end of the log, for a reader that wants every change logged so far.
_END = 1 << 62


class _Stopped(Exception):
    """The polling thread was stopped in the middle of a delivery."""


class _Entry:
    """One add_listener() call's listener; entries compare by identity."""

    __slots__ = ("listener",)

    def __init__(self, listener: ListenerT) -> None:
        self.listener = listener


class _Poller:
    """The thread that notices other processes' changes and broadcasts them."""

    def __init__(self, db: SQLiteExampleDatabase) -> None:
        self._db = db
        self._stopping = threading.Event()
        self._conn: sqlite3.Connection | None = None  # the thread's own, while it runs
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._run, name=f"mpstore-hypothesis-listener:{db.path}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._pid == os.getpid() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        db = self._db
        try:
            version = None
            reported = ""
            while not self._stopping.is_set() and self._pid == os.getpid():
                try:
                    with _fork.background_sqlite:
                        # Under the lock fork takes first: a child finds it in _conn to close.
                        if self._conn is None:
                            self._conn = self._connect()
                        conn = self._conn
                        (now,) = conn.execute("PRAGMA data_version").fetchone()
                    if now != version or db._behind():
                        version = now
                        self._deliver(conn)
                except (sqlite3.Error, MpstoreError) as exc:
                    # Reported once (it may last), and tried again at the next poll: listening
                    # must not stop for good because the file was busy or unreadable a while
                    # (its connection too: out of descriptors, say).
                    if str(exc) != reported:
                        reported = str(exc)
                        threading.excepthook(_hook_args())
                self._stopping.wait(min(db.poll_interval, threading.TIMEOUT_MAX))
        finally:
            if self._pid == os.getpid():
                with _fork.background_sqlite:
                    last, self._conn = self._conn, None
                    if last is not None:
                        last.close()
            # else forked from a listener of this thread: after_fork_in_child closed it.

    def _connect(self) -> sqlite3.Connection:
        """The thread's read-only connection of its own (the caller holds
        ``background_sqlite``): ``data_version`` changes when *another* connection commits.

        :raises MpstoreError: the file cannot be opened.
        """
        return _sqlite.connect(
            self._db.path, busy_timeout=self._db.timeout, synchronous="NORMAL", readonly=True
        )

    def after_fork_in_child(self) -> None:
        """Have the parent's connection of this thread, which is outside SQLite now (fork
        takes ``background_sqlite`` first), closed before the child opens one of its own
        (see :func:`mpstore._fork.close_before_connecting`)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            _fork.close_before_connecting(conn)

    def _deliver(self, conn: sqlite3.Connection) -> None:
        """Deliver what the log holds, once the lock is free; give up waiting if stopped (a
        thread holding the lock may be the one that stops this thread, and waits for it)."""
        db = self._db
        lock = db._delivery  # the one to release, even if a listener forks (see _forget...)
        while not lock.acquire(timeout=min(db.poll_interval, 0.05)):
            if self._stopping.is_set():
                return
        try:
            if not self._stopping.is_set():
                db._deliver(lambda after, upto: self._read(conn, after, upto), _END)
        except _Stopped:
            return
        except sqlite3.Error:
            raise  # reading the log: _run reports it once
        except BaseException:
            # A listener's SystemExit (the others heard the change): report it, keep polling.
            threading.excepthook(_hook_args())
        finally:
            lock.release()

    def _read(self, conn: sqlite3.Connection, after: int, upto: int) -> list[tuple[Any, ...]]:
        if self._stopping.is_set():
            # Not "nothing more": the delivery stays behind, for whoever delivers next.
            raise _Stopped
        with _fork.background_sqlite:
            rows: list[tuple[Any, ...]] = conn.execute(_READ_LOG, (after, upto)).fetchall()
        return rows


def _hook_args() -> Any:
    import sys

    exc_type, exc, tb = sys.exc_info()
    return threading.ExceptHookArgs((exc_type, exc, tb, threading.current_thread()))


def _rebuild(
    cls: type[SQLiteExampleDatabase], path: str, settings: dict[str, Any]
) -> SQLiteExampleDatabase:
    return cls(path, **settings)


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if value == float("inf"):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)
