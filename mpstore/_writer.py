"""Group commit within one process: queued writes share one transaction, each kept apart.

When a write finds the gate free it runs at once in the caller's thread. Otherwise it joins
this process's queue, and one writer thread per store waits for the gate (see
:meth:`Gate.acquire`); when it wins, it runs every queued write in one transaction, commits
once, releases the gate and only then hands each caller its own result or its own exception.
Each write runs inside its own SAVEPOINT, except where SQLite undoes a failed one by itself
(one row, no trigger, no foreign key action); consecutive such upserts into one collection run
as one statement (see :meth:`WriteQueue._run_together`). One write's failure undoes only that
write; no caller hears "done" before COMMIT.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _fork, _sqlite
from ._connection import Connection
from ._errors import Abandoned, StoreClosed, TransactionError
from ._mailbox import Carried, Mailbox

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["WriteQueue"]

T = TypeVar("T")


class _Job(Generic[T]):
    __slots__ = (
        "abandon",
        "alone",
        "carried",
        "context",
        "done",
        "error",
        "fn",
        "op",
        "plain",
        "queued",
        "result",
        "started",
    )

    def __init__(
        self,
        fn: Callable[[Connection], T],
        abandon: threading.Event | None,
        queued: bool = True,
        carried: bool = False,
        op: tuple[Any, ...] | None = None,
    ) -> None:
        self.fn = fn
        self.carried = carried
        self.op = op  # a collection write given as data
        self.plain = False  # runs without a SAVEPOINT (see _mark_plain)
        self.alone = False  # runs by itself, not in one statement with others (see _together)
        # A queued callback runs in the writer thread but sees the caller's context variables
        # (a write given as data runs no code of the caller's).
        self.context = contextvars.copy_context() if queued and op is None else None
        # Only a queued write's caller waits for it; the others run in the caller's thread.
        self.done = _Latch() if queued else _RAN_HERE
        self.result: T | None = None
        self.error: BaseException | None = None
        self.started = False
        self.abandon = abandon
        self.queued = time.perf_counter() if queued else 0.0  # for the gate_wait statistic

    def run(self, conn: Connection) -> T:
        return self.fn(conn) if self.context is None else self.context.run(self.fn, conn)


class _Latch:
    """Set once, waited for by one caller: what ``threading.Event`` does here, with one lock
    (an Event builds a Condition, and a lock per wait)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether it was set, within ``timeout`` (None: however long it takes)."""
        if not self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            return False
        self._lock.release()  # set stays set: a later wait passes too
        return True


_RAN_HERE = _Latch()


class _Redo(Exception):
    """Raised out of a batch whose transaction a write ended: run ``jobs`` again."""

    def __init__(self, jobs: list[_Job[Any]]) -> None:
        super().__init__()
        self.jobs = jobs


def _mark_plain(
    conn: Connection,
    jobs: list[_Job[Any]],
    undo: bool | None = None,
    after: list[_Job[Any]] | None = None,
) -> bool | None:
    """Let the writes that need no SAVEPOINT run without one: one statement on one row, in a
    schema where SQLite undoes such a failed statement by itself. Not when a callback runs
    among them: it may change the schema (create a trigger) before they run.

    ``undo`` is that schema's answer if already known in this transaction; returns it (None
    if it was not needed). ``after`` are the jobs that ran before these in the transaction:
    if a callback was among them, the schema is asked afresh.
    """
    for job in jobs:
        job.plain = False  # a rerun asks again: the rolled-back attempt's schema is gone
    if any(job.op is None for job in jobs):
        return undo
    single = [j for j in jobs if _sqlite.single_statement(j.op)]
    if not single:
        return undo
    if undo is None:
        fresh = after is not None and any(job.op is None for job in after)
        undo = _sqlite.statements_undo_themselves(conn, fresh)
    if undo:
        for job in single:
            job.plain = True
    return undo


def _together(jobs: list[_Job[Any]], i: int) -> list[_Job[Any]]:
    """The writes from ``jobs[i]`` on that can run as one statement: well-formed one-row
    upserts into one collection that need no SAVEPOINT (see :func:`_mark_plain`). A malformed
    one (a damaged or forged slot) runs by itself, to fail alone."""
    first = jobs[i]
    target = _sqlite.upsert_target(first.op) if first.plain and not first.alone else None
    if target is None:
        return [first]
    end = i + 1
    while end < len(jobs):
        job = jobs[end]
        if not job.plain or job.alone or _sqlite.upsert_target(job.op) != target:
            break
        end += 1
    return jobs[i:end]


_batch_ids: tuple[int, Iterator[int]] = (0, iter(()))


def _new_batch_id() -> int:
    """An id for a batch that carries other processes' writes, unique among the batches of
    all processes on the file: a random start per process (a forked child draws its own),
    counted up from there."""
    global _batch_ids
    pid, ids = _batch_ids
    if pid != _fork.pid():
        ids = itertools.count(int.from_bytes(os.urandom(8), "little") >> 2)
        _batch_ids = (_fork.pid(), ids)
    return next(ids) % (1 << 63) or 1


class _Carry:
    """Writes of other processes that one batch takes from the mailbox, once its own ran."""

    __slots__ = ("batch", "jobs", "mailbox", "taken", "took")

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.batch = 0  # drawn when the batch takes writes: a lone write never needs one
        self.taken: list[Carried] = []
        self.jobs: list[_Job[Any]] = []
        self.took = False

    def waiting(self) -> bool:
        """Whether writes wait in the mailbox, and this batch has not taken them yet."""
        return not self.took and self.mailbox.waiting()

    def take(self) -> list[_Job[Any]]:
        """The mailbox's writes, taken only now: a slot is held for as long as its own SQL and
        the COMMIT take, not while this batch's own callbacks run (unless a write ends the
        transaction and the batch runs again, callbacks included)."""
        self.took = True
        self.batch = self.batch or _new_batch_id()
        self.taken = self.mailbox.take()
        self.jobs = []
        for c in self.taken:
            job: _Job[int] = _Job(_sqlite.op_runner(c.op), None, queued=False, carried=True)
            job.op = c.op
            self.jobs.append(job)
        return self.jobs

    def settle(self, conn: Connection) -> None:
        """Before COMMIT: the batch id into the transaction, each outcome into its slot."""
        _sqlite.record_batch(conn, self.batch)
        outcomes = [(True, j.result) if j.error is None else (False, j.error) for j in self.jobs]
        self.mailbox.settle(self.taken, outcomes, self.batch)

    def unwritten(self) -> None:
        """Store each taken write's own error when the batch commits none of them."""
        outcomes = [(False, j.error or TransactionError("not written")) for j in self.jobs]
        self.mailbox.settle(self.taken, outcomes, 0)

    def after_failure(self, raw: sqlite3.Connection, exc: BaseException) -> None:
        """The batch raised: tell the owners what happened, which the database decides."""
        try:
            committed = not raw.in_transaction and _sqlite.last_batch(raw) == self.batch
        except sqlite3.Error:
            # Undecidable here: leave the slots taken and marked, as a dead holder would, and
            # the next holder settles them from the database.
            return
        if not committed:
            self.mailbox.fail(self.taken, exc)
        self.mailbox.finish(self.taken)


class WriteQueue:
    """The queue of one store's pending writes in this process, and the thread that runs them."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._reset()

    def _reset(self) -> None:
        self._pid = _fork.pid()
        self._cond = threading.Condition(threading.Lock())
        self._jobs: deque[_Job[Any]] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0
        self.batched_writes = 0

    def submit(
        self,
        fn: Callable[[Connection], T],
        timeout: float,
        op: tuple[Any, ...] | None = None,
        start: float | None = None,
    ) -> T:
        """Queue ``fn`` and wait until its transaction has committed (or failed). ``start``:
        when the caller began to wait for the gate (``time.monotonic()``), if before this call.

        :raises GateTimeout: the write had not started when ``timeout`` ran out; it never will.
        :raises StoreClosed: the store's close() had begun.
        """
        if self._pid != _fork.pid():
            self._reset()
        job: _Job[T] = _Job(fn, self._store._tx.abandon, op=op)
        if start is None:
            start = time.monotonic()
        else:
            job.queued -= time.monotonic() - start  # the gate_wait statistic counts it all
        with self._cond:
            if self._closed:
                # close() has begun: it runs what was queued before it, and nothing after.
                raise StoreClosed(f"the store {self._store.path} is closed", self._store.path)
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"mpstore-writer:{self._store.path}", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        if not job.done.wait(timeout):
            with self._cond:
                if not job.started:
                    self._jobs.remove(job)
                    raise self._store._gate_timeout(start)
            # Already part of a batch that holds the gate: its outcome is moments away.
            job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _run(self) -> None:
        store = self._store
        while True:
            with self._cond:
                while not self._jobs:
                    if self._closed:
                        self._thread = None
                        return
                    self._cond.wait()
            batch: list[_Job[Any]] = []
            try:
                with store._write_turn(timeout=None) as raw:
                    batch = self._take()
                    self._commit(raw, batch, store._carrier())
            except BaseException as exc:
                # Failing before the batch was taken (the store closed, the lock file cannot be
                # opened) fails everything queued: the same error would meet each of them.
                batch = batch or self._take()
                for job in batch:
                    if job.error is None:
                        job.error = exc
                        job.result = None
            finally:
                for job in batch:
                    job.done.set()

    def _take(self) -> list[_Job[Any]]:
        with self._cond:
            batch = list(self._jobs)
            self._jobs.clear()
            for job in batch:
                job.started = True
        now = time.perf_counter()
        for job in batch:
            self._store._stats.record("gate_wait", now - job.queued)
        return batch

    def lead(self, raw: Any, fn: Callable[[Connection], T], op: tuple[Any, ...] | None = None) -> T:
        """Run ``fn`` (the collection write ``op``, if it is one) for a caller that holds the
        gate, with every write left in the mailbox."""
        mailbox = self._store._carrier()
        if mailbox is None:
            with self._store._transaction(raw) as conn:
                return fn(conn)
        own: _Job[T] = _Job(fn, None, queued=False)
        own.op = op
        self._commit(raw, [own], mailbox)
        if own.error is not None:
            raise own.error
        return own.result  # type: ignore[return-value]

    def _commit(self, raw: Any, batch: list[_Job[Any]], mailbox: Mailbox | None) -> None:
        """Run ``batch`` (and the writes of ``mailbox``, if given) in one transaction; each job
        gets its own outcome. Raises only what failed the whole transaction (BEGIN, COMMIT, the
        disk). Counted as a group commit when more than one write shared the transaction."""
        store = self._store
        runnable = [job for job in batch if not self._abandoned(job)]
        # Whether the mailbox holds writes is asked only after this batch's own writes ran,
        # just before COMMIT: the later it is asked, the more writes wait there.
        carry = _Carry(mailbox) if mailbox is not None else None
        try:
            if runnable or (carry is not None and carry.waiting()):
                self._transact(raw, runnable, carry)
        except BaseException as exc:
            if carry is not None and carry.taken:
                carry.after_failure(raw, exc)
            raise
        else:
            if carry is not None and carry.taken:
                carry.mailbox.finish(carry.taken)
        finally:
            jobs = runnable + (carry.jobs if carry is not None else [])
            if len(jobs) > 1:
                self._count(jobs)
            if carry is not None and carry.taken:
                store._stats.count("writes_carried", len(carry.taken))

    def _count(self, jobs: list[_Job[Any]]) -> None:
        self.batches += 1
        self.batched_writes += len(jobs)
        self._store._stats.record("batch_size", len(jobs))
        self._store._stats.count("writes_batched", len(jobs))

    def _transact(self, raw: Any, jobs: list[_Job[Any]], carry: _Carry | None) -> None:
        pending = jobs
        while True:
            try:
                with self._store._transaction(raw) as conn:
                    # Until the mailbox's writes are taken, a lone write runs alone: its
                    # failure rolls back a transaction that holds nothing else.
                    alone = carry is None or not carry.took
                    # None when a callback is among them: asked again after it ran.
                    undo = None if alone and len(pending) == 1 else _mark_plain(conn, pending)
                    self._run_jobs(conn, raw, pending, alone=alone)
                    if carry is not None and carry.waiting():
                        taken = carry.take()
                        _mark_plain(conn, taken, undo, after=pending)
                        try:
                            # Never alone: a carried write's own failure is its owner's.
                            self._run_jobs(conn, raw, taken, alone=False)
                        except _Redo as redo:
                            # Those that ran before the mailbox's writes were rolled back too.
                            for job in pending:
                                job.result, job.error = None, None
                            raise _Redo(pending + redo.jobs) from None
                    if carry is not None and carry.taken:
                        carry.settle(conn)
                return
            except _Redo as redo:
                pending = redo.jobs
                if not pending and (carry is None or not carry.waiting()):
                    if carry is not None and carry.taken:
                        carry.unwritten()  # every carried write failed: say so in its slot
                    return

    def _run_jobs(self, conn: Connection, raw: Any, jobs: list[_Job[Any]], alone: bool) -> None:
        if alone and len(jobs) == 1:
            # Alone in the transaction: its failure rolls back the transaction itself.
            job = jobs[0]
            job.result = job.run(conn)
            return
        i = 0
        while i < len(jobs):
            together = _together(jobs, i)
            ran = self._run_together(conn, raw, jobs, i, together) if len(together) > 1 else 0
            if ran:
                i += ran
                continue
            job = jobs[i]
            savepoint = None
            try:
                if job.plain:
                    job.result = job.run(conn)
                else:
                    savepoint = self._store._savepoint(conn)
                    with savepoint:
                        job.result = job.run(conn)
            except BaseException as exc:
                if savepoint is not None:
                    savepoint.settle(exc)  # its end never ran if a Ctrl-C landed as it ended
                if job.carried and not isinstance(exc, Exception):
                    raise  # this process's own interrupt, not the other caller's error
                job.error = exc
            if not raw.in_transaction:
                # This write ended the whole transaction (a RAISE(ROLLBACK) trigger, a full
                # disk): the writes before it were rolled back with it, so they run again in a
                # new transaction, with the ones not yet run; this one keeps its error.
                if job.error is None:
                    job.error = TransactionError(
                        "the write ended its transaction, so it was not kept", self._store.path
                    )
                others = jobs[:i] + jobs[i + 1 :]
                for other in jobs[:i]:
                    other.result, other.error = None, None
                raise _Redo(others)
            i += 1

    def _run_together(
        self, conn: Connection, raw: Any, jobs: list[_Job[Any]], i: int, together: list[_Job[Any]]
    ) -> int:
        """Run ``together`` (the writes ``jobs[i:]`` starts with: one-row upserts into one
        collection) as one statement; return how many of them ran. Where one failed, those
        before it stand (each changed its one row, and no trigger ran), it keeps its error,
        and the count includes it: the writes after it run next, as they would have.

        :raises _Redo: the failure ended the transaction; the writes run again, but the one
            that failed.
        """
        before = raw.total_changes
        try:
            _sqlite.run_upserts(conn, [job.op for job in together])  # type: ignore[misc]
        except Exception as exc:
            done = int(raw.total_changes - before)
            if not 0 <= done < len(together):  # not one change per row: each runs by itself
                for job in together:
                    job.alone = True
                return 0
            for job in together[:done]:
                job.result = 1
            failed = together[done]
            failed.error = exc
            if not raw.in_transaction:
                for other in jobs[: i + done]:
                    other.result, other.error = None, None
                raise _Redo([job for job in jobs if job is not failed]) from None
            return done + 1
        for job in together:
            job.result = 1
        return len(together)

    def _abandoned(self, job: _Job[Any]) -> bool:
        if job.abandon is not None and job.abandon.is_set():
            job.error = Abandoned(
                f"the caller abandoned this write on {self._store.path}", self._store.path
            )
            return True
        return False

    def close(self, timeout: float) -> None:
        """Let the writer thread finish what is queued, then stop; wait up to ``timeout``.

        A writer still waiting for the gate after that finds the store closed when it gets it,
        and fails its queued writes with :class:`StoreClosed` (their callers time out first).
        """
        if self._pid != _fork.pid():
            self._reset()  # the parent's writer thread and lock are not this process's
        with self._cond:
            self._closed = True
            self._cond.notify()
        thread = self._thread
        # From inside a write (an update() callback runs in the writer thread) there is nothing
        # to wait for: this thread finishes its batch and then stops.
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
