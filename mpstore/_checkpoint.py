"""WAL checkpoints outside the write gate, and the WAL's bound.

SQLite's automatic checkpoint runs inside the commit that crosses its threshold: under the gate
that stalls every waiting writer for the few milliseconds a checkpoint takes. mpstore turns it
off on write connections and instead, after a writer has released the gate, looks at how many
WAL frames are not yet copied back into the database (two integers in the WAL index, the -shm
file). Past a threshold a background thread runs a PASSIVE checkpoint, which never blocks
writers or readers. A store looks at most once a millisecond: reading the index is a system
call, as costly as a tenth of a small write, and the WAL outgrows the threshold by at most what
one process commits in that time (and stays so until the next write looks, when a burst of
writes ends within that millisecond).

SQLite starts the WAL over only when a write transaction begins with every frame copied back.
Under writes that never pause, a checkpoint outside the gate never gets there (writers append
while it copies), and the WAL would grow by every page every commit writes, for good: a
gigabyte per 40,000 small writes, each commit extending the file. So once the WAL passes the
store's ``wal_limit``, a gate holder, between two transactions, copies back what the
background checkpoints left (:meth:`Checkpointer.complete`): no writer appends meanwhile, so
the next write starts the WAL over. It waits for a moment when little is left, which the
background thread brings about by running again while much is. That checkpoint also makes
SQLite sync the WAL and the database file under the gate, the file with every page copied
since the last checkpoint that completed (SQLite syncs it only then): 10-18 ms per 64 MiB on
the benchmark machine. So from half the limit on, the background thread syncs the database
file after each run, through a descriptor SQLite already has open on it (found in
/proc/self/fd): one of mpstore's own would drop SQLite's lock on the file when closed (see
below). The holder's checkpoint then syncs what it copied itself: 2-6 ms under 16 writing
processes, once per ``wal_limit`` of writes, the cost of a bounded WAL.

The WAL index is read through a descriptor of mpstore's own, and closing any descriptor of a
file drops every POSIX lock the process holds on it, SQLite's included: its lock on the -shm
file is what tells other processes the index is in use, and one that finds no such lock rebuilds
the index under the connections still using it. So each process keeps one descriptor per -shm
file, shared by its stores, and closes it only once SQLite has deleted that file and no lock of
the process is left on it (see :class:`_WalIndexFiles`).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from . import _fork, _proc
from ._errors import MpstoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["Checkpointer"]

# The WAL-index header (SQLite's documented WAL file format, "wal-index format"): version at
# offset 0, the page size at 14 (1 for 65536), mxFrame (frames in the WAL) at 16, the first salt
# (new each time the WAL starts over) at 32; the checkpoint info's nBackfill at 96.
_WAL_INDEX_VERSION = 3007000
_HEADER = struct.Struct("=I10xHI12xI")
_BACKFILL = struct.Struct("=I")


class _Wal(NamedTuple):
    """What the WAL index says of the WAL."""

    frames: int
    backfilled: int  # frames copied back into the database
    page_size: int
    salt: int  # changes whenever the WAL starts over

    @property
    def size(self) -> int:
        """The frames' pages, in bytes."""
        return self.frames * self.page_size

    @property
    def left(self) -> int:
        """The bytes of frames not copied back yet."""
        return (self.frames - self.backfilled) * self.page_size


#: How often (seconds) a store's writers look at the WAL index, at most (see the module doc).
LOOK_EVERY = 0.001

#: The most a gate holder copies back (bytes of frames) to complete a checkpoint, unless the WAL
#: has grown by the limit past the size at which it was to do so.
CATCH_UP = 1024 * 1024

#: The WAL's default bound, in bytes (see :meth:`Checkpointer.complete`).
WAL_LIMIT = 64 * 1024 * 1024

#: How long (seconds) a gate holder whose checkpoint copied every frame waits, yielding its CPU,
#: for readers still reading from the WAL (they began before it) to finish; longer when the CPUs
#: are busy, as each look comes only once the holder has a CPU again (up to 12 ms was seen).
READERS_WAIT = 0.002


_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on 64-bit Linux


def _lock_found(fd: int, start: int, length: int) -> bool | None:
    """Whether any process (this one included) holds a POSIX or open-file-description lock on
    bytes ``start`` to ``start + length`` (0: to the end) of the file ``fd`` refers to, other
    than ``fd``'s own; None where it cannot tell. An open-file-description test conflicts with
    every lock but those of its own open file description."""
    getlk = getattr(fcntl, "F_OFD_GETLK", None)
    if getlk is None or struct.calcsize("P") != 8:
        return None
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    try:
        found = _FLOCK.unpack(fcntl.fcntl(fd, getlk, request))
    except OSError:
        return None
    return bool(found[0] != fcntl.F_UNLCK)


def _names(fd: int, identity: tuple[int, int]) -> bool:
    """Whether descriptor ``fd`` is open on the file ``identity`` (st_dev, st_ino) names."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == identity


def _descriptor_on(identity: tuple[int, int]) -> int | None:
    """A descriptor this process has open on the file ``identity`` names (SQLite's, which it
    keeps while it uses the file), found in /proc/self/fd; None if there is none, or no such
    directory. Never closed here: that would drop SQLite's locks on the file."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in names:
        if name.isdigit() and _names(int(name), identity):
            return int(name)
    return None


def unlocked(fd: int) -> bool:
    """Whether no lock at all is held on the file ``fd`` refers to, by any process, this one
    included (``fd``, a descriptor of mpstore's own, holds none). False where it cannot tell.

    Asked before :func:`locks_held_here`, which reads /proc/locks: the kernel lets a reader of
    that file in only once every lock operation on the machine has stopped, which stalls every
    ``fcntl`` and ``flock`` caller (the gate, the mailbox, SQLite) for milliseconds.
    """
    return _lock_found(fd, 0, 0) is False


#: The byte of the WAL index that SQLite holds a write lock on while a checkpoint runs: its
#: locks are bytes 120-127 of the -shm file (SQLite's "wal-index format"), the checkpoint's
#: the second.
_CHECKPOINT_LOCK = 121

#: The read locks of readers that read from the WAL (read marks 1 to 4; a reader that needs
#: nothing from the WAL takes mark 0, the byte before): the WAL starts over only when a
#: writer can lock all four.
_WAL_READERS, _WAL_READER_LOCKS = 124, 4


def checkpoint_running(fd: int) -> bool:
    """Whether a checkpoint of the database whose WAL index ``fd`` reads runs now, in any process
    (this one included); False where it cannot tell. Another checkpoint started meanwhile would
    only find SQLite's checkpoint lock taken and return at once, having copied nothing."""
    return bool(_lock_found(fd, _CHECKPOINT_LOCK, 1))


def readers_in_wal(fd: int) -> bool:
    """Whether a reader reads from the WAL of the index ``fd`` reads, in any process (this one
    included); False where it cannot tell."""
    return bool(_lock_found(fd, _WAL_READERS, _WAL_READER_LOCKS))


def locks_held_here(fd: int) -> bool:
    """Whether this process holds a POSIX lock on the file ``fd`` refers to, as far as
    /proc/locks tells (see :func:`_proc.holds_lock`); a false match only keeps a descriptor
    open."""
    return _proc.holds_lock("POSIX", os.getpid(), os.fstat(fd).st_ino)


class _WalIndexFiles:
    """This process's read-only descriptors on -shm files: one per file, shared by its stores.

    A descriptor is closed only once its file is deleted, which SQLite does when the last
    connection to the database anywhere closes, and /proc/locks (where there is one) shows no
    lock of the process left on it. While the file exists a connection may open and lock it
    between any check and the close, so until then the descriptor stays open, and a store that
    opens the same file again uses it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[tuple[int, int], list[int]] = {}  # identity -> [fd, users]

    def acquire(self, path: str) -> int | None:
        """A descriptor on ``path`` for reading; None if it cannot be opened."""
        with self._lock:
            self._sweep()
            try:
                st = os.stat(path)
            except OSError:
                return None
            entry = self._fds.get((st.st_dev, st.st_ino))
            if entry is None:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    return None
                st = os.fstat(fd)
                entry = self._fds.get((st.st_dev, st.st_ino))
                if entry is None:
                    entry = self._fds[(st.st_dev, st.st_ino)] = [fd, 0]
                else:
                    # Between the stat and the open the path came to name a file open here
                    # already: that descriptor serves, and this one waits to be closed by the
                    # same rule as any other.
                    self._fds[(-1, fd)] = [fd, 0]
            entry[1] += 1
            return entry[0]

    def release(self, fd: int) -> None:
        """Give back a descriptor from :meth:`acquire`."""
        with self._lock:
            for entry in self._fds.values():
                if entry[0] == fd and entry[1] > 0:
                    entry[1] -= 1
                    break
            self._sweep()

    def _sweep(self) -> None:
        """Close the unused descriptors whose files are deleted and carry no lock of ours."""
        for identity, (fd, users) in list(self._fds.items()):
            if (
                users == 0
                and os.fstat(fd).st_nlink == 0
                and (unlocked(fd) or not locks_held_here(fd))
            ):
                del self._fds[identity]
                os.close(fd)

    def forget_after_fork(self) -> None:
        """In a forked child, which holds no POSIX locks yet: close the parent's descriptors."""
        fds = [fd for fd, _ in self._fds.values()]
        self._lock = threading.Lock()
        self._fds = {}
        for fd in fds:
            os.close(fd)


_wal_indexes = _WalIndexFiles()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_wal_indexes.forget_after_fork)


class Checkpointer:
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` in a daemon thread when the WAL has grown.

    :param threshold: frames waiting to be copied back that trigger a checkpoint (SQLite's own
        default for its automatic checkpoint is 1000).
    :param limit: the WAL's size in bytes past which a gate holder completes a checkpoint (see
        :meth:`complete`).
    """

    def __init__(
        self,
        path: str,
        connect: Callable[[], sqlite3.Connection],
        threshold: int = 1000,
        limit: int = WAL_LIMIT,
    ) -> None:
        self._db_path = path
        self._shm_path = path + "-shm"
        self._connect = connect
        self.threshold = threshold
        self.limit = limit
        self._reset()

    def _reset(self) -> None:
        self._pid = _fork.pid()
        self._shm: int | None = None
        self._shm_lock = threading.Lock()
        self._start_lock = threading.Lock()  # one thread, and none once closed
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None  # the thread's, while it runs
        self._closed = False
        self.runs = 0
        self._unseen = 0  # writes since the WAL index last showed room (or a checkpoint was asked)
        self._next_look = 0.0
        self._readable = False  # the last reading of the WAL index succeeded
        self.ran = threading.Event()  # set after each checkpoint that ran
        self.last_error: Exception | None = None
        self.errors = 0
        self.completed = 0  # checkpoints completed by a gate holder (see complete())
        self.completion_errors = 0
        self._next_completion_look = 0.0
        self._complete_at = 0  # WAL bytes from which a gate holder completes; 0: self.limit
        self._completed_salt = 0  # the WAL's salt when a holder last ran its checkpoint
        self._db_fd: int | None = None  # one of SQLite's descriptors on the database file
        self._not_open: tuple[int, int] | None = None  # a database file none was found for

    def _wal(self) -> _Wal | None:
        """What the WAL index says of the WAL; None if it cannot be read."""
        if self._pid != _fork.pid():
            self._reset()
        with self._shm_lock:  # close() may run in another thread
            if self._closed:
                return None
            if self._shm is None:
                self._shm = _wal_indexes.acquire(self._shm_path)
                if self._shm is None:
                    return None
            raw = os.pread(self._shm, 100, 0)
        if len(raw) < 100:
            return None
        version, page_size, frames, salt = _HEADER.unpack_from(raw, 0)
        if version != _WAL_INDEX_VERSION:
            return None
        (backfilled,) = _BACKFILL.unpack_from(raw, 96)
        return _Wal(frames, backfilled, 65536 if page_size == 1 else page_size, salt)

    def pending(self) -> int | None:
        """WAL frames not yet checkpointed, or None if the WAL index cannot be read."""
        wal = self._wal()
        return None if wal is None else max(0, wal.frames - wal.backfilled)

    def complete(self, conn: sqlite3.Connection) -> bool:
        """Copy back the frames the background checkpoints left, if the WAL has passed the
        limit; whether every frame is copied back now. Called by a gate holder on its write
        connection ``conn``, between transactions: no writer appends meanwhile, so the next
        write starts the WAL over (unless a reader still uses an older snapshot in it).

        Waits for a moment when at most :data:`CATCH_UP` bytes are left, as long as the WAL
        has not grown by the limit past the size it was to do so at. Once every frame is
        copied, it waits up to :data:`READERS_WAIT` for readers that still read from the WAL,
        which would keep the next write from starting it over. After each checkpoint it ran,
        the next waits for the WAL to grow by the limit again, until the WAL has started over
        (its salt changed, or it is under the limit): where readers keep it from starting
        over, every write would otherwise pay for one, and the WAL grows by the limit per
        checkpoint they defeat, not more. One that found SQLite's checkpoint lock taken
        changes nothing. Looks at the WAL index at most once per :data:`LOOK_EVERY`. A failure
        is counted, as the thread's are: the write's outcome is decided.
        """
        if self._closed:
            return False
        now = time.monotonic()
        if now < self._next_completion_look:
            return False
        self._next_completion_look = now + LOOK_EVERY
        wal = self._wal()
        if wal is None:
            return False
        if wal.size < self.limit or wal.salt != self._completed_salt:
            self._complete_at = 0  # it started over since
        due = self._complete_at or self.limit
        if (
            wal.size < due
            or wal.left <= 0
            or (wal.left > CATCH_UP and wal.size < due + self.limit)
            or self._running()
        ):
            return False
        try:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            self.last_error = exc
            self.completion_errors += 1  # apart from the thread's: each counter has one writer
            return False
        if busy:
            return False  # another checkpoint took SQLite's lock first: the next look retries
        self._complete_at, self._completed_salt = wal.size + self.limit, wal.salt
        if copied < frames:
            return False  # a reader's snapshot holds the rest back
        self.completed += 1
        self._let_readers_finish()
        return True

    def _let_readers_finish(self) -> None:
        """Yield the CPU, up to :data:`READERS_WAIT`, while readers read from the WAL: those
        began before the checkpoint, and end within moments (readers that begin after it need
        nothing from the WAL). Then the next write can start the WAL over."""
        deadline = time.monotonic() + READERS_WAIT
        while self._readers_in_wal() and time.monotonic() < deadline:
            os.sched_yield()

    def _readers_in_wal(self) -> bool:
        with self._shm_lock:
            return self._shm is not None and not self._closed and readers_in_wal(self._shm)

    def _running(self) -> bool:
        """Whether a checkpoint of this database runs now, in any process."""
        with self._shm_lock:
            return self._shm is not None and not self._closed and checkpoint_running(self._shm)

    def poke(self, every: float = 0.0) -> None:
        """Wake the checkpoint thread if the WAL holds ``threshold`` frames or more and no
        checkpoint runs already.

        With ``every``, the WAL index is read only if the last reading is that many seconds
        old. Where it cannot be read (an SQLite with another index layout), every
        ``threshold // 4``-th write checkpoints instead (a commit adds a few frames), so the WAL
        stays bounded either way.
        """
        if self._closed:
            return
        self._unseen += 1
        if every and self._readable:
            now = time.monotonic()
            if now < self._next_look:
                return
            self._next_look = now + every
        pending = self.pending()
        self._readable = pending is not None
        if pending is None:
            if self._unseen < self.threshold // 4:
                return
        elif pending < self.threshold or self._running():
            # A checkpoint running now (in any process) is left to finish; the next look
            # after it sees what it left.
            self._unseen = 0
            return
        self._unseen = 0
        if self._thread is None:
            # Writers of several threads look at the WAL outside the gate, at once.
            with self._start_lock:
                if self._thread is None and not self._closed:
                    thread = threading.Thread(
                        target=self._run, name=f"mpstore-checkpoint:{self._shm_path}", daemon=True
                    )
                    thread.start()
                    self._thread = thread
        self._wake.set()

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._closed:
                    return
                try:
                    # Under the lock fork takes first, so a child never inherits this
                    # connection mid-call, and finds it in _conn to close (after_fork_in_child).
                    with _fork.background_sqlite:
                        if self._conn is None:
                            self._conn = self._connect()
                        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                        self._catch_up(self._conn)
                    self._sync_database()
                except (sqlite3.Error, MpstoreError, OSError) as exc:
                    # Nothing is lost when a checkpoint fails, or its connection cannot be
                    # opened (out of descriptors), or the database file cannot be synced: the
                    # frames stay in the WAL and the next poke retries. Counted, and kept, for
                    # stats().
                    self.last_error = exc
                    self.errors += 1
                else:
                    self.runs += 1
                    self.ran.set()
        finally:
            with _fork.background_sqlite:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()

    def _catch_up(self, conn: sqlite3.Connection) -> None:
        """Once the WAL is halfway to the limit, run again while writers have appended more
        than a gate holder copies back itself (see :meth:`complete`): each run copies what
        was appended while the one before ran, so a few runs bring it within reach."""
        for _ in range(3):
            wal = self._wal()
            if wal is None or not self._halfway(wal) or wal.left <= CATCH_UP:
                return
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _halfway(self, wal: _Wal) -> bool:
        """Whether the WAL is halfway to the limit, from where the background thread readies
        it for a gate holder's checkpoint."""
        return 2 * wal.size >= self.limit

    def _sync_database(self) -> None:
        """From half the limit on, sync the database file (see the module doc).

        :raises OSError: the file could not be synced.
        """
        wal = self._wal()
        if wal is None or not self._halfway(wal):
            return
        try:
            there = os.stat(self._db_path)
        except FileNotFoundError:
            return
        identity = (there.st_dev, there.st_ino)
        fd = self._db_fd
        if fd is None or not _names(fd, identity):
            if identity == self._not_open:
                return  # looked for already: a file this process has no descriptor on
            fd = self._db_fd = _descriptor_on(identity)
            if fd is None:
                self._not_open = identity
                return
        try:
            os.fsync(fd)
        except OSError as exc:
            self._db_fd = None
            if exc.errno != errno.EBADF:  # else closed by SQLite meanwhile: the next run looks
                raise

    def after_fork_in_child(self) -> None:
        """Have the connection of the parent's checkpoint thread, which the child does not
        have, closed before the child opens one of its own (see
        :func:`_fork.close_before_connecting`). Fork waited for that thread to leave SQLite
        (``background_sqlite``), so nothing of the connection itself is held."""
        if self._conn is not None:
            _fork.close_before_connecting(self._conn)
        self._reset()

    def close(self) -> None:
        """Stop the thread, after a checkpoint in progress. The WAL index stays open for
        :meth:`release`, once the store's connections are closed."""
        if self._pid != _fork.pid():
            self._reset()  # the parent's thread and locks are not this process's
        with self._start_lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join()

    def release(self) -> None:
        """Give back the WAL index's descriptor (see :class:`_WalIndexFiles`)."""
        if self._pid != _fork.pid():
            self._reset()
        with self._shm_lock:
            self._closed = True
            fd, self._shm = self._shm, None
        if fd is not None:
            _wal_indexes.release(fd)
