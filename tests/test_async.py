"""The asyncio API: the loop never waits, cancellation leaks nothing, blocks hold one transaction.

Each test runs its coroutine on a fresh event loop; those marked with ``loop_kind`` run it on
the stdlib loop and, when uvloop is importable, on uvloop too. Worker threads signal the tests
through the store's ``on_event`` hook (see :class:`Events`), never through sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import itertools
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mpstore
from mpstore import _async
from mpstore.conversations import Conversation, Message, sample_conversation
from tests import workers
from tests.models import Note

T = TypeVar("T")

WAIT = 60.0  # generous: a healthy wait ends in milliseconds
HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed"),
    ),
]

#: How long the blocking control's sync write waits for the gate on the loop's thread.
BLOCKED_FOR = 1.0


def run(main: Callable[[], Awaitable[T]], loop_kind: str = "asyncio") -> T:
    """Run ``main()`` to completion on a new loop of the given kind."""
    factory = None
    if loop_kind == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())  # type: ignore[arg-type]


class Events:
    """An ``on_event`` hook that records events, signals counts and can pause a worker thread.

    The hook runs in the store's worker threads; a paused thread stays inside the store at that
    point (holding whatever it holds there) until :attr:`resume` is set.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.threads: set[int] = set()  # every thread that passed an event
        self.resume = threading.Event()
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._watches: list[tuple[str, int, threading.Event]] = []
        self._pauses: dict[str, threading.Event] = {}

    def __call__(self, name: str) -> None:
        with self._lock:
            self.names.append(name)
            self.threads.add(threading.get_ident())
            self._counts[name] += 1
            for wanted, count, event in self._watches:
                if wanted == name and self._counts[name] >= count:
                    event.set()
            reached = self._pauses.pop(name, None)
        if reached is not None:
            reached.set()
            self.resume.wait(60)

    def count(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def pause_at(self, name: str) -> threading.Event:
        """Pause the next thread that passes ``name``; the event is set when one does."""
        reached = threading.Event()
        with self._lock:
            self._pauses[name] = reached
        return reached

    def watch(self, name: str, count: int) -> threading.Event:
        """An event set once ``name`` has happened ``count`` times in all."""
        event = threading.Event()
        with self._lock:
            if self._counts[name] >= count:
                event.set()
            else:
                self._watches.append((name, count, event))
        return event

    async def until(self, name: str, count: int = 1) -> None:
        """Wait, off the loop, until ``name`` has happened ``count`` times in all."""
        await wait_off_loop(self.watch(name, count), f"{name} x{count}; saw {self.names}")


async def wait_off_loop(event: threading.Event, what: str) -> None:
    assert await asyncio.to_thread(event.wait, 60), f"never happened: {what}"


class Holder:
    """Holds a sync ``write()`` or ``read()`` block of ``store`` open in another thread.

    ``async with Holder(...)`` returns once the block is open and closes it on exit; the block
    is held for exactly that long.
    """

    def __init__(self, store: mpstore.Store, kind: str) -> None:
        self._block = store.write if kind == "write" else store.read
        self._kind = kind
        self._holding = threading.Event()
        self._done = threading.Event()
        self._task: asyncio.Task[None] | None = None

    def _hold(self) -> None:
        with self._block():
            self._holding.set()
            self._done.wait(60)

    async def __aenter__(self) -> Holder:
        self._task = asyncio.create_task(asyncio.to_thread(self._hold))
        await wait_off_loop(self._holding, f"a thread opened a {self._kind} block")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
        assert self._task is not None
        await self._task

    def release(self) -> None:
        self._done.set()


def assert_nothing_held(store: mpstore.Store) -> None:
    """No pooled connection is checked out, every slot can be had, and the gate is free.

    Run it from a thread other than the one under test: the gate probe is another Store on the
    same file (so another thread of this process), with a short timeout.
    """
    pool = store._pool
    assert pool.in_use == 0, f"{pool.in_use} read connections still checked out"
    taken = [pool.acquire(0.5) for _ in range(pool.size)]
    for conn in taken:
        pool.release(conn)
    with mpstore.Store(store.path, timeout=0.5) as probe, probe.write():
        pass


async def notes_of(store: mpstore.AsyncStore) -> mpstore.AsyncCollection[Note]:
    return await store.collection("notes", Note, key="id").open()


async def ids(notes: mpstore.AsyncCollection[Note]) -> set[str]:
    keys = notes.keys()
    return {key async for key in keys}


def note(key: str, text: str = "x") -> Note:
    return Note(id=key, text=text)


# -- the basics -------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_collection_calls_round_trip(db_path: str, loop_kind: str) -> None:
    async def main() -> None:
        async with mpstore.AsyncStore(db_path) as store:
            notes = store.collection("notes", Note, key="id")
            await notes.upsert(note("a", "hi"))
            assert await notes.get("a") == note("a", "hi")
            assert await notes.get("missing") is None
            new = await notes.update("a", lambda n: n.model_copy(update={"text": n.text + "!"}))
            assert new == note("a", "hi!") == await notes.get("a")
            # More than one page, so scan() and keys() fetch several batches.
            assert await notes.upsert_many(note(f"k{i:04d}") for i in range(600)) == 600
            assert await notes.count() == 601
            key_iter = notes.keys()
            keys = [k async for k in key_iter]
            assert keys == sorted(keys) and len(keys) == 601
            assert [n.id async for n in notes.scan()] == keys
            assert await notes.delete("a") is True
            assert await notes.delete("a") is False
            assert await store.query("SELECT count(*) FROM notes") == [(600,)]
            assert await store.collections() == {"notes": 600}
            assert await store.integrity_check() == ["ok"]
            assert not store.closed
        assert store.closed

    run(main, loop_kind)


def test_a_collection_whose_table_was_dropped_says_so_then_makes_it_anew(db_path: str) -> None:
    async def main() -> None:
        async with mpstore.AsyncStore(db_path) as store:
            notes = store.collection("notes", Note, key="id")
            await notes.upsert(note("a"))
            async with store.write() as conn:
                await conn.execute("DROP TABLE notes")
            keys = notes.keys()
            with pytest.raises(mpstore.CollectionNotFound):
                [k async for k in keys]
            await notes.upsert(note("b"))  # the next call made the table anew
            assert [n.id async for n in notes.scan()] == ["b"]
            async with store.write() as conn:
                await conn.execute("DROP TABLE notes")
            with pytest.raises(mpstore.CollectionNotFound):
                await notes.get("b")
            await notes.open()  # makes it at once
            assert await store.query("SELECT count(*) FROM notes") == [(0,)]

    run(main)


def test_find_and_explain_use_the_declared_index(db_path: str) -> None:
    async def main() -> None:
        async with mpstore.AsyncStore(db_path) as store:
            repo = mpstore.AsyncConversationRepository(store)
            for i in range(3):
                await repo.upsert_conversation(sample_conversation(f"c{i}", workspace_id=7))
            found = await repo.conversations.find({"workspace_id": 7}, ["-updated_at"], 2)
            assert [c.conversation_id for c in found] == ["c2", "c1"]
            plan = " ".join(await repo.conversations.explain(["workspace_id"], ["-updated_at"]))
            assert "USING INDEX" in plan

    run(main)


def test_import_mpstore_does_not_import_asyncio() -> None:
    # The second line is the control: the check does see asyncio once the async API is used.
    code = (
        "import sys, mpstore\n"
        "print('asyncio' in sys.modules)\n"
        "mpstore.AsyncStore\n"
        "print('asyncio' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "True"]


def test_context_variables_reach_the_worker_threads(db_path: str) -> None:
    # Calls run in worker threads that carry the calling task's context, as asyncio.to_thread.
    tag: ContextVar[str] = ContextVar("tag", default="none")
    seen: list[tuple[str, str]] = []

    def hook(name: str) -> None:
        if name == "commit":
            seen.append((threading.current_thread().name, tag.get()))

    async def main() -> None:
        async with mpstore.AsyncStore(db_path, on_event=hook) as store:
            notes = await notes_of(store)
            seen.clear()
            tag.set("single call")
            await notes.upsert(note("a"))
            tag.set("block")
            async with store.write():
                tag.set("inside the block")  # the block's own commit keeps its opener's context
                await notes.upsert(note("b"))

    run(main)
    assert [t for _, t in seen] == ["single call", "block"]
    assert all(name != threading.current_thread().name for name, _ in seen)


# -- write and read blocks ----------------------------------------------------------------------


def test_write_block_commits_and_rolls_back_like_the_sync_one(db_path: str) -> None:
    async def main() -> None:
        async with mpstore.AsyncStore(db_path) as store:
            notes = await notes_of(store)
            async with store.write() as conn:
                assert conn.writable
                await conn.execute("CREATE TABLE t (x INTEGER)")
                result = await conn.execute("INSERT INTO t VALUES (1)")
                assert result.rowcount == 1 and result.lastrowid == 1
                await conn.executemany("INSERT INTO t VALUES (?)", [(2,), (3,)])
                rows = await conn.execute("SELECT x FROM t ORDER BY x")
                assert rows.fetchone() == (1,)
                assert rows.fetchall() == [(2,), (3,)]
                assert rows.fetchone() is None
                # Collection calls of the task join the transaction and see its writes.
                await notes.upsert(note("in-block"))
                assert await notes.get("in-block") == note("in-block")
            assert await store.query("SELECT x FROM t ORDER BY x") == [(1,), (2,), (3,)]
            with pytest.raises(mpstore.TransactionError, match="ended"):
                await conn.execute("SELECT 1")

            with pytest.raises(ZeroDivisionError):
                async with store.write() as conn:
                    await conn.execute("INSERT INTO t VALUES (4)")
                    await notes.upsert(note("rolled-back"))
                    raise ZeroDivisionError
            assert await store.query("SELECT count(*) FROM t") == [(3,)]
            assert await notes.get("rolled-back") is None

            async with store.write() as conn:
                await conn.execute("INSERT INTO t VALUES (5)")
                with pytest.raises(KeyError):
                    async with store.write() as inner:
                        await inner.execute("INSERT INTO t VALUES (6)")
                        await conn.execute("INSERT INTO t VALUES (7)")  # outer conn, inner block
                        raise KeyError("inner only")
                async with store.write() as inner:
                    await inner.execute("INSERT INTO t VALUES (8)")
            assert await store.query("SELECT x FROM t WHERE x > 4 ORDER BY x") == [(5,), (8,)]

            async with store.read() as conn:
                assert not conn.writable
                with pytest.raises(mpstore.TransactionError):
                    await conn.execute("INSERT INTO t VALUES (9)")
                with pytest.raises(mpstore.TransactionError):
                    async with store.write():
                        pass
                with pytest.raises(mpstore.TransactionError):
                    await notes.upsert(note("from a read block"))
            assert await store.query("SELECT count(*) FROM t WHERE x = 9") == [(0,)]
            await asyncio.to_thread(assert_nothing_held, store.sync)

    run(main)


def test_read_block_is_one_snapshot(db_path: str) -> None:
    async def main() -> None:
        async with mpstore.AsyncStore(db_path) as store:
            notes = await notes_of(store)
            go, written = asyncio.Event(), asyncio.Event()

            async def writer() -> None:  # started outside the block, so it does not join it
                await go.wait()
                await notes.upsert(note("late"))
                written.set()

            task = asyncio.create_task(writer())
            async with store.read() as conn:
                before = (await conn.execute("SELECT count(*) FROM notes")).fetchone()
                go.set()
                await written.wait()
                assert (await conn.execute("SELECT count(*) FROM notes")).fetchone() == before
            await task
            assert await notes.get("late") == note("late")

    run(main)


def test_tasks_started_in_a_block_join_it(db_path: str) -> None:
    async def main() -> None:
        async with mpstore.AsyncStore(db_path) as store:
            notes = await notes_of(store)
            with pytest.raises(RuntimeError):
                async with store.write():
                    await asyncio.gather(*(notes.upsert(note(f"g{i}")) for i in range(5)))
                    assert await notes.count() == 5
                    raise RuntimeError("roll all five back")
            assert await notes.count() == 0

    run(main)


def test_write_blocks_of_many_tasks_lose_no_update(db_path: str) -> None:
    async def main() -> int:
        async with mpstore.AsyncStore(db_path) as store:
            notes = await notes_of(store)
            await notes.upsert(note("counter", "0"))

            async def bump(times: int) -> None:
                for _ in range(times):
                    async with store.write():
                        current = await notes.get("counter")
                        assert current is not None
                        await asyncio.sleep(0)  # let the other tasks run in between
                        await notes.upsert(note("counter", str(int(current.text) + 1)))

            await asyncio.gather(*(bump(5) for _ in range(8)))
            final = await notes.get("counter")
            assert final is not None
            return int(final.text)

    assert run(main) == 40


def test_get_then_upsert_without_a_block_loses_updates(db_path: str) -> None:
    # The negative control of the test above: the same read-modify-write, no block around it.
    async def main() -> int:
        async with mpstore.AsyncStore(db_path) as store:
            notes = await notes_of(store)
            await notes.upsert(note("counter", "0"))
            race = asyncio.Barrier(8)

            async def bump() -> None:
                current = await notes.get("counter")
                assert current is not None
                await race.wait()
                await notes.upsert(note("counter", str(int(current.text) + 1)))

            await asyncio.gather(*(bump() for _ in range(8)))
            final = await notes.get("counter")
            assert final is not None
            return int(final.text)

    assert run(main) < 8


# -- the loop never waits -----------------------------------------------------------------------


def _setup_notes(path: str) -> None:
    with mpstore.Store(path) as store:
        store.collection("notes", Note, key="id")


async def _tick_while_writers_wait(
    path: str, blocking: bool, release: Any
) -> tuple[list[float], bool]:
    """16 tasks write while another process holds the gate; return the ticker's timestamps,
    and whether any of the store's events (waiting for the gate among them) ran on the loop's
    thread.

    The holder lets go once the ticker has ticked 50 more times after all 16 writers queued,
    so it lets go only if the loop keeps running. With ``blocking``, a write through a sync
    Store is made on the loop itself while they wait: it blocks the loop until its timeout.
    """
    events = Events()
    queued = events.watch("gate-wait", 16)
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        queued_at: int | None = None
        while not stop.is_set():
            ticks.append(time.perf_counter())
            if queued_at is None and queued.is_set():
                queued_at = len(ticks)
            if queued_at is not None and len(ticks) - queued_at == 50:
                release.set()
            await asyncio.sleep(0.001)

    async with mpstore.AsyncStore(path, timeout=60, on_event=events) as store:
        notes = await notes_of(store)
        tick = asyncio.create_task(ticker())
        writers = [asyncio.create_task(notes.upsert(note(f"w{i}"))) for i in range(16)]
        if blocking:
            await wait_off_loop(queued, "16 writers queued")
            with mpstore.Store(path, timeout=BLOCKED_FOR, on_event=events) as direct:
                direct_notes = direct.collection("notes", Note, key="id")
                with pytest.raises(mpstore.GateTimeout):
                    direct_notes.upsert(note("direct"))  # waits on the loop's thread
        await asyncio.gather(*writers)
        stop.set()
        await tick
        assert await ids(notes) == {f"w{i}" for i in range(16)}
    return ticks, threading.get_ident() in events.threads


@pytest.mark.processes
@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("blocking", [False, True], ids=["awaited", "blocking-control"])
def test_loop_keeps_running_while_writers_wait_for_another_process(
    db_path: str, loop_kind: str, blocking: bool
) -> None:
    _setup_notes(db_path)
    with workers.holding_the_gate(db_path) as holder:
        ticks, on_loop = run(
            lambda: _tick_while_writers_wait(db_path, blocking, holder.release), loop_kind
        )
    # The holder let go, so the loop ticked while 16 writes waited for the gate.
    assert holder.process.exitcode == 0
    if blocking:
        # The check notices a write that waits for the gate on the loop's thread.
        assert on_loop
        assert max(b - a for a, b in itertools.pairwise(ticks)) >= BLOCKED_FOR
    else:
        assert not on_loop
    with mpstore.Store(db_path) as store:
        assert store.query("SELECT x FROM held") == [("uncommitted",)]


# -- cancellation ---------------------------------------------------------------------------


def test_nothing_held_check_notices_a_held_gate_and_a_lost_connection(db_path: str) -> None:
    # The negative control of assert_nothing_held, which every cancellation test relies on.
    with mpstore.Store(db_path) as store:
        assert_nothing_held(store)
        leaked = store._pool.acquire(1.0)
        with pytest.raises(AssertionError, match="still checked out"):
            assert_nothing_held(store)
        store._pool.release(leaked)
        holding, done = threading.Event(), threading.Event()

        def hold() -> None:
            with store.write():
                holding.set()
                done.wait(60)

        thread = threading.Thread(target=hold)
        thread.start()
        try:
            assert holding.wait(60)
            with pytest.raises(mpstore.GateTimeout):
                assert_nothing_held(store)
        finally:
            done.set()
            thread.join()
        assert_nothing_held(store)


async def _cancel_write_paused_at(path: str, point: str) -> set[str]:
    """Cancel a two-record upsert while its thread is paused at ``point``; return what landed."""
    events = Events()
    async with mpstore.AsyncStore(path, on_event=events) as store:
        notes = await notes_of(store)
        released = events.count("gate-released")
        reached = events.pause_at(point)
        task = asyncio.create_task(notes.upsert_many([note("a"), note("b")]))
        await wait_off_loop(reached, point)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The coroutine gave up while its thread was still paused inside the store.
        assert events.count("gate-released") == released
        events.resume.set()
        await events.until("gate-released", released + 1)
        await asyncio.to_thread(assert_nothing_held, store.sync)
        return await ids(notes)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize(
    ("point", "landed"),
    [
        ("gate-wait", set()),
        ("gate-acquired", set()),
        ("begin", {"a", "b"}),
        ("commit", {"a", "b"}),
    ],
)
def test_cancelled_write_is_all_or_nothing_and_lets_go(
    db_path: str, loop_kind: str, point: str, landed: set[str]
) -> None:
    assert run(lambda: _cancel_write_paused_at(db_path, point), loop_kind) == landed


def test_without_abandon_a_cancelled_write_still_lands(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Negative control: without Store.abandon_when the call cancelled before BEGIN writes anyway.
    @contextlib.contextmanager
    def ignore(self: mpstore.Store, event: threading.Event) -> Iterator[None]:
        yield

    monkeypatch.setattr(mpstore.Store, "abandon_when", ignore)
    assert run(lambda: _cancel_write_paused_at(db_path, "gate-acquired")) == {"a", "b"}


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_cancelled_read_waiting_for_the_pool_loses_no_connection(
    db_path: str, loop_kind: str
) -> None:
    async def main() -> None:
        events = Events()
        async with mpstore.AsyncStore(db_path, pool_size=1, on_event=events) as store:
            notes = await notes_of(store)
            await notes.upsert(note("a"))
            holder = Holder(store.sync, "read")
            async with holder:
                waits, releases = events.count("pool-wait"), events.count("pool-released")
                task = asyncio.create_task(notes.get("a"))
                await events.until("pool-wait", waits + 1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert store.sync._pool.in_use == 1  # the holder's: the cancelled call got none
            await events.until("pool-released", releases + 2)
            await asyncio.to_thread(assert_nothing_held, store.sync)
            assert await notes.get("a") == note("a")

    run(main, loop_kind)


async def _cancel_entering_block(path: str, kind: str, point: str) -> tuple[int, list[str]]:
    """Cancel ``async with store.<kind>()`` while its thread is paused at ``point``."""
    events = Events()
    async with mpstore.AsyncStore(path, on_event=events) as store:
        notes = await notes_of(store)
        release_event = "gate-released" if kind == "write" else "pool-released"
        released = events.count(release_event)
        reached = events.pause_at(point)

        async def block() -> None:
            async with store.write() if kind == "write" else store.read() as conn:
                await conn.execute("SELECT 1")

        task = asyncio.create_task(block())
        await wait_off_loop(reached, point)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        events.resume.set()
        await events.until(release_event, released + 1)
        names = list(events.names)
        await asyncio.to_thread(assert_nothing_held, store.sync)
        return await notes.count(), names


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize(
    ("kind", "point"),
    [
        ("write", "gate-wait"),
        ("write", "gate-acquired"),
        ("write", "begin"),
        ("read", "pool-acquired"),
    ],
)
def test_cancel_while_entering_a_block_leaks_nothing(
    db_path: str, loop_kind: str, kind: str, point: str
) -> None:
    count, names = run(lambda: _cancel_entering_block(db_path, kind, point), loop_kind)
    assert count == 0
    if point == "begin":
        # The block did open before it heard of the cancellation, and rolled back at once.
        assert names[-3:] == ["begin", "rollback", "gate-released"]


def test_a_block_that_opens_after_its_task_was_cancelled_must_be_told_to_leave(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Negative control of the test above: drop the exit sent on cancellation and the block,
    # opened just as its task was cancelled, keeps the gate.
    forgotten: list[_async._Level] = []
    real_leave = _async._Level.leave

    def forget(self: _async._Level, commit: bool) -> None:
        forgotten.append(self)
        self.closed = True

    async def main() -> None:
        events = Events()
        async with mpstore.AsyncStore(db_path, on_event=events) as store:
            await notes_of(store)
            reached = events.pause_at("begin")

            async def block() -> None:
                async with store.write():
                    pass

            monkeypatch.setattr(_async._Level, "leave", forget)
            task = asyncio.create_task(block())
            await wait_off_loop(reached, "begin")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            monkeypatch.setattr(_async._Level, "leave", real_leave)
            events.resume.set()
            await events.until("gate-acquired")
            with pytest.raises(mpstore.GateTimeout):
                await asyncio.to_thread(assert_nothing_held, store.sync)
            released = events.count("gate-released")
            forgotten[0].leave(commit=False)  # let it go, so the store can close
            await events.until("gate-released", released + 1)

    run(main)
    assert len(forgotten) == 1


async def _cancel_between_statements(path: str, in_block: bool) -> set[str]:
    """Write "a", then wait forever, then write "b"; cancel during the wait; return what landed.

    With ``in_block`` both writes are in one ``async with store.write()``; without, each is its
    own transaction (the negative control: a half-done change survives the cancellation).
    """
    async with mpstore.AsyncStore(path) as store:
        notes = await notes_of(store)
        first_written, never = asyncio.Event(), asyncio.Event()

        async def two_writes() -> None:
            await notes.upsert(note("a"))
            first_written.set()
            await never.wait()
            await notes.upsert(note("b"))

        async def in_one_block() -> None:
            async with store.write():
                await two_writes()

        task = asyncio.create_task(in_one_block() if in_block else two_writes())
        await first_written.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with store.write():  # queued behind the cancelled block's rollback
            pass
        await asyncio.to_thread(assert_nothing_held, store.sync)
        return await ids(notes)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_cancelled_write_block_keeps_none_of_its_statements(db_path: str, loop_kind: str) -> None:
    assert run(lambda: _cancel_between_statements(db_path, in_block=True), loop_kind) == set()


def test_cancelled_separate_writes_keep_half(db_path: str) -> None:
    # Negative control: the all-or-nothing check above does notice a half-done change.
    assert run(lambda: _cancel_between_statements(db_path, in_block=False)) == {"a"}


async def _cancel_running_call_in_block(path: str, swallow: bool) -> tuple[Any, str, set[str]]:
    """Cancel a task while its ``update()`` runs inside a write block.

    With ``swallow`` the task catches the CancelledError and lets the block end normally.
    Returns the error the task ended with (None if none), record "a"'s text and the keys.
    """
    async with mpstore.AsyncStore(path) as store:
        notes = await notes_of(store)
        await notes.upsert(note("a", "0"))
        inside, go = threading.Event(), threading.Event()

        def slow(n: Note) -> Note:
            inside.set()
            go.wait(60)
            return n.model_copy(update={"text": "1"})

        async def block() -> None:
            async with store.write():
                await notes.upsert(note("b"))
                try:
                    await notes.update("a", slow)
                except asyncio.CancelledError:
                    if not swallow:
                        raise

        task = asyncio.create_task(block())
        await wait_off_loop(inside, "update() started")
        task.cancel()
        if swallow:
            go.set()
        error: Any = None
        try:
            await task  # without swallow: returns while update() still runs in the thread
        except (asyncio.CancelledError, mpstore.TransactionError) as exc:
            error = type(exc)
        if not swallow:
            assert not go.is_set()
            go.set()
        async with store.write():
            pass
        await asyncio.to_thread(assert_nothing_held, store.sync)
        a = await notes.get("a")
        assert a is not None
        return error, a.text, await ids(notes)


@pytest.mark.parametrize(
    ("swallow", "error"),
    [(False, asyncio.CancelledError), (True, mpstore.TransactionError)],
    ids=["propagated", "swallowed"],
)
def test_cancelled_call_inside_a_block_rolls_the_block_back(
    db_path: str, swallow: bool, error: type[BaseException]
) -> None:
    assert run(lambda: _cancel_running_call_in_block(db_path, swallow)) == (error, "0", {"a"})


def test_without_poisoning_a_swallowed_cancellation_commits_the_block(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Negative control: if a cancelled call did not mark its block, the block would commit.
    never = property(lambda self: False, lambda self, value: None)
    monkeypatch.setattr(_async._Level, "poisoned", never, raising=False)
    outcome = run(lambda: _cancel_running_call_in_block(db_path, swallow=True))
    assert outcome == (None, "1", {"a", "b"})


def test_cancel_while_a_block_commits_keeps_the_commit(db_path: str) -> None:
    async def main() -> set[str]:
        events = Events()
        async with mpstore.AsyncStore(db_path, on_event=events) as store:
            notes = await notes_of(store)
            released = events.count("gate-released")
            reached = events.pause_at("commit")

            async def block() -> None:
                async with store.write():
                    await notes.upsert(note("a"))
                    await notes.upsert(note("b"))

            task = asyncio.create_task(block())
            await wait_off_loop(reached, "commit")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            events.resume.set()
            await events.until("gate-released", released + 1)
            await asyncio.to_thread(assert_nothing_held, store.sync)
            return await ids(notes)

    assert run(main) == {"a", "b"}


def test_aclose_waits_for_cancelled_calls_to_give_back_the_gate(db_path: str) -> None:
    async def main() -> mpstore.Store:
        events = Events()
        store = await mpstore.AsyncStore(db_path, on_event=events).open()
        notes = await notes_of(store)
        holder = Holder(store.sync, "write")
        async with holder:
            waits = events.count("gate-wait")
            task = asyncio.create_task(notes.upsert(note("a")))
            await events.until("gate-wait", waits + 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            closing = asyncio.create_task(store.aclose())
            await asyncio.sleep(0)  # one turn of the loop: aclose() starts
            assert store.closed
            with pytest.raises(mpstore.StoreClosed):
                await notes.get("a")
        await closing
        assert store.closed and store._sync is not None
        return store._sync

    sync = run(main)
    assert sync.closed
    with mpstore.Store(db_path, timeout=0.5) as probe:
        with probe.write():
            pass
        assert probe.collection("notes", Note, key="id").count() == 0


# -- timeouts and bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_timeouts_raise_the_sync_errors(db_path: str, loop_kind: str) -> None:
    async def main() -> None:
        async with mpstore.AsyncStore(db_path, timeout=0.2, pool_size=1) as store:
            notes = await notes_of(store)
            await notes.upsert(note("a"))
            async with Holder(store.sync, "write"):
                with pytest.raises(mpstore.GateTimeout) as gate:
                    await notes.upsert(note("b"))
                assert gate.value.path == store.sync.lock_path
                with pytest.raises(mpstore.GateTimeout):
                    async with store.write():
                        pass
            async with Holder(store.sync, "read"):
                with pytest.raises(mpstore.PoolTimeout):
                    await notes.get("a")
                with pytest.raises(mpstore.PoolTimeout):
                    async with store.read():
                        pass
            await notes.upsert(note("b"))
            assert await ids(notes) == {"a", "b"}
            await asyncio.to_thread(assert_nothing_held, store.sync)

    run(main, loop_kind)


def test_bad_input_gets_typed_errors_and_changes_nothing(db_path: str) -> None:
    async def dump(store: mpstore.AsyncStore) -> list[Any]:
        tables = await store.query("SELECT type, name, sql FROM sqlite_master ORDER BY name")
        return [tables, await store.query("SELECT * FROM notes ORDER BY key")]

    async def main() -> None:
        with pytest.raises(ValueError, match="max_threads"):
            mpstore.AsyncStore(db_path, max_threads=0)
        with pytest.raises(ValueError, match="pool_size"):
            await mpstore.AsyncStore(db_path, pool_size=0).open()
        unopened = mpstore.AsyncStore(db_path)
        with pytest.raises(mpstore.StoreClosed, match="not open"):
            await unopened.query("SELECT 1")
        async with mpstore.AsyncStore(db_path) as store:
            notes = await notes_of(store)
            await notes.upsert(note("a"))
            before = await dump(store)
            with pytest.raises(mpstore.RecordTypeError):
                await notes.upsert("not a note")  # type: ignore[arg-type]
            with pytest.raises(mpstore.InvalidKey):
                await notes.upsert(note(""))
            with pytest.raises(mpstore.InvalidKey):
                await notes.get("")
            with pytest.raises(mpstore.KeyNotFound):
                await notes.update("missing", lambda n: n)
            with pytest.raises(mpstore.InvalidKey):
                await notes.update("a", lambda n: n.model_copy(update={"id": "other"}))
            with pytest.raises(mpstore.InvalidName):
                store.collection("bad name", Note, key="id")
            with pytest.raises(mpstore.InvalidName):
                store.collection("ok", Note, key="nope")
            with pytest.raises(mpstore.InvalidName):
                store.collection("ok", Note, key="id", indexes=[("nope",)])
            with pytest.raises(mpstore.RecordTypeError):
                store.collection("ok", dict, key="id")  # type: ignore[type-var]
            with pytest.raises(mpstore.InvalidName):
                await store.collection("notes", Note, key="text").open()
            with pytest.raises(mpstore.InvalidName):
                await notes.find({"text": "x"})
            assert await dump(store) == before
        for closed_call in (notes.get("a"), store.query("SELECT 1"), store.open()):
            with pytest.raises(mpstore.StoreClosed):
                await closed_call
        with pytest.raises(mpstore.StoreClosed):
            async with store.write():
                pass
        await store.aclose()  # idempotent

    run(main)


def test_aclose_while_the_store_is_still_opening_leaks_no_sync_store(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose() finishes its shutdown after the sync store has opened in its thread but before
    open() has resumed on the loop: the store that open() then receives must be closed."""
    opened: list[mpstore.Store] = []
    construct = threading.Event()
    shut_down = threading.Event()

    def slow_store(*args: Any, **kwargs: Any) -> mpstore.Store:
        construct.wait(workers.JOIN_TIMEOUT)
        opened.append(mpstore.Store(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(_async, "Store", slow_store)

    async def main() -> None:
        store = mpstore.AsyncStore(db_path)
        shutdown = store._shut_down

        def recorded_shutdown() -> None:
            shutdown()
            shut_down.set()

        store._shut_down = recorded_shutdown  # type: ignore[method-assign]
        opening = asyncio.create_task(store.open())
        await asyncio.sleep(0)  # open() is now waiting for its thread
        closing = asyncio.create_task(store.aclose())
        await asyncio.sleep(0)  # aclose() has started its shutdown, which waits for the open
        construct.set()
        # Blocking the loop on purpose: open() cannot resume until the shutdown has finished.
        assert shut_down.wait(workers.JOIN_TIMEOUT)
        with pytest.raises(mpstore.StoreClosed):
            await opening
        await closing

    run(main)
    assert len(opened) == 1 and opened[0].closed


def test_aclose_inside_a_block_is_refused(db_path: str) -> None:
    async def main() -> None:
        async with mpstore.AsyncStore(db_path) as store:
            async with store.write():
                with pytest.raises(mpstore.TransactionError, match="aclose"):
                    await store.aclose()
            assert not store.closed

    run(main)


# -- the conversation repository --------------------------------------------------------------


def test_async_conversation_repository(db_path: str) -> None:
    def appender(text: str) -> Callable[[Conversation], Conversation]:
        def append(conv: Conversation) -> Conversation:
            assert conv.context is not None
            messages = [*conv.context.messages, Message(role="user", content=text)]
            context = conv.context.model_copy(update={"messages": messages})
            return conv.model_copy(update={"context": context})

        return append

    async def main() -> None:
        async with mpstore.AsyncStore(db_path) as store:
            repo = mpstore.AsyncConversationRepository(store)
            for i in range(3):
                await repo.upsert_conversation(sample_conversation(f"c{i}", workspace_id=1))
            await repo.upsert_conversation(sample_conversation("other", workspace_id=2))
            got = await repo.get_conversation("c1")
            assert got is not None and got.conversation_id == "c1"
            assert [c.conversation_id for c in await repo.get_all_conversations(1)] == [
                "c2",
                "c1",
                "c0",
            ]
            assert len(await repo.get_all_conversations(1, limit=2)) == 2
            last = await repo.get_last_conversation(1)
            assert last is not None and last.conversation_id == "c2"
            assert await repo.delete_conversation(2, "c0") is False
            assert await repo.delete_conversation(1, "c0") is True
            assert await repo.get_conversation("c0") is None
            start = await repo.get_conversation("c1")
            assert start is not None and start.context is not None
            await asyncio.gather(
                *(
                    repo.modify_conversation("c1", appender(f"t{t}-{i}"))
                    for t in range(8)
                    for i in range(5)
                )
            )
            end = await repo.get_conversation("c1")
            assert end is not None and end.context is not None
            assert len(end.context.messages) == len(start.context.messages) + 40
            with pytest.raises(mpstore.KeyNotFound):
                await repo.modify_conversation("missing", appender("x"))

    run(main)


# -- Hypothesis-drawn interleavings -------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c"])
TEXTS = st.text(alphabet="xyz", max_size=3)
OPERATIONS = st.one_of(
    st.tuples(st.just("upsert"), KEYS, TEXTS),
    st.tuples(st.just("get"), KEYS),
    st.tuples(st.just("delete"), KEYS),
    st.tuples(st.just("update"), KEYS, st.sampled_from(["x", "y", "z"])),
    st.tuples(st.just("block"), KEYS, TEXTS, KEYS, TEXTS),
)
TASKS = st.lists(st.lists(OPERATIONS, min_size=1, max_size=5), min_size=2, max_size=16)

Op = tuple[Any, ...]
OpId = tuple[int, int]

#: Every committed change to the notes table, in the order the writes ran under the gate: a
#: sequence number kept by SQLite itself, in the writing transaction (a rolled-back write or
#: savepoint leaves no entry). Group-committed writes are ordered correctly too.
CHANGE_LOG = [
    "CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, value TEXT)",
    "CREATE TRIGGER notes_insert AFTER INSERT ON notes "
    "BEGIN INSERT INTO changes (key, value) VALUES (NEW.key, NEW.value); END",
    "CREATE TRIGGER notes_update AFTER UPDATE ON notes "
    "BEGIN INSERT INTO changes (key, value) VALUES (NEW.key, NEW.value); END",
    "CREATE TRIGGER notes_delete AFTER DELETE ON notes "
    "BEGIN INSERT INTO changes (key, value) VALUES (OLD.key, NULL); END",
]


def tag(op_id: OpId) -> str:
    """The mark each write leaves in the text it writes, so the change log names its writer."""
    return f"@{op_id[0]}.{op_id[1]}"


class Interleaving:
    """What one concurrent run did: each call's result, the change log, the final records."""

    def __init__(self) -> None:
        self.results: dict[OpId, Any] = {}
        self.log: list[tuple[str, str | None]] = []
        self.final: dict[str, str] = {}


async def run_interleaving(path: str, tasks: list[list[Op]]) -> Interleaving:
    """Run every task's operations concurrently on one AsyncStore; any Timeout fails the run."""
    seen = Interleaving()
    async with mpstore.AsyncStore(path) as store:
        notes = await notes_of(store)
        async with store.write() as conn:
            for statement in CHANGE_LOG:
                await conn.execute(statement)

        async def run_task(t: int, ops: list[Op]) -> None:
            for i, op in enumerate(ops):
                mark = tag((t, i))
                kind = op[0]
                result: Any = None
                if kind == "upsert":
                    await notes.upsert(note(op[1], op[2] + mark))
                elif kind == "get":
                    found = await notes.get(op[1])
                    result = None if found is None else found.text
                elif kind == "delete":
                    result = await notes.delete(op[1])
                elif kind == "update":
                    suffix = f"+{op[2]}{mark}"
                    try:
                        new = await notes.update(
                            op[1], lambda n, s=suffix: n.model_copy(update={"text": n.text + s})
                        )
                        result = new.text
                    except mpstore.KeyNotFound:
                        result = "missing"
                else:
                    async with store.write():
                        await notes.upsert(note(op[1], op[2] + mark))
                        await notes.upsert(note(op[3], op[4] + mark))
                seen.results[(t, i)] = result

        await asyncio.gather(*(run_task(t, ops) for t, ops in enumerate(tasks)))
        rows = await store.query("SELECT key, value FROM changes ORDER BY seq")
        seen.log = [(k, None if v is None else Note.model_validate_json(v).text) for k, v in rows]
        seen.final = {n.id: n.text async for n in notes.scan()}
    return seen


def check_against_model(tasks: list[list[Op]], seen: Interleaving) -> list[str]:
    """Replay the change log on a dict and list every way the run disagrees with it.

    The model: each write took effect at one point of the log, whole (a block's two writes
    side by side), after the writes its task made before it; an update appended to the value
    the key had just then; a delete that returned True removed a record; reads returned a
    value the key had at some point; the final records are the replayed state.
    """
    problems: list[str] = []
    state: dict[str, str] = {}
    history: dict[str, set[str | None]] = {key: {None} for key in "abc"}
    where: dict[OpId, list[int]] = {}
    deleted: Counter[str] = Counter()
    for at, (key, text) in enumerate(seen.log):
        if text is None:
            if key not in state:
                problems.append(f"change {at}: deleted {key!r}, which was absent")
            state.pop(key, None)
            deleted[key] += 1
            history[key].add(None)
            continue
        t, i = (int(n) for n in text.rsplit("@", 1)[1].split("."))
        where.setdefault((t, i), []).append(at)
        op = tasks[t][i]
        mark = tag((t, i))
        if op[0] == "upsert":
            expected = op[2] + mark
        elif op[0] == "update":
            if key not in state:
                problems.append(f"change {at}: {op} updated {key!r}, which was absent")
            expected = state.get(key, "") + f"+{op[2]}{mark}"
            if seen.results.get((t, i)) != expected:
                problems.append(f"{op} returned {seen.results.get((t, i))!r}, not {expected!r}")
        elif op[0] == "block":
            first = len(where[(t, i)]) == 1
            expected = (op[2] if first else op[4]) + mark
            if key != (op[1] if first else op[3]):
                problems.append(f"change {at}: {op} wrote {key!r}")
        else:
            problems.append(f"change {at}: {op} changed {key!r}")
            expected = text
        if text != expected:
            problems.append(f"change {at}: {key!r} became {text!r}, the model says {expected!r}")
        state[key] = text
        history[key].add(text)
    for t, ops in enumerate(tasks):
        last = -1
        for i, op in enumerate(ops):
            result = seen.results.get((t, i), "never returned")
            if result == "never returned":
                problems.append(f"{op} of task {t} never returned")
            at = where.get((t, i), [])
            wanted = {"upsert": 1, "block": 2, "update": 0 if result == "missing" else 1}
            if len(at) != wanted.get(op[0], 0):
                problems.append(f"{op} of task {t} took effect {len(at)} times")
            if op[0] == "block" and len(at) == 2 and at[1] != at[0] + 1:
                problems.append(f"{op} of task {t} was interleaved with other writes: {at}")
            if at and at[0] <= last:
                problems.append(f"{op} of task {t} took effect before the task's earlier write")
            last = max([last, *at])
            if op[0] == "get" and result not in history[op[1]]:
                problems.append(f"{op} of task {t} read {result!r}, never a value of {op[1]!r}")
    for key in "abc":
        said = sum(
            1
            for t, ops in enumerate(tasks)
            for i, op in enumerate(ops)
            if op[:2] == ("delete", key) and seen.results.get((t, i)) is True
        )
        if said != deleted[key]:
            problems.append(f"{said} deletes of {key!r} returned True, {deleted[key]} happened")
    if seen.final != state:
        problems.append(f"final records {seen.final} != model {state}")
    return problems


@given(tasks=TASKS)
def test_drawn_interleavings_match_the_model(tasks: list[list[Op]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        seen = run(lambda: run_interleaving(os.path.join(tmp, "state.db"), tasks))
    assert check_against_model(tasks, seen) == []


def test_the_model_check_notices_lost_torn_reordered_and_phantom_writes(db_path: str) -> None:
    # Negative controls of the check above, each a tampered copy of one real run.
    tasks: list[list[Op]] = [
        [("upsert", "a", "x"), ("update", "a", "y")],
        [("upsert", "a", "z"), ("delete", "b"), ("block", "b", "x", "c", "y")],
        [("update", "c", "z"), ("get", "a"), ("upsert", "c", "")],
    ]
    seen = run(lambda: run_interleaving(db_path, tasks))
    assert check_against_model(tasks, seen) == []

    def tampered(**changes: Any) -> Interleaving:
        copy = Interleaving()
        copy.log, copy.results, copy.final = list(seen.log), dict(seen.results), dict(seen.final)
        for name, value in changes.items():
            setattr(copy, name, value)
        return copy

    def without(key: str) -> dict[str, str]:
        return {k: v for k, v in seen.final.items() if k != key}

    assert check_against_model(tasks, tampered(final=without("b")))  # a lost write
    assert check_against_model(tasks, tampered(final={**seen.final, "z": "x"}))  # a phantom
    assert check_against_model(tasks, tampered(log=seen.log[:-1]))  # an acknowledged write lost
    block = [at for at, (_, text) in enumerate(seen.log) if text and text.endswith("@1.2")]
    torn = list(seen.log)
    torn.insert(block[1], ("a", "x@0.0"))  # another write between a block's two writes
    assert check_against_model(tasks, tampered(log=torn))
    reordered = list(seen.log)
    first, second = (
        next(at for at, (_, text) in enumerate(seen.log) if text and text.endswith(mark))
        for mark in ("@0.0", "@0.1")
    )
    reordered[first], reordered[second] = reordered[second], reordered[first]
    assert check_against_model(tasks, tampered(log=reordered))  # a task's writes out of order
    assert check_against_model(tasks, tampered(results={**seen.results, (1, 1): True}))


def test_async_store_takes_every_setting_of_store() -> None:
    import inspect

    def settings(cls: type) -> dict[str, Any]:
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}

    assert settings(mpstore.AsyncStore) == {**settings(mpstore.Store), "max_threads": 32}


# -- raised in a worker thread, several loops, fork ----------------------------------------------


def _stop_iteration(note: Note) -> Note:
    return next(iter(()))  # type: ignore[no-any-return]


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("in_block", [False, True])
def test_stop_iteration_from_a_call_is_a_runtime_error_not_a_hang(
    db_path: str, loop_kind: str, in_block: bool
) -> None:
    # An asyncio future refuses StopIteration: set on one, the awaiting task would wait for
    # ever. It comes back as generators turn it: a RuntimeError from it.
    async def main() -> None:
        async with mpstore.AsyncStore(db_path) as store:
            notes = store.collection("notes", Note, key="id")
            await notes.upsert(Note(id="a", text=""))
            with pytest.raises(RuntimeError, match="StopIteration") as info:
                if in_block:
                    async with store.write():
                        await asyncio.wait_for(notes.update("a", _stop_iteration), WAIT)
                else:
                    await asyncio.wait_for(notes.update("a", _stop_iteration), WAIT)
            assert isinstance(info.value.__cause__, StopIteration)
            assert await notes.get("a") == Note(id="a", text="")

    run(main, loop_kind)


def test_one_store_opens_and_closes_from_two_loops_at_once(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two threads, each with its own loop: the second open() waits for the first's (held in
    # Store() here), and both aclose() calls wait for the one shutdown.
    construct, b_waiting = threading.Event(), threading.Event()
    real_store = _async.Store

    def held_store(*args: Any, **kwargs: Any) -> mpstore.Store:
        assert construct.wait(WAIT)
        return real_store(*args, **kwargs)

    monkeypatch.setattr(_async, "Store", held_store)
    store = mpstore.AsyncStore(db_path)
    outcomes: dict[str, str] = {}
    both_open = threading.Barrier(2, timeout=WAIT)

    def in_a_loop(name: str) -> None:
        async def main() -> None:
            if name == "B":
                b_waiting.set()
            await store.open()
            both_open.wait()
            await store.aclose()

        try:
            run(main)
            outcomes[name] = "ok"
        except BaseException as exc:  # reported below
            outcomes[name] = repr(exc)

    a = threading.Thread(target=in_a_loop, args=("A",))
    a.start()
    b = threading.Thread(target=in_a_loop, args=("B",))
    b.start()
    assert b_waiting.wait(WAIT)
    construct.set()
    a.join(WAIT)
    b.join(WAIT)
    assert outcomes == {"A": "ok", "B": "ok"} and store.closed


def test_open_racing_aclose_says_store_closed_to_every_opener(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    construct = threading.Event()
    real_store = _async.Store

    def held_store(*args: Any, **kwargs: Any) -> mpstore.Store:
        assert construct.wait(WAIT)
        return real_store(*args, **kwargs)

    monkeypatch.setattr(_async, "Store", held_store)

    async def main() -> list[Any]:
        store = mpstore.AsyncStore(db_path)
        openers = [asyncio.create_task(store.open()) for _ in range(2)]
        await asyncio.sleep(0)  # both wait for the one open, held in Store()
        closing = asyncio.create_task(store.aclose())
        await asyncio.sleep(0)
        construct.set()
        await closing
        return await asyncio.gather(*openers, return_exceptions=True)

    outcomes = run(main)
    assert [type(o) for o in outcomes] == [mpstore.StoreClosed, mpstore.StoreClosed]


@pytest.mark.processes
def test_an_async_store_works_in_a_forked_child(db_path: str) -> None:
    # The child has none of the parent's worker threads; the store starts its own there.
    async def parent_side() -> mpstore.AsyncStore:
        store = mpstore.AsyncStore(db_path)
        await store.open()
        await store.collection("notes", Note, key="id").upsert(Note(id="parent", text=""))
        return store

    store = run(parent_side)

    async def child_side() -> list[str]:
        notes = store.collection("notes", Note, key="id")
        await asyncio.wait_for(notes.upsert(Note(id="child", text="")), WAIT)
        async with store.write():  # a block's thread, made and tracked in the child
            await notes.upsert(Note(id="child block", text=""))
        return [n.id async for n in notes.scan()]

    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    child = fork.Process(target=lambda: send.send(run(child_side)), daemon=True)
    child.start()
    send.close()
    try:
        assert receive.poll(WAIT), "the child's async call never returned"
        assert receive.recv() == ["child", "child block", "parent"]
    finally:
        child.kill()
        child.join()
        run(store.aclose)


def test_an_open_every_caller_gave_up_on_leaves_no_store_open(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    construct = threading.Event()
    opened: list[mpstore.Store] = []
    real_store = _async.Store

    def held_store(*args: Any, **kwargs: Any) -> mpstore.Store:
        assert construct.wait(WAIT)
        opened.append(real_store(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(_async, "Store", held_store)

    async def main() -> mpstore.AsyncStore:
        store = mpstore.AsyncStore(db_path)
        opening = asyncio.create_task(store.open())
        await asyncio.sleep(0)  # waiting for the open, held in Store()
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        construct.set()
        assert store._opening is not None
        with pytest.raises(mpstore.StoreClosed):
            await asyncio.wrap_future(store._opening)
        return store

    store = run(main)
    assert store._sync is None and len(opened) == 1 and opened[0].closed
    run(store.open)  # asked for again: opened again
    assert store._sync is not None and not store._sync.closed
    run(store.aclose)


def test_a_write_through_another_store_inside_a_write_block_fails_at_once(
    tmp_path: Any,
) -> None:
    # The block's thread holds the gate and the block waits for the task, so such a write
    # would only wait for the gate until it timed out. As in the sync API, it is refused.
    path = str(tmp_path / "two.db")

    async def main() -> None:
        async with (
            mpstore.AsyncStore(path, timeout=WAIT) as first,
            mpstore.AsyncStore(path, timeout=WAIT) as second,
        ):
            mine, theirs = await notes_of(first), await notes_of(second)
            async with first.write():
                await mine.upsert(note("a"))
                with pytest.raises(mpstore.TransactionError, match="open write block"):
                    await theirs.upsert(note("b"))
                with pytest.raises(mpstore.TransactionError, match="open write block"):
                    async with second.write():
                        pass
                assert await theirs.get("a") is None  # reading is fine: committed data only
                # A task started here may outlive the block: its write waits for the gate.
                later = asyncio.create_task(theirs.upsert(note("c")))
            await later
            await theirs.upsert(note("d"))
            assert await ids(theirs) == {"a", "c", "d"}

    run(main)


# -- found in review ------------------------------------------------------------------------


def test_a_block_left_from_another_task_still_ends_and_lets_the_gate_go(db_path: str) -> None:
    # An async-generator fixture or an AsyncExitStack may enter a block in one task and leave
    # it in another, whose context cannot reset the block's variable.
    async def main() -> None:
        async with mpstore.AsyncStore(db_path, timeout=WAIT) as store:
            notes = await notes_of(store)
            block = store.write()

            async def set_up() -> None:
                await block.__aenter__()
                await notes.upsert(note("in the block"))

            await asyncio.create_task(set_up())
            await asyncio.create_task(block.__aexit__(None, None, None))
            await notes.upsert(note("after"))
            assert await ids(notes) == {"in the block", "after"}

    run(main)


def test_an_open_cancelled_after_another_caller_got_the_store_leaves_it_open(
    db_path: str,
) -> None:
    async def main() -> None:
        store = mpstore.AsyncStore(db_path)
        first = asyncio.create_task(store.open())
        while store._sync is None:
            await asyncio.sleep(0)  # a turn of the loop, until the open is done
        await store.open()  # told at once that it is open
        first.cancel()  # before the first opener resumed
        with contextlib.suppress(asyncio.CancelledError):
            await first
        assert await store.query("SELECT 1") == [(1,)]
        await store.aclose()

    for _ in range(20):
        run(main)


def test_a_block_whose_commit_was_sent_before_a_call_was_cancelled_says_it_committed(
    db_path: str,
) -> None:
    # The child task's update joins the block; it is cancelled (its own timeout, say) while
    # the block's task waits for the commit it has already sent.
    async def main() -> tuple[str, str]:
        async with mpstore.AsyncStore(db_path, timeout=WAIT) as store:
            notes = await notes_of(store)
            await notes.upsert(note("a", "0"))
            inside, go = threading.Event(), threading.Event()
            leaving = asyncio.Event()

            def slow(n: Note) -> Note:
                inside.set()
                assert go.wait(WAIT)
                return n.model_copy(update={"text": "1"})

            async def cancel_once_leaving(child: asyncio.Task[Note]) -> None:
                await leaving.wait()
                child.cancel()
                go.set()

            outcome = "committed"
            try:
                async with store.write():
                    await notes.upsert(note("b"))
                    child = asyncio.create_task(notes.update("a", slow))
                    helper = asyncio.create_task(cancel_once_leaving(child))
                    await wait_off_loop(inside, "the child's update to start")
                    leaving.set()
            except mpstore.TransactionError:
                outcome = "said rolled back"
            await helper
            with contextlib.suppress(asyncio.CancelledError):
                await child
            kept = "b kept" if await notes.get("b") is not None else "b rolled back"
            return outcome, kept

    assert run(main) == ("committed", "b kept")


def test_a_collection_first_used_in_a_rolled_back_block_works_after(db_path: str) -> None:
    async def main() -> None:
        async with mpstore.AsyncStore(db_path, timeout=WAIT) as store:
            notes = store.collection("notes", Note, key="id")
            with pytest.raises(ValueError, match="request failed"):
                async with store.write():
                    await notes.upsert(note("a"))  # its first use makes the table, here
                    raise ValueError("request failed")
            await notes.upsert(note("b"))
            assert await ids(notes) == {"b"}

    run(main)


def test_a_cancelled_call_in_a_read_block_inside_a_write_block_rolls_the_write_back(
    db_path: str,
) -> None:
    # The read block shares the write block's transaction and has no savepoint of its own:
    # the cancelled update may have run, so the write block must not commit.
    async def main() -> str:
        async with mpstore.AsyncStore(db_path, timeout=WAIT) as store:
            notes = await notes_of(store)
            await notes.upsert(note("a", "0"))
            inside, go = threading.Event(), threading.Event()

            def slow(n: Note) -> Note:
                inside.set()
                assert go.wait(WAIT)
                return n.model_copy(update={"text": "1"})

            with pytest.raises(mpstore.TransactionError, match="rolled back"):
                async with store.write():
                    with pytest.raises(mpstore.TransactionError, match="rolled back"):
                        async with store.read():
                            update = asyncio.create_task(notes.update("a", slow))
                            await wait_off_loop(inside, "the update to start")
                            update.cancel()
                            go.set()
                            with contextlib.suppress(asyncio.CancelledError):
                                await update
            found = await notes.get("a")
            assert found is not None
            return found.text

    assert run(main) == "0"


def test_a_child_forked_inside_a_block_does_not_use_the_parents_block(db_path: str) -> None:
    def child(store: mpstore.AsyncStore, send: Any) -> None:
        async def child_side() -> str:
            got = await asyncio.wait_for(store.collection("notes", Note, key="id").get("a"), WAIT)
            return got.text if got is not None else "none"

        try:
            send.send(run(child_side))
        except BaseException as exc:  # sent to the parent, which fails the test with it
            send.send(f"{type(exc).__name__}: {exc}")

    async def main() -> str:
        async with mpstore.AsyncStore(db_path, timeout=WAIT) as store:
            await (await notes_of(store)).upsert(note("a", "parent's"))
            fork = multiprocessing.get_context("fork")
            receive, send = fork.Pipe(duplex=False)
            async with store.read():
                process = fork.Process(target=child, args=(store, send), daemon=True)
                process.start()
            send.close()
            try:
                assert await asyncio.to_thread(receive.poll, WAIT), "the child never answered"
                return str(receive.recv())
            finally:
                process.kill()
                process.join()

    assert run(main) == "parent's"


def test_reads_go_on_while_every_worker_thread_waits_for_the_gate(db_path: str) -> None:
    async def main() -> None:
        async with mpstore.AsyncStore(db_path, timeout=WAIT, max_threads=2) as store:
            notes = await notes_of(store)
            await notes.upsert(note("a"))
            holding, release = threading.Event(), threading.Event()

            def hold_the_gate() -> None:
                with store.sync.write():
                    holding.set()
                    assert release.wait(WAIT)

            holder = threading.Thread(target=hold_the_gate)
            holder.start()
            await wait_off_loop(holding, "the gate to be taken")
            writes = [asyncio.create_task(notes.upsert(note(f"w{i}"))) for i in range(2)]
            try:
                assert await asyncio.wait_for(notes.get("a"), WAIT) == note("a")
                assert await asyncio.wait_for(notes.count(), WAIT) == 1
                assert not any(w.done() for w in writes)
            finally:
                release.set()
                await asyncio.gather(*writes)
                await asyncio.to_thread(holder.join)

    run(main)


def test_a_co_opener_cancelled_after_open_returned_to_another_leaves_the_store_open(
    db_path: str,
) -> None:
    async def main() -> None:
        store = mpstore.AsyncStore(db_path, max_threads=1)  # one thread: FIFO, see below
        later: asyncio.Task[mpstore.AsyncStore] | None = None

        async def first_opener() -> None:
            await store.open()  # told the store is open...
            assert later is not None
            later.cancel()  # ...as the other opener, still waiting, is cancelled

        first = asyncio.create_task(first_opener())
        await asyncio.sleep(0)  # a turn of the loop: the first opener starts the open
        later = asyncio.create_task(store.open())
        await first
        with contextlib.suppress(asyncio.CancelledError):
            await later
        # Whatever the cancelled opener handed to the worker thread has run after this.
        await asyncio.wrap_future(store._executor.submit(lambda: None))
        assert await store.query("SELECT 1") == [(1,)]
        await store.aclose()

    run(main)


def test_an_open_that_comes_as_an_abandoned_open_closes_its_store_opens_it_again(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The only opener is cancelled; the open under way then closes the store it made, and a
    # second open() joins it just then. Nobody closed the store: the second gets it open.
    may_open, closing, joined = threading.Event(), threading.Event(), threading.Event()

    class Paced(mpstore.Store):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            assert may_open.wait(WAIT)
            super().__init__(*args, **kwargs)

        def close(self) -> None:
            if not closing.is_set():
                closing.set()
                assert joined.wait(WAIT)
            super().close()

    monkeypatch.setattr(_async, "Store", Paced)

    async def main() -> None:
        store = mpstore.AsyncStore(db_path, max_threads=1)
        first = asyncio.create_task(store.open())
        await asyncio.sleep(0)  # a turn of the loop: the open starts in a worker thread
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        may_open.set()  # it finds every caller gone, and closes what it opened
        await wait_off_loop(closing, "the abandoned open to close its store")
        second = asyncio.create_task(store.open())
        await asyncio.sleep(0)  # a turn of the loop: it joins the open under way
        joined.set()
        assert await asyncio.wait_for(second, WAIT) is store
        assert await store.query("SELECT 1") == [(1,)]
        await store.aclose()

    run(main)


def test_aclose_as_the_last_cancelled_opener_gives_its_store_back_still_closes_it(
    db_path: str,
) -> None:
    # The open ends just as its only caller is cancelled, which hands the store to a worker
    # thread to close; aclose() must not begin in between (it would shut the threads down
    # first, and neither would close the store).
    async def main() -> mpstore.Store:
        store = mpstore.AsyncStore(db_path, max_threads=1)
        executor = store._executor
        submit, shutdown = executor.submit, executor.shutdown
        shut_down = threading.Event()
        given_back: list[mpstore.Store] = []

        def shutting_down(*args: Any, **kwargs: Any) -> None:
            shutdown(wait=False)
            shut_down.set()
            shutdown(*args, **kwargs)

        def aclose_first(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, mpstore.Store) and fn.__name__ == "close":
                given_back.append(owner)
                if store._threads_lock.acquire(blocking=False):  # aclose() could begin here
                    store._threads_lock.release()
                    store._start_shutdown()
                    assert shut_down.wait(WAIT)
            return submit(fn, *args, **kwargs)

        executor.submit = aclose_first  # type: ignore[method-assign]
        executor.shutdown = shutting_down  # type: ignore[method-assign]
        opening = asyncio.create_task(store.open())
        await asyncio.sleep(0)  # a turn of the loop: the open starts in a worker thread
        opening.cancel()
        assert store._opening is not None
        # The loop waits here, so the open ends before the task hears it was cancelled.
        concurrent.futures.wait([store._opening], timeout=WAIT)
        with pytest.raises(asyncio.CancelledError):
            await opening
        await store.aclose()
        assert len(given_back) == 1
        return given_back[0]

    assert run(main).closed


def test_an_open_cancelled_after_a_failed_one_still_closes_what_it_opens(tmp_path: Any) -> None:
    async def main() -> bool:
        store = mpstore.AsyncStore(str(tmp_path / "later" / "state.db"))
        with pytest.raises(mpstore.DirectoryNotFound):
            await store.open()
        (tmp_path / "later").mkdir()
        opening = asyncio.create_task(store.open())
        await asyncio.sleep(0)  # a turn of the loop: the open starts in a worker thread
        opening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await opening
        assert store._opening is not None
        with contextlib.suppress(mpstore.MpstoreError):
            await asyncio.wrap_future(store._opening)
        kept_open = store._sync is not None and not store._sync.closed
        await store.aclose()
        return kept_open

    assert run(main) is False


_ABANDONED_OPEN = """
import asyncio, sys
import mpstore

async def main():
    store = mpstore.AsyncStore(sys.argv[1])
    opening = asyncio.create_task(store.open())
    await asyncio.sleep(0)  # a turn of the loop: the open starts in a worker thread
    opening.cancel()
    try:
        await opening
    except asyncio.CancelledError:
        pass
    await store.aclose()

asyncio.run(main())
"""


def test_an_open_every_caller_gave_up_on_logs_no_unretrieved_error(db_path: str) -> None:
    # Its outcome, StoreClosed, is nobody's to see: asyncio must not log it at exit.
    done = subprocess.run(
        [sys.executable, "-c", _ABANDONED_OPEN, db_path],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stderr
    assert "never retrieved" not in done.stderr
