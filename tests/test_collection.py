"""Typed collections and the conversation repository built on them."""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import math
import os
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, NotRequired

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Json,
    PlainSerializer,
    PrivateAttr,
    SerializationInfo,
    ValidationError,
    computed_field,
    create_model,
    field_serializer,
    model_serializer,
    model_validator,
)
from pydantic_core import SchemaSerializer, from_json, to_json
from typing_extensions import TypedDict

import mpstore
from mpstore import _collection, _inspect, _sqlite
from mpstore.conversations import (
    Conversation,
    ConversationRepository,
    sample_conversation,
)
from tests import workers
from tests.models import Note, Person


def test_upsert_get_delete(notes: mpstore.Collection[Note]) -> None:
    assert notes.get("a") is None
    notes.upsert(Note(id="a", text="hi"))
    assert notes.get("a") == Note(id="a", text="hi")
    notes.upsert(Note(id="a", text="again"))
    assert notes.get("a") == Note(id="a", text="again")
    assert notes.count() == 1
    assert notes.delete("a") is True
    assert notes.delete("a") is False
    assert notes.get("a") is None


def test_upsert_many_is_one_transaction(
    store: mpstore.Store, notes: mpstore.Collection[Note]
) -> None:
    seen: list[str] = []
    store.on_event = seen.append
    assert notes.upsert_many(Note(id=str(i), text="x") for i in range(10)) == 10
    assert seen.count("commit") == 1
    assert notes.count() == 10


def test_one_bad_record_writes_none(notes: mpstore.Collection[Note]) -> None:
    good = [Note(id=str(i), text="x") for i in range(3)]
    with pytest.raises(mpstore.InvalidKey):
        notes.upsert_many([*good, Note(id="", text="empty key")])
    assert notes.count() == 0


def test_update_is_read_modify_write(notes: mpstore.Collection[Note]) -> None:
    notes.upsert(Note(id="a", text="x"))
    new = notes.update("a", lambda n: n.model_copy(update={"text": n.text + "y"}))
    assert new == Note(id="a", text="xy")
    assert notes.get("a") == new


def test_update_of_a_missing_key(notes: mpstore.Collection[Note]) -> None:
    with pytest.raises(mpstore.KeyNotFound) as info:
        notes.update("nope", lambda n: n)
    assert isinstance(info.value, KeyError)
    assert "nope" in str(info.value)


def test_update_callback_that_raises_writes_nothing_and_releases_the_gate(
    store: mpstore.Store, notes: mpstore.Collection[Note]
) -> None:
    notes.upsert(Note(id="a", text="x"))

    def fail(n: Note) -> Note:
        raise ZeroDivisionError("callback")

    with pytest.raises(ZeroDivisionError):
        notes.update("a", fail)
    assert notes.get("a") == Note(id="a", text="x")
    assert not store._gate.held_by_me
    notes.upsert(Note(id="b", text="gate is free"))


def test_update_must_keep_the_key(notes: mpstore.Collection[Note]) -> None:
    notes.upsert(Note(id="a", text="x"))
    with pytest.raises(mpstore.InvalidKey):
        notes.update("a", lambda n: n.model_copy(update={"id": "b"}))
    assert [n.id for n in notes.scan()] == ["a"]


def _update_while_another_process_holds_the_gate(
    store: mpstore.Store, then: Note | None = None
) -> tuple[Note, list[Note]]:
    """Update note "a" (text + "y") while a child process holds the gate, released only once
    this process has read the note ahead; the child upserts ``then`` before it commits.
    Returns the update's result and what its function was given."""
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="a", text="x"))
    given: list[Note] = []

    def append_y(n: Note) -> Note:
        given.append(n)
        return n.model_copy(update={"text": n.text + "y"})

    results: list[Note] = []
    with workers.holding_the_gate(store.path, then) as holder:
        updater = threading.Thread(target=lambda: results.append(notes.update("a", append_y)))
        updater.start()
        deadline = time.monotonic() + workers.JOIN_TIMEOUT
        # A read ahead comes before the wait, which ends in the writer thread's queue.
        while store.stats()["reads_ahead"] < 1 and workers.pending_writes(store) < 1:
            assert time.monotonic() < deadline, "the update neither read ahead nor waited"
            os.sched_yield()
        assert store.stats()["reads_ahead"] == 1
        holder.release.set()
        updater.join(workers.JOIN_TIMEOUT)
    assert holder.process.exitcode == 0
    assert len(results) == 1
    return results[0], given


@pytest.mark.processes
@pytest.mark.parametrize(
    ("then", "text", "used"),
    [
        (None, "x", 1),  # unchanged at its turn: the parse read ahead is used
        # The holder changes the record after this process read it ahead: the function must
        # get what the holder committed, or that change would be lost.
        (Note(id="a", text="changed"), "changed", 0),
    ],
    ids=["unchanged", "changed meanwhile"],
)
def test_update_parses_ahead_while_another_process_holds_the_gate(
    store: mpstore.Store, then: Note | None, text: str, used: int
) -> None:
    result, given = _update_while_another_process_holds_the_gate(store, then)
    assert given == [Note(id="a", text=text)]
    assert result == Note(id="a", text=text + "y")
    assert store.collection("notes", Note, key="id").get("a") == result
    assert store.stats()["reads_ahead_used"] == used


@pytest.mark.processes
def test_an_update_run_again_parses_its_record_again(store: mpstore.Store) -> None:
    # A write batched after it ends the transaction (a RAISE(ROLLBACK) trigger): the update
    # runs again in a new one. Its function changed the record it was given in place, so the
    # run again must not be given that record, read ahead, a second time.
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="a", text="x"))
    with store.write() as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON notes WHEN NEW.key = 'bad' "
            "BEGIN SELECT RAISE(ROLLBACK, 'refused'); END"
        )
    given: list[str] = []

    def append_y_in_place(n: Note) -> Note:
        given.append(n.text)
        n.text += "y"
        return n

    outcomes: dict[str, Any] = {}

    def call(name: str, fn: Callable[[], Any]) -> None:
        try:
            outcomes[name] = fn()
        except Exception as exc:
            outcomes[name] = exc

    with workers.holding_the_gate(store.path) as holder:
        threads = [
            threading.Thread(target=call, args=("a", lambda: notes.update("a", append_y_in_place))),
            threading.Thread(
                target=call, args=("bad", lambda: notes.upsert(Note(id="bad", text="")))
            ),
        ]
        for i, t in enumerate(threads):
            t.start()
            while workers.pending_writes(store) < i + 1:
                os.sched_yield()  # queued in this order, for this process's writer thread
        holder.release.set()
        for t in threads:
            t.join(workers.JOIN_TIMEOUT)
    assert store.stats()["reads_ahead"] == 1
    assert isinstance(outcomes["bad"], sqlite3.IntegrityError)
    assert given == ["x", "x"]  # run twice, each time on the record as stored
    assert outcomes["a"] == Note(id="a", text="xy") == notes.get("a")


@pytest.mark.processes
def test_an_update_batched_after_another_of_its_record_parses_it_again(
    store: mpstore.Store,
) -> None:
    # Two threads read the record ahead and wait for the same turn of this process's writer
    # thread: the second must see the first's change, made in the same transaction and not
    # yet committed, or that change is lost.
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="a", text="x"))

    def append(c: str) -> Callable[[Note], Note]:
        return lambda n: n.model_copy(update={"text": n.text + c})

    with workers.holding_the_gate(store.path) as holder:
        threads = [threading.Thread(target=notes.update, args=("a", append(c))) for c in "yz"]
        deadline = time.monotonic() + workers.JOIN_TIMEOUT
        for i, t in enumerate(threads):
            t.start()
            # The second starts once the writer thread waits for the gate with the first.
            while workers.pending_writes(store) < i + 1 or not store._gate.busy_here:
                assert time.monotonic() < deadline, "the updates never queued"
                os.sched_yield()
        holder.release.set()
        for t in threads:
            t.join(workers.JOIN_TIMEOUT)
    stats = store.stats()
    assert (stats["reads_ahead"], stats["reads_ahead_used"]) == (2, 1)
    assert stats["batch_size"]["count"] == 1
    stored = notes.get("a")
    assert stored is not None and sorted(stored.text) == ["x", "y", "z"]


@pytest.mark.processes
@pytest.mark.parametrize("then", [Note(id="a", text="fixed"), None], ids=["fixed", "left"])
def test_an_unreadable_record_read_ahead_is_parsed_again_at_its_turn(
    store: mpstore.Store, notes: mpstore.Collection[Note], then: Note | None
) -> None:
    # The parse ahead fails. At its turn the record is what the holder left: fixed, the
    # update goes on; left as it was, the update raises what the parse raises.
    notes.upsert(Note(id="a", text="x"))
    with store.write() as conn:
        conn.execute("""UPDATE notes SET value = '{"id": "a"}'""")  # no text
    outcome: list[Any] = []

    def update() -> None:
        try:
            outcome.append(notes.update("a", lambda n: n.model_copy(update={"text": n.text + "y"})))
        except ValidationError as exc:
            outcome.append(exc)

    with workers.holding_the_gate(store.path, then) as holder:
        updater = threading.Thread(target=update)
        updater.start()
        deadline = time.monotonic() + workers.JOIN_TIMEOUT
        # It reads ahead before it waits.
        while workers.pending_writes(store) < 1 and updater.is_alive():
            assert time.monotonic() < deadline, "the update never queued"
            os.sched_yield()
        holder.release.set()
        updater.join(workers.JOIN_TIMEOUT)
    assert store.stats()["reads_ahead"] == 0
    if then is None:
        assert isinstance(outcome[0], ValidationError)
        assert notes.count() == 1
    else:
        assert outcome == [Note(id="a", text="fixedy")] and notes.get("a") == outcome[0]


def test_a_read_that_fails_gives_nothing_and_its_connection_up(
    store: mpstore.Store, notes: mpstore.Collection[Note]
) -> None:
    notes.upsert(Note(id="a", text="x"))
    assert store._read_now(notes._sql.get, ("a",)) is not None
    idle = store._pool.idle
    assert store._read_now("SELECT value FROM no_such_table WHERE key = ?", ("a",)) is None
    assert store._pool.idle == idle - 1  # discarded, as a connection that failed a read is
    assert store._read_now(notes._sql.get, ("a",)) is not None


def test_update_reads_ahead_only_while_another_process_holds_the_gate(
    store: mpstore.Store, notes: mpstore.Collection[Note]
) -> None:
    notes.upsert(Note(id="a", text="x"))
    notes.update("a", lambda n: n)  # the gate is free: nothing to wait for
    # Another thread of this process holds it: a parse ahead would compete with that
    # thread for this interpreter, and gain nothing. (Another process holding it while a
    # thread of this one waits: see the test above.)
    with workers.held_by_another_thread(store.write):
        updater = threading.Thread(target=notes.update, args=("a", lambda n: n))
        updater.start()
        deadline = time.monotonic() + workers.JOIN_TIMEOUT
        while workers.pending_writes(store) < 1:
            assert time.monotonic() < deadline, "the update never queued"
            os.sched_yield()
    updater.join(workers.JOIN_TIMEOUT)
    assert not updater.is_alive()
    assert store.stats()["reads_ahead"] == 0


def test_threads_of_one_process_never_read_ahead(
    store: mpstore.Store, notes: mpstore.Collection[Note]
) -> None:
    # Whoever holds the gate holds this interpreter's lock too, also while it takes the gate.
    notes.upsert_many(Note(id=str(i), text="") for i in range(4))

    def append(i: int) -> None:
        for k in range(50):
            notes.update(str((i + k) % 4), lambda n: n.model_copy(update={"text": n.text + "."}))

    threads = [threading.Thread(target=append, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(workers.JOIN_TIMEOUT)
    assert sorted(len(n.text) for n in notes.scan()) == [50] * 4
    assert store.stats()["reads_ahead"] == 0


def test_the_gate_looks_held_elsewhere_only_when_another_process_holds_it(
    store: mpstore.Store, notes: mpstore.Collection[Note]
) -> None:
    notes.upsert(Note(id="a", text="x"))  # opens the mailbox, which carries the hint
    gate = store._gate
    assert not gate.held_elsewhere()
    with workers.held_by_another_thread(store.write):
        assert not gate.held_elsewhere()
    with workers.holding_the_gate(store.path):
        assert gate.held_elsewhere()
    assert not gate.held_elsewhere()


def test_without_a_mailbox_the_gate_looks_held_elsewhere_unless_held_here(
    tmp_path: Any,
) -> None:
    with mpstore.Store(str(tmp_path / "portable.db"), gate="filelock") as store:
        gate = store._gate
        assert gate.mailbox() is None
        with workers.held_by_another_thread(store.write):
            assert not gate.held_elsewhere()
        with workers.filelock_held_elsewhere(store.lock_path):
            assert gate.held_elsewhere()


def test_reading_ahead_never_waits_for_a_read_connection(tmp_path: Any) -> None:
    with mpstore.Store(str(tmp_path / "one.db"), pool_size=1) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="a", text="x"))
        asked: list[float] = []
        acquire = store._pool.acquire

        def noted_acquire(timeout: float) -> Any:
            asked.append(timeout)
            return acquire(timeout)

        store._pool.acquire = noted_acquire  # type: ignore[method-assign]
        sql = notes._sql.get
        assert store._read_now(sql, ("a",)) == '{"id":"a","text":"x"}'
        assert store._read_now(sql, ("nope",)) is None
        assert asked == [0.0, 0.0]
        with store.read():
            asked.clear()
            assert store._read_now(sql, ("a",)) is None  # the only connection is in use
            assert asked == [0.0]
        assert store.stats()["pool_timeouts"] == 0


def test_keys_and_scan_are_in_key_order_across_pages(notes: mpstore.Collection[Note]) -> None:
    ids = [f"{i:04d}" for i in range(600)]
    notes.upsert_many(Note(id=i, text=i) for i in reversed(ids))
    assert list(notes.keys()) == ids
    assert [n.id for n in notes.scan()] == ids
    assert len(notes) == 600


def test_values_are_stored_as_plain_json(
    store: mpstore.Store, notes: mpstore.Collection[Note]
) -> None:
    notes.upsert(Note(id="a", text="x'); DROP TABLE notes; --"))
    (value,) = store.query("SELECT value FROM notes WHERE key = 'a'")[0]
    assert json.loads(value) == {"id": "a", "text": "x'); DROP TABLE notes; --"}


@pytest.mark.parametrize(
    "name",
    ["notes; DROP TABLE x", "no spaces", "1abc", "", "sqlite_master", "_mpstore_meta", "a-b"],
)
def test_collection_names_must_be_identifiers(store: mpstore.Store, name: str) -> None:
    with pytest.raises(mpstore.InvalidName):
        store.collection(name, Note, key="id")


def test_reopening_a_collection_with_another_definition_fails(store: mpstore.Store) -> None:
    store.collection("notes", Note, key="id")

    class Other(BaseModel):
        id: str

    with pytest.raises(mpstore.InvalidName):
        store.collection("notes", Other, key="id")


def test_collection_is_shared_across_store_instances(db_path: str) -> None:
    with mpstore.Store(db_path) as a, mpstore.Store(db_path) as b:
        a.collection("notes", Note, key="id").upsert(Note(id="a", text="x"))
        assert b.collection("notes", Note, key="id").get("a") == Note(id="a", text="x")
        assert b.collections() == {"notes": 1}


def test_a_plain_table_is_not_taken_over(store: mpstore.Store) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE mine (a, b)")
    with pytest.raises(mpstore.InvalidName, match="not an mpstore collection"):
        store.collection("mine", Note, key="id")


def test_adding_an_index_later_backfills_it(db_path: str) -> None:
    class Item(BaseModel):
        id: str
        group: int

    with mpstore.Store(db_path) as store:
        store.collection("items", Item, key="id").upsert_many(
            Item(id=str(i), group=i % 3) for i in range(9)
        )
    with mpstore.Store(db_path) as store:
        items = store.collection("items", Item, key="id", indexes=[("group",)])
        assert sorted(i.id for i in items.find({"group": 1})) == ["1", "4", "7"]


class _Task(BaseModel):
    id: str
    status: str


class _Untracked(BaseModel):
    id: str


def test_an_opener_that_declares_no_index_still_keeps_the_files_indexes(db_path: str) -> None:
    with mpstore.Store(db_path) as first, mpstore.Store(db_path) as second:
        indexed = first.collection("tasks", _Task, key="id", indexes=[("status",)])
        indexed.upsert(_Task(id="t1", status="open"))
        plain = second.collection("tasks", _Task, key="id")  # older code, say: no indexes
        plain.upsert(_Task(id="t1", status="done"))
        assert indexed.find({"status": "open"}) == []
        assert indexed.find({"status": "done"}) == [_Task(id="t1", status="done")]


def _writes_after_an_index_was_added(db_path: str) -> list[list[str]]:
    """An opener that knew no index writes after another opener added one: inserts, an
    update through upsert, one through update(). What the index finds after each."""
    found = []
    with mpstore.Store(db_path) as first, mpstore.Store(db_path) as second:
        plain = first.collection("tasks", _Task, key="id")
        plain.upsert(_Task(id="t0", status="open"))
        indexed = second.collection("tasks", _Task, key="id", indexes=[("status",)])
        plain.upsert_many([_Task(id="t1", status="open"), _Task(id="t2", status="open")])
        found.append(sorted(t.id for t in indexed.find({"status": "open"})))
        plain.upsert(_Task(id="t1", status="done"))
        plain.update("t2", lambda t: t.model_copy(update={"status": "done"}))
        found.append(sorted(t.id for t in indexed.find({"status": "open"})))
        found.append(sorted(t.id for t in indexed.find({"status": "done"})))
    return found


def test_an_index_added_while_a_collection_is_open_is_kept_up_to_date(db_path: str) -> None:
    assert _writes_after_an_index_was_added(db_path) == [["t0", "t1", "t2"], ["t0"], ["t1", "t2"]]


def test_control_writes_blind_to_the_added_index_leave_it_stale(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sqlite, "_table_fields", lambda conn, table: frozenset())
    assert _writes_after_an_index_was_added(db_path) != [
        ["t0", "t1", "t2"],
        ["t0"],
        ["t1", "t2"],
    ]


class _Pair(BaseModel):
    id: str
    a: int = 0
    b: int | None = None


def test_a_rolled_back_schema_change_does_not_leave_the_index_check_stale(db_path: str) -> None:
    # The rollback takes the file's schema version back; another opener's change then brings
    # it to the same number with another column, which the check must still see.
    with mpstore.Store(db_path) as first, mpstore.Store(db_path) as second:
        plain = first.collection("pairs", _Pair, key="id", indexes=[("a",)])
        with pytest.raises(KeyError), first.write() as conn:
            conn.execute("CREATE TABLE scratch1 (x)")
            conn.execute("CREATE TABLE scratch2 (x)")
            plain.upsert(_Pair(id="rolled", a=1))
            raise KeyError("give up")
        indexed = second.collection("pairs", _Pair, key="id", indexes=[("a",), ("b",)])
        plain.upsert(_Pair(id="later", a=2, b=42))
        assert indexed.find({"b": 42}) == [_Pair(id="later", a=2, b=42)]


def test_a_collection_first_opened_in_a_block_is_opened_once_for_that_block(
    store: mpstore.Store,
) -> None:
    # Asked for again in the same transaction, the same collection comes back: checking its
    # table again on every call (as the async collections do) made each write in the block
    # cost about twice as much.
    with store.write():
        first = store.collection("notes", Note, key="id")
        first.upsert(Note(id="a", text="x"))
        with store.write():
            assert store.collection("notes", Note, key="id") is first
        with pytest.raises(mpstore.InvalidName):
            store.collection("notes", Person, key="id")
    assert store.collection("notes", Note, key="id").get("a") == Note(id="a", text="x")


def test_a_collection_opened_in_a_rolled_back_savepoint_is_opened_again(
    store: mpstore.Store,
) -> None:
    # Its table went with the savepoint: a collection kept from there would write to no table.
    with store.write():
        with pytest.raises(KeyError), store.write():
            gone = store.collection("notes", Note, key="id")
            raise KeyError("give up")
        with store.write():
            again = store.collection("notes", Note, key="id")
            assert again is not gone
            again.upsert(Note(id="b", text="y"))
        assert store.collection("notes", Note, key="id") is again
    with pytest.raises(KeyError), store.write():
        store.collection("later", Note, key="id").upsert(Note(id="c", text="z"))
        raise KeyError("give up")
    later = store.collection("later", Note, key="id")
    later.upsert(Note(id="d", text="w"))
    assert [n.id for n in later.scan()] == ["d"]
    assert store.collection("notes", Note, key="id").get("b") == Note(id="b", text="y")


def test_a_block_rolling_back_to_its_own_savepoint_leaves_no_stale_collection(
    store: mpstore.Store,
) -> None:
    # The block's own savepoint takes back the table, and in the second case the index
    # column, that opening the collection made there: asked for again, they are made again.
    with store.write() as conn:
        conn.execute("SAVEPOINT mine")
        store.collection("notes", Note, key="id")
        conn.execute("ROLLBACK TO mine")
        conn.execute("RELEASE mine")
        store.collection("notes", Note, key="id").upsert(Note(id="a", text="x"))
    with mpstore.Store(store.path) as other:
        other.collection("items", Note, key="id")  # its table is there, without the index
    with store.write() as conn:
        conn.execute("SAVEPOINT mine")
        store.collection("items", Note, key="id", indexes=[("text",)])
        conn.execute("ROLLBACK TO mine")
        conn.execute("RELEASE mine")
        store.collection("items", Note, key="id", indexes=[("text",)]).upsert(
            Note(id="b", text="y")
        )
    assert store.collection("notes", Note, key="id").get("a") == Note(id="a", text="x")
    with mpstore.Store(store.path) as other:
        items = other.collection("items", Note, key="id", indexes=[("text",)])
        assert items.find({"text": "y"}) == [Note(id="b", text="y")]


def test_a_column_added_by_hand_is_left_to_its_owner(db_path: str) -> None:
    # Only the indexes the file records are mpstore's to fill; a hand-made f_ column (even one
    # whose name could not be put into SQL unquoted) is neither written nor a reason to fail.
    with mpstore.Store(db_path) as store:
        tasks = store.collection("tasks", _Task, key="id")
        tasks.upsert(_Task(id="t1", status="open"))
        with store.write() as conn:
            conn.execute('ALTER TABLE tasks ADD COLUMN "f_tag" TEXT')
            conn.execute('ALTER TABLE tasks ADD COLUMN "f_it\'s" TEXT')
            conn.execute("UPDATE tasks SET f_tag = 'mine'")
        tasks.upsert(_Task(id="t1", status="done"))
        tasks.upsert(_Task(id="t2", status="open"))
        assert store.query("SELECT key, f_tag FROM tasks ORDER BY key") == [
            ("t1", "mine"),
            ("t2", None),
        ]


def test_damaged_index_records_fail_the_write_typed_and_change_nothing(db_path: str) -> None:
    with mpstore.Store(db_path) as store:
        tasks = store.collection("tasks", _Task, key="id")
        tasks.upsert(_Task(id="t1", status="open"))
    with mpstore.Store(db_path) as store:
        tasks = store.collection("tasks", _Task, key="id")
        with store.write() as conn:
            conn.execute(
                f"UPDATE {_sqlite.COLLECTIONS_TABLE} SET indexes = ? WHERE name = 'tasks'",
                ('[["x y"]]',),
            )
        with pytest.raises(mpstore.MpstoreError, match="damaged"):
            tasks.upsert(_Task(id="t1", status="done"))
        assert tasks.get("t1") == _Task(id="t1", status="open")


def test_a_model_that_cannot_fill_the_files_indexes_is_refused(db_path: str) -> None:
    with mpstore.Store(db_path) as store:
        store.collection("tasks", _Task, key="id", indexes=[("status",)])
    with (
        mpstore.Store(db_path) as store,
        pytest.raises(mpstore.InvalidName, match="already has the indexes"),
    ):
        store.collection("tasks", _Untracked, key="id")


# An index column holds the field as the record's JSON holds it, whoever fills it: Python for
# the opener that declared the index, SQLite's json_extract for an opener that did not know of
# it (a carried write), and the backfill when the index is added over existing records.


def _upper(value: str) -> str:
    return value.upper()


class _Aliased(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True)
    id: str
    owner: str = Field(alias="owner-id.v'1")


class _Serialised(BaseModel):
    id: str
    owner: Annotated[str, PlainSerializer(_upper)]


class _CheckedSerialised(BaseModel):
    """A serializer behind a model validator, and a recursive field: the schema is nested."""

    id: str
    owner: Annotated[str, PlainSerializer(_upper)]
    children: list[_CheckedSerialised] = []

    @model_validator(mode="before")
    @classmethod
    def _accept(cls, data: Any) -> Any:
        return data


class _InfAsString(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")
    id: str
    score: float


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # json_encoders: still honoured

    class _EpochSeconds(BaseModel):
        model_config = ConfigDict(json_encoders={datetime: lambda v: int(v.timestamp())})
        id: str
        at: datetime


class _SpanAsFloat(BaseModel):
    model_config = ConfigDict(ser_json_timedelta="float")
    id: str
    span: timedelta


_STORED_FORMS = {
    "json-encoders": (
        _EpochSeconds,
        "at",
        datetime(2020, 1, 1, tzinfo=UTC),
        "_serialisation_settings",
        None,
    ),
    "alias": (_Aliased, "owner", "ann", "_json_keys", lambda model: {}),
    "serializer": (_Serialised, "owner", "ann", "_plainly_serialised", lambda m, f: frozenset(f)),
    "serializer-nested": (
        _CheckedSerialised,
        "owner",
        "ann",
        "_plainly_serialised",
        lambda m, f: frozenset(f),
    ),
    "inf-as-string": (_InfAsString, "score", -math.inf, "Collection._column_value", None),
    "span-as-float": (
        _SpanAsFloat,
        "span",
        timedelta(seconds=1.5),
        "_serialisation_settings",
        None,
    ),
}


def _filled_three_ways(db_path: str, model: type[BaseModel], field: str, value: object) -> Any:
    """The column each filler wrote for the same value, and which records find() returns."""
    with mpstore.Store(db_path) as first, mpstore.Store(db_path) as second:
        blind = first.collection("things", model, key="id")
        blind.upsert(model(id="backfilled", **{field: value}))
        indexed = second.collection("things", model, key="id", indexes=[(field,)])
        blind.upsert(model(id="by-sqlite", **{field: value}))
        indexed.upsert(model(id="by-python", **{field: value}))
        column = dict(second.query(f"SELECT key, f_{field} FROM things"))
        found = sorted(r.id for r in indexed.find({field: value}))
        return column, found


_DEPRECATED_ENCODERS = pytest.mark.filterwarnings("ignore:`json_encoders` is deprecated")


@_DEPRECATED_ENCODERS
@pytest.mark.parametrize("case", sorted(_STORED_FORMS))
def test_an_index_holds_the_field_as_stored_whoever_fills_it(db_path: str, case: str) -> None:
    model, field, value, _, _ = _STORED_FORMS[case]
    column, found = _filled_three_ways(db_path, model, field, value)
    assert column["by-python"] == column["by-sqlite"] == column["backfilled"]
    assert found == ["backfilled", "by-python", "by-sqlite"]


@_DEPRECATED_ENCODERS
@pytest.mark.parametrize("case", sorted(_STORED_FORMS))
def test_control_an_index_filled_from_the_fields_python_value_diverges(
    db_path: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, field, value, target, blinded = _STORED_FORMS[case]
    if target == "_serialisation_settings":
        blinded = lambda model: None  # noqa: E731 - find() forgets the model's settings
    elif blinded is None:
        blinded = lambda self, field, value: value  # noqa: E731
    monkeypatch.setattr(f"mpstore._collection.{target}", blinded)
    column, found = _filled_three_ways(db_path, model, field, value)
    assert not (
        column["by-python"] == column["by-sqlite"] == column["backfilled"]
        and found == ["backfilled", "by-python", "by-sqlite"]
    )


@_DEPRECATED_ENCODERS
@pytest.mark.parametrize(
    "case", ["json-encoders", "serializer", "serializer-nested", "span-as-float"]
)
def test_control_an_index_filled_without_the_fields_own_schema_diverges(
    db_path: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The declaring opener serialises an indexed field with the field's own schema from the
    model's (the cases whose JSON is not the plain value): one inferred from the value
    instead misses serializers and settings."""
    model, field, value, _, _ = _STORED_FORMS[case]
    inferred = SchemaSerializer({"type": "any"})
    monkeypatch.setattr(
        "mpstore._collection._field_serializers",
        lambda model, fields: dict.fromkeys(fields, inferred),
    )
    column, _ = _filled_three_ways(db_path, model, field, value)
    assert column["by-python"] != column["by-sqlite"] == column["backfilled"]


def _lower(value: str) -> str:
    return value.lower()


class _SerialisedOtherwise(_Serialised):
    owner: Annotated[str, PlainSerializer(_lower)]


class _SerialisedWithMore(_Serialised):
    team: str = "core"


class _SerialisedPolitely(_Serialised):
    def greeting(self) -> str:
        return f"hello {self.owner}"


@pytest.mark.parametrize("subclass", [_SerialisedOtherwise, _SerialisedWithMore])
def test_a_subclass_record_the_model_does_not_read_back_as_written_is_refused(
    store: mpstore.Store, subclass: type[_Serialised]
) -> None:
    # Stored, the first would hold an owner that find() never matches, and the second a team
    # that reading drops.
    things = store.collection("things", _Serialised, key="id", indexes=[("owner",)])
    with pytest.raises(mpstore.RecordTypeError, match="does not read back as written"):
        things.upsert(subclass(id="a", owner="Ann"))
    assert things.count() == 0


def test_a_subclass_record_written_as_the_models_own_is_kept(store: mpstore.Store) -> None:
    things = store.collection("things", _Serialised, key="id", indexes=[("owner",)])
    things.upsert(_SerialisedPolitely(id="a", owner="Ann"))
    assert things.find(where={"owner": "Ann"}) == [_Serialised(id="a", owner="ANN")]
    [(column, stored)] = store.query("SELECT f_owner, json_extract(value, '$.owner') FROM things")
    assert column == stored == "ANN"


class _Hidden(BaseModel):
    id: str
    secret: int = Field(default=0, exclude=True)


class _Decorated(BaseModel):
    id: str
    owner: str

    @field_serializer("owner")
    def _owner(self, value: str) -> str:
        return value.upper()


class _Reshaped(BaseModel):
    id: str
    owner: str

    @model_serializer
    def _flat(self) -> dict[str, str]:
        return {"id": self.id, "who": self.owner}


class _Quoted(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)
    id: str
    owner: str = Field(alias='owner"id')


class _Doubled(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)
    id: str
    old: int = Field(default=1, alias="level")
    level: int = 0


@pytest.mark.parametrize(
    ("model", "field", "reason"),
    [
        (_Hidden, "secret", "left out of the record's JSON"),
        (_Decorated, "owner", "@field_serializer"),
        (_Reshaped, "owner", "model_serializer"),
        (_Quoted, "owner", "JSON key"),
        (_Doubled, "level", "holds that key twice"),
    ],
)
def test_a_field_the_json_does_not_hold_plainly_cannot_be_indexed(
    store: mpstore.Store, model: type[BaseModel], field: str, reason: str
) -> None:
    with pytest.raises(mpstore.InvalidName, match=reason):
        store.collection("things", model, key="id", indexes=[(field,)])
    assert "things" not in store.collections()


class _QuotedKey(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)
    id: str = Field(alias='doc"id')


def test_a_key_field_the_tools_could_not_find_is_refused(store: mpstore.Store) -> None:
    with pytest.raises(mpstore.InvalidName, match="JSON key"):
        store.collection("things", _QuotedKey, key="id")
    assert "things" not in store.collections()


def test_an_indexed_string_with_nul_is_refused_typed(notes: mpstore.Collection[Note]) -> None:
    # SQLite's JSON functions end a string at NUL: a column filled from the JSON would differ.
    with mpstore.Store(notes.store.path) as store:
        tagged = store.collection("notes", Note, key="id", indexes=[("text",)])
        with pytest.raises(mpstore.RecordTypeError, match="NUL"):
            tagged.upsert(Note(id="a", text="a\x00b"))
        assert tagged.get("a") is None


class _PersonView(BaseModel):
    """Person's fields and aliases, read by alias but written by name: a reader's model."""

    model_config = ConfigDict(validate_by_name=True)
    person_id: str = Field(alias="personId")
    team: str = Field(alias="team.name")


def test_a_model_without_aliases_to_record_leaves_anothers_record(db_path: str) -> None:
    with mpstore.Store(db_path) as store:
        people = store.collection("people", Person, key="person_id", indexes=[("team",)])
        people.upsert(Person(person_id="p1", team="t1"))
    with mpstore.Store(db_path) as store:
        view = store.collection("people", _PersonView, key="person_id", indexes=[("team",)])
        assert view.get("p1") == _PersonView(person_id="p1", team="t1")
        assert store.stats()["commits"] == 0  # opening it wrote nothing
    assert _inspect.check(db_path) == []


class _InfAsConstant(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")
    id: str
    score: float


def test_a_value_the_json_writes_unreadably_is_refused_typed(store: mpstore.Store) -> None:
    scores = store.collection("scores", _InfAsConstant, key="id", indexes=[("score",)])
    scores.upsert(_InfAsConstant(id="a", score=1.0))
    with pytest.raises(mpstore.RecordTypeError, match="constant SQLite cannot read"):
        scores.upsert(_InfAsConstant(id="a", score=math.inf))
    assert scores.get("a") == _InfAsConstant(id="a", score=1.0)


def test_opening_records_the_json_keys_a_file_lacks(db_path: str) -> None:
    # Tools without the model (check, import) read them; a file written before they were
    # recorded gets them from the next opener.
    with mpstore.Store(db_path) as store:
        store.collection("people", Person, key="person_id", indexes=[("team",)]).upsert(
            Person(person_id="p1", team="t1")
        )
        with store.write() as conn:
            conn.execute(f"DELETE FROM {_sqlite.META_TABLE} WHERE key = 'json_keys:people'")
    assert _inspect.check(db_path) != []
    with mpstore.Store(db_path) as store:
        store.collection("people", Person, key="person_id", indexes=[("team",)])
    assert _inspect.check(db_path) == []


def test_find_refuses_unindexed_fields(notes: mpstore.Collection[Note]) -> None:
    with pytest.raises(mpstore.InvalidName):
        notes.find({"text": "x"})


# -- the conversation repository ---------------------------------------------------------------


@pytest.fixture
def repo(store: mpstore.Store) -> ConversationRepository:
    return ConversationRepository(store)


def _at(minutes: int) -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)


def test_repository_round_trip(repo: ConversationRepository) -> None:
    conv = sample_conversation("c1", workspace_id=7)
    repo.upsert_conversation(conv)
    assert repo.get_conversation("c1") == conv
    assert repo.get_conversation("missing") is None


def test_listing_is_newest_first_and_limited(repo: ConversationRepository) -> None:
    for i, minute in enumerate([5, 1, 9, 3]):
        repo.upsert_conversation(
            Conversation(conversation_id=f"c{i}", workspace_id=1, updated_at=_at(minute))
        )
    repo.upsert_conversation(
        Conversation(conversation_id="other", workspace_id=2, updated_at=_at(99))
    )
    listed = [c.conversation_id for c in repo.get_all_conversations(1)]
    assert listed == ["c2", "c0", "c3", "c1"]
    assert [c.conversation_id for c in repo.get_all_conversations(1, limit=2)] == ["c2", "c0"]
    last = repo.get_last_conversation(1)
    assert last is not None and last.conversation_id == "c2"
    assert repo.get_last_conversation(3) is None


def test_sub_second_timestamps_order_correctly(repo: ConversationRepository) -> None:
    base = _at(0)
    repo.upsert_conversation(Conversation(conversation_id="whole", workspace_id=1, updated_at=base))
    repo.upsert_conversation(
        Conversation(
            conversation_id="later", workspace_id=1, updated_at=base + timedelta(microseconds=500)
        )
    )
    assert [c.conversation_id for c in repo.get_all_conversations(1)] == ["later", "whole"]


def test_listing_uses_the_workspace_index(repo: ConversationRepository) -> None:
    plan = " ".join(repo.conversations.explain(where=["workspace_id"], order_by=["-updated_at"]))
    assert "USING INDEX conversations__by_workspace_id_updated_at" in plan
    assert "TEMP B-TREE" not in plan  # the index also gives the order: no sort step


def test_delete_checks_the_workspace(repo: ConversationRepository) -> None:
    repo.upsert_conversation(Conversation(conversation_id="c", workspace_id=1))
    assert repo.delete_conversation(2, "c") is False
    assert repo.get_conversation("c") is not None
    assert repo.delete_conversation(1, "c") is True
    assert repo.delete_conversation(1, "c") is False


def test_modify_conversation_touches_updated_at(repo: ConversationRepository) -> None:
    repo.upsert_conversation(Conversation(conversation_id="c", workspace_id=1, updated_at=_at(0)))
    new = repo.modify_conversation("c", lambda c: c.model_copy(update={"title": "renamed"}))
    assert new.title == "renamed" and new.updated_at > _at(0)
    assert repo.get_conversation("c") == new


def test_invalid_conversation_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        Conversation(conversation_id="c", workspace_id="not a number")  # type: ignore[arg-type]


def test_sample_conversation_has_the_requested_size() -> None:
    size = len(sample_conversation("c", context_bytes=2048).model_dump_json())
    assert 2048 <= size <= 2048 + 600


class _Login(BaseModel):
    """Read from "pwd", never written."""

    id: str
    password: str = Field("", alias="pwd", exclude=True)


class _Profile(BaseModel):
    """Writes the alias itself, through a model_serializer."""

    id: str
    display: str = Field("", alias="displayName")

    @model_serializer(mode="wrap")
    def _out(self, handler: Any) -> Any:
        data = handler(self)
        data["displayName"] = data.pop("display")
        return data


#: computed_field(exclude_if=...) came with pydantic 2.12; CI also runs the oldest supported.
HAS_EXCLUDE_IF = "exclude_if" in inspect.signature(computed_field).parameters


def _strict() -> BaseModel:
    """A record whose computed field is never written, with extra="forbid"."""

    class _Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: str

        @computed_field(exclude_if=lambda v: True)  # type: ignore[prop-decorator, call-overload, misc]
        @property
        def upper(self) -> str:
            return self.id.upper()

    return _Strict(id="a")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _Login(id="a", pwd="x"), id="excluded-alias"),
        pytest.param(lambda: _Profile(id="a", displayName="D"), id="model-serializer"),
        pytest.param(
            _strict,
            id="computed-exclude-if",
            marks=pytest.mark.skipif(not HAS_EXCLUDE_IF, reason="needs pydantic 2.12"),
        ),
    ],
)
def test_a_model_whose_records_read_back_is_accepted(
    store: mpstore.Store, make: Callable[[], BaseModel]
) -> None:
    # Judged by what its JSON holds, not by its field names alone.
    record = make()
    things = store.collection("things", type(record), key="id")
    things.upsert(record)
    assert things.get("a") == type(record).model_validate_json(record.model_dump_json())


def test_a_trigger_named_as_the_collection_does_not_keep_it_from_opening(
    store: mpstore.Store,
) -> None:
    # Triggers have names of their own in SQLite, apart from tables and indexes.
    with store.write() as conn:
        conn.execute("CREATE TABLE audit (k TEXT)")
        conn.execute("CREATE TRIGGER things AFTER INSERT ON audit BEGIN SELECT 1; END")
    things = store.collection("things", Note, key="id")
    things.upsert(Note(id="a", text="x"))
    assert things.count() == 1


def test_an_index_made_by_hand_under_mpstores_name_is_refused(db_path: str) -> None:
    with mpstore.Store(db_path) as store:
        store.collection("things", Note, key="id").upsert(Note(id="a", text="x"))
    with mpstore.Store(db_path) as store, store.write() as conn:
        conn.execute("ALTER TABLE things ADD COLUMN f_text TEXT")
        conn.execute('CREATE UNIQUE INDEX "things__by_text" ON things (f_text)')
    with mpstore.Store(db_path) as store, pytest.raises(mpstore.InvalidName, match="unique or"):
        store.collection("things", Note, key="id", indexes=[("text",)])


class _Samples(BaseModel):
    id: str
    samples: list[float | None] = []
    score: Annotated[float, PlainSerializer(lambda v: str(v), return_type=str)] = 0.0
    form: dict[str, Any] = {"type": "typed-dict", "fields": ["name"]}  # data, not a schema


def test_floats_written_their_own_way_and_optional_items_are_stored(store: mpstore.Store) -> None:
    # None among the items, a serializer that keeps a NaN as text, a default that looks like a
    # schema: none of them is a float written as null.
    samples = store.collection("samples", _Samples, key="id")
    record = _Samples(id="a", samples=[1.0, None], score=math.nan)
    samples.upsert(record)
    got = samples.get("a")
    assert got is not None and got.samples == [1.0, None] and math.isnan(got.score)


class _Badge(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)  # read by its alias only
    label: str = Field(alias="Label")


class _Member(BaseModel):
    id: str
    badge: _Badge
    badges: list[_Badge] = []


def test_a_nested_model_is_written_by_its_own_serialize_by_alias_where_it_reads_only_that(
    store: mpstore.Store,
) -> None:
    # Written by the top model's setting (names), _Badge could not read itself back: each
    # model is written by its own setting then, as model_dump_json() writes it.
    members = store.collection("members", _Member, key="id")
    record = _Member(id="m", badge=_Badge(Label="a"), badges=[_Badge(Label="b")])
    members.upsert(record)
    assert members.get("m") == record
    assert json.loads(store.query("SELECT value FROM members")[0][0]) == {
        "id": "m",
        "badge": {"Label": "a"},
        "badges": [{"Label": "b"}],
    }


class _Levels(TypedDict):
    level: NotRequired[Annotated[int, Field(alias="Level")]]


class _Leveled(BaseModel):
    id: str
    badge: _Badge
    levels: _Levels = {}


class _Unequal:
    """A value that refuses to be compared, as a numpy array does."""

    def __init__(self, items: list[int]) -> None:
        self.items = items

    def __eq__(self, other: object) -> bool:
        raise ValueError("the truth value of this comparison is ambiguous")

    __hash__ = None  # type: ignore[assignment]


class _Badged(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    id: str
    badge: _Badge
    tags: set[int] = set()
    vector: Annotated[
        _Unequal, BeforeValidator(_Unequal), PlainSerializer(lambda v: v.items, return_type=list)
    ]
    _hits: int = PrivateAttr(0)


def test_records_written_each_model_its_own_way_compare_their_keys_only(
    store: mpstore.Store,
) -> None:
    # The read-back may differ harmlessly: a set's items in another order, a private
    # attribute, a value that cannot be compared. Only keys that would be dropped count.
    badged = store.collection("badged", _Badged, key="id")
    tags = {64, 32, 136, 72, 176, 152, 24}
    badged.upsert(_Badged(id="a", badge=_Badge(Label="x"), tags=tags, vector=[1, 2]))
    counted = _Badged(id="b", badge=_Badge(Label="y"), tags=tags, vector=[3])
    counted._hits = 1
    badged.upsert(counted)
    got = badged.get("a")
    assert got is not None and got.tags == tags and got.vector.items == [1, 2]
    assert [r.id for r in badged.scan()] == ["a", "b"]


def test_records_written_by_each_models_own_alias_setting_must_read_back_the_same(
    store: mpstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Negative control of the per-record check behind the schema walk: a walk made to pass
    # every model written its own way (as if it missed _Levels, written "level" here and
    # read as "Level") leaves the read-back to find the key it would drop.
    check_field = _collection._JSONShape._check_field

    def own_way_passes(shape: Any, *args: Any) -> None:
        if shape._by_alias is not None:
            check_field(shape, *args)

    monkeypatch.setattr(_collection._JSONShape, "_check_field", own_way_passes)
    leveled = store.collection("leveled", _Leveled, key="id")
    leveled.upsert(_Leveled(id="a", badge=_Badge(Label="x")))
    with pytest.raises(mpstore.RecordTypeError, match="does not read back as written"):
        leveled.upsert(_Leveled(id="b", badge=_Badge(Label="y"), levels={"Level": 3}))
    assert [r.id for r in leveled.scan()] == ["a"]


class _Reading(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")
    value: float | None = None


class _Offset(BaseModel):
    value: float | None = None  # written as null when not finite: the record is checked


class _Sensor(BaseModel):
    id: str
    last: _Reading = _Reading()
    history: list[_Reading] = []
    offset: _Offset = _Offset()


def test_nested_optional_floats_keep_none_and_a_nan_their_model_writes_as_text(
    store: mpstore.Store,
) -> None:
    # A None that is a None is no lost float; nor is a NaN its own model writes as "NaN".
    sensors = store.collection("sensors", _Sensor, key="id")
    sensors.upsert(_Sensor(id="a", last=_Reading(value=math.nan), history=[_Reading()]))
    got = sensors.get("a")
    assert got is not None and got.last.value is not None and math.isnan(got.last.value)
    assert got.history == [_Reading()] and got.offset == _Offset()
    with pytest.raises(mpstore.RecordTypeError, match=r"holds inf at offset\.value"):
        sensors.upsert(_Sensor(id="b", offset=_Offset(value=math.inf)))


class _Tag(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    weight: float | None = None


class _Tagged(BaseModel):
    id: str
    note: str | None = None
    tags: frozenset[_Tag] = frozenset()
    unit: str = "kg"

    @field_serializer("unit")
    def _json_only(self, unit: str, info: SerializationInfo) -> str:
        if not info.mode_is_json():
            raise ValueError("written as JSON only")
        return unit


class _Stats(BaseModel):
    values: list[float] = []
    best: float | None = None
    scratch: float = Field(default=0.0, exclude=True)  # never written

    @computed_field  # type: ignore[prop-decorator]
    @functools.cached_property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan


class _Run(BaseModel):
    id: str
    stats: _Stats


def test_only_what_a_record_writes_is_counted_for_lost_floats(store: mpstore.Store) -> None:
    # A cached computed field's NaN (kept in the instance's __dict__) and an excluded field's
    # are not written, so not lost: the record is stored. A NaN lost beside them is found.
    runs = store.collection("runs", _Run, key="id")
    record = _Run(id="r", stats=_Stats(scratch=math.nan))
    runs.upsert(record)
    got = runs.get("r")
    assert got is not None and got.stats.values == [] and got.stats.best is None
    with pytest.raises(mpstore.RecordTypeError, match=r"holds nan at stats\.best"):
        runs.upsert(_Run(id="s", stats=_Stats(values=[1.0], best=math.nan, scratch=1.0)))


class _Hist(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")
    bins: dict[float, float] = {}
    by: dict[int | str, float] = {}


@dataclasses.dataclass
class _Leaf:
    v: float | None = None
    scratch: Annotated[float, Field(exclude=True)] = 0.0
    owner: Annotated[Any, Field(exclude=True)] = dataclasses.field(default=None, compare=False)


class _Observed(BaseModel):
    id: str
    hist: _Hist = _Hist()
    leaves: list[_Leaf] = []
    note: list[float | None] = [None]  # a null in the JSON: the record is read back


def test_nans_that_read_back_as_nans_under_changed_keys_or_excluded_are_stored(
    store: mpstore.Store,
) -> None:
    # A NaN key, an int key that reads back as text (both hold NaN or infinity as text, so
    # they come back), and a plain dataclass's excluded fields (a NaN, a reference back to
    # the record, which the walk must not follow) are no floats lost.
    observed = store.collection("observed", _Observed, key="id")
    observed.upsert(_Observed(id="a", hist=_Hist(bins={math.nan: math.nan})))
    observed.upsert(_Observed(id="b", hist=_Hist(by={1: math.inf})))
    looped = _Observed(id="c", leaves=[_Leaf(scratch=math.nan)])
    looped.leaves[0].owner = looped
    observed.upsert(looped)
    got = observed.get("b")
    assert got is not None and got.hist.by == {"1": math.inf}
    assert [r.id for r in observed.scan()] == ["a", "b", "c"]


def _clean(value: float) -> float:
    return value if math.isfinite(value) else 0.0


class _Scored(BaseModel):
    score: Annotated[float, PlainSerializer(_clean, return_type=float)] = 0.0


class _Part(BaseModel):
    a: int


class _BigPart(_Part):
    w: float


class _Junked(TypedDict):
    a: int
    junk: NotRequired[Annotated[float, Field(exclude=True)]]


def _as_null(value: float | None) -> float | None:
    return None if value is not None and not math.isfinite(value) else value


class _Unwritten(BaseModel):
    id: str
    scored: _Scored = _Scored()
    nulled: Annotated[float | None, PlainSerializer(_as_null)] = None  # on purpose
    part: _Part = _Part(a=0)
    junked: _Junked = {"a": 0}
    note: list[float | None] = [None]  # a null in the JSON: the record is read back


def test_nans_the_json_never_holds_are_not_lost(store: mpstore.Store) -> None:
    # Written as 0.0 by a serializer, held in a subclass's own field of a base-typed field,
    # or under a TypedDict key left out: none of them is written as null, so none is lost;
    # a serializer that writes a NaN as null does so on purpose.
    unwritten = store.collection("unwritten", _Unwritten, key="id")
    unwritten.upsert(_Unwritten(id="a", scored=_Scored(score=math.nan)))
    unwritten.upsert(_Unwritten(id="b", part=_BigPart(a=1, w=math.nan)))
    unwritten.upsert(_Unwritten(id="c", junked={"a": 2, "junk": math.nan}))
    unwritten.upsert(_Unwritten(id="d", nulled=math.nan))  # a serializer writes it as null
    assert [r.id for r in unwritten.scan()] == ["a", "b", "c", "d"]
    got = unwritten.get("a")
    assert got is not None and got.scored.score == 0.0


def test_records_checked_for_lost_floats_are_not_dumped_to_python(store: mpstore.Store) -> None:
    # Finite floats in a set of frozen models, and a serializer that works in JSON mode only:
    # a Python dump of either fails (a set of dicts; the serializer's error), so the check
    # for floats read back as None must look at the records themselves.
    tagged = store.collection("tagged", _Tagged, key="id")
    record = _Tagged(id="a", tags=frozenset({_Tag(name="x", weight=1.5), _Tag(name="y")}))
    tagged.upsert(record)
    assert tagged.get("a") == record


class _Tree(BaseModel):
    id: str = "t"
    children: list[_Tree] = []


def _nested(depth: int) -> _Tree:
    tree = _Tree()
    for _ in range(depth):
        tree = _Tree(children=[tree])
    return tree


def test_json_depth_is_how_deep_pydantic_reads_json() -> None:
    # The collection parses a record's JSON before writing only when it holds more than
    # JSON_DEPTH lists and objects: a lower limit in pydantic would let deeper records through.
    def nested(depth: int) -> str:
        return '{"a":' * depth + "1" + "}" * depth

    from_json(nested(_collection.JSON_DEPTH))
    with pytest.raises(ValueError, match="recursion limit"):
        from_json(nested(_collection.JSON_DEPTH + 1))


def test_a_record_nested_as_deep_as_pydantic_reads_is_stored(store: mpstore.Store) -> None:
    trees = store.collection("trees", _Tree, key="id")
    deepest = _nested(99)  # 199 levels of JSON, in 199 objects and 99 lists
    trees.upsert(deepest)
    assert trees.get("t") == deepest
    with pytest.raises(mpstore.RecordTooLarge, match="nests its values deeper"):
        trees.upsert(_nested(100))
    assert trees.get("t") == deepest


def test_a_record_with_many_shallow_lists_is_stored(store: mpstore.Store) -> None:
    class _Grid(BaseModel):
        id: str
        rows: list[list[int]]

    grid = _Grid(id="g", rows=[[i] for i in range(1000)])
    grids = store.collection("grids", _Grid, key="id")
    grids.upsert(grid)
    assert grids.get("g") == grid


#: Field(exclude_if=...) came with pydantic 2.12; CI also runs the oldest supported.
HAS_FIELD_EXCLUDE_IF = "exclude_if" in inspect.signature(Field).parameters


@pytest.mark.skipif(not HAS_FIELD_EXCLUDE_IF, reason="needs pydantic 2.12")
@pytest.mark.parametrize("nested", [False, True], ids=["own-field", "nested-model"])
def test_a_required_field_left_out_by_exclude_if_is_refused(
    store: mpstore.Store, nested: bool
) -> None:
    class _Level(BaseModel):
        id: str = "l"
        level: int = Field(exclude_if=lambda v: v == 0)  # type: ignore[call-overload, misc]

    class _Tank(BaseModel):
        id: str
        level: _Level

    if nested:
        tanks = store.collection("tanks", _Tank, key="id")
        kept, dropped = _Tank(id="a", level=_Level(level=1)), _Tank(id="b", level=_Level(level=0))
    else:
        tanks = store.collection("tanks", _Level, key="id")  # type: ignore[arg-type]
        kept, dropped = _Level(id="a", level=1), _Level(id="b", level=0)  # type: ignore[assignment]
    tanks.upsert(kept)
    with pytest.raises(mpstore.RecordTypeError, match="cannot read back"):
        tanks.upsert(dropped)
    assert tanks.get("a") == kept
    assert tanks.get("b") is None


def test_a_nested_model_built_without_a_field_is_stored_only_when_revalidated(
    store: mpstore.Store,
) -> None:
    # model_construct() skips validation: a nested model missing a field is found by
    # revalidate=True (the record's own fields are checked either way).
    class _Inner(BaseModel):
        a: int
        b: str

    class _Outer(BaseModel):
        id: str
        inner: _Inner

    record = _Outer(id="x", inner=_Inner.model_construct(a=1))
    checked = store.collection("outer", _Outer, key="id", revalidate=True)
    with pytest.raises(ValidationError, match=r"inner\.b"):
        checked.upsert(record)
    assert checked.count() == 0
    with pytest.raises(mpstore.RecordTypeError, match="has no value for 'inner'"):
        checked.upsert(_Outer.model_construct(id="y"))


def _drop(path: str, table: str) -> None:
    """Drop ``table`` as another program would: sqlite3 alone, without the store."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(f'DROP TABLE "{table}"')
        conn.commit()
    finally:
        conn.close()


class _Crew(BaseModel):
    id: str
    team: str = ""


CALLS: dict[str, Callable[[mpstore.Collection[_Crew]], object]] = {
    "upsert": lambda people: people.upsert(_Crew(id="b", team="t")),
    "upsert_many": lambda people: people.upsert_many([_Crew(id="b", team="t")]),
    "delete": lambda people: people.delete("a"),
    "update": lambda people: people.update("a", lambda p: p),
    "get": lambda people: people.get("a"),
    "count": lambda people: people.count(),
    "keys": lambda people: list(people.keys()),
    "scan": lambda people: list(people.scan()),
    "find": lambda people: people.find({"team": "t"}),
    "explain": lambda people: people.explain(["team"]),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_collection_whose_table_was_dropped_says_so_then_makes_it_anew(
    store: mpstore.Store, call: str
) -> None:
    people = store.collection("people", _Crew, key="id", indexes=[("team",)])
    people.upsert(_Crew(id="a", team="t"))
    _drop(store.path, "people")
    with pytest.raises(mpstore.CollectionNotFound, match="'people' has no table"):
        CALLS[call](people)
    assert people.count() == 0  # the next call made the table anew, with its index
    people.upsert(_Crew(id="b", team="t"))
    assert [p.id for p in people.find({"team": "t"})] == ["b"]
    assert store.collection("people", _Crew, key="id", indexes=[("team",)]) is people


def test_opening_a_collection_found_dropped_makes_its_table_at_once(store: mpstore.Store) -> None:
    people = store.collection("people", _Crew, key="id")
    _drop(store.path, "people")
    with pytest.raises(mpstore.CollectionNotFound):
        people.get("a")
    assert store.collection("people", _Crew, key="id") is people
    assert store.query("SELECT count(*) FROM people") == [(0,)]


def test_a_repository_recovers_after_its_table_was_dropped(store: mpstore.Store) -> None:
    repo = ConversationRepository(store)
    repo.upsert_conversation(sample_conversation("c1"))
    _drop(store.path, "conversations")
    with pytest.raises(mpstore.CollectionNotFound):
        repo.upsert_conversation(sample_conversation("c2"))
    repo.upsert_conversation(sample_conversation("c3"))
    assert [c.conversation_id for c in repo.conversations.scan()] == ["c3"]


def test_a_read_block_does_not_make_a_dropped_table_anew(store: mpstore.Store) -> None:
    people = store.collection("people", _Crew, key="id")
    _drop(store.path, "people")
    with store.read():
        for _ in range(2):  # found gone, then still gone: a read block cannot make it
            with pytest.raises(mpstore.CollectionNotFound):
                people.get("a")
    assert people.get("a") is None


def test_the_list_of_collections_leaves_out_one_whose_table_was_dropped(
    store: mpstore.Store,
) -> None:
    store.collection("people", _Crew, key="id").upsert(_Crew(id="a"))
    store.collection("crews", _Crew, key="id")
    _drop(store.path, "people")
    assert store.collections() == {"crews": 0}
    with store.write():
        assert store.collections() == {"crews": 0}


def test_a_table_dropped_inside_a_write_block_fails_the_collections_write_there(
    store: mpstore.Store,
) -> None:
    people = store.collection("people", _Crew, key="id")
    people.upsert(_Crew(id="a", team="t"))
    with pytest.raises(mpstore.CollectionNotFound), store.write() as conn:
        conn.execute("DROP TABLE people")
        people.upsert(_Crew(id="b", team="t"))
    assert [p.id for p in people.scan()] == ["a"]  # the block rolled back: the table is there


def test_another_missing_table_is_not_taken_for_the_collections(store: mpstore.Store) -> None:
    people = store.collection("people", _Crew, key="id")
    with store.write() as conn:
        conn.execute("CREATE TABLE audit (key TEXT)")
        conn.execute(
            "CREATE TRIGGER log AFTER INSERT ON people "
            "BEGIN INSERT INTO audit VALUES (NEW.key); END"
        )
        conn.execute("DROP TABLE audit")
    with pytest.raises(sqlite3.OperationalError, match=r"no such table: main\.audit"):
        people.upsert(_Crew(id="a", team="t"))
    assert store.collection("people", _Crew, key="id") is people


@dataclasses.dataclass
class _Probe:
    value: float | None = None
    note: float | None = dataclasses.field(default=None, compare=False)


class _Survey(BaseModel):
    id: str
    values: set[float | None] = set()
    pairs: set[tuple[str, float | None]] = set()
    sample: _Probe = _Probe()


@pytest.mark.parametrize(
    "record",
    [
        _Survey(id="s", values={None, 1.5}, pairs={("a", None), ("b", 2.0)}),
        _Survey(id="s", values={None}, sample=_Probe(value=None, note=3.0)),
        _Survey(id="s", sample=_Probe(value=1.0, note=None)),
    ],
)
def test_nones_beside_finite_floats_in_sets_and_dataclasses_are_stored(
    store: mpstore.Store, record: _Survey
) -> None:
    # The checks that find a NaN lost in a set, or behind a dataclass's ==, pass these by.
    surveys = store.collection("surveys", _Survey, key="id")
    surveys.upsert(record)
    assert surveys.get("s") == record


class _Derived(BaseModel):
    """Writes ``a`` alone; reading derives ``b`` from it."""

    id: str
    a: int
    b: int

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if isinstance(data, dict) and "b" not in data:
            data = {**data, "b": data["a"] * 2}
        return data

    @model_serializer
    def _write(self) -> dict[str, Any]:
        return {"id": self.id, "a": self.a}


def test_a_record_built_without_a_field_its_serializer_never_writes_is_stored(
    store: mpstore.Store,
) -> None:
    # Where code decides what is written, the record is read back instead of checked for
    # fields: this one reads back whole.
    derived = store.collection("derived", _Derived, key="id")
    derived.upsert(_Derived.model_construct(id="x", a=1))
    assert derived.get("x") == _Derived(id="x", a=1, b=2)


class _Cell(BaseModel):
    x: int = 0
    grid: list[list[int]] = []


class _Shelf(BaseModel):
    id: str = "h"
    leaf: _Cell = _Cell()
    by_name: dict[str, _Cell] = {}
    pair: tuple[int, str] = (1, "a")
    maybe: _Cell | None = None


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = "l"


class _Whatever(BaseModel):
    id: str = "a"
    value: Any = None


class _Typed(BaseModel):
    id: str = "r"
    x: int = 0

    @field_serializer("x")
    def _nested(self, v: int) -> list[list[int]]:
        return [[v]]


class _Untyped(BaseModel):
    id: str = "u"
    x: int = 0

    @field_serializer("x")
    def _nested(self, v: int):  # type: ignore[no-untyped-def]
        return [[v]]


@pytest.mark.parametrize(
    ("model", "depth"),
    [
        (_Cell, 3),  # the object, a list, a list
        (_Shelf, 5),  # the object, a dict, a _Cell
        (_Tree, None),  # recursive
        (_Open, None),  # extra fields
        (_Whatever, None),
        (_Typed, 3),  # what the serializer's return type says
        (_Untyped, None),  # a serializer without a return type
        (Conversation, None),  # a tool's parameters are Any
    ],
)
def test_json_depth_bounds_what_the_schema_can_write(model: type[BaseModel], depth: int) -> None:
    bound = _collection.depth_bound(model.__pydantic_core_schema__)
    assert (bound if isinstance(bound, int) else None) == depth


def _measured(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The JSON of each record whose nesting is measured before it is written."""
    measured: list[bytes] = []
    real = _collection.nesting
    monkeypatch.setattr(_collection, "nesting", lambda data: measured.append(data) or real(data))
    return measured


def test_a_model_that_cannot_nest_deep_is_never_measured_before_writing(
    store: mpstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured = _measured(monkeypatch)
    many = _Shelf(by_name={str(i): _Cell(grid=[[i]]) for i in range(300)})
    store.collection("holders", _Shelf, key="id").upsert(many)
    assert measured == []
    tree = _nested(3)
    tree.children.extend(_Tree(id=f"t{i}") for i in range(300))  # many objects, shallow
    store.collection("trees", _Tree, key="id").upsert(tree)
    assert len(measured) == 1  # the control: a recursive model's record is measured


def _deep_dict(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"k": 1}  # pydantic's parser counts an empty one as no level
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def test_a_record_whose_any_values_nest_too_deep_is_refused(
    store: mpstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[bytes] = []
    real = _collection.from_json
    monkeypatch.setattr(_collection, "from_json", lambda data: parsed.append(data) or real(data))
    repo = ConversationRepository(store)
    conversation = sample_conversation("c")
    assert conversation.context is not None
    conversation.context.messages *= 300  # many objects, in the part the schema bounds
    conversation.metrics = {f"m{i}": [[i]] for i in range(10)}  # within the budget
    repo.upsert_conversation(conversation)
    assert parsed == []  # the schema and the values typed Any told: no parse
    conversation.metrics = {"deep": _deep_dict(199)}  # 201 levels with the record's own
    with pytest.raises(mpstore.RecordTooLarge, match="nests its values deeper"):
        repo.upsert_conversation(conversation)
    assert len(parsed) == 1
    conversation.metrics = {"deep": _deep_dict(198)}
    repo.upsert_conversation(conversation)
    assert repo.get_conversation("c") == conversation


def test_a_model_in_a_value_typed_any_counts_as_deep_as_its_own_schema_writes() -> None:
    bound = _collection.depth_bound(_Whatever.__pydantic_core_schema__)
    assert callable(bound)
    assert bound(_Whatever(value=[1]), [64]) == 2
    # [[x]] by its serializer, inside the record's object: deeper than its values show.
    assert bound(_Whatever(value=_Typed()), [64]) == 4
    assert bound(_Whatever(value=_Tree()), [64]) is None  # recursive: the JSON must tell
    assert bound(_Whatever(value=[[[1]]]), [2]) is None  # past its budget: the JSON must tell


class _Mixed(BaseModel):
    id: str = "m"
    anything: Any = None
    many: list[Any] = []
    table: dict[str, list[Any]] = {}
    either: dict[str, Any] | None = None
    cell: _Cell | None = None


_JSON_VALUES = st.recursive(
    st.none() | st.integers() | st.text(alphabet='[]{}\\"x', max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3)
    ),
    max_leaves=40,
)


def _json_depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_json_depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_json_depth_of, value.values()), default=0)
    return 0


@given(
    anything=_JSON_VALUES,
    many=st.lists(_JSON_VALUES, max_size=3),
    table=st.dictionaries(st.text(max_size=2), st.lists(_JSON_VALUES, max_size=2), max_size=2),
    either=st.none() | st.dictionaries(st.text(max_size=2), _JSON_VALUES, max_size=2),
    nested=st.booleans(),
)
def test_the_depth_bound_is_never_below_the_json_written(
    anything: Any, many: list[Any], table: dict[str, list[Any]], either: Any, nested: bool
) -> None:
    record = _Mixed(
        anything=_Mixed(anything=anything) if nested else anything,
        many=many,
        table=table,
        either=either,
        cell=_Cell(grid=[[1]]) if nested else None,
    )
    bound = _collection.depth_bound(_Mixed.__pydantic_core_schema__)
    assert callable(bound)
    found = bound(record, [10_000])
    assert found is not None
    assert found >= _json_depth_of(json.loads(record.model_dump_json()))


class _Deep(enum.Enum):
    NESTED = ((((1,),),),)


class _Raw(BaseModel):
    id: str = "r"
    payload: Json = None  # type: ignore[type-arg]


class _Labelled(BaseModel):
    id: str = "l"
    label: Literal["a", "b"] = "a"


class _Marked(BaseModel):
    id: str = "t"
    tag: Literal[_Deep.NESTED] = _Deep.NESTED


class _Choice(TypedDict):
    meta: Any


class _Either(BaseModel):
    id: str = "e"
    value: _Choice | list[Any] = []


class _Extra(BaseModel):
    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, int] = Field(init=False)  # type: ignore[assignment]
    id: str = "x"


@pytest.mark.parametrize(
    ("model", "depth"),
    [
        (_Raw, None),  # Json without a type: written as parsed
        (_Marked, None),  # an enum member in a Literal is written as its value
        (_Either, None),  # which choice's function to ask is not known
        (_Extra, None),  # pydantic 2.11 writes extra fields as they are, whatever their type
    ],
)
def test_json_depth_of_values_written_as_they_are_is_not_bounded(
    model: type[BaseModel], depth: int | None
) -> None:
    assert _collection.depth_bound(model.__pydantic_core_schema__) == depth


def test_a_literal_field_is_measured_by_what_it_holds() -> None:
    bound = _collection.depth_bound(_Labelled.__pydantic_core_schema__)
    assert callable(bound)
    assert bound(_Labelled(), [64]) == 1
    record = _Labelled()
    record.label = [[1]]  # type: ignore[assignment]  # no validate_assignment: pydantic lets it
    assert bound(record, [64]) is None


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(_Raw.model_construct(id="r", payload=_deep_dict(210)), id="bare-json"),
        pytest.param(_Labelled.model_construct(id="l", label=_deep_dict(210)), id="literal"),
    ],
)
def test_values_written_as_they_are_that_nest_too_deep_are_refused(
    store: mpstore.Store, record: BaseModel
) -> None:
    coll = store.collection("c", type(record), key="id")
    with pytest.raises(mpstore.RecordTooLarge, match="nests its values deeper"):
        coll.upsert(record)
    assert coll.count() == 0


def test_a_schema_nested_deeper_than_python_recurses_still_opens(store: mpstore.Store) -> None:
    model: type[BaseModel] = create_model("L0", v=(int, 0))
    for i in range(1, 200):  # pydantic 2.11 itself cannot build much deeper
        model = create_model(f"L{i}", inner=(model, None))
    top = create_model("Top", id=(str, ...), inner=(model, None))
    # Python versions differ in how deep they let the walk go (3.12 reaches the end of this
    # one): a limit just above this frame makes every version run out.
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 150)
    try:
        assert _collection.depth_bound(top.__pydantic_core_schema__) is None
    finally:
        sys.setrecursionlimit(limit)
    tops = store.collection("tops", top, key="id")
    tops.upsert(top(id="a"))
    assert tops.count() == 1


def test_many_small_any_values_past_the_budget_are_measured_in_the_json(
    store: mpstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured = _measured(monkeypatch)
    many = _Whatever(value=[[i] for i in range(300)])  # past the budget of 64 containers
    store.collection("whatever", _Whatever, key="id").upsert(many)
    assert len(measured) == 1


_TRICKY_TEXT = st.text(alphabet='[]{}"\\/x\n\u00e9\u2603\x00\x7f', max_size=6)
_ANY_JSON = st.recursive(
    st.none() | st.integers() | st.floats(allow_nan=False) | _TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY_TEXT, inner, max_size=3),
    max_leaves=30,
)


@given(_ANY_JSON)
def test_nesting_counts_the_levels_of_the_json_pydantic_writes(value: Any) -> None:
    # Brackets, quotes and backslashes inside strings are not structure.
    assert _collection.nesting(to_json(value)) == _json_depth_of(value)


def test_nesting_stops_one_past_the_limit() -> None:
    deep = b"[" * 500 + b"]" * 500
    assert _collection.nesting(deep) == _collection.JSON_DEPTH + 1


def _wrapped(value: Any, shells: list[bool]) -> Any:
    for as_list in shells:
        value = [value, "]"] if as_list else {"[": value}
    return value


@given(
    st.lists(_ANY_JSON, min_size=1, max_size=3),
    st.lists(st.lists(st.booleans(), max_size=40), min_size=1, max_size=3),
)
def test_nesting_counts_deep_branches_as_well(values: list[Any], shells: list[list[bool]]) -> None:
    # Past the levels peeled one pass each, the rest is counted in one pass.
    value = [_wrapped(v, s) for v, s in zip(values, shells, strict=False)]
    assert _collection.nesting(to_json(value)) == _json_depth_of(value)


class _HidingDict(dict):  # type: ignore[type-arg]
    def values(self) -> Any:
        return []


class _HidingList(list):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        return iter(())


@pytest.mark.parametrize("holder", [_HidingDict, _HidingList], ids=["dict", "list"])
def test_a_container_subclass_cannot_hide_its_depth(store: mpstore.Store, holder: type) -> None:
    # pydantic writes their items from their storage, whatever their own iteration says.
    deep: Any = 1
    for _ in range(250):
        deep = [deep]
    value = holder({"k": deep}) if holder is _HidingDict else holder([deep])
    whatever = store.collection("whatever", _Whatever, key="id")
    with pytest.raises(mpstore.RecordTooLarge):
        whatever.upsert(_Whatever(value=value))
    assert whatever.count() == 0


def test_a_record_with_few_brackets_is_not_measured_at_all(store: mpstore.Store) -> None:
    whatever = store.collection("whatever", _Whatever, key="id")
    asked: list[object] = []
    test = whatever._may_be_deep
    assert test is not None
    whatever._may_be_deep = lambda record: asked.append(record) or test(record)
    whatever.upsert(_Whatever(value={"a": [1, 2, {"b": None}]}))
    assert asked == []
    whatever.upsert(_Whatever(value=[[i] for i in range(250)]))  # past 200 brackets
    assert len(asked) == 1
