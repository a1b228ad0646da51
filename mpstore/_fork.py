"""The current process id, cached and refreshed after fork.

Every connection, lock descriptor and queue is checked against the pid on each use; a cached
value keeps that check off the system-call path (``os.getpid`` is a syscall on modern libc).
"""

from __future__ import annotations

import os

__all__ = ["keep_forever", "pid"]

_pid = os.getpid()


def _refresh() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_refresh)


# Objects inherited from the parent that must never be used or finalised here (see Store._writer).
_kept: list[object] = []


def keep_forever(obj: object) -> None:
    """Hold a reference to ``obj`` for the life of the process, so it is never finalised."""
    _kept.append(obj)


def pid() -> int:
    """This process's id (a forked child sees its own)."""
    return _pid
