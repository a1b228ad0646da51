"""Counters and latency percentiles of one store in this process, fed by its instrumentation points.

Each point (see ``mpstore.EVENTS``) costs a clock read and a dict update; samples live in
bounded rings (the most recent 4096 of each kind), so the statistics are cheap to leave on and
describe recent behaviour.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = ["Stats"]

_RING = 4096

#: Latency samples kept, in seconds, and what each measures.
TIMINGS = {
    "gate_wait": "from asking for the gate to holding it (queued writes: until their batch ran)",
    "gate_hold": "from taking the gate to giving it back",
    "transaction": "from BEGIN to the end of COMMIT",
    "pool_wait": "from asking for a read connection to holding one",
}

#: Counters, each present (0 until it first counts) in every snapshot.
COUNTERS = (
    "commits",
    "rollbacks",
    "writes_batched",
    "writes_carried",
    "writes_carried_away",
    "gate_timeouts",
    "pool_timeouts",
    "reads_ahead",
    "reads_ahead_used",
)


class Stats:
    """Thread-safe recorder behind :meth:`mpstore.Store.stats`."""

    def __init__(self) -> None:
        self._marks = threading.local()
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._samples: dict[str, deque[float]] = {
            name: deque(maxlen=_RING) for name in (*TIMINGS, "batch_size")
        }

    def after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may have been held by a lost thread)."""
        self._lock = threading.Lock()

    def event(self, name: str) -> None:
        """Note that this thread passed the instrumentation point ``name``."""
        now = time.perf_counter()
        marks = self._marks.__dict__
        if name == "gate-wait" or name == "pool-wait" or name == "begin":
            marks[name] = now
        elif name == "gate-acquired":
            self._since(marks, "gate-wait", now, "gate_wait")
            marks[name] = now
        elif name == "gate-released":
            self._since(marks, "gate-acquired", now, "gate_hold")
        elif name == "pool-acquired":
            self._since(marks, "pool-wait", now, "pool_wait")
        elif name == "commit":
            self._since(marks, "begin", now, "transaction")
            self.count("commits")
        elif name == "rollback":
            marks.pop("begin", None)
            self.count("rollbacks")

    def _since(self, marks: dict[str, float], start: str, now: float, sample: str) -> None:
        began = marks.pop(start, None)
        if began is not None:
            self._samples[sample].append(now - began)

    def record(self, sample: str, value: float) -> None:
        self._samples[sample].append(value)

    def count(self, counter: str, n: int = 1) -> None:
        """Add ``n`` to ``counter``, one of :data:`COUNTERS` (KeyError otherwise)."""
        with self._lock:
            self._counters[counter] += n

    def snapshot(self) -> dict[str, Any]:
        """Counters, and p50/p90/p99/max (milliseconds) with a count for each timing."""
        with self._lock:
            result: dict[str, Any] = dict(self._counters)
        for name in TIMINGS:
            result[name] = _summary(list(self._samples[name]), scale=1000.0)
        result["batch_size"] = _summary(list(self._samples["batch_size"]), scale=1.0)
        return result


def _summary(values: list[float], scale: float) -> dict[str, float]:
    if not values:
        return {"count": 0}
    values.sort()
    n = len(values)

    def pick(q: float) -> float:
        return values[min(n - 1, int(q * n))] * scale

    return {
        "count": n,
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": values[-1] * scale,
    }
