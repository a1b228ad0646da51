"""Store transactions: write/read blocks, nesting, the read pool, settings and lifetime."""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mpstore
from mpstore import _mailbox, _sqlite, _store
from mpstore._connection import Connection, translating_reads
from tests import workers
from tests.models import Note


def test_write_commits_and_read_sees_it(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")
    with store.read() as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_write_rolls_back_on_exception(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(RuntimeError), store.write() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        raise RuntimeError("boom")
    assert store.query("SELECT count(*) FROM t") == [(0,)]


def test_nested_write_is_a_savepoint(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(ValueError), store.write() as inner:
            inner.execute("INSERT INTO t VALUES (2)")
            raise ValueError("inner only")
        with store.write() as inner:
            inner.execute("INSERT INTO t VALUES (3)")
    assert store.query("SELECT x FROM t ORDER BY x") == [(1,), (3,)]


def test_outer_failure_rolls_back_committed_inner_blocks(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(KeyError), store.write() as conn:
        with store.write() as inner:
            inner.execute("INSERT INTO t VALUES (1)")
        raise KeyError("outer")
    assert store.query("SELECT count(*) FROM t") == [(0,)]


@contextlib.contextmanager
def _interrupted_at_exit(kind: type[Any], skip: int = 0) -> Iterator[list[str]]:
    """Raise KeyboardInterrupt at the first instruction of the exit of the first ``kind`` block
    left in this thread after ``skip`` others, where CPython runs a pending signal handler
    (Ctrl-C)."""
    fired: list[str] = []
    left = [skip]

    def tracer(frame: Any, event: str, arg: Any) -> None:
        at_exit = event == "call" and frame.f_code is _store._Scope.__exit__.__code__
        if at_exit and not fired and isinstance(frame.f_locals["self"], kind):
            if left[0]:
                left[0] -= 1
                return
            fired.append(kind.__name__)
            raise KeyboardInterrupt("Ctrl-C as the block is left")

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield fired
    finally:
        sys.settrace(previous)


@pytest.mark.parametrize(
    ("kind", "kept"),
    [(_store._Transaction, [2]), (_store._Savepoint, [2]), (_store._HoldingGate, [1, 2])],
)
def test_a_ctrl_c_as_a_write_block_is_left_leaves_no_transaction_and_no_gate_behind(
    store: mpstore.Store, kind: type[Any], kept: list[int]
) -> None:
    """The block's end runs anyway: the transaction (or savepoint) is rolled back, or the gate
    given back once the commit is made; the thread's next write is a write of its own."""
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    with (
        pytest.raises(KeyboardInterrupt),
        _interrupted_at_exit(kind) as fired,
        store.write() as conn,
    ):
        if kind is _store._Savepoint:
            with store.write() as inner:
                inner.execute("INSERT INTO t VALUES (1)")
        else:
            conn.execute("INSERT INTO t VALUES (1)")
    assert fired == [kind.__name__]
    assert store._tx.conn is None and store._tx.transaction is None and store._tx.savepoints == ()
    assert not store._gate.held_here and store._writing == 0
    assert store._wconn is not None and not store._wconn.in_transaction
    with store.write() as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    assert _rows(store) == kept


@pytest.mark.parametrize("path", ["free gate", "waited in the mailbox"])
def test_a_ctrl_c_as_a_collection_write_gives_the_gate_back_is_settled(
    store: mpstore.Store, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The lone write takes a free gate at once; a write that found it taken waits in the
    mailbox and takes it from there. Either way the hold's end runs though its exit was
    skipped: the gate is given back and the write was committed."""
    notes = store.collection("notes", Note, key="id")
    if path == "waited in the mailbox":
        first = [True]
        try_acquire = store._gate.try_acquire

        def taken_the_first_time() -> bool:
            if first:
                first.clear()
                return False
            return try_acquire()

        monkeypatch.setattr(store._gate, "try_acquire", taken_the_first_time)
    follow = store._follow
    followed = []
    monkeypatch.setattr(store, "_follow", lambda *a: followed.append(1) or follow(*a))
    with pytest.raises(KeyboardInterrupt), _interrupted_at_exit(_store._HoldingGate) as fired:
        notes.upsert(Note(id="a", text="x"))
    monkeypatch.undo()
    assert fired == ["_HoldingGate"] and len(followed) == (path == "waited in the mailbox")
    assert not store._gate.held_here and store._writing == 0
    assert store.stats()["writes_carried_away"] == 0  # this process's own hold, both ways
    with mpstore.Store(store.path, timeout=1) as other:
        other.collection("notes", Note, key="id").upsert(Note(id="b", text="x"))
    assert sorted(notes.keys()) == ["a", "b"]


def test_a_ctrl_c_caught_inside_an_outer_write_block_rolls_back_only_the_inner_block(
    store: mpstore.Store,
) -> None:
    """The nested block raised as it was left: its savepoint is rolled back on the way out,
    at once, and the outer block goes on and commits its own writes, before and after."""
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    kept = []
    with store.write() as outer:
        outer.execute("INSERT INTO t VALUES (1)")
        with (
            pytest.raises(KeyboardInterrupt) as interrupt,
            _interrupted_at_exit(_store._Savepoint) as fired,
            store.write() as inner,
        ):
            inner.execute("INSERT INTO t VALUES (2)")
        kept.append(interrupt.value)  # kept: nothing waits for it to be dropped
        assert fired == ["_Savepoint"] and store._tx.savepoints == ()
        outer.execute("INSERT INTO t VALUES (3)")
        with store.write() as inner:
            inner.execute("INSERT INTO t VALUES (4)")
    assert _rows(store) == [1, 3, 4]
    assert store._tx.savepoints == () and store._tx.transaction is None


def test_a_block_with_a_nested_block_still_open_commits_nothing(store: mpstore.Store) -> None:
    """A nested block left suspended in a generator is still open when the block around it
    ends: what it wrote is neither committed nor silently dropped from a commit that goes on."""
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")

    def nested() -> Iterator[None]:
        with store.write() as inner:
            inner.execute("INSERT INTO t VALUES (2)")
            yield

    suspended = nested()
    with (
        pytest.raises(mpstore.TransactionError, match="nested in this one is still open"),
        store.write() as outer,
    ):
        outer.execute("INSERT INTO t VALUES (1)")
        next(suspended)
    assert _rows(store) == []
    assert store._tx.savepoints == () and not store._gate.held_here
    suspended.close()  # its savepoint went with the transaction
    with store.write() as conn:
        conn.execute("INSERT INTO t VALUES (3)")
    assert _rows(store) == [3]


def test_a_ctrl_c_just_after_begin_leaves_no_transaction_behind(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    fired = []

    def tracer(frame: Any, event: str, arg: Any) -> None:
        # The first call after BEGIN IMMEDIATE, before the transaction is recorded.
        if event == "call" and frame.f_code is Connection.__init__.__code__ and not fired:
            fired.append(1)
            raise KeyboardInterrupt

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt), store.write() as conn:
            conn.execute("INSERT INTO t VALUES (1)")
    finally:
        sys.settrace(previous)
    assert fired and store._wconn is not None and not store._wconn.in_transaction
    assert not store._gate.held_here
    with mpstore.Store(store.path, timeout=1) as other, other.write() as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    with store.write() as conn:
        conn.execute("INSERT INTO t VALUES (3)")
    assert _rows(store) == [2, 3]


@pytest.mark.skipif(not _mailbox.available(), reason="the mailbox needs Linux")
def test_a_ctrl_c_as_a_batched_write_ends_reaches_its_caller_as_itself(
    store: mpstore.Store,
) -> None:
    """A write that leads a batch runs again in a savepoint when a write it carried ended the
    transaction; a Ctrl-C as that savepoint ends is its caller's, not turned into another
    error, and nothing of it stays."""
    notes = store.collection("notes", Note, key="id")
    with store.write() as conn:
        conn.execute(
            'CREATE TRIGGER refuse BEFORE INSERT ON notes WHEN NEW.key = "bad" '
            "BEGIN SELECT RAISE(ROLLBACK, 'refused'); END"
        )
    other = _mailbox.Mailbox(store._gate.mailbox_path, 0o600)
    try:
        slot = other.claim()
        assert slot is not None
        bad = notes._upsert_op([notes._row(Note(id="bad", text="x"))])
        other.publish(slot, _mailbox.encode_op(bad))
        # The first savepoint to end is the carried write's, which ends the transaction.
        with pytest.raises(KeyboardInterrupt), _interrupted_at_exit(_store._Savepoint, 1) as fired:
            notes.upsert(Note(id="good", text="x"))
        assert fired == ["_Savepoint"]
        assert other.state(slot.index) == _mailbox.DONE
        ok, error = other.collect(slot)
        assert not ok and isinstance(error, sqlite3.IntegrityError)
    finally:
        other.close()
    assert notes.count() == 0
    assert store._tx.savepoints == () and not store._gate.held_here


def _rows(store: mpstore.Store) -> list[int]:
    with contextlib.closing(sqlite3.connect(store.path)) as fresh:
        return [x for (x,) in fresh.execute("SELECT x FROM t ORDER BY x")]


def test_a_savepoint_that_cannot_start_is_not_counted_as_open(
    store: mpstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    with store.write():
        with monkeypatch.context() as patched:
            patched.setattr(Connection, "_control", lambda self, sql: _refuse(sql))
            with pytest.raises(mpstore.TransactionError), store.write():
                pass
        assert store._tx.savepoints == ()
        control = Connection._control
        statements: list[str] = []

        def recorded(self: Connection, sql: str) -> None:
            statements.append(sql)
            control(self, sql)

        monkeypatch.setattr(Connection, "_control", recorded)
        with store.write() as inner:  # the next one starts as the first
            assert len(store._tx.savepoints) == 1
            inner.execute("SELECT 1")
        assert statements == ["SAVEPOINT mpstore_sp1", "RELEASE mpstore_sp1"]


def _refuse(sql: str) -> None:
    raise mpstore.TransactionError(f"refused: {sql}")


def test_write_uses_begin_immediate(store: mpstore.Store) -> None:
    statements: list[str] = []
    with store.write() as conn:
        conn._conn.set_trace_callback(statements.append)
        conn.execute("SELECT 1")
    assert store._wconn is not None
    store._wconn.set_trace_callback(None)
    with store.write():
        pass
    # The trace started inside the block, so look at the next block's opening statement.
    store._wconn.set_trace_callback(statements.append)
    with store.write():
        pass
    store._wconn.set_trace_callback(None)
    assert "BEGIN IMMEDIATE" in statements
    assert statements[-1] == "COMMIT"


def test_statements_that_end_the_transaction_are_refused(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(mpstore.TransactionError), store.write() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("COMMIT")
    # The refused block wrote its row before COMMIT ran; what matters is that nothing after it
    # ran outside the gate and the store still works.
    with store.write() as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    assert (2,) in store.query("SELECT x FROM t")


def test_statements_checked_before_are_remembered_within_bounds(store: mpstore.Store) -> None:
    """A statement that passed the check is looked up, not matched, when it runs again; texts
    with values in them must not pile up in memory."""
    from mpstore import _connection

    long_text = "SELECT '" + "x" * _connection._ALLOWED_TEXT + "'"
    for block, remembered in (
        (store.read, _connection._ALLOWED_READS),
        (store.write, _connection._ALLOWED),
    ):
        with block() as conn:
            for i in range(_connection._ALLOWED_MAX + 10):
                conn.execute(f"SELECT {i}").fetchall()
            assert len(remembered) <= _connection._ALLOWED_MAX
            assert conn.execute("SELECT 7").fetchall() == [(7,)]
            conn.execute(long_text).fetchall()
        assert long_text not in remembered
        assert "SELECT 7" in remembered
    with pytest.raises(mpstore.TransactionError), store.write() as conn:
        conn.execute("COMMIT")
    assert "COMMIT" not in _connection._ALLOWED


def test_connection_is_dead_after_its_block(store: mpstore.Store) -> None:
    with store.write() as conn:
        pass
    with pytest.raises(mpstore.TransactionError):
        conn.execute("SELECT 1")


def test_connection_refuses_other_threads(store: mpstore.Store) -> None:
    errors: list[BaseException] = []
    with store.write() as conn:

        def use() -> None:
            try:
                conn.execute("SELECT 1")
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=use)
        t.start()
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], mpstore.TransactionError)


def test_write_inside_read_is_refused(store: mpstore.Store) -> None:
    with pytest.raises(mpstore.TransactionError), store.read(), store.write():
        pass


def test_read_connections_are_query_only(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(mpstore.TransactionError, match="read-only"), store.read() as conn:
        conn.execute("INSERT INTO t VALUES (1)")


def test_query_refuses_a_write(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(mpstore.TransactionError, match="read-only"):
        store.query("INSERT INTO t VALUES (1)")
    assert store.query("SELECT count(*) FROM t") == [(0,)]


@pytest.mark.parametrize(
    "statement",
    [
        "PRAGMA query_only=0",
        "pragma main.query_only = false",
        "PRAGMA query_only(0)",
        '/* x */ ; PRAGMA "query_only"=0',
        # Past the statement check's patterns: the connection's authorizer refuses these.
        "PRAGMA/**/query_only=0",
        "PRAGMA query_only/**/=0",
    ],
)
def test_reads_cannot_switch_off_read_only(store: mpstore.Store, statement: str) -> None:
    # Read connections are pooled: one switched to writable would let a later read write
    # without the gate. Run in a write block first, the statement is not thereby allowed
    # in reads.
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.execute(statement)
    with pytest.raises(mpstore.TransactionError, match="gate"), store.read() as c:
        c.execute(statement)
    with pytest.raises(mpstore.TransactionError, match="gate"):
        store.query(statement)
    for _ in range(store.pool_size + 1):
        with pytest.raises(mpstore.TransactionError, match="read-only"):
            store.query("INSERT INTO t VALUES (1)")
    assert store.query("SELECT count(*) FROM t") == [(0,)]
    assert store.query("PRAGMA query_only") == [(1,)]


@pytest.mark.parametrize("statement", ["BEGIN", "SAVEPOINT a", "COMMIT"])
def test_query_leaves_no_transaction_open_on_its_pooled_connection(
    store: mpstore.Store, statement: str
) -> None:
    # A pooled connection kept in a transaction would serve later reads an old snapshot.
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(mpstore.TransactionError):
        store.query(statement)
    with store.write() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    for _ in range(store.pool_size + 1):
        assert store.query("SELECT count(*) FROM t") == [(1,)]


@pytest.mark.parametrize(
    "statement",
    ["RELEASE/**/mpstore_sp1", "ROLLBACK/**/TO/**/mpstore_sp1", "RELEASE SAVEPOINT/**/mpstore_sp1"],
)
def test_mpstores_own_savepoint_cannot_be_released_behind_a_comment(
    store: mpstore.Store, statement: str
) -> None:
    # SQLite reads a comment as a space: the check must too.
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    with (
        pytest.raises(mpstore.TransactionError, match="would end"),
        store.write(),
        store.write() as inner,  # mpstore_sp1
    ):
        inner.execute("INSERT INTO t VALUES (1)")
        inner.execute(statement)
    assert store.query("SELECT count(*) FROM t") == [(0,)]
    with store.write() as conn:  # a savepoint of the caller's own stays the caller's
        conn.execute("SAVEPOINT mine")
        conn.execute("INSERT INTO t VALUES (2)")
        conn.execute("ROLLBACK /**/ TO mine")
        conn.execute("RELEASE/**/mine")
    assert store.query("SELECT count(*) FROM t") == [(0,)]


def test_a_commit_after_empty_statements_is_refused_before_it_runs(store: mpstore.Store) -> None:
    # SQLite skips empty statements: ";COMMIT" commits.
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(mpstore.TransactionError, match="would end"), store.write() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute(" ; ;COMMIT")
    assert store.query("SELECT count(*) FROM t") == [(0,)]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (sqlite3.SQLITE_READONLY, mpstore.TransactionError),
        # A file the process may not open stays a permission problem on a read connection too.
        (sqlite3.SQLITE_CANTOPEN, mpstore.PermissionDenied),
        (sqlite3.SQLITE_PERM, mpstore.PermissionDenied),
    ],
)
def test_reads_call_only_a_write_attempt_read_only(
    code: int, expected: type[mpstore.MpstoreError]
) -> None:
    error = sqlite3.OperationalError("refused")
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    with pytest.raises(expected), translating_reads("x.db"):
        raise error


@pytest.mark.parametrize("translated_inside", [False, True], ids=["raw", "translated inside"])
def test_reads_call_a_write_attempt_read_only_however_deep_it_was_translated(
    translated_inside: bool,
) -> None:
    error = sqlite3.OperationalError("attempt to write a readonly database")
    error.sqlite_errorcode = sqlite3.SQLITE_READONLY  # type: ignore[attr-defined]
    with pytest.raises(mpstore.TransactionError, match="read-only"), translating_reads("x.db"):
        if not translated_inside:
            raise error
        with _sqlite.translating("x.db"):
            raise error


def test_reads_inside_write_see_uncommitted_changes(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")
        with store.read() as r:
            assert r.execute("SELECT count(*) FROM t").fetchone() == (1,)
        assert store.query("SELECT count(*) FROM t") == [(1,)]


def _ten_rows(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (a)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(10)])


def test_a_cursor_kept_after_a_read_block_does_not_pin_its_connection(
    store: mpstore.Store,
) -> None:
    # An unfinished cursor holds its connection's read snapshot: kept past the block, it left
    # the pooled connection on an old snapshot, and this thread did not see its own commit.
    _ten_rows(store)
    with store.read() as conn:
        cursor = conn.execute("SELECT a FROM t ORDER BY a")
        assert cursor.fetchone() == (0,)
    with store.write() as conn:
        conn.execute("INSERT INTO t VALUES (100)")
    assert store.query("SELECT count(*) FROM t") == [(11,)]
    with pytest.raises(sqlite3.ProgrammingError):
        cursor.fetchone()  # closed with its block


def test_a_cursor_kept_after_a_write_block_does_not_pin_the_write_connection(
    db_path: str,
) -> None:
    # Kept past the block, it held the write connection's snapshot: once anyone else
    # committed, every later write of the store failed on a stale snapshot (SQLITE_BUSY).
    with mpstore.Store(db_path) as store, mpstore.Store(db_path) as other:
        _ten_rows(store)
        with store.write() as conn:
            cursor = conn.execute("SELECT a FROM t")
            assert cursor.fetchone() is not None
        with other.write() as conn:
            conn.execute("INSERT INTO t VALUES (100)")
        with store.write() as conn:
            conn.execute("INSERT INTO t VALUES (200)")
        assert store.query("SELECT count(*) FROM t") == [(12,)]
        del cursor


def test_readers_are_not_blocked_by_an_open_writer(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")
    inside, finish = threading.Event(), threading.Event()

    def writer() -> None:
        with store.write() as c:
            c.execute("INSERT INTO t VALUES (2)")
            inside.set()
            finish.wait()

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert inside.wait(10)
        # The writer holds the gate and SQLite's write lock; a reader still gets the last
        # committed snapshot at once (a blocked reader would raise after the store's timeout).
        with store.read() as r:
            assert r.execute("SELECT x FROM t").fetchall() == [(1,)]
    finally:
        finish.set()
        t.join()
    assert store.query("SELECT count(*) FROM t") == [(2,)]


def test_read_block_is_one_snapshot(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")
    with store.read() as r:
        assert r.execute("SELECT count(*) FROM t").fetchone() == (1,)
        done = threading.Event()

        def write() -> None:
            with store.write() as c:
                c.execute("INSERT INTO t VALUES (2)")
            done.set()

        t = threading.Thread(target=write)
        t.start()
        t.join()
        assert done.is_set()
        assert r.execute("SELECT count(*) FROM t").fetchone() == (1,)
    assert store.query("SELECT count(*) FROM t") == [(2,)]


def test_pool_timeout_when_every_read_connection_is_held(db_path: str) -> None:
    with mpstore.Store(db_path, pool_size=1, timeout=0.2) as store:
        with workers.held_by_another_thread(store.read):
            with pytest.raises(mpstore.PoolTimeout) as info:
                store.query("SELECT 1")
            assert db_path in str(info.value)
            assert info.value.waited is not None and info.value.waited >= 0.2
        assert store.query("SELECT 1") == [(1,)]
        assert store._pool.in_use == 0


def test_writers_never_touch_the_read_pool(db_path: str) -> None:
    # With every read connection taken, writes still go through: a writer holds the gate and the
    # process's write connection, never a pooled one, so it cannot run the pool dry.
    with mpstore.Store(db_path, pool_size=1, timeout=0.5) as store:
        notes = store.collection("notes", Note, key="id")
        with store._pooled():
            assert store._pool.in_use == 1
            with store.write() as conn:
                conn.execute(
                    'INSERT INTO notes (key, value) VALUES (\'a\', \'{"id":"a","text":"x"}\')'
                )
        assert notes.get("a") == Note(id="a", text="x")


def test_events_are_emitted_in_order(db_path: str) -> None:
    seen: list[str] = []
    with mpstore.Store(db_path, on_event=seen.append) as store:
        seen.clear()
        with store.write():
            pass
        assert seen == ["gate-wait", "gate-acquired", "begin", "commit", "gate-released"]
        seen.clear()
        with pytest.raises(ValueError), store.write():
            raise ValueError
        assert seen == ["gate-wait", "gate-acquired", "begin", "rollback", "gate-released"]
        seen.clear()
        store.query("SELECT 1")
        assert seen == ["pool-wait", "pool-acquired", "pool-released"]


def test_synchronous_defaults_to_normal_and_is_settable(tmp_path: os.PathLike[str]) -> None:
    levels = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}
    with mpstore.Store(os.path.join(tmp_path, "a.db")) as store:
        assert store.synchronous == "NORMAL"
        assert store.query("PRAGMA synchronous") == [(levels["NORMAL"],)]
        with store.write() as conn:
            assert conn.execute("PRAGMA synchronous").fetchone() == (levels["NORMAL"],)
    with mpstore.Store(os.path.join(tmp_path, "b.db"), synchronous="full") as store:
        assert store.query("PRAGMA synchronous") == [(levels["FULL"],)]
        with store.write() as conn:
            assert conn.execute("PRAGMA synchronous").fetchone() == (levels["FULL"],)


def test_database_is_in_wal_mode(store: mpstore.Store) -> None:
    assert store.query("PRAGMA journal_mode") == [("wal",)]


def test_new_files_are_private_by_default(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "secret.db")
    with mpstore.Store(path) as store:
        with store.write() as conn:
            conn.execute("CREATE TABLE t (x)")
        for name in (path, path + ".lock", path + "-wal"):
            assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name


def test_file_mode_is_configurable(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "shared.db")
    old = os.umask(0)
    try:
        with mpstore.Store(path, file_mode=0o640):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(path + ".lock").st_mode) == 0o640


def test_schema_version_is_recorded(store: mpstore.Store) -> None:
    assert store.query("SELECT value FROM _mpstore_meta WHERE key='schema_version'") == [("1",)]
    assert store.created_schema is True


def test_reopening_does_not_recreate_the_schema(db_path: str) -> None:
    with mpstore.Store(db_path) as first:
        assert first.created_schema
    with mpstore.Store(db_path) as second:
        assert not second.created_schema


def test_closed_store_refuses_work(db_path: str) -> None:
    store = mpstore.Store(db_path)
    notes = store.collection("notes", Note, key="id")
    store.close()
    store.close()
    for action in (
        lambda: notes.upsert(Note(id="a", text="x")),
        lambda: notes.get("a"),
        lambda: store.write().__enter__(),
        lambda: store.read().__enter__(),
        lambda: store.collection("other", Note, key="id"),
    ):
        with pytest.raises(mpstore.StoreClosed):
            action()


def test_store_pickles_as_path_and_settings(db_path: str) -> None:
    settings = {
        "pool_size": 3,
        "timeout": 2.5,
        "synchronous": "FULL",
        "file_mode": 0o640,
        "max_record_bytes": 1000,
        "wal_limit": 1 << 20,
        "gate": "filelock",
        "mailbox": False,
    }
    # Every setting but the process-local event hook: a new one must cross too.
    hooks = {"on_event"}
    assert set(inspect.signature(mpstore.Store).parameters) == {"path", *settings, *hooks}
    with mpstore.Store(db_path, **settings) as store:  # type: ignore[arg-type]
        clone = pickle.loads(pickle.dumps(store))
        try:
            assert clone.path == store.path
            assert clone._settings() == store._settings()
            assert {name: getattr(clone, name) for name in ("pool_size", "wal_limit")} == {
                "pool_size": 3,
                "wal_limit": 1 << 20,
            }
            assert clone is not store
        finally:
            clone.close()


def test_two_stores_on_one_file_share_the_gate(db_path: str) -> None:
    with mpstore.Store(db_path) as a, mpstore.Store(db_path) as b:
        assert a._gate is b._gate
        with (
            a.write(),
            pytest.raises(mpstore.TransactionError, match="already holds"),
            b.write(),
        ):
            pass
        with b.write() as conn:
            conn.execute("SELECT 1")


@pytest.mark.parametrize("how", ["gate='flock' beside 'auto'", "through a symlink"])
def test_every_name_and_spelling_of_one_file_shares_its_gate(
    tmp_path: Path, db_path: str, how: str
) -> None:
    other, kind = db_path, "flock"
    if how == "through a symlink":
        other, kind = str(tmp_path / "link.db"), "auto"
        os.symlink(db_path, other)
    with mpstore.Store(db_path) as a, mpstore.Store(other, gate=kind) as b:
        # One lock file, one mailbox, beside the file itself, as SQLite's -wal and -shm are.
        assert (a._gate, a.path, a.lock_path) == (b._gate, b.path, b.lock_path)
        with (
            a.write(),
            pytest.raises(mpstore.TransactionError, match="already holds"),
            b.write(),
        ):
            pass
    if other != db_path:
        assert not os.path.exists(other + ".lock")


def test_another_kind_of_gate_on_an_open_file_is_refused(db_path: str) -> None:
    with mpstore.Store(db_path) as store:
        with pytest.raises(ValueError, match="same gate"):
            mpstore.Store(db_path, gate="filelock")
        with store.write() as conn:  # the open store is untouched
            conn.execute("SELECT 1")


def test_close_while_another_thread_writes_lets_that_write_finish(db_path: str) -> None:
    store = mpstore.Store(db_path)
    inside, finish = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with store.write() as conn:
                conn.execute("CREATE TABLE t (x INTEGER)")
                conn.execute("INSERT INTO t VALUES (1)")
                inside.set()
                finish.wait()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=write)
    t.start()
    assert inside.wait(10)
    store.close()
    finish.set()
    t.join()
    assert errors == []
    assert store._wconn is None and store._gate.users == 0
    with mpstore.Store(db_path) as again:
        assert again.query("SELECT x FROM t") == [(1,)]
    with pytest.raises(mpstore.StoreClosed):
        store.query("SELECT 1")


def test_a_hook_may_close_the_store_after_its_own_write(db_path: str) -> None:
    """close() waits for the calls using the mailbox, but not for the one it is called from."""
    store = mpstore.Store(db_path, timeout=0.5)
    notes = store.collection("notes", Note, key="id")
    waits: list[float | None] = []

    class RecordingCondition(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout)
            return super().wait(timeout)

    store._followers_done = RecordingCondition(store._followers_lock)
    store.on_event = lambda event: store.close() if event == "gate-released" else None
    notes.upsert(Note(id="a", text="x"))
    assert store.closed and waits == []
    with mpstore.Store(db_path) as again:
        assert again.collection("notes", Note, key="id").get("a") == Note(id="a", text="x")


def gate_registry_lock() -> Any:
    from mpstore import _gate

    return _gate._registry_lock


class _SignallingLock:
    """A lock that says when a given thread is about to take it."""

    def __init__(self, watched: set[int], coming: threading.Event) -> None:
        self._lock = threading.Lock()
        self._watched, self._coming = watched, coming

    def __enter__(self) -> bool:
        if threading.get_ident() in self._watched:
            self._coming.set()
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)


def test_racing_close_calls_close_once(db_path: str) -> None:
    """Two threads close one store: only one may run the close path, or the gate that stores of
    the process share is dropped twice and closed under the store still using it."""
    closing, staying = mpstore.Store(db_path), mpstore.Store(db_path)
    assert closing._gate is staying._gate and staying._gate.users == 2
    source, first = inspect.getsourcelines(mpstore.Store.close)
    mark = first + next(i for i, line in enumerate(source) if "self._closed = True" in line)
    second_thread: set[int] = set()
    second_arrived = threading.Event()
    closing._writers_lock = _SignallingLock(second_thread, second_arrived)  # type: ignore[assignment]

    def hold_at_mark(frame: Any, event: str, arg: Any) -> Any:
        # The first close() waits just before it marks the store closed, until the second one
        # has passed the same check (or waits to make it).
        if frame.f_code is not mpstore.Store.close.__code__:
            return None
        if event == "line" and frame.f_lineno == mark:
            if threading.get_ident() in second_thread:
                second_arrived.set()
            else:
                assert second_arrived.wait(10)
        return hold_at_mark

    def close(second: bool) -> None:
        if second:
            second_thread.add(threading.get_ident())
        sys.settrace(hold_at_mark)
        try:
            closing.close()
        finally:
            sys.settrace(None)

    first_close = threading.Thread(target=close, args=(False,))
    first_close.start()
    second_close = threading.Thread(target=close, args=(True,))
    second_close.start()
    first_close.join()
    second_close.join()
    assert staying._gate.users == 1
    notes = staying.collection("notes", Note, key="id")
    notes.upsert(Note(id="a", text="x"))
    assert staying._gate._os is not None  # still open between writes
    staying.close()
    assert staying._gate.users == 0


def test_a_collection_write_racing_close_ends_typed(db_path: str) -> None:
    """close() lets a write that has begun to use the mailbox finish, so it never meets the
    mailbox closed under it (a ValueError from the unmapped file, before)."""
    store = mpstore.Store(db_path)
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="warm", text="x"))
    paused, go = threading.Event(), threading.Event()
    writer: set[int] = set()

    class SignallingCondition(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            go.set()  # close() waits for the writes using the mailbox
            return super().wait(timeout)

    store._followers_done = SignallingCondition(store._followers_lock)
    mailbox = store._carrier()
    assert mailbox is not None
    gate_free = mailbox.gate_free

    def pausing_gate_free() -> bool:
        if threading.get_ident() in writer:
            paused.set()
            assert go.wait(10)
        return gate_free()

    mailbox.gate_free = pausing_gate_free  # type: ignore[method-assign]
    outcome: list[object] = []

    def write() -> None:
        writer.add(threading.get_ident())
        try:
            outcome.append(notes.upsert(Note(id="a", text="x")))
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=write)
    t.start()
    assert paused.wait(10)
    store.close()  # finishes first, unless it waits for the write
    go.set()
    t.join()
    assert len(outcome) == 1
    assert outcome[0] is None or isinstance(outcome[0], mpstore.StoreClosed), outcome


def test_gate_timeout_behind_a_thread_of_this_process_says_so(db_path: str) -> None:
    with mpstore.Store(db_path, timeout=0.2) as store:
        notes = store.collection("notes", Note, key="id")
        caught: list[BaseException] = []

        def upsert() -> None:
            try:
                notes.upsert(Note(id="a", text="x"))
            except BaseException as exc:
                caught.append(exc)

        with store.write():
            t = threading.Thread(target=upsert)
            t.start()
            t.join()
        assert len(caught) == 1 and isinstance(caught[0], mpstore.GateTimeout)
        assert "another thread of this process" in str(caught[0])
        assert notes.get("a") is None


def test_import_mpstore_is_light() -> None:
    # Loading the pytest plugin imports the package in every test run of every project that has
    # mpstore installed; pydantic comes in with the first collection. The last line is the
    # control: the check does see pydantic once it is loaded.
    code = (
        "import sys, mpstore\n"
        "print('pydantic' in sys.modules)\n"
        "mpstore.Store, mpstore.MpstoreError\n"
        "print('pydantic' in sys.modules)\n"
        "mpstore.Collection\n"
        "print('pydantic' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False", "True"]


def test_close_lets_queued_writes_finish(db_path: str) -> None:
    store = mpstore.Store(db_path)
    notes = store.collection("notes", Note, key="id")
    queued = threading.Barrier(5)
    results: list[BaseException | None] = []

    def upsert(i: int) -> None:
        queued.wait()
        try:
            notes.upsert(Note(id=f"q{i}", text="x"))
            results.append(None)
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=upsert, args=(i,)) for i in range(4)]
    with store.write():
        for t in threads:
            t.start()
        queued.wait()
        while workers.pending_writes(store) < 4:
            os.sched_yield()  # until all four have queued behind this block
        closer = threading.Thread(target=store.close)
        closer.start()
        while not store.closed:
            os.sched_yield()
    closer.join()
    for t in threads:
        t.join()
    assert results == [None] * 4
    with mpstore.Store(db_path) as again:
        assert again.collection("notes", Note, key="id").count() == 4


@pytest.mark.parametrize("event", ["commit", "gate-released"])
def test_a_hook_failing_after_commit_does_not_report_a_committed_write_as_failed(
    db_path: str, event: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def hook(name: str) -> None:
        if name == event:
            raise RuntimeError("broken instrumentation")

    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    with mpstore.Store(db_path, on_event=hook) as store:
        store.collection("notes", Note, key="id").upsert(Note(id="a", text="x"))
        assert store.collection("notes", Note, key="id").get("a") is not None
    assert reported and isinstance(reported[0].exc_value, RuntimeError)


def test_a_hook_failing_after_commit_is_printed_by_pythons_default_hook(
    db_path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def hook(name: str) -> None:
        if name == "commit":
            raise RuntimeError("broken instrumentation")

    # Python's own hook, which accepts only the interpreter's argument type (pytest's is looser).
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    with mpstore.Store(db_path, on_event=hook) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="a", text="x"))
        assert notes.get("a") is not None
    err = capsys.readouterr().err
    assert "on_event hook failed at 'commit'" in err
    assert "RuntimeError: broken instrumentation" in err


def test_a_hook_failing_before_commit_aborts_the_write(db_path: str) -> None:
    def hook(name: str) -> None:
        if name == "begin":
            raise RuntimeError("injected")

    with mpstore.Store(db_path) as store:
        notes = store.collection("notes", Note, key="id")
        store.on_event = hook
        with pytest.raises(RuntimeError, match="injected"):
            notes.upsert(Note(id="a", text="x"))
        store.on_event = None
        assert notes.get("a") is None
        # Nothing of that transaction is left open: the next write starts its own.
        notes.upsert(Note(id="b", text="x"))
        assert notes.get("b") is not None


def test_a_hook_failing_as_a_read_gets_its_connection_gives_it_back(db_path: str) -> None:
    def hook(name: str) -> None:
        if name == "pool-acquired":
            raise RuntimeError("injected")

    with mpstore.Store(db_path, pool_size=2, timeout=0.5) as store:
        store.on_event = hook
        for _ in range(3):
            with pytest.raises(RuntimeError, match="injected"):
                store.query("SELECT 1")
        store.on_event = None
        assert store.query("SELECT 1") == [(1,)]


@pytest.mark.skipif(not _mailbox.available(), reason="the mailbox needs Linux")
def test_a_failing_wake_up_after_commit_neither_fails_the_write_nor_keeps_the_store_open(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    store = mpstore.Store(db_path)
    notes = store.collection("notes", Note, key="id")
    mailbox = store._gate.mailbox()
    assert mailbox is not None

    def no_descriptors_left() -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(mailbox, "wake_next", no_descriptors_left)
    notes.upsert(Note(id="a", text="x"))  # committed: must not be reported as failed
    assert notes.get("a") is not None
    assert reported and isinstance(reported[0].exc_value, OSError)
    store.close()
    assert store._wconn is None and store._gate.users == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_a_forked_child_does_not_wait_for_the_parents_mailbox_writes(db_path: str) -> None:
    store = mpstore.Store(db_path)
    store._following = 1  # as if another thread's write waited in the mailbox at the fork
    try:
        assert workers.report_from_forked_child(lambda: str(store._following).encode()) == b"0"
    finally:
        store._following = 0
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_a_forked_child_opens_and_closes_stores_whatever_the_parents_threads_held(
    db_path: str,
) -> None:
    """Only the forking thread survives a fork: a lock another thread held stays held in the
    child for good. The child must not need any of the locks such threads may hold: the
    registry of gates (another thread opening a store), the write queue's and the
    checkpointer's own (a write, a WAL check)."""
    store = mpstore.Store(db_path)
    store.collection("notes", Note, key="id").upsert(Note(id="a", text="x"))
    held = [gate_registry_lock(), store._queue._cond, store._checkpointer._shm_lock]
    inside, release = threading.Barrier(len(held) + 1), threading.Event()

    def hold(lock: Any) -> None:
        with lock:
            inside.wait()
            release.wait()

    holders = [threading.Thread(target=hold, args=(lock,)) for lock in held]
    for t in holders:
        t.start()
    inside.wait()

    def child() -> bytes:
        # The steps run in a thread, so a step stuck on a lock is reported, not waited for.
        done = threading.Event()

        def steps() -> None:
            mpstore.Store(db_path + "-other").close()
            store.close()
            done.set()

        threading.Thread(target=steps, daemon=True).start()
        return b"ok" if done.wait(10) else b"stuck"

    try:
        assert workers.report_from_forked_child(child) == b"ok"
    finally:
        release.set()
        for t in holders:
            t.join()
        store.close()


def test_comments_before_a_statement_are_skipped_once(store: mpstore.Store) -> None:
    """Blanks and comments before the keyword are looked past, each once: a statement after
    many of them is checked at once (before, the check took time exponential in their
    number), and one that ends the transaction is still refused behind them."""
    comments = "/**/ -- note\n " * 40
    with store.write() as conn:
        assert conn.execute(comments + "SELECT 1").fetchall() == [(1,)]
    with pytest.raises(mpstore.TransactionError), store.write() as conn:
        conn.execute(comments + "COMMIT")
