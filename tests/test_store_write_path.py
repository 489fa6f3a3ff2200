"""The durable stores' write path: FileStore's on-loop appends and group-committing syncer,
SQLiteStore's gathered transactions (docs/stores.md, "Write path").

What the conformance suite cannot see: where the work happens (which thread, how many syncs
and transactions), and what happens when a write, a sync or a batch fails, or a caller is
cancelled, while other work is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from mqtt_persist.errors import SessionLocked, StoreError
from mqtt_persist.session.state import (
    InboundReceived,
    MessageAdded,
    MessageRemoved,
    Operation,
    PacketIdAssigned,
    SubscriptionSet,
)
from mqtt_persist.stores import FileStore, SQLiteStore
from mqtt_persist.stores.file import snapshot as file_snapshot
from mqtt_persist.stores.file import writer as file_writer
from mqtt_persist.stores.sqlite import operations as sqlite_operations
from tests.support.fake_aio import FAKE_AIO_THREAD, use_sync_path
from tests.test_stores import FakeClock, journal_records, msg, replay

SYNCS = tuple(name for name in ("fsync", "fdatasync") if hasattr(os, name))


def publish(seq: int) -> list[Operation]:
    """What one sequential publish commits: the message, its packet ID, the last one's removal."""
    ops: list[Operation] = [MessageRemoved(seq - 1)] if seq > 1 else []
    return [*ops, MessageAdded(msg(seq)), PacketIdAssigned(seq, seq)]


class SyncGate:
    """Replaces os.fsync/os.fdatasync: counts the calls, and can hold them until opened.

    ``entered`` is set when a held sync started; ``fail_fds`` makes syncs of those
    descriptors raise EIO (as Linux reports a failed writeback).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, hold: bool = False) -> None:
        self.calls: list[tuple[str, int]] = []
        self.threads: set[str] = set()
        self.fail_fds: set[int] = set()
        self.entered = threading.Event()
        self._open = threading.Event()
        if not hold:
            self._open.set()
        for name in SYNCS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name: str, real: Callable[[int], None]) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            self.calls.append((name, fd))
            self.threads.add(threading.current_thread().name)
            self.entered.set()
            if not self._open.wait(timeout=10):
                raise AssertionError("a sync was held for 10 s: the test never opened the gate")
            if fd in self.fail_fds:
                raise OSError(errno.EIO, "Input/output error (simulated)")
            real(fd)

        return sync

    def open(self) -> None:
        self._open.set()

    async def wait_entered(self) -> None:
        for _ in range(1000):
            if self.entered.is_set():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("no sync started within 5 s")


@pytest.fixture(params=["thread", "aio"])
def sync_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """FileStore's two ways to sync a record written on the loop: the syncer thread, or AIO
    completed on the loop (here the fake of ``tests/support/fake_aio.py``, whose syncs are
    ``os.fdatasync`` calls that SyncGate holds and counts)."""
    path: str = request.param
    use_sync_path(monkeypatch, path)
    return path


@pytest.fixture
def thread_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AIO: what the syncer thread does (its rounds, its helper threads)."""
    use_sync_path(monkeypatch, "thread")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[FileStore]:
    s = FileStore(tmp_path / "sessions", clock=clock)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def reloaded(store: FileStore, client_id: str) -> Any:
    """The session as a fresh FileStore on the same directory reads it from disk."""
    await store.release(client_id)
    async with FileStore(store.directory) as other:
        return await other.load(client_id)


# --- FileStore: where the work happens ----------------------------------------------------------


async def test_without_fsync_an_append_never_leaves_the_loop(tmp_path: Path) -> None:
    async with FileStore(tmp_path / "s", fsync=False) as store:
        await store.apply("a", publish(1))  # creates the journal: a job on the worker
        for seq in range(2, 5):
            # A coroutine that never waits for another thread finishes on its first step.
            coroutine = store.apply("a", publish(seq))
            with pytest.raises(StopIteration):
                coroutine.send(None)
        assert await store.load("a") == replay("a", [publish(s) for s in range(1, 5)])


async def test_appends_are_written_on_the_loop_and_synced_on_the_syncer(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    await store.apply("a", publish(1))
    writers: set[str] = set()
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        writers.add(threading.current_thread().name)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    gate = SyncGate(monkeypatch)
    for seq in range(2, 12):
        await store.apply("a", publish(seq))
    assert writers == {threading.current_thread().name}
    syncing = {"thread": "mqtt-persist-file-sync", "aio": FAKE_AIO_THREAD}[sync_path]
    assert gate.threads == {syncing}
    assert len(gate.calls) == 10


async def test_concurrent_applies_share_syncs(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    await store.apply("a", publish(1))
    gate = SyncGate(monkeypatch, hold=True)
    batches = [[MessageAdded(msg(seq)), InboundReceived(seq)] for seq in range(2, 102)]
    tasks = [asyncio.ensure_future(store.apply("a", batch)) for batch in batches]
    await gate.wait_entered()  # every task wrote its record before the first sync returned
    assert not any(task.done() for task in tasks)
    gate.open()
    await asyncio.gather(*tasks)
    # The first sync covered what was written before it started, one more the rest.
    assert 1 <= len(gate.calls) <= 2, gate.calls
    expected = replay("a", [publish(1), *batches])
    assert await store.load("a") == expected
    assert await reloaded(store, "a") == expected


async def test_sessions_of_one_store_share_sync_rounds(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, thread_path: None
) -> None:
    clients = [f"c{n}" for n in range(10)]
    for client_id in clients:
        await store.apply(client_id, publish(1))
    rounds: list[int] = []
    real_round = file_writer._sync_and_settle

    def counted_round(commits: list[Any], *rest: Any) -> Any:
        rounds.append(len(commits))
        return real_round(commits, *rest)

    monkeypatch.setattr(file_writer, "_sync_and_settle", counted_round)
    gate = SyncGate(monkeypatch, hold=True)

    async def publisher(client_id: str) -> None:
        for seq in range(2, 12):
            await store.apply(client_id, publish(seq))

    running = asyncio.gather(*(publisher(client_id) for client_id in clients))
    await gate.wait_entered()
    gate.open()
    await running
    # The sync thread may take the first round as soon as one or two sessions have written
    # (it races the event loop), but while that round's sync was held every other session
    # wrote its record: the next round took all of them, one sync per session in it.
    assert sum(rounds) == 100
    assert rounds[1] >= len(clients) - rounds[0], rounds
    assert max(rounds) >= len(clients) // 2, rounds
    assert len(rounds) <= 92
    assert len(gate.calls) == 100  # a session has one record per round: one sync each
    # The sessions of a round were synced side by side (the file system commits them at once).
    assert any(name.startswith("mqtt-persist-file-sync-helper") for name in gate.threads)
    assert {fd for _, fd in gate.calls} == {store._sessions[c].fd for c in clients}
    for client_id in clients:
        assert await reloaded(store, client_id) == replay(
            client_id, [publish(s) for s in range(1, 12)]
        )


async def test_the_index_shows_a_record_only_once_it_is_durable(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    await store.apply("a", publish(1))
    gate = SyncGate(monkeypatch, hold=True)
    applying = asyncio.ensure_future(store.apply("a", publish(2)))
    await gate.wait_entered()
    # Written, not yet durable: the index (what load and read_queued read) does not have it.
    assert 2 not in store._sessions["a"].index.inflight
    # A load issued now is queued behind the apply: it waits for the sync, then sees the batch.
    loading = asyncio.ensure_future(store.load("a"))
    await asyncio.sleep(0.05)
    assert not loading.done() and not applying.done()
    gate.open()
    await applying
    assert await loading == replay("a", [publish(1), publish(2)])


async def test_calls_keep_their_order_when_a_job_is_queued(tmp_path: Path) -> None:
    async with FileStore(tmp_path / "s", fsync=False) as store:
        await store.apply("a", [MessageAdded(msg(1))])
        # read_queued goes first (a job); the apply made after it must not overtake it.
        queued, _ = await asyncio.gather(
            store.read_queued("a", 0, 10), store.apply("a", [MessageAdded(msg(2))])
        )
        assert [m.seq for m in queued] == [1]
        assert [m.seq for m in await store.read_queued("a", 0, 10)] == [1, 2]


async def test_apply_cancelled_while_its_record_syncs_still_happens(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    await store.apply("a", publish(1))
    gate = SyncGate(monkeypatch, hold=True)
    task = asyncio.ensure_future(store.apply("a", publish(2)))
    await gate.wait_entered()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.open()
    # Its record was written before the caller was cancelled: the batch happened, whole.
    expected = replay("a", [publish(1), publish(2)])
    assert await store.load("a") == expected
    assert await reloaded(store, "a") == expected


async def test_close_while_applies_wait_for_their_sync_lets_them_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    store = FileStore(tmp_path / "s")
    await store.apply("a", publish(1))
    gate = SyncGate(monkeypatch, hold=True)
    applying = [asyncio.ensure_future(store.apply("a", publish(seq))) for seq in (2, 3, 4)]
    await gate.wait_entered()
    closing = asyncio.ensure_future(store.close())
    later = asyncio.ensure_future(store.apply("a", publish(5)))  # after close: reopens
    await asyncio.sleep(0.05)
    assert not closing.done() and not any(task.done() for task in applying)
    gate.open()
    with anyio.fail_after(5):
        await asyncio.gather(*applying, closing)
        await later
        expected = replay("a", [publish(s) for s in range(1, 6)])
        assert await store.load("a") == expected
        await store.apply("a", publish(6))  # on the loop again, with a new AIO context
        await store.close()
    assert store._syncer._loops == {}
    async with FileStore(tmp_path / "s") as reopened:
        assert await reopened.load("a") == replay("a", [publish(s) for s in range(1, 7)])


# --- FileStore: failures ------------------------------------------------------------------------


async def test_a_failed_sync_fails_that_session_for_the_rest_of_the_process(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    await store.apply("a", publish(1))
    await store.apply("b", publish(1))
    gate = SyncGate(monkeypatch, hold=True)
    gate.fail_fds.add(store._sessions["a"].fd or -1)
    first = [asyncio.ensure_future(store.apply("a", publish(seq))) for seq in (2, 3, 4)]
    other = asyncio.ensure_future(store.apply("b", publish(2)))
    await gate.wait_entered()
    gate.open()
    for task in first:  # every record the failed sync was to cover
        with pytest.raises(StoreError, match="could not sync"):
            await task
    await other  # another session's journal is not affected
    gate.fail_fds.clear()  # the disk "recovered": too late, the pages may be gone
    journal = store.journal_path("a")
    size = journal.stat().st_size
    for ops in (publish(5), []):
        with pytest.raises(StoreError, match="could not sync"):
            await store.apply("a", ops)
    assert journal.stat().st_size == size  # nothing more was written to it
    with pytest.raises(StoreError):
        await store.load("a")
    with pytest.raises(StoreError):
        await store.read_queued("a", 0, 10)
    await store.release("a")
    assert journal.stat().st_size == size  # not even the last access
    async with FileStore(store.directory) as other_store:  # the same process: still refused
        with pytest.raises(StoreError, match="failed earlier in this process"):
            await other_store.load("a")
        await other_store.delete("a")  # what is left to do here: start over
        await other_store.apply("a", publish(1))
        assert await other_store.load("a") == replay("a", [publish(1)])
    await store.apply("b", publish(3))
    assert await store.load("b") == replay("b", [publish(s) for s in (1, 2, 3)])


async def test_a_failed_sync_in_another_process_is_not_this_ones_business(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync_path: str
) -> None:
    """A restarted process reads what the disk holds: the refusal is per process."""
    store = FileStore(tmp_path / "s")
    await store.apply("a", publish(1))
    gate = SyncGate(monkeypatch)
    gate.fail_fds.add(store._sessions["a"].fd or -1)
    with pytest.raises(StoreError):
        await store.apply("a", publish(2))
    await store.close()
    code = (
        "import asyncio, sys\n"
        "from mqtt_persist.stores import FileStore\n"
        "async def main():\n"
        "    async with FileStore(sys.argv[1]) as s:\n"
        "        state = await s.load('a')\n"
        "        print(sorted(state.messages))\n"
        "asyncio.run(main())\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(tmp_path / "s"), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0
    # The page cache still holds the record the failed sync was for; a new process reads it.
    assert out.decode().strip() in ("[1]", "[2]")


async def test_a_failed_write_leaves_no_partial_record(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.apply("a", publish(1))
    journal = store.journal_path("a")
    size = journal.stat().st_size
    real_pwrite = os.pwrite
    calls: list[int] = []

    def half_then_full(fd: int, data: Any, offset: int) -> int:
        calls.append(len(data))
        if len(calls) == 1:  # what a nearly full disk does: a short write, then ENOSPC
            return real_pwrite(fd, bytes(data)[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(os, "pwrite", half_then_full)
    big = [MessageAdded(msg(seq, payload=b"p" * 500)) for seq in range(2, 6)]
    with pytest.raises(StoreError, match="No space left"):
        await store.apply("a", big)
    assert len(calls) == 2  # the half was written, the rest refused
    assert journal.stat().st_size == size  # the half record was cut off again
    monkeypatch.undo()
    await store.apply("a", publish(2))
    expected = replay("a", [publish(1), publish(2)])
    assert await store.load("a") == expected
    assert await reloaded(store, "a") == expected


async def test_a_failed_write_that_cannot_be_undone_is_repaired_on_the_next_call(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.apply("a", publish(1))
    real_pwrite = os.pwrite

    calls: list[int] = []

    def half(fd: int, data: Any, offset: int) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_pwrite(fd, bytes(data)[: len(data) // 2], offset)
        raise OSError(errno.EIO, "Input/output error (simulated)")

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error (simulated)")

    monkeypatch.setattr(os, "pwrite", half)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(StoreError, match="Input/output error"):
        await store.apply("a", publish(2))
    monkeypatch.undo()
    # The half record is still in the file; the next call reads the journal again, cuts the
    # torn tail, and carries on.
    await store.apply("a", publish(3))
    expected = replay("a", [publish(1), publish(3)])
    assert await store.load("a") == expected
    assert await reloaded(store, "a") == expected


@pytest.mark.parametrize("where", ["loop", "worker"])
async def test_a_syncer_thread_that_cannot_start_fails_the_apply_and_wedges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_path: None, where: str
) -> None:
    """The record is written, then no thread can sync it: the apply fails with StoreError
    (not the thread's RuntimeError), the record is cut off again (a failed apply leaves
    nothing, as a failed write does), and the next call reads the session from the file."""
    # Not the store fixture: were the worker wedged, closing the store would hang the test.
    store = FileStore(tmp_path / "s")
    await store.apply("a", publish(1))  # a new journal: a rewrite on the worker, no syncer
    if where == "worker":
        # A store that has not opened the session yet appends as a job on its worker.
        await store.close()
        store = FileStore(tmp_path / "s")
    journal = store.journal_path("a")
    before = journal_records(journal)
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "mqtt-persist-file-sync":
            raise RuntimeError("can't start new thread (simulated)")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(StoreError, match=r"no thread to sync .*simulated.*nothing of it"):
        await store.apply("a", publish(2))
    monkeypatch.undo()
    assert journal_records(journal) == before  # the disk does not hold the record either
    # The record never reached a syncer: the next job must not wait for it.
    with anyio.fail_after(5):
        await store.apply("a", publish(3))
        state = await store.load("a")
    assert state == replay("a", [publish(1), publish(3)])
    with anyio.fail_after(5):
        await store.close()
    assert await reloaded(store, "a") == state


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_a_worker_thread_that_cannot_start_fails_the_call_and_wedges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    store: FileStore | SQLiteStore
    store = FileStore(tmp_path / "s") if kind == "file" else SQLiteStore(tmp_path / "s.db")
    name = store._worker._name
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == name:
            raise RuntimeError("can't start new thread (simulated)")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(StoreError, match=r"worker thread.*simulated"):
        await store.apply("a", publish(1))
    monkeypatch.undo()
    # The next call starts a thread of its own; the one that never ran is not waited for.
    with anyio.fail_after(5):
        await store.apply("a", publish(1))
        assert await store.load("a") == replay("a", [publish(1)])
        await store.close()


async def test_a_job_its_closed_loop_never_heard_back_from_leaves_the_fast_path_open(
    tmp_path: Path,
) -> None:
    """One loop after another: a job whose caller's loop closed before it finished still
    counts as finished, so the next loop appends on the loop again."""
    store = FileStore(tmp_path / "s", fsync=False)
    started, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def hold() -> None:
        started.set()
        release.wait(10)

    def on_another_loop() -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(store.apply("a", publish(1)))
            job = loop.create_task(store._run("a", hold))
            loop.run_until_complete(asyncio.to_thread(started.wait, 10))
            job.cancel()  # the job runs on; its loop closes before it reports
            loop.run_until_complete(asyncio.gather(job, return_exceptions=True))
        except BaseException as exc:
            failures.append(exc)
        finally:
            loop.close()
            release.set()

    thread = threading.Thread(target=on_another_loop)
    thread.start()
    await asyncio.to_thread(thread.join, 30)
    assert not failures and started.is_set()
    with anyio.fail_after(5):
        assert await store.exists("a")  # a job behind the held one: that one is through
        coroutine = store.apply("a", publish(2))
        with pytest.raises(StopIteration):  # written on the loop, no job
            coroutine.send(None)
        assert await store.load("a") == replay("a", [publish(1), publish(2)])
        await store.close()


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (root and CAP_SYS_ADMIN needed): {exc}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(512))
    finally:
        os.close(fd)


async def test_a_full_disk_fails_the_apply_and_leaves_the_journal_whole(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "128k") as disk:
        async with FileStore(disk / "sessions") as store:
            await store.apply("a", publish(1))
            journal = store.journal_path("a")
            filler = disk / "filler"
            _fill(filler)
            committed = [publish(1)]
            failed = None
            for seq in range(2, 200):
                batch = [MessageAdded(msg(seq, payload=b"q" * 300)), SubscriptionSet(f"t/{seq}", 1)]
                before = journal_records(journal)
                try:
                    await store.apply("a", batch)
                except StoreError as exc:
                    failed = exc
                    # Cut back to the records before it: no torn record, no preallocated zeros.
                    assert journal.read_bytes() == before
                    break
                committed.append(batch)
            assert failed is not None and "No space left" in str(failed)
            assert await store.load("a") == replay("a", committed)
            filler.unlink()
            await store.apply("a", publish(500))
            committed.append(publish(500))
            assert await store.load("a") == replay("a", committed)
        async with FileStore(disk / "sessions") as reopened:
            assert await reopened.load("a") == replay("a", committed)


async def test_a_rewrite_interleaved_with_appends_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rewriting = threading.Event()
    real_write_snapshot = file_snapshot.write_snapshot

    def slow_write_snapshot(*args: Any, **kwargs: Any) -> Any:
        rewriting.set()
        threading.Event().wait(0.1)  # the worker thread: the loop keeps going meanwhile
        return real_write_snapshot(*args, **kwargs)

    batches: list[list[Operation]] = []
    async with FileStore(tmp_path / "s", compact_threshold_bytes=1) as store:
        for seq in range(1, 21):
            batches.append(publish(seq))
            await store.apply("a", batches[-1])
        monkeypatch.setattr(file_snapshot, "write_snapshot", slow_write_snapshot)
        store._sessions["a"].snapshot_size = 0  # the next apply compacts
        batches.append(publish(21))
        compacting = asyncio.ensure_future(store.apply("a", batches[-1]))
        for _ in range(1000):
            if rewriting.is_set():
                break
            await asyncio.sleep(0.001)
        assert rewriting.is_set()
        inode = store.journal_path("a").stat().st_ino
        # While the journal is being replaced: appends, a read, more appends.
        during = [[MessageAdded(msg(seq)), InboundReceived(seq)] for seq in range(22, 72)]
        batches += during
        tasks = [asyncio.ensure_future(store.apply("a", batch)) for batch in during[:25]]
        reading = asyncio.ensure_future(store.read_queued("a", 0, 1000))
        tasks += [asyncio.ensure_future(store.apply("a", batch)) for batch in during[25:]]
        await asyncio.gather(compacting, *tasks)
        assert store.journal_path("a").stat().st_ino != inode  # it was replaced
        # The read came between the 25th and the 26th of them.
        assert [m.seq for m in await reading] == list(range(22, 47))
        monkeypatch.undo()
        for seq in range(72, 80):  # and after it, on the loop again
            batches.append([MessageAdded(msg(seq))])
            await store.apply("a", batches[-1])
        expected = replay("a", batches)
        assert await store.load("a") == expected
    async with FileStore(tmp_path / "s") as reopened:
        assert await reopened.load("a") == expected


# --- SQLiteStore: gathered transactions ---------------------------------------------------------


@pytest.fixture
async def db_store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "s.db", clock=clock)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@contextlib.asynccontextmanager
async def worker_held(store: SQLiteStore) -> AsyncIterator[None]:
    """Keep the store's worker busy until the block ends: calls made inside queue up."""
    release = threading.Event()
    started = threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(timeout=10)

    holding = asyncio.ensure_future(store._run(lambda: hold(store._db())))
    await asyncio.to_thread(started.wait, 10)
    try:
        yield
    finally:
        release.set()
        await holding


async def traced(store: SQLiteStore, statements: list[str]) -> None:
    await store._run(lambda: store._db().set_trace_callback(statements.append))


def transaction_statements(statements: list[str]) -> list[str]:
    keep = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
    return [
        s.split()[0] + (" TO" if s.startswith("ROLLBACK TO") else "")
        for s in statements
        if s.startswith(keep)
    ]


async def test_applies_queued_during_a_commit_share_one_transaction(
    db_store: SQLiteStore,
) -> None:
    statements: list[str] = []
    await traced(db_store, statements)
    clients = [f"c{n}" for n in range(10)]
    async with worker_held(db_store):
        tasks = [
            asyncio.ensure_future(db_store.apply(client_id, publish(1))) for client_id in clients
        ]
        tasks += [asyncio.ensure_future(db_store.apply("c0", publish(2)))]
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    control = transaction_statements(statements)
    assert control.count("BEGIN") == 1 and control.count("COMMIT") == 1, control
    assert control.count("SAVEPOINT") == 11
    for client_id in clients[1:]:
        assert await db_store.load(client_id) == replay(client_id, [publish(1)])
    assert await db_store.load("c0") == replay("c0", [publish(1), publish(2)])


async def test_a_failing_batch_fails_alone_in_a_shared_transaction(
    db_store: SQLiteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sqlite_operations.HANDLERS[InboundReceived]

    def refuse_99(conn: sqlite3.Connection, sid: int, ops: list[Any]) -> None:
        if any(op.packet_id == 99 for op in ops):
            raise sqlite3.IntegrityError("CHECK constraint failed (simulated)")
        real(conn, sid, ops)

    monkeypatch.setitem(sqlite_operations.HANDLERS, InboundReceived, refuse_99)
    statements: list[str] = []
    await traced(db_store, statements)
    async with SQLiteStore(tmp_path / "s.db") as other:
        await other.acquire("held")  # another holder of one lease
        bad: list[Operation] = [MessageAdded(msg(7)), InboundReceived(99)]
        async with worker_held(db_store):
            good_a = asyncio.ensure_future(db_store.apply("a", publish(1)))
            failing = asyncio.ensure_future(db_store.apply("b", bad))
            locked = asyncio.ensure_future(db_store.apply("held", publish(1)))
            good_c = asyncio.ensure_future(db_store.apply("c", publish(1)))
            good_b = asyncio.ensure_future(db_store.apply("b", publish(1)))
            await asyncio.sleep(0.01)
        await asyncio.gather(good_a, good_c, good_b)
        with pytest.raises(StoreError, match="simulated"):
            await failing
        with pytest.raises(SessionLocked):
            await locked
    control = transaction_statements(statements)
    assert control.count("BEGIN") == 1 and control.count("COMMIT") == 1, control
    assert control.count("ROLLBACK TO") == 1
    assert await db_store.load("a") == replay("a", [publish(1)])
    assert await db_store.load("c") == replay("c", [publish(1)])
    # The failing batch's MessageAdded ran before its failure: rolled back with it.
    assert await db_store.load("b") == replay("b", [publish(1)])


async def test_a_transaction_rolled_back_by_sqlite_fails_every_batch_in_it(
    db_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await db_store.apply("a", publish(1))
    real = sqlite_operations.HANDLERS[SubscriptionSet]

    def disk_full(conn: sqlite3.Connection, sid: int, ops: list[Any]) -> None:
        # What SQLite does on SQLITE_FULL or an I/O error: the whole transaction is gone.
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("database or disk is full (simulated)")

    monkeypatch.setitem(sqlite_operations.HANDLERS, SubscriptionSet, disk_full)
    async with worker_held(db_store):
        before = asyncio.ensure_future(db_store.apply("a", publish(2)))
        full = asyncio.ensure_future(db_store.apply("b", [SubscriptionSet("x", 1)]))
        after = asyncio.ensure_future(db_store.apply("c", publish(1)))
        await asyncio.sleep(0.01)
    errors = []
    for task in (before, full, after):
        with pytest.raises(StoreError, match="disk is full") as info:
            await task
        errors.append(info.value)
    assert len({id(error) for error in errors}) == 3  # each caller its own exception
    monkeypatch.setitem(sqlite_operations.HANDLERS, SubscriptionSet, real)
    assert await db_store.load("a") == replay("a", [publish(1)])
    assert await db_store.load("c") is None
    await db_store.apply("c", publish(1))  # the store carries on
    assert await db_store.load("c") == replay("c", [publish(1)])


async def test_close_while_applies_are_queued_runs_them_first(db_store: SQLiteStore) -> None:
    async with worker_held(db_store):
        applying = [asyncio.ensure_future(db_store.apply("a", publish(seq))) for seq in (1, 2)]
        cancelled = asyncio.ensure_future(db_store.apply("b", publish(1)))
        await asyncio.sleep(0)  # all three queued behind the held job
        closing = asyncio.ensure_future(db_store.close())
        later = asyncio.ensure_future(db_store.apply("a", publish(3)))  # after close: reopens
        await asyncio.sleep(0.01)
        cancelled.cancel()  # before its job started: it never happens
        assert not any(task.done() for task in [*applying, closing, later])
    with anyio.fail_after(5):
        await asyncio.gather(*applying, closing, later)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await db_store.load("a") == replay("a", [publish(s) for s in (1, 2, 3)])
        assert await db_store.load("b") is None
