"""mpstore: a SQLite store that many processes can write to at once, safely and fast.

Writers queue on a cross-process gate (a kernel lock on ``<db>.lock``) before they touch a
connection; readers read WAL snapshots concurrently. Records are typed with pydantic.
"""

from typing import TYPE_CHECKING, Any

from ._errors import (
    Abandoned,
    BusyTimeout,
    CollectionNotFound,
    CorruptDatabase,
    DirectoryNotFound,
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

if TYPE_CHECKING:
    from ._async import (
        AsyncCollection,
        AsyncConnection,
        AsyncConversationRepository,
        AsyncStore,
    )
    from ._collection import Collection
    from ._connection import Connection
    from ._store import EVENTS, Store

__version__ = "0.1.0"

# Everything but the errors is imported on first use, so that `import mpstore` (which loading
# the pytest plugin does in every test run) imports neither pydantic nor asyncio.
_LAZY = {
    "AsyncCollection": "_async",
    "AsyncConnection": "_async",
    "AsyncConversationRepository": "_async",
    "AsyncStore": "_async",
    "Collection": "_collection",
    "Connection": "_connection",
    "EVENTS": "_store",
    "Store": "_store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mpstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "EVENTS",
    "Abandoned",
    "AsyncCollection",
    "AsyncConnection",
    "AsyncConversationRepository",
    "AsyncStore",
    "BusyTimeout",
    "Collection",
    "CollectionNotFound",
    "Connection",
    "CorruptDatabase",
    "DirectoryNotFound",
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
