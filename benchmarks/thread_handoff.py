"""The cost of handing work to another thread and back in CPython, without SQLite.

W caller threads each do ``--caller-us`` of busy work (standing for serialising a record),
queue a job and wait on an event; one worker thread takes everything queued, spends
``--worker-us`` per job (standing for its statement) and ``--commit-us`` per batch, then sets
the events. Busy work holds the GIL, as Python code does. The result is the floor under any
group commit between threads that returns only after the commit: ``mpstore bench``'s
``handoff`` strategy is the same shape with real SQLite writes.

    python benchmarks/thread_handoff.py                       # 16 threads, 0/0 and 25/20 us
    python benchmarks/thread_handoff.py --threads 4 --jobs 5000
"""

from __future__ import annotations

import argparse
import resource
import statistics
import threading
import time
from collections import deque


def busy(us: float) -> None:
    until = time.perf_counter() + us / 1e6
    while time.perf_counter() < until:
        pass


def run(
    threads: int, jobs: int, caller_us: float, worker_us: float, commit_us: float
) -> dict[str, float]:
    cond = threading.Condition(threading.Lock())
    queue: deque[threading.Event] = deque()
    stop = False

    def worker() -> None:
        while True:
            with cond:
                while not queue:
                    if stop:
                        return
                    cond.wait()
                batch = list(queue)
                queue.clear()
            for _ in batch:
                busy(worker_us)
            busy(commit_us)
            for done in batch:
                done.set()

    start = threading.Barrier(threads + 1)

    def caller() -> None:
        start.wait()
        for _ in range(jobs):
            busy(caller_us)
            done = threading.Event()
            with cond:
                queue.append(done)
                cond.notify()
            done.wait()

    writer = threading.Thread(target=worker, daemon=True)
    writer.start()
    callers = [threading.Thread(target=caller) for _ in range(threads)]
    for t in callers:
        t.start()
    start.wait()
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for t in callers:
        t.join()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    with cond:
        stop = True
        cond.notify()
    writer.join()
    total = threads * jobs
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return {
        "us_per_job": wall / total * 1e6,
        "cpus_busy": cpu / wall,
        "switches_per_job": (r1.ru_nvcsw - r0.ru_nvcsw) / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per caller thread")
    parser.add_argument("--commit-us", type=float, default=50.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for caller_us, worker_us in ((0.0, 0.0), (25.0, 20.0)):
        runs = [
            run(args.threads, args.jobs, caller_us, worker_us, args.commit_us)
            for _ in range(args.repeat)
        ]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{args.threads} threads, caller {caller_us:g} us, worker {worker_us:g} us/job + "
            f"{args.commit_us:g} us/batch: {med['us_per_job']:.0f} us per job (one thread "
            f"alone: {caller_us + worker_us:g} us + its share of a batch), "
            f"{med['cpus_busy']:.2f} CPUs busy, {med['switches_per_job']:.1f} context switches "
            f"per job (medians of {args.repeat})"
        )


if __name__ == "__main__":
    main()
