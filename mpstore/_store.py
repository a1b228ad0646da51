"""The Store: one SQLite file that many threads and processes write to through one gate."""

from __future__ import annotations

import math
import os
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from . import _checkpoint, _fork, _mailbox, _sqlite
from ._checkpoint import Checkpointer
from ._connection import Connection, check_statement, translating_reads
from ._errors import (
    Abandoned,
    GateTimeout,
    MpstoreError,
    PoolTimeout,
    StoreClosed,
    Timeout,
    TransactionError,
)
from ._gate import TRY_COST, YIELDS, check_kind, drop_gate, gate_for
from ._pool import Pool
from ._sqlite import translating
from ._stats import Stats
from ._writer import WriteQueue

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ._collection import Collection

__all__ = ["EVENTS", "Store"]

M = TypeVar("M", bound="BaseModel")
T = TypeVar("T")

#: The instrumentation points, in the order one write passes them. ``on_event`` receives the
#: name; a test can pause there to force an interleaving, a metrics sink can time the gaps.
EVENTS = (
    "gate-wait",
    "gate-acquired",
    "begin",
    "commit",
    "rollback",
    "gate-released",
    "pool-wait",
    "pool-acquired",
    "pool-released",
)

Hook = Callable[[str], None]

#: Events after which the call's outcome is settled (see Store._emit).
_SETTLED = frozenset({"commit", "rollback", "gate-released", "pool-released"})


class _Unraisable:
    """What ``sys.unraisablehook`` expects to receive."""

    def __init__(self, exc: BaseException, message: str) -> None:
        self.exc_type: type[BaseException] = type(exc)
        self.exc_value: BaseException | None = exc
        self.exc_traceback: TracebackType | None = exc.__traceback__
        self.err_msg: str | None = message
        self.object: object = None


def _report_unraisable(exc: BaseException, message: str) -> None:
    """Report an error that has no caller to go to through ``sys.unraisablehook``.

    Python's own default hook accepts only the interpreter's argument type, which Python code
    cannot build: with it in place, print what it would print.
    """
    if sys.unraisablehook is sys.__unraisablehook__:
        import traceback

        print(f"{message}:", file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        return
    sys.unraisablehook(_Unraisable(exc, message))


#: A collection first opened in a transaction (see _TxState.opened).
_Opened = tuple[tuple[object, ...], "Collection[Any]", int]


class _TxState(threading.local):
    """The calling thread's open transaction in this store, if any."""

    conn: Connection | None = None
    transaction: _Transaction | None = None  # a write transaction's block
    # Its nested blocks' savepoints, outermost first, by token (see _Savepoint.token).
    savepoints: tuple[object, ...] = ()
    pid: int = 0
    # Collections first opened in this transaction, by name: the savepoints open when each
    # was opened, the collection, and the connection's schema_epoch then (see Store.collection).
    opened: dict[str, _Opened] | None = None
    abandon: threading.Event | None = None
    mailbox_uses: int = 0  # of the store's calls counted in _following, those of this thread


class Store:
    """A multiprocess-safe store in one SQLite file.

    Writers take the cross-process gate (``<path>.lock``), then this process's write connection,
    then ``BEGIN IMMEDIATE``: they never hold a pooled connection while they wait, and SQLite's
    busy handler never decides who goes next. Readers use a pool of ``pool_size`` connections and
    read a consistent WAL snapshot while writers write.

    :param path: the database file; created (with ``file_mode``) if missing. Symlinks are
        resolved (:attr:`path` is the file itself), so the lock file and the mailbox sit beside
        the file, as SQLite's ``-wal`` and ``-shm`` do, whichever name a process opened it by.
    :param pool_size: how many read connections may be open at once.
    :param timeout: seconds to wait for the gate or a pooled connection before raising.
    :param synchronous: SQLite's ``synchronous`` pragma. ``NORMAL`` (the default) in WAL mode
        never corrupts the database; a power loss may undo the last transactions. ``FULL`` also
        keeps those, at the cost of an fsync per commit.
    :param file_mode: permissions for a new database, its lock file and its mailbox
        (default ``0o600``).
    :param max_record_bytes: the largest JSON a collection accepts for one record.
    :param wal_limit: the WAL's bound in bytes. Checkpoints run outside the gate, which under
        writes that never pause cannot finish: past this size a gate holder finishes one
        between two transactions (copying back what the background checkpoints left, at most
        1 MiB unless the WAL grew by the limit meanwhile, and syncing the WAL and the database
        file), so the next write starts the WAL over. A WAL file that grew larger anyway (a
        reader kept reading from it) is cut back to this size when it starts over.
    :param mailbox: let a write that finds the gate held by another process leave itself in
        ``<path>.mailbox`` for the holder to commit with its own (Linux; collection upserts and
        deletes), and let this process commit the mailbox's writes with its own. Off, it does
        neither (writes wait for the gate themselves), but still keeps the mailbox's rules.
    :param gate: ``"auto"`` (a kernel ``flock`` where the platform has one, else
        ``filelock``), ``"flock"`` or ``"filelock"`` (the portable lock, without the mailbox).
    :param on_event: called with each name in :data:`EVENTS` as this process passes it. If it
        raises before the write is settled the call fails with that error and nothing is
        written; at "commit", "rollback", "gate-released" and "pool-released" the error goes to
        ``sys.unraisablehook`` instead, as the outcome can no longer change.
    :raises ValueError: a setting is out of range, or another Store of this process has the
        file open with another ``gate``.
    :raises CorruptDatabase: the file is not an SQLite database (it is left untouched).
    :raises PermissionDenied: the file, its directory or its lock file cannot be opened.
    :raises DirectoryNotFound: the file's directory does not exist.
    :raises GateTimeout: creating the schema waited too long for the gate.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        pool_size: int = 5,
        timeout: float = 5.0,
        synchronous: str = "NORMAL",
        file_mode: int = 0o600,
        max_record_bytes: int = 16 * 1024 * 1024,
        wal_limit: int = _checkpoint.WAL_LIMIT,
        on_event: Hook | None = None,
        gate: str = "auto",
        mailbox: bool = True,
    ) -> None:
        self._closed = True  # until fully open, so close()/__del__ are safe on failure
        self.path = os.path.realpath(os.fspath(path))
        self.pool_size = _positive_int(pool_size, "pool_size")
        self.timeout = _positive_float(timeout, "timeout")
        self.max_record_bytes = _positive_int(max_record_bytes, "max_record_bytes")
        self.wal_limit = _positive_int(wal_limit, "wal_limit")
        sync = synchronous.upper() if isinstance(synchronous, str) else synchronous
        if sync not in _sqlite.SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous must be one of {_sqlite.SYNCHRONOUS_MODES}, got {synchronous!r}"
            )
        self.synchronous: str = sync
        if not isinstance(file_mode, int) or not 0 <= file_mode <= 0o777:
            raise ValueError(f"file_mode must be permission bits like 0o600, got {file_mode!r}")
        self.file_mode = file_mode
        self._gate_kind = check_kind(gate)
        self.mailbox = bool(mailbox)
        self.on_event = on_event
        self.lock_path = self.path + ".lock"
        self._tx = _TxState()
        self._collections: dict[str, Collection[Any]] = {}
        self._writers_lock = threading.Lock()
        self._writing = 0  # threads between taking the gate and giving it back
        self._writer_ident: int | None = None  # the thread that is
        self._shut = False  # the write connection and the gate are given up: close() finished
        self._close_pending = False  # close() is waiting for the last writer to finish it
        self._wconn: sqlite3.Connection | None = None
        self._wpid = 0
        self._following = 0  # calls of this store using the mailbox (close() waits)
        self._new_followers_lock()
        _sqlite.create_file(self.path, file_mode)
        self._gate = gate_for(self.lock_path, file_mode, gate)
        self._pool: Pool[sqlite3.Connection] = Pool(
            lambda: self._connect(readonly=True),
            sqlite3.Connection.close,
            self.pool_size,
            self.path,
        )
        self._stats = Stats()
        self._queue = WriteQueue(self)
        self._checkpointer = Checkpointer(
            self.path, lambda: self._connect(readonly=False), limit=self.wal_limit
        )
        self._closed = False
        _open_stores.add(self)
        try:
            self.created_schema = self._ensure_schema()
        except BaseException:
            self.close()
            raise

    # -- settings, pickling, lifetime -------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "pool_size": self.pool_size,
            "timeout": self.timeout,
            "synchronous": self.synchronous,
            "file_mode": self.file_mode,
            "max_record_bytes": self.max_record_bytes,
            "wal_limit": self.wal_limit,
            "gate": self._gate_kind,
            "mailbox": self.mailbox,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # A store crosses into a spawned process as its path and settings; the child opens its
        # own connections and lock descriptor. The event hook is process-local and stays behind.
        return (_reopen, (self.__class__, self.path, self._settings()))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<mpstore.Store {self.path!r} {state}>"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the store's connections; later use raises :class:`StoreClosed`. Idempotent:
        of calls racing each other, one closes and the others return at once."""
        with self._writers_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.close(self.timeout)
        self._wait_for_followers(self.timeout)
        self._checkpointer.close()
        self._pool.close()
        with self._writers_lock:
            if self._writing:
                # A thread is still writing: the last one out finishes the close.
                self._close_pending = True
                return
            self._shut = True
        self._close_writer_and_gate()

    def _wait_for_followers(self, timeout: float) -> None:
        """Let writes left in the mailbox by this store's callers finish, as the queue does."""
        if self._gate.held_by_me:
            return  # from inside a write: they cannot run before this thread lets go
        deadline = time.monotonic() + timeout
        mine = self._tx.mailbox_uses  # a hook of this thread's own write may close the store
        with self._followers_done:
            while self._following > mine and self._followers_done.wait(deadline - time.monotonic()):
                pass

    def _close_writer_and_gate(self) -> None:
        with self._writers_lock:
            conn, self._wconn = self._wconn, None
        if conn is not None:
            conn.close()
        self._checkpointer.release()
        drop_gate(self._gate)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"the store {self.path} is closed", self.path)

    def _emit(self, event: str) -> None:
        self._stats.event(event)
        hook = self.on_event
        if hook is None:
            return
        if event not in _SETTLED:
            hook(event)  # an error here aborts the call before anything is committed
            return
        try:
            hook(event)
        except BaseException as exc:
            # The write's outcome is already decided: a failing hook must not turn a committed
            # write into a reported failure. It is reported the way Python reports errors that
            # have no caller to go to.
            _report_unraisable(exc, f"mpstore on_event hook failed at {event!r} on {self.path}")

    def stats(self) -> dict[str, Any]:
        """What this process has seen of the store: counters and recent latencies.

        Counters: ``commits``, ``rollbacks``, ``writes_batched`` (writes this process ran in a
        shared transaction), ``writes_carried`` (writes other processes left in the mailbox
        that this process ran for them), ``writes_carried_away`` (this process's writes
        another process committed), ``gate_timeouts``, ``pool_timeouts``, ``reads_ahead``
        (updates that read and parsed their record while another process held the gate),
        ``reads_ahead_used`` (those whose record had not changed by their turn, so it was not
        parsed again under the gate), ``checkpoints`` (background WAL checkpoints run),
        ``checkpoints_completed`` (those a gate holder of this process completed to keep the
        WAL within ``wal_limit``) and ``checkpoint_errors``. Timings, each
        ``{"count", "p50", "p90", "p99", "max"}`` in milliseconds over the most recent samples:
        ``gate_wait``, ``gate_hold``, ``transaction`` (BEGIN to end of COMMIT) and ``pool_wait``;
        ``batch_size`` gives the same percentiles of writes per group commit (a transaction
        that more than one write shared).
        """
        result = self._stats.snapshot()
        checkpointer = self._checkpointer
        result["checkpoints"] = checkpointer.runs
        result["checkpoints_completed"] = checkpointer.completed
        result["checkpoint_errors"] = checkpointer.errors + checkpointer.completion_errors
        return result

    # -- connections ------------------------------------------------------------------------

    def _connect(self, readonly: bool, wal_limit: int | None = None) -> sqlite3.Connection:
        return _sqlite.connect(
            self.path,
            busy_timeout=self.timeout,
            synchronous=self.synchronous,
            readonly=readonly,
            wal_limit=wal_limit,
        )

    def _writer(self) -> sqlite3.Connection:
        """This process's write connection; only the gate holder ever uses it."""
        pid = _fork.pid()
        if self._wconn is None or self._wpid != pid:
            if self._wconn is not None:
                # Inherited across a fork that ran no fork hook (see _after_fork_in_child).
                self._wconn.close()
                self._wconn = None
            if self.path in _written_at_fork:
                raise TransactionError(
                    f"this process was forked while another thread of its parent was writing "
                    f"to {self.path}, through a connection it must keep open: SQLite then shares "
                    "that connection's record of the file's locks with every new one, so none "
                    "can write safely (its locks, or its commits, would not be its own). Fork "
                    "while no thread writes, or start processes with 'spawn' or 'forkserver'",
                    self.path,
                )
            self._wconn = self._connect(readonly=False, wal_limit=self.wal_limit)
            # Checkpoints run after the gate is released (see _checkpoint), not inside commits.
            self._wconn.execute("PRAGMA wal_autocheckpoint=0")
            self._wpid = pid
        return self._wconn

    def _current(self) -> Connection | None:
        tx = self._tx
        if tx.conn is not None and tx.pid != _fork.pid():
            # Forked inside a block: the child has no transaction.
            tx.conn, tx.transaction, tx.savepoints, tx.opened = None, None, (), None
        return tx.conn

    @contextmanager
    def abandon_when(self, event: threading.Event) -> Iterator[None]:
        """In this thread, make any write or read that wins the gate or a pooled connection
        after ``event`` is set give it back untouched and raise :class:`Abandoned`.

        The asyncio layer uses it so that a cancelled task's queued call never starts.
        """
        tx = self._tx
        previous, tx.abandon = tx.abandon, event
        try:
            yield
        finally:
            tx.abandon = previous

    def _check_abandoned(self) -> None:
        event = self._tx.abandon
        if event is not None and event.is_set():
            raise Abandoned(f"the caller abandoned this call on {self.path}", self.path)

    # -- transactions -----------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: gate, then ``BEGIN IMMEDIATE``; commit on exit, roll back on error.

        Nested in the same thread it becomes a SAVEPOINT: an error inside rolls back only the
        inner block. Only one thread of all processes is inside a write block at a time.

        :raises GateTimeout: the gate was not granted within ``timeout``.
        :raises TransactionError: nested inside a ``read()`` block, or misuse of the connection.
        :raises StoreClosed: the store is closed.
        """
        current = self._current()
        if current is not None:
            if not current.writable:
                raise TransactionError(
                    "write() inside a read() block; open the write first", self.path
                )
            savepoint = self._savepoint(current)
            try:
                with savepoint as conn:
                    yield conn
            except BaseException as exc:
                savepoint.settle(exc)
                raise
            return
        self._check_open()
        with self._write_turn() as raw, self._transaction(raw) as conn:
            yield conn

    def _run_write(
        self, fn: Callable[[Connection], T], meanwhile: Callable[[], object] | None = None
    ) -> T:
        """Run ``fn`` in a write transaction: in this thread if the gate is free, or is given up
        by another process while this thread yields its CPU (see :meth:`Gate.acquire_soon`);
        else group-committed by the writer thread. ``meanwhile`` runs once the gate proved
        taken by another process, before the wait: work that shortens ``fn`` if done ahead.

        Inside a ``write()`` block of this thread it runs in that transaction, in a savepoint.

        :raises GateTimeout: the write had not started within ``timeout``.
        """
        if self._current() is not None:
            with self.write() as conn:
                return fn(conn)
        self._check_open()
        self._emit("gate-wait")
        if self._gate.try_acquire():
            return self._lead(fn)
        start = time.monotonic()
        if meanwhile is not None and self._gate.held_elsewhere():
            # Another process holds the gate, and runs on an interpreter of its own; a thread
            # of this one holding it would compete with ``meanwhile`` for this one's.
            meanwhile()
        if not self._gate.busy_here:
            # Counted as a mailbox use: close() waits for it, so the mailbox it watches and
            # the gate stay open.
            tx = self._start_mailbox_use()
            try:
                if self._gate.acquire_soon(self.timeout):
                    return self._lead(fn)
            finally:
                self._end_mailbox_use(tx)
        left = max(0.0, start + self.timeout - time.monotonic())
        return self._queue.submit(fn, left, start=start)

    def _lead(self, fn: Callable[[Connection], T], op: tuple[Any, ...] | None = None) -> T:
        """Run ``fn`` (the collection write ``op``, if it is one) under the gate this thread has
        just taken, with the writes waiting for it (see :meth:`WriteQueue.lead`)."""
        held = self._holding_gate()
        try:
            with held as raw:
                return self._queue.lead(raw, fn, op)
        except BaseException as exc:
            held.settle(exc)
            raise

    def _run_op(self, op: tuple[Any, ...]) -> int:
        """Run a collection write given as data (see :func:`_sqlite.run_op`); rows changed.

        Like :meth:`_run_write`, but when another process holds the gate the write goes into
        the mailbox, for that holder to commit with its own.

        :raises GateTimeout: the write had not started within ``timeout``.
        """
        fn = _sqlite.op_runner(op)
        if self._current() is not None or self._tx.abandon is not None:
            # Inside a write() block; or an asyncio call, whose cancellation must be able to
            # stop it before it starts, which another process could not see.
            return self._run_write(fn)
        self._check_open()
        self._emit("gate-wait")
        if self._gate.held_by_another_thread():
            # Its writer thread carries this one in its next batch: no try of the gate, no
            # mailbox (for threads of one process, the queue is the mailbox).
            return self._queue.submit(fn, self.timeout, op)
        tx = self._start_mailbox_use()
        try:
            mailbox = self._carrier()
            # Another process's write holding the gate is the common case under contention; the
            # mailbox says so without the failed lock attempt (a system call and an exception).
            if (mailbox is None or mailbox.gate_free()) and self._gate.try_acquire():
                return self._lead(fn, op)
            if mailbox is not None and not self._gate.busy_here:
                payload = _mailbox.encode_op(op)
                if len(payload) <= _mailbox.CAPACITY:
                    slot = mailbox.claim()
                    if slot is not None:
                        try:
                            return self._follow(mailbox, slot, payload, op)
                        finally:
                            mailbox.give_back(slot)
        finally:
            self._end_mailbox_use(tx)
        return self._queue.submit(fn, self.timeout, op)

    def _new_followers_lock(self) -> None:
        self._followers_lock = threading.Lock()
        self._followers_done = threading.Condition(self._followers_lock)

    def _start_mailbox_use(self) -> _TxState:
        """Count the call among those close() lets finish before it closes the mailbox; pair
        with :meth:`_end_mailbox_use`.

        :raises StoreClosed: close() began before the call was counted.
        """
        tx = self._tx
        with self._followers_lock:  # the condition's lock: entered without a Python frame
            self._following += 1
        tx.mailbox_uses += 1
        try:
            self._check_open()
        except BaseException:
            self._end_mailbox_use(tx)
            raise
        return tx

    def _end_mailbox_use(self, tx: _TxState) -> None:
        tx.mailbox_uses -= 1
        with self._followers_lock:
            self._following -= 1
            if self._closed:  # set before close() waits here, under this lock
                self._followers_done.notify_all()

    @staticmethod
    def _worth_trying(mailbox: _mailbox.Mailbox, slept: bool) -> bool:
        """Whether a write waiting in the mailbox should try the gate: when the gate looks
        free, and after every sleep whatever it looks like (a holder that died leaves it
        looking taken). Trying costs a system call and, when it fails, an exception."""
        return slept or mailbox.gate_free()

    def _carrier(self) -> _mailbox.Mailbox | None:
        """The mailbox, if this store uses it to carry writes between processes."""
        return self._gate.mailbox() if self.mailbox else None

    def _follow(
        self,
        mailbox: _mailbox.Mailbox,
        slot: _mailbox.Slot,
        payload: bytes,
        op: tuple[Any, ...],
    ) -> int:
        """Leave the write ``op`` in the mailbox and wait for its outcome, or for the gate.

        :raises GateTimeout: no holder took the write within ``timeout`` (it never will).
        :raises TransactionError: a holder took it and had not finished it at the deadline, and
            the gate could not be tried: the outcome is not known.
        """
        start = time.monotonic()
        deadline = start + self.timeout
        index = slot.index
        settled = False
        slept = False
        spins = 0
        # Bound once: the loop may run hundreds of times per write, each time on a CPU just
        # handed back by other processes.
        state, monotonic, worth_trying = mailbox.state, time.monotonic, self._worth_trying
        try:
            mailbox.publish(slot, payload)
            while True:
                if state(index) == _mailbox.DONE:
                    settled = True
                    ok, value = mailbox.collect(slot)
                    if ok:
                        self._stats.count("writes_carried_away")
                        return int(value)
                    raise value
                now = monotonic()
                # At the deadline the gate is tried whatever the hint says: a write with a short
                # timeout may never sleep, and a dead holder's pid would keep it from ever trying.
                if worth_trying(mailbox, slept or now >= deadline):
                    slept = False
                    try:
                        won = self._gate.try_acquire()
                    except Exception as exc:
                        if mailbox.withdraw(slot):
                            settled = True
                            raise
                        # A holder has taken the write: its outcome is the call's, if it comes
                        # before the deadline; the gate cannot be taken to settle it otherwise.
                        if now >= deadline and state(index) != _mailbox.DONE:
                            settled = True
                            mailbox.disown(slot)
                            raise TransactionError(
                                "a holder took this write and had not finished it when the "
                                f"timeout ran out, and the gate could not be tried ({exc}): "
                                "whether it is committed is not known (a holder still alive "
                                "may yet commit it; one that died before COMMIT left nothing "
                                "of it, and it will not run later)",
                                self.path,
                            ) from exc
                        won = False
                    if won:
                        held = self._holding_gate()
                        try:
                            # _holding_gate first settles what a dead holder left, this too.
                            with held as raw:
                                if mailbox.withdraw(slot):
                                    settled = True
                                    return self._queue.lead(raw, _sqlite.op_runner(op), op)
                        except Exception as exc:
                            held.settle(exc)
                            if settled or mailbox.state(index) != _mailbox.DONE:
                                raise
                            # Another holder committed this write just before: that outcome
                            # is this call's, whatever went wrong with taking the gate after.
                        except BaseException as exc:
                            held.settle(exc)
                            raise
                        continue
                    spins += TRY_COST
                if now >= deadline and mailbox.withdraw(slot):
                    settled = True
                    raise self._gate_timeout(start)
                if spins < YIELDS:
                    spins += mailbox.spin(slot, YIELDS - spins, deadline, monotonic)
                    continue
                # A holder wakes this slot when it finishes the write, or when it releases the
                # gate with the write still waiting; the timeout only looks for a dead holder.
                spins, slept = 0, True
                left = deadline - now
                woken = mailbox.sleep(
                    slot, min(_mailbox.LIVENESS, left) if left > 0 else _mailbox.LIVENESS
                )
                if not woken and not mailbox.is_live() and mailbox.withdraw(slot):
                    # The file was deleted or replaced: holders that opened it since never see
                    # this write. Wait for the gate itself; the holder that takes it next in
                    # this process moves the process to the file there now.
                    settled = True
                    left = max(0.0, deadline - time.monotonic())
                    return self._queue.submit(_sqlite.op_runner(op), left, op)
        finally:
            if not settled:
                mailbox.withdraw(slot)

    @contextmanager
    def _write_turn(self, timeout: float | bool | None = True) -> Iterator[sqlite3.Connection]:
        """Wait for this caller's turn to write: the gate, then the process's write connection.

        ``timeout`` True means the store's timeout; None waits as long as it takes.
        """
        if timeout is not None:
            self._emit("gate-wait")
        try:
            self._gate.acquire(self.timeout if timeout is True else timeout)
        except GateTimeout:
            self._stats.count("gate_timeouts")
            raise
        held = self._holding_gate()
        try:
            with held as raw:
                yield raw
        except BaseException as exc:
            held.settle(exc)
            raise

    def _holding_gate(self) -> _HoldingGate:
        """The write connection, for a caller that has just taken the gate; releases it after.

        It also keeps the mailbox's rules for every holder: settle what a dead holder left
        before writing, and on release wake a write that waits in the mailbox.
        """
        return _HoldingGate(self)

    def _enter_gate(self, held: _HoldingGate) -> sqlite3.Connection:
        """:meth:`_holding_gate`'s start; on failure it gives the gate back itself."""
        try:
            self._emit("gate-acquired")
            self._check_abandoned()
            with self._writers_lock:
                # Not _check_open(): writes queued before close() still run (close drains the
                # queue); only once the write connection is gone is it too late.
                if self._shut:
                    raise StoreClosed(f"the store {self.path} is closed", self.path)
                # Counted before the connection opens: a fork meanwhile must not have the
                # child close a connection this thread is inside.
                self._writing += 1
                self._writer_ident = threading.get_ident()
                held.entered = True
                raw = self._writer()
            mailbox = held.mailbox = self._gate.mailbox()
            while mailbox is not None:
                if mailbox.orphaned():
                    # The last holder died with other processes' writes taken: before anything
                    # else is committed, settle them by what the database says it committed.
                    mailbox.recover(_sqlite.last_batch(raw))
                # A mailbox file deleted or replaced since this process opened it is settled
                # as above, then left for the one the path names now, which processes that
                # open the database from now on use.
                current = self._gate.current_mailbox()
                if current is mailbox:
                    break
                mailbox = held.mailbox = current
            if mailbox is not None and mailbox is not self._gate.recorded_in:
                # The gate recorded its holder in the mailbox it had open, if any; this one
                # is another (opened just now, or the file now at the path).
                mailbox.gate_taken()
            held.open = True
        except BaseException as exc:
            self._leave_gate(held, exc)
            raise
        return raw

    def _leave_gate(self, held: _HoldingGate, error: BaseException | None) -> None:
        """:meth:`_holding_gate`'s end: give the gate back, wake the mailbox, count out. After
        a hold that ``error`` did not end, keep the WAL bounded first (see
        :meth:`Checkpointer.complete`)."""
        mailbox = held.mailbox
        try:
            held.open = False
            try:
                # A Ctrl-C that landed as a transaction's block was left, before its end ran
                # (or just after its BEGIN): its block raised, and no transaction may outlive
                # the gate.
                skipped = self._tx.transaction
                if skipped is not None:
                    self._end_transaction(skipped, _SKIPPED)
                raw = self._wconn
                if raw is not None and raw.in_transaction and held.entered:
                    raw.execute("ROLLBACK")
                    self._emit("rollback")
                elif raw is not None and held.entered and error is None:
                    self._after_outcome(
                        partial(self._checkpointer.complete, raw), "completing a checkpoint"
                    )
            finally:
                try:
                    if mailbox is not None and mailbox is not self._gate.recorded_in:
                        mailbox.gate_released()  # the gate clears the hint it wrote itself
                finally:
                    self._gate.release()
            if mailbox is not None:
                # The outcome is decided (committed or not): a failed wake-up must not
                # change it. Waiting writes also look for themselves every LIVENESS.
                self._after_outcome(mailbox.wake_next, "waking a write in the mailbox")
            self._emit("gate-released")
        finally:
            if held.entered:
                self._leave_writer()

    def _leave_writer(self) -> None:
        """The bookkeeping of a writer leaving the gate; the last one out after close() closes."""
        with self._writers_lock:
            self._writing -= 1
            self._writer_ident = None
            last_out = self._close_pending and not self._writing
            if last_out:
                self._shut, self._close_pending = True, False
        if last_out:
            # close() came while this thread was writing and left the rest to it.
            self._close_writer_and_gate()
        else:
            self._after_outcome(self._look_at_the_wal, "checking the WAL for a checkpoint")

    def _look_at_the_wal(self) -> None:
        self._checkpointer.poke(_checkpoint.LOOK_EVERY)

    def _after_outcome(self, step: Callable[[], object], what: str) -> None:
        """Run a step whose failure cannot change a write's decided outcome; report it the way
        Python reports errors that have no caller to go to."""
        try:
            step()
        except Exception as exc:
            _report_unraisable(exc, f"mpstore: {what} failed on {self.path}")

    def _gate_timeout(self, start: float) -> GateTimeout:
        self._stats.count("gate_timeouts")
        return self._gate.blocked_error(start)

    #: How a write transaction starts: under the gate no other writer can be active, so taking
    #: SQLite's write lock up front never waits and never fails on a read-to-write upgrade.
    _begin = "BEGIN IMMEDIATE"

    def _transaction(self, raw: sqlite3.Connection) -> _Transaction:
        """A write transaction on ``raw`` (the gate is held): committed when the block ends
        normally, rolled back when it raises."""
        return _Transaction(self, raw)

    def _begin_transaction(self, scope: _Transaction) -> Connection:
        """:meth:`_transaction`'s start; on failure it ends the transaction itself."""
        raw = scope.raw
        try:
            raw.execute(self._begin)
        except sqlite3.Error as exc:
            mapped = _sqlite.translate(exc, self.path)
            if mapped is exc:
                del mapped  # the traceback keeps this frame: no cycle
                raise
            raise mapped from exc
        conn = scope.conn = Connection(raw, self.path, writable=True)
        tx = self._tx
        tx.conn, tx.transaction, tx.savepoints, tx.pid = conn, scope, (), _fork.pid()
        tx.opened = None
        scope.open = True
        try:
            self._emit("begin")
        except BaseException as exc:
            self._end_transaction(scope, exc)
            raise
        return conn

    def _end_transaction(self, scope: _Transaction, error: BaseException | None) -> None:
        """:meth:`_transaction`'s end: COMMIT after a block that ended normally, else ROLLBACK.

        :raises TransactionError: the block's transaction had already ended.
        """
        raw, conn = scope.raw, scope.conn
        try:
            scope.open = False
            if error is None:
                try:
                    if self._tx.savepoints:
                        raise TransactionError(_SKIPPED_INSIDE, self.path)
                    if not raw.in_transaction:
                        raise TransactionError(
                            "the transaction ended inside its write() block", self.path
                        )
                    try:
                        raw.execute("COMMIT")
                    except sqlite3.Error as exc:
                        mapped = _sqlite.translate(exc, self.path)
                        if mapped is exc:
                            del (
                                mapped
                            )  # else this frame, kept by the traceback, would keep the error
                            raise
                        raise mapped from exc
                except BaseException:
                    self._roll_back(raw, conn)
                    raise
                self._emit("commit")
            else:
                self._roll_back(raw, conn)
        finally:
            conn._end()
            tx = self._tx
            tx.conn, tx.transaction, tx.savepoints, tx.opened = None, None, (), None

    def _roll_back(self, raw: sqlite3.Connection, conn: Connection) -> None:
        # What was rolled back (here, or by SQLite itself) may have been DDL.
        _sqlite.schema_changed(conn)
        if raw.in_transaction:
            raw.execute("ROLLBACK")
            self._emit("rollback")

    def _savepoint(self, conn: Connection) -> _Savepoint:
        """A savepoint in ``conn``'s transaction: released when the block ends normally,
        rolled back to (and released) when it raises."""
        return _Savepoint(self, conn)

    def _open_savepoint(self, scope: _Savepoint) -> None:
        tx = self._tx
        scope.name = f"mpstore_sp{len(tx.savepoints) + 1}"
        scope.conn._control(f"SAVEPOINT {scope.name}")
        tx.savepoints += (scope.token,)
        scope.open = True

    def _close_savepoint(self, scope: _Savepoint, error: BaseException | None) -> None:
        conn, name, tx = scope.conn, scope.name, self._tx
        try:
            scope.open = False
            # Savepoints above this one are still open only if their blocks were left before
            # their ends ran (see _Scope): what they hold is not this block's to keep.
            skipped = not tx.savepoints or tx.savepoints[-1] is not scope.token
            if error is None and not skipped:
                conn._control(f"RELEASE {name}")
                if tx.opened:
                    _released(tx.opened, tx.savepoints)
            elif conn.in_transaction:
                conn._control(f"ROLLBACK TO {name}")
                conn._control(f"RELEASE {name}")
                _sqlite.schema_changed(conn)  # what was rolled back may have been DDL
            if error is None and skipped:
                raise TransactionError(_SKIPPED_INSIDE, self.path)
        finally:
            stack = tx.savepoints
            if scope.token in stack:
                tx.savepoints = stack[: stack.index(scope.token)]

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction on a pooled connection: one consistent snapshot for the block.

        Inside a ``write()`` block of the same thread it reads through that transaction (and sees
        its uncommitted changes); nested in a ``read()`` it joins the outer snapshot.

        :raises PoolTimeout: no read connection became free within ``timeout``.
        :raises StoreClosed: the store is closed.
        """
        current = self._current()
        if current is not None:
            yield current
            return
        with self._pooled() as raw:
            with translating(self.path):
                raw.execute("BEGIN")
            conn = Connection(raw, self.path, writable=False)
            tx = self._tx
            tx.conn, tx.pid = conn, _fork.pid()
            try:
                yield conn
            finally:
                conn._end()
                tx.conn = None
                if raw.in_transaction:
                    raw.execute("ROLLBACK")

    @contextmanager
    def _pooled(self) -> Iterator[sqlite3.Connection]:
        self._check_open()
        self._emit("pool-wait")
        try:
            raw = self._pool.acquire(self.timeout)
        except PoolTimeout:
            self._stats.count("pool_timeouts")
            raise
        broken = False
        try:
            self._emit("pool-acquired")
            self._check_abandoned()
            yield raw
        except sqlite3.Error:
            broken = True
            raise
        except MpstoreError as exc:
            broken = not isinstance(exc, (TransactionError, Timeout, Abandoned))
            raise
        finally:
            self._pool.release(raw, discard=broken)
            self._emit("pool-released")

    def _read_now(self, sql: str, parameters: Sequence[Any]) -> Any:
        """The first column of the first row of a read, through a read connection free right
        now; None when none is, or the row is missing, or the read failed. For reads that only
        save work later: whoever needs the value reads it again, and meets any error then.
        """
        try:
            raw = self._pool.acquire(0.0)
        except (MpstoreError, sqlite3.Error):
            return None  # none free (PoolTimeout), closed, or a new connection failed to open
        broken = False
        try:
            row = raw.execute(sql, parameters).fetchone()
        except sqlite3.Error:
            broken = True
            return None
        finally:
            self._pool.release(raw, discard=broken)
        return None if row is None else row[0]

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """Run one read statement and return all its rows (through the open transaction, if any).

        :raises PoolTimeout: no read connection became free within ``timeout``.
        :raises TransactionError: outside a ``write()`` block, the statement tried to write,
            would end or open a transaction, or would switch its connection out of read-only.
        """
        current = self._current()
        if current is not None:
            return current.execute(sql, parameters).fetchall()
        check_statement(sql, False, self.path)
        with self._pooled() as raw, translating_reads(self.path):
            rows = raw.execute(sql, parameters).fetchall()
            if raw.in_transaction:
                # SAVEPOINT, outside a transaction, opens one: the pooled connection would
                # keep it, and its snapshot, for whoever takes it next.
                raw.execute("ROLLBACK")
                raise TransactionError(
                    f"{sql.strip()[:40]!r} opened a transaction; query() runs one statement "
                    "on its own: use read() for a snapshot over several",
                    self.path,
                )
            return rows

    # -- schema and collections -------------------------------------------------------------

    def _ensure_schema(self) -> bool:
        """Create mpstore's tables once, under the gate; True if this call created them."""
        meta = _sqlite.META_TABLE
        version = self._schema_version()
        if version is None:
            with self._write_turn() as raw:
                with translating(self.path):
                    # Switching to WAL needs no open transaction; it is recorded in the file.
                    (mode,) = raw.execute("PRAGMA journal_mode=WAL").fetchone()
                if str(mode).lower() != "wal":
                    raise MpstoreError(
                        f"{self.path} cannot use WAL mode (SQLite kept {mode!r}); mpstore needs "
                        "a local filesystem with shared memory support",
                        self.path,
                    )
                with self._transaction(raw) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (meta,)
                    ).fetchone()
                    created = exists is None
                    if created:
                        conn.execute(
                            f"CREATE TABLE {meta} (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                        )
                        conn.executemany(
                            f"INSERT INTO {meta} (key, value) VALUES (?, ?)",
                            [
                                ("schema_version", str(_sqlite.SCHEMA_VERSION)),
                                ("created_at", repr(time.time())),
                                ("created_by_pid", str(_fork.pid())),
                            ],
                        )
                        conn.execute(
                            f"CREATE TABLE {_sqlite.COLLECTIONS_TABLE} (name TEXT PRIMARY KEY, "
                            "model TEXT NOT NULL, key_field TEXT NOT NULL, indexes TEXT NOT NULL)"
                        )
                # Connections opened before the switch report the old journal mode until they
                # next read the file; start the pool afresh instead.
                self._pool.close_idle()
                if created:
                    return True
            version = self._schema_version()
        if version is not None and version > _sqlite.SCHEMA_VERSION:
            raise MpstoreError(
                f"{self.path} has schema version {version}, newer than this mpstore "
                f"({_sqlite.SCHEMA_VERSION}); upgrade mpstore",
                self.path,
            )
        return False

    def _schema_version(self) -> int | None:
        rows = self.query(
            "SELECT name FROM sqlite_master WHERE type='table' AND name=?", (_sqlite.META_TABLE,)
        )
        if not rows:
            return None
        (value,) = self.query(f"SELECT value FROM {_sqlite.META_TABLE} WHERE key='schema_version'")[
            0
        ]
        return int(value)

    def collection(
        self,
        name: str,
        model: type[M],
        key: str,
        *,
        indexes: Sequence[Sequence[str]] = (),
        revalidate: bool = False,
    ) -> Collection[M]:
        """A typed collection of ``model`` records keyed by the string field ``key``.

        ``indexes`` lists field tuples to index, each field optionally prefixed with ``-`` for
        descending order, e.g. ``[("workspace_id", "-updated_at")]``; :meth:`Collection.find`
        filters and orders by indexed fields. With ``revalidate`` every record is validated
        again from its JSON before it is written, which also catches values that break a
        field's constraints in records built with ``model_construct()`` or changed after
        validation (a value of the wrong type is always refused); it costs one pydantic parse
        per write, so it is off by default, as pydantic validated each record when it was made.

        :raises InvalidName: bad collection, key or index names, or a name already used with a
            different definition.
        :raises InvalidKey: the key field is not a ``str`` field.
        """
        from ._collection import Collection

        self._check_open()
        existing = self._collections.get(name)
        current = self._current()
        tx = self._tx
        if existing is None and current is not None and current.writable and tx.opened:
            existing = _opened_in(tx, name)
            if existing is not None:
                existing._check_same(model, key, indexes, revalidate)
                if tx.opened[name][2] != current.schema_epoch:
                    # The block's own SQL may have changed the schema or taken its table back
                    # (to a savepoint of its own): the table is asked for again, made again if
                    # need be, and then stands or falls with the savepoints open now.
                    existing._ensure_table()
                    tx.opened[name] = (tx.savepoints, existing, current.schema_epoch)
                return existing
        if existing is not None:
            existing._check_same(model, key, indexes, revalidate)
            if existing._gone:
                existing._reopen()
            return existing
        savepoints = tx.savepoints
        coll = Collection(self, name, model, key, indexes, revalidate)
        if current is None:
            self._collections[name] = coll
        elif current.writable:
            # Its table may yet be rolled back with the transaction: kept for this transaction
            # only, while the savepoints open now stay open, so the next call after checks the
            # table again.
            if tx.opened is None:
                tx.opened = {}
            tx.opened[name] = (savepoints, coll, current.schema_epoch)
        return coll

    def collections(self) -> dict[str, int]:
        """Every collection in the file (also those opened by other processes) and its row
        count, read from one snapshot; one whose table was dropped is not there."""
        with self.read() as conn:
            names = [
                r[0]
                for r in conn.execute(
                    f"SELECT name FROM {_sqlite.COLLECTIONS_TABLE} WHERE name IN "
                    "(SELECT name FROM sqlite_master WHERE type = 'table') ORDER BY name"
                )
            ]
            return {
                n: conn.execute(f"SELECT count(*) FROM {_sqlite.quote(n)}").fetchone()[0]
                for n in names
            }

    def integrity_check(self) -> list[str]:
        """SQLite's ``PRAGMA integrity_check``: ``["ok"]`` for a healthy file."""
        return [row[0] for row in self.query("PRAGMA integrity_check")]


_open_stores: weakref.WeakSet[Store] = weakref.WeakSet()


class _Scope:
    """A block of the write path (the gate's hold, a transaction, a savepoint) as a class: mpstore
    enters all three for every write, and a generator costs several times as much to enter and
    leave. ``open`` is set at the end of the block's start and cleared first thing in its end.

    A signal handler's exception (Ctrl-C's KeyboardInterrupt) can land on the first instruction
    of ``__exit__``, which then never runs the block's end. mpstore's own ``with`` statements
    catch it on its way out and run the end then (:meth:`settle`). Whatever is still open when
    the block around it ends is settled there: the gate's hold rolls back a transaction before
    it gives the gate back, and a transaction or savepoint with a savepoint still open inside it
    rolls back and raises TransactionError rather than commit writes whose block raised.
    """

    __slots__ = ("_store", "open")

    _store: Store
    open: bool

    def _end(self, error: BaseException | None) -> None:
        raise NotImplementedError

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self._end(error)

    def settle(self, error: BaseException) -> None:
        """Run the block's end if ``error`` left it before its ``__exit__`` ran it."""
        if self.open:
            self._end(error)


#: The error a block's end is given when the block around it runs that end (see _Scope).
_SKIPPED = KeyboardInterrupt("the block was left before its end ran")
_SKIPPED_INSIDE = (
    "a write() block nested in this one is still open: its end never ran (a KeyboardInterrupt "
    "as it ended, or a block left suspended in a generator), so nothing of this block is "
    "committed"
)


class _HoldingGate(_Scope):
    """:meth:`Store._holding_gate`."""

    __slots__ = ("entered", "mailbox")

    def __init__(self, store: Store) -> None:
        self._store = store
        self.open = False
        self.entered = False  # counted among the store's writers
        self.mailbox: _mailbox.Mailbox | None = None  # the mailbox this holder keeps

    def __enter__(self) -> sqlite3.Connection:
        return self._store._enter_gate(self)

    def _end(self, error: BaseException | None) -> None:
        self._store._leave_gate(self, error)


class _Transaction(_Scope):
    """:meth:`Store._transaction`."""

    __slots__ = ("conn", "raw")

    def __init__(self, store: Store, raw: sqlite3.Connection) -> None:
        self._store = store
        self.open = False
        self.raw = raw
        self.conn: Connection

    def __enter__(self) -> Connection:
        return self._store._begin_transaction(self)

    def _end(self, error: BaseException | None) -> None:
        self._store._end_transaction(self, error)


class _Savepoint(_Scope):
    """:meth:`Store._savepoint`."""

    __slots__ = ("conn", "name", "token")

    def __init__(self, store: Store, conn: Connection) -> None:
        self._store = store
        self.open = False
        self.conn = conn
        self.name = ""
        # What the transaction's list of open savepoints holds for this one: names repeat
        # across transactions.
        self.token = object()

    def __enter__(self) -> Connection:
        self._store._open_savepoint(self)
        return self.conn

    def _end(self, error: BaseException | None) -> None:
        self._store._close_savepoint(self, error)


#: In a forked child: files another thread of the parent was writing to at the fork, through
#: a connection the child cannot close (see Store._writer); no connection here can write them.
_written_at_fork: set[str] = set()


def _after_fork_in_child() -> None:
    # Only the forking thread survives a fork; locks the others held stay held forever, so
    # every store starts the child with fresh ones, and remembers whether another thread was
    # using the write connection at that moment.
    me = threading.get_ident()
    for store in list(_open_stores):
        store._writers_lock = threading.Lock()
        store._stats.after_fork()
        busy = store._writing > 0 and store._writer_ident != me
        if store._wconn is not None and busy:
            # Another thread was using it at the fork and may have held its mutex, so closing
            # it could wait forever, here or in a grandchild: kept, never used or finalised.
            # Its record of the file's locks is then every new connection's (see _writer).
            _fork.keep_forever(store._wconn)
            store._wconn = None
            _written_at_fork.add(store.path)
        store._writing = 0
        store._writer_ident = None
        # The parent's writes waiting in the mailbox are not the child's to wait for.
        store._following = 0
        store._new_followers_lock()
        # Every inherited connection this process can close is closed before the child opens
        # one of its own (see _fork.close_before_connecting): else the parent, closing last,
        # would remove the WAL under the child's commits. Not those another thread was using
        # at the fork: it may have held their mutexes.
        store._pool.after_fork_in_child()
        store._checkpointer.after_fork_in_child()
        if store._wconn is not None:
            _fork.close_before_connecting(store._wconn)
            store._wconn = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _opened_in(tx: _TxState, name: str) -> Collection[Any] | None:
    """The collection ``name`` first opened in the thread's transaction, if every savepoint
    open then is open still: one rolled back since may have taken its table with it."""
    assert tx.opened is not None
    found = tx.opened.get(name)
    if found is None:
        return None
    savepoints, coll, _ = found
    return coll if tx.savepoints[: len(savepoints)] == savepoints else None


def _released(opened: dict[str, _Opened], stack: tuple[object, ...]) -> None:
    """The innermost savepoint of ``stack`` was released: what was opened in it now stands
    or falls with the block around it."""
    for name, (savepoints, coll, epoch) in list(opened.items()):
        if savepoints == stack:
            opened[name] = (stack[:-1], coll, epoch)


def _reopen(cls: type[Store], path: str, settings: dict[str, Any]) -> Store:
    return cls(path, **settings)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)
