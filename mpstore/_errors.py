"""Every error mpstore raises, in one place.

Each error keeps its message as its only positional argument and its details as attributes, so
the default exception pickling reproduces it exactly: errors cross process boundaries intact.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "Abandoned",
    "BusyTimeout",
    "CollectionNotFound",
    "CorruptDatabase",
    "DiskFull",
    "GateTimeout",
    "InvalidKey",
    "InvalidName",
    "KeyNotFound",
    "MpstoreError",
    "PermissionDenied",
    "PoolTimeout",
    "RecordTooLarge",
    "RecordTypeError",
    "StoreClosed",
    "Timeout",
    "TransactionError",
]


class MpstoreError(Exception):
    """Base class of every error raised by mpstore itself.

    ``path`` names the database (or lock file) the error is about, when there is one.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[object, ...]:
        return (self.__class__, (self.message,), self.__dict__)


class Timeout(MpstoreError, TimeoutError):
    """A wait ran past the configured timeout. ``waited`` is how long the caller waited (s)."""

    def __init__(self, message: str, path: str | None = None, waited: float | None = None) -> None:
        super().__init__(message, path)
        self.waited = waited


class GateTimeout(Timeout):
    """The cross-process write gate was not granted in time.

    ``holder_pid`` is the pid that last took the gate, when the lock file or the mailbox
    records one (and it is not the waiting process itself).
    """

    def __init__(
        self,
        message: str,
        path: str | None = None,
        waited: float | None = None,
        holder_pid: int | None = None,
    ) -> None:
        super().__init__(message, path, waited)
        self.holder_pid = holder_pid


class PoolTimeout(Timeout):
    """No pooled read connection became free in time."""


class BusyTimeout(Timeout):
    """SQLite stayed busy past the timeout: some program writes to the file without the gate."""


class Abandoned(MpstoreError):
    """The caller gave up (e.g. its asyncio task was cancelled) before the database was touched.

    Raised inside the worker thread that carries out an async call, right after it won the gate
    or a pooled connection, which it gives back at once.
    """


class StoreClosed(MpstoreError, RuntimeError):
    """The store (or a connection handed out by it) was used after it was closed."""


class TransactionError(MpstoreError, RuntimeError):
    """A transaction was misused: used outside its block, from another thread, or ended early."""


class CorruptDatabase(MpstoreError):
    """The file is not an SQLite database, or its contents are damaged."""


class OSErrorKind(MpstoreError, OSError):
    """An mpstore error that is also an OSError: ``errno``, ``strerror`` and ``filename`` say
    what the system refused, as handlers of OSError expect; ``str()`` stays mpstore's message.
    """

    default_errno = 0

    def __init__(self, message: str, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message, path)
        self.errno = self.default_errno if errno is None else errno
        self.strerror = os.strerror(self.errno)
        self.filename = path

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (self.__class__, (self.message, self.path, self.errno), self.__dict__)


class DiskFull(OSErrorKind):
    """The write did not fit: the disk (or the process's file size limit) is full."""

    default_errno = errno.ENOSPC


class PermissionDenied(OSErrorKind, PermissionError):
    """The database, its directory or its lock file cannot be opened or written."""

    default_errno = errno.EACCES


class DirectoryNotFound(OSErrorKind, FileNotFoundError):
    """The database's directory does not exist (or a part of its path is not a directory):
    mpstore creates the database file, never the directories above it."""

    default_errno = errno.ENOENT


class InvalidName(MpstoreError, ValueError):
    """A collection, field or index name is not a plain identifier."""


class InvalidKey(MpstoreError, ValueError):
    """A record key is not a non-empty string without NUL characters or lone surrogates, or an
    update changed it."""


class KeyNotFound(MpstoreError, KeyError):
    """``update`` was asked to change a record that does not exist."""

    def __str__(self) -> str:
        return self.message


class CollectionNotFound(MpstoreError, LookupError):
    """A collection's table is gone from the file (dropped after the collection was opened).

    Raised by the call that finds it gone; the collection's next call (outside a read block)
    makes the table anew, as does ``Store.collection()`` once a call has found it gone.
    """


class RecordTooLarge(MpstoreError, ValueError):
    """A record's JSON is larger than the store's ``max_record_bytes``, or nests deeper than
    pydantic reads JSON back."""


class RecordTypeError(MpstoreError, TypeError):
    """A value is not an instance of the collection's model, or would not read back as one
    (a NaN written as null, a subclass's own fields); or a model cannot read back its JSON."""
