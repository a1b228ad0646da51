"""store.stats(), and the WAL checkpoints that run outside the gate."""

from __future__ import annotations

import os
import re
import threading

import pytest

import mpstore
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
    for timing in ("gate_wait", "gate_hold", "transaction", "pool_wait"):
        summary = after[timing]
        assert summary["count"] >= 10 if timing != "pool_wait" else summary["count"] >= 1
        assert 0 <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]


def test_a_new_store_reports_every_counter(store: mpstore.Store) -> None:
    stats = store.stats()
    documented = re.findall(r"``(\w+)``", mpstore.Store.stats.__doc__ or "")
    for counter in (*COUNTERS, "checkpoints", "checkpoint_errors"):
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


def test_wal_is_checkpointed_outside_the_gate(db_path: str) -> None:
    with mpstore.Store(db_path) as store:
        repo = ConversationRepository(store)
        with store.write() as conn:
            # The write connection leaves checkpoints to the background thread.
            assert conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        for i in range(2000):
            repo.upsert_conversation(sample_conversation(f"c{i}", context_bytes=8192))
            if store._checkpointer.ran.is_set():
                break
        assert store._checkpointer.ran.wait(30), "no checkpoint ran after the WAL grew"
        assert store.stats()["checkpoints"] >= 1
        assert store.stats()["checkpoint_errors"] == 0
        pending = store._checkpointer.pending()
        assert pending is not None and pending < store._checkpointer.threshold


def test_checkpoints_still_run_when_the_wal_index_cannot_be_read(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mpstore.Store(db_path) as store:
        notes = store.collection("notes", Note, key="id")
        monkeypatch.setattr(store._checkpointer, "pending", lambda: None)
        for i in range(store._checkpointer.threshold // 4):
            notes.upsert(Note(id=str(i), text="x" * 100))
        assert store._checkpointer.ran.wait(30), "the WAL would grow without bound"
