"""A state machine drives a collection and the conversation repository against a dict model."""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import mpstore
from mpstore.conversations import Conversation, ConversationRepository
from tests.models import Note

keys = st.sampled_from(["a", "b", "c", "d", "key with spaces", "ключ", "x" * 40])
texts = st.text(max_size=20)
workspaces = st.integers(1, 3)
minutes = st.integers(0, 10_000)
BASE = datetime(2026, 1, 1, tzinfo=UTC)


class StoreMachine(RuleBasedStateMachine):
    """Every rule changes the store and the model the same way; invariants compare them."""

    def __init__(self) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory(prefix="mpstore-sm-")
        self.store = mpstore.Store(os.path.join(self._dir.name, "sm.db"))
        self.notes = self.store.collection("notes", Note, key="id")
        self.repo = ConversationRepository(self.store)
        self.model: dict[str, str] = {}
        self.convs: dict[str, Conversation] = {}

    def teardown(self) -> None:
        self.store.close()
        self._dir.cleanup()

    @rule(key=keys, text=texts)
    def upsert(self, key: str, text: str) -> None:
        self.notes.upsert(Note(id=key, text=text))
        self.model[key] = text

    @rule(batch=st.lists(st.tuples(keys, texts), max_size=5))
    def upsert_many(self, batch: list[tuple[str, str]]) -> None:
        self.notes.upsert_many(Note(id=k, text=t) for k, t in batch)
        self.model.update(batch)

    @rule(key=keys)
    def delete(self, key: str) -> None:
        assert self.notes.delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(key=keys, suffix=texts)
    def update(self, key: str, suffix: str) -> None:
        if key not in self.model:
            try:
                self.notes.update(key, lambda n: n)
            except mpstore.KeyNotFound:
                return
            raise AssertionError("update of a missing key did not raise KeyNotFound")
        new = self.notes.update(key, lambda n: n.model_copy(update={"text": n.text + suffix}))
        self.model[key] += suffix
        assert new.text == self.model[key]

    @rule(key=keys, text=texts)
    def failed_write_block_changes_nothing(self, key: str, text: str) -> None:
        with pytest.raises(ValueError, match="abort"), self.store.write():
            self.notes.upsert(Note(id=key, text=text))
            raise ValueError("abort")

    @rule(key=keys)
    def get(self, key: str) -> None:
        got = self.notes.get(key)
        assert (got.text if got else None) == self.model.get(key)

    @rule(cid=keys, ws=workspaces, minute=minutes)
    def upsert_conversation(self, cid: str, ws: int, minute: int) -> None:
        conv = Conversation(
            conversation_id=cid, workspace_id=ws, updated_at=BASE + timedelta(minutes=minute)
        )
        self.repo.upsert_conversation(conv)
        self.convs[cid] = conv

    @precondition(lambda self: bool(self.convs))
    @rule(data=st.data(), ws=workspaces)
    def delete_conversation(self, data: st.DataObject, ws: int) -> None:
        cid = data.draw(st.sampled_from(sorted(self.convs)))
        deleted = self.repo.delete_conversation(ws, cid)
        assert deleted == (self.convs[cid].workspace_id == ws)
        if deleted:
            del self.convs[cid]

    @rule(ws=workspaces, limit=st.none() | st.integers(0, 4))
    def list_workspace(self, ws: int, limit: int | None) -> None:
        got = self.repo.get_all_conversations(ws, limit)
        mine = [c for c in self.convs.values() if c.workspace_id == ws]
        times = sorted((c.updated_at for c in mine), reverse=True)
        assert [c.updated_at for c in got] == times[:limit]
        assert all(c.workspace_id == ws for c in got)

    @invariant()
    def contents_match(self) -> None:
        assert {n.id: n.text for n in self.notes.scan()} == self.model
        assert list(self.notes.keys()) == sorted(self.model)
        assert self.notes.count() == len(self.model)
        assert {c.conversation_id: c for c in self.repo.conversations.scan()} == self.convs


TestStoreMachine = StoreMachine.TestCase


class _DropsLastRecord(mpstore.Collection[Note]):
    """A collection with a planted bug: upsert_many silently loses the last record."""

    def upsert_many(self, records):  # type: ignore[no-untyped-def]
        return super().upsert_many(list(records)[:-1])


def test_the_machine_catches_a_planted_lost_write() -> None:
    class Broken(StoreMachine):
        def __init__(self) -> None:
            super().__init__()
            self.notes.__class__ = _DropsLastRecord

    with pytest.raises(AssertionError):
        run_state_machine_as_test(
            Broken, settings=settings(max_examples=200, database=None, deadline=None)
        )
