"""Code that runs inside the child processes of the fault tests.

Children are spawned (a fresh interpreter each), so every target is a module-level function.
Parent and children talk through ``multiprocessing`` pipes: each message is a tuple whose first
item names it.
"""

from __future__ import annotations

import os
import resource
import signal
import traceback
from typing import Any

import mpstore
from tests.models import Note

#: A write that the victim of a fault test never commits: its keys start with this prefix.
VICTIM = "victim"
NOBODY = 65534


def wal_size(path: str) -> int:
    """The size of ``path``'s WAL file, 0 if there is none."""
    try:
        return os.path.getsize(path + "-wal")
    except FileNotFoundError:
        return 0


def victim_keys(round_: int, count: int) -> list[str]:
    return [f"{VICTIM}-{round_}-{i}" for i in range(count)]


# -- kill -9 of a writer that holds the gate -----------------------------------------------------


def victim_factory(path: str, control: Any) -> None:
    """Fork one victim per request; report its pid once it holds the gate, then reap it.

    Requests are ``(round, spill, commit)``; ``None`` ends the loop. Forking from this already
    imported process makes a victim cost a fork, not a new interpreter. Replies:
    ``("holding", pid, wal_growth)`` and then, once someone has killed it, ``("reaped", pid,
    wait_status)``.
    """
    while True:
        request = control.recv()
        if request is None:
            return
        round_, spill, commit = request
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                _hold_mid_transaction(path, round_, spill, commit, write_end)
            except BaseException:  # shown on stderr; the parent sees "died"
                traceback.print_exc()
            finally:
                os._exit(1)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as ready:
            line = ready.readline()
        if not line:
            _, status = os.waitpid(pid, 0)
            control.send(("died", pid, status))
            continue
        control.send(("holding", pid, int(line)))
        _, status = os.waitpid(pid, 0)
        control.send(("reaped", pid, status))


def _hold_mid_transaction(path: str, round_: int, spill: bool, commit: bool, ready: int) -> None:
    """Write this round's victim records inside a write block, say so, and wait to be killed.

    ``spill`` shrinks the page cache so the uncommitted pages are written to the WAL before the
    kill (recovery must then skip frames without a commit record). ``commit`` is the negative
    control: the records are committed and the victim is killed holding an empty write block.
    """
    store = mpstore.Store(path, timeout=30)
    notes = store.collection("notes", Note, key="id")
    before = wal_size(path)
    records = [Note(id=k, text="x" * 1000) for k in victim_keys(round_, 200 if spill else 5)]
    if commit:
        notes.upsert_many(records)
    with store.write() as conn:
        if spill:
            conn.execute("PRAGMA cache_size=8")
        if not commit:
            notes.upsert_many(records)
        os.write(ready, f"{wal_size(path) - before}\n".encode())
        while True:
            signal.pause()


def survivor(path: str, worker: int, control: Any, writes: int) -> None:
    """Write ``writes`` records per round on request, with a 1 s gate timeout.

    Replies ``("ready", worker)`` once open; per round ``("waiting", worker, round)`` when its
    first write queues for the gate, then ``("done", worker, round, acked_keys)`` or
    ``("failed", worker, round, acked_keys, error)``.
    """
    state = {"round": -1, "announced": True}

    def on_event(event: str) -> None:
        if event == "gate-wait" and not state["announced"]:
            state["announced"] = True
            control.send(("waiting", worker, state["round"]))

    with mpstore.Store(path, timeout=1.0, on_event=on_event) as store:
        notes = store.collection("notes", Note, key="id")
        control.send(("ready", worker))
        while True:
            round_ = control.recv()
            if round_ is None:
                return
            state["round"], state["announced"] = round_, False
            acked: list[str] = []
            try:
                for i in range(writes):
                    key = f"s{worker}-{round_}-{i}"
                    notes.upsert(Note(id=key, text="survivor"))
                    acked.append(key)
            except mpstore.MpstoreError as exc:
                control.send(("failed", worker, round_, acked, exc))
            else:
                control.send(("done", worker, round_, acked))


# -- SIGSTOP of the holder -------------------------------------------------------------------


def hold_then_commit(path: str, keys: list[str], control: Any) -> None:
    """Write ``keys`` inside a write block, send ``("holding",)``, commit on the next message.

    A pipe rather than an ``Event`` carries the release: setting a multiprocessing ``Event``
    waits for its sleepers to wake, which a stopped process never does.
    """
    with mpstore.Store(path, timeout=30) as store:
        notes = store.collection("notes", Note, key="id")
        with store.write():
            notes.upsert_many(Note(id=k, text="held") for k in keys)
            control.send(("holding",))
            control.recv()


def waiter(path: str, timeout: float, control: Any) -> None:
    """Try to write the key it is sent, with ``timeout``; reply ``("ok", key)`` or the error."""
    with mpstore.Store(path, timeout=timeout) as store:
        notes = store.collection("notes", Note, key="id")
        control.send(("ready",))
        while True:
            key = control.recv()
            if key is None:
                return
            try:
                notes.upsert(Note(id=key, text="waiter"))
            except mpstore.MpstoreError as exc:
                control.send(("failed", exc))
            else:
                control.send(("ok", key))


# -- disk full -------------------------------------------------------------------------------


def write_past_file_size_limit(path: str, committed: int) -> dict[str, Any]:
    """Commit ``committed`` records, cap the file size just above the files, write past it.

    SIGXFSZ is ignored so that the kernel fails the write with EFBIG instead of killing the
    process. Returns what happened at each step for the parent to judge.
    """
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    seen: dict[str, Any] = {}
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert_many(Note(id=f"before-{i}", text="x" * 100) for i in range(committed))
        sizes = [
            os.path.getsize(path + s) for s in ("", "-wal", "-shm") if os.path.exists(path + s)
        ]
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes) + 4096, hard))
        try:
            try:
                notes.upsert(Note(id="too-big", text="y" * 300_000))
            except Exception as exc:  # any type: the parent asserts which one it was
                seen["error"] = exc
                seen["error_type"] = type(exc).__name__
            seen["count_while_full"] = notes.count()
            seen["integrity_while_full"] = store.integrity_check()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        notes.upsert(Note(id="after-limit", text="y" * 300_000))
        seen["count_after"] = notes.count()
    return seen


# -- permissions -----------------------------------------------------------------------------


def as_another_user(action: str, path: str) -> tuple[str, str, str]:
    """Drop root's privileges if we have them, then try ``action`` on ``path``.

    As root, permission bits do not apply, so the child becomes ``nobody`` (65534) first; as any
    other user the bits apply already. Returns (stage reached, error type, message); stage is
    ``open`` or ``read`` or ``write``, the step that raised (``done`` if none did).
    """
    if os.geteuid() == 0:
        # mpstore imports its parts on first use; the interpreter's own files may be unreadable
        # to the unprivileged user, so load everything while still root.
        mpstore.Store, mpstore.Collection, mpstore.Connection  # noqa: B018
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    stage = "open"
    try:
        with mpstore.Store(path, timeout=2) as store:
            stage = "read"
            notes = store.collection("notes", Note, key="id")
            notes.count()
            if action == "write":
                stage = "write"
                notes.upsert(Note(id="by-another-user", text="x"))
        stage = "done"
    except Exception as exc:  # any type: the parent asserts which one it was
        return stage, type(exc).__name__, str(exc)
    return stage, "", ""


# -- errors crossing a process boundary ------------------------------------------------------


def raise_error(name: str, args: tuple[Any, ...]) -> None:
    """Raise ``mpstore.<name>(*args)`` so that the pool pickles it back to the parent."""
    raise getattr(mpstore, name)(*args)
