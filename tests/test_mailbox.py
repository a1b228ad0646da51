"""Cross-process group commit: writes left in the mailbox, carried by whoever holds the gate."""

from __future__ import annotations

import errno
import marshal
import os
import random
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import mpstore
from mpstore import _mailbox, _sqlite, _store, _writer
from tests import mailbox_workers, workers
from tests.models import Note

_TRIES = _store.YIELDS // _store.TRY_COST  # tries of the gate between two sleeps, unpatched

pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(not _mailbox.available(), reason="the mailbox needs Linux"),
]


def _published(store: mpstore.Store) -> int:
    mailbox = store._gate.mailbox()
    assert mailbox is not None
    return sum(mailbox.state(i) == _mailbox.PUBLISHED for i in range(_mailbox.SLOTS))


@contextmanager
def _writers(
    calls: Sequence[tuple[Any, ...]], fn: Callable[..., Any] = mailbox_workers.write
) -> Iterator[Any]:
    """Start one spawned ``fn`` (by default :func:`mailbox_workers.write`) per call; yield a
    function that collects their reports in order. Any writer still running at the end is
    killed."""
    queue = workers.SPAWN.Queue()
    procs = [
        workers.SPAWN.Process(target=workers._report, args=(queue, i, fn, call))
        for i, call in enumerate(calls)
    ]
    for p in procs:
        p.start()

    def collect(timeout: float = workers.JOIN_TIMEOUT) -> list[Any]:
        got: dict[int, Any] = {}
        for _ in procs:
            worker, status, value = queue.get(timeout=timeout)
            assert status == "ok", value
            got[worker] = value
        return [got[i] for i in range(len(procs))]

    try:
        yield collect
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(workers.JOIN_TIMEOUT)


@contextmanager
def _one_writer(call: tuple[Any, ...]) -> Iterator[Any]:
    """Like :func:`_writers`, for one call; also yields the process, to kill it."""
    queue = workers.SPAWN.Queue()
    proc = workers.SPAWN.Process(
        target=workers._report, args=(queue, 0, mailbox_workers.write, call)
    )
    proc.start()
    try:
        yield proc, lambda timeout=workers.JOIN_TIMEOUT: queue.get(timeout=timeout)[1:]
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(workers.JOIN_TIMEOUT)


def _wait_published(store: mpstore.Store, count: int) -> None:
    while _published(store) < count:
        os.sched_yield()  # the writers are publishing; the gate is held so none can run


@pytest.fixture
def path(tmp_path: Path) -> str:
    p = str(tmp_path / "state.db")
    with mpstore.Store(p) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert_many([Note(id="d1", text=""), Note(id="d2", text="")])
    return p


@pytest.mark.parametrize("mailbox", [True, False])
def test_one_holder_commits_the_writes_other_processes_left(path: str, mailbox: bool) -> None:
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        calls = [(path, "upsert", k, False, mailbox) for k in ("a", "b", "c")]
        with _writers(calls) as collect:
            with store.write():
                if mailbox:
                    _wait_published(store, 3)
            reports = collect()
        assert [r["outcome"] for r in reports] == [("ok", None)] * 3
        assert {"a", "b", "c"} <= set(notes.keys())
    carried = sum(r["carried"] for r in reports)
    if mailbox:
        # The first woken writer took the gate and carried the other two in its commit.
        assert carried == 2 and sum(r["carried_away"] for r in reports) == 2
    else:
        assert carried == 0


@pytest.mark.parametrize("action", ["ABORT", "ROLLBACK", "FAIL"])
def test_a_carried_write_that_fails_fails_alone(path: str, action: str) -> None:
    # The trigger writes a row, then refuses. ROLLBACK ends the whole transaction: the others
    # run again without it. FAIL keeps what its statement did so far: only the write's own
    # SAVEPOINT takes the trigger's row back (a write on a table without triggers runs without
    # one, as SQLite undoes a failed one-row statement by itself).
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        with store.write() as conn:
            conn.execute("CREATE TABLE audit (key TEXT)")
            conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON notes WHEN NEW.key = 'bad' "
                f"BEGIN INSERT INTO audit VALUES (NEW.key); SELECT RAISE({action}, 'refused'); END"
            )
        # "bad" never leads: its write is always one carried by another process.
        calls = [(path, "upsert", k, k == "bad", True) for k in ("a", "bad", "c")]
        with _writers(calls) as collect:
            with store.write():
                _wait_published(store, 3)
            while _published(store):
                # A holder leaves a slot whose owner is mid-change (going to sleep) to the
                # next holder, and "bad" never leads: lead too until every write is taken.
                notes.upsert(Note(id="lead", text="x"))
            reports = collect()
        outcomes = [r["outcome"] for r in reports]
        assert outcomes == [("ok", None), ("error", "IntegrityError", "refused"), ("ok", None)]
        assert sum(r["carried"] for r in reports) + store.stats()["writes_carried"] >= 2
        keys = set(notes.keys())
        assert {"a", "c"} <= keys and "bad" not in keys
        assert store.query("SELECT count(*) FROM audit") == [(0,)]


def test_a_write_whose_try_of_the_gate_fails_once_it_is_taken_hears_its_own_outcome(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The holder has taken the write when its owner tries the gate and fails (the lock file
    # replaced by something it cannot open, say): the holder commits it, so the owner must
    # hear that, not the error.
    raised = workers.SPAWN.Event()
    settle = _writer._Carry.settle

    def settle_once_it_failed(self: _writer._Carry, conn: Any) -> None:
        assert raised.wait(workers.JOIN_TIMEOUT)
        settle(self, conn)

    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        with _writers([(path, "f", raised)], mailbox_workers.write_failing_tries) as collect:
            with store.write():
                _wait_published(store, 1)
            monkeypatch.setattr(_writer._Carry, "settle", settle_once_it_failed)
            notes.upsert(Note(id="holder", text="x"))
            monkeypatch.undo()
            (report,) = collect()
        assert report == ("ok", None)
        assert set(notes.keys()) >= {"f", "holder"}


def test_a_write_taken_by_a_holder_it_cannot_outwait_times_out_as_unknown_and_lets_go(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The holder has not finished the write when the owner's timeout runs out, and the owner's
    # tries of the gate fail: it may not wait for ever (a dead holder, a lock file nobody can
    # open). It says the outcome is unknown and gives its slot's claim back, so a holder that
    # died before COMMIT would be settled by dropping the write, never by running it later.
    raised, linger = workers.SPAWN.Event(), workers.SPAWN.Event()
    early = workers.SPAWN.Queue()
    settle = _writer._Carry.settle
    seen: dict[str, Any] = {}

    def settle_once_the_owner_gave_up(self: _writer._Carry, conn: Any) -> None:
        seen["outcome"] = early.get(timeout=workers.JOIN_TIMEOUT)
        seen["claimed"] = self.mailbox._claimed(self.taken[0].index)
        settle(self, conn)

    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        call = (path, "f", raised, 0.5, early, linger)
        with _writers([call], mailbox_workers.write_failing_tries) as collect:
            with store.write():
                _wait_published(store, 1)
            monkeypatch.setattr(_writer._Carry, "settle", settle_once_the_owner_gave_up)
            notes.upsert(Note(id="holder", text="x"))
            monkeypatch.undo()
            linger.set()
            collect()
    assert seen["outcome"][:2] == ("error", "TransactionError")
    assert "not known" in seen["outcome"][2]
    assert not seen["claimed"]


@contextmanager
def _opens(tmp_path: Path, count: int) -> Iterator[list[_mailbox.Mailbox]]:
    """``count`` opens of one mailbox file, closed after the block: each open's locks act as
    another process's."""
    path = str(tmp_path / "db.mailbox")
    opens = [_mailbox.Mailbox(path, 0o600) for _ in range(count)]
    try:
        yield opens
    finally:
        for mailbox in opens:
            mailbox.close()


def _publish(owner: _mailbox.Mailbox, op: tuple[Any, ...]) -> _mailbox.Slot:
    """Claim a slot of ``owner`` and leave ``op`` in it."""
    slot = owner.claim()
    assert slot is not None
    owner.publish(slot, _mailbox.encode_op(op))
    return slot


def test_a_claim_passing_over_a_taken_slot_is_never_seen_by_a_holder(tmp_path: Path) -> None:
    # A write whose owner gave it up (its claim given back) while a holder that then died had
    # it taken. Another process's claim() looks at that slot: it must hold the slot's lock all
    # the while it holds the claim, or the next holder's recovery would see a live owner and
    # publish the write again, to run after its caller was told its outcome is unknown.
    with _opens(tmp_path, 4) as (owner, holder, claimer, next_holder):
        slot = _publish(owner, ("upsert", "notes", "f"))
        assert [c.index for c in holder.take()] == [slot.index]  # then the holder dies
        owner.disown(slot)
        owner.give_back(slot)
        claim_byte = _mailbox._CLAIMS + slot.index
        holding, go = threading.Event(), threading.Event()
        lock = claimer._lock

        def lock_then_pause(offset: int, wait: bool, length: int = 1) -> bool:
            got = lock(offset, wait, length)
            if offset == claim_byte and got and not go.is_set():
                holding.set()
                go.wait(workers.JOIN_TIMEOUT)
            return got

        claimer._lock = lock_then_pause  # type: ignore[method-assign]
        claimed: list[Any] = []
        thread = threading.Thread(target=lambda: claimed.append(claimer.claim()))
        thread.start()
        try:
            assert holding.wait(workers.JOIN_TIMEOUT)
            # The claim is held this moment: so must the slot's lock be.
            locked = next_holder._try_mutex(slot.index)
            if locked:
                next_holder._unmutex(slot.index)
            assert not locked
        finally:
            go.set()
            thread.join(workers.JOIN_TIMEOUT)
        assert claimed[0] is not None and claimed[0].index != slot.index
        next_holder.recover(None)  # the dead holder's batch did not commit
        assert next_holder.state(slot.index) == _mailbox.FREE
        assert next_holder.take() == []


def test_a_waiting_write_yields_until_done_gate_free_or_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    yields: list[int] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(1))
    with _opens(tmp_path, 1) as (mailbox,):
        slot = _publish(mailbox, ("upsert", "notes", "f"))
        state = _mailbox._STATES + slot.index
        other = os.getppid()  # the gate's holder on record: another process

        def spun(deadline: float = float("inf"), now: float = 0.0) -> int:
            yields.clear()
            count = mailbox.spin(slot, 5, deadline, lambda: now)
            assert count == len(yields)
            return count

        _mailbox._HOLDER.pack_into(mailbox._mm, _mailbox._GATE, other, other, time.time())
        assert spun() == 5  # the whole budget: nothing changed
        assert spun(deadline=1.0, now=1.0) == 1  # time is up: back to the caller at once
        mailbox._mm[state] = _mailbox.DONE
        assert spun() == 1
        mailbox._mm[state] = _mailbox.PUBLISHED
        _mailbox._HOLDER.pack_into(mailbox._mm, _mailbox._GATE, 0, 0, 0.0)
        assert spun() == 1  # the gate looks free: the caller tries it
        assert mailbox.withdraw(slot)
        mailbox.give_back(slot)


def test_a_claim_without_a_socket_gives_its_slot_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of descriptors, or in a sandbox that refuses sockets: the write waits for the gate
    # itself, and the slot stays free for whoever can use it.
    with _opens(tmp_path, 2) as (first, other):

        def refused(*args: object) -> socket.socket:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(_mailbox.socket, "socket", refused)
        assert first.claim() is None
        monkeypatch.undo()
        slot = other.claim()
        assert slot is not None and slot.index == 0
        other.give_back(slot)


def test_a_write_without_a_socket_waits_for_the_gate(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = threading.Event()

    def refused(*args: object) -> socket.socket:
        asked.set()
        raise OSError(errno.EACCES, "Permission denied")

    with mpstore.Store(db_path) as store:
        notes = store.collection("notes", Note, key="id")
        with workers.holding_the_gate(db_path) as holder:
            monkeypatch.setattr(_mailbox.socket, "socket", refused)
            writer = threading.Thread(target=notes.upsert, args=(Note(id="n", text="x"),))
            writer.start()
            assert asked.wait(workers.JOIN_TIMEOUT)
            holder.release.set()
            writer.join(workers.JOIN_TIMEOUT)
        assert not writer.is_alive()
        assert notes.get("n") == Note(id="n", text="x")


def test_a_claim_passes_a_slot_whose_lock_is_held_instead_of_waiting(tmp_path: Path) -> None:
    # A process stopped (Ctrl-Z) while it holds a slot's lock must not stop other processes
    # from claiming another slot for their first write.
    with _opens(tmp_path, 2) as (stopped, claimer):
        assert stopped._try_mutex(0)
        claimed: list[Any] = []
        thread = threading.Thread(target=lambda: claimed.append(claimer.claim()))
        thread.start()
        thread.join(workers.JOIN_TIMEOUT)
        assert not thread.is_alive()
        assert claimed[0] is not None and claimed[0].index != 0
        stopped._unmutex(0)


def test_a_claim_leaves_the_locks_of_other_processes_slots_alone(tmp_path: Path) -> None:
    # A holder takes the slots it finds published under their locks; a claim scanning past a
    # slot that a live process owns must not hold that slot's lock even for a moment, or the
    # holder would leave the write for the next one.
    with _opens(tmp_path, 3) as (owner, holder, claimer):
        slot = _publish(owner, ("upsert", "notes", "f"))
        paused_or_done, go = threading.Event(), threading.Event()
        lock = claimer._lock

        def lock_then_pause(offset: int, wait: bool, length: int = 1) -> bool:
            got = lock(offset, wait, length)
            if offset == _mailbox._MUTEXES + slot.index and got:
                paused_or_done.set()
                go.wait(workers.JOIN_TIMEOUT)
            return got

        claimer._lock = lock_then_pause  # type: ignore[method-assign]
        claimed: list[Any] = []

        def claim() -> None:
            claimed.append(claimer.claim())
            paused_or_done.set()

        thread = threading.Thread(target=claim)
        thread.start()
        try:
            assert paused_or_done.wait(workers.JOIN_TIMEOUT)
            taken = holder.take()
        finally:
            go.set()
            thread.join(workers.JOIN_TIMEOUT)
        assert [c.index for c in taken] == [slot.index]
        assert claimed[0] is not None and claimed[0].index != slot.index
        _settle_unrun(holder, taken)


def test_a_ctrl_c_in_a_slot_lock_or_claim_leaves_neither_held(tmp_path: Path) -> None:
    # Taken by one mailbox and interrupted just after: another process must find both free.
    with _opens(tmp_path, 2) as (first, other):
        lock = first._lock

        def lock_then_interrupt(offset: int, wait: bool, length: int = 1) -> bool:
            lock(offset, wait, length)
            raise KeyboardInterrupt

        first._lock = lock_then_interrupt  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            first._try_mutex(5)
        first._lock = lock  # type: ignore[method-assign]
        assert other._try_mutex(5)
        other._unmutex(5)
        # A claim that finds a taken slot and is interrupted while it looks at it.
        slot = other.claim()
        assert slot is not None
        other.publish(slot, _mailbox.encode_op(("upsert", "notes", "f")))
        taken = other.take()
        assert [c.index for c in taken] == [slot.index]
        other.disown(slot)
        other.give_back(slot)  # its claim goes back; the write stays taken
        state = first.state

        def interrupted_at(index: int) -> int:
            if index == slot.index:
                raise KeyboardInterrupt
            return state(index)

        first.state = interrupted_at  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            first.claim()
        first.state = state  # type: ignore[method-assign]
        assert not other._claimed(slot.index)
        _settle_unrun(other, taken)


def test_a_holder_that_fails_before_its_first_step_leaves_no_gate_taken_hint(
    store: mpstore.Store,
) -> None:
    # The gate notes its holder in the mailbox as soon as it has the lock; a holder that fails
    # right after (here its gate-acquired hook) must not leave the note, which would keep other
    # processes' writes from trying the free gate until they sleep and wake.
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="a", text="x"))  # the mailbox is open: the gate notes holders there
    mailbox = store._gate.mailbox()
    assert mailbox is not None

    def refuse(event: str) -> None:
        if event == "gate-acquired":
            raise RuntimeError("refused")

    store.on_event = refuse
    with pytest.raises(RuntimeError, match="refused"):
        notes.upsert(Note(id="b", text="x"))
    store.on_event = None
    assert _mailbox._LEADER.unpack_from(mailbox._mm, _mailbox._GATE)[0] == 0


def _move_the_mailbox(path: str, how: str) -> None:
    """Delete the mailbox file, or put something else in its place ("replaced": a new empty
    file, as a cleanup might; "directory"; "symlink" to another file)."""
    mailbox_path = path + ".mailbox"
    if how == "deleted":
        os.unlink(mailbox_path)
    elif how == "replaced":
        Path(mailbox_path + ".new").touch()
        os.replace(mailbox_path + ".new", mailbox_path)
    else:
        os.unlink(mailbox_path)
        if how == "directory":
            os.mkdir(mailbox_path)
        else:
            Path(path + ".other").touch()
            os.symlink(path + ".other", mailbox_path)


def _kill_the_holder_while_it_carries(path: str, event: str, move: str = "") -> list[Any]:
    """Two processes leave deletes of d1 and d2 in the mailbox and never lead; a third takes
    them and is killed at ``event``; then this process writes, which makes it settle the dead
    holder's slots first (after the mailbox file is deleted or replaced, if ``move`` says so).
    Returns the two deleting processes' reports."""
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        calls = [(path, "delete", k, True, True) for k in ("d1", "d2")]
        with _writers(calls) as collect:
            with store.write():
                _wait_published(store, 2)
            leader = workers.SPAWN.Process(
                target=mailbox_workers.die_while_carrying, args=(path, event)
            )
            leader.start()
            leader.join(workers.JOIN_TIMEOUT)
            assert leader.exitcode == -signal.SIGKILL
            mailbox = store._gate.mailbox()
            assert mailbox is not None and mailbox.orphaned()
            if move:
                _move_the_mailbox(path, move)
            notes.upsert(Note(id="after", text="x"))
            reports = collect()
        if move:
            assert store._gate.mailbox() is not mailbox and mailbox.claim() is None
        else:
            assert not mailbox.orphaned()
        assert notes.get("d1") is None and notes.get("d2") is None
        assert (notes.get("leader") is not None) == (event == "commit")
    return reports


@pytest.mark.parametrize("event", ["taken", "settled", "commit"])
def test_a_holder_killed_while_carrying_writes_leaves_no_caller_misled(
    path: str, event: str
) -> None:
    # "taken", "settled": nothing of the batch was committed, so the next holder runs both
    # deletes again (and they find their rows). "commit": the batch committed, so it reports
    # the outcomes the dead one stored before COMMIT; running the deletes again would tell
    # both callers their rows did not exist.
    reports = _kill_the_holder_while_it_carries(path, event)
    assert [r["outcome"] for r in reports] == [("ok", True), ("ok", True)]


@pytest.mark.parametrize("event", ["taken", "commit"])
def test_a_dead_holders_writes_are_settled_before_its_mailbox_file_is_left(
    path: str, event: str
) -> None:
    # The deleting processes wait in the old file: only a holder that settles it before moving
    # to the new one can give them their outcomes (left taken, they would wait for good).
    reports = _kill_the_holder_while_it_carries(path, event, move="replaced")
    assert [r["outcome"] for r in reports] == [("ok", True), ("ok", True)]


def test_control_without_the_batch_id_a_committed_write_is_reported_wrongly(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same crash after COMMIT, settled by a holder that cannot see which batch committed:
    # it runs the deletes again, and both callers hear that their rows did not exist.
    monkeypatch.setattr(_sqlite, "last_batch", lambda conn: None)
    reports = _kill_the_holder_while_it_carries(path, "commit")
    assert [r["outcome"] for r in reports] == [("ok", False), ("ok", False)]


@pytest.mark.parametrize(
    ("op", "error"),
    [
        (("drop", "notes"), mpstore.MpstoreError),
        (("delete", "sqlite_master", "x"), mpstore.InvalidName),
        (("delete", "notes; DROP TABLE notes", "x"), mpstore.InvalidName),
        (("upsert", "notes", ("a b",), [("k", "{}", 1)], ()), mpstore.InvalidName),
        (("upsert", "notes", (["text"],), [("k", "{}", 1)], ()), mpstore.MpstoreError),
        (("upsert", "notes", (), [("k",)], ()), mpstore.MpstoreError),
        (("upsert", "notes", (), "rows", ()), mpstore.MpstoreError),
        (("upsert", "notes", (), [("k", "{}")]), mpstore.MpstoreError),
        (("delete", "notes", 7), mpstore.MpstoreError),
        ((), mpstore.MpstoreError),
    ],
)
def test_a_forged_operation_fails_alone_and_writes_nothing(
    store: mpstore.Store, op: tuple[Any, ...], error: type[Exception]
) -> None:
    # What a damaged or forged slot can hold reaches SQL only as a checked operation.
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="k", text="kept"))
    with pytest.raises(error):
        store._run_op(op)
    assert [n.text for n in notes.scan()] == ["kept"]


@pytest.mark.parametrize(
    "json_keys", [(("text", 'a"b'),), (("text", ["x"]),), "text", ((1, 2, 3),), (("text", ""),)]
)
def test_a_forged_json_key_fails_its_write_alone(store: mpstore.Store, json_keys: Any) -> None:
    # JSON keys reach SQL only for an index the writer did not know of: here, "text".
    notes = store.collection("notes", Note, key="id", indexes=[("text",)])
    notes.upsert(Note(id="k", text="kept"))
    row = ("k", '{"id":"k","text":"gone"}')
    with pytest.raises(mpstore.MpstoreError):
        store._run_op(("upsert", "notes", (), [row], json_keys))
    assert [n.text for n in notes.scan()] == ["kept"]


@pytest.mark.parametrize(
    "error",
    [
        mpstore.DiskFull("the file size limit", "/db", errno.EFBIG),
        mpstore.PermissionDenied("cannot open /db.lock", "/db.lock", errno.EPERM),
        mpstore.GateTimeout("waited", "/db.lock"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_carried_writes_error_comes_back_with_its_details(error: mpstore.MpstoreError) -> None:
    # What the holder stores in the slot is all its owner hears: the errno included.
    back = _mailbox._decode_error(_mailbox._encode_error(error), "/db")
    assert (type(back), back.message, back.path) == (type(error), error.message, error.path)
    assert getattr(back, "errno", None) == getattr(error, "errno", None)


@pytest.mark.parametrize("code", [10**20, -1, True, "28"])
def test_a_damaged_errno_in_a_slot_is_not_trusted(code: object) -> None:
    data = marshal.dumps(("mpstore", "DiskFull", "the disk is full", "/db", code))
    back = _mailbox._decode_error(data, "/db")
    assert isinstance(back, mpstore.DiskFull) and back.errno == errno.ENOSPC


def test_a_damaged_mailbox_file_is_refused_before_any_write(path: str) -> None:
    Path(path + ".mailbox").write_bytes(b"not a mailbox" * 100)
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        with pytest.raises(mpstore.MpstoreError, match="not an mpstore mailbox"):
            notes.upsert(Note(id="n", text="x"))
        assert notes.get("n") is None


def _ghost_write(path: str) -> mpstore.Store:
    """A process leaves an upsert of "ghost" in the mailbox and is killed before any holder
    takes it; then this process writes, and so holds the gate with the slot still published."""
    store = mpstore.Store(path)
    notes = store.collection("notes", Note, key="id")
    with _one_writer((path, "upsert", "ghost", True, True)) as (proc, _):
        with store.write():
            _wait_published(store, 1)
        proc.kill()
        proc.join(workers.JOIN_TIMEOUT)
    notes.upsert(Note(id="live", text="x"))
    return store


def test_a_write_whose_caller_died_waiting_is_never_run(path: str) -> None:
    # The caller never heard back, as if it had died waiting for the gate: nothing of it runs
    # later, where it could overwrite what others wrote since.
    with _ghost_write(path) as store:
        notes = store.collection("notes", Note, key="id")
        assert notes.get("live") is not None and notes.get("ghost") is None
        assert _published(store) == 0


def test_control_a_holder_that_does_not_check_the_owner_runs_the_dead_callers_write(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_mailbox.Mailbox, "_claimed", lambda self, index: True)
    with _ghost_write(path) as store:
        assert store.collection("notes", Note, key="id").get("ghost") is not None


def test_a_taken_slot_is_not_claimed_again_when_its_owner_goes(tmp_path: Path) -> None:
    # Each Mailbox object is its own open of the file, so its locks act as another process's.
    where = str(tmp_path / "x.mailbox")
    owner, holder, newcomer = (_mailbox.Mailbox(where, 0o600) for _ in range(3))
    try:
        slot = _publish(owner, ("delete", "notes", "k"))
        assert [c.index for c in holder.take()] == [slot.index]
        owner.give_back(slot)
        owner.close()  # the owner is gone; its write is still being carried
        fresh = newcomer.claim()
        assert fresh is not None and fresh.index != slot.index
        assert holder.state(slot.index) == _mailbox.TAKEN
    finally:
        for mailbox in (owner, holder, newcomer):
            mailbox.close()


class _Interrupt(BaseException):
    pass


def test_an_interrupt_after_commit_does_not_turn_carried_writes_into_failures(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        with _one_writer((path, "delete", "d1", True, True)) as (_, report):
            with store.write():
                _wait_published(store, 1)
            event = store._stats.event

            def interrupted(name: str) -> None:
                event(name)
                if name == "commit":
                    raise _Interrupt

            monkeypatch.setattr(store._stats, "event", interrupted)
            while store.stats()["writes_carried"] == 0:
                # A holder leaves a slot whose owner is mid-change (waking, going back to
                # sleep) to the next holder: lead again until the write is carried.
                with pytest.raises(_Interrupt):
                    notes.upsert(Note(id="lead", text="x"))
            monkeypatch.undo()
            assert report()[1]["outcome"] == ("ok", True)
        assert notes.get("d1") is None


def test_a_callback_under_the_gate_does_not_hold_waiting_writes_past_their_timeout(
    path: str,
) -> None:
    # The holder takes the mailbox's writes only after its own ran: a waiting write whose
    # timeout passes meanwhile is withdrawn and its caller told so, while the callback runs.
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        with _one_writer((path, "upsert", "late", True, True, 0.5)) as (_, report):
            with store.write():
                _wait_published(store, 1)
            seen = []

            def slow(n: Note) -> Note:
                seen.append(report(timeout=30))
                return n

            notes.update("d1", slow)
        assert seen[0][0] == "ok" and seen[0][1]["outcome"][:2] == ("error", "GateTimeout")
        assert notes.get("late") is None


def _acked(acks: str) -> list[str]:
    try:
        with open(acks) as f:
            return [line.strip() for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def test_writers_killed_at_random_moments_never_cost_an_acknowledged_write(path: str) -> None:
    # Six processes write through the mailbox; three of them are killed, each once it has had a
    # random number of writes acknowledged and then is seen carrying others' writes (or, if it
    # is not seen doing so, wherever it is). Every write a caller was told had landed must be
    # there, and every survivor must finish. Random timing: the cases above kill at each
    # point on purpose; this one finds what they do not name (a recovery that ignores the batch
    # id fails it in about a third of runs).
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    count, victims = 150, 3
    acks = [f"{path}.acks{w}" for w in range(6)]
    queue = workers.SPAWN.Queue()
    procs = [
        workers.SPAWN.Process(
            target=workers._report,
            args=(queue, w, mailbox_workers.write_and_ack, (path, w, count, acks[w])),
        )
        for w in range(6)
    ]
    for p in procs:
        p.start()
    try:
        watcher = _mailbox.Mailbox(path + ".mailbox", 0o600)
        for w in range(victims):
            after = rng.randrange(1, count // 2)
            while len(_acked(acks[w])) < after and procs[w].is_alive():
                os.sched_yield()  # the victim is writing; kill it once it has had `after` acks
            for _ in range(100_000):
                if watcher._leader() == procs[w].pid or not procs[w].is_alive():
                    break
            procs[w].kill()
        watcher.close()
        # A victim may have finished before its kill: its report comes too.
        reports: dict[int, Any] = {}
        while not set(range(victims, 6)) <= set(reports):
            worker, status, value = queue.get(timeout=workers.JOIN_TIMEOUT)
            reports[worker] = (status, value)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(workers.JOIN_TIMEOUT)
    assert all(status == "ok" for status, _ in reports.values()), (seed, reports)
    with mpstore.Store(path) as store:
        keys = set(store.collection("notes", Note, key="id").keys())
        for w in range(6):
            missing = [k for k in _acked(acks[w]) if k not in keys]
            assert not missing, (seed, w, missing[:5])
        for w in range(victims, 6):
            assert {f"w{w}-{i}" for i in range(count)} <= keys
        assert store.integrity_check() == ["ok"]


# -- one holder, writes left by hand through a second open of the mailbox -------------------
# A second Mailbox object is its own open of the file, so its locks and slots act as another
# process's would; the store of this process then leads and carries them.


@contextmanager
def _other_process(store: mpstore.Store) -> Iterator[Any]:
    """Yield a function that leaves ``op`` in the mailbox as another process would, and
    returns a function giving its outcome once carried."""
    other = _mailbox.Mailbox(store._gate.mailbox_path, 0o600)

    def leave(op: tuple[Any, ...]) -> Any:
        slot = other.claim()
        assert slot is not None
        other.publish(slot, _mailbox.encode_op(op))

        def outcome() -> tuple[bool, Any]:
            assert other.state(slot.index) == _mailbox.DONE
            return other.collect(slot)

        return outcome

    try:
        yield leave
    finally:
        other.close()


def _refusing(table: str, action: str, name: str = "refuse", prefix: str = "bad") -> str:
    """A trigger that notes the key in ``audit``, then refuses rows whose key has ``prefix``."""
    return (
        f"CREATE TRIGGER {name} BEFORE INSERT ON {table} WHEN NEW.key LIKE '{prefix}%' "
        f"BEGIN INSERT INTO audit VALUES (NEW.key); SELECT RAISE({action}, 'refused'); END"
    )


def _audited_notes(store: mpstore.Store) -> mpstore.Collection[Note]:
    """The notes collection, and an empty ``audit`` table for :func:`_refusing` triggers."""
    with store.write() as conn:
        conn.execute("CREATE TABLE audit (key TEXT)")
    return store.collection("notes", Note, key="id")


def _refuse(store: mpstore.Store, table: str, action: str) -> None:
    with store.write() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS audit (key TEXT)")
        conn.execute(_refusing(table, action))


def _upsert(notes: mpstore.Collection[Note], key: str) -> tuple[Any, ...]:
    return notes._upsert_op([notes._row(Note(id=key, text="x"))])


def test_carried_writes_that_all_end_the_transaction_each_hear_their_own_error(
    store: mpstore.Store,
) -> None:
    # Both carried writes end the transaction in turn; the holder's write runs again each time
    # and commits. No owner may read the slot as it was published (that would say "ok, 0 rows").
    notes = store.collection("notes", Note, key="id")
    _refuse(store, "notes", "ROLLBACK")
    with _other_process(store) as leave:
        outcomes = [leave(_upsert(notes, k)) for k in ("bad1", "bad2")]
        notes.upsert(Note(id="good", text="x"))
        for outcome in outcomes:
            ok, error = outcome()
            assert not ok and isinstance(error, sqlite3.IntegrityError)
    assert [n.id for n in notes.scan()] == ["good"]


def test_carried_writes_that_all_end_a_batch_of_abandoned_writes_each_hear_their_own_error(
    store: mpstore.Store,
) -> None:
    # The batch's own writes were all abandoned: it carries the mailbox's writes alone, and when
    # each of them ends the transaction nothing is left to commit.
    notes = store.collection("notes", Note, key="id")
    _refuse(store, "notes", "ROLLBACK")
    abandoned = threading.Event()
    abandoned.set()
    own: _writer._Job[None] = _writer._Job(lambda conn: None, abandoned)
    with _other_process(store) as leave:
        outcomes = [leave(_upsert(notes, k)) for k in ("bad1", "bad2")]
        with store._write_turn() as raw:
            store._queue._commit(raw, [own], store._carrier())
        assert isinstance(own.error, mpstore.Abandoned)
        for outcome in outcomes:
            ok, error = outcome()
            assert not ok and isinstance(error, sqlite3.IntegrityError)
    assert notes.count() == 0


def test_a_holder_whose_own_write_fails_leaves_the_mailbox_to_the_next(
    store: mpstore.Store,
) -> None:
    # The mailbox is taken only once the holder's own write has run: a failed one takes nothing,
    # and the write waiting there is committed by the next holder.
    notes = store.collection("notes", Note, key="id")
    _refuse(store, "notes", "ROLLBACK")
    with _other_process(store) as leave:
        outcome = leave(_upsert(notes, "waiting"))
        with pytest.raises(sqlite3.IntegrityError, match="refused"):
            notes.upsert(Note(id="bad0", text="x"))
        assert _published(store) == 1
        notes.upsert(Note(id="next", text="x"))
        assert outcome() == (True, 1)
    assert sorted(n.id for n in notes.scan()) == ["next", "waiting"]


def _notes_and_mailbox(
    store: mpstore.Store,
) -> tuple[mpstore.Collection[Note], _mailbox.Mailbox]:
    mailbox = store._gate.mailbox()
    assert mailbox is not None
    return store.collection("notes", Note, key="id"), mailbox


def _settle_unrun(mailbox: _mailbox.Mailbox, taken: list[_mailbox.Carried]) -> None:
    """Tell the owners of writes taken by hand that nothing ran for them."""
    mailbox.fail(taken, mpstore.MpstoreError("not run: taken by hand"))
    mailbox.finish(taken)


def test_a_slot_whose_owner_holds_its_lock_is_left_and_those_around_it_are_taken(
    store: mpstore.Store,
) -> None:
    # The holder locks the slots it takes with one lock over their range when it can; an
    # owner holding its own slot's lock in that range (going to sleep, withdrawing) makes it
    # go slot by slot, leaving that one for the next holder.
    notes, mailbox = _notes_and_mailbox(store)
    with _other_process(store) as leave:
        outcomes = [leave(_upsert(notes, k)) for k in ("a", "b", "c")]
        owner = _mailbox.Mailbox(store._gate.mailbox_path, 0o600)
        try:
            busy = [i for i in range(_mailbox.SLOTS) if mailbox.state(i) == _mailbox.PUBLISHED]
            assert len(busy) == 3
            with owner._mutex(busy[1]):
                taken = mailbox.take()
            assert [c.index for c in taken] == [busy[0], busy[2]]
            assert mailbox.state(busy[1]) == _mailbox.PUBLISHED
            _settle_unrun(mailbox, taken)
            notes.upsert(Note(id="next", text="x"))  # the next holder carries the one left
        finally:
            owner.close()
        assert [o()[0] for o in outcomes] == [False, True, False]
    assert sorted(notes.keys()) == ["b", "next"]


def test_the_holders_range_lock_leaves_a_slot_lock_of_its_own_process_held(
    store: mpstore.Store,
) -> None:
    # A thread of the holder's own process holds its slot's lock between two published
    # slots. Its lock is on the descriptor the holder's range lock would use: taking the range
    # would merge with it, and releasing the range would free it under that thread.
    notes, mailbox = _notes_and_mailbox(store)
    probe = _mailbox.Mailbox(store._gate.mailbox_path, 0o600)
    held, release = threading.Event(), threading.Event()
    with _other_process(store) as leave:
        first = leave(_upsert(notes, "a"))
        own = mailbox.claim()
        last = leave(_upsert(notes, "c"))
        assert own is not None

        def hold_own_slot() -> None:
            with mailbox._mutex(own.index):
                held.set()
                release.wait(workers.JOIN_TIMEOUT)

        thread = threading.Thread(target=hold_own_slot)
        thread.start()
        try:
            assert held.wait(workers.JOIN_TIMEOUT)
            taken = mailbox.take()
            assert len(taken) == 2 and taken[0].index < own.index < taken[1].index
            _settle_unrun(mailbox, taken)
            # Still held: another process cannot take it.
            assert not probe._lock(_mailbox._MUTEXES + own.index, wait=False)
        finally:
            release.set()
            thread.join(workers.JOIN_TIMEOUT)
            mailbox.give_back(own)
            probe.close()
        assert [first()[0], last()[0]] == [False, False]


def test_a_malformed_slot_fails_alone(store: mpstore.Store) -> None:
    notes = store.collection("notes", Note, key="id")
    with _other_process(store) as leave:
        good = leave(_upsert(notes, "ok1"))
        bad = leave(("delete", ["not", "a", "name"], "k"))
        notes.upsert(Note(id="mine", text="x"))
        assert good() == (True, 1)
        ok, error = bad()
        assert not ok and isinstance(error, mpstore.InvalidName)
    assert sorted(notes.keys()) == ["mine", "ok1"]


def test_a_trigger_spelled_differently_still_keeps_the_savepoint(store: mpstore.Store) -> None:
    # SQLite matches table names without regard to case; "ON notes" guards collection "Notes".
    notes = store.collection("Notes", Note, key="id")
    _refuse(store, "notes", "FAIL")
    with _other_process(store) as leave:
        outcome = leave(_upsert(notes, "bad1"))
        notes.upsert(Note(id="mine", text="x"))
        ok, error = outcome()
        assert not ok and isinstance(error, sqlite3.IntegrityError)
    assert store.query("SELECT key FROM audit") == []


def test_a_write_committed_by_another_holder_is_reported_so_even_if_taking_the_gate_fails(
    path: str,
) -> None:
    # The caller finds the gate free only after another holder has already committed its
    # write (played here by a second open of the mailbox, at the moment the gate is granted),
    # and its own turn at the gate then fails: the committed outcome is still its answer.
    other = _mailbox.Mailbox(path + ".mailbox", 0o600)
    failed_once: list[str] = []

    def commit_elsewhere_then_fail(event: str) -> None:
        if event == "gate-acquired" and not failed_once:
            taken = other.take()
            assert len(taken) == 1
            other.settle(taken, [(True, 1)], 1)
            other.finish(taken)
            failed_once.append(event)
            raise RuntimeError("this turn at the gate failed")

    try:
        with mpstore.Store(path, timeout=30, on_event=commit_elsewhere_then_fail) as store:
            notes = store.collection("notes", Note, key="id")
            with workers.holding_the_gate(path) as holder:
                outcome: list[Any] = []
                t = threading.Thread(target=lambda: outcome.append(notes.delete("d1")), daemon=True)
                t.start()
                _wait_published(store, 1)
                holder.release.set()
                t.join(workers.JOIN_TIMEOUT)
            assert failed_once and outcome == [True]
    finally:
        other.close()


def test_a_holder_that_died_leaves_the_gate_looking_taken_and_writes_still_land(
    path: str,
) -> None:
    with workers.holding_the_gate(path) as holder:
        holder.process.kill()
        holder.process.join(workers.JOIN_TIMEOUT)
    with mpstore.Store(path, timeout=5) as store:
        mailbox = store._gate.mailbox()
        assert mailbox is not None
        assert not mailbox.gate_free()  # the dead holder's pid is still there
        notes = store.collection("notes", Note, key="id")
        # The write waits in the mailbox for a holder that will never come, sleeps once, then
        # takes the gate itself: the kernel dropped the dead holder's lock.
        notes.upsert(Note(id="after", text="x"))
        assert notes.get("after") == Note(id="after", text="x")
        assert mailbox.gate_free()


def test_control_a_waiting_write_that_trusts_the_hint_alone_waits_for_a_dead_holder(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        mpstore.Store, "_worth_trying", staticmethod(lambda mailbox, slept: mailbox.gate_free())
    )
    with workers.holding_the_gate(path) as holder:
        holder.process.kill()
        holder.process.join(workers.JOIN_TIMEOUT)
    with mpstore.Store(path, timeout=0.3) as store:
        notes = store.collection("notes", Note, key="id")
        with pytest.raises(mpstore.GateTimeout):
            notes.upsert(Note(id="after", text="x"))


def _tries_between_sleeps(path: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """While a plain filelock user (no hint: the gate looks free) holds the gate, one write
    waits until its timeout; returns how many times it tried the gate before each sleep."""
    runs = [0]
    with (
        workers.filelock_held_elsewhere(path + ".lock"),
        mpstore.Store(path, timeout=1.0) as store,
    ):
        gate = store._gate
        try_acquire = gate.try_acquire
        mailbox = gate.mailbox()
        assert mailbox is not None
        sleep = mailbox.sleep

        def counting_try() -> bool:
            runs[-1] += 1
            return try_acquire()

        def counting_sleep(slot: Any, timeout: float) -> None:
            runs.append(0)
            sleep(slot, timeout)

        monkeypatch.setattr(gate, "try_acquire", counting_try)
        monkeypatch.setattr(mailbox, "sleep", counting_sleep)
        notes = store.collection("notes", Note, key="id")
        with pytest.raises(mpstore.GateTimeout):
            notes.upsert(Note(id="blocked", text="x"))
    return runs


def test_a_gate_that_looks_free_but_is_taken_is_tried_a_bounded_number_of_times_per_sleep(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = _tries_between_sleeps(path, monkeypatch)
    assert len(runs) > 1  # it slept
    assert max(runs) <= _TRIES + 2


def test_control_without_the_yield_budget_a_waiting_write_never_sleeps(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_store, "YIELDS", 10**9)
    runs = _tries_between_sleeps(path, monkeypatch)
    assert len(runs) == 1 and runs[0] > _TRIES + 2


def test_a_trigger_created_by_an_earlier_write_of_the_batch_keeps_the_savepoint(
    store: mpstore.Store,
) -> None:
    # An earlier batch asks the schema (no trigger yet), which is remembered for that schema.
    # Then one batch: a one-row upsert, a callback that creates a RAISE(FAIL) trigger, and a
    # carried write the trigger refuses. Answered from before the callback, the carried write
    # would run without its SAVEPOINT and the trigger's audit row would stay.
    notes = _audited_notes(store)

    def upsert_job(key: str) -> _writer._Job[int]:
        op = _upsert(notes, key)
        job: _writer._Job[int] = _writer._Job(_sqlite.op_runner(op), None, queued=False)
        job.op = op
        return job

    earlier, first = upsert_job("earlier"), upsert_job("mine")
    with store._write_turn() as raw:
        store._queue._commit(raw, [earlier, upsert_job("earlier2")], store._carrier())
    assert earlier.plain  # asked, and answered "no savepoint needed"

    def create_trigger(conn: mpstore.Connection) -> None:
        conn.execute(_refusing("notes", "FAIL"))

    second: _writer._Job[None] = _writer._Job(create_trigger, None, queued=False)
    with _other_process(store) as leave:
        outcome = leave(_upsert(notes, "bad1"))
        with store._write_turn() as raw:
            store._queue._commit(raw, [first, second], store._carrier())
        assert (first.error, second.error) == (None, None)
        ok, error = outcome()
        assert not ok and isinstance(error, sqlite3.IntegrityError)
    assert store.query("SELECT key FROM audit") == []
    assert sorted(notes.keys()) == ["earlier", "earlier2", "mine"]


class _SlowScheduler:
    """Stands in for the time module in mpstore._store: each ``os.sched_yield`` takes 10 ms of
    its clock, as on a machine where every yield gives the CPU away for a whole slice."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def sched_yield(self) -> None:
        self.offset += 0.01

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_a_short_timeout_still_tries_a_gate_a_dead_holder_left_looking_taken(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline comes before the first sleep; without a try at the deadline the write would
    # time out without ever trying the free gate, and so would every later one: nobody would
    # take the gate and clear the dead holder's pid.
    with workers.holding_the_gate(path) as holder:
        holder.process.kill()
        holder.process.join(workers.JOIN_TIMEOUT)
    clock = _SlowScheduler()
    monkeypatch.setattr(_store, "time", clock)
    monkeypatch.setattr(os, "sched_yield", clock.sched_yield)
    with mpstore.Store(path, timeout=0.05) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="after", text="x"))
        mailbox = store._gate.mailbox()
        assert mailbox is not None and mailbox.gate_free()
    assert clock.offset < 0.5  # it never slept through a whole spin budget


def test_a_rerun_asks_the_schema_after_the_callbacks_that_recreate_its_triggers(
    store: mpstore.Store,
) -> None:
    # The holder's callback creates a RAISE(FAIL) and a RAISE(ROLLBACK) trigger; the second
    # carried write hits the ROLLBACK one, which ends the transaction and takes both triggers
    # back with it. In the rerun the callback creates them again before the first carried
    # write runs: that write must keep its SAVEPOINT, or the FAIL trigger's audit row stays.
    notes = _audited_notes(store)

    def create_triggers(conn: mpstore.Connection) -> None:
        conn.execute(_refusing("notes", "FAIL"))
        conn.execute(_refusing("notes", "ROLLBACK", name="roll", prefix="rb"))

    own: _writer._Job[None] = _writer._Job(create_triggers, None, queued=False)
    with _other_process(store) as leave:
        bad = leave(_upsert(notes, "bad1"))
        rolled = leave(_upsert(notes, "rb1"))
        with store._write_turn() as raw:
            store._queue._commit(raw, [own], store._carrier())
        assert own.error is None
        for outcome in (bad, rolled):
            ok, error = outcome()
            assert not ok and isinstance(error, sqlite3.IntegrityError)
    assert store.query("SELECT key FROM audit") == []
    assert notes.count() == 0


def _follow_after_move(path: str, how: str, timeout: float) -> mpstore.Store:
    """A store whose mailbox file was deleted or replaced after its first write, and whose
    writes never take the gate on their own (only through the write queue, which waits)."""
    store = mpstore.Store(path, timeout=timeout)
    store.collection("notes", Note, key="id").upsert(Note(id="first", text=""))
    _move_the_mailbox(path, how)
    store._gate.try_acquire = lambda: False  # type: ignore[method-assign]
    return store


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_holder_carries_writes_left_in_the_mailbox_file_that_replaced_its_own(
    path: str, how: str
) -> None:
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="first", text=""))
        old = store._gate.mailbox()
        _move_the_mailbox(path, how)
        # Opened after the move, the other process leaves its write in the new file.
        with _one_writer((path, "upsert", "later", True, True, 5)) as (_, report):
            while _mailbox.snapshot(path + ".mailbox").waiting < 1:
                os.sched_yield()
            while store.stats()["writes_carried"] == 0:
                # A holder leaves a slot whose owner is mid-change (going to sleep) to the
                # next holder: lead again until the write is carried.
                notes.upsert(Note(id="holder", text=""))
            status, got = report()
        assert status == "ok" and got["outcome"] == ("ok", None) and got["carried_away"] == 1
        assert store.stats()["writes_carried"] == 1
        current = store._gate.mailbox()
        assert current is not old and current is not None and current.is_live()
        assert old is not None and old.claim() is None and old.closed  # nothing left in it
        assert notes.get("later") is not None


def test_a_holder_moving_to_a_new_mailbox_file_clears_its_hint_in_the_old_one(
    path: str,
) -> None:
    # Writers still on the old file read its "gate taken" hint: left there, it would keep them
    # from trying the free gate until they sleep and wake.
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="first", text=""))  # the mailbox is open: the gate notes there
        still_on_old = _mailbox.Mailbox(path + ".mailbox", 0o600)  # another process's view
        try:
            _move_the_mailbox(path, "replaced")
            notes.upsert(Note(id="moves", text=""))  # takes the gate, then moves
            assert store._gate.mailbox() is not None and store._gate.mailbox().is_live()
            assert _mailbox._LEADER.unpack_from(still_on_old._mm, _mailbox._GATE)[0] == 0
            assert still_on_old.gate_free()
        finally:
            still_on_old.close()


def test_the_holder_record_says_when_the_lock_was_taken(store: mpstore.Store) -> None:
    # Recorded as soon as the gate has the lock, and not again once the holder has entered.
    notes = store.collection("notes", Note, key="id")
    notes.upsert(Note(id="a", text="x"))  # the mailbox is open: the gate records there
    mailbox = store._gate.mailbox()
    assert mailbox is not None
    seen: list[Any] = []

    def note_the_record(event: str) -> None:
        if event == "gate-acquired":
            seen.append(_mailbox.recorded_holder(mailbox.path))
            now = time.time()
            while time.time() == now:
                pass  # a later entry would record a later time

    store.on_event = note_the_record
    notes.upsert(Note(id="b", text="x"))
    store.on_event = None
    assert seen[0] is not None and seen[0][0] == os.getpid()
    assert _mailbox.recorded_holder(mailbox.path) == seen[0]


def test_replaced_mailboxes_do_not_pile_up_in_a_long_lived_process(path: str) -> None:
    # A cleanup that keeps removing <db>.mailbox must not cost a descriptor and a mapping each
    # time: a replaced mailbox closes once the writes left in it are settled.
    def mapped() -> int:
        with open("/proc/self/maps") as maps:
            return sum(path + ".mailbox" in line for line in maps)  # this test's only

    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="first", text=""))
        for i in range(20):
            _move_the_mailbox(path, "replaced" if i % 2 else "deleted")
            notes.upsert(Note(id=f"n{i}", text=""))
        assert mapped() == 1 and store._gate._retired == []
        assert notes.count() == 23  # d1, d2 from the fixture


def test_control_a_holder_blind_to_the_move_never_sees_the_other_processes_write(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_mailbox.Mailbox, "is_live", lambda self: True)
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="first", text=""))
        _move_the_mailbox(path, "replaced")
        with _one_writer((path, "upsert", "later", True, True, 1)) as (_, report):
            while _mailbox.snapshot(path + ".mailbox").waiting < 1:
                os.sched_yield()
            notes.upsert(Note(id="holder", text=""))
            status, got = report()
        assert status == "ok" and got["outcome"][:2] == ("error", "GateTimeout")
        assert store.stats()["writes_carried"] == 0


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_write_left_in_a_mailbox_file_since_deleted_waits_for_the_gate_itself(
    path: str, how: str
) -> None:
    # Holders that opened the mailbox since the move never see this process's write; it must
    # not wait for them. Its process then moves to the file there now.
    with _follow_after_move(path, how, timeout=60) as store:
        old = store._gate.mailbox()
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="later", text=""))
        assert notes.get("later") is not None
        assert store.stats()["writes_carried_away"] == 0
        current = store._gate.mailbox()
        assert current is not old and current is not None and current.is_live()
        assert old is not None and old.claim() is None and old.closed  # nothing left in it


def test_control_a_write_blind_to_the_move_waits_until_its_timeout(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_mailbox.Mailbox, "is_live", lambda self: True)
    with _follow_after_move(path, "deleted", timeout=0.5) as store:
        notes = store.collection("notes", Note, key="id")
        with pytest.raises(mpstore.GateTimeout):
            notes.upsert(Note(id="later", text=""))


@pytest.mark.parametrize("how", ["directory", "symlink"])
def test_a_mailbox_replaced_by_what_it_cannot_open_fails_writes_typed(path: str, how: str) -> None:
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="first", text=""))
        _move_the_mailbox(path, how)
        with pytest.raises(mpstore.PermissionDenied, match="cannot open the mailbox"):
            notes.upsert(Note(id="refused", text=""))
        assert notes.get("refused") is None


def test_a_write_holding_the_replaced_mailbox_without_a_slot_still_lands(path: str) -> None:
    # A thread has the mailbox in hand, not yet a slot of it, when the holder moves to the
    # new file: the old one must still be there for it to look at.
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="first", text=""))
        carrier = store._carrier
        in_hand, go_on = threading.Event(), threading.Event()

        def carrier_then_wait() -> _mailbox.Mailbox | None:
            mailbox = carrier()
            if threading.current_thread().name == "in-hand":
                in_hand.set()
                go_on.wait()
            return mailbox

        store._carrier = carrier_then_wait  # type: ignore[method-assign]
        outcome: list[Any] = []

        def write() -> None:
            try:
                notes.upsert(Note(id="in-hand", text=""))
                outcome.append("ok")
            except Exception as exc:  # reported to the test below
                outcome.append(exc)

        thread = threading.Thread(target=write, name="in-hand")
        thread.start()
        in_hand.wait()
        _move_the_mailbox(path, "replaced")
        notes.upsert(Note(id="holder", text=""))  # moves this process to the new file
        go_on.set()
        thread.join()
        assert outcome == ["ok"]
        assert notes.get("in-hand") is not None


@pytest.mark.parametrize(
    ("op", "error"),
    [
        (("upsert", ["notes"], (), [], ()), mpstore.InvalidName),
        (("upsert", "bad name", (["x"],), [], ()), mpstore.InvalidName),
        (("upsert", "notes", (["x"],), [], ()), mpstore.MpstoreError),
    ],
)
def test_a_malformed_carried_write_says_what_is_wrong_and_nothing_else(
    store: mpstore.Store, op: tuple[Any, ...], error: type[Exception]
) -> None:
    # The SQL made for a carried write is cached by its names as sent; one that cannot even
    # be a cache key must not drag that lookup's TypeError into the name's own error.
    with store.write() as conn, pytest.raises(error) as raised:
        _sqlite.run_op(conn, op)
    assert raised.type is error
    assert not isinstance(raised.value.__context__, TypeError) or raised.value.__cause__ is not None


def test_a_carried_write_into_a_dropped_table_hears_collection_not_found(path: str) -> None:
    # The holder runs it in another process: what comes back is SQLite's message alone, and
    # the caller's collection still tells what it means.
    with mpstore.Store(path) as store:
        others = store.collection("others", Note, key="id")
        with _one_writer((path, "upsert", "a", True, True)) as (_, report):
            with store.write() as conn:
                _wait_published(store, 1)
                conn.execute("DROP TABLE notes")
            while _published(store):
                others.upsert(Note(id="lead", text="x"))  # leads, and carries the write
            outcome, carried = report()[1]["outcome"], store.stats()["writes_carried"]
        assert outcome[:2] == ("error", "CollectionNotFound") and carried == 1


def test_carried_upserts_that_share_a_statement_fail_alone(path: str) -> None:
    # Taken together, they run as one statement; when it fails, each runs by itself.
    long_key = "k" * 500  # past the length this holder's SQLite takes: that write alone fails
    with mpstore.Store(path) as store:
        others = store.collection("others", Note, key="id")
        with store.write() as conn:
            conn._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 400)
        calls = [(path, "upsert", k, True, True) for k in ("a", long_key, "c")]
        with _writers(calls) as collect:
            with store.write():
                _wait_published(store, 3)
            while _published(store):
                others.upsert(Note(id="lead", text="x"))  # leads, and carries the writes
            reports = collect()
        notes = store.collection("notes", Note, key="id")
        assert [r["outcome"][:2] for r in reports] == [
            ("ok", None),
            ("error", "DataError"),
            ("ok", None),
        ]
        assert {"a", "c"} <= set(notes.keys()) and long_key not in set(notes.keys())
