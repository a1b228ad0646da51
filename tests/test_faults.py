"""Faults: a writer killed or stopped while it holds the gate, a full disk, a damaged file, and
files the process may not open or write.

The lock file deleted or replaced while held is covered in ``test_gate.py``; fork after open, a
store pickled into a spawn child and 16 processes creating one database in ``test_processes.py``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import mpstore
from mpstore import _sqlite
from tests import fault_workers, workers
from tests.fault_workers import victim_keys
from tests.models import Note

SPAWN = workers.SPAWN
REPLY_TIMEOUT = 60.0


def _recv(conn: Any) -> Any:
    """The next message on a pipe; fails the test (instead of hanging it) if none comes."""
    assert conn.poll(REPLY_TIMEOUT), "a child process stopped answering"
    return conn.recv()


# -- kill -9 of the gate holder, mid-transaction ---------------------------------------------


@dataclass
class _Rig:
    """A process that forks victims, and survivors that write on request."""

    factory: Any
    survivors: list[Any]


@contextlib.contextmanager
def _rig(path: str, survivors: int, writes: int) -> Iterator[_Rig]:
    procs = []
    ends = []
    for target, args in [
        (fault_workers.victim_factory, (path,)),
        *[(fault_workers.survivor, (path, w)) for w in range(survivors)],
    ]:
        mine, theirs = SPAWN.Pipe()
        extra = (writes,) if target is fault_workers.survivor else ()
        proc = SPAWN.Process(target=target, args=(*args, theirs, *extra))
        proc.start()
        theirs.close()
        procs.append(proc)
        ends.append(mine)
    try:
        for w, end in enumerate(ends[1:]):
            assert _recv(end) == ("ready", w)
        yield _Rig(ends[0], ends[1:])
        for end in ends:
            end.send(None)
        for proc in procs:
            proc.join(REPLY_TIMEOUT)
            assert proc.exitcode == 0, f"{proc.name} exited with {proc.exitcode}"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()


@dataclass
class _Round:
    victim: int
    wal_growth: int
    status: int
    replies: list[tuple[Any, ...]]


def _kill_round(rig: _Rig, round_: int, *, spill: bool, commit: bool, kill: bool) -> _Round:
    """One victim takes the gate and writes; the survivors queue behind it; the victim is killed.

    The survivors' 1 s timeout starts when they queue, which is before the kill: a survivor that
    does not get the gate within 1 s of the kill raises ``GateTimeout`` and reports ``failed``.
    With ``kill=False`` (a control) the victim is killed only after the survivors have replied.
    """
    rig.factory.send((round_, spill, commit))
    kind, victim, growth = _recv(rig.factory)
    assert kind == "holding", (kind, victim, growth)
    for end in rig.survivors:
        end.send(round_)
    for w, end in enumerate(rig.survivors):
        assert _recv(end) == ("waiting", w, round_)
    if kill:
        os.kill(victim, signal.SIGKILL)
    replies = [_recv(end) for end in rig.survivors]
    if not kill:
        os.kill(victim, signal.SIGKILL)
    kind, pid, status = _recv(rig.factory)
    assert (kind, pid) == ("reaped", victim)
    return _Round(victim, growth, status, replies)


def _leftovers(store: mpstore.Store, round_: int) -> list[str]:
    """The keys a round's victim managed to leave in the database (none, if the kill worked)."""
    rows = store.query(
        "SELECT key FROM notes WHERE key LIKE ? ORDER BY key",
        (f"{fault_workers.VICTIM}-{round_}-%",),
    )
    return sorted(r[0] for r in rows)


def _killed_by_sigkill(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.processes
def test_kill_9_of_the_gate_holder_mid_transaction_20_times(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    rounds, survivors, writes = 20, 2, 3
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        acked: set[str] = set()
        with _rig(path, survivors, writes) as rig:
            for r in range(rounds):
                # Odd rounds make the victim's uncommitted pages reach the WAL before the kill.
                spill = r % 2 == 1
                result = _kill_round(rig, r, spill=spill, commit=False, kill=True)
                assert _killed_by_sigkill(result.status)
                if spill:
                    assert result.wal_growth > 0
                for reply in result.replies:
                    assert reply[0] == "done", reply
                    acked.update(reply[3])
                assert _leftovers(store, r) == []
        assert len(acked) == rounds * survivors * writes
        assert set(notes.keys()) == acked
        assert store.integrity_check() == ["ok"]


@pytest.mark.processes
def test_kill_checks_notice_a_gate_never_freed_and_a_transaction_kept(tmp_path: Path) -> None:
    # Negative controls for the test above, on the same machinery.
    path = str(tmp_path / "state.db")
    with mpstore.Store(path) as store:
        store.collection("notes", Note, key="id")
        with _rig(path, 1, 1) as rig:
            # Nobody kills the holder: the survivor's 1 s timeout fires and names the holder.
            result = _kill_round(rig, 0, spill=False, commit=False, kill=False)
            kind, _, _, acked, error = result.replies[0]
            assert (kind, acked) == ("failed", [])
            assert isinstance(error, mpstore.GateTimeout)
            assert error.holder_pid == result.victim
            assert _leftovers(store, 0) == []
            # The victim commits before it dies: the leftover check reports its records.
            result = _kill_round(rig, 1, spill=False, commit=True, kill=True)
            assert result.replies[0][0] == "done"
            assert _leftovers(store, 1) == sorted(victim_keys(1, 5))


# -- SIGSTOP of the gate holder --------------------------------------------------------------


def _try_write(store: mpstore.Store, key: str, errors: list[BaseException]) -> None:
    try:
        store.collection("notes", Note, key="id").upsert(Note(id=key, text="mine"))
    except mpstore.MpstoreError as exc:
        errors.append(exc)


def _assert_names_holder(error: object, holder: int, timeout: float) -> None:
    assert isinstance(error, mpstore.GateTimeout), error
    assert error.holder_pid == holder
    assert f"pid {holder}" in str(error)
    assert error.waited is not None and error.waited >= timeout


@pytest.mark.processes
@pytest.mark.parametrize("then", ["cont", "kill"])
def test_a_stopped_holder_times_waiters_out_and_completes_after_sigcont(
    tmp_path: Path, then: str
) -> None:
    # then="kill" is the negative control: the holder never resumes, its transaction is lost,
    # and the "nothing lost" check must report exactly its records.
    path = str(tmp_path / "state.db")
    timeout = 0.5
    held = [f"held-{i}" for i in range(20)]
    with mpstore.Store(path) as store, mpstore.Store(path, timeout=timeout) as mine:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="before", text="x"))
        mine.collection("notes", Note, key="id")
        holder_end, theirs = SPAWN.Pipe()
        holder = SPAWN.Process(target=fault_workers.hold_then_commit, args=(path, held, theirs))
        other_end, theirs = SPAWN.Pipe()
        other = SPAWN.Process(target=fault_workers.waiter, args=(path, timeout, theirs))
        holder.start()
        other.start()
        try:
            assert _recv(holder_end) == ("holding",)
            assert _recv(other_end) == ("ready",)
            assert holder.pid is not None
            os.kill(holder.pid, signal.SIGSTOP)
            _, status = os.waitpid(holder.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status)
            holder_end.send("commit")  # a stopped holder cannot act on it: it keeps the gate

            other_end.send("other")
            kind, error = _recv(other_end)
            assert kind == "failed"
            _assert_names_holder(error, holder.pid, timeout)

            # In this process, from a thread: a hang fails the join instead of stalling the run.
            errors: list[BaseException] = []
            thread = threading.Thread(target=_try_write, args=(mine, "mine", errors))
            thread.start()
            thread.join(REPLY_TIMEOUT)
            assert not thread.is_alive()
            assert len(errors) == 1
            _assert_names_holder(errors[0], holder.pid, timeout)

            os.kill(holder.pid, signal.SIGCONT if then == "cont" else signal.SIGKILL)
            holder.join(REPLY_TIMEOUT)
            assert holder.exitcode == (0 if then == "cont" else -signal.SIGKILL)
            _try_write(mine, "mine", errors)
            assert len(errors) == 1
            other_end.send("other")
            assert _recv(other_end) == ("ok", "other")
            other_end.send(None)
            other.join(REPLY_TIMEOUT)
            assert other.exitcode == 0
        finally:
            for proc in (holder, other):
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        missing = {"before", "mine", "other", *held} - set(notes.keys())
        assert missing == (set() if then == "cont" else set(held))
        assert store.integrity_check() == ["ok"]


# -- disk full -------------------------------------------------------------------------------


@pytest.mark.processes
def test_a_write_past_the_file_size_limit_is_disk_full_and_loses_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    [seen] = workers.run_processes(fault_workers.write_past_file_size_limit, [(path, 50)])
    assert seen["error_type"] == "DiskFull", seen.get("error")
    error = seen["error"]
    assert isinstance(error, OSError)
    assert error.path == path
    assert "RLIMIT_FSIZE" in str(error)
    # While the limit held: the earlier commits, nothing of the failed write, a sound file.
    assert seen["count_while_full"] == 50
    assert seen["integrity_while_full"] == ["ok"]
    # Once lifted, the same store wrote again, and a fresh process reads everything.
    assert seen["count_after"] == 51
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        assert set(notes.keys()) == {f"before-{i}" for i in range(50)} | {"after-limit"}
        assert store.integrity_check() == ["ok"]


def _sqlite_error(code: int, name: str) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("disk I/O error")
    exc.sqlite_errorcode = code
    exc.sqlite_errorname = name
    return exc


def _fake_limit(soft: int) -> SimpleNamespace:
    return SimpleNamespace(
        RLIMIT_FSIZE=1,
        RLIM_INFINITY=-1,
        getrlimit=lambda which: (soft, -1),
    )


@pytest.mark.parametrize(
    ("code", "name", "limit", "disk_full"),
    [
        (sqlite3.SQLITE_FULL, "SQLITE_FULL", -1, True),
        (sqlite3.SQLITE_IOERR_WRITE, "SQLITE_IOERR_WRITE", 100_000, True),
        (sqlite3.SQLITE_IOERR_SHMSIZE, "SQLITE_IOERR_SHMSIZE", 100_000, True),
        # Other I/O errors are not a full disk, whatever the limit:
        (sqlite3.SQLITE_IOERR_WRITE, "SQLITE_IOERR_WRITE", -1, False),
        (sqlite3.SQLITE_IOERR_WRITE, "SQLITE_IOERR_WRITE", 1 << 40, False),
        (sqlite3.SQLITE_IOERR_READ, "SQLITE_IOERR_READ", 100_000, False),
        (sqlite3.SQLITE_IOERR_FSYNC, "SQLITE_IOERR_FSYNC", 100_000, False),
    ],
)
def test_only_a_full_disk_or_file_size_limit_is_called_disk_full(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    name: str,
    limit: int,
    disk_full: bool,
) -> None:
    path = str(tmp_path / "state.db")
    Path(path).write_bytes(b"\0" * 90_000)  # within one page write of a 100,000-byte limit
    monkeypatch.setattr(_sqlite, "resource", _fake_limit(limit))
    exc = _sqlite_error(code, name)
    mapped = _sqlite.translate(exc, path)
    if disk_full:
        assert isinstance(mapped, mpstore.DiskFull)
        assert name in str(mapped) and path in str(mapped)
    else:
        assert mapped is exc


# -- a damaged database file -----------------------------------------------------------------

_FILES = ("", "-wal", "-shm", "-journal", ".lock")


def _snapshot(path: str) -> dict[str, str | None]:
    """A hash of each of the database's files (None where absent)."""
    out: dict[str, str | None] = {}
    for suffix in _FILES:
        try:
            out[suffix] = hashlib.sha256(Path(path + suffix).read_bytes()).hexdigest()
        except FileNotFoundError:
            out[suffix] = None
    return out


def _real_database(path: str) -> int:
    """A store holding 300 records, closed (so checkpointed into the main file); its size."""
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert_many(Note(id=f"{i:04}", text="x" * 200) for i in range(300))
    return os.path.getsize(path)


def _overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _garbage(path: str) -> None:
    Path(path).write_bytes(os.urandom(8192))


def _text(path: str) -> None:
    Path(path).write_text("these are somebody's notes, not a database\n")


def _truncated(path: str) -> None:
    os.truncate(path, _real_database(path) // 2)


def _header(path: str) -> None:
    _real_database(path)
    _overwrite(path, 0, os.urandom(100))


def _schema_page(path: str) -> None:
    # Page 1 past its 100-byte header: the b-tree page that holds the schema.
    _real_database(path)
    _overwrite(path, 100, os.urandom(3996))


CORRUPTIONS: dict[str, Callable[[str], None]] = {
    "garbage": _garbage,
    "text": _text,
    "truncated-to-half": _truncated,
    "header-overwritten": _header,
    "schema-page-overwritten": _schema_page,
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_a_damaged_file_is_refused_on_open_and_left_untouched(tmp_path: Path, damage: str) -> None:
    # Open reads the schema (SQLite parses it before the first statement) and mpstore's own
    # tables, so every damage to the header, the schema page or the file's length shows there;
    # nothing is written before that read succeeds.
    path = str(tmp_path / "state.db")
    CORRUPTIONS[damage](path)
    before = _snapshot(path)
    with pytest.raises(mpstore.CorruptDatabase) as info:
        mpstore.Store(path)
    assert path in str(info.value)
    assert info.value.path == path
    assert _snapshot(path) == before


def test_damage_past_the_schema_is_refused_on_first_read_of_it(tmp_path: Path) -> None:
    # A damaged data page is found only when a statement reads that page: opening and the
    # collection's checks succeed; the scan that reaches the page raises, and nothing is written.
    path = str(tmp_path / "state.db")
    size = _real_database(path)
    _overwrite(path, size - 8192, os.urandom(4096))
    before = _snapshot(path)
    with mpstore.Store(path) as store:
        notes = store.collection("notes", Note, key="id")
        with pytest.raises(mpstore.CorruptDatabase):
            list(notes.scan())
    assert _snapshot(path)[""] == before[""]


def test_snapshot_check_notices_a_written_file(tmp_path: Path) -> None:
    # The negative control for the two tests above: an empty file is a valid new database, so
    # the store opens it and writes its schema; the snapshot must see that.
    path = str(tmp_path / "state.db")
    Path(path).write_bytes(b"")
    before = _snapshot(path)
    mpstore.Store(path).close()
    assert _snapshot(path) != before


# -- permission denied -----------------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A directory any user can reach (pytest's tmp_path is private to its owner)."""
    top = tempfile.mkdtemp(prefix="mpstore-perm-")
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        for root, dirs, _ in os.walk(top):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        shutil.rmtree(top)


def _setup_permissions(top: str, case: str) -> str:
    """Build the case's files as their owner; return the database path."""
    d = os.path.join(top, case)
    os.mkdir(d)
    os.chmod(d, 0o777)
    path = os.path.join(d, "state.db")
    if case != "new-db-in-read-only-dir":
        _real_database(path)
        os.chmod(path, 0o666)
        os.chmod(path + ".lock", 0o666)
        os.chmod(path + ".mailbox", 0o666)
    if case == "new-db-in-read-only-dir":
        os.chmod(d, 0o555)
    elif case == "unreadable-db":
        os.chmod(path, 0o000)
    elif case == "read-only-db-in-read-only-dir":
        os.chmod(path, 0o444)
        os.chmod(d, 0o555)
    elif case == "read-only-db":
        os.chmod(path, 0o444)
    elif case == "read-only-lock-file":
        os.chmod(path + ".lock", 0o444)
    elif case == "read-only-mailbox":
        os.chmod(path + ".mailbox", 0o444)
    return path


# case: (action, stage that fails, words in the message). Root ignores permission bits, so
# the child becomes `nobody` before it opens anything; the files stay the test's own.
PERMISSION_CASES = {
    # EACCES creating the file: the directory is not writable.
    "new-db-in-read-only-dir": ("write", "open", "cannot create"),
    # EACCES opening the file at all (SQLITE_CANTOPEN).
    "unreadable-db": ("write", "open", "unable to open"),
    # A readable file whose directory refuses the -shm/-wal files WAL needs (READONLY_DIRECTORY).
    "read-only-db-in-read-only-dir": ("write", "open", "readonly"),
    # Reads work; the write is refused by SQLite (SQLITE_READONLY).
    "read-only-db": ("write", "write", "readonly"),
    # Reads work; the write is refused when the gate's lock file cannot be opened for writing.
    "read-only-lock-file": ("write", "write", "lock file"),
    # Likewise for the mailbox: a writer that cannot keep its rules must not write.
    "read-only-mailbox": ("write", "write", "mailbox"),
    # The control: the same child with every permission granted writes, so the refusals above
    # come from the permission bits and not from the switch of user.
    "writable": ("write", "done", ""),
}


@pytest.mark.processes
def test_permission_denied_is_typed_and_readable(open_dir: str) -> None:
    paths = {case: _setup_permissions(open_dir, case) for case in PERMISSION_CASES}
    before = {case: _snapshot(p)[""] for case, p in paths.items()}
    results = workers.run_processes(
        fault_workers.as_another_user,
        [(action, paths[case]) for case, (action, _, _) in PERMISSION_CASES.items()],
    )
    for (case, (_, stage, words)), (got_stage, error, message) in zip(
        PERMISSION_CASES.items(), results, strict=True
    ):
        if stage == "done":
            assert (got_stage, error) == ("done", ""), (case, message)
            assert _holds_the_write(paths[case]), case
            continue
        assert (got_stage, error) == (stage, "PermissionDenied"), (case, got_stage, message)
        assert words in message and paths[case].split("/")[-1] in message, (case, message)
        assert _snapshot(paths[case])[""] == before[case], case


def _holds_the_write(path: str) -> bool:
    with mpstore.Store(path) as store:
        return store.collection("notes", Note, key="id").get("by-another-user") is not None


def test_a_path_under_a_regular_file_is_directory_not_found(tmp_path: Path) -> None:
    # ENOTDIR: the "directory" is a file.
    plain = tmp_path / "plain"
    plain.write_text("x")
    path = str(plain / "state.db")
    with pytest.raises(mpstore.DirectoryNotFound, match="not a directory") as info:
        mpstore.Store(path)
    assert isinstance(info.value, FileNotFoundError)
    assert (info.value.path, info.value.filename, info.value.errno) == (path, path, errno.ENOTDIR)
    assert plain.read_text() == "x"


@pytest.mark.parametrize(("how", "code"), [("deleted", errno.ENOENT), ("a file", errno.ENOTDIR)])
def test_a_directory_deleted_under_an_open_store_fails_writes_typed(
    tmp_path: Path, how: str, code: int
) -> None:
    # The lock file is opened again when it is gone from its path; with its directory gone too
    # (or a file in its place) that is an error to name, not a bare OSError from deep inside.
    directory = tmp_path / "state"
    directory.mkdir()
    with mpstore.Store(str(directory / "state.db")) as store:
        notes = store.collection("notes", Note, key="id")
        notes.upsert(Note(id="a", text="kept"))
        shutil.rmtree(directory)
        if how == "a file":
            directory.write_text("not a directory")
        for _ in range(2):
            with pytest.raises(mpstore.DirectoryNotFound, match="directory is gone") as info:
                notes.upsert(Note(id="b", text="lost"))
            assert info.value.errno == code
        assert notes.get("a") == Note(id="a", text="kept")  # open connections still read


def test_a_missing_directory_says_enoent_as_an_oserror_would(tmp_path: Path) -> None:
    path = str(tmp_path / "missing" / "state.db")
    with pytest.raises(FileNotFoundError) as info:
        mpstore.Store(path)
    assert isinstance(info.value, mpstore.DirectoryNotFound)
    assert (info.value.errno, info.value.filename) == (errno.ENOENT, path)
    assert not (tmp_path / "missing").exists()
