"""mpstore: a SQLite store that many processes can write to at once, safely and fast.

Writers queue on a cross-process gate (a kernel lock on ``<db>.lock``) before they touch a
connection; readers read WAL snapshots concurrently. Records are typed with pydantic.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from ._async import (
        AsyncCollection,
        AsyncConnection,
        AsyncConversationRepository,
        AsyncStore,
    )

__version__ = "0.1.0"

# The asyncio API is imported on first use, so that `import mpstore` does not import asyncio.
_ASYNC_NAMES = ("AsyncCollection", "AsyncConnection", "AsyncConversationRepository", "AsyncStore")


def __getattr__(name: str) -> Any:
    if name in _ASYNC_NAMES:
        from . import _async

        return getattr(_async, name)
    raise AttributeError(f"module 'mpstore' has no attribute {name!r}")


__all__ = [
    "EVENTS",
    "Abandoned",
    "AsyncCollection",
    "AsyncConnection",
    "AsyncConversationRepository",
    "AsyncStore",
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
