"""The cross-process write gate: exclusion, timeouts, crash safety and the lock file's life."""

from __future__ import annotations

import fcntl
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import pytest

import mpstore
from mpstore import _gate, _inspect, _mailbox, _proc, _writer
from mpstore._gate import Gate, drop_gate, gate_for
from tests import workers
from tests.models import Note

pytestmark = pytest.mark.processes


@pytest.mark.parametrize("kind", ["flock", "filelock"])
def test_gate_excludes_across_processes(tmp_path: Path, kind: str) -> None:
    log = str(tmp_path / "sections.log")
    lock = str(tmp_path / "db.lock")
    barrier = workers.SPAWN.Barrier(4)
    args = [(lock, 150, barrier, log, kind) for _ in range(4)]
    workers.run_processes(workers.critical_sections, args)
    lines = Path(log).read_text().splitlines()
    assert len(lines) == 4 * 150 * 2
    assert workers.overlaps(log) == 0


def test_overlap_check_catches_a_missing_gate(tmp_path: Path) -> None:
    # The negative control for the test above: the same workload with a gate that excludes
    # nobody must show overlapping sections, or the check has gone blind.
    lock = str(tmp_path / "db.lock")
    found = 0
    for attempt in range(5):
        log = str(tmp_path / f"ungated-{attempt}.log")
        barrier = workers.SPAWN.Barrier(4)
        workers.run_processes(
            workers.critical_sections, [(lock, 300, barrier, log, "none") for _ in range(4)]
        )
        found = workers.overlaps(log)
        if found:
            break
    assert found > 0


def test_threads_of_one_process_queue_in_arrival_order(tmp_path: Path) -> None:
    gate = gate_for(str(tmp_path / "db.lock"), 0o600)
    try:
        order: list[int] = []
        gate.acquire(5)
        threads = []
        for i in range(5):
            t = threading.Thread(target=_take_and_record, args=(gate, i, order))
            t.start()
            threads.append(t)
            _wait_for_waiters(gate, i + 1)
        gate.release()
        for t in threads:
            t.join()
        assert order == [0, 1, 2, 3, 4]
    finally:
        drop_gate(gate)


def test_threads_never_share_the_gate(tmp_path: Path) -> None:
    # New arrivals race the hand-off from a releasing thread to the longest waiter; a gap there
    # once let two threads hold the gate at once.
    gate = gate_for(str(tmp_path / "db.lock"), 0o600)
    inside: list[int] = []
    overlaps: list[int] = []
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        for _ in range(300):
            gate.acquire(30)
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(len(inside))
            os.sched_yield()
            inside.pop()
            gate.release()

    try:
        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert overlaps == []
    finally:
        drop_gate(gate)


def _take_and_record(gate: Gate, i: int, order: list[int]) -> None:
    gate.acquire(10)
    order.append(i)
    gate.release()


def _wait_for_waiters(gate: Gate, n: int) -> None:
    # Each thread parks on its own turn lock; spin on the queue length (no sleep) so the next
    # thread starts only after the previous one is queued.
    while len(gate._waiters) < n:
        os.sched_yield()


def test_gate_timeout_names_the_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    mpstore.Store(path).close()
    with workers.holding_the_gate(path) as holder, mpstore.Store(path, timeout=0.3) as store:
        with pytest.raises(mpstore.GateTimeout) as info, store.write():
            pass
        err = info.value
        pid = holder.process.pid
        assert err.holder_pid == pid
        assert f"pid {pid}" in str(err)
        assert store.lock_path in str(err)
        assert err.waited is not None and err.waited >= 0.3
        assert isinstance(err, TimeoutError)
    assert holder.process.exitcode == 0


def test_the_later_of_the_holder_records_names_the_holder(tmp_path: Path) -> None:
    """A holder whose mailbox is open records itself there and leaves the lock file alone,
    which may name an earlier holder: the error and ``mpstore info`` report the later record."""
    path = str(tmp_path / "state.db")
    mpstore.Store(path).close()
    with workers.holding_the_gate(path) as holder, mpstore.Store(path, timeout=0.2) as store:
        fd = os.open(store.lock_path, os.O_WRONLY)
        try:  # an earlier holder's record, from long ago
            os.pwrite(fd, b"1 1000.000000".ljust(47) + b"\n", 0)
        finally:
            os.close(fd)
        with pytest.raises(mpstore.GateTimeout) as info, store.write():
            pass
        assert info.value.holder_pid == holder.process.pid
        state = _inspect.gate_state(store.lock_path)
        assert state.held and state.pid == holder.process.pid
    assert holder.process.exitcode == 0


def test_a_holder_is_on_record_before_its_own_steps_run(tmp_path: Path) -> None:
    """A holder records itself as soon as it has the lock, before its hooks (or the settling of
    what a dead holder left) run: a waiter that times out meanwhile names it, not the holder
    before it."""
    path = str(tmp_path / "state.db")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import mpstore, sys\n"
            "def hook(event):\n"
            "    if event == 'gate-acquired':\n"
            "        print('holding', flush=True); input()\n"
            "with mpstore.Store(sys.argv[1]) as s:\n"
            "    with s.write(): pass\n"  # opens its mailbox: it records itself there
            "    print('wrote', flush=True); input()\n"
            "    s.on_event = hook\n"
            "    with s.write(): pass\n",
            path,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == b"wrote\n"
        with mpstore.Store(path, timeout=0.2) as store:
            with store.write():  # the last holder on record is now this process
                pass
            child.stdin.write(b"\n")
            child.stdin.flush()
            assert child.stdout.readline() == b"holding\n"
            with pytest.raises(mpstore.GateTimeout) as info, store.write():
                pass
        assert info.value.holder_pid == child.pid
        child.stdin.write(b"\n")
        child.stdin.flush()
        assert child.wait(workers.JOIN_TIMEOUT) == 0
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states in /proc")
def test_gate_timeout_says_when_the_holder_is_stopped(tmp_path: Path) -> None:
    """A holder stopped by Ctrl-Z keeps the gate until it goes on: the error says so, and
    how to let it go on. Before it was stopped, the same holder was not called stopped."""
    path = str(tmp_path / "state.db")
    mpstore.Store(path).close()
    with workers.holding_the_gate(path) as holder, mpstore.Store(path, timeout=0.2) as store:
        pid = holder.process.pid
        with pytest.raises(mpstore.GateTimeout) as running, store.write():
            pass
        assert f"pid {pid}" in str(running.value) and "stopped" not in str(running.value)
        with (
            workers.stopped(holder.process),
            pytest.raises(mpstore.GateTimeout) as stopped,
            store.write(),
        ):
            pass
        assert stopped.value.holder_pid == pid
        assert f"pid {pid}, which is stopped (SIGSTOP or Ctrl-Z)" in str(stopped.value)
        assert f"kill -CONT {pid}" in str(stopped.value)
    assert holder.process.exitcode == 0


def test_a_stopped_process_the_lock_file_names_is_not_blamed_when_another_holds_the_gate(
    tmp_path: Path,
) -> None:
    """The record names the last mpstore holder; a plain filelock user holding the gate now
    writes none. That earlier holder, stopped but idle, is not called the one in the way."""
    path = str(tmp_path / "state.db")
    idle = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import mpstore, sys\n"
            "with mpstore.Store(sys.argv[1]) as s, s.write(): pass\n"
            "print('wrote', flush=True); input()",
            path,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert idle.stdout is not None and idle.stdout.readline() == b"wrote\n"
        with (
            workers.stopped(idle),
            workers.filelock_held_elsewhere(path + ".lock"),
            mpstore.Store(path, timeout=0.2) as store,
        ):
            with pytest.raises(mpstore.GateTimeout) as timeout, store.write():
                pass
            assert f"last holder on record: pid {idle.pid})" in str(timeout.value)
            state = _inspect.gate_state(store.lock_path)
            assert state.held and state.pid == idle.pid and state.stopped is None
    finally:
        idle.kill()
        idle.wait()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states in /proc")
def test_a_stopped_process_is_told_from_a_running_one_whatever_its_name() -> None:
    # A command name may hold ") T (": the state is the field after the last parenthesis.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "open('/proc/self/comm', 'w').write('x) T (y'); print('named', flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"named\n"
        assert Path(f"/proc/{child.pid}/comm").read_text() == "x) T (y\n"
        assert _proc.stopped(child.pid) is None
        with workers.stopped(child):
            assert _proc.stopped(child.pid) == "stopped"
        assert _proc.stopped(child.pid) is None
    finally:
        child.kill()
        child.wait()
    assert _proc.stopped(child.pid) is None  # gone


def test_a_timeout_behind_a_waiting_thread_names_the_other_process(tmp_path: Path) -> None:
    """A plain filelock user in another process holds the gate; this process's update() times
    out with its writer thread still queued for the kernel lock. The next write, which waits
    behind that thread, is blocked by the other process, not by the thread."""
    path = str(tmp_path / "state.db")
    with mpstore.Store(path) as setup:  # leaves this process's pid as the last holder recorded
        setup.collection("notes", Note, key="id")
    with (
        workers.filelock_held_elsewhere(path + ".lock"),
        mpstore.Store(path, timeout=0.3) as store,
    ):
        notes = store.collection("notes", Note, key="id")
        with pytest.raises(mpstore.GateTimeout):
            notes.update("a", lambda n: n)
        assert store._gate.busy_here and not store._gate.held_here
        with pytest.raises(mpstore.GateTimeout) as info, store.write():
            pass
    message = str(info.value)
    assert "held by another process" in message
    assert "no other holder on record" in message
    assert info.value.holder_pid is None  # this process's own old record is not the holder


def test_a_killed_holder_releases_the_gate_and_its_transaction(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    with mpstore.Store(path, timeout=10) as store:
        with workers.holding_the_gate(path) as holder:
            os.kill(holder.process.pid or 0, signal.SIGKILL)
            holder.process.join(60)
        with store.write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS held (x TEXT)")
            conn.execute("INSERT INTO held VALUES ('after')")
        assert store.query("SELECT x FROM held") == [("after",)]
        assert store.integrity_check() == ["ok"]


def test_filelock_users_and_mpstore_exclude_each_other(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    with mpstore.Store(path, timeout=0.2) as store:
        outside = filelock.FileLock(store.lock_path)
        with (
            workers.held_by_another_thread(lambda: outside),
            pytest.raises(mpstore.GateTimeout),
            store.write(),
        ):
            pass
        with store.write():
            pass


@pytest.mark.parametrize("change", ["delete", "replace"])
@pytest.mark.parametrize("take", ["wait", "try"])
def test_gate_moves_to_a_recreated_lock_file(tmp_path: Path, change: str, take: str) -> None:
    # A try checks the file before it takes the lock, a wait once it has it: both must end
    # on the file that is there now.
    lock = str(tmp_path / "db.lock")
    gate = gate_for(lock, 0o600)
    other = Gate(lock, 0o600)  # another "process": its own descriptor and queue
    other.users = 1  # a store uses it: its descriptor stays open between turns
    try:
        other.acquire(5)  # opens its descriptor on the first file
        other.release()
        gate.acquire(5)
        first_inode = os.stat(lock).st_ino
        os.unlink(lock)
        if change == "replace":
            Path(lock).write_text("")
        if take == "try":
            # The orphaned file's holder may still be writing: not the new file's turn yet.
            assert not other.try_acquire()
        gate.release()
        # The next holder must lock the file that is there now, not the orphaned inode.
        if take == "try":
            assert not other.try_acquire()  # takes the old lock, finds it orphaned, moves
            assert other.try_acquire()
        else:
            other.acquire(5)
        assert os.fstat(other._kernel()._fd).st_ino == os.stat(lock).st_ino
        if take == "try":
            assert not gate.try_acquire()  # it tries the live file, which `other` holds
        else:
            with pytest.raises(mpstore.GateTimeout):
                gate.acquire(0.2)  # it queues on the live file, which `other` holds
        other.release()
        gate.acquire(5)
        assert os.fstat(gate._kernel()._fd).st_ino == os.stat(lock).st_ino
        assert os.stat(lock).st_ino != first_inode or change == "delete"
        gate.release()
    finally:
        other.users = 0
        other.close()
        drop_gate(gate)


def test_a_lock_file_that_cannot_be_reopened_fails_the_write_and_keeps_other_files_safe(
    tmp_path: Path,
) -> None:
    """The lock file is replaced by a directory: reopening it fails. The gate must keep a
    descriptor of its own, not a closed number the process then gives to SQLite's files."""
    path = str(tmp_path / "state.db")
    with mpstore.Store(path) as store:
        with store.write() as conn:
            conn.execute("CREATE TABLE t (x INTEGER)")
        os.unlink(store.lock_path)
        os.mkdir(store.lock_path)
        with pytest.raises(mpstore.PermissionDenied, match="lock file"), store.write():
            pass
        os.rmdir(store.lock_path)
        # New descriptors now, one of them perhaps the number a careless reopen freed.
        store._pool.close_idle()
        assert store.query("SELECT count(*) FROM t") == [(0,)]
        with store.write() as conn:
            conn.execute("INSERT INTO t VALUES (1)")
        assert store.query("SELECT count(*) FROM t") == [(1,)]
        assert os.fstat(store._gate._kernel()._fd).st_ino == os.stat(store.lock_path).st_ino


@pytest.mark.parametrize("change", ["delete", "replace"])
def test_writes_never_overlap_while_the_lock_file_churns(tmp_path: Path, change: str) -> None:
    path = str(tmp_path / "state.db")
    mpstore.Store(path).close()
    log = str(tmp_path / "sections.log")
    barrier = workers.SPAWN.Barrier(5)
    tasks: list[tuple[object, tuple[object, ...]]] = [
        (workers.logged_writes, (path, 60, barrier, log)) for _ in range(4)
    ]
    tasks.append((workers.churn_lock_file, (path + ".lock", change, barrier, 200)))
    results = workers.run_tasks(tasks)  # type: ignore[arg-type]
    assert workers.overlaps(log) == 0
    with mpstore.Store(path) as store:
        assert store.query("SELECT count(*) FROM sections") == [(4 * 60,)]
        assert store.integrity_check() == ["ok"]
    assert results[-1] == 200


@pytest.mark.parametrize("kind", ["flock", "filelock"])
def test_a_waiter_sleeps_in_the_kernel_instead_of_polling(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The filelock gate is the control: it polls, so the same count shows many attempts.
    path = str(tmp_path / "state.db")
    mpstore.Store(path).close()
    with workers.holding_the_gate(path), mpstore.Store(path, timeout=0.5, gate=kind) as store:
        calls: list[int] = []
        real = fcntl.flock

        def counting(fd: int, operation: int) -> None:
            calls.append(operation)
            real(fd, operation)

        monkeypatch.setattr(fcntl, "flock", counting)
        with pytest.raises(mpstore.GateTimeout), store.write():
            pass
        attempts = len(calls)
        monkeypatch.undo()
    if kind == "flock":
        # One try; yields while the mailbox names another holder, with no try; one more try
        # and one blocking wait in the kernel.
        assert attempts <= 3
    else:
        assert attempts >= 10


def _wait_for_a_process_hand_off(
    path: str, monkeypatch: pytest.MonkeyPatch, call: Callable[[mpstore.Store], None]
) -> tuple[threading.Thread, list[bool]]:
    """Run ``call`` in a thread while another process holds the gate, and let that process go
    once the call waits for it (yielding, in the kernel, or handed to the writer thread);
    returns the thread, and whether each of its runs of yields took the gate."""
    waiting = threading.Event()
    yielded: list[bool] = []
    yield_for = Gate._yield_for

    def recorded(*args: Any) -> bool:
        taken = yield_for(*args)
        yielded.append(taken)
        return taken

    monkeypatch.setattr(Gate, "_yield_for", staticmethod(recorded))

    def signalling(method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            waiting.set()
            return method(*args, **kwargs)

        return wrapper

    for owner, name in (
        (_mailbox.Mailbox, "spin"),
        (_gate._FlockLock, "_await"),
        (_writer.WriteQueue, "submit"),
    ):
        monkeypatch.setattr(owner, name, signalling(getattr(owner, name)))
    with mpstore.Store(path, timeout=workers.JOIN_TIMEOUT) as store:
        with store.write():
            pass  # the mailbox and the write connection open before the race
        with workers.holding_the_gate(path) as holder:
            thread = threading.Thread(target=call, args=(store,))
            thread.start()
            assert waiting.wait(workers.JOIN_TIMEOUT)
            holder.release.set()
            thread.join(workers.JOIN_TIMEOUT)
        assert not thread.is_alive()
    return thread, yielded


@pytest.mark.parametrize("yielding", [True, False], ids=["yielding", "control"])
def test_a_read_modify_write_waiting_for_another_process_runs_in_its_own_thread(
    db_path: str, monkeypatch: pytest.MonkeyPatch, yielding: bool
) -> None:
    # A caller yielding its CPU takes the gate as soon as the other process lets go, without
    # handing its call to the store's writer thread and waiting to be woken. The control
    # waits the old way, through the writer thread.
    monkeypatch.setattr(_gate, "YIELDS", 10**9 if yielding else 0)
    ran_in: list[int] = []

    def bump(note: Note) -> Note:
        ran_in.append(threading.get_ident())
        return note.model_copy(update={"text": note.text + "!"})

    def update(store: mpstore.Store) -> None:
        store.collection("notes", Note, key="id").update("a", bump)

    with mpstore.Store(db_path) as setup:
        setup.collection("notes", Note, key="id").upsert(Note(id="a", text="x"))
    thread, yielded = _wait_for_a_process_hand_off(db_path, monkeypatch, update)
    assert len(ran_in) == 1
    assert (ran_in[0] == thread.ident) is yielding
    assert yielded[0] is yielding
    with mpstore.Store(db_path) as store:
        assert store.collection("notes", Note, key="id").get("a") == Note(id="a", text="x!")


@pytest.mark.parametrize("yielding", [True, False], ids=["yielding", "control"])
def test_a_write_block_waiting_for_another_process_need_not_sleep_in_the_kernel(
    db_path: str, monkeypatch: pytest.MonkeyPatch, yielding: bool
) -> None:
    # Taken between yields, the gate needs no keeper thread to wait in the kernel's queue and
    # wake the caller; the control, which does not yield, starts one.
    monkeypatch.setattr(_gate, "YIELDS", 10**9 if yielding else 0)
    keepers: list[bool] = []

    def block(store: mpstore.Store) -> None:
        with store.write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
            conn.execute("INSERT INTO t VALUES (1)")
        kernel = store._gate._os
        keepers.append(isinstance(kernel, _gate._FlockLock) and kernel._keeper is not None)

    _, yielded = _wait_for_a_process_hand_off(db_path, monkeypatch, block)
    assert keepers == [not yielding]
    assert yielded == [yielding]  # not the try at the start of the kernel's wait, either
    with mpstore.Store(db_path) as store:
        assert store.query("SELECT count(*) FROM t") == [(1,)]


def _other_process_on_record(mailbox: _mailbox.Mailbox) -> None:
    other = os.getppid()
    _mailbox._HOLDER.pack_into(mailbox._mm, _mailbox._GATE, other, other, 0.0)


def test_yielding_stops_without_an_error_when_the_mailbox_closes_meanwhile(
    store: mpstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A caller yielding for the gate holds no slot, so nothing keeps the mailbox open for it:
    # a thread of this process may retire it (its file was replaced) in the meantime.
    mailbox = store._gate.mailbox()
    assert mailbox is not None
    _other_process_on_record(mailbox)
    monkeypatch.setattr(os, "sched_yield", mailbox.close)
    tries: list[int] = []

    def take() -> bool:
        tries.append(1)
        return False

    assert Gate._yield_for(mailbox, math.inf, take) is False
    assert len(tries) <= 1  # a closed mailbox says "free": the gate itself is asked once


def test_yielding_tries_the_gate_at_the_deadline_whatever_the_mailbox_says(
    store: mpstore.Store,
) -> None:
    # A holder that died leaves its pid on record: a caller whose timeout is shorter than its
    # yields would otherwise time out with the gate free.
    mailbox = store._gate.mailbox()
    assert mailbox is not None
    _other_process_on_record(mailbox)
    tries: list[int] = []

    def take() -> bool:
        tries.append(1)
        return True

    assert Gate._yield_for(mailbox, time.monotonic(), take) is True
    assert tries == [1]


def test_a_read_modify_write_queues_at_once_behind_a_thread_here_that_waits(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The thread that waits (here a write block, yielding while another process holds the
    # gate) will carry the queued call in its batch: yielding beside it is wasted.
    monkeypatch.setattr(_gate, "YIELDS", 10**9)
    spinners: set[int] = set()
    yielding = threading.Event()
    spin = _mailbox.Mailbox.spin

    def noted(self: _mailbox.Mailbox, *args: Any) -> int:
        spinners.add(threading.get_ident())
        yielding.set()
        return spin(self, *args)

    monkeypatch.setattr(_mailbox.Mailbox, "spin", noted)
    with mpstore.Store(db_path, timeout=workers.JOIN_TIMEOUT) as store:
        with store.write():
            pass
        with workers.holding_the_gate(db_path) as holder:

            def block() -> None:
                with store.write():
                    pass

            blocked = threading.Thread(target=block)
            blocked.start()
            assert yielding.wait(workers.JOIN_TIMEOUT)
            assert store._gate.busy_here
            assert store._gate.acquire_soon(workers.JOIN_TIMEOUT) is False
            assert spinners == {blocked.ident}
            holder.release.set()
            blocked.join(workers.JOIN_TIMEOUT)
        assert not blocked.is_alive()


def test_close_waits_for_a_read_modify_write_that_yields_for_the_gate(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_gate, "YIELDS", 10**9)
    yielding, closing = threading.Event(), threading.Event()
    spin, wait_for_followers = _mailbox.Mailbox.spin, mpstore.Store._wait_for_followers

    def noted_spin(self: _mailbox.Mailbox, *args: Any) -> int:
        yielding.set()
        return spin(self, *args)

    def noted_wait(self: mpstore.Store, timeout: float) -> None:
        closing.set()
        wait_for_followers(self, timeout)

    monkeypatch.setattr(_mailbox.Mailbox, "spin", noted_spin)
    monkeypatch.setattr(mpstore.Store, "_wait_for_followers", noted_wait)
    with mpstore.Store(db_path) as setup:
        setup.collection("notes", Note, key="id").upsert(Note(id="a", text="x"))
    store = mpstore.Store(db_path, timeout=workers.JOIN_TIMEOUT)
    notes = store.collection("notes", Note, key="id")
    with store.write():
        pass
    outcome: list[object] = []

    def update() -> None:
        try:
            outcome.append(notes.update("a", lambda n: n.model_copy(update={"text": "y"})))
        except BaseException as exc:
            outcome.append(exc)

    with workers.holding_the_gate(db_path) as holder:
        updater = threading.Thread(target=update)
        updater.start()
        assert yielding.wait(workers.JOIN_TIMEOUT)
        closer = threading.Thread(target=store.close)
        closer.start()
        assert closing.wait(workers.JOIN_TIMEOUT)
        holder.release.set()
        updater.join(workers.JOIN_TIMEOUT)
        closer.join(workers.JOIN_TIMEOUT)
    assert outcome == [Note(id="a", text="y")]
    with mpstore.Store(db_path) as store:
        assert store.collection("notes", Note, key="id").get("a") == Note(id="a", text="y")


def test_the_gate_wait_statistic_counts_the_wait_before_the_queue(store: mpstore.Store) -> None:
    # A read-modify-write that yields for the gate and then queues waited all that time.
    store._queue.submit(lambda conn: None, 5.0, start=time.monotonic() - 100.0)
    assert store.stats()["gate_wait"]["max"] >= 100_000.0


def test_a_killed_holders_forked_child_does_not_keep_the_gate(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    with mpstore.Store(path) as setup, setup.write() as conn:
        conn.execute("CREATE TABLE held (x TEXT)")
    started, release, child_release = (workers.SPAWN.Event() for _ in range(3))
    holder = workers.SPAWN.Process(
        target=workers.hold_write_and_fork, args=(path, started, release, child_release)
    )
    holder.start()
    try:
        assert started.wait(60)
        os.kill(holder.pid or 0, signal.SIGKILL)
        # Not holder.join(): the child inherited the end of the pipe that join() waits on.
        os.waitpid(holder.pid or 0, 0)
        # The child forked while the gate was held is still alive; a copy of the lock file's
        # descriptor in it would keep the dead holder's flock.
        with mpstore.Store(path, timeout=2.0) as store, store.write() as conn:
            conn.execute("INSERT INTO held VALUES ('after')")
    finally:
        child_release.set()


def test_closing_a_store_never_closes_the_lock_file_under_a_waiting_writer(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "state.db")
    with mpstore.Store(path) as setup:
        setup.collection("notes", Note, key="id")
    with workers.holding_the_gate(path) as holder:
        store = mpstore.Store(path, timeout=0.3)
        notes = store.collection("notes", Note, key="id")
        gate = store._gate
        for _ in range(20):
            with pytest.raises(mpstore.GateTimeout):
                # Queued for the writer thread, which stays in the kernel. (A call would first
                # yield for the gate itself, which on a loaded machine takes all its timeout.)
                store._queue.submit(lambda conn: notes.update("late", lambda n: n), 0.3)
            writer = store._queue._thread
            assert writer is not None and writer.is_alive()
            # The writer may not have run before the call gave up (a loaded machine): then it
            # finds nothing queued and parks, and the write is asked for again.
            while gate._owner != writer.ident and not store._queue._cond._waiters:  # type: ignore[attr-defined]
                os.sched_yield()
            if gate._owner == writer.ident:
                break
        assert writer is not None and gate._owner == writer.ident, "the writer never waited"
        fd = gate._kernel()._fd
        store.close()
        # The writer thread still waits on the descriptor: it must stay open (a reused number
        # would receive the holder record), and the gate must still be its.
        assert gate._os is not None and os.fstat(fd).st_ino == os.stat(store.lock_path).st_ino
        holder.release.set()
        writer.join(60)
        assert not writer.is_alive()
    assert gate._os is None and gate._owner is None
    with mpstore.Store(path) as again:
        assert again.collection("notes", Note, key="id").get("late") is None
        with again.write():
            pass
