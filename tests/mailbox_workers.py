"""Child processes for the mailbox tests (spawned, so they live in an importable module)."""

from __future__ import annotations

import os
import signal
from typing import Any

import mpstore
from mpstore import _mailbox
from tests import workers
from tests.models import Note


def write(
    path: str, op: str, key: str, follow_only: bool, mailbox: bool, timeout: float = 60
) -> dict[str, Any]:
    """One upsert or delete of ``key``; returns its outcome and this process's counters.

    With ``follow_only`` the process never takes the gate itself: its write waits in the
    mailbox until another process carries it (so a test decides who leads).
    """
    with mpstore.Store(path, timeout=timeout, mailbox=mailbox) as store:
        notes = store.collection("notes", Note, key="id")
        if follow_only:
            store._gate.try_acquire = lambda: False  # type: ignore[method-assign]
        try:
            if op == "delete":
                outcome: Any = ("ok", notes.delete(key))
            else:
                outcome = ("ok", notes.upsert(Note(id=key, text=op)))
        except Exception as exc:  # reported to the test, which checks the type
            outcome = ("error", type(exc).__name__, str(exc))
        stats = store.stats()
    return {
        "outcome": outcome,
        "carried": stats["writes_carried"],
        "carried_away": stats["writes_carried_away"],
    }


def write_failing_tries(
    path: str,
    key: str,
    raised: Any,
    timeout: float = 60,
    early: Any = None,
    linger: Any = None,
) -> Any:
    """One upsert whose tries of the gate find it busy while the write waits untaken, and fail
    with an error once a holder has taken it (then ``raised`` is set); returns its outcome.

    With ``early`` (a queue) the outcome is also put there at once, and with ``linger`` (an
    event) the process stays, its store open, until that is set.
    """
    with mpstore.Store(path, timeout=timeout) as store:
        notes = store.collection("notes", Note, key="id")
        mailbox = store._gate.mailbox()
        assert mailbox is not None

        def try_acquire() -> bool:
            if any(mailbox.state(slot.index) == _mailbox.TAKEN for slot in mailbox._slots):
                raised.set()
                raise mpstore.PermissionDenied("the lock file cannot be opened", path)
            return False

        store._gate.try_acquire = try_acquire  # type: ignore[method-assign]
        outcome: Any
        try:
            outcome = ("ok", notes.upsert(Note(id=key, text="x")))
        except Exception as exc:  # reported to the test, which checks it
            outcome = ("error", type(exc).__name__, str(exc))
        if early is not None:
            early.put(outcome)
        if linger is not None:
            linger.wait(workers.JOIN_TIMEOUT)
        return outcome


def die_while_carrying(path: str, event: str) -> None:
    """Take the gate for one write, carry whatever waits in the mailbox, and die (kill -9) at
    ``event``: "taken" (writes taken, none run), "settled" (outcomes stored in the slots, not
    committed) or "commit" (committed, owners not yet told)."""

    def die(name: str) -> None:
        if name == event:
            os.kill(os.getpid(), signal.SIGKILL)

    take, settle = _mailbox.Mailbox.take, _mailbox.Mailbox.settle

    def take_then_die(self: _mailbox.Mailbox) -> list[_mailbox.Carried]:
        taken = take(self)
        if taken:
            die("taken")
        return taken

    def settle_then_die(self: _mailbox.Mailbox, *args: Any) -> None:
        settle(self, *args)
        die("settled")

    _mailbox.Mailbox.take = take_then_die  # type: ignore[method-assign]
    _mailbox.Mailbox.settle = settle_then_die  # type: ignore[method-assign]
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        store.on_event = die
        notes.upsert(Note(id="leader", text="x"))


def write_and_ack(path: str, worker: int, count: int, acks: str) -> int:
    """Upsert ``count`` notes one by one, appending each key to ``acks`` once its call returned
    (the file says exactly which writes this process was told had landed, even if killed)."""
    with mpstore.Store(path, timeout=30) as store, open(acks, "a", buffering=1) as out:
        notes = store.collection("notes", Note, key="id")
        for i in range(count):
            key = f"w{worker}-{i}"
            notes.upsert(Note(id=key, text="x"))
            out.write(key + "\n")
    return count
