"""The cross-process write gate: one writer at a time across every thread and process.

The gate has two layers. Threads of one process queue in FIFO order on an in-process lock, so only
one thread per process ever contends for the OS lock. That thread then takes an exclusive kernel
lock on ``<db>.lock``, a file beside the database (never the database itself: closing any
descriptor of the database would drop SQLite's own POSIX locks). The kernel drops the lock when its
holder dies, kill -9 included, so a crashed writer never blocks the others.

On POSIX the kernel lock is ``flock`` on a descriptor kept open for the life of the gate. That is
the same lock ``filelock`` takes, so the two exclude each other, but ``filelock`` opens and closes
the file on every acquire and polls with sleeps while it waits (measured here: ~100 us per
uncontended acquire and 0.08x of the single-writer ceiling under contention). A held-open
descriptor costs ~0.5 us. A waiter first yields its CPU a few hundred times, watching the
mailbox's record of the holder, and tries the lock when it looks free: a hand-off between
processes then costs no wake-up. Past that it sleeps *in the kernel*, woken the moment the lock
is free. The kernel call has no timeout, so a per-gate keeper thread makes the blocking call
while the requesting thread waits on an event with its deadline. Elsewhere ``filelock``
provides the lock.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from . import _fork, _mailbox, _proc
from ._errors import GateTimeout, PermissionDenied, TransactionError
from ._mailbox import Mailbox

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["Gate", "check_kind", "drop_gate", "gate_for"]

_HOLDER_RECORD_SIZE = 48
_HELD, _BUSY, _BLOCK = object(), object(), object()

#: How many times a writer waiting for another process's hold yields its CPU, watching the
#: mailbox's record of the holder, before it sleeps (in the kernel's queue, or its slot's).
#: Sleeping costs two wake-ups per hand-off, each across CPUs when the CPUs are busy, and the
#: kernel hands a freed lock to whichever of its sleepers it wakes, not to whoever asked first.
#: 500 yields take about as long as a hold of a few writes when a CPU is free for the waiter
#: (for a write waiting in the mailbox, measured against 50: +25-30% writes/s with 2 and 4
#: processes on 2 cores, the same with 8 and 16, where the CPUs are busy anyway).
YIELDS = 500

#: How many of those yields a failed try of the gate uses up: a try that the record said would
#: succeed (a plain ``filelock`` user leaves none) costs system calls and an exception.
TRY_COST = 10


class HolderBlock(Protocol):
    """A transaction block held open by a thread of its own (see :meth:`Gate.acting_for`)."""

    @property
    def thread(self) -> int | None: ...

    @property
    def closed(self) -> bool: ...


class _KernelLock(Protocol):
    """The platform part of the gate: an exclusive lock on one file, shared by nobody in-process."""

    def acquire(self, deadline: float | None, wait: bool = True, record: bool = True) -> bool:
        """Take the lock before ``deadline`` (a ``time.monotonic()`` value, None: no limit);
        with ``wait`` False only try once; with ``record``, note this process as the holder in
        the lock file where the lock can. False when not taken."""

    def release(self) -> None:
        """Give the lock back."""

    def holder(self) -> tuple[int, float] | None:
        """The pid and wall-clock start of the last holder, if recorded."""

    def close(self) -> None:
        """Release OS resources; the lock must not be held."""


def _open_lock_file(path: str, mode: int) -> int:
    return _mailbox.open_beside(path, mode, "the lock file")


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _read_holder(fd: int) -> tuple[int, float] | None:
    raw = os.pread(fd, _HOLDER_RECORD_SIZE, 0)
    parts = raw.split()
    if len(parts) < 2:
        return None
    try:
        return int(parts[0]), float(parts[1])
    except ValueError:
        return None


def mailbox_path(lock_path: str) -> str:
    """The mailbox file beside the gate's lock file ``<db>.lock``: ``<db>.mailbox``."""
    return lock_path.removesuffix(".lock") + ".mailbox"


def holder_on_record(
    lock_record: tuple[int, float] | None, lock_path: str
) -> tuple[int, float] | None:
    """The later of the gate's two holder records: ``lock_record`` (the lock file's, if read)
    and the mailbox's beside ``lock_path``; None if neither has one."""
    records = (lock_record, _mailbox.recorded_holder(mailbox_path(lock_path)))
    found = [record for record in records if record is not None]
    return max(found, key=lambda record: record[1]) if found else None


def holder_stopped(pid: int, lock_inode: int) -> str | None:
    """Why process ``pid`` cannot give the gate back on its own, if it is stopped and holds the
    lock file (inode ``lock_inode``) now; None otherwise, or where /proc cannot tell. The lock
    file's record names the last mpstore holder, which a ``filelock`` user since may not be."""
    how = _proc.stopped(pid)
    if how is None or not _proc.holds_lock("FLOCK", pid, lock_inode):
        return None
    if how == "traced":
        return "stopped by a debugger"
    return f"stopped (SIGSTOP or Ctrl-Z): `kill -CONT {pid}` lets it go on"


class _Request:
    """One process-level wait for the kernel lock, carried out by the keeper thread."""

    __slots__ = ("done", "error", "fd", "generation", "granted", "wanted")

    def __init__(self, fd: int, generation: int) -> None:
        self.fd = fd  # a dup of the gate's descriptor: same open file, so the same flock
        self.generation = generation
        self.wanted = True
        self.granted = False
        self.error: OSError | None = None
        self.done = threading.Event()


class _FlockLock:
    """``flock`` on a held-open lock file, with a keeper thread for timed blocking waits."""

    def __init__(self, path: str, mode: int) -> None:
        assert fcntl is not None
        _open_locks.add(self)
        self._path = path
        self._mode = mode
        self._fd = _open_lock_file(path, mode)
        self._identity = _identity(self._fd)
        self._generation = 0
        self._cond = threading.Condition(threading.Lock())
        self._pending: _Request | None = None  # handed to the keeper, not yet picked up
        self._outstanding: _Request | None = None  # the keeper's current request, until done
        self._keeper: threading.Thread | None = None
        self._closed = False

    def acquire(self, deadline: float | None, wait: bool = True, record: bool = True) -> bool:
        """Take the lock; ``deadline`` None waits forever, ``wait`` False only tries once.
        ``record`` writes this process into the lock file as its holder.

        The lock file must still be the one at the path: one deleted or replaced meanwhile is
        left for the file there now, but only once its lock is ours (its last holder may still
        be writing). A single try that finds the file still there before it takes the lock
        needs no check after, so the gate's next holder never waits for one.
        """
        checked = not wait and self._is_live()
        while True:
            step = self._start(deadline, wait)
            if step is _BUSY:
                return False
            if step is _BLOCK:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            elif isinstance(step, _Request):
                if not self._await(step, deadline):
                    return False
                # The request's descriptor shares its open file with ours, so the lock stays.
                stale = step.generation != self._generation
                if stale:
                    fcntl.flock(step.fd, fcntl.LOCK_UN)
                os.close(step.fd)
                if stale:
                    continue
            if checked or self._is_live():
                if record:
                    os.pwrite(self._fd, self._holder_record(), 0)
                return True
            # The lock file was deleted or replaced while we waited: the lock we hold is on an
            # inode nobody else will ever open. Drop it and queue on the file that is there now.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._reopen()
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                return False

    def _start(self, deadline: float | None, wait: bool) -> object:
        """Take the lock at once (_HELD), or say how to wait for it: _BLOCK in this thread,
        a keeper request to await, or _BUSY when ``wait`` is False."""
        with self._cond:
            if self._outstanding is not None:
                if not wait:
                    return _BUSY
                # A timed-out predecessor's request is still waiting in the kernel; taking the
                # lock beside it on the same open file would let it unlock us, so we adopt it.
                self._outstanding.wanted = True
                return self._outstanding
            with contextlib.suppress(BlockingIOError):  # taken: wait for it below
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return _HELD
            if not wait:
                return _BUSY
            if deadline is None:
                return _BLOCK
            request = _Request(os.dup(self._fd), self._generation)
            self._outstanding = self._pending = request
            if self._keeper is None:
                self._keeper = threading.Thread(
                    target=self._keep, name=f"mpstore-gate:{self._path}", daemon=True
                )
                self._keeper.start()
            self._cond.notify()
            return request

    def _await(self, request: _Request, deadline: float | None) -> bool:
        request.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._cond:
            if request.error is not None:
                raise request.error
            if request.granted:
                return True
            request.wanted = False
            return False

    def _keep(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    if self._closed:
                        self._keeper = None
                        return
                    self._cond.wait()
                request, self._pending = self._pending, None
            try:
                fcntl.flock(request.fd, fcntl.LOCK_EX)
            except OSError as exc:
                request.error = exc
            with self._cond:
                self._outstanding = None
                if request.error is None and request.wanted:
                    request.granted = True
                else:
                    if request.error is None:
                        fcntl.flock(request.fd, fcntl.LOCK_UN)
                    os.close(request.fd)
                request.done.set()

    def _is_live(self) -> bool:
        """Whether the file at the lock path is still the one our descriptor has open."""
        return _mailbox.names_file(self._path, self._identity)

    def _reopen(self) -> None:
        # Opened before the old one is closed: if opening fails, the descriptor kept is still
        # ours, never a number the process has since given to another file.
        fd = _open_lock_file(self._path, self._mode)
        old, self._fd = self._fd, fd
        self._identity = _identity(fd)
        self._generation += 1
        os.close(old)

    def _holder_record(self) -> bytes:
        record = f"{_fork.pid()} {time.time():.6f}".encode()
        return record.ljust(_HOLDER_RECORD_SIZE - 1) + b"\n"

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def holder(self) -> tuple[int, float] | None:
        return _read_holder(self._fd)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            if self._outstanding is not None:
                self._outstanding.wanted = False
            self._cond.notify()
        os.close(self._fd)
        self._fd = -1

    def abandon_after_fork(self) -> None:
        """In a forked child: forget the parent's descriptors without unlocking the parent.

        Runs right after fork (see ``_forget_inherited``): an flock belongs to the open file,
        so a child that kept a copy would keep a dead parent's lock held for as long as it
        lives, even if it never touches the store.
        """
        for fd in (self._fd, self._outstanding.fd if self._outstanding else -1):
            if fd >= 0:
                os.close(fd)
        self._fd = -1
        self._outstanding = self._pending = None


class _PortableLock:
    """``filelock.FileLock`` where ``flock`` is not available: correct, slower hand-off."""

    def __init__(self, path: str, mode: int) -> None:
        import filelock

        self._path = path
        # Not a singleton (filelock's default, and the only kind before filelock 3.13, which
        # has no is_singleton argument): the gate is this process's one lock on the file.
        self._lock = filelock.FileLock(path, mode=mode, thread_local=False)

    def acquire(self, deadline: float | None, wait: bool = True, record: bool = True) -> bool:
        import filelock

        if not wait:
            timeout = 0.0
        elif deadline is None:
            timeout = -1.0
        else:
            timeout = max(0.0, deadline - time.monotonic())
        try:
            self._lock.acquire(timeout=timeout, poll_interval=0.001)
        except filelock.Timeout:
            return False
        except PermissionError as exc:
            raise PermissionDenied(
                f"cannot open the lock file {self._path}", self._path, exc.errno
            ) from exc
        return True

    def release(self) -> None:
        self._lock.release()

    def holder(self) -> tuple[int, float] | None:
        return None

    def close(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)

    def abandon_after_fork(self) -> None:
        pass


class Gate:
    """The write gate for one lock file, shared by every Store of this process on that file.

    :raises GateTimeout: from :meth:`acquire` when the gate is not granted before the timeout.
    :raises TransactionError: when the calling thread already holds this gate.
    """

    def __init__(self, lock_path: str, mode: int, kind: str = "auto") -> None:
        self.lock_path = lock_path
        self.mailbox_path = mailbox_path(lock_path)
        self._mode = mode
        self._kind = self.resolve_kind(kind)
        self.users = 0
        self._reset()

    @staticmethod
    def resolve_kind(kind: str) -> str:
        """The lock ``kind`` stands for here: ``"auto"`` is ``"flock"`` where there is one."""
        if kind == "auto":
            return "flock" if fcntl is not None else "filelock"
        return kind

    @property
    def kind(self) -> str:
        return self._kind

    def _reset(self) -> None:
        self._pid = _fork.pid()
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._waiters: deque[tuple[int, threading.Lock]] = deque()
        self._os: _FlockLock | _PortableLock | None = None
        self._os_held = False
        self._mailbox: Mailbox | None = None
        self._retired: list[Mailbox] = []  # files replaced at the path while this gate was open
        self.recorded_in: Mailbox | None = None  # where this thread's holder record is
        self._mailbox_lock = threading.Lock()

    def _kernel(self) -> _FlockLock | _PortableLock:
        if self._os is None:
            cls = _FlockLock if self._kind == "flock" else _PortableLock
            self._os = cls(self.lock_path, self._mode)
        return self._os

    @property
    def _records_in_file(self) -> bool:
        """Whether a holder writes its record into the lock file: not once the mailbox is open,
        where it records itself (:meth:`_taken`) with a store to shared memory instead of a
        system call that the gate's next holder would wait behind."""
        return self._mailbox is None

    def _check_fork(self) -> None:
        if self._pid != _fork.pid():
            if self._os is not None:
                self._os.abandon_after_fork()
            for mailbox in [*self._retired, self._mailbox]:
                if mailbox is not None:
                    mailbox.close()  # the parent's claims were never ours
            self._reset()

    def mailbox(self) -> Mailbox | None:
        """The mailbox beside this gate (``<db>.mailbox``), opened on first use; None where
        writes cannot be carried between processes (no flock gate, not Linux).

        :raises PermissionDenied: the mailbox file cannot be opened.
        """
        self._check_fork()
        if self._mailbox is None and self._kind == "flock" and _mailbox.available():
            with self._mailbox_lock:
                if self._mailbox is None:
                    self._mailbox = Mailbox(self.mailbox_path, self._mode)
        return self._mailbox

    def current_mailbox(self) -> Mailbox | None:
        """The mailbox at :attr:`mailbox_path` now: if the file this process opened was deleted
        or replaced meanwhile, the file there (created if need be) takes its place, and the old
        one is retired: it takes no new writes, and closes once those left in it are settled.

        :raises PermissionDenied: the new mailbox file cannot be opened.
        :raises MpstoreError: the file there now is not a mailbox.
        """
        current = self.mailbox()
        if current is None or current.is_live():
            return current
        with self._mailbox_lock:
            if self._mailbox is current:
                self._mailbox = Mailbox(self.mailbox_path, self._mode)
                if self.recorded_in is current:
                    # Cleared while it can be: writers still on the old file read its hint.
                    current.gate_released()
                    self.recorded_in = None
                current.retire()
                # Kept until closed: a forked child must close its copy too.
                self._retired = [m for m in self._retired if not m.closed]
                if not current.closed:
                    self._retired.append(current)
            return self._mailbox

    @property
    def held_here(self) -> bool:
        """A thread of this process holds the kernel lock (not merely waits for it)."""
        return self._pid == _fork.pid() and self._os_held

    def held_by_another_thread(self) -> bool:
        """Another thread of this process holds the gate or waits for it, and this thread does
        not act for it (see :meth:`acting_for`): :meth:`try_acquire` would say no at once."""
        owner = self._owner
        return (
            owner is not None
            and self._pid == _fork.pid()
            and owner != threading.get_ident()
            and not self._acts_for(owner)
        )

    def held_elsewhere(self) -> bool:
        """Whether another process looks to hold the gate, for a caller whose try just failed:
        the hint in the mailbox, if this process has it open (a plain ``filelock`` user leaves
        none); else whether no thread of this process holds or waits for it."""
        mailbox = self._mailbox
        if mailbox is not None and self._pid == _fork.pid():
            return not mailbox.gate_free()
        return not self.busy_here

    @property
    def busy_here(self) -> bool:
        """Another thread of this process holds the gate or waits for it."""
        return self._pid == _fork.pid() and self._owner is not None

    @property
    def held_by_me(self) -> bool:
        return self._pid == _fork.pid() and self._owner == threading.get_ident()

    def acquire(self, timeout: float | None) -> float:
        """Take the gate within ``timeout`` seconds (None: however long it takes); return how
        long it took.

        :raises GateTimeout: the gate stayed taken by another thread or process.
        :raises TransactionError: this thread already holds the gate.
        :raises PermissionDenied: the lock file cannot be opened.
        """
        self._check_fork()
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        self._acquire_local(deadline, start)
        try:
            kernel, mailbox = self._kernel(), self.mailbox()
            recorded = self._records_in_file

            def take() -> bool:
                return kernel.acquire(None, wait=False, record=recorded)

            # The kernel's queue only once yielding has not brought the gate: a hand-off
            # between processes that keep their CPUs costs no wake-up.
            if not (
                take()
                or self._yield_for(mailbox, math.inf if deadline is None else deadline, take)
                or kernel.acquire(deadline, record=recorded)
            ):
                raise self.blocked_error(start)
        except BaseException:
            self._release_local()
            raise
        self._taken(recorded)
        return time.monotonic() - start

    def acquire_soon(self, timeout: float) -> bool:
        """Take the gate if another process gives it up while this thread yields its CPU
        (see :data:`YIELDS`), within ``timeout`` seconds: a read-modify-write, which cannot
        travel through the mailbox, then runs in its caller's thread instead of waiting for
        the writer thread to take the gate and wake it. False if it is still taken, if the
        platform has no mailbox to watch, or if a thread of this process holds it or waits
        for it (including this one: the caller then queues behind that thread).

        The caller keeps the gate's users (its store) open meanwhile: the mailbox it watches
        is this gate's.

        :raises PermissionDenied: the mailbox or lock file cannot be opened.
        """
        if self.busy_here:
            return False

        def take() -> bool | None:
            return None if self.busy_here else self.try_acquire()

        return self._yield_for(self.mailbox(), time.monotonic() + timeout, take)

    @staticmethod
    def _yield_for(
        mailbox: Mailbox | None, deadline: float, take: Callable[[], bool | None]
    ) -> bool:
        """Yield the CPU until ``take()`` succeeds, trying it whenever ``mailbox`` says no other
        process holds the gate, up to :data:`YIELDS` times, and once more at ``deadline``
        whatever the mailbox says (a holder that died leaves it naming that holder).
        ``take()`` returns None to give up. False if ``mailbox`` is None or closes meanwhile
        (retired: the file at its path was replaced)."""
        if mailbox is None:
            return False
        monotonic = time.monotonic
        spins = 0
        while spins < YIELDS and not mailbox.closed:
            spins += mailbox.spin(None, YIELDS - spins, deadline, monotonic)
            if monotonic() >= deadline:
                return bool(take())
            if mailbox.gate_free():
                taken = take()
                if taken is None:
                    return False
                if taken:
                    return True
                spins += TRY_COST
        return False

    def try_acquire(self) -> bool:
        """Take the gate only if no thread or process holds it or waits for it here: no waiting.

        :raises TransactionError: this thread already holds the gate.
        """
        self._check_fork()
        me = threading.get_ident()
        with self._mutex:
            if self._owner is not None:
                if self._owner == me or self._acts_for(self._owner):
                    raise self._reentered(self._owner != me)
                return False
            self._owner = me
        try:
            recorded = self._records_in_file
            taken = self._kernel().acquire(None, wait=False, record=recorded)
        except BaseException:
            self._release_local()
            raise
        if not taken:
            self._release_local()
            return False
        self._taken(recorded)
        return True

    def _taken(self, recorded: bool) -> None:
        """Note that this thread holds the kernel lock, and record the holder in the mailbox
        if the lock file did not: at once, before any of the holder's own steps (its hooks,
        settling what a dead holder left), so that a waiter timing out meanwhile names it."""
        self._os_held = True
        if not recorded and self._mailbox is not None:
            self._mailbox.gate_taken()
            self.recorded_in = self._mailbox

    def _reentered(self, for_block: bool = False) -> TransactionError:
        holder = "an open write block of this task" if for_block else "this thread"
        return TransactionError(
            f"{holder} already holds the write gate {self.lock_path} (through another "
            "store on the same file?); nest writes in one store instead",
            self.lock_path,
        )

    @contextlib.contextmanager
    def acting_for(self, block: HolderBlock) -> Iterator[None]:
        """Run this thread's calls for ``block``, a transaction held open by another thread
        that waits for them (an asyncio block's thread, whose task awaits this call): while
        that block holds this gate, taking it here fails as a re-entry does, instead of
        waiting for a transaction that cannot end first."""
        pairs: list[tuple[Gate, HolderBlock]] = _acting.__dict__.setdefault("pairs", [])
        pairs.append((self, block))
        try:
            yield
        finally:
            pairs.remove((self, block))

    def _acts_for(self, owner: int) -> bool:
        return any(
            g is self and not b.closed and b.thread == owner
            for g, b in _acting.__dict__.get("pairs", ())
        )

    def _acquire_local(self, deadline: float | None, start: float) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner is None:
                self._owner = me
                return
            if self._owner == me or self._acts_for(self._owner):
                raise self._reentered(self._owner != me)
            turn = threading.Lock()
            turn.acquire()
            entry = (me, turn)
            self._waiters.append(entry)
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if turn.acquire(timeout=wait):
            return  # the releaser made us the owner before waking us
        with self._mutex:
            if self._owner == me:
                return  # handed over just as the wait ran out: it is ours
            self._waiters.remove(entry)
        raise self.blocked_error(start)

    def _release_local(self) -> None:
        with self._mutex:
            if self._waiters:
                # Hand the gate straight to the longest waiter, under the mutex, so no thread
                # arriving meanwhile can see it free: FIFO among this process's threads.
                self._owner, turn = self._waiters.popleft()
                turn.release()
            else:
                self._owner = None
                if self.users == 0:
                    self._close_kernel()  # every Store on it closed while this thread was in

    def release(self) -> None:
        """Give the gate back; the caller must hold it.

        :raises TransactionError: the calling thread does not hold the gate.
        """
        if not self.held_by_me:
            raise TransactionError(f"the write gate {self.lock_path} is not held by this thread")
        if self.recorded_in is not None:
            # Its "gate taken" hint, left there, would keep other writers from trying the gate.
            self.recorded_in.gate_released()
            self.recorded_in = None
        if self._os_held:
            self._os_held = False
            assert self._os is not None
            self._os.release()
        self._release_local()

    def holder(self) -> tuple[int, float] | None:
        """The pid and start time (epoch seconds) of the gate's last holder, if known."""
        self._check_fork()
        return holder_on_record(self._kernel().holder(), self.lock_path)

    def blocked_error(self, start: float) -> GateTimeout:
        """The timeout of a wait for the gate that began at ``start``, naming what is in the
        way: a thread of this process that holds the kernel lock or, when none does (its
        threads may only be waiting too), another process and the last holder on record (a plain
        ``filelock`` user records none, so that pid may be an earlier one)."""
        if self.held_here:
            return self._timeout_error(start, _fork.pid(), "another thread of this process")
        holder = self.holder()
        pid = holder[0] if holder else None
        # This process's own record is from an earlier turn: it says nothing of who holds it now.
        return self._timeout_error(start, None if pid == _fork.pid() else pid, "another process")

    def _timeout_error(self, start: float, holder_pid: int | None, who: str) -> GateTimeout:
        waited = time.monotonic() - start
        if holder_pid is None:
            recorded = "no other holder on record"
        else:
            recorded = f"last holder on record: pid {holder_pid}"
            try:
                stopped = holder_stopped(holder_pid, os.stat(self.lock_path).st_ino)
            except OSError:  # the lock file is gone: nobody can hold it
                stopped = None
            if stopped is not None:
                recorded += f", which is {stopped}"
        return GateTimeout(
            f"waited {waited:.3f} s for the write gate {self.lock_path}, held by {who} "
            f"({recorded})",
            self.lock_path,
            waited,
            holder_pid,
        )

    def close(self) -> None:
        """Close the lock file, once no thread of this process holds or waits for the gate.

        A thread still inside (a writer thread blocked in the kernel for a store that was
        closed meanwhile) closes it when it lets go: closing the descriptor under a blocked
        ``flock`` would let a reused descriptor number receive the holder record.
        """
        if self._pid != _fork.pid():
            return
        with self._mutex:
            if self._owner is None:
                self._close_kernel()

    def _close_kernel(self) -> None:
        if self._os is not None:
            self._os.close()
            self._os = None
        for mailbox in [*self._retired, self._mailbox]:
            if mailbox is not None:
                mailbox.close()
        self._mailbox, self._retired = None, []


_open_locks: weakref.WeakSet[_FlockLock] = weakref.WeakSet()

#: Per thread: the (gate, block) pairs it acts for (see :meth:`Gate.acting_for`).
_acting = threading.local()


def _forget_inherited() -> None:
    global _registry_lock
    # A thread of the parent may have been opening or closing a store at the fork.
    _registry_lock = threading.Lock()
    for lock in list(_open_locks):
        lock.abandon_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited)


_registry: weakref.WeakValueDictionary[str, Gate] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def check_kind(kind: object) -> str:
    """``kind`` if it names a gate kind (see :class:`mpstore.Store`'s ``gate``).

    :raises ValueError: it does not.
    """
    if kind not in ("auto", "flock", "filelock"):
        raise ValueError(f"gate must be 'auto', 'flock' or 'filelock', got {kind!r}")
    return str(kind)


def gate_for(lock_path: str, mode: int, kind: str = "auto") -> Gate:
    """The process-wide gate for ``lock_path``: every Store on one file shares one FIFO.

    Each call must be paired with :func:`drop_gate`; the last drop closes the lock file.

    :raises ValueError: the gate is open here with another kind of lock: two kinds on one file
        in one process would wait for each other.
    """
    key, wanted = os.path.realpath(lock_path), Gate.resolve_kind(kind)
    with _registry_lock:
        gate = _registry.get(key)
        if gate is None or (gate.users == 0 and gate.kind != wanted):
            gate = Gate(lock_path, mode, kind)
            _registry[key] = gate
        elif gate.kind != wanted:
            raise ValueError(
                f"{lock_path} is open in this process with gate={gate.kind!r}; every Store of "
                f"one process on one file must use the same gate, not {kind!r}"
            )
        gate._check_fork()
        gate.users += 1
        return gate


def drop_gate(gate: Gate) -> None:
    """Undo one :func:`gate_for`; closes the gate's lock file when no Store uses it any more."""
    with _registry_lock:
        gate.users -= 1
        if gate.users == 0:
            gate.close()
