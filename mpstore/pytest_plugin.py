"""pytest fixtures for mpstore: a store per test, and one store shared by every xdist worker.

Installing mpstore registers this module through the ``pytest11`` entry point as the plugin
``mpstore``; ``-p no:mpstore`` turns it off. Beyond the ``mpstore`` package it belongs to, it
imports only pytest and the standard library, so loading it costs what ``import mpstore`` costs.

Fixtures:

- ``mpstore_store``: a new :class:`mpstore.Store` in the test's ``tmp_path``, closed after it.
- ``mpstore_shared_store``: one store per worker process for the whole session, all of them on the
  same file, so the workers of a ``pytest -n`` run write to one database at once. Closed at the
  end of each worker's session.
- ``mpstore_shared_path``: that file, in the run's common temporary directory. pytest makes that
  directory afresh for every run, so runs never see each other's data, and no central clean-up
  is needed (xdist has no teardown shared across workers).
- ``mpstore_worker_id``: ``"gw0"``, ``"gw1"``, ... in an xdist worker, ``"master"`` otherwise.
- ``mpstore_store_kwargs``: keyword arguments for both stores (``{}``); override it in a
  ``conftest.py``, keeping its session scope, to set ``timeout``, ``pool_size``...

The shared file is named by ``--mpstore-shared-name`` or the ``mpstore_shared_name`` ini
option (default ``mpstore-shared.db``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from mpstore import Store

__all__ = [
    "DEFAULT_SHARED_NAME",
    "mpstore_shared_path",
    "mpstore_shared_store",
    "mpstore_store",
    "mpstore_store_kwargs",
    "mpstore_worker_id",
    "shared_directory",
    "shared_name",
]

DEFAULT_SHARED_NAME = "mpstore-shared.db"
_OPTION = "mpstore_shared_name"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mpstore", "mpstore fixtures")
    group.addoption(
        "--mpstore-shared-name",
        dest=_OPTION,
        default=None,
        metavar="NAME",
        help="file name of the store shared by all xdist workers of the run "
        f"(default {DEFAULT_SHARED_NAME}); it lives in the run's common temporary directory",
    )
    parser.addini(
        _OPTION,
        "file name of the store shared by all xdist workers of the run",
        default=DEFAULT_SHARED_NAME,
    )


def pytest_configure(config: pytest.Config) -> None:
    shared_name(config)  # a bad name stops the run before any test starts


def shared_name(config: pytest.Config) -> str:
    """The shared store's file name: the command-line option, else the ini option.

    :raises pytest.UsageError: the name is empty, has a path separator or NUL, or is ``.``/``..``.
    """
    name = config.getoption(_OPTION)
    if name is None:
        name = config.getini(_OPTION)
    if not isinstance(name, str) or not _plain_file_name(name):
        raise pytest.UsageError(
            f"{_OPTION} must be a plain file name such as {DEFAULT_SHARED_NAME!r} (no directory "
            f"part), got {name!r}"
        )
    return name


def _plain_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\x00")


def shared_directory(config: pytest.Config, basetemp: Path) -> Path:
    """The directory that every worker of this run sees as the same one, and no other run sees.

    Without xdist that is the run's ``basetemp``. An xdist worker's ``basetemp`` is a
    subdirectory of the controller's (``<basetemp>/popen-gw0``), which pytest makes afresh for
    every run, so the workers share its parent. A worker is recognised by the ``workerinput``
    that xdist gives its config, not by ``PYTEST_XDIST_WORKER`` alone: a pytest started from
    inside a worker inherits that variable without being a worker.

    :raises pytest.UsageError: an xdist worker without a local ``basetemp`` (a remote gateway):
        its workers share no directory, nor one host, so they cannot share a store.
    """
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return basetemp
    if not config.getoption("basetemp"):
        raise pytest.UsageError(
            f"xdist worker {workerinput.get('workerid')!r} has no local basetemp: a store shared "
            "by all workers needs local (popen) workers on one host, as started by -n"
        )
    return basetemp.parent


@pytest.fixture(scope="session")
def mpstore_worker_id(request: pytest.FixtureRequest) -> str:
    """This process's xdist worker id (``"gw0"``...), or ``"master"`` when not in a worker."""
    workerinput = getattr(request.config, "workerinput", None)
    return "master" if workerinput is None else str(workerinput["workerid"])


@pytest.fixture(scope="session")
def mpstore_store_kwargs() -> dict[str, Any]:
    """Keyword arguments for the fixtures' stores; override it (session scope) to change them."""
    return {}


@pytest.fixture
def mpstore_store(tmp_path: Path, mpstore_store_kwargs: dict[str, Any]) -> Iterator[Store]:
    """A new store in this test's ``tmp_path`` (``mpstore.db``), closed when the test ends."""
    import mpstore

    with mpstore.Store(tmp_path / "mpstore.db", **mpstore_store_kwargs) as store:
        yield store


@pytest.fixture(scope="session")
def mpstore_shared_path(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The file of the store shared by all xdist workers of this run (new for every run)."""
    directory = shared_directory(request.config, tmp_path_factory.getbasetemp())
    return directory / shared_name(request.config)


@pytest.fixture(scope="session")
def mpstore_shared_store(
    mpstore_shared_path: Path, mpstore_store_kwargs: dict[str, Any]
) -> Iterator[Store]:
    """This worker's store on :func:`mpstore_shared_path`, closed when its session ends.

    Every worker opens the same file; mpstore creates the file and its schema safely when
    several processes open it at once, so no worker has to go first.
    """
    import mpstore

    with mpstore.Store(mpstore_shared_path, **mpstore_store_kwargs) as store:
        yield store
