"""The mailbox: writes waiting for the gate, left where whoever holds it can commit them.

A write that finds the gate taken by another process does not queue for the gate's kernel lock:
it writes a description of itself (an operation on a collection, with its rows: data, never
SQL or code) into a slot of a small shared file beside the database, ``<db>.mailbox``, and
sleeps. Whoever holds the gate, once its own writes have run, takes every published slot, runs
each write isolated in its transaction (in a SAVEPOINT, unless SQLite undoes a failed write by
itself), records a batch id in the database in that same transaction, stores each write's
outcome in its slot, commits once, and only then marks the slots done and wakes their owners.
One commit and one gate hand-off serve many processes' writes.

Crash safety rests on kernel locks and on the batch id:

- a process claims a slot with an open-file-description lock on one byte, held while its
  mailbox is open; the kernel drops it when the process dies, so a dead owner's slot can be
  claimed again;
- state changes of a slot happen under a short per-slot lock of the same kind (plus a thread
  lock), and only a gate holder moves a slot from published to taken;
- a holder marks the mailbox with its pid while it has taken slots. If it dies, the next gate
  holder finds the mark before it writes anything, reads the last committed batch id from the
  database, and either completes the orphaned slots (their batch committed: the outcome stored
  before COMMIT stands) or publishes them again (it did not: nothing of them was written);
- a published write whose owner died (its claim is free) is dropped, not run: its caller never
  heard back, as if it had died waiting for the gate;
- a holder that releases the gate wakes one owner of a published slot, so a write published
  while the gate changed hands is never left asleep; owners also wake every ``LIVENESS``
  seconds to look for a holder that died;
- the gate's holder also writes its pid into the header while it holds the gate, so a waiting
  owner sees the gate come free without a failed lock attempt (a system call and an
  exception). Only a hint: a holder that died leaves its pid there, so an owner tries the gate
  after every sleep, and at its deadline, whatever the hint says.

Linux only (abstract Unix sockets carry the wake-ups); elsewhere writes wait for the gate.
"""

from __future__ import annotations

import errno
import marshal
import mmap
import os
import platform
import select
import socket
import sqlite3
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _errors, _fork
from ._errors import MpstoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CAPACITY",
    "LIVENESS",
    "Carried",
    "Mailbox",
    "Slot",
    "Snapshot",
    "available",
    "encode_op",
    "snapshot",
]

#: Why opening a file beside the database (the mailbox, the lock file) fails for good: no
#: permission, a directory in its place, or a symlink (never followed there: O_NOFOLLOW).
REFUSED_OPENS = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ELOOP})


def open_beside(path: str, mode: int, what: str) -> int:
    """Open (creating it) the file beside the database at ``path``, never through a symlink.

    :raises PermissionDenied: it cannot be opened for good (see :data:`REFUSED_OPENS`).
    :raises DirectoryNotFound: the database's directory is gone.
    """
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags, mode)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise _errors.DirectoryNotFound(
            f"cannot open {what} {path}: the database's directory is gone", path, exc.errno
        ) from exc
    except OSError as exc:
        if exc.errno not in REFUSED_OPENS:
            raise
        raise _errors.PermissionDenied(
            f"cannot open {what} {path}: {exc.strerror}", path, exc.errno
        ) from exc


def names_file(path: str, identity: tuple[int, int]) -> bool:
    """Whether ``path`` names the file of ``identity`` (st_dev, st_ino) still: a file beside
    the database that was deleted or replaced leaves its openers apart from later ones."""
    try:
        there = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # gone, or its directory is
        return False
    return (there.st_dev, there.st_ino) == identity


#: How often a sleeping owner checks on its own that the gate holder is still alive.
LIVENESS = 0.02

#: Claimed slots a process keeps for its next writes; the rest go back to all processes.
_SPARES = 4

SLOTS = 64
_MAGIC = b"mpstmbx1"
_HEADER = 4096
_STATES = 64  # one state byte per slot, so a scan is one slice
_SLEEPING = _STATES + 64  # one byte per slot: its owner sleeps and must be woken
_SLOT_SIZE = 64 * 1024
_SLOT_HEAD = struct.Struct("<IIqIIqI")  # owner pid, ready, batch, failed, size, result, error size
_DATA = 64
_ERROR_SIZE = 8 * 1024  # the end of a slot holds a failed write's error
CAPACITY = _SLOT_SIZE - _DATA - _ERROR_SIZE
_SIZE = _HEADER + SLOTS * _SLOT_SIZE
_LEADER = struct.Struct("<q")
_GATE = 16  # the pid of the process holding the gate, 0 when free: a hint for its waiters
#: At _GATE: that hint, then the last holder's pid and the time it took the gate (epoch
#: seconds), kept after it lets go: the holder record, for messages and ``mpstore info``.
_HOLDER = struct.Struct("<qqd")
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on 64-bit Linux
# Record locks live far past the end of the file, one byte each: claims, then slot mutexes.
_CLAIMS = 1 << 40
_MUTEXES = _CLAIMS + 4096

FREE, PUBLISHED, TAKEN, DONE = 0, 1, 2, 3


#: Whether stores to shared memory become visible to other CPUs in program order (x86 TSO).
#: There the owner publishes a write, and reads a done slot's outcome, without the slot lock:
#: the holder reads a slot's fields only after seeing its state, and the owner writes the
#: state last (and only a holder sets a slot done, after writing its outcome). Elsewhere the
#: slot lock orders them.
_ORDERED = platform.machine().lower() in ("x86_64", "amd64")


def available() -> bool:
    """Whether this platform can carry writes between processes (Linux: abstract sockets)."""
    return (
        sys.platform.startswith("linux")
        and fcntl is not None
        and hasattr(fcntl, "F_OFD_SETLK")
        and struct.calcsize("P") == 8
    )


class Slot:
    """One claimed slot of this process: its index and the socket its owner sleeps on."""

    __slots__ = ("disowned", "index", "poller", "sock")

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.disowned = False  # given up with its write taken: its claim goes back
        sock.setblocking(False)
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)

    def drain(self) -> None:
        """Drop the wake-ups queued so far."""
        while True:
            try:
                self.sock.recv(16)
            except BlockingIOError:
                return


class Carried:
    """A write taken from another caller's slot: its operation and, once run, its outcome."""

    __slots__ = ("index", "op", "owner", "size")

    def __init__(self, index: int, owner: int, size: int, op: tuple[Any, ...]) -> None:
        self.index = index
        self.owner = owner
        self.size = size
        self.op = op


class Mailbox:
    """This process's view of one database's mailbox file.

    :raises PermissionDenied: the file cannot be opened.
    :raises MpstoreError: the file exists and is not a mailbox.
    """

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        self._pid = _fork.pid()
        fd = open_beside(path, mode, "the mailbox")
        try:
            _check_magic(os.pread(fd, len(_MAGIC), 0), path)
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)  # sparse: slots cost memory only once used
            self._mm = mmap.mmap(fd, _SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if self._mm[: len(_MAGIC)] != _MAGIC:
            self._mm[: len(_MAGIC)] = _MAGIC  # new (all zeros): every slot is free
        st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)
        self._name = b"\0mpstore-%x-%x" % self._identity
        self._local = [threading.Lock() for _ in range(SLOTS)]
        self._owned: set[int] = set()  # claimed by this process
        self._slots: list[Slot] = []
        self._spare: list[Slot] = []  # claimed and not in use
        self._claim_lock = threading.Lock()
        self._sender: socket.socket | None = None
        self._next_wake = 0
        self._busy = 0  # slots handed to callers and not given back
        self._to_wake: list[tuple[int, int]] = []
        self._close_pending = False
        self._retired = False
        self._closed = False
        _open.add(self)

    def is_live(self) -> bool:
        """Whether the file at :attr:`path` is still the one this mailbox has open: one
        deleted or replaced meanwhile (by hand, or a cleanup) would leave the processes that
        open it from now on with another mailbox, where no holder of this one sees their
        writes."""
        return names_file(self.path, self._identity)

    def retire(self) -> None:
        """Claim no more slots here (the file at :attr:`path` is another one now), and close
        once the writes already left here are settled. A thread holding this mailbox without
        a slot finds it closed: it claims none and asks the gate itself."""
        with self._claim_lock:
            self._retired = True
        self.close()

    @property
    def closed(self) -> bool:
        """Whether the file is unmapped and closed (:meth:`close` may wait for slots)."""
        return self._closed

    # -- locks --------------------------------------------------------------------------------

    def _lock(self, offset: int, wait: bool, length: int = 1) -> bool:
        """An open-file-description lock on ``length`` bytes: it conflicts with every other
        open of the file (in this process too), is kept across fork by the shared description,
        and is dropped by the kernel when the last descriptor of this open closes (the process
        died).
        """
        request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, length, 0)
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)
        except OSError as exc:
            if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _claimed(self, index: int) -> bool:
        """Whether a live process (this one included) holds the slot's claim."""
        if index in self._owned:
            return True
        request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _CLAIMS + index, 1, 0)
        found = _FLOCK.unpack(fcntl.fcntl(self._fd, fcntl.F_OFD_GETLK, request))
        return bool(found[0] != fcntl.F_UNLCK)

    def _unlock(self, offset: int, length: int = 1) -> None:
        fcntl.fcntl(
            self._fd,
            fcntl.F_OFD_SETLK,
            _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, length, 0),
        )

    def _mutex(self, index: int) -> _SlotMutex:
        return _SlotMutex(self, index)

    def _try_mutex(self, index: int) -> bool:
        if not self._local[index].acquire(blocking=False):
            return False
        try:
            if self._lock(_MUTEXES + index, wait=False):
                return True
        except BaseException:
            # A Ctrl-C may land once the byte is locked: let it go too (unlocking a byte that
            # is not held changes nothing), or every other process would wait for it.
            try:
                self._unlock(_MUTEXES + index)
            finally:
                self._local[index].release()
            raise
        self._local[index].release()
        return False

    def _unmutex(self, index: int) -> None:
        self._unlock(_MUTEXES + index)
        self._local[index].release()

    def _try_mutexes(self, first: int, last: int) -> bool:
        """The locks of slots ``first`` to ``last`` all at once, or none (False if any is
        held): one system call for the gate holder's slots instead of two per slot. Owners of
        the slots between wait the while, as they would for the holder's slot by slot.

        Every thread lock of the range is taken, not only those of the slots the holder
        wants: a thread of this process holding a slot's byte shares this descriptor, so the
        range would take that byte over and its release would free it.
        """
        local = self._local
        taken = first
        try:
            while taken <= last and local[taken].acquire(blocking=False):
                taken += 1
            if taken > last and self._lock(_MUTEXES + first, False, last - first + 1):
                taken = first  # all kept
                return True
            return False
        finally:
            for index in range(first, taken):
                local[index].release()

    def _unmutexes(self, first: int, last: int) -> None:
        try:
            self._unlock(_MUTEXES + first, last - first + 1)
        finally:
            for index in range(first, last + 1):
                self._local[index].release()

    # -- slot fields --------------------------------------------------------------------------

    def state(self, index: int) -> int:
        return self._mm[_STATES + index]

    def _set_state(self, index: int, state: int) -> None:
        self._mm[_STATES + index] = state

    def _head(self, index: int) -> tuple[int, ...]:
        return _SLOT_HEAD.unpack_from(self._mm, _HEADER + index * _SLOT_SIZE)

    def _put_head(self, index: int, *fields: int) -> None:
        _SLOT_HEAD.pack_into(self._mm, _HEADER + index * _SLOT_SIZE, *fields)

    def _address(self, index: int, owner: int) -> bytes:
        return self._name + b"-%d-%d" % (index, owner)

    # -- the owner's side ---------------------------------------------------------------------

    def claim(self) -> Slot | None:
        """A slot for one write of the calling thread, or None if all are in use."""
        with self._claim_lock:
            if self._closed or self._close_pending or self._retired:
                return None
            for slot in self._spare:
                # A write interrupted in its caller (KeyboardInterrupt) may still be carried:
                # its slot is reused only once it is settled.
                if self.state(slot.index) in (FREE, DONE):
                    self._spare.remove(slot)
                    self._busy += 1
                    return slot
            pid = _fork.pid()
            for index in range(SLOTS):
                # A slot another process owns is passed on the kernel's word, without its
                # lock, which belongs to its owner and to the gate's holder. For one that looks
                # free: its lock before its claim, as a holder asks whether a taken or published
                # slot's owner lives under that lock and must never see the claim of a slot that
                # stays taken, held only for the moment it takes to look. Never waited for: a
                # slot whose lock is held now (by a stopped process, say) is passed.
                if self._claimed(index) or not self._try_mutex(index):
                    continue
                try:
                    if not self._lock(_CLAIMS + index, wait=False):
                        continue
                    try:
                        # Ours while this mailbox is open; a dead claimant may have left
                        # anything, but a write a holder has taken stays its until that holder
                        # (or the next) settles it.
                        if self.state(index) == TAKEN:
                            self._unlock(_CLAIMS + index)
                            continue
                        self._put_head(index, pid, 0, 0, 0, 0, 0, 0)
                        self._set_state(index, FREE)
                    except BaseException:
                        self._unlock(_CLAIMS + index)  # a Ctrl-C: a held claim would outlive it
                        raise
                finally:
                    self._unmutex(index)
                try:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                except BaseException as exc:
                    self._unlock(_CLAIMS + index)
                    if isinstance(exc, OSError):
                        # Out of descriptors, or sockets refused here (a sandbox): the write
                        # waits for the gate itself, which needs neither.
                        return None
                    raise
                try:
                    sock.bind(self._address(index, pid))
                except OSError:
                    # The name is still bound: a forked child of a dead claimant with the same
                    # pid keeps its socket open. Leave this slot.
                    sock.close()
                    self._unlock(_CLAIMS + index)
                    continue
                self._owned.add(index)
                self._slots.append(Slot(index, sock))
                self._busy += 1
                return self._slots[-1]
        return None

    def give_back(self, slot: Slot) -> None:
        """Return a slot to this process's spares; past a few, or if :meth:`disown` gave it up,
        let other processes claim it."""
        with self._claim_lock:
            self._busy -= 1
            if len(self._spare) < _SPARES and not slot.disowned:
                self._spare.append(slot)
            else:
                self._owned.discard(slot.index)
                self._slots.remove(slot)
                slot.sock.close()
                self._unlock(_CLAIMS + slot.index)
            if self._close_pending and self._busy == 0:
                self._close()

    def publish(self, slot: Slot, payload: bytes) -> None:
        """Leave a write in ``slot`` for the gate holder (``payload`` fits :data:`CAPACITY`)."""
        if _ORDERED:
            self._publish(slot.index, payload)
        else:
            with self._mutex(slot.index):
                self._publish(slot.index, payload)

    def _publish(self, index: int, payload: bytes) -> None:
        mm, at = self._mm, _HEADER + index * _SLOT_SIZE
        mm[at + _DATA : at + _DATA + len(payload)] = payload
        _SLOT_HEAD.pack_into(mm, at, _fork.pid(), 0, 0, 0, len(payload), 0, 0)
        mm[_STATES + index] = PUBLISHED  # last: what the holder looks at first

    def sleep(self, slot: Slot, timeout: float) -> bool:
        """Wait until a holder wakes this slot's owner, or ``timeout`` seconds; False if
        nobody woke it (nor had finished its write already).

        The owner marks itself asleep under the slot's lock, where :meth:`finish` marks the slot
        done: either the holder sees the mark and wakes it, or the owner sees the slot done and
        does not sleep. An owner that has not gone to sleep costs the holder no wake-up.
        """
        index = slot.index
        with self._mutex(index):
            if self.state(index) == DONE:
                return True
            self._mm[_SLEEPING + index] = 1
        try:
            if slot.poller.poll(max(timeout, 0.0) * 1000.0):
                slot.drain()
                return True
            return False
        finally:
            self._mm[_SLEEPING + index] = 0

    def spin(
        self, slot: Slot | None, yields: int, deadline: float, now: Callable[[], float]
    ) -> int:
        """Yield the CPU up to ``yields`` times (once at least) while ``slot``'s write (if any)
        is not done, the gate looks taken by another process (see :meth:`gate_free`) and the
        clock ``now`` has not reached ``deadline``; returns how many times it yielded. One call
        for what a waiting writer does many times over, each time on a CPU just handed back by
        other processes."""
        mm, pid = self._mm, _fork.pid()
        state = -1 if slot is None else _STATES + slot.index
        holder_of, yield_cpu = _LEADER.unpack_from, os.sched_yield
        spun = 0
        try:
            while spun < yields:
                yield_cpu()
                spun += 1
                if state >= 0 and mm[state] == DONE:
                    break
                holder = holder_of(mm, _GATE)[0]
                if holder == 0 or holder == pid or now() >= deadline:
                    break
        except ValueError:
            # Closed meanwhile (a caller without a slot does not keep it open): only the gate
            # itself can answer now, as in gate_free().
            pass
        return spun

    def withdraw(self, slot: Slot) -> bool:
        """Take back a write no holder has taken yet; False if one has (or has finished it)."""
        with self._mutex(slot.index):
            if self.state(slot.index) != PUBLISHED:
                return False
            self._set_state(slot.index, FREE)
            return True

    def disown(self, slot: Slot) -> None:
        """Give up a write a holder has taken and not finished, without waiting for its outcome
        any longer: its claim goes back with :meth:`give_back`, so if that holder died before
        COMMIT the next one drops the write (its owner is gone) instead of publishing it again.
        """
        slot.disowned = True

    def collect(self, slot: Slot) -> tuple[bool, Any]:
        """The outcome of a done write: ``(True, result)`` or ``(False, exception)``."""
        if _ORDERED:
            failed, result, error = self._collect(slot.index)
        else:
            with self._mutex(slot.index):
                failed, result, error = self._collect(slot.index)
        if failed:
            return False, _decode_error(error, self.path)
        return True, result

    def _collect(self, index: int) -> tuple[int, int, bytes]:
        mm, at = self._mm, _HEADER + index * _SLOT_SIZE
        _, _, _, failed, _, result, error_size = _SLOT_HEAD.unpack_from(mm, at)
        start = at + _SLOT_SIZE - _ERROR_SIZE
        error = mm[start : start + error_size] if failed else b""
        mm[_STATES + index] = FREE
        return failed, result, error

    # -- the gate holder's side ---------------------------------------------------------------

    def waiting(self) -> bool:
        """Whether any write waits in the mailbox (a hint: one may arrive right after)."""
        return PUBLISHED in self._mm[_STATES : _STATES + SLOTS]

    def take(self) -> list[Carried]:
        """Take every published write (the caller holds the gate)."""
        states = self._mm[_STATES : _STATES + SLOTS]
        published = []
        index = states.find(PUBLISHED)
        while index >= 0:
            published.append(index)
            index = states.find(PUBLISHED, index + 1)
        if not published:
            return []
        _LEADER.pack_into(self._mm, 8, _fork.pid())
        taken: list[Carried] = []
        first, last = published[0], published[-1]
        if self._try_mutexes(first, last):
            try:
                for index in published:
                    self._take_one(index, taken)
            finally:
                self._unmutexes(first, last)
        else:
            for index in published:
                # A slot whose owner is mid-change is left for the next holder (the owner,
                # once done, finds the gate taken and is woken when it is released).
                if self._try_mutex(index):
                    try:
                        self._take_one(index, taken)
                    finally:
                        self._unmutex(index)
        if not taken:
            _LEADER.pack_into(self._mm, 8, 0)
        return taken

    def _take_one(self, index: int, taken: list[Carried]) -> None:
        """Take the write published in slot ``index`` into ``taken`` (under the slot's lock)."""
        mm, state = self._mm, _STATES + index
        if mm[state] != PUBLISHED:
            return
        if not self._claimed(index):
            # Its owner died waiting: it never heard back, so nothing runs for it, as nothing
            # would have if it had died waiting for the gate.
            mm[state] = FREE
            return
        at = _HEADER + index * _SLOT_SIZE
        owner, _, _, _, size, _, _ = _SLOT_HEAD.unpack_from(mm, at)
        op = _decode_op(mm[at + _DATA : at + _DATA + size])
        mm[state] = TAKEN
        taken.append(Carried(index, owner, size, op))

    def settle(self, carried: list[Carried], results: list[tuple[bool, Any]], batch: int) -> None:
        """Store each taken write's outcome before COMMIT, tagged with the batch id the same
        transaction records in the database: if this process dies before :meth:`finish`, the
        next holder knows from the database which outcome stands.

        No slot lock is needed: nobody else touches a taken slot, and :meth:`finish` publishes
        these stores under the slot's lock, which the owner takes before it reads them.
        """
        mm, pack = self._mm, _SLOT_HEAD.pack_into
        for item, (ok, value) in zip(carried, results, strict=True):
            if ok:
                at = _HEADER + item.index * _SLOT_SIZE
                pack(mm, at, item.owner, 1, batch, 0, item.size, int(value), 0)
            else:
                self._put_error(item, value, batch)

    def fail(self, carried: list[Carried], exc: BaseException) -> None:
        """Give every taken write the error that stopped its batch (nothing was committed)."""
        for item in carried:
            self._put_error(item, exc, 0)

    def _put_error(self, item: Carried, exc: BaseException, batch: int) -> None:
        error = _encode_error(exc)
        start = _HEADER + item.index * _SLOT_SIZE + _SLOT_SIZE - _ERROR_SIZE
        self._mm[start : start + len(error)] = error
        self._put_head(item.index, item.owner, 1, batch, 1, item.size, 0, len(error))

    def finish(self, carried: list[Carried]) -> None:
        """Mark taken writes done (after COMMIT, or after :meth:`fail`); their owners are woken
        by :meth:`wake_next`, once the gate is released: a wake-up costs the waker tens of
        microseconds on these machines, too much to pay while every other writer waits."""
        sleeping: list[tuple[int, int]] = []
        # Taken in order of their slots: the first and last span them all.
        if carried and self._try_mutexes(carried[0].index, carried[-1].index):
            try:
                for item in carried:
                    self._finish_one(item, sleeping)
            finally:
                self._unmutexes(carried[0].index, carried[-1].index)
        else:
            for item in carried:
                with self._mutex(item.index):
                    self._finish_one(item, sleeping)
        _LEADER.pack_into(self._mm, 8, 0)
        with self._claim_lock:
            self._to_wake.extend(sleeping)

    def _finish_one(self, item: Carried, sleeping: list[tuple[int, int]]) -> None:
        """Mark one taken write done (under its slot's lock); note its owner if it sleeps."""
        mm = self._mm
        mm[_STATES + item.index] = DONE
        if mm[_SLEEPING + item.index]:
            sleeping.append((item.index, item.owner))

    def gate_taken(self) -> None:
        """Note that this process holds the gate (the caller has just taken it), and since when."""
        pid = _fork.pid()
        _HOLDER.pack_into(self._mm, _GATE, pid, pid, time.time())

    def gate_released(self) -> None:
        """Note that the gate is about to be released (unless another process took it since)."""
        try:
            if _LEADER.unpack_from(self._mm, _GATE)[0] == _fork.pid():
                _LEADER.pack_into(self._mm, _GATE, 0)
        except ValueError:  # closed since (retired): the gate cleared its own hint before
            return

    def gate_free(self) -> bool:
        """Whether the gate looks free of other processes, read from shared memory without a
        system call. A hint: a holder that died leaves it looking taken, and one that does not
        use a mailbox (a plain ``filelock`` user) leaves it looking free."""
        try:
            holder: int = _LEADER.unpack_from(self._mm, _GATE)[0]
        except ValueError:  # closed since this caller took it in hand (retired)
            return True  # only the gate itself can answer now
        return holder == 0 or holder == _fork.pid()

    def orphaned(self) -> bool:
        """Whether the last holder died with writes taken and not finished."""
        return self._leader() != 0

    def _leader(self) -> int:
        """The pid of the holder that has writes taken and not finished, or 0."""
        leader: int = _LEADER.unpack_from(self._mm, 8)[0]
        return leader

    def recover(self, committed_batch: int | None) -> None:
        """Resolve a dead holder's taken writes; ``committed_batch`` is the last batch id the
        database holds. The caller holds the gate."""
        for index in range(SLOTS):
            with self._mutex(index):
                if self.state(index) != TAKEN:
                    continue
                owner, ready, batch, _, size, _, _ = self._head(index)
                if ready and batch != 0 and batch == committed_batch:
                    self._set_state(index, DONE)
                elif not self._claimed(index):
                    # Not written, and its owner is gone or gave it up (see disown).
                    self._set_state(index, FREE)
                    continue
                else:
                    # Nothing of its batch was committed: it waits for the next holder again.
                    self._put_head(index, owner, 0, 0, 0, size, 0, 0)
                    self._set_state(index, PUBLISHED)
            self._wake(index, owner)
        _LEADER.pack_into(self._mm, 8, 0)

    def wake_next(self) -> None:
        """Wake the owners of writes finished under the gate, and one owner of a published
        write, in turn (the caller has just released the gate)."""
        with self._claim_lock:  # the mailbox may be closing in another thread
            if self._closed:
                return
            done, self._to_wake = self._to_wake, []
            for index, owner in done:
                self._wake(index, owner)
            states = self._mm[_STATES : _STATES + SLOTS]
            start = self._next_wake
            index = states.find(PUBLISHED, start)
            if index < 0:
                index = states.find(PUBLISHED, 0, start)
                if index < 0:
                    return
            self._next_wake = (index + 1) % SLOTS
            self._wake(index, self._head(index)[0])

    def _wake(self, index: int, owner: int) -> None:
        sender = self._sender
        if sender is None:
            sender = self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sender.sendto(b"!", socket.MSG_DONTWAIT, self._address(index, owner))
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            # A wake-up is only a hint: the owner has wake-ups queued already (the socket is
            # full) or is gone; a live owner also checks on its own every LIVENESS seconds.
            return

    def close(self) -> None:
        """Unmap and close, once no caller sleeps on a slot (the last to give one back closes).

        A forked child closes its copy: the parent's claims were never its own.
        """
        with self._claim_lock:
            if self._closed:
                return
            if self._busy and self._pid == _fork.pid():
                self._close_pending = True
                return
            self._close()

    def _close(self) -> None:
        # Under _claim_lock (but in a forked child, where no other thread exists), so that
        # wake_next never uses what this closes.
        self._closed = True
        for slot in self._slots:
            slot.sock.close()
        self._slots, self._spare = [], []
        if self._sender is not None:
            self._sender.close()
        self._mm.close()
        os.close(self._fd)  # releases the claims, unless a forked child still shares them


class _SlotMutex:
    """A slot's lock, as a context manager (a class: the gate holder takes one per write)."""

    __slots__ = ("index", "mailbox")

    def __init__(self, mailbox: Mailbox, index: int) -> None:
        self.mailbox, self.index = mailbox, index

    def __enter__(self) -> None:
        # Threads of this process share the descriptor, and so its locks: a thread lock first.
        local = self.mailbox._local[self.index]
        local.acquire()
        try:
            self.mailbox._lock(_MUTEXES + self.index, wait=True)
        except BaseException:
            local.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.mailbox._unlock(_MUTEXES + self.index)
        finally:
            self.mailbox._local[self.index].release()


def _check_magic(head: bytes, path: str) -> None:
    """:raises MpstoreError: the file starts with something else than a mailbox (a new, empty
    or zero-filled file is a mailbox with every slot free)."""
    if head not in (b"", bytes(len(head)), _MAGIC):
        raise MpstoreError(
            f"{path} is not an mpstore mailbox file; it is left as it is (remove it while no "
            "process uses the database, and mpstore creates a new one)",
            path,
        )


@dataclass(frozen=True)
class Snapshot:
    """The mailbox as seen from outside: how many writes wait, are being carried or are done
    and not yet collected, and the pid of a holder that has writes taken (0 if none)."""

    exists: bool
    waiting: int
    carried: int
    done: int
    holder: int


def _read_head(path: str) -> bytes | None:
    """The mailbox file's header and slot states, read without opening it for writing; None
    if there is no file at ``path``.

    :raises OSError: the file cannot be opened or read.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    try:
        return os.pread(fd, _STATES + SLOTS, 0)
    finally:
        os.close(fd)


def snapshot(path: str) -> Snapshot:
    """Read the mailbox at ``path`` without opening it for writing or changing it.

    :raises MpstoreError: the file is not a mailbox.
    """
    head = _read_head(path)
    if head is None:
        return Snapshot(False, 0, 0, 0, 0)
    _check_magic(head[: len(_MAGIC)], path)
    states = head[_STATES : _STATES + SLOTS]
    holder = _LEADER.unpack_from(head, 8)[0] if len(head) >= 16 else 0
    return Snapshot(True, states.count(PUBLISHED), states.count(TAKEN), states.count(DONE), holder)


def recorded_holder(path: str) -> tuple[int, float] | None:
    """The pid and start time (epoch seconds) of the last gate holder recorded in the mailbox
    at ``path``, if any; read without opening the file for writing. A file that cannot be read
    or is not a mailbox records none."""
    try:
        head = _read_head(path)
    except OSError:
        return None
    if head is None or len(head) < _GATE + _HOLDER.size or head[: len(_MAGIC)] != _MAGIC:
        return None
    _, pid, since = _HOLDER.unpack_from(head, _GATE)
    return (pid, since) if pid > 0 else None


_open: weakref.WeakSet[Mailbox] = weakref.WeakSet()


def _forget_inherited() -> None:
    # A child that never touches the store would otherwise keep its parent's claims alive
    # (they belong to the shared open file description) after the parent died.
    # Only this thread survived the fork: no lock of the mailbox may be waited for.
    for mailbox in list(_open):
        if not mailbox._closed:
            mailbox._close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited)


def encode_op(op: tuple[Any, ...]) -> bytes:
    return marshal.dumps(op)


def _decode_op(data: bytes) -> tuple[Any, ...]:
    try:
        op = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return ("damaged",)
    return op if isinstance(op, tuple) else ("damaged",)


def _encode_error(exc: BaseException) -> bytes:
    module = "mpstore" if isinstance(exc, MpstoreError) else type(exc).__module__
    path = exc.path if isinstance(exc, MpstoreError) else None
    message = exc.message if isinstance(exc, MpstoreError) else str(exc)
    code = exc.errno if isinstance(exc, MpstoreError) and isinstance(exc, OSError) else None
    limit = _ERROR_SIZE // 10  # characters of at most 4 bytes: everything fits its place
    names = (module[:100], type(exc).__name__[:100])
    return marshal.dumps((*names, message[:limit], (path or "")[:limit], code))


def _decode_error(data: bytes, path: str) -> BaseException:
    try:
        module, name, message, where, code = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return MpstoreError(f"the outcome of this write in {path} could not be read", path)
    where = str(where) or None
    if module == "mpstore":
        cls = getattr(_errors, str(name), None)
        if isinstance(cls, type) and issubclass(cls, _errors.OSErrorKind):
            valid = type(code) is int and 0 <= code < 1 << 31  # a damaged slot: not trusted
            return cls(str(message), where, code if valid else None)
        if isinstance(cls, type) and issubclass(cls, MpstoreError):
            return cls(str(message), where)
    elif module == "sqlite3":
        cls = getattr(sqlite3, str(name), None)
        if isinstance(cls, type) and issubclass(cls, sqlite3.Error):
            return cls(str(message))
    return MpstoreError(f"{name}: {message}", where)
