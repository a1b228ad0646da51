"""Many real processes on one store: no lock error, no lost write, no lost update."""

from __future__ import annotations

import multiprocessing as mp
import os
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
