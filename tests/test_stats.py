"""store.stats(), the WAL checkpoints that run outside the gate, and the WAL's bound."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import select
import signal
import sqlite3
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pytest

import mpstore
from mpstore import _checkpoint, _fork, _proc
from mpstore._stats import COUNTERS
from mpstore.conversations import ConversationRepository, sample_conversation
from tests import workers
from tests.models import Note


def test_counters_and_timings_follow_the_writes(store: mpstore.Store) -> None:
    notes = store.collection("notes", Note, key="id")
    before = store.stats()
    for i in range(10):
        notes.upsert(Note(id=str(i), text="x"))
    with pytest.raises(ValueError), store.write():
        raise ValueError
    notes.get("1")
    after = store.stats()
    assert after["commits"] - before["commits"] == 10
    assert after["rollbacks"] - before["rollbacks"] == 1
    assert after["writes_batched"] == 0  # each ran alone: nothing shared its transaction
    for timing in ("gate_wait", "gate_hold", "transaction", "pool_wait"):
        summary = after[timing]
        assert summary["count"] >= 10 if timing != "pool_wait" else summary["count"] >= 1
        assert 0 <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]


def test_a_new_store_reports_every_counter(store: mpstore.Store) -> None:
    stats = store.stats()
    documented = re.findall(r"``(\w+)``", mpstore.Store.stats.__doc__ or "")
    for counter in (*COUNTERS, "checkpoints", "checkpoints_completed", "checkpoint_errors"):
        # Only the commit that set up the new file has happened.
        assert stats[counter] == (1 if counter == "commits" else 0), counter
        assert counter in documented, f"Store.stats() does not document {counter!r}"


def test_timeouts_are_counted(db_path: str) -> None:
    with mpstore.Store(db_path, timeout=0.1, pool_size=1) as store:
        notes = store.collection("notes", Note, key="id")
        caught: list[BaseException] = []

        def upsert() -> None:
            try:
                notes.upsert(Note(id="a", text="x"))
            except mpstore.GateTimeout as exc:
                caught.append(exc)

        with store.write():
            t = threading.Thread(target=upsert)
            t.start()
            t.join()
        with workers.held_by_another_thread(store.read), pytest.raises(mpstore.PoolTimeout):
            store.query("SELECT 1")
        stats = store.stats()
        assert len(caught) == 1
        assert stats["gate_timeouts"] == 1
        assert stats["pool_timeouts"] == 1


def test_queued_writes_are_group_committed_and_counted(store: mpstore.Store) -> None:
    notes = store.collection("notes", Note, key="id")
    queued = threading.Barrier(9)
    threads = []
    with store.write():
        # While this thread holds the gate, eight writers queue behind it.
        for i in range(8):
            t = threading.Thread(
                target=lambda i=i: (queued.wait(), notes.upsert(Note(id=f"q{i}", text="x")))
            )
            t.start()
            threads.append(t)
        queued.wait()
        while workers.pending_writes(store) < 8:
            os.sched_yield()  # until all eight have queued; they cannot run before we leave
    for t in threads:
        t.join()
    stats = store.stats()
    assert notes.count() == 8
    assert stats["writes_batched"] == 8
    assert stats["batch_size"]["max"] == 8


def test_a_queued_write_alone_in_its_transaction_is_no_group_commit(store: mpstore.Store) -> None:
    notes = store.collection("notes", Note, key="id")
    with store.write():
        writer = threading.Thread(target=notes.upsert, args=(Note(id="q", text="x"),))
        writer.start()
        while workers.pending_writes(store) < 1:
            os.sched_yield()  # queued behind this block, alone
    writer.join()
    stats = store.stats()
    assert notes.count() == 1 and stats["commits"] >= 2
    assert stats["writes_batched"] == 0 and stats["batch_size"]["count"] == 0


def test_wal_is_checkpointed_outside_the_gate(db_path: str) -> None:
    with mpstore.Store(db_path) as store:
        repo = ConversationRepository(store)
        with store.write() as conn:
            # The write connection leaves checkpoints to the background thread.
            assert conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
            # ... and cuts a WAL file it starts over back to the store's limit.
            assert conn.execute("PRAGMA journal_size_limit").fetchone() == (store.wal_limit,)
        # ... which writers wake only once they have let the gate go.
        poke, gate = store._checkpointer.poke, store._gate
        holding: list[bool] = []

        def noted_poke(*args: Any) -> None:
            holding.append(gate.held_by_me)
            poke(*args)

        store._checkpointer.poke = noted_poke  # type: ignore[method-assign]
        for i in range(2000):
            repo.upsert_conversation(sample_conversation(f"c{i}", context_bytes=8192))
            if store._checkpointer.ran.is_set():
                break
        checkpointer = store._checkpointer
        assert checkpointer.ran.wait(30), "no checkpoint ran after the WAL grew"
        pending = checkpointer.pending()
        assert pending is not None
        if pending >= checkpointer.threshold:
            # The writes made while that checkpoint ran (a slow one, on a busy machine) grew
            # the WAL again; with none in flight, the next one must bring it down.
            checkpointer.ran.clear()
            checkpointer.poke()
            assert checkpointer.ran.wait(30), "no checkpoint ran after the WAL grew again"
            pending = checkpointer.pending()
        assert store.stats()["checkpoints"] >= 1
        assert store.stats()["checkpoint_errors"] == 0
        assert pending is not None and pending < checkpointer.threshold
        assert holding and not any(holding)


_reads_proc = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc (Linux)"
)


_LIMIT = 1 << 20  # bytes: 256 frames of 4 KiB pages


def _largest_wal(store: mpstore.Store, writes: int) -> int:
    """Upsert ``writes`` 2 KiB conversations without checkpoints outside the gate; the largest
    the WAL file grew."""
    store._checkpointer.threshold = 1 << 62
    repo = ConversationRepository(store)
    largest = 0
    for i in range(writes):
        repo.upsert_conversation(sample_conversation(f"c{i}"))
        largest = max(largest, os.path.getsize(store.path + "-wal"))
    return largest


def test_writes_without_pause_keep_the_wal_within_its_limit(db_path: str) -> None:
    # Nothing copies frames back but the gate holder: 600 writes would leave 14 MiB of them.
    with mpstore.Store(db_path, wal_limit=_LIMIT) as store:
        largest = _largest_wal(store, 600)
        assert store.stats()["checkpoints_completed"] >= 1
        assert store.stats()["checkpoint_errors"] == 0
    assert largest <= 4 * _LIMIT, f"the WAL grew to {largest} bytes"


def test_commits_larger_than_the_limit_still_let_the_wal_start_over(db_path: str) -> None:
    # Each batch writes more than the limit, so no look ever finds the WAL under it: the salt
    # says it started over, else each checkpoint would wait for a WAL twice the last one.
    with mpstore.Store(db_path, wal_limit=_LIMIT) as store:
        store._checkpointer.threshold = 1 << 62
        repo = ConversationRepository(store)
        largest = batch = 0
        for round_ in range(30):
            conversations = [
                sample_conversation(f"r{round_}-{i}", context_bytes=4096) for i in range(250)
            ]
            repo.conversations.upsert_many(conversations)
            size = os.path.getsize(db_path + "-wal")
            batch = batch or size
            largest = max(largest, size)
        assert batch > _LIMIT
        assert store.stats()["checkpoints_completed"] >= 10
    assert largest <= 3 * batch + 2 * _LIMIT, f"the WAL grew to {largest}, batches of {batch}"


def test_the_wal_bound_test_sees_a_wal_that_is_not_bounded(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Negative control of the test above: no holder completes a checkpoint.
    with mpstore.Store(db_path, wal_limit=_LIMIT) as store:
        monkeypatch.setattr(store._checkpointer, "complete", lambda conn: False)
        assert _largest_wal(store, 600) > 4 * _LIMIT


def test_a_wal_that_grew_past_its_limit_is_cut_back_when_it_starts_over(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader kept an old snapshot in the WAL, say: once the WAL starts over, its file shrinks
    # to the limit instead of keeping its largest size on disk for good.
    with mpstore.Store(db_path, wal_limit=_LIMIT) as store:
        complete = store._checkpointer.complete
        monkeypatch.setattr(store._checkpointer, "complete", lambda conn: False)
        grown = _largest_wal(store, 300)
        assert grown > 4 * _LIMIT
        monkeypatch.setattr(store._checkpointer, "complete", complete)
        repo = ConversationRepository(store)
        for i in range(100):
            repo.upsert_conversation(sample_conversation(f"again{i}"))
            if os.path.getsize(db_path + "-wal") <= 2 * _LIMIT:
                break
        assert store.stats()["checkpoints_completed"] >= 1
        assert os.path.getsize(db_path + "-wal") <= 2 * _LIMIT


def test_a_checkpoint_is_completed_under_the_gate_between_transactions(db_path: str) -> None:
    with mpstore.Store(db_path, wal_limit=_LIMIT) as store:
        complete, gate = store._checkpointer.complete, store._gate
        seen: list[tuple[bool, bool]] = []

        def noted(conn: sqlite3.Connection) -> bool:
            seen.append((gate.held_by_me, conn.in_transaction))
            return complete(conn)

        notes = store.collection("notes", Note, key="id")
        store._checkpointer.complete = noted  # type: ignore[method-assign]
        notes.upsert(Note(id="1", text="x"))
        with store.write() as conn:
            conn.execute("DELETE FROM notes")
        assert seen == [(True, False), (True, False)]
        # A hold that an error ends leaves it to the next: the error is on its way to the caller.
        with pytest.raises(ValueError), store.write():
            raise ValueError
        with pytest.raises(KeyError):
            notes.update("absent", lambda note: note)
        assert len(seen) == 2


class _Clock:
    now = 100.0

    @classmethod
    def monotonic(cls) -> float:
        return cls.now


def test_a_gate_holder_completes_a_checkpoint_past_the_limit_with_little_left(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What each look at the WAL decides, WAL by WAL: (frames, frames copied back, the WAL's
    salt, whether a checkpoint runs elsewhere, what SQLite's checkpoint answers) -> whether
    the holder ran one. Pages of 4 KiB: a limit of 256 frames, CATCH_UP 256 frames."""
    checkpointer = _checkpoint.Checkpointer(db_path, lambda: sqlite3.connect(db_path), limit=_LIMIT)
    wal: list[_checkpoint._Wal] = []
    running = [False]
    monkeypatch.setattr(checkpointer, "_wal", lambda: wal[-1] if wal else None)
    monkeypatch.setattr(checkpointer, "_running", lambda: running[0])
    monkeypatch.setattr(_checkpoint, "time", _Clock)
    waited: list[int] = []
    monkeypatch.setattr(checkpointer, "_let_readers_finish", lambda: waited.append(len(wal)))
    ran: list[str] = []
    answer: list[tuple[int, int, int]] = []

    class Conn:
        def execute(self, sql: str) -> Any:
            ran.append(sql)
            return types.SimpleNamespace(fetchone=lambda: answer[-1])

    def look(
        frames: int,
        backfilled: int,
        salt: int = 7,
        elsewhere: bool = False,
        answers: tuple[int, int, int] | None = None,
    ) -> bool:
        _Clock.now += _checkpoint.LOOK_EVERY
        wal.append(_checkpoint._Wal(frames, backfilled, 4096, salt))
        running[0] = elsewhere
        answer.append(answers or (0, frames, frames))
        before = len(ran)
        done = checkpointer.complete(Conn())  # type: ignore[arg-type]
        assert len(ran) - before == int(done) or answers is not None
        return done

    assert not look(200, 0)  # under the limit
    assert not look(300, 0)  # past it, but 300 frames left: the background thread copies them
    assert not look(300, 100, elsewhere=True)  # a checkpoint runs: it is left to finish
    assert not look(300, 100, answers=(1, -1, -1))  # one took SQLite's lock meanwhile
    assert look(300, 100)  # 200 left
    # It did not start over (a reader): wait for the WAL to grow by the limit, to 556.
    assert not look(310, 300)
    assert not look(700, 300)  # it has, but 400 left, under 556 + the limit
    assert not look(650, 600, answers=(0, 650, 620))  # a reader held 30 frames back
    assert not look(900, 890)  # so it waits for 650 + 256
    assert look(1350, 1200)
    assert not look(10, 0)  # it started over: the limit applies again
    assert not look(600, 600)  # nothing left: the next write starts it over
    assert look(600, 0)  # grown by the limit past the limit: whatever is left
    # A WAL that started over past the limit (a commit larger than it) shows a new salt.
    assert look(300, 100, salt=8)
    # Each try that readers defeat lets the WAL grow by the limit, not by its size again.
    assert look(580, 570, salt=8)
    assert look(1100, 500, salt=8)  # 580 + 2 x 256 reached: whatever is left
    assert len(ran) == 8 and set(ran) == {"PRAGMA wal_checkpoint(PASSIVE)"}
    # Readers get their moment after each checkpoint that copied every frame.
    assert len(waited) == checkpointer.completed == 6
    # At most one look per interval: a second holder within it reads nothing.
    wal.append(_checkpoint._Wal(5000, 4999, 4096, 9))
    assert not checkpointer.complete(Conn())  # type: ignore[arg-type]
    assert checkpointer.completed == 6


def test_a_holder_gives_readers_of_the_wal_a_moment_to_finish(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = _checkpoint.Checkpointer(db_path, lambda: sqlite3.connect(db_path), limit=_LIMIT)
    readers = [True, True, False, True]
    monkeypatch.setattr(checkpointer, "_readers_in_wal", lambda: readers.pop(0))
    monkeypatch.setattr(_checkpoint, "time", _Clock)
    monkeypatch.setattr(_Clock, "now", 0.0)
    monkeypatch.setattr(_checkpoint, "READERS_WAIT", 0.25)  # binary fractions: sums are exact
    checkpointer._let_readers_finish()
    assert readers == [True]  # stopped once none was left
    looks = [0]

    def still_reading() -> bool:
        looks[0] += 1
        _Clock.now += 0.0625
        return True

    monkeypatch.setattr(checkpointer, "_readers_in_wal", still_reading)
    checkpointer._let_readers_finish()
    assert looks[0] == 4  # no longer than READERS_WAIT


def test_a_reader_that_needs_the_wal_is_seen(db_path: str) -> None:
    with mpstore.Store(db_path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="1", text="x"))
        checkpointer = store._checkpointer
        assert checkpointer.pending()  # frames not copied back: readers read them from the WAL
        assert not checkpointer._readers_in_wal()
        with store.read() as conn:
            assert conn.execute("SELECT count(*) FROM notes").fetchone() == (1,)
            assert checkpointer._readers_in_wal()
        assert not checkpointer._readers_in_wal()
        with contextlib.closing(sqlite3.connect(db_path)) as other:
            other.execute("PRAGMA wal_checkpoint(PASSIVE)")
        assert checkpointer.pending() == 0
        with store.read() as conn:  # every frame is in the database: nothing read from the WAL
            assert conn.execute("SELECT count(*) FROM notes").fetchone() == (1,)
            assert not checkpointer._readers_in_wal()


def test_the_background_thread_runs_again_while_much_is_left_near_the_limit(db_path: str) -> None:
    """Each run copies back what writers appended while the one before ran; from half the
    limit on, the thread runs again (three times at most) until a gate holder's share is left."""
    checkpointer = _checkpoint.Checkpointer(
        db_path, lambda: sqlite3.connect(db_path), limit=4 * _LIMIT
    )  # 1,024 frames
    wal: list[tuple[int, int, int]] = []
    runs: list[str] = []

    class Conn:
        def execute(self, sql: str) -> None:
            runs.append(sql)
            last = wal[-1]  # copied all but the last 50, while 100 were appended
            wal.append(last._replace(frames=last.frames + 100, backfilled=last.frames - 50))

    checkpointer._wal = lambda: wal[-1]  # type: ignore[method-assign]
    wal.append(_checkpoint._Wal(500, 0, 4096, 1))  # under half the limit
    checkpointer._catch_up(Conn())  # type: ignore[arg-type]
    assert runs == []
    wal.append(_checkpoint._Wal(600, 0, 4096, 1))  # 600 left: one more run leaves 150
    checkpointer._catch_up(Conn())  # type: ignore[arg-type]
    assert runs == ["PRAGMA wal_checkpoint(PASSIVE)"]
    assert (wal[-1].frames, wal[-1].backfilled) == (700, 550)
    runs.clear()
    wal.append(_checkpoint._Wal(5000, 0, 4096, 1))

    class Slow(Conn):  # writers outpace every run
        def execute(self, sql: str) -> None:
            runs.append(sql)
            last = wal[-1]
            wal.append(last._replace(frames=last.frames + 1000, backfilled=last.frames - 500))

    checkpointer._catch_up(Slow())  # type: ignore[arg-type]
    assert len(runs) == 3


def test_the_wal_index_gives_the_wal_in_frames_of_the_files_page_size(db_path: str) -> None:
    # The limit is in bytes: the index's frame count times the page size it records, here
    # not SQLite's default.
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("PRAGMA page_size=1024")
        conn.execute("PRAGMA journal_mode=WAL")
    with mpstore.Store(db_path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="1", text="x" * 3000))
        first = store._checkpointer._wal()
        notes.upsert(Note(id="1", text="z" * 3000))
        wal = store._checkpointer._wal()
        assert first is not None and wal is not None and wal.page_size == 1024
        assert wal.salt == first.salt and wal.frames > first.frames  # it grew, not started over
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            busy, log, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert (busy, log) == (0, wal.frames) and wal.frames > wal.backfilled
        # The salt changes when the WAL starts over, which the next write does now.
        notes.upsert(Note(id="2", text="y"))
        again = store._checkpointer._wal()
        assert again is not None and again.salt != wal.salt and again.frames < wal.frames


def _grown(store: mpstore.Store, writes: int) -> None:
    """Grow the WAL by ``writes`` notes of 3 KB, with no checkpoint at all."""
    notes = store.collection("notes", Note, key="id")
    store._checkpointer.threshold = 1 << 62
    store._checkpointer.complete = lambda conn: False  # type: ignore[method-assign]
    for i in range(writes):
        notes.upsert(Note(id=str(i), text="x" * 3000))


def _synced_in_a_run(store: mpstore.Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors ``os.fsync`` was given while the background thread ran once more."""
    synced: list[int] = []
    fsync = os.fsync

    def noted(fd: int) -> None:
        synced.append(fd)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", noted)
    checkpointer = store._checkpointer
    checkpointer.threshold = 1
    checkpointer.ran.clear()
    checkpointer.poke()
    assert checkpointer.ran.wait(workers.JOIN_TIMEOUT), "no checkpoint ran"
    return synced


def _on(path: str) -> Callable[[int], bool]:
    there = os.stat(path)

    def names(fd: int) -> bool:
        here = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    return names


@_reads_proc
def test_past_half_the_limit_each_background_run_syncs_the_database_file(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite syncs the database file only when a checkpoint completes: under writes that never
    # pause, that is the gate holder's, which would sync every page copied since, under the gate.
    with mpstore.Store(db_path, wal_limit=_LIMIT) as store:
        _grown(store, 1)
        assert not any(map(_on(db_path), _synced_in_a_run(store, monkeypatch)))
        _grown(store, 150)
        descriptors = workers.open_descriptors_on(db_path)
        inode = os.stat(db_path).st_ino
        assert _proc.holds_lock("POSIX", os.getpid(), inode)  # SQLite's, on a WAL database
        assert any(map(_on(db_path), _synced_in_a_run(store, monkeypatch)))
        # Through a descriptor SQLite has open: one of mpstore's own would drop SQLite's lock
        # on the file when closed.
        assert workers.open_descriptors_on(db_path) == descriptors
        assert _proc.holds_lock("POSIX", os.getpid(), inode)
        assert store.stats()["checkpoint_errors"] == 0


@pytest.mark.parametrize("code", [errno.EIO, errno.EBADF])
def test_a_database_file_that_could_not_be_synced(
    db_path: str, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # An I/O error is counted; a descriptor SQLite closed meanwhile is looked for again.
    with mpstore.Store(db_path, wal_limit=_LIMIT) as store:
        _grown(store, 150)
        checkpointer = store._checkpointer
        tried: list[int] = []

        def failing(fd: int) -> None:
            tried.append(fd)
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", failing)
        if code == errno.EIO:
            with pytest.raises(OSError):
                checkpointer._sync_database()
        else:
            checkpointer._sync_database()
        assert len(tried) == 1 and checkpointer._db_fd is None
        checkpointer.threshold = 1
        checkpointer.poke()  # the thread's run: the error counted, and the thread goes on
        deadline = time.monotonic() + workers.JOIN_TIMEOUT
        while not (checkpointer.errors or checkpointer.ran.is_set()):
            assert time.monotonic() < deadline, "the thread neither ran nor failed"
            os.sched_yield()
        assert len(tried) == 2
        assert store.stats()["checkpoint_errors"] == (1 if code == errno.EIO else 0)
        assert checkpointer._thread is not None and checkpointer._thread.is_alive()


def test_a_database_file_no_descriptor_is_open_on_is_looked_for_once(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scanning /proc/self/fd costs as much as the process has descriptors: a file restored over
    # the database's path, say, which no connection here has open, is not scanned for again.
    with mpstore.Store(db_path, wal_limit=_LIMIT) as store:
        _grown(store, 150)
        scans: list[tuple[int, int]] = []

        def not_found(identity: tuple[int, int]) -> int | None:
            scans.append(identity)
            return None

        monkeypatch.setattr(_checkpoint, "_descriptor_on", not_found)
        checkpointer = store._checkpointer
        checkpointer._db_fd = None
        for _ in range(3):
            checkpointer._sync_database()
        assert len(scans) == 1
        os.replace(db_path, db_path + ".moved")  # another file at the path: looked for anew
        with open(db_path, "wb"):
            pass
        checkpointer._sync_database()
        assert len(scans) == 2 and scans[0] != scans[1]


def test_without_proc_the_database_file_is_left_to_sqlite(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mpstore.Store(db_path, wal_limit=_LIMIT) as store:
        _grown(store, 150)
        listdir = os.listdir

        def no_proc(path: Any = ".") -> list[str]:
            if str(path).startswith("/proc"):
                raise FileNotFoundError(path)
            return listdir(path)

        monkeypatch.setattr(os, "listdir", no_proc)
        assert _synced_in_a_run(store, monkeypatch) == []
        assert store.stats()["checkpoint_errors"] == 0


def test_a_checkpoint_a_gate_holder_could_not_complete_is_counted(db_path: str) -> None:
    checkpointer = _checkpoint.Checkpointer(db_path, lambda: sqlite3.connect(db_path), limit=_LIMIT)
    checkpointer._wal = lambda: _checkpoint._Wal(600, 0, 4096, 1)  # type: ignore[method-assign]
    checkpointer._running = lambda: False  # type: ignore[method-assign]

    class Failing:
        def execute(self, sql: str) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

    assert not checkpointer.complete(Failing())  # type: ignore[arg-type]
    assert checkpointer.completion_errors == 1 and checkpointer.completed == 0
    assert isinstance(checkpointer.last_error, sqlite3.OperationalError)


@contextlib.contextmanager
def _checkpoint_waiting(db_path: str) -> Any:
    """A FULL checkpoint by another connection, holding SQLite's checkpoint lock while it waits
    for a write transaction to end; yields a descriptor of mpstore's kind on the WAL index."""
    writer = sqlite3.connect(db_path, isolation_level=None)
    checkpointing = sqlite3.connect(db_path, timeout=60, check_same_thread=False)
    fd = os.open(db_path + "-shm", os.O_RDONLY)
    thread = threading.Thread(
        target=lambda: checkpointing.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
    )
    try:
        writer.execute("BEGIN IMMEDIATE")
        thread.start()
        deadline = time.monotonic() + 30
        while not _checkpoint.checkpoint_running(fd):
            assert time.monotonic() < deadline, "the checkpoint never took its lock"
            os.sched_yield()
        yield fd
    finally:
        if writer.in_transaction:
            writer.execute("ROLLBACK")
        if thread.ident is not None:
            thread.join()
        os.close(fd)
        checkpointing.close()
        writer.close()


@pytest.mark.skipif(not hasattr(fcntl, "F_OFD_GETLK"), reason="open-file-description locks")
def test_the_checkpoint_thread_outlives_a_connection_it_could_not_open(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of descriptors, say: the next wake-up tries again, or the WAL would grow for good
    # (write connections leave checkpoints to this thread).
    with mpstore.Store(db_path) as store:
        checkpointer = store._checkpointer
        connect = checkpointer._connect
        failed = threading.Event()

        def flaky() -> sqlite3.Connection:
            if not failed.is_set():
                failed.set()
                raise mpstore.PermissionDenied("unable to open database file", db_path)
            return connect()

        monkeypatch.setattr(checkpointer, "_connect", flaky)
        monkeypatch.setattr(checkpointer, "threshold", 1)
        store.collection("notes", Note, key="id").upsert(Note(id="a", text="x"))
        checkpointer.poke()
        assert failed.wait(workers.JOIN_TIMEOUT)
        checkpointer.poke()
        assert checkpointer.ran.wait(workers.JOIN_TIMEOUT), "no checkpoint ran again"
        assert store.stats()["checkpoint_errors"] == 1


def test_writers_looking_at_the_wal_at_once_start_one_checkpoint_thread(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writers of several threads look at the WAL outside the gate. Two making the thread at
    # once made two, and close() joined only one. Each thread made here waits (1 s at most)
    # for a second one to be made beside it.
    made: list[threading.Thread] = []
    beside = threading.Barrier(2)

    class Thread(threading.Thread):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(self)
            with contextlib.suppress(threading.BrokenBarrierError):
                beside.wait(1.0)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(
        _checkpoint, "threading", types.SimpleNamespace(**{**vars(threading), "Thread": Thread})
    )
    with mpstore.Store(db_path) as store:
        checkpointer = store._checkpointer
        monkeypatch.setattr(checkpointer, "threshold", 0)
        pokers = [threading.Thread(target=checkpointer.poke) for _ in range(2)]
        for poker in pokers:
            poker.start()
        for poker in pokers:
            poker.join(workers.JOIN_TIMEOUT)
        assert len(made) == 1
    assert not made[0].is_alive()


def test_a_checkpoint_running_elsewhere_is_left_to_finish(db_path: str) -> None:
    """Writers look at the WAL every millisecond: while one checkpoint runs, waking a thread in
    each process to start another only finds SQLite's checkpoint lock taken."""
    with mpstore.Store(db_path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="1", text="x"))
        checkpointer = store._checkpointer
        checkpointer.threshold = 1  # the WAL holds that write's frames
        with _checkpoint_waiting(db_path) as fd:
            checkpointer.poke()
            assert checkpointer._thread is None and not checkpointer._wake.is_set()
            assert _checkpoint.checkpoint_running(fd)
        notes.upsert(Note(id="2", text="y"))
        checkpointer.poke()
        assert checkpointer.ran.wait(30), "no checkpoint ran once the other one had finished"


def test_checkpoints_still_run_when_the_wal_index_cannot_be_read(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mpstore.Store(db_path) as store:
        notes = store.collection("notes", Note, key="id")
        monkeypatch.setattr(store._checkpointer, "pending", lambda: None)
        for i in range(store._checkpointer.threshold // 4):
            notes.upsert(Note(id=str(i), text="x" * 100))
        assert store._checkpointer.ran.wait(30), "the WAL would grow without bound"


def test_writers_read_the_wal_index_at_most_once_per_interval(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the WAL index is a system call; a writer committing often reads it once per
    LOOK_EVERY, not after every commit. An explicit poke() still reads it every time."""
    with mpstore.Store(db_path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="first", text="x"))
        checkpointer = store._checkpointer
        reads = []
        pending = checkpointer.pending

        def counted() -> int | None:
            reads.append(1)
            return pending()

        monkeypatch.setattr(checkpointer, "pending", counted)
        now = [checkpointer._next_look + 1.0]  # past the interval of the first write's look
        monkeypatch.setattr(_checkpoint, "time", type("Clock", (), {"monotonic": lambda: now[0]}))
        for i in range(10):
            notes.upsert(Note(id=str(i), text="x"))
        assert len(reads) == 1
        now[0] += _checkpoint.LOOK_EVERY
        notes.upsert(Note(id="after", text="x"))
        assert len(reads) == 2
        checkpointer.poke()
        checkpointer.poke()
        assert len(reads) == 4


@_reads_proc
def test_closing_a_store_leaves_sqlite_its_lock_on_the_wal_index(db_path: str) -> None:
    """Closing any descriptor drops every POSIX lock the process holds on that file. The
    checkpointer's own descriptor on -shm must not take with it the lock by which SQLite tells
    other processes that the WAL index is in use (one that finds none rebuilds the index)."""
    with mpstore.Store(db_path) as staying:
        notes = staying.collection("notes", Note, key="id")
        notes.upsert(Note(id="1", text="x"))
        leaving = mpstore.Store(db_path)
        leaving.collection("notes", Note, key="id").upsert(Note(id="2", text="y"))
        assert leaving._checkpointer.pending() is not None  # its descriptor is open
        assert workers.wal_index_in_use_elsewhere(db_path)
        leaving.close()
        assert workers.wal_index_in_use_elsewhere(db_path)
        notes.upsert(Note(id="3", text="z"))
        assert staying._checkpointer.pending() is not None
    assert not workers.wal_index_in_use_elsewhere(db_path)
    assert workers.open_descriptors_on(db_path + "-shm") == 0


@_reads_proc
def test_a_connection_outside_mpstore_keeps_its_wal_index_lock(db_path: str) -> None:
    store = mpstore.Store(db_path)
    store.collection("notes", Note, key="id").upsert(Note(id="1", text="x"))
    assert store._checkpointer.pending() is not None
    own = sqlite3.connect(db_path)
    assert own.execute("SELECT count(*) FROM notes").fetchone() == (1,)
    store.close()
    assert workers.wal_index_in_use_elsewhere(db_path)
    own.close()
    # The descriptor kept for it is closed by a later release, once no lock is left.
    with mpstore.Store(db_path) as later:
        assert later.collection("notes", Note, key="id").get("1") is not None
        later._checkpointer.pending()
    assert workers.open_descriptors_on(db_path + "-shm") == 0


@_reads_proc
def test_reopening_a_store_reuses_the_wal_index_descriptor(db_path: str) -> None:
    own = sqlite3.connect(db_path)
    try:
        for i in range(6):
            with mpstore.Store(db_path) as store:
                store.collection("notes", Note, key="id").upsert(Note(id=str(i), text="x"))
                assert store._checkpointer.pending() is not None
                if i == 0:
                    # Keeps the -shm file, and a lock on it, from here on.
                    assert own.execute("SELECT count(*) FROM notes").fetchone() == (1,)
            if i == 1:
                after_second = workers.open_descriptors_on(db_path + "-shm")
        assert workers.open_descriptors_on(db_path + "-shm") == after_second
    finally:
        own.close()


@_reads_proc
def test_the_wal_index_descriptor_stays_open_while_its_file_exists(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection may open and lock the -shm between any check for locks and the close: while
    the file exists (another process keeps it), mpstore's descriptor is not closed at all."""
    store = mpstore.Store(db_path)
    store.collection("notes", Note, key="id").upsert(Note(id="1", text="x"))
    assert store._checkpointer.pending() is not None
    check = _checkpoint.locks_held_here
    opened: list[sqlite3.Connection] = []

    def check_then_connect(fd: int) -> bool:
        held = check(fd)
        if not opened:  # another thread, just after the check
            opened.append(sqlite3.connect(db_path))
            opened[0].execute("SELECT count(*) FROM notes").fetchone()
        return held

    with workers.holding_the_gate(db_path):
        monkeypatch.setattr(_checkpoint, "locks_held_here", check_then_connect)
        store.close()
        if not opened:
            opened.append(sqlite3.connect(db_path))
            opened[0].execute("SELECT count(*) FROM notes").fetchone()
        mpstore.Store(db_path + "-other").close()  # another release: closes what it may
        probe = os.open(db_path + "-shm", os.O_RDONLY)
        try:
            assert check(probe), "the connection lost its lock on the WAL index"
            opened[0].close()
        finally:
            os.close(probe)


def test_locks_are_matched_on_the_inode_whatever_device_proc_locks_names(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On overlayfs and btrfs /proc/locks names another device than stat() reports."""
    target = tmp_path / "f"
    target.write_bytes(b"")
    fd = os.open(target, os.O_RDONLY)
    try:
        table = tmp_path / "locks"
        inode = os.fstat(fd).st_ino
        table.write_text(
            f"1: POSIX  ADVISORY  READ {os.getpid()} 00:28:{inode} 128 128\n"
            f"2: -> POSIX  ADVISORY  WRITE {os.getpid() + 1} 00:28:{inode + 1} 0 EOF\n"
        )
        monkeypatch.setattr(_proc, "LOCKS_TABLE", str(table))
        assert _checkpoint.locks_held_here(fd)
        table.write_text(f"1: POSIX  ADVISORY  READ {os.getpid() + 1} 00:28:{inode} 128 128\n")
        assert not _checkpoint.locks_held_here(fd)
    finally:
        os.close(fd)


@pytest.mark.skipif(
    not hasattr(_checkpoint.fcntl, "F_OFD_GETLK"), reason="open-file-description locks (Linux)"
)
def test_a_lock_of_this_process_on_a_file_is_seen_without_proc_locks(tmp_path: Any) -> None:
    """The check that spares the read of /proc/locks finds SQLite's own locks on the WAL index
    (this process's), and says unlocked only once none is left."""
    path = str(tmp_path / "t.db")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (a)")
    fd = os.open(path + "-shm", os.O_RDONLY)
    try:
        assert not _checkpoint.unlocked(fd)
        assert _checkpoint.locks_held_here(fd)
        conn.close()  # the last connection: SQLite unlocks and deletes the -shm
        assert os.fstat(fd).st_nlink == 0
        assert _checkpoint.unlocked(fd)
    finally:
        conn.close()
        os.close(fd)


def _fork_while_a_checkpoint_is_inside_sqlite(
    db_path: str, monkeypatch: pytest.MonkeyPatch, wait_for_fork: float, wait_for_child: float
) -> tuple[list[str], str]:
    """Pause the checkpoint thread inside SQLite (in a progress handler of its checkpoint's
    statement), fork from another thread, and let the checkpoint go after ``wait_for_fork``
    seconds or once the fork returned; the order in which both finished, and what became of
    the child, which reads through the store and exits: ``"exited"``, or ``"hung"`` (closing
    the inherited connection of the checkpoint thread, whose mutex that thread held at the
    fork, before it opens its own), found after ``wait_for_child`` seconds and killed."""
    events: list[str] = []
    inside, release, forked = threading.Event(), threading.Event(), threading.Event()
    outcomes: list[str] = []
    with mpstore.Store(db_path) as store:
        checkpointer = store._checkpointer
        connect = checkpointer._connect

        def paused_connect() -> sqlite3.Connection:
            conn = connect()

            def pause() -> int:
                if not inside.is_set():
                    inside.set()
                    release.wait(workers.JOIN_TIMEOUT)
                    events.append("checkpoint resumed")
                return 0

            conn.set_progress_handler(pause, 1)
            return conn

        def fork() -> None:
            done_r, done_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                store.query("SELECT 1")
                os.write(done_w, b"1")
                os._exit(0)
            events.append("forked")
            forked.set()
            os.close(done_w)
            ready, _, _ = select.select([done_r], [], [], wait_for_child)
            os.close(done_r)
            if not ready:
                os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
            outcomes.append("exited" if ready and status == 0 else "hung")

        monkeypatch.setattr(checkpointer, "_connect", paused_connect)
        monkeypatch.setattr(checkpointer, "threshold", 0)  # every write wakes the thread
        store.collection("notes", Note, key="id").upsert(Note(id="a", text="x"))
        assert inside.wait(workers.JOIN_TIMEOUT), "the checkpoint never ran"
        forking = threading.Thread(target=fork)
        forking.start()
        forked.wait(wait_for_fork)
        release.set()
        forking.join(workers.JOIN_TIMEOUT + wait_for_child)
    assert len(outcomes) == 1
    return events, outcomes[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_waits_for_the_checkpoint_thread_to_leave_sqlite(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A child forked while another thread is inside SQLite inherits SQLite's mutexes locked
    # and hangs at its first SQLite call; fork takes the background threads' lock first.
    events, child = _fork_while_a_checkpoint_is_inside_sqlite(
        db_path, monkeypatch, wait_for_fork=1.0, wait_for_child=workers.JOIN_TIMEOUT
    )
    assert events == ["checkpoint resumed", "forked"]
    assert child == "exited"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_control_without_the_lock_a_fork_lands_inside_the_checkpoint(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fork, "background_sqlite", contextlib.nullcontext())
    # A healthy child is done in milliseconds: 5 s without a word from it is a hang.
    events, child = _fork_while_a_checkpoint_is_inside_sqlite(
        db_path, monkeypatch, wait_for_fork=workers.JOIN_TIMEOUT, wait_for_child=5.0
    )
    assert events == ["forked", "checkpoint resumed"]
    assert child == "hung"
