"""Random interleavings: schedules Hypothesis draws, the worker that runs one, and the oracle.

A schedule gives each worker a list of operations and the instrumentation points (see
``mpstore.EVENTS``) where it gives up the CPU. Workers run as threads or as real processes.

The oracle needs no global clock. Each worker owns private keys, so its own program order
decides their final values. Shared records only change through ``update`` appends, whose final
list *is* the commit order the store chose: it must hold every acknowledged append exactly once,
each worker's appends in that worker's order. Raw transactions bump a counter and log a row;
nested blocks must keep the outer write and drop the inner one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st
from pydantic import BaseModel

import mpstore

SHARED = ("s0", "s1")
PRIVATE_KEYS = 3
PAUSE_EVENTS = ("gate-wait", "gate-acquired", "begin", "commit", "gate-released", "pool-acquired")
FAILURES = (mpstore.MpstoreError, sqlite3.Error)


class Item(BaseModel):
    id: str
    values: list[str]


@dataclass(frozen=True)
class Op:
    kind: str  # upsert | delete | get | append | raw | nested | snapshot
    arg: int = 0

    def __repr__(self) -> str:
        return (
            f"{self.kind}({self.arg})"
            if self.kind in ("upsert", "delete", "get", "append")
            else self.kind
        )


@dataclass(frozen=True)
class Worker:
    ops: tuple[Op, ...]
    pauses: tuple[tuple[str, int], ...] = ()  # (event, how many sched_yield calls)

    def __repr__(self) -> str:
        pauses = f" pauses={dict(self.pauses)}" if self.pauses else ""
        return f"Worker({list(self.ops)}{pauses})"


@dataclass(frozen=True)
class Schedule:
    kind: str  # threads | tasks | processes
    workers: tuple[Worker, ...]

    def __repr__(self) -> str:
        lines = [f"Schedule({self.kind}, {len(self.workers)} workers)"]
        lines += [f"  w{i}: {w!r}" for i, w in enumerate(self.workers)]
        return "\n".join(lines)


ops = st.one_of(
    st.builds(Op, st.just("upsert"), st.integers(0, PRIVATE_KEYS - 1)),
    st.builds(Op, st.just("delete"), st.integers(0, PRIVATE_KEYS - 1)),
    st.builds(Op, st.just("get"), st.integers(0, PRIVATE_KEYS - 1)),
    st.builds(Op, st.just("append"), st.integers(0, len(SHARED) - 1)),
    st.builds(Op, st.just("raw")),
    st.builds(Op, st.just("nested")),
    st.builds(Op, st.just("snapshot")),
)
pauses = st.lists(
    st.tuples(st.sampled_from(PAUSE_EVENTS), st.integers(1, 50)),
    max_size=3,
    unique_by=lambda p: p[0],
).map(tuple)
workers_st = st.builds(Worker, st.lists(ops, min_size=1, max_size=6).map(tuple), pauses)


def schedules(
    kind: str, min_workers: int = 2, max_workers: int = 16
) -> st.SearchStrategy[Schedule]:
    return st.builds(
        Schedule,
        st.just(kind),
        st.lists(workers_st, min_size=min_workers, max_size=max_workers).map(tuple),
    )


def prepare(path: str) -> None:
    """Create the collection, the shared records and the counter before any worker starts."""
    with mpstore.Store(path) as store:
        items = store.collection("items", Item, key="id")
        items.upsert_many(Item(id=s, values=[]) for s in SHARED)
        with store.write() as conn:
            conn.execute("CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            conn.execute("INSERT INTO counters VALUES (0, 0)")
            conn.execute("CREATE TABLE log (worker INTEGER, step INTEGER, part TEXT)")


class _Rollback(Exception):
    """Raised inside a nested block to roll it back on purpose."""


@dataclass
class Outcome:
    """What one worker saw: acknowledged operations, failures, and read checks that failed."""

    worker: int
    acked: list[tuple[int, str, int]] = field(default_factory=list)  # (step, kind, arg)
    failures: list[str] = field(default_factory=list)
    bad_reads: list[str] = field(default_factory=list)


def run_worker(path: str, index: int, worker: Worker, unsafe: bool, start: Any) -> Outcome:
    """Run one worker's operations on its own Store; never raises, reports everything."""
    outcome = Outcome(index)
    pause_at = dict(worker.pauses)

    def hook(event: str) -> None:
        for _ in range(pause_at.get(event, 0)):
            os.sched_yield()

    store = _open(path, unsafe, hook)
    try:
        items = store.collection("items", Item, key="id")
        mine: dict[str, list[str]] = {}
        start.wait()
        for step, op in enumerate(worker.ops):
            try:
                _apply(store, items, index, step, op, mine, outcome)
            except FAILURES as exc:
                outcome.failures.append(f"w{index} step {step} {op!r}: {type(exc).__name__}: {exc}")
            else:
                outcome.acked.append((step, op.kind, op.arg))
    finally:
        store.close()
    return outcome


def _open(path: str, unsafe: bool, hook: Any) -> mpstore.Store:
    if unsafe:
        from mpstore._unsafe import UnsafeStore

        return UnsafeStore(path, timeout=0.5, busy_timeout=0.2, on_event=hook)
    return mpstore.Store(path, timeout=30.0, on_event=hook)


def _apply(
    store: mpstore.Store,
    items: mpstore.Collection[Item],
    w: int,
    step: int,
    op: Op,
    mine: dict[str, list[str]],
    outcome: Outcome,
) -> None:
    key = f"w{w}-k{op.arg}"
    if op.kind == "upsert":
        items.upsert(Item(id=key, values=[f"w{w}.{step}"]))
        mine[key] = [f"w{w}.{step}"]
    elif op.kind == "delete":
        existed = items.delete(key)
        if existed != (key in mine):
            outcome.bad_reads.append(f"w{w} step {step}: delete({key}) said {existed}")
        mine.pop(key, None)
    elif op.kind == "get":
        got = items.get(key)
        want = mine.get(key)
        if (got.values if got else None) != want:
            outcome.bad_reads.append(f"w{w} step {step}: get({key}) = {got}, wrote {want}")
    elif op.kind == "append":
        tag = f"w{w}.{step}"
        items.update(SHARED[op.arg], lambda it: it.model_copy(update={"values": [*it.values, tag]}))
    elif op.kind == "raw":
        with store.write() as conn:
            conn.execute("UPDATE counters SET n = n + 1 WHERE id = 0")
            conn.execute("INSERT INTO log VALUES (?, ?, 'raw')", (w, step))
    elif op.kind == "nested":
        with store.write() as conn:
            conn.execute("INSERT INTO log VALUES (?, ?, 'outer')", (w, step))
            with contextlib.suppress(_Rollback), store.write() as inner:
                inner.execute("INSERT INTO log VALUES (?, ?, 'inner')", (w, step))
                raise _Rollback
    elif op.kind == "snapshot":
        with store.read() as conn:
            first = conn.execute("SELECT count(*) FROM log").fetchone()
            shared = conn.execute("SELECT value FROM items WHERE key = ?", (SHARED[0],)).fetchone()
            again = conn.execute("SELECT count(*) FROM log").fetchone()
            shared_again = conn.execute(
                "SELECT value FROM items WHERE key = ?", (SHARED[0],)
            ).fetchone()
        if first != again or shared != shared_again:
            outcome.bad_reads.append(f"w{w} step {step}: snapshot moved inside one read() block")


def run_threads(path: str, schedule: Schedule, unsafe: bool = False) -> list[Outcome]:
    start = threading.Barrier(len(schedule.workers))
    results: list[Outcome | None] = [None] * len(schedule.workers)

    def target(i: int, worker: Worker) -> None:
        results[i] = run_worker(path, i, worker, unsafe, start)

    threads = [threading.Thread(target=target, args=(i, w)) for i, w in enumerate(schedule.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results), "a worker thread died"
    return [r for r in results if r is not None]


def run_tasks(path: str, schedule: Schedule) -> list[Outcome]:
    """Run each worker as an asyncio task on one AsyncStore (pauses apply in its threads)."""
    return asyncio.run(_run_tasks(path, schedule))


async def _run_tasks(path: str, schedule: Schedule) -> list[Outcome]:
    pause_at: dict[str, int] = {}
    for worker in schedule.workers:
        for event, n in worker.pauses:
            pause_at[event] = max(pause_at.get(event, 0), n)

    def hook(event: str) -> None:
        for _ in range(pause_at.get(event, 0)):
            os.sched_yield()

    start = asyncio.Event()
    ready = 0

    async def task(index: int, worker: Worker) -> Outcome:
        nonlocal ready
        outcome = Outcome(index)
        mine: dict[str, list[str]] = {}
        ready += 1
        if ready == len(schedule.workers):
            start.set()
        await start.wait()
        for step, op in enumerate(worker.ops):
            try:
                await _apply_async(store, items, index, step, op, mine, outcome)
            except FAILURES as exc:
                outcome.failures.append(f"w{index} step {step} {op!r}: {type(exc).__name__}: {exc}")
            else:
                outcome.acked.append((step, op.kind, op.arg))
        return outcome

    async with mpstore.AsyncStore(path, timeout=30.0, on_event=hook) as store:
        items = store.collection("items", Item, key="id")
        return list(await asyncio.gather(*(task(i, w) for i, w in enumerate(schedule.workers))))


async def _apply_async(
    store: Any, items: Any, w: int, step: int, op: Op, mine: dict[str, list[str]], outcome: Outcome
) -> None:
    """The same operations as :func:`_apply`, through the asyncio API."""
    key = f"w{w}-k{op.arg}"
    if op.kind == "upsert":
        await items.upsert(Item(id=key, values=[f"w{w}.{step}"]))
        mine[key] = [f"w{w}.{step}"]
    elif op.kind == "delete":
        existed = await items.delete(key)
        if existed != (key in mine):
            outcome.bad_reads.append(f"w{w} step {step}: delete({key}) said {existed}")
        mine.pop(key, None)
    elif op.kind == "get":
        got = await items.get(key)
        want = mine.get(key)
        if (got.values if got else None) != want:
            outcome.bad_reads.append(f"w{w} step {step}: get({key}) = {got}, wrote {want}")
    elif op.kind == "append":
        tag = f"w{w}.{step}"
        await items.update(
            SHARED[op.arg], lambda it: it.model_copy(update={"values": [*it.values, tag]})
        )
    elif op.kind == "raw":
        async with store.write() as conn:
            await conn.execute("UPDATE counters SET n = n + 1 WHERE id = 0")
            await conn.execute("INSERT INTO log VALUES (?, ?, 'raw')", (w, step))
    elif op.kind == "nested":
        async with store.write() as conn:
            await conn.execute("INSERT INTO log VALUES (?, ?, 'outer')", (w, step))
            with contextlib.suppress(_Rollback):
                async with store.write() as inner:
                    await inner.execute("INSERT INTO log VALUES (?, ?, 'inner')", (w, step))
                    raise _Rollback
    elif op.kind == "snapshot":
        query = "SELECT value FROM items WHERE key = ?"
        async with store.read() as conn:
            first = (await conn.execute("SELECT count(*) FROM log")).fetchone()
            shared = (await conn.execute(query, (SHARED[0],))).fetchone()
            again = (await conn.execute("SELECT count(*) FROM log")).fetchone()
            shared_again = (await conn.execute(query, (SHARED[0],))).fetchone()
        if first != again or shared != shared_again:
            outcome.bad_reads.append(f"w{w} step {step}: snapshot moved inside one read() block")


def run_processes(pool: Any, manager: Any, path: str, schedule: Schedule) -> list[Outcome]:
    """Run each worker in a process of ``pool`` (at least as many processes as workers)."""
    start = manager.Barrier(len(schedule.workers))
    futures = [
        pool.submit(run_worker, path, i, w, False, start) for i, w in enumerate(schedule.workers)
    ]
    return [f.result(timeout=120) for f in futures]


def check(path: str, schedule: Schedule, outcomes: list[Outcome]) -> None:
    """Assert every property of one run; the message names what broke."""
    failures = [f for o in outcomes for f in o.failures]
    assert not failures, "errors reached callers:\n" + "\n".join(failures)
    bad_reads = [b for o in outcomes for b in o.bad_reads]
    assert not bad_reads, "reads disagreed with the worker's own writes:\n" + "\n".join(bad_reads)
    with mpstore.Store(path) as store:
        items = store.collection("items", Item, key="id")
        stored = {it.id: it.values for it in items.scan()}
        expected: dict[str, list[str]] = {}
        raw = nested = 0
        appends: dict[str, list[str]] = {s: [] for s in SHARED}
        for o in outcomes:
            for step, kind, arg in o.acked:
                key = f"w{o.worker}-k{arg}"
                if kind == "upsert":
                    expected[key] = [f"w{o.worker}.{step}"]
                elif kind == "delete":
                    expected.pop(key, None)
                elif kind == "append":
                    appends[SHARED[arg]].append(f"w{o.worker}.{step}")
                elif kind == "raw":
                    raw += 1
                elif kind == "nested":
                    nested += 1
        private = {k: v for k, v in stored.items() if k not in SHARED}
        assert private == expected, "private records differ from the workers' own writes"
        for s in SHARED:
            got = stored[s]
            assert sorted(got) == sorted(appends[s]), (
                f"shared {s}: committed appends {got} != acknowledged {appends[s]} "
                "(a lost or duplicated update)"
            )
            for o in outcomes:
                prefix = f"w{o.worker}."
                own = [t for t in got if t.startswith(prefix)]
                assert own == [t for t in appends[s] if t.startswith(prefix)], (
                    f"shared {s}: worker {o.worker}'s appends out of program order: {own}"
                )
        assert store.query("SELECT n FROM counters WHERE id = 0") == [(raw,)]
        parts = dict(store.query("SELECT part, count(*) FROM log GROUP BY part"))
        assert parts.get("raw", 0) == raw and parts.get("outer", 0) == nested
        assert "inner" not in parts, "a rolled-back nested block was committed"
        assert store.integrity_check() == ["ok"]
