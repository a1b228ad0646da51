"""The current process id, cached and refreshed after fork.

Every connection, lock descriptor and queue is checked against the pid on each use; a cached
value keeps that check off the system-call path (``os.getpid`` is a syscall on modern libc).
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

__all__ = ["background_sqlite", "close_before_connecting", "close_inherited", "keep_forever", "pid"]

_pid = os.getpid()

_in_sqlite = threading.Lock()

#: Held by mpstore's own background threads (WAL checkpoints, Hypothesis listeners) while they
#: are inside SQLite, and taken by fork() first: a child forked while one of them was in
#: SQLite would inherit SQLite's mutexes locked, and hang at its first SQLite call.
background_sqlite = _in_sqlite


def _refresh() -> None:
    global _pid, _inherited_lock
    _pid = os.getpid()
    _in_sqlite.release()  # taken by the thread that forked, the one that lives on
    _inherited_lock = threading.Lock()  # a thread that does not exist here may have held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_in_sqlite.acquire, after_in_parent=_in_sqlite.release, after_in_child=_refresh
    )


# Objects inherited from the parent that must never be used or finalised here (see Store._writer).
_kept: list[object] = []

# Connections inherited from the parent, to close before this process opens one of its own.
_inherited: list[Closable] = []
_inherited_lock = threading.Lock()


class Closable(Protocol):
    def close(self) -> None: ...


def close_before_connecting(conn: Closable) -> None:
    """In a forked child's fork hook: close ``conn`` (inherited) before this process opens its
    first SQLite connection (see :func:`close_inherited`).

    SQLite keeps one record per file and process of the locks held, shared by every connection
    to the file: a connection opened beside an inherited one believes the parent's locks are
    its own, and never takes them. Not closed in the hook itself: closing takes SQLite's
    process-wide mutexes, which another thread of the parent may have held at the fork, and a
    child that never uses SQLite must not hang for it.
    """
    _inherited.append(conn)


def close_inherited() -> None:
    """Close what :func:`close_before_connecting` left; every mpstore connect calls it first."""
    if not _inherited:
        return
    with _inherited_lock:
        conns = list(_inherited)
        _inherited.clear()
    for conn in conns:
        conn.close()


def keep_forever(obj: object) -> None:
    """Hold a reference to ``obj`` for the life of the process, so it is never finalised."""
    _kept.append(obj)


def pid() -> int:
    """This process's id (a forked child sees its own)."""
    return _pid
