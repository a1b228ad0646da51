"""What Linux's /proc says about processes and their file locks (nothing, elsewhere).

Diagnostics and housekeeping only: nothing here is on a write's path.
"""

from __future__ import annotations

__all__ = ["holds_lock", "stopped"]

LOCKS_TABLE = "/proc/locks"


def holds_lock(kind: str, pid: int, inode: int) -> bool:
    """Whether process ``pid`` holds a lock of ``kind`` ("POSIX" or "FLOCK") on the file with
    inode number ``inode``, as far as /proc/locks tells (False where there is none to read).

    Matched on the inode number alone: /proc/locks names the device the lock lives on, which
    on overlayfs or btrfs is not the one ``stat`` reports. Reading /proc/locks stalls every
    lock operation on the machine for as long as it takes (the kernel lets the reader in only
    once they have stopped): ask it rarely.
    """
    wanted = (kind, str(pid), f":{inode}")
    try:
        with open(LOCKS_TABLE) as table:
            for line in table:
                # "<id>: POSIX ADVISORY READ <pid> <maj:min:inode> <start> <end>"; a waiting
                # request has "->" after the id and is not held.
                fields = line.split()
                if "->" in fields or len(fields) < 6:
                    continue
                if (fields[1], fields[4]) == wanted[:2] and fields[5].endswith(wanted[2]):
                    return True
    except OSError:
        return False
    return False


def stopped(pid: int) -> str | None:
    """How process ``pid`` is stopped ("stopped" by a signal such as ``SIGSTOP`` or Ctrl-Z,
    "traced" by a debugger), or None if it runs, is gone, or /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            line = stat.read()
    except OSError:
        return None
    # "pid (command) S ...": the command may hold spaces and parentheses of its own.
    end = line.rfind(b")")
    state = line[end + 2 : end + 3] if end >= 0 else b""
    return {b"T": "stopped", b"t": "traced"}.get(state)
