"""The pytest plugin: its fixtures, options and clean-up, and one store shared by xdist workers.

Each test runs a small inner test suite with ``pytester``: in this process when it needs no
xdist, in a subprocess under ``-n 2`` when it does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import mpstore
from mpstore import pytest_plugin
from tests.test_xdist_shared import TALLY, WRITES, entries, tallies

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
INNER_TIMEOUT = 180.0

PLAIN_SUITE = """
from pathlib import Path

import mpstore


def test_store_in_tmp_path(mpstore_store, tmp_path):
    assert isinstance(mpstore_store, mpstore.Store)
    assert Path(mpstore_store.path) == tmp_path / "mpstore.db"
    assert mpstore_store.collections() == {}
    with mpstore_store.write() as conn:
        conn.execute("CREATE TABLE t (x)")


def test_shared_store_in_basetemp(
    mpstore_shared_store, mpstore_shared_path, mpstore_worker_id, tmp_path_factory
):
    assert mpstore_worker_id == "master"
    assert mpstore_shared_path == tmp_path_factory.getbasetemp() / "mpstore-shared.db"
    assert Path(mpstore_shared_store.path) == mpstore_shared_path
    assert mpstore_shared_store.created_schema
"""


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ([], {}),
        (["-n", "0"], {}),
        (["-p", "no:xdist"], {}),
        # A pytest started from inside an xdist worker inherits this; it is not a worker.
        ([], {"PYTEST_XDIST_WORKER": "gw7", "PYTEST_XDIST_WORKER_COUNT": "8"}),
    ],
    ids=["plain", "n0", "no-xdist", "inherited-worker-env"],
)
def test_fixtures_without_xdist(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(PLAIN_SUITE)
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=2)


def test_no_mpstore_removes_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_uses_it(mpstore_store):\n    assert mpstore_store\n")
    pytester.runpytest().assert_outcomes(passed=1)
    result = pytester.runpytest("-p", "no:mpstore")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'mpstore_store' not found*"])


CLOSING_CONFTEST = """
import json

import pytest

SEEN = {}


@pytest.fixture
def seen():
    return SEEN


def pytest_unconfigure(config):
    closed = {name: store.closed for name, store in SEEN.items()}
    (config.rootpath / "closed.json").write_text(json.dumps(closed))
"""

CLOSING_SUITE = """
import mpstore


def test_a(mpstore_store, mpstore_shared_store, seen):
    seen["per-test"] = mpstore_store
    seen["shared"] = mpstore_shared_store
    # Opened and never closed: shows that the report can tell an open store.
    seen["left-open"] = mpstore.Store(mpstore_store.path + ".left-open")


def test_b(mpstore_shared_store, seen):
    assert seen["per-test"].closed
    assert mpstore_shared_store is seen["shared"] and not mpstore_shared_store.closed
"""


def test_fixtures_close_their_stores(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CLOSING_CONFTEST)
    pytester.makepyfile(CLOSING_SUITE)
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=2)
    closed = json.loads((pytester.path / "closed.json").read_text())
    assert closed == {"per-test": True, "shared": True, "left-open": False}


def test_store_kwargs_fixture_sets_both_stores(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
import pytest


@pytest.fixture(scope="session")
def mpstore_store_kwargs():
    return {"pool_size": 2, "timeout": 7.5}
"""
    )
    pytester.makepyfile(
        """
def test_settings(mpstore_store, mpstore_shared_store):
    for store in (mpstore_store, mpstore_shared_store):
        assert (store.pool_size, store.timeout) == (2, 7.5)
"""
    )
    pytester.runpytest().assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("ini", "args", "expected"),
    [
        (None, [], "mpstore-shared.db"),
        ("from-ini.db", [], "from-ini.db"),
        (None, ["--mpstore-shared-name", "from-cli.db"], "from-cli.db"),
        ("from-ini.db", ["--mpstore-shared-name=from-cli.db"], "from-cli.db"),
    ],
)
def test_shared_file_name_options(
    pytester: pytest.Pytester, ini: str | None, args: list[str], expected: str
) -> None:
    if ini is not None:
        pytester.makeini(f"[pytest]\nmpstore_shared_name = {ini}\n")
    pytester.makepyfile(
        f"""
def test_name(mpstore_shared_store, mpstore_shared_path, tmp_path_factory):
    assert mpstore_shared_path == tmp_path_factory.getbasetemp() / {expected!r}
    assert mpstore_shared_path.is_file()
"""
    )
    pytester.runpytest(*args).assert_outcomes(passed=1)


@pytest.mark.parametrize("name", ["../escape.db", "sub/x.db", "..", ".", "", "a\\b.db"])
@pytest.mark.parametrize("where", ["cli", "ini"])
def test_bad_shared_file_name_stops_the_run(
    pytester: pytest.Pytester, name: str, where: str
) -> None:
    args = [f"--mpstore-shared-name={name}"] if where == "cli" else []
    if where == "ini":
        pytester.makeini(f"[pytest]\nmpstore_shared_name = {name}\n")
    pytester.makepyfile("def test_never_runs(mpstore_shared_store):\n    raise AssertionError\n")
    before = _files(pytester.path.parent)
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*mpstore_shared_name must be a plain file name*"])
    assert _files(pytester.path.parent) == before


def _files(directory: Path) -> set[Path]:
    """Every path in ``directory`` (a pytester test's parent) and below its pytester folders."""
    return {*directory.iterdir(), *directory.glob("*test_bad_shared_file_name*/**/*")}


def test_remote_worker_has_no_shared_directory(tmp_path: Path) -> None:
    def config(basetemp: str | None) -> Any:
        return SimpleNamespace(
            workerinput={"workerid": "gw3"}, getoption=lambda name: {"basetemp": basetemp}[name]
        )

    local = tmp_path / "popen-gw3"
    assert pytest_plugin.shared_directory(config(str(local)), local) == tmp_path
    with pytest.raises(pytest.UsageError, match="'gw3' has no local basetemp"):
        pytest_plugin.shared_directory(config(None), local)


# -- one store per run ----------------------------------------------------------------------------

FRESH_SUITE = """
from pydantic import BaseModel


class Mark(BaseModel):
    id: str


def test_starts_empty(mpstore_shared_store):
    marks = mpstore_shared_store.collection("marks", Mark, key="id")
    assert marks.count() == 0, "the shared store holds another run's data"
    marks.upsert(Mark(id="here"))
"""

# The design this plugin avoids: take the basetemp's parent without being an xdist worker.
PARENT_CONFTEST = """
import pytest


@pytest.fixture(scope="session")
def mpstore_shared_path(tmp_path_factory):
    return tmp_path_factory.getbasetemp().parent / "mpstore-shared.db"
"""


@pytest.mark.parametrize("broken", [False, True], ids=["plugin", "basetemp-parent"])
def test_every_run_gets_a_new_shared_store(pytester: pytest.Pytester, broken: bool) -> None:
    if broken:
        pytester.makeconftest(PARENT_CONFTEST)
    pytester.makepyfile(FRESH_SUITE)
    pytester.runpytest().assert_outcomes(passed=1)
    second = pytester.runpytest()
    if broken:
        second.assert_outcomes(failed=1)
        second.stdout.fnmatch_lines(["*the shared store holds another run's data*"])
    else:
        second.assert_outcomes(passed=1)


# -- light to import ----------------------------------------------------------------------------


def _new_modules(prelude: str, module: str, path: Path | None = None) -> set[str]:
    """The modules that importing ``module`` adds in a fresh interpreter after ``prelude``."""
    script = (
        f"import json, sys\n{prelude}\nbefore = set(sys.modules)\nimport {module}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    )
    return set(json.loads(out.stdout))


def test_import_mpstore_does_not_import_pytest() -> None:
    assert not {"pytest", "_pytest"} & _new_modules("", "mpstore")
    # The same check on the plugin module does see pytest.
    assert {"pytest", "_pytest"} <= _new_modules("", "mpstore.pytest_plugin")


def test_plugin_imports_nothing_beyond_pytest_and_mpstore(tmp_path: Path) -> None:
    prelude = "import pytest, mpstore"
    assert _new_modules(prelude, "mpstore.pytest_plugin") == {"mpstore.pytest_plugin"}
    # The same check notices a plugin module that imports one more module.
    (tmp_path / "heavier_plugin.py").write_text("import pytest\nimport wave\n")
    assert _new_modules(prelude, "heavier_plugin", tmp_path) >= {"heavier_plugin", "wave"}


# -- one store for all xdist workers --------------------------------------------------------------

XDIST_CONFTEST = """
import json
import os

import pytest

from tests.test_xdist_shared import Rendezvous


@pytest.fixture(scope="session")
def rendezvous(request, mpstore_worker_id):
    parties = request.config.workerinput["workercount"]
    return Rendezvous(request.config.rootpath / "rendezvous", mpstore_worker_id, parties)


@pytest.fixture(scope="session")
def settled(request, mpstore_worker_id):
    parties = request.config.workerinput["workercount"]
    return Rendezvous(request.config.rootpath / "settled", mpstore_worker_id, parties)


@pytest.fixture(scope="session", autouse=True)
def report(request, mpstore_shared_store, mpstore_worker_id):
    reports = request.config.rootpath / "reports"
    reports.mkdir(exist_ok=True)
    store = mpstore_shared_store
    report = {"path": store.path, "created": store.created_schema}
    (reports / f"{mpstore_worker_id}.json").write_text(json.dumps(report))
"""

XDIST_SUITE = """
import pytest

from tests.test_xdist_shared import GetThenUpsert, contend

CASES = 8


@pytest.mark.parametrize("case", range(CASES))
def test_contend(mpstore_shared_store, mpstore_worker_id, rendezvous, settled, case):
    if {racy}:
        increment = GetThenUpsert(rendezvous, settled)
        contend(mpstore_shared_store, mpstore_worker_id, f"case-{{case}}", increment=increment)
    else:
        contend(mpstore_shared_store, mpstore_worker_id, f"case-{{case}}", start=rendezvous)
"""
XDIST_CASES = 8


def _run_under_xdist(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, racy: bool
) -> tuple[pytest.RunResult, Path]:
    """Run the contention cases in an inner ``pytest -n 2``; return its result and basetemp."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest(XDIST_CONFTEST)
    pytester.makepyfile(XDIST_SUITE.format(racy=racy))
    basetemp = pytester.path / "basetemp"
    result = pytester.runpytest_subprocess(
        "-n", "2", f"--basetemp={basetemp}", "-p", "no:cacheprovider", timeout=INNER_TIMEOUT
    )
    return result, basetemp


@pytest.mark.processes
def test_xdist_workers_share_one_store(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, basetemp = _run_under_xdist(pytester, monkeypatch, racy=False)
    result.assert_outcomes(passed=XDIST_CASES)
    reports = {
        p.stem: json.loads(p.read_text()) for p in sorted((pytester.path / "reports").iterdir())
    }
    assert set(reports) == {"gw0", "gw1"}
    shared = basetemp / "mpstore-shared.db"
    assert {r["path"] for r in reports.values()} == {str(shared)}
    assert sorted(r["created"] for r in reports.values()) == [False, True]
    with mpstore.Store(shared) as store:
        written = list(entries(store).scan())
        tally = tallies(store).get(TALLY)
        assert store.integrity_check() == ["ok"]
    assert len(written) == XDIST_CASES * WRITES
    assert {e.worker for e in written} == {"gw0", "gw1"}
    assert tally is not None
    assert tally.total == XDIST_CASES * WRITES
    assert tally.counts == {f"case-{c}": WRITES for c in range(XDIST_CASES)}


@pytest.mark.processes
def test_get_then_upsert_loses_updates_under_xdist(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The negative control: the same cases with an increment that is not atomic.
    result, basetemp = _run_under_xdist(pytester, monkeypatch, racy=True)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 1, result.stdout.str()
    assert outcomes.get("failed", 0) + outcomes.get("passed", 0) == XDIST_CASES
    result.stdout.fnmatch_lines(["*lost update: case-*"])
    result.stdout.no_fnmatch_line("*rendezvous:*")
    result.stdout.no_fnmatch_line("*saw a lock error*")
    with mpstore.Store(basetemp / "mpstore-shared.db") as store:
        assert entries(store).count() == XDIST_CASES * WRITES
        tally = tallies(store).get(TALLY)
    assert tally is not None
    assert tally.total < XDIST_CASES * WRITES
