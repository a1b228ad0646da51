"""Many real processes on one store: no lock error, no lost write, no lost update."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import select
import signal
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import mpstore
from mpstore.conversations import Conversation, ConversationContext, ConversationRepository
from tests import workers
from tests.models import Note

pytestmark = pytest.mark.processes


def test_16_processes_x_100_upserts(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    barrier = workers.SPAWN.Barrier(16)
    acked = workers.run_processes(
        workers.upsert_conversations, [(path, w, 100, barrier) for w in range(16)]
    )
    with mpstore.Store(path) as store:
        repo = ConversationRepository(store)
        assert repo.conversations.count() == 1600
        stored = set(repo.conversations.keys())
        assert stored == {cid for ids in acked for cid in ids}
        assert len(repo.get_all_conversations(3)) == 100
        assert store.integrity_check() == ["ok"]


def _watched(path: str, wal_limit: int, background: bool) -> tuple[set[str], int, int]:
    """Four processes x 400 upserts; the ids acknowledged, the checkpoints completed under the
    gate and the largest WAL file any of them saw."""
    barrier = workers.SPAWN.Barrier(4)
    results = workers.run_processes(
        workers.upsert_watching_the_wal,
        [(path, w, 400, barrier, wal_limit, background) for w in range(4)],
    )
    acked = {cid for ids, _, _ in results for cid in ids}
    return acked, sum(r[1] for r in results), max(r[2] for r in results)


def test_processes_writing_without_pause_keep_the_wal_within_its_limit(tmp_path: Path) -> None:
    # 1,600 upserts write about 40 MiB of WAL frames; checkpoints outside the gate alone never
    # finish while writers append, and the WAL would keep every frame.
    path = str(tmp_path / "state.db")
    acked, completed, largest = _watched(path, 1 << 20, background=True)
    assert completed >= 1
    assert largest <= 8 << 20, f"the WAL grew to {largest} bytes"
    with mpstore.Store(path) as store:
        assert set(ConversationRepository(store).conversations.keys()) == acked
        assert len(acked) == 1600
        assert store.integrity_check() == ["ok"]


def test_the_wal_bound_test_sees_a_wal_that_is_not_bounded(tmp_path: Path) -> None:
    # Negative control of the test above: a limit never reached, and no checkpoint outside the
    # gate either, leaves every frame in the WAL.
    acked, completed, largest = _watched(str(tmp_path / "state.db"), 1 << 40, background=False)
    assert completed == 0 and len(acked) == 1600
    assert largest > 8 << 20


def test_readers_that_never_pause_leave_the_wal_within_a_few_limits(tmp_path: Path) -> None:
    # A reader still reading from the WAL keeps the next write from starting it over; two
    # processes reading one short transaction after another defeated most tries, and each
    # try then waited for the WAL to double: 73-241 MiB in 8 s with a 1 MiB limit.
    path = str(tmp_path / "state.db")
    limit = 1 << 20
    with mpstore.Store(path, wal_limit=limit) as store:
        notes = store.collection("notes", Note, key="id")
        for i in range(200):
            notes.upsert(Note(id=str(i), text="y"))
        started, stop = workers.SPAWN.Semaphore(0), workers.SPAWN.Event()
        readers = [
            workers.SPAWN.Process(target=workers.read_without_pause, args=(path, started, stop))
            for _ in range(2)
        ]
        for reader in readers:
            reader.start()
        try:
            for _ in readers:
                assert started.acquire(timeout=workers.JOIN_TIMEOUT)
            largest = 0
            for i in range(12000):
                notes.upsert(Note(id=str(i % 200), text=str(i) + "x" * 3000))
                largest = max(largest, os.path.getsize(path + "-wal"))
        finally:
            stop.set()
            for reader in readers:
                reader.join(workers.JOIN_TIMEOUT)
        assert all(reader.exitcode == 0 for reader in readers)
        completed = store.stats()["checkpoints_completed"]
    assert completed >= 1
    assert largest <= 24 * limit, f"the WAL grew to {largest} bytes ({completed} checkpoints)"


def _shared_conversation(path: str) -> None:
    with mpstore.Store(path) as store:
        ConversationRepository(store).upsert_conversation(
            Conversation(conversation_id="shared", workspace_id=1, context=ConversationContext())
        )


def _messages(path: str) -> int:
    with mpstore.Store(path) as store:
        conv = ConversationRepository(store).get_conversation("shared")
        assert conv is not None and conv.context is not None
        return len(conv.context.messages)


def test_8_processes_x_50_modify_lose_no_update(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    _shared_conversation(path)
    barrier = workers.SPAWN.Barrier(8)
    workers.run_processes(workers.append_messages, [(path, w, 50, barrier) for w in range(8)])
    assert _messages(path) == 400


def test_get_then_upsert_loses_updates(tmp_path: Path) -> None:
    # The negative control: the reference app's unlocked modify, same workload, loses updates.
    path = str(tmp_path / "state.db")
    _shared_conversation(path)
    barrier, race = workers.SPAWN.Barrier(8), workers.SPAWN.Barrier(8)
    workers.run_processes(
        workers.append_messages_unlocked, [(path, w, 50, barrier, race) for w in range(8)]
    )
    assert _messages(path) < 400


def test_16_processes_create_one_new_database(tmp_path: Path) -> None:
    path = str(tmp_path / "fresh.db")
    barrier = workers.SPAWN.Barrier(16)
    created = workers.run_processes(workers.open_store, [(path, barrier) for _ in range(16)])
    assert sum(created) == 1
    with mpstore.Store(path) as store:
        assert store.query("SELECT count(*) FROM _mpstore_meta WHERE key='schema_version'") == [
            (1,)
        ]
        assert store.collections() == {"notes": 0}


def test_store_pickled_into_spawn_children(tmp_path: Path) -> None:
    with mpstore.Store(str(tmp_path / "state.db")) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="parent-before", text="x"))
        workers.run_processes(workers.write_rows_with_store, [(store, w, 20) for w in range(3)])
        notes.upsert(Note(id="parent-after", text="x"))
        assert notes.count() == 3 * 20 + 2


def _in_a_forked_child(body: Callable[[], str]) -> str:
    """Run ``body`` in a forked child; what it returned, or the error it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            out = body()
        except BaseException as exc:
            out = f"child raised {type(exc).__name__}: {exc}"
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read().decode()
    os.waitpid(pid, 0)
    return out


def _with_every_connection_open(store: mpstore.Store) -> mpstore.Collection[Note]:
    """A store whose pooled read connection, write connection and checkpoint thread's
    connection are all open, as they are in a process that has been writing a while."""
    notes = store.collection("notes", Note, key="id")
    checkpointer = store._checkpointer
    checkpointer.threshold = 1
    notes.upsert(Note(id="p", text="x"))
    checkpointer.poke()
    assert checkpointer.ran.wait(workers.JOIN_TIMEOUT), "no checkpoint ran"
    assert notes.get("p") is not None
    checkpointer.threshold = 10**9
    return notes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="reads /proc/locks")
def test_a_forked_child_holds_sqlites_locks_on_the_file(tmp_path: Path) -> None:
    # SQLite keeps one record per file and process of the locks held, shared by every
    # connection to the file: a child's connection opened beside one inherited from the parent
    # believes the parent's locks are its own, and never takes them.
    path = str(tmp_path / "state.db")
    with mpstore.Store(path) as store:
        notes = _with_every_connection_open(store)

        def child() -> str:
            notes.upsert(Note(id="c", text="y"))
            assert notes.get("c") is not None
            me = os.getpid()
            held = (workers.locks_held(me, path), workers.locks_held(me, path + "-shm"))
            return repr(tuple(bool(h) for h in held))

        assert _in_a_forked_child(child) == "(True, True)"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_a_forked_childs_writes_survive_the_parent_closing_its_store(tmp_path: Path) -> None:
    # Without locks of its own, the child is invisible to the parent's last close, which
    # checkpoints and removes the WAL under the child: its later commits were lost.
    path = str(tmp_path / "state.db")
    store = mpstore.Store(path)
    notes = _with_every_connection_open(store)
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.close(ready_r)
        code = 1
        try:
            notes.upsert(Note(id="c1", text="y"))
            os.write(ready_w, b"1")
            os.read(go_r, 1)  # the parent has closed its store
            for i in range(2, 6):
                notes.upsert(Note(id=f"c{i}", text="y"))
            code = 0
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    store.close()
    os.write(go_w, b"1")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with contextlib.closing(sqlite3.connect(path)) as conn:
        keys = [key for (key,) in conn.execute("SELECT key FROM notes ORDER BY key")]
    assert keys == ["c1", "c2", "c3", "c4", "c5", "p"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_a_child_forked_while_another_thread_is_in_sqlite_does_not_hang(tmp_path: Path) -> None:
    # Closing a connection takes SQLite's process-wide mutexes, which a thread of the parent
    # may hold at the fork: the fork hooks must not, or a child that never touches the store
    # hangs in them.
    with mpstore.Store(str(tmp_path / "state.db"), pool_size=2) as store:
        _with_every_connection_open(store)
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                store.query(
                    "WITH RECURSIVE r(i, b) AS (SELECT 1, randomblob(64) UNION ALL "
                    "SELECT i + 1, randomblob(64) FROM r WHERE i < 2000) "
                    "SELECT length(group_concat(hex(b))) FROM r"
                )

        reader = threading.Thread(target=read)
        reader.start()
        outcomes = []
        try:
            for _ in range(60):
                read_end, write_end = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.write(write_end, b"1")  # past the fork hooks
                    os._exit(0)
                os.close(write_end)
                # A healthy child is done in milliseconds: 10 s without a word is a hang.
                ready, _, _ = select.select([read_end], [], [], 10.0)
                os.close(read_end)
                if not ready:
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                outcomes.append(bool(ready))
        finally:
            stop.set()
            reader.join()
    assert all(outcomes) and len(outcomes) == 60


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_a_child_forked_inside_a_read_block_never_pools_the_parents_connection(
    tmp_path: Path,
) -> None:
    with mpstore.Store(str(tmp_path / "state.db"), pool_size=2) as store:
        store.collection("notes", Note, key="id").upsert(Note(id="p", text="x"))
        read_end, write_end = os.pipe()
        with store.read() as conn:
            parents = conn._conn
            child_pid = os.fork()
        if child_pid == 0:
            # Out of the block: its connection went back to a pool that is not its own.
            pool = store._pool
            state = (any(c is parents for c in pool._idle), pool.in_use, pool._slots._value)
            store.query("SELECT 1")
            os.write(write_end, repr(state).encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            outcome = pipe.read().decode()
        os.waitpid(child_pid, 0)
    assert outcome == "(False, 0, 2)"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_a_child_forked_while_another_thread_writes_is_told_it_cannot_write(
    tmp_path: Path,
) -> None:
    # SQLite keeps the parent's write locks in the child's memory, for every connection to
    # the file: the child's writes could only time out as "busy". It is told why, at once.
    path = str(tmp_path / "state.db")
    with mpstore.Store(path, timeout=2.0) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="p", text="x"))
        inside, leave = threading.Event(), threading.Event()

        def write_until_told() -> None:
            with store.write() as conn:
                conn.execute("DELETE FROM notes WHERE key = 'nobody'")
                inside.set()
                assert leave.wait(60)

        writer = threading.Thread(target=write_until_told)
        writer.start()
        assert inside.wait(60)
        kept = store._wconn
        read_end, write_end = os.pipe()
        child_pid = os.fork()
        if child_pid == 0:
            outcomes = []
            # A grandchild must not close that connection either: its mutex may be held.
            grandchild_pid = os.fork()
            if grandchild_pid == 0:
                from mpstore import _fork

                closing = any(conn is kept for conn in _fork._inherited)
                os._exit(1 if closing or store._wconn is not None else 0)
            _, status = os.waitpid(grandchild_pid, 0)
            outcomes.append(f"grandchild {os.waitstatus_to_exitcode(status)}")
            for store_of_child in (store, mpstore.Store(path, timeout=2.0)):
                try:
                    store_of_child.collection("notes", Note, key="id").upsert(Note(id="c", text=""))
                    outcomes.append("wrote")
                except mpstore.TransactionError as exc:
                    outcomes.append("told" if "forked while another thread" in str(exc) else "?")
                except mpstore.MpstoreError as exc:
                    outcomes.append(type(exc).__name__)
            outcomes.append("read" if notes.get("p") is not None else "no read")
            os.write(write_end, repr(outcomes).encode())
            os._exit(0)
        os.close(write_end)
        leave.set()
        writer.join()
        with os.fdopen(read_end, "rb") as pipe:
            outcome = pipe.read().decode()
        os.waitpid(child_pid, 0)
    assert outcome == "['grandchild 0', 'told', 'told', 'read']"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_fork_after_open_parent_and_child_write_at_once(tmp_path: Path) -> None:
    with mpstore.Store(str(tmp_path / "state.db")) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="before-fork", text="x"))
        fork = mp.get_context("fork")
        # Fork while this thread holds the gate and an open transaction: the child must not
        # inherit either (it would deadlock or write into the parent's transaction).
        with store.write() as conn:
            conn.execute(
                "INSERT INTO notes (key, value) VALUES (?, ?)",
                ("in-block", Note(id="in-block", text="x").model_dump_json()),
            )
            child = fork.Process(target=workers.write_rows_with_store, args=(store, 1, 50))
            child.start()
        workers.write_rows_with_store(store, 0, 50)
        child.join(120)
        assert child.exitcode == 0
        assert notes.count() == 2 + 2 * 50
        assert store.integrity_check() == ["ok"]
