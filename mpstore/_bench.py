"""``mpstore bench``: concurrent conversation writes, mpstore against the alternatives.

Every cell (workers x writes per worker) runs each strategy on a fresh database. Workers are
released together by a barrier after all set-up and timed from it; finished workers park on a
second barrier until every worker has finished, and only then report, close and exit (on 2 cores
an exiting interpreter steals CPU from the workers still writing).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import multiprocessing
import os
import platform
import queue
import sqlite3
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, Protocol

from ._checkpoint import Checkpointer
from .conversations import (
    Conversation,
    ConversationContext,
    ConversationRepository,
    Message,
    sample_conversation,
    utcnow,
)

__all__ = [
    "CEILINGS",
    "CONCURRENT",
    "BenchConfig",
    "RunResult",
    "Summary",
    "percentile",
    "run_bench",
    "summarize",
]

CONCURRENT = ("mpstore", "ungated", "filelock")
CEILINGS = ("ceiling", "ceiling-batched")
#: References that only make sense with threads of one process.
HANDOFF = ("handoff",)
STRATEGIES = CONCURRENT + CEILINGS + HANDOFF
MODES = ("processes", "threads")
SCENARIOS = ("upsert", "modify", "mixed")
DEFAULT_CELLS = ((4, 10), (8, 10), (16, 10), (16, 100))
QUICK_CELLS = ((4, 10), (16, 20))
SINGLE = "single"
#: How many conversations the ``modify`` scenario's workers share.
SHARED_CONVERSATIONS = 4
#: How many conversations a ``mixed`` reader lists per call.
READ_LIMIT = 20
WORKSPACES = 4
_BARRIER_TIMEOUT = 120.0


# -- records ------------------------------------------------------------------------------------


def conversation_id(worker: int, index: int) -> str:
    return f"w{worker:03d}-{index:05d}"


def shared_id(index: int) -> str:
    return f"shared-{index}"


def worker_records(worker: int, writes: int, context_bytes: int) -> list[Conversation]:
    """The conversations one ``upsert`` worker writes, built before the clock starts."""
    return [
        sample_conversation(
            conversation_id(worker, i),
            workspace_id=1 + worker % WORKSPACES,
            context_bytes=context_bytes,
        )
        for i in range(writes)
    ]


def warmup_record(worker: int, context_bytes: int) -> Conversation:
    """The conversation a writer writes once before the start barrier, in every strategy: its
    first write (connections, files, code paths run for the first time) is set-up, not timed.
    Seeded beforehand and written unchanged, outside every workspace that readers list, so it
    counts neither as a new record nor as an appended message."""
    return sample_conversation(f"warmup-{worker:03d}", workspace_id=0, context_bytes=context_bytes)


def worker_messages(worker: int, writes: int) -> list[tuple[str, Message]]:
    """The (conversation id, message) pairs one ``modify`` worker appends."""
    return [
        (
            shared_id((worker + i) % SHARED_CONVERSATIONS),
            Message(role="assistant", content=f"reply {i} from worker {worker}"),
        )
        for i in range(writes)
    ]


def appended(conversation: Conversation, message: Message) -> Conversation:
    """``conversation`` with ``message`` appended and ``updated_at`` set to now: the same work
    in every strategy (mpstore's repository is asked not to touch the result again)."""
    context = conversation.context or ConversationContext()
    new_context = ConversationContext(messages=[*context.messages, message], tools=context.tools)
    return conversation.model_copy(update={"context": new_context, "updated_at": utcnow()})


# -- strategies ---------------------------------------------------------------------------------


class Strategy(Protocol):
    """One way of writing conversations; an instance serves every thread of one process."""

    def open(self, path: str) -> None: ...

    def write(self, conversation: Conversation) -> None: ...

    def modify(self, conversation_id: str, message: Message) -> None: ...

    def read(self, workspace_id: int) -> int: ...

    def close(self) -> None: ...


class MpstoreStrategy:
    """The real :class:`mpstore.Store` with default settings."""

    def __init__(self) -> None:
        self._store: Any = None
        self._repo: ConversationRepository | None = None

    @staticmethod
    def create(path: str, seed: Sequence[Conversation]) -> None:
        from ._store import Store

        with Store(path) as store:
            repo = ConversationRepository(store)
            for conversation in seed:
                repo.upsert_conversation(conversation)

    def open(self, path: str) -> None:
        from ._store import Store

        self._store = Store(path)
        try:
            self._repo = ConversationRepository(self._store)
            # The write connection opens on a process's first turn at the gate, which the
            # warm-up write may not take (another process may carry it): opened here, as the
            # other strategies open their connections here.
            with self._store.write():
                pass
        except BaseException:
            self._store.close()  # the callers close only what opened
            raise

    def _repository(self) -> ConversationRepository:
        assert self._repo is not None
        return self._repo

    def write(self, conversation: Conversation) -> None:
        self._repository().upsert_conversation(conversation)

    def modify(self, conversation_id: str, message: Message) -> None:
        self._repository().modify_conversation(
            conversation_id, lambda c: appended(c, message), touch=False
        )

    def read(self, workspace_id: int) -> int:
        return len(self._repository().get_all_conversations(workspace_id, limit=READ_LIMIT))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    @staticmethod
    def stored(path: str) -> dict[str, int]:
        """Conversation id -> number of messages, read straight from the file."""
        with _closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT key, value FROM conversations").fetchall()
        return {key: _message_count(json.loads(value).get("context")) for key, value in rows}


_PLAIN_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS conversations (conversation_id TEXT PRIMARY KEY, title TEXT, "
    "workspace_id INTEGER NOT NULL, context TEXT, created_at TEXT, updated_at TEXT, metrics TEXT)",
    "CREATE INDEX IF NOT EXISTS conversations_by_created "
    "ON conversations (workspace_id, created_at DESC)",
    "CREATE INDEX IF NOT EXISTS conversations_by_updated "
    "ON conversations (workspace_id, updated_at DESC) WHERE context IS NOT NULL",
)
_PLAIN_UPSERT = (
    "INSERT INTO conversations (conversation_id, title, workspace_id, context, created_at, "
    "updated_at, metrics) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(conversation_id) DO UPDATE SET "
    "title=excluded.title, workspace_id=excluded.workspace_id, context=excluded.context, "
    "created_at=excluded.created_at, updated_at=excluded.updated_at, metrics=excluded.metrics"
)
_PLAIN_GET = (
    "SELECT conversation_id, title, workspace_id, context, created_at, updated_at, metrics "
    "FROM conversations WHERE conversation_id = ?"
)
_PLAIN_LIST = (
    "SELECT conversation_id, title, workspace_id, context, created_at, updated_at, metrics "
    "FROM conversations WHERE workspace_id = ? AND context IS NOT NULL "
    "ORDER BY updated_at DESC LIMIT ?"
)


def plain_row(conversation: Conversation) -> tuple[Any, ...]:
    """The reference app's row: scalar columns plus the context and metrics as JSON text."""
    fields = conversation.model_dump(mode="json", exclude={"context"})
    context = conversation.context.model_dump_json() if conversation.context is not None else None
    metrics = json.dumps(fields["metrics"]) if fields["metrics"] is not None else None
    return (
        fields["conversation_id"],
        fields["title"],
        fields["workspace_id"],
        context,
        fields["created_at"],
        fields["updated_at"],
        metrics,
    )


def plain_conversation(row: Sequence[Any]) -> Conversation:
    return Conversation(
        conversation_id=row[0],
        title=row[1],
        workspace_id=row[2],
        context=ConversationContext.model_validate_json(row[3]) if row[3] is not None else None,
        created_at=row[4],
        updated_at=row[5],
        metrics=json.loads(row[6]) if row[6] is not None else None,
    )


def plain_connect(path: str) -> sqlite3.Connection:
    """A connection as the reference app opens it: busy_timeout 5 s, WAL, synchronous=NORMAL."""
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class UngatedStrategy:
    """UNSAFE on purpose: the reference app's pool of 5 plain connections and no gate.

    Deferred transactions take SQLite's write lock at their first write; when another connection
    committed in between, that upgrade fails at once with "database is locked", and a
    read-then-write can silently overwrite another writer's update.
    """

    pool_size = 5
    checkout_timeout = 5.0

    def __init__(self) -> None:
        self._pool: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._all: list[sqlite3.Connection] = []

    @staticmethod
    def create(path: str, seed: Sequence[Conversation]) -> None:
        with _closing(plain_connect(path)) as conn:
            for statement in _PLAIN_SCHEMA:
                conn.execute(statement)
            conn.executemany(_PLAIN_UPSERT, [plain_row(c) for c in seed])

    def open(self, path: str) -> None:
        for _ in range(self.pool_size):
            conn = plain_connect(path)
            self._all.append(conn)
            self._pool.put(conn)

    def _checkout(self) -> sqlite3.Connection:
        return self._pool.get(timeout=self.checkout_timeout)

    def _transaction(self, body: Callable[[sqlite3.Connection], None]) -> None:
        conn = self._checkout()
        try:
            conn.execute("BEGIN")
            try:
                body(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            self._pool.put(conn)

    def write(self, conversation: Conversation) -> None:
        row = plain_row(conversation)

        def upsert(conn: sqlite3.Connection) -> None:
            conn.execute(_PLAIN_UPSERT, row)

        self._transaction(upsert)

    def modify(self, conversation_id: str, message: Message) -> None:
        def get_then_upsert(conn: sqlite3.Connection) -> None:
            found = conn.execute(_PLAIN_GET, (conversation_id,)).fetchone()
            if found is None:
                raise KeyError(conversation_id)
            new = appended(plain_conversation(found), message)
            conn.execute(_PLAIN_UPSERT, plain_row(new))

        self._transaction(get_then_upsert)

    def read(self, workspace_id: int) -> int:
        conn = self._checkout()
        try:
            rows = conn.execute(_PLAIN_LIST, (workspace_id, READ_LIMIT)).fetchall()
        finally:
            self._pool.put(conn)
        return len([plain_conversation(r) for r in rows])

    def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()

    @staticmethod
    def stored(path: str) -> dict[str, int]:
        with _closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT conversation_id, context FROM conversations").fetchall()
        return {key: len(json.loads(ctx).get("messages", [])) if ctx else 0 for key, ctx in rows}


class FileLockStrategy(UngatedStrategy):
    """The same plain pool, with a default ``filelock.FileLock`` held around each transaction."""

    def open(self, path: str) -> None:
        import filelock

        super().open(path)
        self._lock = filelock.FileLock(path + ".lock")

    def _transaction(self, body: Callable[[sqlite3.Connection], None]) -> None:
        with self._lock:
            super()._transaction(body)


class CeilingStrategy(UngatedStrategy):
    """One connection, no locks: the single-writer ceiling every gate is measured against.

    ``batched`` puts every write into one transaction, committed by :meth:`commit`.
    """

    pool_size = 1

    def __init__(self, batched: bool = False) -> None:
        super().__init__()
        self.batched = batched

    def open(self, path: str) -> None:
        super().open(path)
        if self.batched:
            self._all[0].execute("BEGIN")

    def _transaction(self, body: Callable[[sqlite3.Connection], None]) -> None:
        if self.batched:
            body(self._all[0])
        else:
            super()._transaction(body)

    def commit(self) -> None:
        if self.batched:
            self._all[0].execute("COMMIT")


class HandoffStrategy(UngatedStrategy):
    """UNSAFE, threads only: group commit between threads with nothing else. Callers queue
    their writes and wait on an event; one writer thread commits everything queued in one
    transaction. No gate, no isolation (one failing write fails its batch), no timeouts, no
    bookkeeping: what remains is the cost of handing each write to another thread and back,
    the floor under any group commit that returns only after the commit.
    """

    def open(self, path: str) -> None:
        super().open(path)
        self._conn = self._checkout()  # the writer thread's own; readers share the rest
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[tuple[Callable[[sqlite3.Connection], None], threading.Event]] = []
        self._failures: dict[threading.Event, BaseException] = {}
        self._closing = False
        self._writer = threading.Thread(target=self._drain, name="handoff-writer", daemon=True)
        self._writer.start()

    def _transaction(self, body: Callable[[sqlite3.Connection], None]) -> None:
        done = threading.Event()
        with self._cond:
            if self._closing:
                raise RuntimeError("the handoff strategy is closed")
            self._queue.append((body, done))
            self._cond.notify()
        done.wait()
        failure = self._failures.pop(done, None)
        if failure is not None:
            raise failure

    def _drain(self) -> None:
        conn = self._conn
        while True:
            with self._cond:
                while not self._queue:
                    if self._closing:
                        return
                    self._cond.wait()
                batch, self._queue = self._queue, []
            try:
                conn.execute("BEGIN IMMEDIATE")
                for body, _ in batch:
                    body(conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                # Every caller of the batch hears it, and the thread goes on serving: a caller
                # left waiting would hang the run.
                failure = exc
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error as rollback_failed:
                        failure = rollback_failed
                for _, done in batch:
                    self._failures[done] = failure
            finally:
                for _, done in batch:
                    done.set()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._writer.join()
        self._pool.put(self._conn)
        super().close()


class ProcessHandoffStrategy(UngatedStrategy):
    """UNSAFE, processes only: group commit between processes with nothing else.

    Each process owns a slot in a shared file beside the database (``<db>.handoff``): it puts
    its row there and polls until it is done, yielding its CPU and trying a non-blocking
    ``flock`` of ``<db>.handoff-lock`` in turn; whoever takes it commits every row waiting in
    any slot in one transaction, marks them done and lets go. WAL checkpoints run outside the
    lock, in a background thread of the committing process (mpstore's own checkpointer). No
    isolation (one failing row fails its batch), no timeouts, no crash recovery, no fairness,
    no sleeping, x86 store ordering assumed: what remains is the cost of handing each write to
    another process and back, the floor under any group commit between processes that returns
    only after the commit.
    """

    slots = 64
    slot_size = 1 << 20

    def open(self, path: str) -> None:
        import fcntl
        import mmap

        super().open(path)
        self._conn = self._checkout()
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        # Every process sizes it alike, so creating it in each is harmless.
        self._fd = os.open(path + ".handoff", os.O_RDWR | os.O_CREAT, 0o600)
        size = _HANDOFF_HEADER + self.slots * self.slot_size
        os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)
        for index in range(self.slots):
            # Fault in each slot's first page now: a holder's first scan would otherwise
            # take milliseconds of page faults inside the measured run.
            self._map[self._at(index)]
        self._gate = os.open(path + ".handoff-lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._slot: int | None = None
        # A lock on the slot's byte, held while open: an open-file-description lock where
        # there is one, so two instances in one process claim different slots.
        command = getattr(fcntl, "F_OFD_SETLK", fcntl.F_SETLK)
        for index in range(self.slots):
            try:
                fcntl.fcntl(self._fd, command, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, index, 1, 0))
            except OSError:
                continue
            self._slot = index
            self._map[self._at(index) : self._at(index) + 4096] = bytes(4096)
            break
        self._checkpointer = Checkpointer(path, partial(plain_connect, path))

    def _at(self, index: int) -> int:
        return _HANDOFF_HEADER + index * self.slot_size

    def write(self, conversation: Conversation) -> None:
        self._publish(conversation)
        self._wait()

    def _publish(self, conversation: Conversation) -> None:
        import pickle

        data = pickle.dumps(plain_row(conversation), pickle.HIGHEST_PROTOCOL)
        if self._slot is None or len(data) > self.slot_size - 8:
            raise RuntimeError("the handoff strategy has no slot for this write")
        mm, at = self._map, self._at(self._slot)
        mm[at + 8 : at + 8 + len(data)] = data
        mm[at + 4 : at + 8] = len(data).to_bytes(4, "little")
        mm[at] = _PUBLISHED

    def _wait(self) -> None:
        import fcntl

        mm, at = self._map, self._at(self._slot) if self._slot is not None else 0
        while True:
            state = mm[at]
            if state != _PUBLISHED:
                mm[at] = _FREE
                if state != _DONE:
                    raise RuntimeError("the batch that carried this write failed")
                return
            try:
                fcntl.flock(self._gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.sched_yield()
                continue
            try:
                if mm[at] == _PUBLISHED:
                    self._commit_waiting()
            finally:
                fcntl.flock(self._gate, fcntl.LOCK_UN)

    def _commit_waiting(self) -> None:
        import pickle

        mm = self._map
        taken = [i for i in range(self.slots) if mm[self._at(i)] == _PUBLISHED]
        outcome = _FAILED
        try:
            rows = []
            for i in taken:
                at = self._at(i)
                n = int.from_bytes(mm[at + 4 : at + 8], "little")
                rows.append(pickle.loads(mm[at + 8 : at + 8 + n]))
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(_PLAIN_UPSERT, rows)
            self._conn.execute("COMMIT")
            outcome = _DONE
        finally:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            for i in taken:
                mm[self._at(i)] = outcome
        self._checkpointer.poke()

    def close(self) -> None:
        self._checkpointer.close()
        self._checkpointer.release()
        self._pool.put(self._conn)
        self._map.close()
        os.close(self._fd)
        os.close(self._gate)
        super().close()


#: The hand-off file's header, unused: the slots start a page in.
_HANDOFF_HEADER = 4096
_FREE, _PUBLISHED, _DONE, _FAILED = 0, 1, 2, 3
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on 64-bit Linux
#: The process hand-off needs flock, sched_yield and the Linux layout of struct flock.
_PROCESS_HANDOFF = (
    sys.platform.startswith("linux") and hasattr(os, "sched_yield") and struct.calcsize("P") == 8
)


def _message_count(context: Any) -> int:
    return len(context.get("messages", [])) if isinstance(context, dict) else 0


class _closing:
    """``contextlib.closing`` for a connection, typed."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


_CLASSES: dict[str, type[MpstoreStrategy] | type[UngatedStrategy]] = {
    "mpstore": MpstoreStrategy,
    "ungated": UngatedStrategy,
    "filelock": FileLockStrategy,
    "ceiling": CeilingStrategy,
    "ceiling-batched": CeilingStrategy,
    "handoff": HandoffStrategy,
}


def make_strategy(name: str, mode: str = "threads") -> Strategy:
    if name == "handoff" and mode == "processes":
        return ProcessHandoffStrategy()
    if name == "ceiling-batched":
        return CeilingStrategy(batched=True)
    return _CLASSES[name]()


# -- one worker ---------------------------------------------------------------------------------


@dataclass
class WorkerResult:
    """What one writer or reader sends back after the park barrier."""

    worker: int
    role: str
    started: float
    finished: float
    samples: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    #: CPU seconds its whole process used while it wrote or read; None where the process is
    #: shared with other workers (threads mode).
    cpu_s: float | None = None


@dataclass(frozen=True)
class Job:
    """Everything a worker needs; picklable so that it crosses into a spawned process."""

    strategy: str
    path: str
    scenario: str
    worker: int
    writes: int
    context_bytes: int
    role: str = "writer"
    parties: int = 1
    writers: int = 1
    #: A reader with a duration reads for that many seconds instead of until the writers stop.
    duration: float = 0.0


class _Waitable(Protocol):
    def wait(self, timeout: float | None = None) -> Any: ...


class _Flag(Protocol):
    def set(self) -> None: ...

    def is_set(self) -> bool: ...


def _timed(
    calls: list[Callable[[], None]],
    samples: list[float],
    errors: Counter[str],
    result: WorkerResult,
    clock: Callable[[], float],
) -> None:
    result.started = clock()
    for call in calls:
        t = clock()
        try:
            call()
        except Exception as exc:
            errors[type(exc).__name__] += 1
        samples.append(clock() - t)
    result.finished = clock()
    result.errors = dict(errors)


def run_worker(
    job: Job,
    strategy: Strategy,
    start: _Waitable,
    park: _Waitable,
    stop: _Flag,
    cpu_clock: Callable[[], float] | None = None,
) -> WorkerResult:
    """Set up (one warm-up call), wait for the start barrier, write (or read until ``stop``),
    park, return.

    ``cpu_clock`` (a process's CPU time) measures the CPU used while working, parking excluded.
    """
    result = WorkerResult(worker=job.worker, role=job.role, started=0.0, finished=0.0)
    if job.role == "reader":
        strategy.read(1 + job.worker % WORKSPACES)
        start.wait(_BARRIER_TIMEOUT)
        errors: Counter[str] = Counter()
        cpu = cpu_clock() if cpu_clock is not None else 0.0
        result.started = time.perf_counter()
        workspace = 1 + job.worker % WORKSPACES
        until = result.started + job.duration if job.duration > 0 else math.inf
        while True:
            try:
                strategy.read(workspace)
                result.reads += 1
            except Exception as exc:
                errors[type(exc).__name__] += 1
            if stop.is_set() or time.perf_counter() >= until:
                break
        result.finished = time.perf_counter()
        if cpu_clock is not None:
            result.cpu_s = cpu_clock() - cpu
        result.errors = dict(errors)
        return result
    writer = _PreparedWriter(job, strategy)
    strategy.write(warmup_record(job.worker, job.context_bytes))
    start.wait(_BARRIER_TIMEOUT)
    cpu = cpu_clock() if cpu_clock is not None else 0.0
    writer.run(result)
    if cpu_clock is not None:
        result.cpu_s = cpu_clock() - cpu
    if park.wait(_BARRIER_TIMEOUT) == 0:
        stop.set()
    return result


class _PreparedWriter:
    """A writer whose records are built at construction, before any barrier."""

    def __init__(self, job: Job, strategy: Strategy) -> None:
        if job.scenario == "modify":
            pairs = worker_messages(job.worker, job.writes)
            self.calls: list[Callable[[], None]] = [
                partial(strategy.modify, cid, msg) for cid, msg in pairs
            ]
        else:
            records = worker_records(job.worker, job.writes, job.context_bytes)
            self.calls = [partial(strategy.write, rec) for rec in records]

    def run(self, result: WorkerResult) -> None:
        _timed(self.calls, result.samples, Counter(), result, time.perf_counter)


def _pool_main(inbox: Any, barriers: dict[tuple[int, int], Any], stop: _Flag, results: Any) -> None:
    """A spawned worker process: runs one job per message until it receives None."""
    results.put({"ready": True})
    while True:
        message = inbox.get()
        if message is None:
            return
        job: Job = message
        start, park = barriers[(job.parties, job.writers)]
        try:
            strategy = make_strategy(job.strategy, "processes")
            strategy.open(job.path)
            try:
                result = run_worker(job, strategy, start, park, stop, cpu_clock=time.process_time)
            finally:
                strategy.close()
        except BaseException as exc:
            start.abort()
            park.abort()
            results.put({"failed": f"worker {job.worker} ({job.strategy}): {exc!r}"})
            return
        results.put(asdict(result))


# -- runners ------------------------------------------------------------------------------------


def _jobs(
    strategy: str,
    path: str,
    scenario: str,
    workers: int,
    writes: int,
    context_bytes: int,
    readers: int,
) -> list[Job]:
    readers = readers if scenario == "mixed" else 0
    parties = workers + readers
    jobs = [
        Job(strategy, path, scenario, w, writes, context_bytes, "writer", parties, workers)
        for w in range(workers)
    ]
    jobs += [
        Job(strategy, path, scenario, r, 0, context_bytes, "reader", parties, workers)
        for r in range(readers)
    ]
    return jobs


class ProcessPool:
    """Spawned worker processes, started once and reused for every process-mode run.

    Each run's workers open their strategy, meet at the start barrier, write, park until all
    writers are done, close, and report. Process start-up and interpreter exit never overlap a
    measured run, and spawning hundreds of interpreters does not dominate the benchmark's time.
    """

    def __init__(self, size: int, shapes: Iterable[tuple[int, int]]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.size = size
        self._barriers = {
            shape: (ctx.Barrier(shape[0]), ctx.Barrier(shape[1])) for shape in set(shapes)
        }
        self._stop = ctx.Event()
        self._results = ctx.Queue()
        self._inboxes = [ctx.SimpleQueue() for _ in range(size)]
        self._procs = [
            ctx.Process(
                target=_pool_main,
                args=(inbox, self._barriers, self._stop, self._results),
                name=f"mpstore-bench-{i}",
                daemon=True,
            )
            for i, inbox in enumerate(self._inboxes)
        ]
        for proc in self._procs:
            proc.start()
        ready = 0
        while ready < size:
            try:
                self._results.get(timeout=_BARRIER_TIMEOUT)
            except queue.Empty:
                self.close()
                raise RuntimeError("benchmark worker processes did not start") from None
            ready += 1

    def run(self, jobs: Sequence[Job]) -> list[WorkerResult]:
        """Run one job per worker process; the jobs' (parties, writers) must be a known shape."""
        if len(jobs) > self.size:
            raise ValueError(f"{len(jobs)} jobs for a pool of {self.size} processes")
        self._stop.clear()
        for inbox, job in zip(self._inboxes[: len(jobs)], jobs, strict=True):
            inbox.put(job)
        collected: list[WorkerResult] = []
        deadline = time.monotonic() + 2 * _BARRIER_TIMEOUT
        while len(collected) < len(jobs):
            try:
                raw = self._results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline or not all(p.is_alive() for p in self._procs):
                    raise RuntimeError("a benchmark worker process died or hung") from None
                continue
            if "failed" in raw:
                raise RuntimeError(raw["failed"])
            collected.append(WorkerResult(**raw))
        return collected

    def close(self) -> None:
        for proc, inbox in zip(self._procs, self._inboxes, strict=True):
            if proc.is_alive():
                inbox.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_threads(jobs: Sequence[Job]) -> list[WorkerResult]:
    """One thread per job, all sharing one strategy instance (one store, one pool)."""
    strategy = make_strategy(jobs[0].strategy)
    strategy.open(jobs[0].path)
    writers = sum(1 for j in jobs if j.role == "writer")
    start = threading.Barrier(len(jobs))
    park = threading.Barrier(max(writers, 1))  # readers alone never park
    stop = threading.Event()
    collected: list[WorkerResult] = []
    lock = threading.Lock()
    failures: list[BaseException] = []

    def body(job: Job) -> None:
        try:
            result = run_worker(job, strategy, start, park, stop)
        except BaseException as exc:
            failures.append(exc)
            start.abort()
            park.abort()
            stop.set()
            return
        with lock:
            collected.append(result)

    threads = [threading.Thread(target=body, args=(j,)) for j in jobs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        strategy.close()
    if failures:
        raise failures[0]
    return collected


def run_ceiling(job: Job, workers: int, batched: bool) -> list[WorkerResult]:
    """Every worker's writes from one connection in turn: one transaction each, or one for all."""
    strategy = CeilingStrategy(batched)
    strategy.open(job.path)
    result = WorkerResult(worker=0, role="writer", started=0.0, finished=0.0)
    calls = [
        call
        for w in range(workers)
        for call in _PreparedWriter(Job(**{**asdict(job), "worker": w}), strategy).calls
    ]
    try:
        strategy.write(warmup_record(0, job.context_bytes))
        cpu = time.process_time()
        _timed(calls, result.samples, Counter(), result, time.perf_counter)
        t = time.perf_counter()
        strategy.commit()
        result.cpu_s = time.process_time() - cpu
        commit = time.perf_counter() - t
        result.finished += commit
        if result.samples:
            result.samples[-1] += commit
    finally:
        strategy.close()
    return [result]


# -- one measured run ---------------------------------------------------------------------------


@dataclass
class RunResult:
    """One repetition of one strategy in one cell.

    ``throughput`` counts successful writes only; ``expected`` is how many calls returned without
    an error, ``present`` how many of them the database holds afterwards, ``lost`` the difference.
    """

    scenario: str
    mode: str
    strategy: str
    workers: int
    writes: int
    repetition: int
    elapsed_s: float
    attempted: int
    throughput: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    expected: int
    present: int
    lost: int
    readers: int = 0
    reads: int = 0
    read_throughput: float = 0.0
    read_alone_throughput: float = 0.0
    #: CPUs the writers' processes kept busy on average, and their CPU per successful write;
    #: None in threads mode (one process serves writers and readers alike).
    writer_cpus: float | None = None
    cpu_us_per_write: float | None = None


def _seed(scenario: str, context_bytes: int, workers: int) -> list[Conversation]:
    """What the database holds before a run: each writer's warm-up record; the conversations
    ``modify`` appends to; for ``mixed``, a full page of them per workspace, so that every read
    lists ``READ_LIMIT`` conversations from the start (with writers and alone alike)."""
    count = {"modify": SHARED_CONVERSATIONS, "mixed": WORKSPACES * READ_LIMIT}.get(scenario, 0)
    return [warmup_record(w, context_bytes) for w in range(workers)] + [
        sample_conversation(
            shared_id(i), workspace_id=1 + i % WORKSPACES, context_bytes=context_bytes
        )
        for i in range(count)
    ]


def run_one(
    strategy: str,
    mode: str,
    scenario: str,
    workers: int,
    writes: int,
    repetition: int,
    context_bytes: int,
    readers: int,
    directory: str,
    pool: ProcessPool | None = None,
) -> RunResult:
    """Run one strategy once in a fresh database under ``directory`` and verify what landed."""
    name = f"{scenario}-{strategy}-{mode}-{workers}x{writes}-{repetition}.db"
    path = os.path.join(directory, name)
    cls = _CLASSES[strategy]
    seed = _seed(scenario, context_bytes, workers)
    cls.create(path, seed)
    before = cls.stored(path)
    jobs = _jobs(strategy, path, scenario, workers, writes, context_bytes, readers)
    if strategy in CEILINGS:
        results = run_ceiling(jobs[0], workers, batched=strategy == "ceiling-batched")
    else:
        results = _run_jobs(jobs, mode, pool, (len(jobs), workers))
    after = cls.stored(path)
    alone = 0.0
    if scenario == "mixed" and readers and strategy not in CEILINGS:
        alone = _readers_alone(jobs, mode, pool, results)
    run = measure(
        results,
        strategy=strategy,
        mode=mode,
        scenario=scenario,
        workers=workers,
        writes=writes,
        repetition=repetition,
        before=before,
        after=after,
    )
    run.read_alone_throughput = alone
    _remove_files(path)
    return run


def _remove_files(path: str) -> None:
    """Delete a finished run's database and the files beside it (WAL, lock, mailbox). Left in
    place until the end, they came to about 0.4 GB for the default cells with ``--repeat 5``,
    and the system wrote them to disk during the runs that followed."""
    for name in glob.glob(glob.escape(path) + "*"):
        try:
            os.unlink(name)
        except OSError:
            # Still open where a system refuses to delete open files: the temporary
            # directory goes at the end of the benchmark, with whatever is left in it.
            continue


def _readers_alone(
    jobs: Sequence[Job], mode: str, pool: ProcessPool | None, with_writers: Sequence[WorkerResult]
) -> float:
    """The same readers on the same database for as long as the writers wrote, alone: the
    baseline for reads/s while writers write."""
    writers = [r for r in with_writers if r.role == "writer"]
    window = max(r.finished for r in writers) - min(r.started for r in writers)
    shape = _readers_shape(sum(1 for j in jobs if j.role == "reader"))
    readers = [
        replace(j, parties=shape[0], writers=shape[1], duration=window)
        for j in jobs
        if j.role == "reader"
    ]
    results = _run_jobs(readers, mode, pool, shape)
    reads = sum(r.reads for r in results)
    span = max(r.finished - r.started for r in results)
    return reads / span if span > 0 else 0.0


def _run_jobs(
    jobs: Sequence[Job], mode: str, pool: ProcessPool | None, shape: tuple[int, int]
) -> list[WorkerResult]:
    """Run ``jobs`` as threads, or in the process pool (a pool of their own if none)."""
    if mode != "processes":
        return run_threads(jobs)
    if pool is None:
        with ProcessPool(len(jobs), [shape]) as own:
            return own.run(jobs)
    return pool.run(jobs)


def _readers_shape(readers: int) -> tuple[int, int]:
    """The barrier shape of a readers-only run (its park barrier is never used)."""
    return (readers, 1)


def measure(
    results: Sequence[WorkerResult],
    *,
    strategy: str,
    mode: str,
    scenario: str,
    workers: int,
    writes: int,
    repetition: int,
    before: dict[str, int],
    after: dict[str, int],
) -> RunResult:
    """Turn worker results and the database read back before/after into one :class:`RunResult`."""
    writers = [r for r in results if r.role == "writer"]
    readers = [r for r in results if r.role == "reader"]
    samples = sorted(s for r in writers for s in r.samples)
    errors: Counter[str] = Counter()
    for r in writers:
        errors.update(r.errors)
    attempted = len(samples)
    elapsed = 0.0
    if writers:
        elapsed = max(r.finished for r in writers) - min(r.started for r in writers)
    if scenario == "modify":
        present = sum(after.values()) - sum(before.values())
    else:
        present = sum(1 for key in after if key not in before)
    failed = sum(errors.values())
    expected = attempted - failed
    reads = sum(r.reads for r in readers)
    read_window = max((r.finished - r.started for r in readers), default=0.0)
    cpu = [r.cpu_s for r in writers]
    writer_cpu = sum(c for c in cpu if c is not None) if cpu and None not in cpu else None
    return RunResult(
        scenario=scenario,
        mode=mode,
        strategy=strategy,
        workers=workers,
        writes=writes,
        repetition=repetition,
        elapsed_s=elapsed,
        attempted=attempted,
        throughput=expected / elapsed if elapsed > 0 else 0.0,
        p50_ms=percentile(samples, 50) * 1000,
        p99_ms=percentile(samples, 99) * 1000,
        max_ms=(samples[-1] * 1000) if samples else 0.0,
        errors=dict(errors),
        expected=expected,
        present=present,
        lost=max(0, expected - present),
        readers=len(readers),
        reads=reads,
        read_throughput=reads / read_window if read_window > 0 else 0.0,
        writer_cpus=writer_cpu / elapsed if writer_cpu is not None and elapsed > 0 else None,
        cpu_us_per_write=(
            writer_cpu / expected * 1e6 if writer_cpu is not None and expected > 0 else None
        ),
    )


# -- pure summary maths -------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ascending values, interpolating linearly; 0 if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be between 0 and 100, got {q}")
    n = len(sorted_values)
    if n == 0:
        return 0.0
    rank = (n - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, n - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


@dataclass
class Summary:
    """Medians over the repetitions of one strategy in one cell."""

    scenario: str
    mode: str
    strategy: str
    workers: int
    writes: int
    repetitions: int
    throughput: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, float]
    lost: float
    x_ceiling: float | None
    read_throughput: float
    read_alone_throughput: float = 0.0
    writer_cpus: float | None = None
    cpu_us_per_write: float | None = None


def _median_or_none(values: Iterable[float | None]) -> float | None:
    known = list(values)
    if not known or any(v is None for v in known):
        return None
    return statistics.median(v for v in known if v is not None)


def _median_errors(runs: Sequence[RunResult]) -> dict[str, float]:
    kinds = sorted({k for r in runs for k in r.errors})
    return {k: statistics.median(r.errors.get(k, 0) for r in runs) for k in kinds}


def summarize(runs: Iterable[RunResult]) -> list[Summary]:
    """Medians per (scenario, mode, strategy, cell), each with its ratio to the same run's ceiling.

    Ceiling runs are single-writer (mode ``single``); every mode's rows of a cell are compared
    with that cell's ``ceiling`` median.
    """
    groups: dict[tuple[str, str, str, int, int], list[RunResult]] = {}
    for run in runs:
        key = (run.scenario, run.mode, run.strategy, run.workers, run.writes)
        groups.setdefault(key, []).append(run)
    ceilings = {
        (scenario, workers, writes): statistics.median(r.throughput for r in group)
        for (scenario, _, strategy, workers, writes), group in groups.items()
        if strategy == "ceiling"
    }
    order = {name: i for i, name in enumerate(STRATEGIES)}
    summaries = []

    def position(key: tuple[str, str, str, int, int]) -> tuple[Any, ...]:
        scenario, mode, strategy, workers, writes = key
        return (scenario, workers, writes, mode != SINGLE, mode, order.get(strategy, 99))

    for (scenario, mode, strategy, workers, writes), group in sorted(
        groups.items(), key=lambda kv: position(kv[0])
    ):
        throughput = statistics.median(r.throughput for r in group)
        ceiling = ceilings.get((scenario, workers, writes))
        summaries.append(
            Summary(
                scenario=scenario,
                mode=mode,
                strategy=strategy,
                workers=workers,
                writes=writes,
                repetitions=len(group),
                throughput=throughput,
                p50_ms=statistics.median(r.p50_ms for r in group),
                p99_ms=statistics.median(r.p99_ms for r in group),
                max_ms=statistics.median(r.max_ms for r in group),
                errors=_median_errors(group),
                lost=statistics.median(r.lost for r in group),
                x_ceiling=ratio(throughput, ceiling),
                read_throughput=statistics.median(r.read_throughput for r in group),
                read_alone_throughput=statistics.median(r.read_alone_throughput for r in group),
                writer_cpus=_median_or_none(r.writer_cpus for r in group),
                cpu_us_per_write=_median_or_none(r.cpu_us_per_write for r in group),
            )
        )
    return summaries


def ratio(value: float, reference: float | None) -> float | None:
    """``value / reference``, or None when there is no usable reference."""
    if reference is None or reference <= 0 or not math.isfinite(reference):
        return None
    return value / reference


# -- the whole benchmark ------------------------------------------------------------------------


@dataclass
class BenchConfig:
    cells: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_CELLS))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    scenarios: list[str] = field(default_factory=lambda: ["upsert"])
    repeat: int = 3
    context_bytes: int = 2048
    readers: int = 2


def machine_info() -> dict[str, Any]:
    import filelock
    import pydantic
    import pydantic_core

    from . import __version__

    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "mpstore": __version__,
        "filelock": filelock.__version__,
        "pydantic": pydantic.VERSION,
        "pydantic_core": pydantic_core.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def planned(config: BenchConfig) -> list[tuple[str, str, str]]:
    """The (scenario, strategy, mode) triples ``config`` runs in each cell; empty if none fits."""
    return [
        (scenario, s, m)
        for scenario in config.scenarios
        for s in config.strategies
        for m in _modes_for(s, config.modes, scenario)
    ]


def _modes_for(strategy: str, modes: Sequence[str], scenario: str) -> list[str]:
    if strategy in CEILINGS:
        return [SINGLE]
    if strategy in HANDOFF and (scenario == "modify" or not _PROCESS_HANDOFF):
        # Between processes a write travels as data: a read-then-write callback cannot.
        return [m for m in modes if m == "threads"]
    return list(modes)


def run_bench(
    config: BenchConfig,
    on_cell: Callable[[list[Summary]], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every cell of ``config``; returns the JSON document (machine, config, runs, summary).

    Repetitions of a cell interleave the strategies, so slow drift of a noisy machine hits them
    all alike. ``on_cell`` receives each cell's summary rows as soon as the cell is done.
    """
    started = time.perf_counter()
    runs: list[RunResult] = []
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="mpstore-bench-"))
        pool = None
        if "processes" in config.modes and set(config.strategies) & {*CONCURRENT, *HANDOFF}:
            if progress is not None:
                progress("starting the worker processes")
            shapes = [
                (workers + (config.readers if scenario == "mixed" else 0), workers)
                for scenario in config.scenarios
                for workers, _ in config.cells
            ]
            if "mixed" in config.scenarios and config.readers:
                shapes.append(_readers_shape(config.readers))
            pool = stack.enter_context(ProcessPool(max(p for p, _ in shapes), shapes))
        for scenario in config.scenarios:
            for workers, writes in config.cells:
                cell_runs: list[RunResult] = []
                for repetition in range(config.repeat):
                    for strategy in config.strategies:
                        for mode in _modes_for(strategy, config.modes, scenario):
                            if progress is not None:
                                progress(
                                    f"{scenario} {workers}x{writes} rep {repetition + 1}/"
                                    f"{config.repeat}: {strategy} ({mode})"
                                )
                            run = run_one(
                                strategy,
                                mode,
                                scenario,
                                workers,
                                writes,
                                repetition,
                                config.context_bytes,
                                config.readers,
                                directory,
                                pool,
                            )
                            cell_runs.append(run)
                runs.extend(cell_runs)
                if on_cell is not None:
                    on_cell(summarize(cell_runs))
    return {
        "machine": machine_info(),
        "config": asdict(config),
        "wall_time_s": time.perf_counter() - started,
        "runs": [asdict(r) for r in runs],
        "summary": [asdict(s) for s in summarize(runs)],
    }


# -- presentation -------------------------------------------------------------------------------

_HEADER = (
    f"{'scenario':<8} {'mode':<9} {'cell':>7} {'strategy':<15} {'writes/s':>9} {'p50 ms':>7} "
    f"{'p99 ms':>8} {'max ms':>8} {'x ceil':>6} {'cpu us/w':>8} {'lost':>5}  errors"
)


def format_row(s: Summary) -> str:
    errors = ", ".join(f"{k} {v:g}" for k, v in s.errors.items()) or "0"
    x = f"{s.x_ceiling:.2f}" if s.x_ceiling is not None else "-"
    cpu = f"{s.cpu_us_per_write:,.0f}" if s.cpu_us_per_write is not None else "-"
    line = (
        f"{s.scenario:<8} {s.mode:<9} {f'{s.workers}x{s.writes}':>7} {s.strategy:<15} "
        f"{s.throughput:>9,.0f} {s.p50_ms:>7.2f} {s.p99_ms:>8.2f} {s.max_ms:>8.2f} {x:>6} "
        f"{cpu:>8} {s.lost:>5g}  {errors}"
    )
    if s.scenario == "mixed" and s.mode != SINGLE:
        line += f"  reads/s {s.read_throughput:,.0f}"
        alone = ratio(s.read_throughput, s.read_alone_throughput)
        if alone is not None:
            line += f" ({alone:.2f}x of {s.read_alone_throughput:,.0f} alone)"
        if s.writer_cpus is not None:
            line += f"; writers kept {s.writer_cpus:.2f} CPUs busy"
    return line


def format_table(summaries: Iterable[Summary]) -> str:
    return "\n".join([_HEADER, *(format_row(s) for s in summaries)])


class PlotUnavailable(RuntimeError):
    """matplotlib (the ``bench`` extra) is not installed."""


def check_plotting() -> None:
    """:raises PlotUnavailable: matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'mpstore[bench]'") from None


def plot(document: dict[str, Any], path: str) -> None:
    """Throughput and p99 against workers, one line per strategy and writes-per-worker."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [Summary(**s) for s in document["summary"]]
    scenarios = sorted({s.scenario for s in summaries})
    modes = [m for m in MODES if any(s.mode == m for s in summaries)] or [SINGLE]
    rows = 2 * len(scenarios)
    fig, axes = plt.subplots(rows, len(modes), figsize=(6 * len(modes), 4.5 * rows), squeeze=False)
    styles = {10: "-", 100: "--"}
    palette = ("tab:blue", "tab:red", "tab:orange", "black", "tab:gray", "tab:green")
    colors = dict(zip(STRATEGIES, palette, strict=True))
    for si, scenario in enumerate(scenarios):
        for mi, mode in enumerate(modes):
            top, bottom = axes[2 * si][mi], axes[2 * si + 1][mi]
            for strategy in STRATEGIES:
                mine = [
                    s
                    for s in summaries
                    if (s.scenario, s.strategy) == (scenario, strategy) and s.mode in (mode, SINGLE)
                ]
                for writes in sorted({s.writes for s in mine}):
                    line = sorted((s for s in mine if s.writes == writes), key=lambda s: s.workers)
                    xs = [s.workers for s in line]
                    label = f"{strategy} x{writes}"
                    style = styles.get(writes, ":")
                    marker = "o" if writes == min(s.writes for s in mine) else "s"
                    look = {"color": colors[strategy], "marker": marker, "label": label}
                    top.plot(xs, [s.throughput for s in line], style, **look)
                    bottom.plot(xs, [s.p99_ms for s in line], style, **look)
            top.set_title(f"{scenario}, {mode}: throughput (median)")
            top.set_ylabel("writes/s")
            bottom.set_title(f"{scenario}, {mode}: p99 latency (median)")
            bottom.set_ylabel("ms")
            bottom.set_yscale("log")
            for ax in (top, bottom):
                ax.set_xlabel("concurrent workers")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7)
    machine = document["machine"]
    fig.suptitle(
        f"mpstore bench: {machine['usable_cpus']} CPUs, Python {machine['python']}, "
        f"SQLite {machine['sqlite']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
