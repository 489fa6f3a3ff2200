"""FileStore's AIO sync path (``stores/file/aio.py``, ``writer.LoopSyncs``): the real kernel
interface, the fall back to the syncer thread, and records left in flight by a closed loop.

The behaviours both sync paths share (group commit, cancellation, failed syncs, the index
following the disk) run over both in tests/test_store_write_path.py (fixture ``sync_path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import threading
import time
from pathlib import Path

import anyio
import pytest

from mqtt_persist.stores import FileStore
from mqtt_persist.stores.file import aio
from mqtt_persist.stores.file import writer as file_writer
from tests.support.fake_aio import FakeAioContext, use_sync_path
from tests.test_store_write_path import SyncGate, publish
from tests.test_stores import replay


def test_the_kernel_context_syncs_and_reports_on_its_eventfd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_sync_path(monkeypatch, "kernel")
    context = aio.open_context()
    assert context is not None
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 100)
        context.submit_fdatasync(fd, 7)
        context.submit_fdatasync(fd, 8)
        done: list[tuple[int, int]] = []
        while len(done) < 2:
            done += context.reap(wait=True)
        assert sorted(done) == [(7, 0), (8, 0)]
        assert context.in_flight() == 0
        assert context.reap() == []
        with pytest.raises(OSError) as info:
            context.submit_fdatasync(-1, 9)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)
        context.close()


async def test_appends_through_the_kernel_never_start_the_syncer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_sync_path(monkeypatch, "kernel")
    gate = SyncGate(monkeypatch)  # counts os.fsync/os.fdatasync: the kernel's are not those
    threaded: list[object] = []
    real_submit = file_writer.Syncer.submit_threaded

    def submit_threaded(syncer: file_writer.Syncer, commit: file_writer.Commit) -> None:
        threaded.append(commit)
        real_submit(syncer, commit)

    monkeypatch.setattr(file_writer.Syncer, "submit_threaded", submit_threaded)
    async with FileStore(tmp_path / "s") as store:
        await store.apply("a", publish(1))  # a new journal: a rewrite on the worker
        rewrite_syncs = len(gate.calls)
        await asyncio.gather(*(store.apply("a", publish(seq)) for seq in range(2, 40)))
        for seq in range(40, 60):
            await store.apply("a", publish(seq))
        assert len(gate.calls) == rewrite_syncs
        assert threaded == []  # nothing went to the syncer thread
        assert await store.load("a") == replay("a", [publish(s) for s in range(1, 60)])
    async with FileStore(tmp_path / "s") as store:
        assert await store.load("a") == replay("a", [publish(s) for s in range(1, 60)])


class RefusingAio(FakeAioContext):
    """A kernel whose file system has no AIO fsync: every submit is refused."""

    def submit_fdatasync(self, fd: int, token: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")


async def test_a_refused_submit_falls_back_to_the_syncer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aio, "open_context", RefusingAio)
    gate = SyncGate(monkeypatch)
    async with FileStore(tmp_path / "s") as store:
        await store.apply("a", publish(1))
        gate.calls.clear()
        await asyncio.gather(*(store.apply("a", publish(seq)) for seq in range(2, 12)))
        await store.apply("a", publish(12))
        assert gate.calls and gate.threads >= {"mqtt-persist-file-sync"}
        assert await store.load("a") == replay("a", [publish(s) for s in range(1, 13)])


async def test_records_in_flight_when_their_loop_closed_are_settled_by_the_next_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_sync_path(monkeypatch, "aio")
    store = FileStore(tmp_path / "s")
    gate = SyncGate(monkeypatch, hold=True)
    failures: list[BaseException] = []
    pending: list[asyncio.Task[None]] = []

    def on_another_loop() -> None:
        loop = asyncio.new_event_loop()
        try:
            gate.open()
            loop.run_until_complete(store.apply("a", publish(1)))
            gate._open.clear()  # hold the next sync
            gate.entered.clear()
            pending.append(loop.create_task(store.apply("a", publish(2))))
            loop.run_until_complete(gate.wait_entered())
        except BaseException as exc:
            failures.append(exc)
        finally:
            loop.close()  # with the sync of publish(2) in flight and nobody to complete it

    thread = threading.Thread(target=on_another_loop)
    thread.start()
    await asyncio.to_thread(thread.join, 30)
    assert not failures and not pending[0].done()
    gate.open()
    # The next job for the session waits for that record's sync, which no loop will report:
    # it settles it itself, and the batch is there.
    expected = replay("a", [publish(1), publish(2)])
    assert await asyncio.wait_for(store.load("a"), 30) == expected
    await store.close()
    async with FileStore(tmp_path / "s") as reopened:
        assert await reopened.load("a") == expected


async def test_a_refusal_elsewhere_keeps_a_session_in_flight_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AIO refused for one journal while another's sync is in flight: that session's next
    records wait for its sync and only then go to the thread, never past it."""
    refused_fds: set[int] = set()
    aio_open = threading.Event()

    class PartlyRefusing(FakeAioContext):
        def submit_fdatasync(self, fd: int, token: int) -> None:
            if fd in refused_fds:
                raise OSError(errno.EINVAL, "Invalid argument")
            super().submit_fdatasync(fd, token)

        def _sync(self, fd: int, token: int) -> None:
            aio_open.wait(10)  # held; the syncer thread is not
            super()._sync(fd, token)

    monkeypatch.setattr(aio, "open_context", PartlyRefusing)
    async with FileStore(tmp_path / "s") as store:
        aio_open.set()
        await store.apply("a", publish(1))
        await store.apply("b", publish(1))
        aio_open.clear()
        refused_fds.add(store._sessions["b"].fd or -1)
        gate = SyncGate(monkeypatch)
        first = asyncio.ensure_future(store.apply("a", publish(2)))  # in flight, held
        await asyncio.sleep(0)
        await store.apply("b", publish(2))  # refused: synced on the thread
        assert "mqtt-persist-file-sync" in gate.threads
        later = [asyncio.ensure_future(store.apply("a", publish(seq))) for seq in (3, 4)]
        await asyncio.sleep(0.1)  # time enough for the thread, were they given to it
        assert not first.done() and not any(task.done() for task in later)
        aio_open.set()
        await asyncio.gather(first, *later)
        assert await store.load("a") == replay("a", [publish(s) for s in range(1, 5)])
        assert await store.load("b") == replay("b", [publish(1), publish(2)])


async def test_a_record_left_in_flight_by_a_closed_loop_settles_before_the_next_loops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One loop after another: the next loop's first append must not overtake a record the
    closed loop left in flight, or the index replays the two in the wrong order."""
    use_sync_path(monkeypatch, "aio")
    store = FileStore(tmp_path / "s")
    gate = SyncGate(monkeypatch, hold=True)
    failures: list[BaseException] = []
    pending: list[asyncio.Task[None]] = []

    def on_another_loop() -> None:
        loop = asyncio.new_event_loop()
        try:
            gate.open()
            loop.run_until_complete(store.apply("a", publish(1)))
            gate._open.clear()  # hold the next sync
            gate.entered.clear()
            pending.append(loop.create_task(store.apply("a", publish(2))))
            loop.run_until_complete(gate.wait_entered())
        except BaseException as exc:
            failures.append(exc)
        finally:
            loop.close()  # with the sync of publish(2) in flight and nobody to complete it

    thread = threading.Thread(target=on_another_loop)
    thread.start()
    await asyncio.to_thread(thread.join, 30)
    assert not failures and not pending[0].done()
    gate.open()
    await asyncio.wait_for(store.apply("a", publish(3)), 30)  # on this loop, a new context
    expected = replay("a", [publish(s) for s in (1, 2, 3)])
    assert await asyncio.wait_for(store.load("a"), 30) == expected
    await store.close()
    async with FileStore(tmp_path / "s") as reopened:
        assert await reopened.load("a") == expected


async def test_a_full_context_sends_one_round_to_the_thread_and_keeps_aio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EAGAIN (every slot of the context in flight: a few hundred sessions syncing at once)
    is not a file system without AIO fsync: the records that found it full go to the thread,
    the later ones through AIO again."""
    full = threading.Event()
    submits: list[int] = []

    class Filling(FakeAioContext):
        def submit_fdatasync(self, fd: int, token: int) -> None:
            if full.is_set():
                full.clear()
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
            submits.append(token)
            super().submit_fdatasync(fd, token)

    monkeypatch.setattr(aio, "open_context", Filling)
    threaded: list[object] = []
    real_submit = file_writer.Syncer.submit_threaded

    def submit_threaded(syncer: file_writer.Syncer, commit: file_writer.Commit) -> None:
        threaded.append(commit)
        real_submit(syncer, commit)

    monkeypatch.setattr(file_writer.Syncer, "submit_threaded", submit_threaded)
    async with FileStore(tmp_path / "s") as store:
        await store.apply("a", publish(1))
        await store.apply("a", publish(2))
        full.set()
        await store.apply("a", publish(3))  # found the context full
        assert len(threaded) == 1
        before = len(submits)
        for seq in range(4, 8):
            await store.apply("a", publish(seq))
        assert len(threaded) == 1 and len(submits) == before + 4
        assert await store.load("a") == replay("a", [publish(s) for s in range(1, 8)])


async def test_a_record_left_in_flight_by_a_loop_left_open_does_not_wedge_the_next_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the first loop is left open, not running (``run_until_complete`` and
    then another loop): its records are settled all the same, in order."""
    use_sync_path(monkeypatch, "aio")
    store = FileStore(tmp_path / "s")
    gate = SyncGate(monkeypatch, hold=True)
    loop = await _leave_a_record_syncing(store, gate, close=False)
    try:
        gate.open()
        expected = replay("a", [publish(s) for s in (1, 2, 3)])
        with anyio.fail_after(5):
            await store.apply("a", publish(3))  # on this loop: must not overtake publish(2)
            assert await store.load("a") == expected
            await store.close()
    finally:
        loop.close()
    async with FileStore(tmp_path / "s") as reopened:
        assert await reopened.load("a") == expected


def _aio_resources() -> tuple[int, int]:
    """(eventfds open, AIO contexts mapped) in this process."""
    eventfds = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            eventfds += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]"
    with open("/proc/self/maps") as maps:
        contexts = sum("/[aio]" in line for line in maps)
    return eventfds, contexts


def test_a_close_cancelled_before_its_loop_closed_the_aio_still_releases_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() cancelled at once: its job still runs on the worker, which hands the AIO close
    to the loop; the loop is closed without running it. The eventfd and the kernel's AIO
    context go anyway (they leaked: one of each per such close)."""
    use_sync_path(monkeypatch, "kernel")
    store = FileStore(tmp_path / "s")
    before = _aio_resources()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(store.apply("a", publish(1)))  # a job on the worker: no AIO
        loop.run_until_complete(store.apply("a", publish(2)))  # synced through this loop's AIO
        assert _aio_resources() == (before[0] + 1, before[1] + 1)
        # The close job waits until the loop stopped, as when close() is cancelled and the
        # loop then ends before the worker is through.
        stopped = threading.Event()
        real_close_job = store._close_job

        def close_job() -> None:
            stopped.wait(10)
            real_close_job()

        monkeypatch.setattr(store, "_close_job", close_job)
        close = loop.create_task(store.close())
        loop.run_until_complete(asyncio.sleep(0))  # close() submitted its job and waits
        close.cancel()
        loop.run_until_complete(asyncio.wait({close}))
        assert close.cancelled()
        stopped.set()
        worker = store._worker._thread
        assert worker is not None
        worker.join(10)  # the close job ran: the AIO close is queued on the stopped loop
        assert not worker.is_alive()
    finally:
        loop.close()
    del loop, close
    gc.collect()
    assert _aio_resources() == before


@pytest.mark.parametrize("left", ["closed", "idle"])
async def test_a_record_left_in_flight_by_another_loop_costs_the_next_job_no_fixed_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, left: str
) -> None:
    """A job that must wait for a record a closed (or idle: not running) loop left syncing
    settles it at once rather than after waiting half a second for that loop to."""
    use_sync_path(monkeypatch, "aio")
    store = FileStore(tmp_path / "s")
    gate = SyncGate(monkeypatch, hold=True)
    loop = await _leave_a_record_syncing(store, gate, close=left == "closed")
    try:
        gate.open()
        await asyncio.sleep(0.05)  # the sync is done; only its loop could reap it
        began = time.monotonic()
        state = await asyncio.wait_for(store.load("a"), 30)  # a job: settles publish(2) first
        took = time.monotonic() - began
        assert state == replay("a", [publish(1), publish(2)])
        assert took < 0.25, f"the job waited {took:.3f} s for the other loop's record"
        await store.close()
    finally:
        loop.close()


async def _leave_a_record_syncing(
    store: FileStore, gate: SyncGate, *, close: bool
) -> asyncio.AbstractEventLoop:
    """On a loop of another thread: publish(1) is applied, then publish(2)'s record is written
    and its sync held at ``gate`` while its caller is cancelled (the batch stands). That loop
    is then left, closed or (``close=False``) open and idle; it is returned either way."""
    failures: list[BaseException] = []
    loops: list[asyncio.AbstractEventLoop] = []

    def on_another_loop() -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        try:
            gate.open()
            loop.run_until_complete(store.apply("a", publish(1)))
            gate._open.clear()  # hold the next sync
            gate.entered.clear()
            applying = loop.create_task(store.apply("a", publish(2)))
            loop.run_until_complete(gate.wait_entered())
            applying.cancel()  # its record is written: the batch stands
            loop.run_until_complete(asyncio.gather(applying, return_exceptions=True))
        except BaseException as exc:
            failures.append(exc)
        finally:
            if close:
                loop.close()

    thread = threading.Thread(target=on_another_loop)
    thread.start()
    await asyncio.to_thread(thread.join, 30)
    assert not failures
    return loops[0]
