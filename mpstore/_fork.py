"""The current process id, cached and refreshed after fork.

Every connection, lock descriptor and queue is checked against the pid on each use; a cached
value keeps that check off the system-call path (``os.getpid`` is a syscall on modern libc).
"""

from __future__ import annotations

import os
import threading

__all__ = ["background_sqlite", "keep_forever", "pid"]

_pid = os.getpid()

_in_sqlite = threading.Lock()

#: Held by mpstore's own background threads (WAL checkpoints, Hypothesis listeners) while they
#: are inside SQLite, and taken by fork() first: a child forked while one of them was in
#: SQLite would inherit SQLite's mutexes locked, and hang at its first SQLite call.
background_sqlite = _in_sqlite


def _refresh() -> None:
    global _pid
    _pid = os.getpid()
    _in_sqlite.release()  # taken by the thread that forked, the one that lives on


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_in_sqlite.acquire, after_in_parent=_in_sqlite.release, after_in_child=_refresh
    )


# Objects inherited from the parent that must never be used or finalised here (see Store._writer).
_kept: list[object] = []


def keep_forever(obj: object) -> None:
    """Hold a reference to ``obj`` for the life of the process, so it is never finalised."""
    _kept.append(obj)


def pid() -> int:
    """This process's id (a forked child sees its own)."""
    return _pid
