"""Group commit: queued writes share one transaction, yet each caller gets its own outcome."""

from __future__ import annotations

import contextvars
import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import pytest

import mpstore
from mpstore import _sqlite, _writer
from tests import workers
from tests.models import Note


def _queue_behind_a_write_block(
    store: mpstore.Store, calls: list[Callable[[], Any]]
) -> list[tuple[str, Any]]:
    """Start ``calls`` in threads while this thread holds the gate, so that they all queue; let
    them run as one batch; return each call's ("ok", result) or ("error", exception)."""
    outcomes: list[tuple[str, Any]] = [("missing", None)] * len(calls)

    def run(i: int) -> None:
        try:
            outcomes[i] = ("ok", calls[i]())
        except BaseException as exc:
            outcomes[i] = ("error", exc)

    with store.write():
        threads = []
        for i in range(len(calls)):
            t = threading.Thread(target=run, args=(i,))
            t.start()
            threads.append(t)
            while workers.pending_writes(store) < i + 1:
                os.sched_yield()  # queued in this order, behind this block
    for t in threads:
        t.join()
    return outcomes


def test_one_failing_write_does_not_touch_the_others(store: mpstore.Store) -> None:
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="shared", text=""))

    def boom(n: Note) -> Note:
        raise RuntimeError("this caller's own error")

    outcomes = _queue_behind_a_write_block(
        store,
        [
            lambda: notes.upsert(Note(id="a", text="x")),
            lambda: notes.update("shared", boom),
            lambda: notes.upsert(Note(id="c", text="x")),
        ],
    )
    assert [o[0] for o in outcomes] == ["ok", "error", "ok"]
    assert isinstance(outcomes[1][1], RuntimeError)
    assert {n.id for n in notes.scan()} == {"shared", "a", "c"}
    assert store.stats()["batch_size"]["max"] == 3


def test_a_callback_that_tries_to_commit_the_batch_changes_nobody_elses_write(
    store: mpstore.Store,
) -> None:
    """A COMMIT run inside the shared transaction would make the writes before it durable; if
    the batch then ran them again, they would be applied twice."""
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="counter", text=""))
    notes.upsert(Note(id="other", text=""))

    def commits(n: Note) -> Note:
        with store.write() as conn:  # nested in the batch: a SAVEPOINT
            conn.execute("COMMIT")
        return n

    outcomes = _queue_behind_a_write_block(
        store,
        [
            lambda: notes.update("counter", lambda n: n.model_copy(update={"text": n.text + "+"})),
            lambda: notes.update("other", commits),
            lambda: notes.update("counter", lambda n: n.model_copy(update={"text": n.text + "+"})),
        ],
    )
    assert [o[0] for o in outcomes] == ["ok", "error", "ok"]
    assert isinstance(outcomes[1][1], mpstore.TransactionError)
    counter = notes.get("counter")
    assert counter is not None and counter.text == "++"


def test_queued_writes_apply_in_queue_order(store: mpstore.Store) -> None:
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="log", text=""))

    def append(tag: str) -> Callable[[], Any]:
        return lambda: notes.update("log", lambda n: n.model_copy(update={"text": n.text + tag}))

    outcomes = _queue_behind_a_write_block(store, [append(t) for t in "abcdefgh"])
    assert all(kind == "ok" for kind, _ in outcomes)
    got = notes.get("log")
    assert got is not None and got.text == "abcdefgh"


def test_no_caller_hears_done_before_commit(db_path: str) -> None:
    events: list[str] = []
    with mpstore.Store(db_path, on_event=events.append) as store:
        notes = store.collection("notes", Note, key="id")

        def upsert(i: int) -> Callable[[], Any]:
            def call() -> None:
                notes.upsert(Note(id=str(i), text="x"))
                events.append(f"returned {i}")

            return call

        events.clear()
        _queue_behind_a_write_block(store, [upsert(i) for i in range(4)])
    commits = [i for i, e in enumerate(events) if e == "commit"]
    returns = [i for i, e in enumerate(events) if e.startswith("returned")]
    assert len(commits) == 2  # the blocking write() block's, then the batch's
    assert len(returns) == 4 and min(returns) > commits[-1]


def test_a_write_that_ends_the_transaction_does_not_take_the_batch_with_it(
    store: mpstore.Store,
) -> None:
    notes = store.collection("notes", Note, key="id")
    with store.write() as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON notes WHEN NEW.key = 'bad' "
            "BEGIN SELECT RAISE(ROLLBACK, 'refused'); END"
        )
    outcomes = _queue_behind_a_write_block(
        store,
        [
            lambda: notes.upsert(Note(id="a", text="x")),
            lambda: notes.upsert(Note(id="bad", text="x")),
            lambda: notes.upsert(Note(id="c", text="x")),
        ],
    )
    # RAISE(ROLLBACK) rolled back the whole transaction, "a" included: every caller told "ok"
    # must find its row, and the refused one none.
    assert [o[0] for o in outcomes] == ["ok", "error", "ok"]
    assert sorted(notes.keys()) == ["a", "c"]


def test_a_queued_write_that_times_out_never_runs(tmp_path: Any) -> None:
    path = str(tmp_path / "state.db")
    with mpstore.Store(path) as setup:
        setup.collection("notes", Note, key="id")
    with mpstore.Store(path, timeout=0.3) as store:
        notes = store.collection("notes", Note, key="id")
        with workers.holding_the_gate(path), pytest.raises(mpstore.GateTimeout):
            notes.upsert(Note(id="late", text="x"))
        notes.upsert(Note(id="after", text="x"))  # the writer thread has had its turn since
        assert notes.get("late") is None and notes.get("after") is not None


def test_closing_the_store_from_an_update_callback(store: mpstore.Store) -> None:
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="n", text=""))

    def close_then_change(n: Note) -> Note:
        store.close()
        return n.model_copy(update={"text": "changed"})

    # Queued behind a write block, the update runs in the writer thread.
    outcomes = _queue_behind_a_write_block(store, [lambda: notes.update("n", close_then_change)])
    assert outcomes[0][0] == "ok", outcomes[0]
    assert store.closed
    with mpstore.Store(store.path) as again:
        got = again.collection("notes", Note, key="id").get("n")
        assert got is not None and got.text == "changed"


@pytest.mark.parametrize("kind", ["TRIGGER", "TEMP TRIGGER"])
def test_a_trigger_made_after_a_batch_ran_without_savepoints_still_gets_them(
    store: mpstore.Store, kind: str
) -> None:
    # The answer "one-row writes undo themselves" is remembered per schema; a temp trigger
    # (the write connection's own) does not change the file's schema version.
    notes = store.collection("notes", Note, key="id")
    with store.write() as conn:
        conn.execute("CREATE TABLE audit (key TEXT)")
    outcomes = _queue_behind_a_write_block(
        store, [lambda k=k: notes.upsert(Note(id=k, text="x")) for k in ("a", "b")]
    )
    assert [o[0] for o in outcomes] == ["ok", "ok"]
    with store.write() as conn:
        conn.execute(
            f"CREATE {kind} refuse BEFORE INSERT ON main.notes WHEN NEW.key = 'bad' "
            "BEGIN INSERT INTO audit VALUES (NEW.key); SELECT RAISE(FAIL, 'refused'); END"
        )
    outcomes = _queue_behind_a_write_block(
        store, [lambda k=k: notes.upsert(Note(id=k, text="x")) for k in ("c", "bad", "d")]
    )
    assert [o[0] for o in outcomes] == ["ok", "error", "ok"]
    assert sorted(notes.keys()) == ["a", "b", "c", "d"]
    assert store.query("SELECT count(*) FROM audit") == [(0,)]


def test_a_queued_write_whose_trigger_fails_midway_leaves_nothing(store: mpstore.Store) -> None:
    # RAISE(FAIL) keeps what its statement did before it (here the trigger's audit row): only
    # the write's own SAVEPOINT takes that back. Writes on tables without triggers skip it.
    notes = store.collection("notes", Note, key="id")
    with store.write() as conn:
        conn.execute("CREATE TABLE audit (key TEXT)")
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON notes WHEN NEW.key = 'bad' "
            "BEGIN INSERT INTO audit VALUES (NEW.key); SELECT RAISE(FAIL, 'refused'); END"
        )
    outcomes = _queue_behind_a_write_block(
        store, [lambda k=k: notes.upsert(Note(id=k, text="x")) for k in ("a", "bad", "c")]
    )
    assert [o[0] for o in outcomes] == ["ok", "error", "ok"]
    assert sorted(notes.keys()) == ["a", "c"]
    assert store.query("SELECT count(*) FROM audit") == [(0,)]


def test_a_write_behind_another_thread_of_its_process_queues_at_once(
    store: mpstore.Store,
) -> None:
    # That thread's turn carries it: trying the gate first, and the mailbox, only cost the
    # process's other threads the GIL.
    notes = store.collection("notes", Note, key="id")
    tries: list[int] = []
    try_acquire = store._gate.try_acquire

    def counted() -> bool:
        tries.append(threading.get_ident())
        return try_acquire()

    store._gate.try_acquire = counted  # type: ignore[method-assign]
    outcomes = _queue_behind_a_write_block(
        store, [lambda i=i: notes.upsert(Note(id=str(i), text="x")) for i in range(3)]
    )
    assert outcomes == [("ok", None)] * 3
    assert tries == []
    assert notes.count() == 3


def test_a_write_queued_as_its_store_closes_is_refused_at_once(db_path: str) -> None:
    # Another thread of the process holds the gate (through another store on the file), so the
    # write goes to the queue; its store is closed just before (here by its own hook). The
    # write must hear StoreClosed, not wait for the gate on a closed store.
    closing = mpstore.Store(db_path, timeout=5)
    notes = closing.collection("notes", Note, key="id")
    closing.on_event = lambda event: closing.close() if event == "gate-wait" else None
    with mpstore.Store(db_path) as other:
        with workers.held_by_another_thread(other.write):
            with pytest.raises(mpstore.StoreClosed):
                notes.upsert(Note(id="late", text="x"))
            assert closing._queue._thread is None  # no writer thread left waiting for the gate
        assert other.collection("notes", Note, key="id").get("late") is None


def _count_runs(
    monkeypatch: pytest.MonkeyPatch, then: Callable[[Any], None] | None = None
) -> list[int]:
    """Count the writes of each run of upserts made one statement (see ``run_upserts``)."""
    sizes: list[int] = []
    real = _sqlite.run_upserts

    def counted(conn: Any, ops: Any) -> None:
        sizes.append(len(ops))
        if then is not None:
            then(conn)
        real(conn, ops)

    monkeypatch.setattr(_sqlite, "run_upserts", counted)
    return sizes


def test_queued_upserts_run_as_one_statement_and_a_failing_one_fails_alone(
    store: mpstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    notes = store.collection("notes", Note, key="id")
    sizes = _count_runs(monkeypatch)
    with store.write() as conn:  # SQLite refuses a value this long: that write alone fails
        conn._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 400)
    outcomes = _queue_behind_a_write_block(
        store,
        [
            lambda i=i: notes.upsert(Note(id=f"n{i}", text="x" * (500 if i == 2 else 5)))
            for i in range(5)
        ],
    )
    assert sizes == [5, 2]  # one statement up to the failing write, then one for the rest
    assert [o[0] for o in outcomes] == ["ok", "ok", "error", "ok", "ok"]
    assert isinstance(outcomes[2][1], sqlite3.DataError)
    assert sorted(notes.keys()) == ["n0", "n1", "n3", "n4"]


def test_a_run_of_upserts_that_ends_the_transaction_runs_again_but_the_failed_one(
    store: mpstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    notes = store.collection("notes", Note, key="id")
    ended: list[bool] = []

    def end_once(conn: Any) -> None:
        if not ended:  # as a full disk would: the transaction is gone
            ended.append(True)
            conn._conn.execute("ROLLBACK")  # below mpstore's checks, as SQLite itself would
            raise sqlite3.OperationalError("database or disk is full")

    notes.upsert(Note(id="gone", text="x"))
    sizes = _count_runs(monkeypatch, end_once)
    # The delete runs first, in the transaction the run of upserts then ends: it must run again.
    calls: list[Callable[[], Any]] = [lambda: notes.delete("gone")]
    calls += [lambda i=i: notes.upsert(Note(id=f"n{i}", text="x")) for i in range(4)]
    outcomes = _queue_behind_a_write_block(store, calls)
    assert sizes == [4, 3]  # the write that ended it keeps its error; the rest run again
    assert outcomes[:2] == [("ok", True), ("error", outcomes[1][1])]
    assert isinstance(outcomes[1][1], sqlite3.OperationalError)
    assert outcomes[2:] == [("ok", None)] * 3
    assert sorted(notes.keys()) == ["n1", "n2", "n3"]


def test_writes_before_a_failing_one_in_a_run_of_upserts_are_kept_as_they_ran(
    store: mpstore.Store,
) -> None:
    # A unique index made by hand: b replaces a's text, so c may take it; d cannot. Run one
    # by one after the failure, a would meet c's row and fail, as it never would have alone.
    notes = store.collection("notes", Note, key="id")
    with store.write() as conn:
        conn.execute("CREATE UNIQUE INDEX notes_text ON notes(json_extract(value, '$.text'))")
    outcomes = _queue_behind_a_write_block(
        store,
        [
            lambda: notes.upsert(Note(id="a", text="e")),
            lambda: notes.upsert(Note(id="a", text="g")),
            lambda: notes.upsert(Note(id="c", text="e")),
            lambda: notes.upsert(Note(id="d", text="g")),
        ],
    )
    assert [o[0] for o in outcomes] == ["ok", "ok", "ok", "error"]
    assert isinstance(outcomes[3][1], sqlite3.IntegrityError)
    assert sorted((n.id, n.text) for n in notes.scan()) == [("a", "g"), ("c", "e")]


def test_a_malformed_upsert_among_a_run_fails_alone(store: mpstore.Store) -> None:
    # As a damaged or forged mailbox slot would bring: a row one column too wide. It fails
    # before any SQL runs, so it must not be taken for the first write of the run.
    notes = store.collection("notes", Note, key="id")

    def upsert(row: tuple[Any, ...]) -> Callable[[], Any]:
        return lambda: store._run_op(("upsert", "notes", (), [row], ()))

    calls = [upsert((k, f'{{"id":"{k}","text":"x"}}')) for k in "abc"]
    calls.append(upsert(("d", "{}", "one too many")))
    outcomes = _queue_behind_a_write_block(store, calls)
    assert [o[0] for o in outcomes] == ["ok", "ok", "ok", "error"]
    assert isinstance(outcomes[3][1], mpstore.MpstoreError)
    assert sorted(notes.keys()) == ["a", "b", "c"]


def test_a_queued_callback_sees_its_callers_context_variables(store: mpstore.Store) -> None:
    # It runs in the writer thread; a write given as data runs no code of the caller's, so
    # only a callback carries the caller's context there.
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="n", text=""))
    tag: contextvars.ContextVar[str] = contextvars.ContextVar("tag", default="none")
    seen: list[str] = []

    def tagged(value: str) -> Callable[[], Any]:
        def call() -> Any:
            tag.set(value)
            return notes.update("n", lambda n: seen.append(tag.get()) or n)

        return call

    outcomes = _queue_behind_a_write_block(store, [tagged("a"), tagged("b")])
    assert [o[0] for o in outcomes] == ["ok", "ok"]
    assert seen == ["a", "b"]


def test_a_latch_is_waited_for_until_set_and_stays_set() -> None:
    latch = _writer._Latch()
    assert latch.wait(0.0) is False
    assert latch.wait(-1.0) is False  # a deadline already past waits not at all
    threading.Thread(target=latch.set).start()
    assert latch.wait(30) is True
    assert latch.wait() is True and latch.wait(0.0) is True
