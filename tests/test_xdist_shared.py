"""The test run as a multi-process contention test: every xdist worker writes to one store.

Each case writes its own records and bumps its own counter in one shared ``Tally`` record, on
the run's shared store (``mpstore_shared_store``), while the cases on other workers do the same.
Right after, it checks that all its records are there and that none of its increments was lost:
a lost update anywhere in the shared record shows up as a missing increment of some case. Under
``pytest -n auto`` the cases run on all workers at once; with ``-n 0`` they run one by one.

``tests/test_plugin.py`` runs the same cases under ``-n 2`` with a rendezvous that makes both
workers write at the same moment, and with a get-then-upsert increment that must lose updates.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

import mpstore

CASES = 24
WRITES = 20
TALLY = "tally"
RENDEZVOUS_TIMEOUT = 60.0


class Entry(BaseModel):
    id: str
    case: str
    worker: str
    seq: int


class Tally(BaseModel):
    id: str
    total: int = 0
    counts: dict[str, int] = Field(default_factory=dict)


Increment = Callable[[mpstore.Collection[Tally], str], None]


def entries(store: mpstore.Store) -> mpstore.Collection[Entry]:
    return store.collection("contention_entries", Entry, key="id", indexes=[("case",)])


def tallies(store: mpstore.Store) -> mpstore.Collection[Tally]:
    return store.collection("contention_tallies", Tally, key="id")


def ensure_tally(store: mpstore.Store) -> None:
    """Create the shared tally record unless another worker already has (one transaction)."""
    coll = tallies(store)
    with store.write():
        if coll.get(TALLY) is None:
            coll.upsert(Tally(id=TALLY))


def bump(tally: Tally, case: str) -> Tally:
    counts = dict(tally.counts)
    counts[case] = counts.get(case, 0) + 1
    return tally.model_copy(update={"total": tally.total + 1, "counts": counts})


def atomic_increment(coll: mpstore.Collection[Tally], case: str) -> None:
    """The increment under test: one atomic read-modify-write through ``update``."""
    coll.update(TALLY, lambda t: bump(t, case))


class Rendezvous:
    """Holds each worker at one point until every worker of the run has reached it, no sleeps.

    Each arrival creates a marker file in ``directory``; a worker spins (yielding the CPU) until
    ``parties`` markers exist. Only the first :meth:`wait` of a process waits, even if it fails.

    :raises AssertionError: the other workers did not arrive within ``RENDEZVOUS_TIMEOUT``.
    """

    def __init__(self, directory: Path, worker: str, parties: int) -> None:
        self.directory, self.worker, self.parties = directory, worker, parties
        self.done = False

    def wait(self) -> None:
        if self.done:
            return
        self.done = True
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / self.worker).touch()
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT
        while len(os.listdir(self.directory)) < self.parties:
            assert time.monotonic() < deadline, (
                f"rendezvous: {self.worker} waited {RENDEZVOUS_TIMEOUT} s for {self.parties} "
                f"workers, saw {sorted(os.listdir(self.directory))}"
            )
            os.sched_yield()


class GetThenUpsert:
    """A deliberately unsafe increment (the negative control): get, then upsert, not atomic.

    The first increment of each worker stops at ``rendezvous`` between its get and its upsert,
    so every worker reads the same tally before any of them writes: all but one of those
    writes are lost, on every run; with ``settled`` they all wait again after writing.
    """

    def __init__(self, rendezvous: Rendezvous, settled: Rendezvous | None = None) -> None:
        self.rendezvous = rendezvous
        self.settled = settled

    def __call__(self, coll: mpstore.Collection[Tally], case: str) -> None:
        current = coll.get(TALLY)
        assert current is not None
        self.rendezvous.wait()
        coll.upsert(bump(current, case))
        if self.settled is not None:
            # Every worker has overwritten the tally before any of them checks its count, so
            # each loser of the race sees its own increment gone, on every run.
            self.settled.wait()


def contend(
    store: mpstore.Store,
    worker: str,
    case: str,
    *,
    increment: Increment = atomic_increment,
    writes: int = WRITES,
    start: Rendezvous | None = None,
) -> None:
    """Write ``writes`` records and ``writes`` tally increments for ``case``, then check them.

    :raises pytest.fail.Exception: a write timed out waiting for the gate, the pool or SQLite.
    :raises AssertionError: a record of this case is missing or changed, or an increment lost.
    """
    coll, tally = entries(store), tallies(store)
    ensure_tally(store)
    if start is not None:
        start.wait()
    try:
        for seq in range(writes):
            coll.upsert(Entry(id=f"{case}-{seq:03d}", case=case, worker=worker, seq=seq))
            increment(tally, case)
    except mpstore.Timeout as exc:
        pytest.fail(f"{case} on {worker} saw a lock error: {type(exc).__name__}: {exc}")
    check_own_writes(store, worker, case, writes)


def check_own_writes(store: mpstore.Store, worker: str, case: str, writes: int) -> None:
    """Assert that all of ``case``'s records and tally increments are in the store.

    :raises AssertionError: naming what is missing.
    """
    expected = [
        Entry(id=f"{case}-{seq:03d}", case=case, worker=worker, seq=seq) for seq in range(writes)
    ]
    found = sorted(entries(store).find({"case": case}), key=lambda e: e.seq)
    assert found == expected, f"{case}: records written on {worker} are missing or changed"
    current = tallies(store).get(TALLY)
    count = 0 if current is None else current.counts.get(case, 0)
    assert count == writes, (
        f"lost update: {case} on {worker} incremented the shared tally {writes} times, "
        f"it holds {count}"
    )


@pytest.mark.parametrize("case", range(CASES))
def test_contend_on_the_shared_store(
    mpstore_shared_store: mpstore.Store, mpstore_worker_id: str, case: int
) -> None:
    contend(mpstore_shared_store, mpstore_worker_id, f"case-{case:02d}")


# -- the checks notice what they exist to notice -------------------------------------------------


def test_check_notices_a_missing_record(mpstore_store: mpstore.Store) -> None:
    contend(mpstore_store, "master", "c", writes=5)
    entries(mpstore_store).delete("c-003")
    with pytest.raises(AssertionError, match="records written on master are missing"):
        check_own_writes(mpstore_store, "master", "c", 5)


def test_check_notices_a_changed_record(mpstore_store: mpstore.Store) -> None:
    contend(mpstore_store, "master", "c", writes=5)
    entries(mpstore_store).upsert(Entry(id="c-001", case="c", worker="gw9", seq=1))
    with pytest.raises(AssertionError, match="records written on master are missing or changed"):
        check_own_writes(mpstore_store, "master", "c", 5)


def test_check_notices_a_lost_increment(mpstore_store: mpstore.Store) -> None:
    contend(mpstore_store, "master", "c", writes=5)
    contend(mpstore_store, "master", "d", writes=5)
    stale = tallies(mpstore_store).get(TALLY)
    assert stale is not None
    entries(mpstore_store).upsert(Entry(id="c-005", case="c", worker="master", seq=5))
    atomic_increment(tallies(mpstore_store), "c")  # c's sixth write and increment
    tallies(mpstore_store).upsert(bump(stale, "d"))  # a stale copy overwrites c's increment
    assert tallies(mpstore_store).get(TALLY) == Tally(id=TALLY, total=11, counts={"c": 5, "d": 6})
    with pytest.raises(AssertionError, match=r"lost update: c on master .* 6 times, it holds 5"):
        check_own_writes(mpstore_store, "master", "c", 6)


def test_check_notices_a_lock_error(mpstore_store: mpstore.Store) -> None:
    def timing_out(coll: mpstore.Collection[Tally], case: str) -> None:
        raise mpstore.GateTimeout("the gate was not granted", mpstore_store.lock_path, 5.0)

    with pytest.raises(pytest.fail.Exception, match="c on master saw a lock error: GateTimeout"):
        contend(mpstore_store, "master", "c", increment=timing_out, writes=2)
