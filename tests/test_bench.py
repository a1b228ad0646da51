"""``mpstore bench``: its summary maths, argument parsing, and tiny real runs."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import sys
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import mpstore
from mpstore import _bench
from mpstore._bench import RunResult, WorkerResult, measure, percentile, ratio, summarize
from mpstore._cli import bench_config, build_parser, main
from mpstore.conversations import ConversationRepository, Message


def _run(strategy: str, mode: str, throughput: float, **fields: Any) -> RunResult:
    values: dict[str, Any] = {
        "scenario": "upsert",
        "mode": mode,
        "strategy": strategy,
        "workers": 4,
        "writes": 10,
        "repetition": 0,
        "elapsed_s": 40 / throughput,
        "attempted": 40,
        "throughput": throughput,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "max_ms": 3.0,
        "errors": {},
        "expected": 40,
        "present": 40,
        "lost": 0,
    }
    values.update(fields)
    return RunResult(**values)


# -- percentile and ratio -----------------------------------------------------------------------


def test_percentile_of_nothing_is_zero() -> None:
    assert percentile([], 99) == 0.0


def test_percentile_interpolates_linearly_between_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 25) == 2.0
    assert percentile([10.0, 20.0], 50) == 15.0
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_percentile_of_one_sample_is_that_sample() -> None:
    assert percentile([7.5], 1) == 7.5
    assert percentile([7.5], 99) == 7.5


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_q_out_of_range(q: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0], q)


def test_ratio() -> None:
    assert ratio(50.0, 200.0) == 0.25
    assert ratio(50.0, None) is None
    assert ratio(50.0, 0.0) is None


# -- summarize ----------------------------------------------------------------------------------


def test_summarize_reports_medians_and_the_same_cells_ceiling_ratio() -> None:
    runs = [
        _run("ceiling", "single", 1000.0),
        _run("ceiling", "single", 3000.0),
        _run("ceiling", "single", 2000.0),
        _run("mpstore", "processes", 500.0, p99_ms=9.0),
        _run("mpstore", "processes", 100.0, p99_ms=1.0),
        _run("mpstore", "processes", 1500.0, p99_ms=5.0),
        _run("mpstore", "threads", 1000.0),
        # another cell's ceiling must not be used for the 4x10 rows
        _run("ceiling", "single", 10.0, workers=16),
    ]
    rows = {(s.strategy, s.mode, s.workers): s for s in summarize(runs)}
    ceiling = rows[("ceiling", "single", 4)]
    assert ceiling.throughput == 2000.0
    assert ceiling.x_ceiling == 1.0
    assert ceiling.repetitions == 3
    procs = rows[("mpstore", "processes", 4)]
    assert procs.throughput == 500.0
    assert procs.p99_ms == 5.0
    assert procs.x_ceiling == 0.25
    assert rows[("mpstore", "threads", 4)].x_ceiling == 0.5
    assert rows[("ceiling", "single", 16)].x_ceiling == 1.0


def test_summarize_without_a_ceiling_has_no_ratio() -> None:
    (row,) = summarize([_run("ungated", "threads", 100.0)])
    assert row.x_ceiling is None


def test_summarize_takes_median_errors_and_losses_per_kind() -> None:
    runs = [
        _run("ungated", "processes", 100.0, errors={"OperationalError": 4}, lost=2),
        _run("ungated", "processes", 100.0, errors={}, lost=0),
        _run("ungated", "processes", 100.0, errors={"OperationalError": 6, "KeyError": 1}, lost=5),
    ]
    (row,) = summarize(runs)
    assert row.errors == {"KeyError": 0, "OperationalError": 4}
    assert row.lost == 2


def test_summarize_orders_ceilings_first_then_modes() -> None:
    runs = [
        _run("mpstore", "threads", 1.0),
        _run("ungated", "processes", 1.0),
        _run("mpstore", "processes", 1.0),
        _run("ceiling", "single", 1.0),
    ]
    assert [(s.strategy, s.mode) for s in summarize(runs)] == [
        ("ceiling", "single"),
        ("mpstore", "processes"),
        ("ungated", "processes"),
        ("mpstore", "threads"),
    ]


# -- measure ------------------------------------------------------------------------------------


def _worker(start: float, finish: float, samples: list[float], **fields: Any) -> WorkerResult:
    return WorkerResult(
        worker=0, role="writer", started=start, finished=finish, samples=samples, **fields
    )


def _measure(
    results: list[WorkerResult],
    before: dict[str, int],
    after: dict[str, int],
    scenario: str = "upsert",
) -> RunResult:
    return measure(
        results,
        strategy="ungated",
        mode="processes",
        scenario=scenario,
        workers=2,
        writes=2,
        repetition=0,
        before=before,
        after=after,
    )


class _Recording:
    """A strategy and barriers that note, in order, what a worker did."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def write(self, conversation: Any) -> None:
        self.events.append(f"write {conversation.conversation_id}")

    def read(self, workspace_id: int) -> int:
        self.events.append("read")
        return 0

    def wait(self, timeout: float | None = None) -> int:
        self.events.append("barrier")
        return 1


@pytest.mark.parametrize("scenario", ["upsert", "mixed"])
def test_a_worker_warms_up_before_the_start_barrier(scenario: str) -> None:
    """Its first call (connections opened, code run for the first time) is set-up: made before
    the clock starts, on a record seeded beforehand, and not among the timed samples."""
    rec = _Recording()
    job = _bench.Job("mpstore", "unused.db", scenario, worker=3, writes=2, context_bytes=100)
    result = _bench.run_worker(job, rec, rec, rec, stop=_NeverStop())  # type: ignore[arg-type]
    assert rec.events[:2] == ["write warmup-003", "barrier"]
    assert rec.events[2:] == ["write w003-00000", "write w003-00001", "barrier"]
    assert len(result.samples) == 2
    seeded = [c.conversation_id for c in _bench._seed(scenario, 100, workers=4)]
    assert "warmup-003" in seeded


def test_mpstore_opens_its_write_connection_with_the_strategy(tmp_path: Path) -> None:
    # As the other strategies open theirs: the warm-up write may be carried by another
    # process, and the connection would then open inside the timed window.
    path = str(tmp_path / "open.db")
    _bench.MpstoreStrategy.create(path, [])
    strategy = _bench.MpstoreStrategy()
    strategy.open(path)
    try:
        assert strategy._store._wconn is not None
    finally:
        strategy.close()


@pytest.mark.parametrize("name", ["mpstore", "ungated", "filelock", "ceiling"])
def test_modify_does_the_same_work_in_every_strategy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # Each appends the message and sets updated_at once, through the bench's own clock:
    # mpstore's repository does not touch the result again.
    now = datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    monkeypatch.setattr(_bench, "utcnow", lambda: now)
    path = str(tmp_path / f"{name}.db")
    strategy = _bench.make_strategy(name)
    seeded = _bench._seed("modify", 100, workers=1)
    _bench._CLASSES[name].create(path, seeded)
    strategy.open(path)
    try:
        strategy.modify(_bench.shared_id(0), Message(role="user", content="one more"))
    finally:
        strategy.close()
    before = next(c for c in seeded if c.conversation_id == _bench.shared_id(0))
    if name == "mpstore":
        with mpstore.Store(path) as store:
            after = ConversationRepository(store).get_conversation(_bench.shared_id(0))
    else:
        with closing(sqlite3.connect(path)) as conn:
            row = conn.execute(_bench._PLAIN_GET, (_bench.shared_id(0),)).fetchone()
        after = _bench.plain_conversation(row)
    assert after is not None and after.context is not None and before.context is not None
    assert after.context.messages == [
        *before.context.messages,
        Message(role="user", content="one more"),
    ]
    assert after.updated_at == now


def test_mpstore_closes_its_store_when_opening_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker closes a strategy only once open() has returned.
    from mpstore import _store

    path = str(tmp_path / "open.db")
    _bench.MpstoreStrategy.create(path, [])

    def refused(self: Any) -> Any:
        raise RuntimeError("the gate was not granted")

    monkeypatch.setattr(_store.Store, "write", refused)
    strategy = _bench.MpstoreStrategy()
    with pytest.raises(RuntimeError):
        strategy.open(path)
    assert strategy._store.closed


def test_a_reader_reads_once_before_the_start_barrier() -> None:
    rec = _Recording()
    job = _bench.Job("mpstore", "unused.db", "mixed", worker=1, writes=0, context_bytes=100)
    job = dataclasses.replace(job, role="reader", duration=1e-9)
    result = _bench.run_worker(job, rec, rec, rec, stop=_NeverStop())  # type: ignore[arg-type]
    assert rec.events[:2] == ["read", "barrier"]
    assert result.reads == len(rec.events) - 2


class _NeverStop:
    def set(self) -> None:
        pass

    def is_set(self) -> bool:
        return False


def test_measure_times_from_first_start_to_last_finish() -> None:
    results = [_worker(10.0, 10.5, [0.001, 0.002]), _worker(10.1, 11.0, [0.003, 0.004])]
    run = _measure(results, {}, {"a": 0, "b": 0, "c": 0, "d": 0})
    assert run.elapsed_s == pytest.approx(1.0)
    assert run.throughput == pytest.approx(4.0)
    assert run.max_ms == pytest.approx(4.0)
    assert run.p50_ms == pytest.approx(2.5)
    assert run.lost == 0


def test_measure_counts_rows_missing_after_successful_writes_as_lost() -> None:
    results = [_worker(0.0, 1.0, [0.1, 0.1]), _worker(0.0, 1.0, [0.1, 0.1], errors={"X": 1})]
    run = _measure(results, {"seed": 0}, {"seed": 0, "a": 0, "b": 0})
    assert run.errors == {"X": 1}
    assert run.throughput == pytest.approx(3.0)
    assert run.expected == 3
    assert run.present == 2
    assert run.lost == 1


def test_measure_counts_messages_for_modify() -> None:
    results = [_worker(0.0, 1.0, [0.1, 0.1]), _worker(0.0, 1.0, [0.1, 0.1])]
    run = _measure(results, {"s0": 5, "s1": 5}, {"s0": 6, "s1": 7}, scenario="modify")
    assert run.present == 3
    assert run.lost == 1


def test_measure_reports_read_throughput() -> None:
    results = [
        _worker(0.0, 1.0, [0.1]),
        WorkerResult(worker=0, role="reader", started=0.0, finished=2.0, reads=50),
    ]
    run = _measure(results, {}, {"a": 0})
    assert run.readers == 1
    assert run.reads == 50
    assert run.read_throughput == 25.0
    assert run.attempted == 1


def test_measure_reports_the_writers_cpu() -> None:
    results = [
        _worker(0.0, 2.0, [0.1, 0.1], cpu_s=0.5),
        _worker(0.0, 1.0, [0.1, 0.1], cpu_s=0.3),
        # A reader's CPU is not the writers'.
        WorkerResult(worker=0, role="reader", started=0.0, finished=2.0, reads=5, cpu_s=9.0),
    ]
    run = _measure(results, {}, {"a": 0, "b": 0, "c": 0, "d": 0})
    assert run.writer_cpus == pytest.approx(0.4)  # 0.8 CPU seconds over 2 s
    assert run.cpu_us_per_write == pytest.approx(200_000)  # 0.8 s over 4 writes


def test_measure_has_no_cpu_figure_when_a_writer_shares_its_process() -> None:
    results = [_worker(0.0, 1.0, [0.1], cpu_s=0.5), _worker(0.0, 1.0, [0.1])]
    run = _measure(results, {}, {"a": 0, "b": 0})
    assert (run.writer_cpus, run.cpu_us_per_write) == (None, None)


def test_summarize_takes_the_median_cpu_or_none() -> None:
    measured = [_run("mpstore", "processes", 100.0, cpu_us_per_write=c) for c in (5.0, 9.0, 7.0)]
    (summary,) = summarize(measured)
    assert summary.cpu_us_per_write == 7.0
    mixed = [*measured, _run("mpstore", "processes", 100.0)]
    (summary,) = summarize(mixed)
    assert summary.cpu_us_per_write is None


# -- arguments ----------------------------------------------------------------------------------


def _config(*argv: str) -> _bench.BenchConfig:
    config = bench_config(build_parser().parse_args(["bench", *argv]))
    assert isinstance(config, _bench.BenchConfig)
    return config


def test_default_arguments() -> None:
    config = _config()
    assert config.cells == [(4, 10), (8, 10), (16, 10), (16, 100)]
    assert config.modes == ["processes", "threads"]
    assert config.strategies == [
        "mpstore",
        "ungated",
        "filelock",
        "ceiling",
        "ceiling-batched",
        "handoff",
    ]
    assert config.scenarios == ["upsert"]
    assert config.repeat == 3
    assert config.context_bytes == 2048


def test_workers_and_writes_lists_make_one_cell_each() -> None:
    assert _config("--workers", "2", "5", "--writes", "3").cells == [(2, 3), (5, 3)]
    assert _config("--workers", "2", "--writes", "3", "7").cells == [(2, 3), (2, 7)]
    assert _config("--writes", "100").cells == [(4, 100), (8, 100), (16, 100)]


def test_quick_is_small_and_explicit_repeat_wins() -> None:
    quick = _config("--quick")
    assert quick.repeat == 1
    assert quick.cells == list(_bench.QUICK_CELLS)
    assert _config("--quick", "--repeat", "2").repeat == 2


def test_choices() -> None:
    config = _config(
        "--mode", "threads", "--strategy", "mpstore", "ceiling", "--scenario", "modify", "mixed"
    )
    assert config.modes == ["threads"]
    assert config.strategies == ["mpstore", "ceiling"]
    assert config.scenarios == ["modify", "mixed"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--repeat", "0"],
        ["--workers", "-1"],
        ["--mode", "asyncio"],
        ["--writes", "x"],
        ["--strategy", "nope"],
    ],
)
def test_bad_arguments_exit(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", *argv])


def test_plot_without_matplotlib_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["bench", "--workers", "1", "--writes", "1", "--plot", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "matplotlib" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


# -- tiny real runs -----------------------------------------------------------------------------


def _bench_json(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    assert (
        main(
            ["bench", "--workers", "2", "--writes", "3", "--repeat", "1", "--json", str(out), *argv]
        )
        == 0
    )
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def _mpstore_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in document["runs"] if r["strategy"] == "mpstore"]


@pytest.mark.processes
def test_tiny_run_writes_every_row_and_a_complete_json(tmp_path: Path) -> None:
    document = _bench_json(tmp_path, "--mode", "processes")
    assert set(document) == {"machine", "config", "wall_time_s", "runs", "summary"}
    machine = document["machine"]
    for key in (
        "cpu_count",
        "python",
        "sqlite",
        "platform",
        "filelock",
        "pydantic",
        "pydantic_core",
    ):
        assert machine[key]
    strategies = {(r["strategy"], r["mode"]) for r in document["runs"]}
    assert strategies == {
        ("mpstore", "processes"),
        ("ungated", "processes"),
        ("filelock", "processes"),
        ("handoff", "processes"),
        ("ceiling", "single"),
        ("ceiling-batched", "single"),
    }
    for run in document["runs"]:
        assert run["attempted"] == 6
        assert run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
    for run in document["runs"]:
        # Each writer has a process of its own (or, for the ceilings, the whole process).
        assert run["cpu_us_per_write"] > 0
        assert run["writer_cpus"] > 0
    (mp_run,) = _mpstore_rows(document)
    assert mp_run["errors"] == {}
    assert mp_run["lost"] == 0
    assert mp_run["present"] == 6
    summary = {(s["strategy"], s["mode"]): s for s in document["summary"]}
    assert summary[("ceiling", "single")]["x_ceiling"] == 1.0
    assert summary[("mpstore", "processes")]["x_ceiling"] > 0


def test_tiny_run_in_threads_loses_nothing(tmp_path: Path) -> None:
    document = _bench_json(tmp_path, "--mode", "threads", "--strategy", "mpstore", "ceiling")
    (run,) = _mpstore_rows(document)
    assert run["mode"] == "threads"
    assert run["cpu_us_per_write"] is None  # the process is shared by every worker
    assert run["errors"] == {}
    assert run["lost"] == 0
    assert run["present"] == 6


@pytest.mark.processes
def test_modify_keeps_every_appended_message(tmp_path: Path) -> None:
    document = _bench_json(
        tmp_path, "--mode", "processes", "--strategy", "mpstore", "--scenario", "modify"
    )
    (run,) = _mpstore_rows(document)
    assert run["errors"] == {}
    assert run["present"] == 6
    assert run["lost"] == 0


def test_mixed_reports_reads(tmp_path: Path) -> None:
    document = _bench_json(
        tmp_path,
        "--mode",
        "threads",
        "--strategy",
        "ungated",
        "--scenario",
        "mixed",
        "--readers",
        "1",
    )
    (run,) = document["runs"]
    assert run["readers"] == 1
    assert run["reads"] > 0
    assert run["present"] == 6
    # The same reader, alone for as long as the writers wrote: the baseline for reads/s.
    assert run["read_alone_throughput"] > 0
    (summary,) = document["summary"]
    assert summary["read_alone_throughput"] == run["read_alone_throughput"]


@pytest.mark.parametrize(
    ("strategy", "scenario"),
    [
        ("mpstore", "upsert"),
        ("mpstore", "mixed"),
        ("mpstore", "modify"),
        ("ungated", "upsert"),
        ("filelock", "upsert"),
        ("handoff", "upsert"),
        ("ceiling", "upsert"),
    ],
)
def test_a_run_leaves_no_file_behind_once_verified(
    tmp_path: Path, strategy: str, scenario: str
) -> None:
    # Left in place, a run's files are written to disk while the runs after it are timed.
    mode = "single" if strategy == "ceiling" else "threads"
    run = _bench.run_one(strategy, mode, scenario, 2, 3, 0, 100, 1, str(tmp_path))
    assert (run.lost, run.errors) == (0, {})
    assert run.present == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_each_scenario_of_one_run_gets_its_own_database(tmp_path: Path) -> None:
    # Two scenarios write the same keys; sharing a file, the second would count them as lost.
    document = _bench_json(
        tmp_path, "--mode", "threads", "--strategy", "ungated", "--scenario", "mixed", "upsert"
    )
    assert [(r["scenario"], r["lost"], r["present"]) for r in document["runs"]] == [
        ("mixed", 0, 6),
        ("upsert", 0, 6),
    ]


@pytest.mark.parametrize("scenario", ["upsert", "modify"])
def test_handoff_runs_with_threads_and_loses_nothing(tmp_path: Path, scenario: str) -> None:
    document = _bench_json(
        tmp_path, "--mode", "threads", "--strategy", "handoff", "--scenario", scenario
    )
    (run,) = document["runs"]
    assert (run["strategy"], run["mode"]) == ("handoff", "threads")
    assert run["errors"] == {}
    assert (run["present"], run["lost"]) == (6, 0)


def test_handoff_runs_with_processes_and_loses_nothing(tmp_path: Path) -> None:
    document = _bench_json(
        tmp_path, "--mode", "processes", "--strategy", "handoff", "--scenario", "upsert", "modify"
    )
    # A read-then-write is a callback, which cannot travel between processes as data.
    (run,) = document["runs"]
    assert (run["scenario"], run["strategy"], run["mode"]) == ("upsert", "handoff", "processes")
    assert run["errors"] == {}
    assert (run["present"], run["lost"]) == (6, 0)


def _process_handoff(path: str) -> _bench.ProcessHandoffStrategy:
    strategy = _bench.ProcessHandoffStrategy()
    strategy.open(path)
    return strategy


def test_process_handoff_commits_every_waiting_write_and_fails_them_together(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "h.db")
    _bench.ProcessHandoffStrategy.create(path, [])
    first, second = _process_handoff(path), _process_handoff(path)
    try:
        assert first._slot is not None and first._slot != second._slot
        one, two, three, four = _bench.worker_records(0, 4, 256)
        first._publish(one)
        second.write(two)  # the gate is free: this batch takes the first's write too
        assert set(_bench.ProcessHandoffStrategy.stored(path)) == {
            one.conversation_id,
            two.conversation_id,
        }
        first._wait()  # done already: returns without taking the gate
        # workspace_id is NOT NULL in the table: this row fails the whole batch.
        first._publish(three.model_copy(update={"workspace_id": None}))
        with pytest.raises(sqlite3.IntegrityError):
            second.write(four)
        with pytest.raises(RuntimeError, match="failed"):
            first._wait()
        assert len(_bench.ProcessHandoffStrategy.stored(path)) == 2
    finally:
        first.close()
        second.close()


def test_handoff_returns_after_the_commit_and_hands_back_a_failure(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    _bench.HandoffStrategy.create(path, [])
    strategy = _bench.HandoffStrategy()
    strategy.open(path)
    try:
        record = _bench.worker_records(0, 1, 256)[0]
        strategy.write(record)
        # Another connection sees it as soon as write() returned: it waited for COMMIT.
        assert list(_bench.HandoffStrategy.stored(path)) == [record.conversation_id]
        message = _bench.worker_messages(0, 1)[0][1]
        with pytest.raises(KeyError):
            strategy.modify("no-such-conversation", message)
    finally:
        strategy.close()


def test_handoff_survives_a_failing_batch_and_refuses_writes_after_close(tmp_path: Path) -> None:
    class Stop(BaseException):
        pass

    path = str(tmp_path / "h.db")
    _bench.HandoffStrategy.create(path, [])
    strategy = _bench.HandoffStrategy()
    strategy.open(path)
    records = _bench.worker_records(0, 2, 256)

    def stop(conn: Any) -> None:
        raise Stop()

    try:
        with pytest.raises(Stop):
            strategy._transaction(stop)
        strategy.write(records[0])  # the writer thread still serves
    finally:
        strategy.close()
    with pytest.raises(RuntimeError, match="closed"):
        strategy.write(records[1])
    assert list(_bench.HandoffStrategy.stored(path)) == [records[0].conversation_id]


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["missing directory", "a directory"])
def test_an_output_that_cannot_be_written_stops_before_the_run(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    option: str,
    where: str,
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark ran before its output path was checked")

    monkeypatch.setattr(_bench, "run_bench", must_not_run)
    target = tmp_path / "nowhere" / "out" if where == "missing directory" else tmp_path
    code = main(["bench", "--quick", option, str(target)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and str(target) in err
    assert not (tmp_path / "nowhere").exists()


def test_a_run_with_nothing_to_run_is_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(
        [
            "bench",
            "--mode",
            "processes",
            "--strategy",
            "handoff",
            "--scenario",
            "modify",
            "--json",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "never the modify scenario" in err
    assert not (tmp_path / "x").exists()
