"""Code that runs inside child processes, and the helper that starts and collects them.

Children are started with the ``spawn`` method (a fresh interpreter, as subagents are), so every
target here is a module-level function that the child imports by name.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import mpstore
from mpstore._gate import drop_gate, gate_for
from mpstore._mailbox import PUBLISHED, SLOTS
from mpstore.conversations import ConversationRepository, Message, sample_conversation
from tests.models import Note

SPAWN = mp.get_context("spawn")
JOIN_TIMEOUT = 120.0


def _report(queue: Any, worker: int, fn: Callable[..., Any], args: Sequence[Any]) -> None:
    try:
        queue.put((worker, "ok", fn(*args)))
    except BaseException as exc:  # reported to the parent, which fails the test with it
        queue.put((worker, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_processes(fn: Callable[..., Any], args_per_worker: Sequence[Sequence[Any]]) -> list[Any]:
    """Run ``fn(*args)`` in one spawned process per entry; return results in worker order.

    :raises AssertionError: a worker raised (its traceback is in the message) or exited badly.
    """
    return run_tasks([(fn, args) for args in args_per_worker])


def run_tasks(tasks: Sequence[tuple[Callable[..., Any], Sequence[Any]]]) -> list[Any]:
    """Run each ``fn(*args)`` in its own spawned process; return results in task order."""
    queue = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_report, args=(queue, i, fn, args))
        for i, (fn, args) in enumerate(tasks)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    for _ in procs:
        worker, status, value = queue.get(timeout=JOIN_TIMEOUT)
        if status == "ok":
            results[worker] = value
        else:
            errors.append(f"worker {worker}: {value}")
    for p in procs:
        p.join(JOIN_TIMEOUT)
        assert p.exitcode == 0, f"worker pid {p.pid} exited with {p.exitcode}"
    assert not errors, "\n".join(errors)
    return [results[i] for i in range(len(procs))]


# -- workloads -------------------------------------------------------------------------------


def upsert_conversations(path: str, worker: int, count: int, barrier: Any) -> list[str]:
    """Upsert ``count`` 2 KiB conversations; return the ids acknowledged."""
    with mpstore.Store(path) as store:
        repo = ConversationRepository(store)
        records = [sample_conversation(f"w{worker}-{i}", workspace_id=worker) for i in range(count)]
        barrier.wait()
        done = []
        for record in records:
            repo.upsert_conversation(record)
            done.append(record.conversation_id)
        return done


def upsert_watching_the_wal(
    path: str, worker: int, count: int, barrier: Any, wal_limit: int, background: bool
) -> tuple[list[str], int, int]:
    """Upsert ``count`` 2 KiB conversations through a store with ``wal_limit`` (and, unless
    ``background``, no background checkpoints); return the ids acknowledged, the checkpoints
    this process completed under the gate, and the largest WAL file it saw after a write."""
    with mpstore.Store(path, wal_limit=wal_limit) as store:
        if not background:
            store._checkpointer.threshold = 1 << 62
        repo = ConversationRepository(store)
        records = [sample_conversation(f"w{worker}-{i}", workspace_id=worker) for i in range(count)]
        barrier.wait()
        done, largest = [], 0
        for record in records:
            repo.upsert_conversation(record)
            done.append(record.conversation_id)
            largest = max(largest, os.path.getsize(path + "-wal"))
        return done, store.stats()["checkpoints_completed"], largest


def read_without_pause(path: str, started: Any, stop: Any) -> int:
    """Read the notes in short transactions, one after the other, until ``stop``; how many."""
    with mpstore.Store(path) as store:
        reads = 0
        started.release()
        while not stop.is_set():
            with store.read() as conn:
                conn.execute("SELECT count(*) FROM notes").fetchone()
            reads += 1
        return reads


def append_messages(path: str, worker: int, count: int, barrier: Any) -> int:
    """Append ``count`` messages to the shared conversation with modify_conversation."""
    with mpstore.Store(path) as store:
        repo = ConversationRepository(store)
        barrier.wait()
        for i in range(count):
            repo.modify_conversation("shared", _appender(f"w{worker}-{i}"))
        return count


def append_messages_unlocked(path: str, worker: int, count: int, barrier: Any, race: Any) -> int:
    """The reference app's modify: get, change, upsert, with nothing holding the two together.

    ``race`` lines all workers up between their first get and upsert, so the lost update this
    control exists to show happens on every run rather than by luck of scheduling.
    """
    with mpstore.Store(path) as store:
        repo = ConversationRepository(store)
        barrier.wait()
        for i in range(count):
            current = repo.get_conversation("shared")
            assert current is not None
            if i == 0:
                race.wait()
            repo.upsert_conversation(_appender(f"w{worker}-{i}")(current))
        return count


def _appender(text: str) -> Callable[[Any], Any]:
    def append(conv: Any) -> Any:
        assert conv.context is not None
        messages = [*conv.context.messages, Message(role="user", content=text)]
        return conv.model_copy(
            update={"context": conv.context.model_copy(update={"messages": messages})}
        )

    return append


def open_store(path: str, barrier: Any) -> bool:
    """Open ``path`` at the same instant as the others; True if this process made the schema."""
    barrier.wait()
    with mpstore.Store(path) as store:
        store.collection("notes", Note, key="id")
        return store.created_schema


class _NoGate:
    """A stand-in gate that excludes nobody: the negative control for mutual exclusion."""

    def acquire(self, timeout: float) -> float:
        return 0.0

    def release(self) -> None:
        pass


def critical_sections(lock_path: str, rounds: int, barrier: Any, log: str, kind: str) -> int:
    """Enter and leave a critical section ``rounds`` times, logging both with O_APPEND writes.

    Appends are atomic and totally ordered, so the log itself shows whether two sections ever
    overlapped, with no clocks involved.
    """
    gate: Any = _NoGate() if kind == "none" else gate_for(lock_path, 0o600, kind)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    pid = os.getpid()
    barrier.wait()
    try:
        for i in range(rounds):
            gate.acquire(30.0)
            try:
                os.write(fd, f"E {pid} {i}\n".encode())
                os.stat(log)
                os.write(fd, f"X {pid} {i}\n".encode())
            finally:
                gate.release()
    finally:
        os.close(fd)
        if kind != "none":
            drop_gate(gate)
    return rounds


def overlaps(log: str) -> int:
    """How many times a section was entered while another was open, read from the log."""
    count = 0
    inside: str | None = None
    with open(log) as f:
        for line in f:
            kind, pid, _ = line.split()
            if kind == "E":
                if inside is not None:
                    count += 1
                inside = pid
            elif inside == pid:
                inside = None
    return count


def logged_writes(path: str, rounds: int, barrier: Any, log: str) -> int:
    """Write ``rounds`` rows, logging entry and exit of each write block to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    pid = os.getpid()
    with mpstore.Store(path, timeout=30) as store:
        with store.write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS sections (pid INTEGER, i INTEGER)")
        barrier.wait()
        for i in range(rounds):
            with store.write() as conn:
                os.write(fd, f"E {pid} {i}\n".encode())
                conn.execute("INSERT INTO sections VALUES (?, ?)", (pid, i))
                os.write(fd, f"X {pid} {i}\n".encode())
    os.close(fd)
    return rounds


def churn_lock_file(lock_path: str, change: str, barrier: Any, times: int) -> int:
    """Delete (or replace with a new file) the lock file ``times`` times while others write."""
    barrier.wait()
    for i in range(times):
        if change == "delete":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
        else:
            tmp = f"{lock_path}.{i}.tmp"
            with open(tmp, "w"):
                pass
            os.replace(tmp, lock_path)
        os.sched_yield()
    return times


@contextlib.contextmanager
def held_by_another_thread(enter: Callable[[], AbstractContextManager[Any]]) -> Iterator[None]:
    """Keep ``enter()`` entered in a thread of its own for the length of the block.

    :raises AssertionError: the thread could not enter it, or failed while inside.
    """
    entered, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with enter():
                entered.set()
                release.wait()
        except BaseException as exc:
            errors.append(exc)
            entered.set()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(JOIN_TIMEOUT) and not errors, errors
        yield
    finally:
        release.set()
        thread.join()
    assert not errors, errors


@dataclass
class Holder:
    """A child process that holds the gate mid-transaction; ``release`` lets it commit."""

    process: Any
    release: Any


def pending_writes(store: mpstore.Store) -> int:
    """Writes of this process waiting for the gate: queued, or left in the mailbox."""
    mailbox = store._gate.mailbox()
    published = 0
    if mailbox is not None:
        published = sum(mailbox.state(i) == PUBLISHED for i in range(SLOTS))
    return len(store._queue._jobs) + published


@contextlib.contextmanager
def holding_the_gate(path: str, then: Note | None = None) -> Iterator[Holder]:
    """Run :func:`hold_write` in a spawned child for the length of the block; once released,
    the child upserts ``then`` (if given) into the collection "notes" before it commits.

    :raises AssertionError: the child never took the gate.
    """
    started, release = SPAWN.Event(), SPAWN.Event()
    process = SPAWN.Process(target=hold_write, args=(path, started, release, then))
    process.start()
    try:
        assert started.wait(JOIN_TIMEOUT), "the holder never took the gate"
        yield Holder(process, release)
    finally:
        # Setting a multiprocessing Event blocks until its sleepers wake, and a killed sleeper
        # never does: only tell a live holder.
        if process.is_alive():
            release.set()
        process.join(JOIN_TIMEOUT)


@contextlib.contextmanager
def stopped(process: Any) -> Iterator[None]:
    """Stop a child process (as Ctrl-Z does) for the length of the block; it goes on after."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        _, status = os.waitpid(process.pid, os.WUNTRACED)  # returns once the child is stopped
        assert os.WIFSTOPPED(status), f"the child did not stop: status {status}"
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


@contextlib.contextmanager
def filelock_held_elsewhere(lock_path: str) -> Iterator[None]:
    """Hold ``lock_path`` with a plain ``filelock.FileLock`` (which leaves no hint in the
    mailbox) in a spawned child for the length of the block."""
    started, release = SPAWN.Event(), SPAWN.Event()
    process = SPAWN.Process(target=hold_with_filelock, args=(lock_path, started, release))
    process.start()
    try:
        assert started.wait(JOIN_TIMEOUT), "the filelock holder never took the lock"
        yield
    finally:
        release.set()
        process.join(JOIN_TIMEOUT)


def hold_with_filelock(lock_path: str, started: Any, release: Any) -> None:
    """Hold the lock file with a plain ``filelock.FileLock`` until told."""
    import filelock

    with filelock.FileLock(lock_path):
        started.set()
        release.wait(60)


def hold_write(path: str, started: Any, release: Any, then: Note | None = None) -> None:
    """Write a row inside a write block, then wait there until told (or killed); upsert
    ``then`` into the collection "notes" in the same block, if given."""
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id") if then is not None else None
        with store.write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS held (x TEXT)")
            conn.execute("INSERT INTO held VALUES ('uncommitted')")
            started.set()
            release.wait()
            if notes is not None and then is not None:
                notes.upsert(then)


def write_rows_with_store(store: mpstore.Store, worker: int, count: int) -> int:
    """Write through a Store received by pickling (spawn) or inherited (fork)."""
    notes = store.collection("notes", Note, key="id")
    for i in range(count):
        notes.upsert(Note(id=f"{worker}-{i}", text="x"))
    return count


def _linger(release: Any) -> None:
    release.wait(JOIN_TIMEOUT)


def hold_write_and_fork(path: str, started: Any, release: Any, child_release: Any) -> None:
    """Hold the gate mid-transaction, fork a child that never touches the store, then wait.

    The test kills this process: the gate must come free although the child lives on.
    """
    with mpstore.Store(path) as store, store.write() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS held (x TEXT)")
        child = mp.get_context("fork").Process(target=_linger, args=(child_release,))
        child.start()
        started.set()
        release.wait()


def wal_index_in_use_elsewhere(db_path: str) -> bool:
    """Whether another process would find ``db_path``'s WAL index in use, as SQLite does when it
    opens the database: by trying to lock the index's "dead man switch" byte exclusively. One
    that gets it takes itself for the only user and rebuilds the index."""
    code = (
        "import fcntl, os, sys\n"
        "try:\n"
        "    fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "except FileNotFoundError:\n"
        "    sys.exit(0)\n"
        "try:\n"
        "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)\n"
        "except OSError:\n"
        "    sys.exit(3)\n"
        "sys.exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, db_path + "-shm"], check=False)
    assert done.returncode in (0, 3), done
    return done.returncode == 3


def open_descriptors_on(path: str) -> int:
    """How many of this process's descriptors refer to ``path``, or to a file deleted from
    there (Linux)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") in (path, path + " (deleted)"):
                count += 1
    return count


def report_from_forked_child(report: Callable[[], bytes]) -> bytes:
    """Fork; the child sends what ``report()`` returns (or the error it raised) and exits at
    once, running no cleanup of the parent's; return what the child sent."""
    read, write = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                out = report()
            except BaseException as exc:
                out = f"raised {exc!r}".encode()
            finally:
                os.write(write, locals().get("out", b"raised"))
                os._exit(0)
        os.close(write)
        write = -1
        out = b""
        while chunk := os.read(read, 4096):
            out += chunk
        assert os.waitpid(pid, 0)[1] == 0
        return out
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


def locks_held(pid: int, path: str) -> list[str]:
    """The kernel's POSIX locks of process ``pid`` on the file at ``path`` (/proc/locks)."""
    inode = os.stat(path).st_ino
    with open("/proc/locks") as table:
        return [
            line
            for line in table
            if "->" not in line
            and line.split()[4] == str(pid)
            and line.split()[5].endswith(f":{inode}")
        ]
