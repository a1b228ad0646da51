"""mpstore: a SQLite store that many processes can write to at once, safely and fast.

Writers queue on a cross-process gate (a kernel lock on ``<db>.lock``) before they touch a
connection; readers read WAL snapshots concurrently. Records are typed with pydantic.
"""

from ._collection import Collection
from ._connection import Connection
from ._errors import (
    Abandoned,
    BusyTimeout,
    CorruptDatabase,
    DiskFull,
    GateTimeout,
    InvalidKey,
    InvalidName,
    KeyNotFound,
    MpstoreError,
    PermissionDenied,
    PoolTimeout,
    RecordTooLarge,
    RecordTypeError,
    StoreClosed,
    Timeout,
    TransactionError,
)
from ._store import EVENTS, Store

__version__ = "0.1.0"

__all__ = [
    "EVENTS",
    "Abandoned",
    "BusyTimeout",
    "Collection",
    "Connection",
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
    "Store",
    "StoreClosed",
    "Timeout",
    "TransactionError",
    "__version__",
]
