"""The Hypothesis example database on mpstore: its contract, its listeners, many processes."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.database import (
    DirectoryBasedExampleDatabase,
    ExampleDatabase,
    InMemoryExampleDatabase,
    ListenerEventT,
)
from hypothesis.stateful import Bundle, RuleBasedStateMachine, rule, run_state_machine_as_test

import mpstore
import mpstore.hypothesis
from mpstore import _fork
from mpstore.hypothesis import (
    CHANGES_TABLE,
    EXAMPLES_TABLE,
    ExampleDatabaseWarning,
    SQLiteExampleDatabase,
)
from tests import example_db_workers as w
from tests import workers

WAIT = 60.0  # generous: the machine is shared; a healthy wait ends in milliseconds


class Recorder:
    """A listener that keeps every event and the thread it arrived on, and can be waited on."""

    def __init__(self) -> None:
        self.events: list[ListenerEventT] = []
        self.threads: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, event: ListenerEventT) -> None:
        with self._cond:
            self.events.append(event)
            self.threads.append(threading.current_thread().name)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[ListenerEventT]], bool]) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.events), timeout=WAIT)

    def wait_count(self, n: int) -> list[ListenerEventT]:
        assert self.wait_for(lambda events: len(events) >= n), f"only {self.events}"
        return list(self.events)


@pytest.fixture
def ex_path(tmp_path: Path) -> str:
    return str(tmp_path / "examples.db")


@pytest.fixture
def db(ex_path: str) -> Iterator[SQLiteExampleDatabase]:
    database = SQLiteExampleDatabase(ex_path, poll_interval=0.01)
    yield database
    database.close()


def dump(path: str) -> list[Any]:
    with mpstore.Store(path) as store:
        return store.query(f"SELECT key, value FROM {EXAMPLES_TABLE} ORDER BY key, value")


# -- the state machine Hypothesis uses for its own backends -----------------------------------


class MoveKeepsSource(SQLiteExampleDatabase):
    """Broken on purpose: a move that forgets to delete the source."""

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.save(dest, value)


class SaveTwice(SQLiteExampleDatabase):
    """Broken on purpose: values stored without the (key, value) uniqueness."""

    def fetch(self, key: bytes) -> Iterator[bytes]:
        for value in super().fetch(key):
            yield value
            yield value


def comparison_machine(factory: type[SQLiteExampleDatabase]) -> type[RuleBasedStateMachine]:
    class DatabaseComparison(RuleBasedStateMachine):
        """Every operation goes to two instances on one file and to InMemoryExampleDatabase.

        The first instance's events (its own, heard before each call returns) must match the
        in-memory database's exactly; the second instance repeats each operation after the
        first, so it never changes anything itself, and hears every change from its polling
        thread.
        """

        keys = Bundle("keys")
        values = Bundle("values")

        def __init__(self) -> None:
            super().__init__()
            self.tmp = tempfile.mkdtemp(prefix="mpstore-exdb-")
            path = os.path.join(self.tmp, "examples.db")
            self.first = factory(path, poll_interval=0.005)
            self.second = factory(path, poll_interval=0.005)
            self.memory = InMemoryExampleDatabase()
            self.dbs: list[ExampleDatabase] = [self.first, self.memory, self.second]
            self.heard_first, self.heard_memory, self.heard_second = (
                Recorder(),
                Recorder(),
                Recorder(),
            )
            self.first.add_listener(self.heard_first)
            self.memory.add_listener(self.heard_memory)
            self.second.add_listener(self.heard_second)

        @rule(target=keys, k=st.binary(max_size=4))
        def k(self, k: bytes) -> bytes:
            return k

        @rule(target=values, v=st.binary(max_size=4))
        def v(self, v: bytes) -> bytes:
            return v

        @rule(k=keys, v=values)
        def save(self, k: bytes, v: bytes) -> None:
            for database in self.dbs:
                database.save(k, v)

        @rule(k=keys, v=values)
        def delete(self, k: bytes, v: bytes) -> None:
            for database in self.dbs:
                database.delete(k, v)

        @rule(k1=keys, k2=keys, v=values)
        def move(self, k1: bytes, k2: bytes, v: bytes) -> None:
            for database in self.dbs:
                database.move(k1, k2, v)

        @rule(k=keys)
        def values_agree(self, k: bytes) -> None:
            fetched = [list(database.fetch(k)) for database in self.dbs]
            for values in fetched:
                assert len(values) == len(set(values)), f"duplicates under {k!r}: {values}"
            assert set(fetched[0]) == set(fetched[1]) == set(fetched[2]), fetched

        @rule()
        def own_events_agree(self) -> None:
            assert self.heard_first.events == self.heard_memory.events

        def teardown(self) -> None:
            try:
                expected = self.heard_memory.events
                assert self.heard_first.events == expected
                self.heard_second.wait_for(lambda events: len(events) >= len(expected))
                assert self.heard_second.events == expected
            finally:
                self.first.close()
                self.second.close()
                shutil.rmtree(self.tmp)

    return DatabaseComparison


def test_behaves_like_the_in_memory_database() -> None:
    run_state_machine_as_test(comparison_machine(SQLiteExampleDatabase))


@pytest.mark.parametrize("broken", [MoveKeepsSource, SaveTwice])
def test_the_comparison_catches_a_broken_database(broken: type[SQLiteExampleDatabase]) -> None:
    # Negative control: the same machine against a deliberately broken backend must fail.
    # No example database (the expected failures are not kept) and no shrinking.
    quiet = settings(database=None, max_examples=200, deadline=None, phases=[Phase.generate])
    with pytest.raises(AssertionError):
        run_state_machine_as_test(comparison_machine(broken), settings=quiet)


# -- listeners ---------------------------------------------------------------------------------


def test_own_changes_are_broadcast_at_once_exactly_like_in_memory(
    db: SQLiteExampleDatabase,
) -> None:
    memory = InMemoryExampleDatabase()
    mine, theirs = Recorder(), Recorder()
    db.add_listener(mine)
    memory.add_listener(theirs)
    calls: list[Callable[[ExampleDatabase], None]] = [
        lambda d: d.save(b"k", b"1"),
        lambda d: d.save(b"k", b"1"),  # already there: no event
        lambda d: d.delete(b"k", b"2"),  # not there: no event
        lambda d: d.move(b"k", b"j", b"1"),  # delete then save
        lambda d: d.move(b"j", b"j", b"1"),  # src == dest and present: nothing
        lambda d: d.move(b"j", b"j", b"3"),  # src == dest and absent: a save
        lambda d: d.move(b"x", b"k", b"4"),  # absent at src: only the save
        lambda d: d.delete(b"j", b"1"),
    ]
    for call in calls:
        call(db)
        call(memory)
        assert mine.events == theirs.events  # heard before the call returned
    assert mine.events == [
        ("save", (b"k", b"1")),
        ("delete", (b"k", b"1")),
        ("save", (b"j", b"1")),
        ("save", (b"j", b"3")),
        ("save", (b"k", b"4")),
        ("delete", (b"j", b"1")),
    ]


@contextlib.contextmanager
def _two_instances(
    path: str,
    poll_interval: float = 0.005,
    cls: type[SQLiteExampleDatabase] = SQLiteExampleDatabase,
) -> Iterator[tuple[SQLiteExampleDatabase, SQLiteExampleDatabase]]:
    """A (of ``cls``, polling every ``poll_interval``) and B on one file, closed afterwards."""
    a, b = cls(path, poll_interval=poll_interval), SQLiteExampleDatabase(path)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _hear_other_instance(cls: type[SQLiteExampleDatabase], path: str) -> list[ListenerEventT]:
    """A listens and saves x; B, another instance on the file, saves y then moves it.

    Changes are delivered in commit order, so once A has heard B's last change it has also
    looked at the log row of its own save: any echo of it would be in the list by then.
    """
    heard = Recorder()
    with _two_instances(path, cls=cls) as (a, b):
        a.add_listener(heard)
        a.save(b"k", b"x")
        b.save(b"k", b"y")
        b.move(b"k", b"m", b"y")
        heard.wait_for(lambda events: ("save", (b"m", b"y")) in events)
        return list(heard.events)


def test_changes_of_another_instance_are_heard_once(ex_path: str) -> None:
    assert _hear_other_instance(SQLiteExampleDatabase, ex_path) == [
        ("save", (b"k", b"x")),
        ("save", (b"k", b"y")),
        ("delete", (b"k", b"y")),
        ("save", (b"m", b"y")),
    ]


class EchoesOwnChanges(SQLiteExampleDatabase):
    """Broken on purpose: the polling thread and the calling threads each keep their own
    count of what they delivered, so whichever delivers a change second delivers it again."""

    def _start_listening(self) -> None:
        with self._delivery:  # held by add_listener too: the poller waits for the counts
            super()._start_listening()
            self._counts = {True: self._delivered, False: self._delivered}

    def _deliver(self, read: Callable[[int, int], list[tuple[Any, ...]]], upto: int) -> None:
        polling = threading.current_thread().name.startswith("mpstore-hypothesis-listener")
        with self._delivery:
            self._delivered = self._counts[polling]
            super()._deliver(read, upto)
            self._counts[polling] = self._delivered


def test_own_changes_echoed_by_the_poller_would_be_noticed(ex_path: str) -> None:
    # Negative control for the test above: an instance that forgets what it delivered hears
    # its save twice.
    events = _hear_other_instance(EchoesOwnChanges, ex_path)
    assert events.count(("save", (b"k", b"x"))) >= 2


def test_listeners_hear_changes_in_commit_order(ex_path: str) -> None:
    # Another process saves, then this one deletes: a listener that replays the events must
    # end where the file is, so it must hear the save first, though the polling thread (slow
    # here) has not yet looked.
    heard = Recorder()
    with _two_instances(ex_path, poll_interval=3600) as (a, b):
        a.add_listener(heard)
        b.save(b"k", b"v")
        a.delete(b"k", b"v")
        assert heard.events == [("save", (b"k", b"v")), ("delete", (b"k", b"v"))]
        assert list(a.fetch(b"k")) == []


def test_a_listener_may_remove_itself_or_close_the_database_without_a_hang(
    ex_path: str,
) -> None:
    # The polling thread wakes on the same commit and waits for the delivery under way, whose
    # listener then waits for the polling thread to stop.
    for trial, how in enumerate(["remove", "close"] * 10):
        database = SQLiteExampleDatabase(ex_path, poll_interval=0.001)
        heard = Recorder()
        once = _one_shot(database, heard, how)
        database.add_listener(once)
        value = f"{how} {trial}".encode()
        saver = threading.Thread(target=database.save, args=(b"k", value))
        saver.start()
        saver.join(WAIT)
        assert not saver.is_alive(), f"save() hung in a listener that did {how}"
        assert heard.events == [("save", (b"k", value))]
        for thread in _listener_threads(ex_path):  # it may be the one that ran the listener
            thread.join(WAIT)
        assert _listener_threads(ex_path) == []
        database.close()


def _one_shot(
    database: SQLiteExampleDatabase, heard: Recorder, how: str
) -> Callable[[ListenerEventT], None]:
    """A listener that records its first event, then removes itself or closes the database."""

    def once(event: ListenerEventT) -> None:
        heard(event)
        if how == "remove":
            database.remove_listener(once)
        else:
            database.close()

    return once


def test_changes_a_listener_makes_are_heard_after_the_one_it_heard(
    ex_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No polling thread: it could hear b's first save before b's second is committed.
    monkeypatch.setattr(mpstore.hypothesis._Poller, "_run", lambda self: None)
    first, second = Recorder(), Recorder()
    with _two_instances(ex_path, poll_interval=3600) as (a, b):

        def delete_what_was_saved(event: ListenerEventT) -> None:
            first(event)
            if event[0] == "save":
                a.delete(*event[1])

        a.add_listener(delete_what_was_saved)
        a.add_listener(second)
        b.save(b"k", b"1")
        b.save(b"k", b"2")
        a.save(b"k", b"3")  # delivers the three saves, then the deletes the listener made
        saves = [("save", (b"k", v)) for v in (b"1", b"2", b"3")]
        deletes = [("delete", (b"k", v)) for v in (b"1", b"2", b"3")]
        assert first.events == second.events == saves + deletes  # commit order, each once
        assert list(a.fetch(b"k")) == []


def test_a_listener_interrupted_still_lets_the_others_hear(
    db: SQLiteExampleDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every change is delivered by the saving thread here, where the interrupt propagates.
    monkeypatch.setattr(mpstore.hypothesis._Poller, "_run", lambda self: None)
    heard = Recorder()

    def interrupted(event: ListenerEventT) -> None:
        raise KeyboardInterrupt

    db.add_listener(interrupted)
    db.add_listener(heard)
    with pytest.raises(KeyboardInterrupt):
        db.save(b"k", b"1")
    db.remove_listener(interrupted)
    db.save(b"k", b"2")
    assert heard.events == [("save", (b"k", b"1")), ("save", (b"k", b"2"))]


def test_the_polling_thread_goes_on_after_an_sqlite_error(
    ex_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    read = mpstore.hypothesis._Poller._read
    failures = iter([sqlite3.OperationalError("database is locked")] * 20)  # it lasts a while

    def flaky(self: Any, conn: sqlite3.Connection, after: int, upto: int) -> Any:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return read(self, conn, after, upto)

    monkeypatch.setattr(mpstore.hypothesis._Poller, "_read", flaky)
    heard = Recorder()
    with _two_instances(ex_path) as (a, b):
        a.add_listener(heard)
        b.save(b"k", b"1")
        assert heard.wait_count(1) == [("save", (b"k", b"1"))]
        assert [str(e) for e in reported] == ["database is locked"]


def test_a_listener_may_close_the_database_add_another_and_save(ex_path: str) -> None:
    # The delivery under way then reads the log through the store opened again.
    heard = Recorder()
    with _two_instances(ex_path, poll_interval=3600) as (a, b):

        def reopen(event: ListenerEventT) -> None:
            a.close()
            a.add_listener(heard)
            a.save(b"k", b"from the listener")

        a.add_listener(reopen)
        a.save(b"k", b"first")
        assert heard.events == [("save", (b"k", b"from the listener"))]
        assert sorted(b.fetch(b"k")) == [b"first", b"from the listener"]


def test_a_change_whose_delivery_fails_is_made_and_heard_later(
    ex_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    query = mpstore.Store.query
    failures = iter([mpstore.PoolTimeout("no read connection became free", ex_path)])

    def flaky(self: mpstore.Store, sql: str, parameters: Any = ()) -> Any:
        failure = next(failures, None) if sql == mpstore.hypothesis._READ_LOG else None
        if failure is not None:
            raise failure
        return query(self, sql, parameters)

    monkeypatch.setattr(mpstore.Store, "query", flaky)
    # No polling thread: the next delivery, the saving thread's here, catches up.
    monkeypatch.setattr(mpstore.hypothesis._Poller, "_run", lambda self: None)
    heard = Recorder()
    with _two_instances(ex_path) as (a, b):
        a.add_listener(heard)
        with pytest.warns(ExampleDatabaseWarning, match="save made; its listeners hear"):
            a.save(b"k", b"v")
        assert list(b.fetch(b"k")) == [b"v"]
        assert heard.events == []
        a.save(b"k", b"w")
        assert heard.events == [("save", (b"k", b"v")), ("save", (b"k", b"w"))]


def test_a_polling_thread_that_cannot_start_is_not_kept(
    db: SQLiteExampleDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = mpstore.hypothesis._Poller.start

    def refuse(self: Any) -> None:
        monkeypatch.setattr(mpstore.hypothesis._Poller, "start", start)
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(mpstore.hypothesis._Poller, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start"):
        db.add_listener(Recorder())
    assert db._listeners == [] and db._poller is None
    heard = Recorder()
    db.add_listener(heard)
    assert len(_listener_threads(db.path)) == 1
    db.remove_listener(heard)
    assert _listener_threads(db.path) == []


def test_a_huge_poll_interval_does_not_kill_the_polling_thread(db: SQLiteExampleDatabase) -> None:
    huge = SQLiteExampleDatabase(db.path, poll_interval=1e12)
    huge.add_listener(Recorder())
    db.save(b"k", b"v")  # wakes nothing: only a change is heard, after the interval
    (thread,) = _listener_threads(db.path)
    assert huge._poller is not None and huge._poller._stopping.wait(0) is False
    huge.close()
    thread.join(WAIT)
    assert not thread.is_alive()


def test_a_listener_that_cannot_start_is_not_kept(
    db: SQLiteExampleDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hypothesis registers a listener before it starts listening; if that fails, a later
    # add_listener must start listening itself.
    def refuse() -> None:
        raise mpstore.GateTimeout("waited", db.path)

    monkeypatch.setattr(db, "_start_listening", refuse)
    with pytest.raises(mpstore.GateTimeout):
        db.add_listener(Recorder())
    assert db._listeners == []
    monkeypatch.undo()
    heard = Recorder()
    db.add_listener(heard)
    assert len(_listener_threads(db.path)) == 1
    other = SQLiteExampleDatabase(db.path)
    other.save(b"k", b"v")
    assert heard.wait_count(1) == [("save", (b"k", b"v"))]
    other.close()


def test_a_removed_listener_hears_nothing_more(ex_path: str) -> None:
    # Removed by another listener during a delivery: once remove_listener() has returned, it
    # hears nothing, as with Hypothesis's in-memory database.
    database = SQLiteExampleDatabase(ex_path, poll_interval=3600)
    removed = threading.Event()
    after_removal: list[ListenerEventT] = []

    def second(event: ListenerEventT) -> None:
        if removed.is_set():
            after_removal.append(event)

    def first(event: ListenerEventT) -> None:
        if not removed.is_set():
            database.remove_listener(second)
            removed.set()

    database.add_listener(first)
    database.add_listener(second)
    database.save(b"k", b"1")
    database.save(b"k", b"2")
    database.close()
    assert removed.is_set()
    assert after_removal == []


@pytest.mark.parametrize("removed_first", [False, True], ids=["added", "removed-and-added"])
def test_a_listener_added_during_a_delivery_hears_only_later_changes(
    ex_path: str, monkeypatch: pytest.MonkeyPatch, removed_first: bool
) -> None:
    # Another instance commits three changes; this instance's next save delivers them with
    # its own, in one read of the log. A listener added while the first is heard was added
    # after all four were committed: it hears only what comes after. So does one removed and
    # added back then: the listener added back is a new one.
    monkeypatch.setattr(mpstore.hypothesis._Poller, "_run", lambda self: None)  # no polling
    late = Recorder()
    with _two_instances(ex_path) as (a, b):

        def first(event: ListenerEventT) -> None:
            if event == ("save", (b"k", b"1")):
                if removed_first:
                    a.remove_listener(late)
                a.add_listener(late)

        a.add_listener(first)
        if removed_first:
            a.add_listener(late)
        for value in (b"1", b"2", b"3"):
            b.save(b"k", value)
        a.save(b"k", b"4")
        a.save(b"k", b"5")
    assert late.events == [("save", (b"k", b"5"))]


def test_the_polling_thread_goes_on_after_failing_to_connect(
    ex_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of descriptors, say: listening must not stop for good, with add_listener() having
    # returned as if all was well.
    reported: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    connect = sqlite3.connect
    failures = iter([sqlite3.OperationalError("unable to open database file")] * 3)

    def flaky(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        if threading.current_thread().name.startswith("mpstore-hypothesis-listener"):
            failure = next(failures, None)
            if failure is not None:
                raise failure
        return connect(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", flaky)
    heard = Recorder()
    with _two_instances(ex_path) as (a, b):
        a.add_listener(heard)
        b.save(b"k", b"1")
        assert heard.wait_count(1) == [("save", (b"k", b"1"))]
    assert len(reported) == 1 and "unable to open" in str(reported[0])


def test_changes_before_listening_are_not_replayed(ex_path: str) -> None:
    a, b = SQLiteExampleDatabase(ex_path, poll_interval=0.005), SQLiteExampleDatabase(ex_path)
    heard = Recorder()
    try:
        b.save(b"k", b"before")
        a.add_listener(heard)
        b.save(b"k", b"after")
        assert heard.wait_count(1) == [("save", (b"k", b"after"))]
        assert heard.threads[0].startswith("mpstore-hypothesis-listener")
    finally:
        a.close()
        b.close()


def _listener_threads(path: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"mpstore-hypothesis-listener:{path}"]


def test_the_polling_thread_runs_only_while_someone_listens(db: SQLiteExampleDatabase) -> None:
    first, second = Recorder(), Recorder()
    assert _listener_threads(db.path) == []
    db.add_listener(first)
    db.add_listener(second)
    assert len(_listener_threads(db.path)) == 1
    db.remove_listener(first)
    assert len(_listener_threads(db.path)) == 1
    db.remove_listener(second)
    assert _listener_threads(db.path) == []
    db.add_listener(first)
    assert len(_listener_threads(db.path)) == 1
    db.clear_listeners()
    assert _listener_threads(db.path) == []


def test_a_failing_listener_is_reported_and_the_others_still_hear(
    ex_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    a, b = SQLiteExampleDatabase(ex_path, poll_interval=0.005), SQLiteExampleDatabase(ex_path)
    heard = Recorder()

    def failing(event: ListenerEventT) -> None:
        raise RuntimeError(f"listener failed on {event}")

    try:
        a.add_listener(failing)
        a.add_listener(heard)
        b.save(b"k", b"1")
        b.save(b"k", b"2")
        assert heard.wait_count(2) == [("save", (b"k", b"1")), ("save", (b"k", b"2"))]
    finally:
        a.close()
        b.close()
    assert [str(e) for e in reported] == [
        "listener failed on ('save', (b'k', b'1'))",
        "listener failed on ('save', (b'k', b'2'))",
    ]


# -- identity, laziness, pickling, fork, bad input -------------------------------------------


def test_equality_hash_and_repr_follow_the_path(tmp_path: Path) -> None:
    a = SQLiteExampleDatabase(tmp_path / "a.db")
    same = SQLiteExampleDatabase(str(tmp_path / "x" / ".." / "a.db"))
    other = SQLiteExampleDatabase(tmp_path / "b.db")
    assert a == same and hash(a) == hash(same)
    assert a != other
    assert a != DirectoryBasedExampleDatabase(str(tmp_path / "a.db"))
    assert repr(a) == f"SQLiteExampleDatabase({str(tmp_path / 'a.db')!r})"
    assert eval(repr(a), {"SQLiteExampleDatabase": SQLiteExampleDatabase}) == a
    assert settings(database=a).database is a


def test_nothing_is_opened_before_first_use(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "examples.db"
    database = SQLiteExampleDatabase(path)
    assert not path.parent.exists()
    assert list(database.fetch(b"k")) == []
    assert path.exists()
    database.close()


def test_pickled_copies_share_the_file_and_not_the_listeners(db: SQLiteExampleDatabase) -> None:
    db.save(b"k", b"v")
    db.add_listener(Recorder())
    copy = pickle.loads(pickle.dumps(db))
    assert copy == db and copy.poll_interval == db.poll_interval
    assert list(copy.fetch(b"k")) == [b"v"]
    assert copy._listeners == []
    copy.close()


@pytest.mark.processes
def test_spawned_and_forked_children_use_the_same_file(db: SQLiteExampleDatabase) -> None:
    db.save(b"k", b"parent")  # the parent's store is open before the fork
    db.add_listener(Recorder())
    twin = eval(repr(db), {"SQLiteExampleDatabase": SQLiteExampleDatabase})  # equal, not it
    twin.add_listener(Recorder())
    listeners_in_spawned = workers.run_processes(w.save_in_child, [(db, b"spawned")])
    assert listeners_in_spawned == [0]
    # The forked child uses the parent's very objects (a Process target is not pickled under
    # fork), listeners, open store and all.
    assert _in_a_forked_child(lambda: [w.save_in_child(d, b"forked") for d in (db, twin)]) == [
        0,
        0,
    ]
    assert list(db.fetch(b"k")) == [b"forked", b"parent", b"spawned"]
    twin.close()


def _in_a_forked_child(fn: Callable[[], Any], timeout: float = WAIT) -> Any:
    """What ``fn`` returns in a child forked from this process (with its threads' state), or
    ``"hung"`` if it has not finished within ``timeout`` seconds."""
    fork = mp.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    child = fork.Process(target=lambda: send.send(fn()), daemon=True)
    child.start()
    send.close()
    try:
        return receive.recv() if receive.poll(timeout) else "hung"
    finally:
        child.kill()
        child.join()
        receive.close()


def _forks_while_listening(trials: int, timeout: float) -> list[str]:
    """Fork four children right after add_listener, while the polling thread opens its
    connection and reads the log; each uses the database and says "ok", or is "hung" if it
    has not within ``timeout`` seconds. Stops at the first trial with a hung child."""
    outcomes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(trials):
            database = SQLiteExampleDatabase(os.path.join(tmp, f"e{trial}.db"))
            database.save(b"k", b"parent")
            list(database.fetch(b"k"))  # an idle pooled connection too
            database.add_listener(Recorder())
            children = [_fork_child(database, i) for i in range(4)]
            outcomes += [_outcome(pid, pipe, timeout) for pid, pipe in children]
            database.close()
            if "hung" in outcomes:
                break
    return outcomes


def _fork_child(database: SQLiteExampleDatabase, i: int) -> tuple[int, int]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once, whatever happens
        try:
            value = f"child {i}".encode()
            database.save(b"k", value)
            os.write(write_end, b"ok" if value in list(database.fetch(b"k")) else b"lost")
        finally:
            os._exit(0)
    os.close(write_end)
    return pid, read_end


def _outcome(pid: int, pipe: int, timeout: float) -> str:
    try:
        ready, _, _ = select.select([pipe], [], [], timeout)
        said = os.read(pipe, 16).decode() if ready else "hung"
    finally:
        os.close(pipe)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return said or "died"


@pytest.mark.processes
def test_a_child_forked_while_the_listener_polls_does_not_hang() -> None:
    assert _forks_while_listening(20, timeout=WAIT) == ["ok"] * 80


@pytest.mark.processes
def test_control_a_child_forked_inside_the_listeners_sqlite_call_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the lock that fork takes first, some child inherits SQLite's mutexes locked.
    monkeypatch.setattr(_fork, "background_sqlite", contextlib.nullcontext())
    assert "hung" in _forks_while_listening(100, timeout=2.0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="reads /proc/locks")
def test_a_child_forked_while_listening_holds_sqlites_locks(ex_path: str) -> None:
    # The polling thread's connection, inherited open, would make the child's own
    # connections to the file believe the parent's locks are theirs (see test_processes).
    heard = Recorder()
    with _two_instances(ex_path) as (a, b):
        a.add_listener(heard)
        b.save(b"k", b"1")
        heard.wait_count(1)  # the polling thread's connection is open and has read

        def child() -> tuple[bool, bool]:
            a.save(b"c", b"v")
            assert list(a.fetch(b"c")) == [b"v"]
            me = os.getpid()
            return bool(workers.locks_held(me, ex_path)), bool(
                workers.locks_held(me, ex_path + "-shm")
            )

        assert _in_a_forked_child(child) == (True, True)


def test_usable_without_pytest(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from mpstore.hypothesis import SQLiteExampleDatabase\n"
        f"db = SQLiteExampleDatabase({str(tmp_path / 'e.db')!r})\n"
        "db.save(b'k', b'v')\n"
        "assert list(db.fetch(b'k')) == [b'v']\n"
        "print('pytest' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=WAIT
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "call",
    [
        lambda d: d.save("k", b"v"),
        lambda d: d.save(b"k", 1),
        lambda d: d.delete(None, b"v"),
        lambda d: d.move(b"k", "j", b"v"),
        lambda d: list(d.fetch("k")),
    ],
)
def test_non_bytes_are_a_typed_error_and_change_nothing(
    db: SQLiteExampleDatabase, call: Callable[[SQLiteExampleDatabase], object]
) -> None:
    db.save(b"k", b"v")
    before = dump(db.path)
    with pytest.raises(mpstore.RecordTypeError, match="must be bytes"):
        call(db)
    assert dump(db.path) == before


def test_an_oversized_example_is_dropped_with_a_warning(db: SQLiteExampleDatabase) -> None:
    db.save(b"k", b"v")
    before = dump(db.path)
    with pytest.warns(ExampleDatabaseWarning, match="save skipped.*RecordTooLarge"):
        db.save(b"k", b"x" * (16 * 1024 * 1024 + 1))
    assert dump(db.path) == before


# -- a failing file or gate: the run goes on, as with Hypothesis's own databases ----------------


@pytest.mark.processes
def test_with_the_gate_held_elsewhere_writes_are_dropped_and_reads_go_on(ex_path: str) -> None:
    SQLiteExampleDatabase(ex_path).save(b"k", b"kept")
    database = SQLiteExampleDatabase(ex_path, timeout=0.2)
    try:
        with workers.holding_the_gate(ex_path):
            assert list(database.fetch(b"k")) == [b"kept"]  # no gate needed to read
            with pytest.warns(ExampleDatabaseWarning, match="save skipped.*GateTimeout"):
                database.save(b"k", b"new")
            with pytest.warns(ExampleDatabaseWarning, match="move skipped.*GateTimeout"):
                database.move(b"k", b"j", b"kept")
            with pytest.warns(ExampleDatabaseWarning, match="delete skipped.*GateTimeout"):
                database.delete(b"k", b"kept")
        assert dump(ex_path) == [(b"k", b"kept")]
    finally:
        database.close()


@pytest.mark.processes
@pytest.mark.parametrize("warnings_are_errors", [False, True])
def test_a_failing_test_is_reported_even_when_its_example_cannot_be_saved(
    ex_path: str, warnings_are_errors: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Hypothesis calls its database without a safety net: an error there would replace the
    # test's own failure, and the falsifying example would be lost with it. Where warnings
    # are errors (-W error, filterwarnings = error), the report goes to the log.
    from hypothesis import given

    database = SQLiteExampleDatabase(ex_path, timeout=0.2)
    list(database.fetch(b"k"))  # the file exists, so only the write needs the gate

    @settings(database=database, max_examples=20)
    @given(st.integers())
    def fails(n: int) -> None:
        assert n < 3

    try:
        with (
            workers.holding_the_gate(ex_path),
            (
                warnings.catch_warnings()
                if warnings_are_errors
                else pytest.warns(ExampleDatabaseWarning)
            ),
            pytest.raises(AssertionError, match="assert"),
        ):
            if warnings_are_errors:
                warnings.simplefilter("error")
            fails()
    finally:
        database.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "mpstore.hypothesis"]
    if warnings_are_errors:
        assert logged and all("skipped" in m and "GateTimeout" in m for m in logged)
    else:
        assert logged == []


def test_a_misuse_is_not_forgiven_as_a_failing_file(ex_path: str) -> None:
    # Saving from inside another Store's write block on the same file re-enters the gate: a
    # bug in the caller, raised, not an example quietly dropped.
    database = SQLiteExampleDatabase(ex_path)
    with (
        mpstore.Store(ex_path) as store,
        store.write(),
        pytest.raises(mpstore.TransactionError, match="already holds the write gate"),
    ):
        database.save(b"k", b"v")
    database.close()


def test_a_directory_that_cannot_be_made_leaves_the_database_empty(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the directory should be")
    database = SQLiteExampleDatabase(tmp_path / "blocked" / "examples.db")
    with pytest.warns(ExampleDatabaseWarning, match="fetch skipped.*DirectoryNotFound"):
        assert list(database.fetch(b"k")) == []
    with pytest.warns(ExampleDatabaseWarning, match="save skipped.*DirectoryNotFound"):
        database.save(b"k", b"v")
    with pytest.raises(mpstore.DirectoryNotFound):
        database.add_listener(Recorder())  # asked for explicitly: the error is the caller's
    assert database._listeners == []
    assert (tmp_path / "blocked").read_text() == "a file where the directory should be"


def test_where_warnings_are_errors_a_failing_file_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "blocked").write_text("a file where the directory should be")
    database = SQLiteExampleDatabase(tmp_path / "blocked" / "examples.db")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(database.fetch(b"k")) == []
        database.save(b"k", b"v")
    logged = [r.getMessage() for r in caplog.records if r.name == "mpstore.hypothesis"]
    assert len(logged) == 2
    assert "fetch skipped" in logged[0] and "save skipped" in logged[1]
    assert all("DirectoryNotFound" in m for m in logged)


def test_the_examples_table_may_share_a_store_with_a_filelock_gate(tmp_path: Path) -> None:
    # Every Store of one process on one file uses one gate: the database takes the
    # application's.
    path = tmp_path / "app.db"
    with mpstore.Store(path, gate="filelock"):
        database = SQLiteExampleDatabase(path, gate="filelock")
        database.save(b"k", b"v")
        assert list(database.fetch(b"k")) == [b"v"]
        copy = pickle.loads(pickle.dumps(database))
        assert copy.gate == "filelock"
        assert list(copy.fetch(b"k")) == [b"v"]
        copy.close()
        database.close()
    with pytest.raises(ValueError, match="gate"):
        SQLiteExampleDatabase(path, gate="fcntl")


@pytest.mark.parametrize("name", ["poll_interval", "retention", "timeout"])
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_settings_are_refused(tmp_path: Path, name: str, bad: object) -> None:
    with pytest.raises(ValueError, match=name):
        SQLiteExampleDatabase(tmp_path / "e.db", **{name: bad})  # type: ignore[arg-type]
    assert not (tmp_path / "e.db").exists()


def _logged_after_300_saves(path: str, retention: float) -> int:
    database = SQLiteExampleDatabase(path, retention=retention)
    for i in range(300):  # past one pruning round
        database.save(b"k", str(i).encode())
    database.close()
    with mpstore.Store(path) as store:
        return int(store.query(f"SELECT count(*) FROM {CHANGES_TABLE}")[0][0])


def test_the_change_log_forgets_changes_older_than_the_retention(tmp_path: Path) -> None:
    assert _logged_after_300_saves(str(tmp_path / "short.db"), retention=0.001) < 300
    # Control: with the default retention every change is still there to be read.
    assert _logged_after_300_saves(str(tmp_path / "default.db"), retention=600.0) == 300


# -- many processes ----------------------------------------------------------------------------


@pytest.mark.processes
def test_8_processes_save_delete_and_move_without_loss_or_duplicates(ex_path: str) -> None:
    n, pool, rounds = 8, 32, 60
    parent = SQLiteExampleDatabase(ex_path, poll_interval=0.01)
    for i in range(pool):
        parent.save(w.LEFT, w.pool_value(i))
    model: dict[bytes, set[bytes]] = {w.LEFT: {w.pool_value(i) for i in range(pool)}}
    heard = Recorder()
    parent.add_listener(heard)
    barrier, done = workers.SPAWN.Barrier(n + 1), workers.SPAWN.Value("i", 0)
    tasks: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (w.churn, (ex_path, k, pool, rounds, barrier, done)) for k in range(n)
    ]
    tasks.append((w.observe_pool, (ex_path, pool, n, barrier, done)))
    *_, (snapshots, problems) = workers.run_tasks(tasks)
    assert problems == [] and snapshots >= 1

    for k in range(n):
        kept = list(parent.fetch(w.own_key(k)))
        assert sorted(kept) == sorted(w.own_value(k, i) for i in range(1, rounds, 2))
    left, right = list(parent.fetch(w.LEFT)), list(parent.fetch(w.RIGHT))
    assert len(left) + len(right) == pool
    assert set(left) | set(right) == {w.pool_value(i) for i in range(pool)}

    # Replaying what the listener heard from the children rebuilds the final contents.
    final: dict[bytes, set[bytes]] = {}
    for key, value in dump(ex_path):
        final.setdefault(bytes(key), set()).add(bytes(value))

    def replayed(events: list[ListenerEventT]) -> bool:
        state = {k: set(v) for k, v in model.items()}
        for kind, (key, value) in events:
            assert value is not None
            (state.setdefault(key, set()).add if kind == "save" else state[key].discard)(value)
        return {k: v for k, v in state.items() if v} == final

    assert heard.wait_for(replayed), "the listener missed changes made by other processes"
    parent.close()


class DeleteThenSave(SQLiteExampleDatabase):
    """Broken on purpose: a move as two transactions, pausing between them when told."""

    between: Callable[[], None] = staticmethod(lambda: None)

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.delete(src, value)
        self.between()
        self.save(dest, value)


def test_a_move_in_two_transactions_would_be_caught(ex_path: str) -> None:
    # Negative control for the pool checks above, with the interleaving forced: while one
    # move is between its delete and its save, a snapshot misses the value, and a move the
    # other way then leaves it under both keys.
    broken, other = DeleteThenSave(ex_path), SQLiteExampleDatabase(ex_path)
    broken.save(w.LEFT, w.pool_value(0))
    seen: list[str] = []

    def interleave() -> None:
        with mpstore.Store(ex_path) as store, store.read() as conn:
            seen.extend(w.pool_violations(conn, 1))
        other.move(w.RIGHT, w.LEFT, w.pool_value(0))

    broken.between = interleave  # type: ignore[method-assign]
    broken.move(w.LEFT, w.RIGHT, w.pool_value(0))
    assert seen == [f"{w.pool_value(0)!r} missing"]
    with mpstore.Store(ex_path) as store, store.read() as conn:
        assert w.pool_violations(conn, 1) == [f"{w.pool_value(0)!r} held 2 times"]
    broken.close()
    other.close()


# -- a real Hypothesis failure, replayed in a fresh process ----------------------------------


@pytest.mark.processes
def test_a_failure_is_replayed_from_the_database_in_a_fresh_process(tmp_path: Path) -> None:
    path, empty = str(tmp_path / "examples.db"), str(tmp_path / "empty.db")
    every_phase = ["explicit", "reuse", "generate", "target", "shrink"]
    first, replay, control = workers.run_tasks(
        [(w.failing_property, (path, every_phase))]
    ) + workers.run_tasks(
        [(w.failing_property, (path, ["reuse"])), (w.failing_property, (empty, ["reuse"]))]
    )
    assert first["outcome"] == "failed" and first["seen"][-1] == 1000  # shrunk to the boundary
    assert len(dump(path)) >= 1
    # Only the reuse phase: the single example it runs comes from the database.
    assert replay["outcome"] == "failed" and set(replay["seen"]) == {1000}
    # Negative control: the same reuse-only run on an empty database tries nothing.
    assert control == {"outcome": "nothing to run", "seen": []}


def test_the_suite_keeps_its_own_examples_in_this_database() -> None:
    database = settings().database
    assert isinstance(database, SQLiteExampleDatabase)
    assert database.path.endswith(os.path.join(".hypothesis", "mpstore-examples.db"))
