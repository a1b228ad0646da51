"""A bounded pool of read connections, safe across threads and fork.

Bookkeeping is a short step under a lock; opening a connection happens outside it. After a fork
the child starts with an empty pool: connections are never shared across processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from . import _fork
from ._errors import PoolTimeout, StoreClosed

__all__ = ["Pool"]

T = TypeVar("T")


class Pool(Generic[T]):
    """At most ``size`` connections handed out at once; idle ones are reused (LIFO, warm first).

    :raises PoolTimeout: from :meth:`acquire` when none frees up within the timeout.
    :raises StoreClosed: from :meth:`acquire` after :meth:`close`.
    """

    def __init__(
        self, factory: Callable[[], T], closer: Callable[[T], None], size: int, name: str
    ) -> None:
        self._factory = factory
        self._closer = closer
        self.size = size
        self._name = name
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        self._pid = _fork.pid()
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(self.size)
        self._idle: list[T] = []
        self._out: set[int] = set()  # ids of the connections handed out by this process
        self.in_use = 0

    def _check_fork(self) -> None:
        if self._pid != _fork.pid():
            self.after_fork_in_child()

    def after_fork_in_child(self) -> None:
        """Start empty: the idle connections inherited from the parent are closed before the
        child opens one of its own (see :func:`_fork.close_before_connecting`); closing one
        rolls back in memory, and the parent's kernel locks are per process and unaffected.
        One that was checked out at the fork is closed when it comes back, if the thread that
        has it lives on here.
        """
        for conn in self._idle:
            _fork.close_before_connecting(conn)  # type: ignore[arg-type]
        self._reset()

    def acquire(self, timeout: float) -> T:
        """Check out a connection, waiting up to ``timeout`` seconds for a free slot."""
        self._check_fork()
        if self._closed:
            raise StoreClosed(f"the store {self._name} is closed", self._name)
        start = time.monotonic()
        if not self._slots.acquire(timeout=timeout):
            waited = time.monotonic() - start
            raise PoolTimeout(
                f"waited {waited:.3f} s for one of {self.size} read connections to {self._name}; "
                "all were in use (raise pool_size, or hold read() blocks for less time)",
                self._name,
                waited,
            )
        with self._lock:
            self.in_use += 1
            conn = self._idle.pop() if self._idle else None
            if conn is not None:
                self._out.add(id(conn))
        if conn is None:
            try:
                conn = self._factory()
            except BaseException:
                self._give_back_slot()
                raise
            with self._lock:
                self._out.add(id(conn))
        return conn

    def _give_back_slot(self) -> None:
        with self._lock:
            self.in_use -= 1
        self._slots.release()

    def release(self, conn: T, discard: bool = False) -> None:
        """Return a checked-out connection; ``discard`` closes it instead (e.g. it is broken)."""
        self._check_fork()
        with self._lock:
            if id(conn) not in self._out:
                foreign = True  # checked out before a fork, by the parent: never pooled here
            else:
                foreign = False
                self._out.discard(id(conn))
                self.in_use -= 1
                keep = not (discard or self._closed)
                if keep:
                    self._idle.append(conn)
        if foreign or not keep:
            self._closer(conn)
        if not foreign:
            self._slots.release()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Close idle connections now and the others as they come back."""
        self._closed = True
        self.close_idle()

    def close_idle(self) -> None:
        """Close the idle connections (they reopen on demand)."""
        if self._pid != _fork.pid():
            return
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            self._closer(conn)
