"""Every error mpstore exports: its place in the hierarchy, and its trip through pickle and
through a real spawned process with its message and attributes intact."""

from __future__ import annotations

import errno
import gc
import os
import pickle
import sqlite3
import weakref
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

import mpstore
from tests import fault_workers, workers

#: Each exported error and the builtin exception it also is, as its docstring and the README
#: describe it (None: only an MpstoreError).
BUILTIN_BASE: dict[type[mpstore.MpstoreError], type[BaseException] | None] = {
    mpstore.MpstoreError: None,
    mpstore.Timeout: TimeoutError,
    mpstore.GateTimeout: TimeoutError,
    mpstore.PoolTimeout: TimeoutError,
    mpstore.BusyTimeout: TimeoutError,
    mpstore.Abandoned: None,
    mpstore.StoreClosed: RuntimeError,
    mpstore.TransactionError: RuntimeError,
    mpstore.CorruptDatabase: None,
    mpstore.DiskFull: OSError,
    mpstore.DirectoryNotFound: FileNotFoundError,
    mpstore.PermissionDenied: PermissionError,
    mpstore.InvalidName: ValueError,
    mpstore.InvalidKey: ValueError,
    mpstore.KeyNotFound: KeyError,
    mpstore.CollectionNotFound: LookupError,
    mpstore.RecordTooLarge: ValueError,
    mpstore.RecordTypeError: TypeError,
}

EXPORTED = sorted(
    (
        obj
        for name in mpstore.__all__
        if isinstance(obj := getattr(mpstore, name), type) and issubclass(obj, BaseException)
    ),
    key=lambda cls: cls.__name__,
)


def _args(cls: type[mpstore.MpstoreError]) -> tuple[Any, ...]:
    """Constructor arguments that set every attribute the class has."""
    if issubclass(cls, mpstore.GateTimeout):
        return ("waited 1.500 s for the gate (last holder: pid 4242)", "/db.lock", 1.5, 4242)
    if issubclass(cls, mpstore.Timeout):
        return (f"{cls.__name__}: waited 2.000 s", "/db", 2.0)
    if issubclass(cls, OSError):
        return (f"{cls.__name__}: something about /db", "/db", errno.EROFS)  # not the default
    return (f"{cls.__name__}: something about /db", "/db")


def _attributes(err: BaseException) -> dict[str, Any]:
    return {
        "type": type(err),
        "str": str(err),
        "args": err.args,
        "message": getattr(err, "message", None),
        "os": (err.errno, err.strerror, err.filename) if isinstance(err, OSError) else None,
        **vars(err),
    }


def test_the_table_covers_every_exported_error() -> None:
    assert set(EXPORTED) == set(BUILTIN_BASE)


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: c.__name__)
def test_each_error_is_an_mpstore_error_and_its_builtin(cls: type[mpstore.MpstoreError]) -> None:
    err = cls(*_args(cls))
    assert isinstance(err, mpstore.MpstoreError)
    base = BUILTIN_BASE[cls]
    if base is not None:
        assert isinstance(err, base)
        with pytest.raises(base):
            raise err


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_each_error_round_trips_through_pickle(
    cls: type[mpstore.MpstoreError], protocol: int
) -> None:
    err = cls(*_args(cls))
    copy = pickle.loads(pickle.dumps(err, protocol=protocol))
    assert _attributes(copy) == _attributes(err)
    assert err.message in str(copy)
    assert copy.path is not None


def test_attributes_survive_pickle_with_their_values() -> None:
    err = mpstore.GateTimeout("waited", "/db.lock", 1.5, 4242)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.waited, copy.holder_pid) == ("/db.lock", 1.5, 4242)


def test_key_not_found_reads_as_its_message() -> None:
    # KeyError's own str() is the repr of its argument; mpstore's reads as a sentence.
    err = pickle.loads(pickle.dumps(mpstore.KeyNotFound("no record 'a' in 'notes'", "/db")))
    assert str(err) == "no record 'a' in 'notes'"


@pytest.mark.parametrize(
    ("cls", "default"),
    [
        (mpstore.DiskFull, errno.ENOSPC),
        (mpstore.PermissionDenied, errno.EACCES),
        (mpstore.DirectoryNotFound, errno.ENOENT),
    ],
)
def test_errors_that_are_oserrors_say_what_the_system_refused(
    cls: type[mpstore.MpstoreError], default: int
) -> None:
    # A handler written for OSError tests errno and filename; str() stays the message.
    err = cls("cannot create /x/db: its directory does not exist", "/x/db")
    assert isinstance(err, OSError)
    assert (err.errno, err.strerror, err.filename) == (default, os.strerror(default), "/x/db")
    assert str(err) == "cannot create /x/db: its directory does not exist"


@pytest.mark.parametrize("cls", [mpstore.GateTimeout, mpstore.PermissionDenied])
def test_the_comparison_notices_a_lost_attribute(cls: type[mpstore.MpstoreError]) -> None:
    # Negative control: an error whose pickling drops its details must fail the comparison.
    class Forgetful(cls):  # type: ignore[valid-type,misc]
        def __reduce__(self) -> tuple[object, ...]:
            return (cls, (self.message,))

    err = Forgetful(*_args(cls))
    assert _attributes(pickle.loads(pickle.dumps(err))) != _attributes(err)


@pytest.mark.processes
def test_each_error_raised_in_a_spawn_child_is_raised_again_here() -> None:
    # A process pool pickles what the child raised and raises it again in the parent: the same
    # path multiprocessing users take.
    with ProcessPoolExecutor(max_workers=1, mp_context=workers.SPAWN) as pool:
        futures = {
            cls: pool.submit(fault_workers.raise_error, cls.__name__, _args(cls))
            for cls in EXPORTED
        }
        for cls, future in futures.items():
            with pytest.raises(cls) as info:
                future.result(timeout=120)
            err = info.value
            assert type(err) is cls
            expected = _attributes(cls(*_args(cls)))
            assert _attributes(err) == expected


@pytest.mark.parametrize("through", ["write", "read"])
def test_an_untranslated_sqlite_error_leaves_no_reference_cycle(
    store: mpstore.Store, through: str
) -> None:
    """SQLite's own errors that mpstore does not type are re-raised as they are: no frame of
    mpstore's own keeps the error, and with it the caller's locals, alive until the garbage
    collector runs."""

    class Local:
        pass

    def failing() -> weakref.ref[Local]:
        local = Local()
        with pytest.raises(sqlite3.OperationalError):
            block = store.write() if through == "write" else store.read()
            with block as conn:
                conn.execute("SELECT * FROM no_such_table")
        return weakref.ref(local)

    gc.disable()
    try:
        ref = failing()
        assert ref() is None
    finally:
        gc.enable()


def test_a_conflict_inside_one_connection_is_no_timeout(store: mpstore.Store) -> None:
    # SQLITE_LOCKED: dropping a table a running statement reads. No wait would end it, and no
    # other program is to blame, as BusyTimeout says; a caller retrying on Timeout would
    # retry for ever.
    with store.write() as conn:
        conn.execute("CREATE TABLE t (a)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(5)])
    with pytest.raises(mpstore.TransactionError) as raised, store.write() as conn:
        cursor = conn.execute("SELECT a FROM t")
        assert cursor.fetchone() == (0,)
        conn.execute("DROP TABLE t")
    assert not isinstance(raised.value, mpstore.Timeout)
    assert store.query("SELECT count(*) FROM t") == [(5,)]
