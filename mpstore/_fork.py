"""The current process id, cached and refreshed after fork.

Every connection, lock descriptor and queue is checked against the pid on each use; a cached
value keeps that check off the system-call path (``os.getpid`` is a syscall on modern libc).
"""

from __future__ import annotations

import os

__all__ = ["pid"]

_pid = os.getpid()


def _refresh() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_refresh)


def pid() -> int:
    """This process's id (a forked child sees its own)."""
    return _pid
