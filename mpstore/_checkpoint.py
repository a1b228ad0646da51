"""WAL checkpoints outside the write gate.

SQLite's automatic checkpoint runs inside the commit that crosses its threshold: under the gate
that stalls every waiting writer for the few milliseconds a checkpoint takes. mpstore turns it
off on write connections and instead, after a writer has released the gate, looks at how many
WAL frames are not yet copied back into the database (two integers in the WAL index, the -shm
file). Past a threshold a background thread runs a PASSIVE checkpoint, which never blocks
writers or readers.

The WAL index is read through a descriptor of mpstore's own, and closing any descriptor of a
file drops every POSIX lock the process holds on it, SQLite's included: its lock on the -shm
file is what tells other processes the index is in use, and one that finds no such lock rebuilds
the index under the connections still using it. So each process keeps one descriptor per -shm
file, shared by its stores, and closes it only once no lock of the process is left on that file.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import threading
from collections.abc import Callable

from . import _fork

__all__ = ["Checkpointer"]

# The WAL-index header (SQLite's documented WAL file format, "wal-index format"): version at
# offset 0, mxFrame (frames in the WAL) at 16; the checkpoint info's nBackfill at 96.
_WAL_INDEX_VERSION = 3007000
_HEADER = struct.Struct("=I12xI")
_BACKFILL = struct.Struct("=I")


_LOCKS_TABLE = "/proc/locks"


def locks_held_here(fd: int) -> bool:
    """Whether this process holds a POSIX lock on the file ``fd`` refers to (True where that
    cannot be told: keeping a descriptor open is safe, closing it under a lock is not)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    me = str(os.getpid())
    try:
        with open(_LOCKS_TABLE) as table:
            for line in table:
                fields = line.split()
                # "<id>: POSIX ADVISORY READ <pid> <maj:min:inode> <start> <end>"; a waiting
                # request has "->" after the id.
                if "->" in fields:
                    continue
                if len(fields) >= 6 and fields[1] == "POSIX" and fields[4:6] == [me, inode]:
                    return True
    except OSError:
        return True
    return False


class _WalIndexFiles:
    """This process's read-only descriptors on -shm files: one per file, shared, counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[int, int], list[int]] = {}  # identity -> [fd, users]
        self._parked: list[int] = []  # no user left, but closing them would drop a lock

    def acquire(self, path: str) -> int | None:
        """A descriptor on ``path`` for reading; None if it cannot be opened."""
        with self._lock:
            try:
                st = os.stat(path)
            except OSError:
                return None
            entry = self._open.get((st.st_dev, st.st_ino))
            if entry is None:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    return None
                st = os.fstat(fd)
                entry = self._open.setdefault((st.st_dev, st.st_ino), [fd, 0])
                if entry[0] != fd:
                    # Between the stat and the open the path came to name a file this process
                    # already reads: share that descriptor, and keep this one until closing it
                    # drops no lock.
                    self._parked.append(fd)
            entry[1] += 1
            self._sweep()
            return entry[0]

    def release(self, fd: int) -> None:
        """Give back a descriptor from :meth:`acquire`; close it if it was the last use and
        no lock of this process is left on its file."""
        with self._lock:
            for identity, entry in list(self._open.items()):
                if entry[0] == fd:
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._open[identity]
                        self._parked.append(fd)
                    break
            self._sweep()

    def _sweep(self) -> None:
        """Close the parked descriptors whose files no longer carry a lock of this process."""
        if self._parked:
            kept = [fd for fd in self._parked if locks_held_here(fd)]
            for fd in self._parked:
                if fd not in kept:
                    os.close(fd)
            self._parked = kept

    def forget_after_fork(self) -> None:
        """In a forked child, which holds no POSIX locks yet: close the parent's descriptors."""
        fds = [entry[0] for entry in self._open.values()] + self._parked
        self._lock = threading.Lock()
        self._open, self._parked = {}, []
        for fd in fds:
            os.close(fd)


_wal_indexes = _WalIndexFiles()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_wal_indexes.forget_after_fork)


class Checkpointer:
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` in a daemon thread when the WAL has grown.

    :param threshold: frames waiting to be copied back that trigger a checkpoint (SQLite's own
        default for its automatic checkpoint is 1000).
    """

    def __init__(
        self, path: str, connect: Callable[[], sqlite3.Connection], threshold: int = 1000
    ) -> None:
        self._shm_path = path + "-shm"
        self._connect = connect
        self.threshold = threshold
        self._reset()

    def _reset(self) -> None:
        self._pid = _fork.pid()
        self._shm: int | None = None
        self._shm_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.runs = 0
        self._blind_writes = 0
        self.ran = threading.Event()  # set after each checkpoint that ran
        self.last_error: sqlite3.Error | None = None
        self.errors = 0

    def pending(self) -> int | None:
        """WAL frames not yet checkpointed, or None if the WAL index cannot be read."""
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
        version, frames = _HEADER.unpack_from(raw, 0)
        if version != _WAL_INDEX_VERSION:
            return None
        (backfilled,) = _BACKFILL.unpack_from(raw, 96)
        return max(0, int(frames) - int(backfilled))

    def poke(self) -> None:
        """Wake the checkpoint thread if the WAL holds ``threshold`` frames or more.

        Where the WAL index cannot be read (an SQLite with another index layout), every
        ``threshold // 4``-th write checkpoints instead (a commit adds a few frames), so the WAL
        stays bounded either way.
        """
        if self._closed:
            return
        pending = self.pending()
        if pending is None:
            self._blind_writes += 1
            if self._blind_writes < self.threshold // 4:
                return
            self._blind_writes = 0
        elif pending < self.threshold:
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"mpstore-checkpoint:{self._shm_path}", daemon=True
            )
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        conn = self._connect()
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._closed:
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    # Nothing is lost when a checkpoint fails: the frames stay in the WAL and
                    # the next poke retries. Counted, and kept, for stats().
                    self.last_error = exc
                    self.errors += 1
                else:
                    self.runs += 1
                    self.ran.set()
        finally:
            conn.close()

    def close(self) -> None:
        """Stop the thread, after a checkpoint in progress. The WAL index stays open for
        :meth:`release`, once the store's connections are closed."""
        if self._pid != _fork.pid():
            self._reset()  # the parent's thread and locks are not this process's
        self._closed = True
        self._wake.set()
        thread = self._thread
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
