"""Code that runs in child processes for the Hypothesis example database tests.

Children are spawned (fresh interpreters), so every target is a module-level function.
"""

from __future__ import annotations

import random
import unittest
from typing import Any

from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import mpstore
from mpstore.hypothesis import EXAMPLES_TABLE, SQLiteExampleDatabase

#: The two keys that the pool of shared values moves between.
LEFT, RIGHT = b"left", b"right"


def pool_value(i: int) -> bytes:
    return f"pool-{i}".encode()


def own_key(worker: int) -> bytes:
    return f"own-{worker}".encode()


def own_value(worker: int, i: int) -> bytes:
    return f"{worker}-{i}".encode()


def churn(path: str, worker: int, pool: int, rounds: int, barrier: Any, done: Any) -> int:
    """Save, delete and move at once with the other workers.

    Under its own key the worker saves ``rounds`` values and deletes every even one again. It
    also moves values of the shared pool: even workers from LEFT to RIGHT, odd workers back.
    A move puts its value under the destination whatever the source held, so atomic moves
    keep every pool value under exactly one of the two keys; a move done as a delete and a
    later save can leave a value under both, or (for a moment) under neither.
    """
    db = SQLiteExampleDatabase(path)
    rng = random.Random(worker)
    src, dest = (LEFT, RIGHT) if worker % 2 == 0 else (RIGHT, LEFT)
    barrier.wait()
    try:
        for i in range(rounds):
            db.save(own_key(worker), own_value(worker, i))
            if i % 2 == 1:
                db.delete(own_key(worker), own_value(worker, i - 1))
            db.move(src, dest, pool_value(rng.randrange(pool)))
    finally:
        with done.get_lock():
            done.value += 1
        db.close()
    return rounds


def save_in_child(database: SQLiteExampleDatabase, value: bytes) -> int:
    """Save through a database received by pickling or fork; return its listener count."""
    database.save(b"k", value)
    return len(database._listeners)


def pool_violations(conn: Any, pool: int) -> list[str]:
    """What is wrong with the pool in one snapshot: values missing or held twice."""
    rows = conn.execute(
        f"SELECT value, count(*) FROM {EXAMPLES_TABLE} WHERE key IN (?, ?) GROUP BY value",
        (LEFT, RIGHT),
    ).fetchall()
    counts = {bytes(value): n for value, n in rows}
    problems = [f"{v!r} held {n} times" for v, n in counts.items() if n != 1]
    problems += [f"{pool_value(i)!r} missing" for i in range(pool) if pool_value(i) not in counts]
    return problems


def observe_pool(
    path: str, pool: int, workers: int, barrier: Any, done: Any
) -> tuple[int, list[str]]:
    """Check the pool in snapshot after snapshot until every worker has finished."""
    snapshots = 0
    problems: list[str] = []
    with mpstore.Store(path, timeout=60) as store:
        barrier.wait()
        finished = False
        while not finished:
            finished = done.value >= workers  # one more snapshot after the last worker ends
            with store.read() as conn:
                problems += pool_violations(conn, pool)
            snapshots += 1
    return snapshots, problems


def failing_property(path: str, phases: list[str]) -> dict[str, Any]:
    """Run a Hypothesis test that fails for x >= 1000 with ``path`` as its example database.

    Returns how it ended ("failed", "passed", or "nothing to run" when no phase had an
    example to try) and every x it tried, in order.
    """
    db = SQLiteExampleDatabase(path)
    seen: list[int] = []

    @settings(
        database=db,
        phases=[Phase[name] for name in phases],
        max_examples=200,
        deadline=None,
        derandomize=False,
    )
    @given(st.integers(min_value=0, max_value=10_000))
    def below_a_thousand(x: int) -> None:
        seen.append(x)
        assert x < 1000

    outcome = "passed"
    try:
        below_a_thousand()
    except AssertionError:
        outcome = "failed"
    except unittest.SkipTest:
        outcome = "nothing to run"
    finally:
        db.close()
    return {"outcome": outcome, "seen": seen}
