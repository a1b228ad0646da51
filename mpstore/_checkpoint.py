"""WAL checkpoints outside the write gate.

SQLite's automatic checkpoint runs inside the commit that crosses its threshold: under the gate
that stalls every waiting writer for the few milliseconds a checkpoint takes. mpstore turns it
off on write connections and instead, after a writer has released the gate, looks at how many
WAL frames are not yet copied back into the database (two integers in the WAL index, the -shm
file). Past a threshold a background thread runs a PASSIVE checkpoint, which never blocks
writers or readers.
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
                try:
                    self._shm = os.open(
                        self._shm_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
                    )
                except OSError:
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
        """Stop the thread (after a checkpoint in progress) and close the WAL index."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and self._pid == _fork.pid():
            thread.join()
        with self._shm_lock:
            if self._shm is not None and self._pid == _fork.pid():
                os.close(self._shm)
                self._shm = None
