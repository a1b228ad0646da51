"""asyncio access to a Store that never blocks the event loop.

Every call runs the synchronous core in a worker thread, as ``asyncio.to_thread`` does (the
caller's context variables included), so waiting for the gate, for a pooled connection or for
SQLite happens off the loop. There is one implementation of the logic: the sync core.

A cancelled call gives up at once. Its thread runs inside :meth:`Store.abandon_when`: if it wins
the gate or a connection after the cancellation it gives it back untouched; if its transaction
had already begun, the transaction finishes on its own, fully committed or fully rolled back.

A ``write()`` or ``read()`` block spans many awaits, but a transaction belongs to one thread.
Each outermost block therefore gets a thread of its own that enters the sync block and carries
out the block's statements, one at a time, as the task sends them. A context variable records
the open block of each task, so calls and nested blocks of that task (and of the tasks it
starts inside the block) join it, nested blocks as SAVEPOINTs, exactly as in the sync API.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from itertools import islice
from types import MappingProxyType, TracebackType
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from . import _checkpoint, _fork, _sqlite
from ._collection import Collection
from ._connection import Connection, Params
from ._errors import InvalidName, RecordTypeError, StoreClosed, TransactionError
from ._gate import Gate
from ._store import Hook, Store
from .conversations import Conversation, ConversationRepository

__all__ = [
    "AsyncCollection",
    "AsyncConnection",
    "AsyncConversationRepository",
    "AsyncStore",
    "Result",
]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

#: Records fetched per worker-thread hop by ``scan()`` and ``keys()`` (one page of the core).
_BATCH = 256


# -- handing results from threads to the loop -------------------------------------------------


class _Reply(Generic[T]):
    """A value or error that a worker thread hands to a coroutine waiting on the event loop.

    A coroutine that was cancelled has a cancelled future; the late result is dropped.
    """

    __slots__ = ("_loop", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.future: asyncio.Future[T] = loop.create_future()

    def set(self, value: T) -> None:
        self._post(self._set, value)

    def fail(self, exc: BaseException) -> None:
        self._post(self._fail, _for_a_future(exc))

    def _post(self, fn: Callable[[Any], None], arg: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            if not self._loop.is_closed():
                raise
            # The loop has been closed: no coroutine is left to receive this result.

    def _set(self, value: T) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def _fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def _for_a_future(exc: BaseException) -> BaseException:
    """``exc``, or a RuntimeError from it if it is a StopIteration, which an asyncio future
    refuses to carry (it would leave the awaiting task pending for ever): PEP 479's rule for
    generators, applied to calls."""
    if isinstance(exc, StopIteration):
        error = RuntimeError(f"the call raised StopIteration: {exc!r}")
        error.__cause__ = exc
        return error
    return exc


class _Call(Generic[T]):
    """One call sent to a block's thread, run in the context of the task that sent it."""

    __slots__ = ("cancelled", "context", "fn", "reply")

    def __init__(self, fn: Callable[[], T], reply: _Reply[T]) -> None:
        self.fn = fn
        self.context = contextvars.copy_context()
        self.reply = reply
        self.cancelled = False

    def run(self) -> None:
        if self.cancelled:
            return
        try:
            value = self.context.run(self.fn)
        except BaseException as exc:  # handed to the awaiting task, which raises it
            self.reply.fail(exc)
        else:
            self.reply.set(value)


class _Exit:
    """The end of a block: commit (or release the savepoint), or roll back."""

    __slots__ = ("commit",)

    def __init__(self, commit: bool) -> None:
        self.commit = commit


class _RolledBack(Exception):
    """Raised inside a block's thread to make the sync block roll back."""


class _Level:
    """One ``write()`` or ``read()`` block, or a block nested in one, held open by a thread.

    Calls for the block wait in its inbox; the block's thread serves the innermost open level,
    so a nested block's calls run first and its enclosing block's calls wait, as in the sync API.
    """

    def __init__(
        self,
        store: AsyncStore,
        kind: str,
        parent: _Level | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.store = store
        self.kind = kind
        self.parent = parent
        self.root: _Level = self if parent is None else parent.root
        self.loop = loop
        self.inbox: queue.SimpleQueue[_Call[Any] | _Level | _Exit] = queue.SimpleQueue()
        self.entered: _Reply[Connection] = _Reply(loop)
        self.done: _Reply[None] = _Reply(loop)
        self.began = False  # written by the block's thread once the sync block is open
        self.thread: int | None = None  # the block's thread (set for the outermost level)
        self.task: asyncio.Task[Any] | None = None  # the task that opened the outermost level
        self.closed = False  # written on the loop once the block's exit has been sent
        self.poisoned = False  # a call was cancelled: the block can only roll back
        self.pid = _fork.pid()  # a forked child inherits the task's context, not the thread

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in this block's thread, inside its transaction.

        :raises TransactionError: the block has ended.
        """
        if self.closed:
            raise TransactionError("this block has ended", self.store.path)
        op: _Call[T] = _Call(fn, _Reply(self.loop))
        self.inbox.put(op)
        try:
            return await op.reply.future
        except asyncio.CancelledError:
            # The call may be running: the block must not commit a part of it.
            op.cancelled = True
            level: _Level | None = self
            while level is not None:
                level.poisoned = True
                # A read() nested in a write() has no savepoint: the write must roll back.
                level = level.parent if level.kind == "read" else None
            raise

    def leave(self, commit: bool) -> None:
        """Send the block its exit (from the loop); later calls get a TransactionError."""
        self.closed = True
        self.inbox.put(_Exit(commit))


def _run_block(
    sync: Store, top: _Level, abandon: threading.Event, holders: list[tuple[Gate, _Level]]
) -> None:
    """The body of an outermost block's thread; ``holders`` as for :func:`_acting_for`."""
    top.thread = threading.get_ident()
    with sync.abandon_when(abandon), _acting_for(holders):
        _hold(sync, top)


def _acting_for(holders: list[tuple[Gate, _Level]]) -> AbstractContextManager[object]:
    """Let this thread act for the task's open write blocks of other stores (see
    :meth:`AsyncStore._write_holders`); nothing to do for almost every call."""
    if not holders:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for gate, block in holders:
        stack.enter_context(gate.acting_for(block))
    return stack


def _hold(sync: Store, level: _Level) -> None:
    """Enter ``level``'s sync block, serve its inbox until its exit, report how it ended."""
    block = sync.write if level.kind == "write" else sync.read
    try:
        with block() as conn:
            level.began = True
            level.entered.set(conn)
            _serve(sync, level)
    except _RolledBack:
        level.done.set(None)
    except BaseException as exc:  # handed to the awaiting task, which raises it
        (level.done if level.began else level.entered).fail(exc)
    else:
        level.done.set(None)


def _serve(sync: Store, level: _Level) -> None:
    """Run ``level``'s calls and nested blocks in order until its exit arrives.

    :raises _RolledBack: the exit asks for a rollback.
    """
    while True:
        op = level.inbox.get()
        if isinstance(op, _Exit):
            if op.commit:
                return
            raise _RolledBack
        if isinstance(op, _Level):
            _hold(sync, op)
        else:
            op.run()


class _OpenAbandoned(StoreClosed):
    """An open that every caller gave up on, closed again: a caller that came meanwhile
    opens the store anew."""


def _outcome_seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _open_level(level: _Level | None) -> _Level | None:
    """``level``, or the innermost of its enclosing levels that is still open."""
    while level is not None and level.closed:
        level = level.parent
    return level


#: The innermost block each task has open, per AsyncStore.
_BLOCKS: contextvars.ContextVar[Mapping[AsyncStore, _Level]] = contextvars.ContextVar(
    "mpstore_async_blocks", default=MappingProxyType({})
)


# -- connections and blocks -------------------------------------------------------------------


class Result:
    """The outcome of one statement in an async block, its rows already fetched.

    It reads like a ``sqlite3.Cursor``: ``fetchone``, ``fetchmany``, ``fetchall``, iteration,
    ``rowcount``, ``lastrowid`` and ``description``.
    """

    __slots__ = ("_next", "_rows", "description", "lastrowid", "rowcount")

    def __init__(
        self,
        rows: list[Any],
        rowcount: int,
        lastrowid: int | None,
        description: tuple[tuple[Any, ...], ...] | None,
    ) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount
        self.lastrowid = lastrowid
        self.description = description

    @classmethod
    def _of(cls, cursor: Any) -> Result:
        rows = cursor.fetchall()
        return cls(rows, cursor.rowcount, cursor.lastrowid, cursor.description)

    def fetchone(self) -> Any:
        """The next row, or None when all have been read."""
        if self._next >= len(self._rows):
            return None
        row = self._rows[self._next]
        self._next += 1
        return row

    def fetchmany(self, size: int = 1) -> list[Any]:
        """Up to ``size`` more rows."""
        rows = self._rows[self._next : self._next + size]
        self._next += len(rows)
        return rows

    def fetchall(self) -> list[Any]:
        """All rows not read yet."""
        rows = self._rows[self._next :]
        self._next = len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        while (row := self.fetchone()) is not None:
            yield row


class AsyncConnection:
    """The connection of an ``async with store.write()`` or ``store.read()`` block.

    Its statements run, one at a time, in the block's thread, inside the block's transaction
    (or in the innermost nested block the calling task has open). It is valid only inside its
    block.
    """

    __slots__ = ("_conn", "_level")

    def __init__(self, level: _Level, conn: Connection) -> None:
        self._level = level
        self._conn = conn

    @property
    def writable(self) -> bool:
        """True for a ``write()`` block's connection, False for a ``read()`` block's."""
        return self._conn.writable

    def _target(self) -> _Level:
        current = self._level.store._current_level()
        if current is not None and current.root is self._level.root:
            return current
        return self._level

    async def execute(self, sql: str, parameters: Params = ()) -> Result:
        """Run one statement with bound parameters and fetch all its rows.

        :raises TransactionError: the block has ended, a write in a read block, or a statement
            that would end the transaction.
        :raises MpstoreError: typed SQLite failures (corruption, full disk, ...).
        """
        conn = self._conn
        return await self._target().call(lambda: Result._of(conn.execute(sql, parameters)))

    async def executemany(self, sql: str, seq_of_parameters: Iterable[Params]) -> Result:
        """Run one statement once per parameter set.

        :raises TransactionError: as for :meth:`execute`.
        """
        conn = self._conn
        params = list(seq_of_parameters)
        return await self._target().call(lambda: Result._of(conn.executemany(sql, params)))


class _Block:
    """``async with store.write()`` / ``async with store.read()``."""

    def __init__(self, store: AsyncStore, kind: str) -> None:
        self._store = store
        self._kind = kind
        self._level: _Level | None = None
        self._token: contextvars.Token[Mapping[AsyncStore, _Level]] | None = None

    async def __aenter__(self) -> AsyncConnection:
        store = self._store
        loop = asyncio.get_running_loop()
        parent = store._current_level()
        abandon: threading.Event | None = None
        if parent is None:
            sync = store._require_open()
            level = _Level(store, self._kind, None, loop)
            level.task = asyncio.current_task()
            abandon = threading.Event()
            thread = threading.Thread(
                target=contextvars.copy_context().run,
                args=(_run_block, sync, level, abandon, store._write_holders()),
                name=f"mpstore-async-{self._kind}",
                daemon=True,
            )
            store._start_block_thread(thread)
        else:
            level = _Level(store, self._kind, parent, loop)
            parent.inbox.put(level)
        try:
            conn = await level.entered.future
        except asyncio.CancelledError:
            # The thread may still win the gate or a connection, or even have just opened the
            # block: it gives either back, untouched, and the exit queued here rolls back.
            if abandon is not None:
                abandon.set()
            level.leave(commit=False)
            raise
        except BaseException:
            level.closed = True
            raise
        self._level = level
        self._token = _BLOCKS.set(MappingProxyType({**_BLOCKS.get(), store: level}))
        return AsyncConnection(level, conn)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        level, token = self._level, self._token
        assert level is not None and token is not None, "__aexit__ without __aenter__"
        # Decided once: a call cancelled after the exit is sent no longer changes the outcome.
        poisoned = level.poisoned
        # Sent first: whatever happens next, the block's thread must be told to end.
        level.leave(commit=exc is None and not poisoned)
        with contextlib.suppress(ValueError):  # left in another context: closed levels are
            _BLOCKS.reset(token)  # skipped by _open_level anyway
        if isinstance(exc, asyncio.CancelledError):
            return  # re-raise at once; the block's thread rolls back and lets go on its own
        await level.done.future
        if exc is None and poisoned:
            raise TransactionError(
                "a call in this block was cancelled, so the block was rolled back",
                self._store.path,
            )


# -- the store ----------------------------------------------------------------------------------


class AsyncStore:
    """An asyncio front for :class:`Store`: same settings, same guarantees, awaitable calls.

    Open it with ``async with AsyncStore(path) as store:`` (or ``await store.open()``); the sync
    store is opened in a worker thread. Each call runs in one of up to ``max_threads`` worker
    threads (further calls wait their turn), reads in another ``max_threads`` of their own, so
    writes waiting for the gate never hold them up; each open ``write()``/``read()`` block has
    a thread of its own. ``on_event`` is called in the threads that carry the calls out.

    :param path: the database file, as for :class:`Store`.
    :param max_threads: how many writes, and how many reads, may run (or wait for the gate or
        the pool) at once.
    :raises ValueError: ``max_threads`` is not a positive integer; other settings are checked
        by :class:`Store` when the store is opened.
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
        max_threads: int = 32,
    ) -> None:
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ValueError(f"max_threads must be a positive integer, got {max_threads!r}")
        self.path = os.path.realpath(os.fspath(path))
        self._settings: dict[str, Any] = {
            "pool_size": pool_size,
            "timeout": timeout,
            "synchronous": synchronous,
            "file_mode": file_mode,
            "max_record_bytes": max_record_bytes,
            "wal_limit": wal_limit,
            "on_event": on_event,
            "gate": gate,
            "mailbox": mailbox,
        }
        self._max_threads = max_threads
        self._sync: Store | None = None
        self._handed_out = False  # a caller other than the openers was given the sync store
        self._closing: Future[None] | None = None
        self._reset()
        _stores.add(self)

    def _reset(self) -> None:
        """Threads and their bookkeeping, new (and again in a forked child, which has none of
        the parent's threads). Futures here are concurrent ones: any event loop may await
        them, and several may use one store."""
        self._executor = ThreadPoolExecutor(self._max_threads, thread_name_prefix="mpstore-async")
        # Reads have threads of their own: writes waiting for a gate another process holds
        # may fill the others for as long as the store's timeout.
        self._readers = ThreadPoolExecutor(
            self._max_threads, thread_name_prefix="mpstore-async-read"
        )
        self._opening: Future[Store] | None = None
        self._open_waiters = 0  # open() calls awaiting _opening
        self._open_abandoned = False  # every one of them was cancelled: close what opens
        self._block_threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._shut = False  # the shutdown has taken the sync store (under _threads_lock)

    def _after_fork_in_child(self) -> None:
        """The parent's worker threads, and the thread finishing its aclose(), are not here:
        the threads are made anew, and a close under way is finished here, at once."""
        self._reset()
        if self._closing is not None and not self._closing.done():
            self._closing = Future()
            self._shutdown(self._closing)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self._sync is not None else "not open"
        return f"<mpstore.AsyncStore {self.path!r} {state}>"

    # -- lifetime -------------------------------------------------------------------------------

    async def open(self) -> AsyncStore:
        """Open the sync store in a worker thread (once); return this store.

        :raises StoreClosed: the store was closed.
        :raises ValueError, CorruptDatabase, PermissionDenied, DirectoryNotFound, GateTimeout:
            as :class:`Store`.
        """
        while True:
            with self._threads_lock:
                if self._closing is not None or self._shut:
                    raise StoreClosed(f"the store {self.path} is closed", self.path)
                if self._sync is not None:
                    self._handed_out = True
                    return self
                opening = self._opening
                if opening is None or opening.done():
                    # The first caller opens it, once; a failed or abandoned open is tried
                    # again.
                    opening = self._opening = self._executor.submit(self._open_sync)
                self._open_waiters += 1
                self._open_abandoned = False
            waited = asyncio.wrap_future(opening)
            try:
                # Shielded: a cancelled caller must not cancel the open the others wait for.
                await asyncio.shield(waited)
            except asyncio.CancelledError:
                # Nobody awaits it any more: its outcome (StoreClosed, for an open every caller
                # gave up on) must not be logged as an exception never retrieved.
                waited.add_done_callback(_outcome_seen)
                self._leave_open(opening, cancelled=True)
                raise
            except _OpenAbandoned:
                # Every caller before this one gave it up, and it was closed as this one came:
                # nothing closed the store itself, so it is opened again.
                self._leave_open(opening, cancelled=False)
                continue
            except BaseException:
                self._leave_open(opening, cancelled=False)  # counted out; nothing was opened
                raise
            break
        self._leave_open(opening, cancelled=False, handed_out=True)
        if self._closing is not None:  # aclose() came meanwhile, and closes what opened
            raise StoreClosed(f"the store {self.path} is closed", self.path)
        return self

    def _leave_open(
        self, opening: Future[Store], cancelled: bool, handed_out: bool = False
    ) -> None:
        """One open() caller stops waiting; if it was cancelled and was the last, the store
        that opening gives is closed, as if it had never been asked for."""
        with self._threads_lock:
            self._open_waiters -= 1
            if handed_out:
                self._handed_out = True  # this caller is told the store is open
            if not cancelled or self._open_waiters:
                return
            if not opening.done():
                self._open_abandoned = True  # _open_sync closes it
                return
            if self._handed_out or self._closing is not None:
                return  # another caller was told it is open / aclose() closes it
            store = self._sync if self._opening is opening else None
            if store is None:
                return
            self._sync = None
            # Under the lock: aclose(), which shuts the executor down, cannot have begun, and
            # waits for this close once it does.
            self._executor.submit(store.close)

    def _open_sync(self) -> Store:
        """Open the sync store (in a worker thread) and keep it, unless aclose() has finished
        its shutdown meanwhile (it never saw this store), or every open() caller gave up on
        it: then it is closed here.

        :raises StoreClosed: closed because of aclose() (:class:`_OpenAbandoned`: because every
            caller gave up).
        """
        store = Store(self.path, **self._settings)
        with self._threads_lock:
            if not self._shut and not self._open_abandoned:
                self._sync = store
                return store
            abandoned = not self._shut
        store.close()
        if abandoned:
            raise _OpenAbandoned(f"the open of {self.path} was given up", self.path)
        raise StoreClosed(f"the store {self.path} is closed", self.path)

    async def __aenter__(self) -> AsyncStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closing is not None

    @property
    def sync(self) -> Store:
        """The sync :class:`Store` the calls run on.

        :raises StoreClosed: the store is not open.
        """
        return self._require_open()

    def _require_open(self) -> Store:
        if self._closing is not None:
            raise StoreClosed(f"the store {self.path} is closed", self.path)
        if self._sync is None:
            raise StoreClosed(
                f"the store {self.path} is not open; use 'async with AsyncStore(...)' "
                "or 'await store.open()'",
                self.path,
            )
        self._handed_out = True
        return self._sync

    async def aclose(self) -> None:
        """Refuse new calls, wait for the calls and blocks in flight, then close. Idempotent.

        Calls that were cancelled but still wait for the gate or the pool in their threads
        finish first (they give back what they win), so nothing is left holding a lock.

        :raises TransactionError: called inside a ``write()``/``read()`` block of this store.
        """
        if self._closing is None and self._current_level() is not None:
            raise TransactionError(
                "aclose() inside a write() or read() block of this store", self.path
            )
        await asyncio.shield(asyncio.wrap_future(self._start_shutdown()))

    def _start_shutdown(self) -> Future[None]:
        """The shutdown, started once, in a thread of its own: any loop may await it."""
        with self._threads_lock:
            closing = self._closing
            if closing is None:
                closing = self._closing = Future()
                threading.Thread(
                    target=self._shutdown, args=(closing,), name="mpstore-async-close"
                ).start()
        return closing

    def _shutdown(self, done: Future[None]) -> None:
        try:
            self._shut_down()
        except BaseException as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)

    def _shut_down(self) -> None:
        self._executor.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._threads_lock:
            threads, self._block_threads = self._block_threads, set()
            self._shut = True
            sync = self._sync
        for thread in threads:
            thread.join()
        if sync is not None:
            sync.close()

    def _start_block_thread(self, thread: threading.Thread) -> None:
        with self._threads_lock:
            self._block_threads = {t for t in self._block_threads if t.is_alive()}
            self._block_threads.add(thread)
        thread.start()

    # -- dispatch -------------------------------------------------------------------------------

    def _current_level(self) -> _Level | None:
        level = _open_level(_BLOCKS.get().get(self))
        if level is not None and level.root.pid != _fork.pid():
            return None  # opened in the parent: its thread is not in this process
        return level

    def _write_holders(self) -> list[tuple[Gate, _Level]]:
        """The gate and outermost level of each write block this very task opened through
        *other* stores and has open.

        A write through this store on the same file would wait for that block's gate, and
        the block for the task, which waits for the write: the sync core refuses it instead
        (a :class:`TransactionError`, as a write nested across two stores in one thread is).
        Blocks that tasks started inside another task's block see are left out: such a task
        may outlive the block, and its write then waits its turn.
        """
        task = asyncio.current_task()
        holders = []
        for store, innermost in _BLOCKS.get().items():
            level = _open_level(innermost)
            if store is self or level is None:
                continue
            root, sync = level.root, store._sync
            if root.kind == "write" and root.task is task and sync is not None:
                holders.append((sync._gate, root))
        return holders

    async def _run(self, fn: Callable[[], T], read: bool = False) -> T:
        """Run ``fn`` in a worker thread (in the task's open block, if any) and await it;
        ``read`` says it only reads, so it runs in a thread no write can be holding.

        If the awaiting task is cancelled, re-raise at once; the thread gives back the gate or
        connection it wins afterwards, or finishes the transaction it has begun.

        :raises StoreClosed: the store is not open.
        """
        level = self._current_level()
        if level is not None:
            return await level.call(fn)
        sync = self._require_open()
        abandon = threading.Event()
        holders = self._write_holders()

        def abandonable() -> T:
            try:
                with sync.abandon_when(abandon), _acting_for(holders):
                    return fn()
            except StopIteration as exc:
                raise _for_a_future(exc) from exc

        try:
            executor = self._readers if read else self._executor
            future: Future[T] = executor.submit(contextvars.copy_context().run, abandonable)
        except RuntimeError as exc:  # the executor shut down: aclose() is under way
            raise StoreClosed(f"the store {self.path} is closed", self.path) from exc
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            abandon.set()
            raise

    # -- blocks and queries ---------------------------------------------------------------------

    def write(self) -> _Block:
        """``async with store.write() as conn:`` a write transaction, as :meth:`Store.write`.

        Gate, then ``BEGIN IMMEDIATE``; commit on exit, roll back on error or cancellation.
        Nested in the same task it is a SAVEPOINT. Calls the task makes inside the block
        (collection calls included) run in its transaction.

        :raises GateTimeout: the gate was not granted within ``timeout``.
        :raises TransactionError: nested in a ``read()`` block; or a call in the block was
            cancelled and the exception was caught, so the block rolled back.
        :raises StoreClosed: the store is not open.
        """
        return _Block(self, "write")

    def read(self) -> _Block:
        """``async with store.read() as conn:`` one consistent snapshot, as :meth:`Store.read`.

        :raises PoolTimeout: no read connection became free within ``timeout``.
        :raises StoreClosed: the store is not open.
        """
        return _Block(self, "read")

    async def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """Run one read statement and return all its rows, as :meth:`Store.query`.

        :raises PoolTimeout: no read connection became free within ``timeout``.
        :raises StoreClosed: the store is not open.
        """
        return await self._run(lambda: self._require_sync().query(sql, parameters), read=True)

    async def collections(self) -> dict[str, int]:
        """Every collection in the file and its row count, as :meth:`Store.collections`.

        :raises PoolTimeout: no read connection became free within ``timeout``.
        """
        return await self._run(lambda: self._require_sync().collections(), read=True)

    async def integrity_check(self) -> list[str]:
        """SQLite's ``PRAGMA integrity_check``: ``["ok"]`` for a healthy file.

        :raises PoolTimeout: no read connection became free within ``timeout``.
        """
        return await self._run(lambda: self._require_sync().integrity_check(), read=True)

    def _require_sync(self) -> Store:
        sync = self._sync
        if sync is None:
            raise StoreClosed(f"the store {self.path} is not open", self.path)
        return sync

    def collection(
        self,
        name: str,
        model: type[M],
        key: str,
        *,
        indexes: Sequence[Sequence[str]] = (),
    ) -> AsyncCollection[M]:
        """An async twin of :meth:`Store.collection`; its table is opened by the first call.

        Names are checked here, before any I/O; ``await coll.open()`` opens the table early
        (and reports a conflicting definition there rather than at the first call). Open it
        so before its first use inside a block that may roll back: a table created in a
        rolled-back block is gone.

        :raises InvalidName: bad collection, key or index names.
        :raises RecordTypeError: ``model`` is not a pydantic model.
        """
        _sqlite.check_identifier(name, "collection name")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise RecordTypeError(f"model must be a pydantic BaseModel subclass, got {model!r}")
        if not isinstance(key, str) or key not in model.model_fields:
            raise InvalidName(f"key {key!r} is not a field of {model.__name__}")
        checked = Collection._check_indexes(indexes, model)

        def opener() -> Collection[M]:
            return self._require_sync().collection(name, model, key, indexes=checked)

        return AsyncCollection(self, name, opener)


#: Every AsyncStore alive in this process, so that a forked child makes its threads anew.
_stores: weakref.WeakSet[AsyncStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_stores):
        store._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- collections --------------------------------------------------------------------------------


class AsyncCollection(Generic[M]):
    """The async twin of :class:`Collection`: the same methods, awaited; each runs the sync
    method in a worker thread (or in the task's open block).
    """

    def __init__(self, store: AsyncStore, name: str, opener: Callable[[], Collection[M]]) -> None:
        self.store = store
        self.name = name
        self._opener = opener
        self._sync: Collection[M] | None = None

    def __repr__(self) -> str:
        return f"<mpstore.AsyncCollection {self.name!r} in {self.store.path!r}>"

    def _collection(self) -> Collection[M]:
        # Two threads may open it at once; the sync core makes that idempotent.
        coll = self._sync
        if coll is not None:
            return coll
        opened = self._opener()
        # Not kept if opened inside a block: its table may yet be rolled back (the sync store
        # does not keep it either).
        if opened.store._collections.get(opened.name) is opened:
            self._sync = opened
        return opened

    async def _call(self, fn: Callable[[Collection[M]], T], read: bool = False) -> T:
        return await self.store._run(lambda: fn(self._collection()), read)

    async def open(self) -> AsyncCollection[M]:
        """Open (and if need be create) the collection's table now; return this collection.

        :raises InvalidName: the name is already used with a different definition.
        :raises GateTimeout: creating the table waited too long for the gate.
        """
        await self._call(lambda coll: coll._reopen() if coll._gone else None)
        return self

    async def upsert(self, record: M) -> None:
        """Insert ``record`` or replace the record with its key, in one atomic write.

        :raises RecordTypeError, InvalidKey, RecordTooLarge, ValidationError: bad record; nothing
            is written.
        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        await self._call(lambda coll: coll.upsert(record))

    async def upsert_many(self, records: Iterable[M]) -> int:
        """Insert or replace all ``records`` in one transaction; returns how many.

        :raises RecordTypeError, InvalidKey, RecordTooLarge, ValidationError: bad record; nothing
            is written.
        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        batch = list(records)
        return await self._call(lambda coll: coll.upsert_many(batch))

    async def delete(self, key: str) -> bool:
        """Delete the record with ``key``; True if it existed.

        :raises InvalidKey: bad key.
        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        return await self._call(lambda coll: coll.delete(key))

    async def update(self, key: str, fn: Callable[[M], M]) -> M:
        """Atomically read the record with ``key``, pass it to ``fn`` and store what it returns.

        ``fn`` is a plain function; it runs in the worker thread, under the gate.

        :raises KeyNotFound: no record has ``key``.
        :raises RecordTypeError: ``fn`` returned something other than a record of the model.
        :raises InvalidKey: ``fn`` changed the record's key.
        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        return await self._call(lambda coll: coll.update(key, fn))

    async def get(self, key: str) -> M | None:
        """The record with ``key``, or None.

        :raises InvalidKey: bad key.
        :raises PoolTimeout: no read connection became free within the store's timeout.
        """
        return await self._call(lambda coll: coll.get(key), read=True)

    async def count(self) -> int:
        """How many records the collection holds.

        :raises PoolTimeout: no read connection became free within the store's timeout.
        """
        return await self._call(lambda coll: coll.count(), read=True)

    async def find(
        self,
        where: Mapping[str, Any] | None = None,
        order_by: Sequence[str] = (),
        limit: int | None = None,
    ) -> list[M]:
        """Records whose indexed fields equal ``where``, sorted by ``order_by``.

        :raises InvalidName: a field that is not indexed.
        :raises ValueError: a negative limit.
        :raises PoolTimeout: no read connection became free within the store's timeout.
        """
        return await self._call(lambda coll: coll.find(where, order_by, limit), read=True)

    async def explain(self, where: Sequence[str] = (), order_by: Sequence[str] = ()) -> list[str]:
        """SQLite's query plan for :meth:`find` with these fields.

        :raises PoolTimeout: no read connection became free within the store's timeout.
        """
        return await self._call(lambda coll: coll.explain(where, order_by), read=True)

    def keys(self) -> AsyncIterator[str]:
        """All keys in order, fetched page by page in worker threads."""
        return self._batches(lambda coll: coll.keys())

    def scan(self) -> AsyncIterator[M]:
        """All records in key order, fetched page by page in worker threads."""
        return self._batches(lambda coll: coll.scan())

    async def _batches(self, start: Callable[[Collection[M]], Iterator[T]]) -> AsyncIterator[T]:
        rows: Iterator[T] | None = None

        def batch() -> list[T]:
            nonlocal rows
            if rows is None:
                rows = start(self._collection())
            return list(islice(rows, _BATCH))

        while True:
            items = await self.store._run(batch, read=True)
            for item in items:
                yield item
            if len(items) < _BATCH:
                return


# -- the conversation repository --------------------------------------------------------------


class AsyncConversationRepository:
    """The async twin of :class:`mpstore.conversations.ConversationRepository`.

    Each method runs the sync repository's method in a worker thread (or in the task's open
    block); the repository's collection is opened by the first call.

    :param store: the store to keep the conversations in.
    :param collection: the collection's name (one store can hold several repositories).
    """

    def __init__(self, store: AsyncStore, collection: str = "conversations") -> None:
        self.store = store
        self._collection = collection
        self._sync: ConversationRepository | None = None
        self.conversations: AsyncCollection[Conversation] = AsyncCollection(
            store, collection, lambda: self._repository().conversations
        )

    def _repository(self) -> ConversationRepository:
        repo = self._sync
        if repo is None:
            repo = ConversationRepository(self.store._require_sync(), self._collection)
            coll = repo.conversations
            if coll.store._collections.get(coll.name) is coll:  # as AsyncCollection._collection
                self._sync = repo
        return repo

    async def _call(self, fn: Callable[[ConversationRepository], T], read: bool = False) -> T:
        return await self.store._run(lambda: fn(self._repository()), read)

    async def upsert_conversation(self, conversation: Conversation) -> None:
        """Insert or replace a whole conversation.

        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        await self._call(lambda repo: repo.upsert_conversation(conversation))

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        """The conversation with this id, or None.

        :raises PoolTimeout: no read connection became free within the store's timeout.
        """
        return await self._call(lambda repo: repo.get_conversation(conversation_id), read=True)

    async def get_all_conversations(
        self, workspace_id: int, limit: int | None = None
    ) -> list[Conversation]:
        """A workspace's conversations, most recently updated first (served by an index).

        :raises PoolTimeout: no read connection became free within the store's timeout.
        """
        return await self._call(
            lambda repo: repo.get_all_conversations(workspace_id, limit), read=True
        )

    async def get_last_conversation(self, workspace_id: int) -> Conversation | None:
        """The workspace's most recently updated conversation, or None.

        :raises PoolTimeout: no read connection became free within the store's timeout.
        """
        return await self._call(lambda repo: repo.get_last_conversation(workspace_id), read=True)

    async def delete_conversation(self, workspace_id: int, conversation_id: str) -> bool:
        """Delete a conversation if it belongs to ``workspace_id``; True if one was deleted.

        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        return await self._call(
            lambda repo: repo.delete_conversation(workspace_id, conversation_id)
        )

    async def modify_conversation(
        self,
        conversation_id: str,
        fn: Callable[[Conversation], Conversation],
        *,
        touch: bool = True,
    ) -> Conversation:
        """Atomically apply ``fn`` to a stored conversation (across processes) and save it.

        ``fn`` is a plain function; it runs in the worker thread, under the gate.

        :raises KeyNotFound: no such conversation.
        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        return await self._call(
            lambda repo: repo.modify_conversation(conversation_id, fn, touch=touch)
        )
