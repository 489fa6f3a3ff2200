"""FileStore keeps queued messages on disk: its index, paging, compaction, memory and speed.

The conformance tests in ``test_stores`` check ``load(queued_limit=...)`` and ``read_queued``
for every store. These check what is particular to the FileStore: the in-memory index (offsets
of ``MessageAdded`` operations in the journal) against a full replay, across reopen and
compaction, with the read/scan/snapshot chunk sizes shrunk so every boundary case is hit; and
what the index is for: a queue of 100,000 messages costs tens of bytes of memory each, not its
payloads, and is opened and paged through fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqtt_persist.errors import StoreError
from mqtt_persist.session.state import (
    InboundReceived,
    MessageAdded,
    MessageReleased,
    MessageRemoved,
    MessageRequeued,
    MessageSetAside,
    Operation,
    PacketIdAssigned,
    SessionState,
    SetAsideMessage,
    SetAsideRemoved,
    StoredMessage,
    SubscriptionSet,
)
from mqtt_persist.stores import FileStore
from mqtt_persist.stores import file as file_module
from mqtt_persist.stores.file import journal as file_journal
from mqtt_persist.stores.file import sizes as file_sizes
from mqtt_persist.stores.file import snapshot as file_snapshot
from tests.test_stores import msg, queued_of, replay, restricted, store_ops

# --- the index against a full replay ----------------------------------------------------------

# Chunk sizes far below a record, so every read window, span and snapshot record boundary is
# crossed by the small journals hypothesis builds.
TINY_CHUNKS = {
    "SNAPSHOT_CHUNK": 200,
    "SCAN_CHUNK": 16,
    "READ_SPAN": 120,
    "READ_GAP": 8,
    "INDEX_SLACK": 2,
}


async def check_queued_reads(
    store: FileStore, client_id: str, expected: SessionState, probes: list[tuple[int, int]]
) -> None:
    """``read_queued`` and ``load(queued_limit=...)`` agree with the replayed ``expected``."""
    queued = queued_of(expected)
    for after_seq, limit in probes:
        want = [m for m in queued if m.seq > after_seq][:limit]
        assert await store.read_queued(client_id, after_seq, limit) == want, (after_seq, limit)
        state = await store.load(client_id, queued_limit=limit)
        assert state is not None
        assert state == restricted(expected, limit), limit
        assert list(state.messages) == sorted(state.messages)
        assert state.queued_not_loaded == max(0, len(queued) - limit)
        # FileStore keeps the highest number ever added, across compaction (see file.py).
        assert state.last_seq == expected.last_seq


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(store_ops, min_size=1, max_size=10), min_size=1, max_size=14),
    events=st.lists(st.sampled_from(["reopen", "check", "none", "none"]), min_size=14, max_size=14),
    probes=st.lists(st.tuples(st.integers(-1, 13), st.integers(0, 14)), min_size=1, max_size=4),
    tiny=st.booleans(),
)
def test_index_matches_replay_across_reopen_and_compaction(
    batches: list[list[Operation]],
    events: list[str],
    probes: list[tuple[int, int]],
    tiny: bool,
) -> None:
    async def scenario(directory: Path) -> None:
        # A threshold this small compacts every few batches.
        def make() -> FileStore:
            return FileStore(directory, fsync=False, compact_threshold_bytes=300)

        store = make()
        try:
            for i, batch in enumerate(batches):
                await store.apply("c", batch)
                if events[i] == "reopen":
                    await store.close()
                    store = make()
                elif events[i] == "check":
                    await check_queued_reads(store, "c", replay("c", batches[: i + 1]), probes)
            expected = replay("c", batches)
            await check_queued_reads(store, "c", expected, probes)
            assert await store.load("c") == expected
            await store.close()
            store = make()
            await check_queued_reads(store, "c", expected, probes)
        finally:
            await store.close()

    chunks = mock.patch.multiple(file_sizes, **TINY_CHUNKS) if tiny else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as path, chunks:
        asyncio.run(scenario(Path(path)))


async def test_every_message_transition_survives_compaction_and_reopen(tmp_path: Path) -> None:
    """Requeue, release while queued, out-of-order adds, removal inside the queue."""
    batches: list[list[Operation]] = [
        [MessageAdded(msg(s)) for s in range(10, 20)],
        [MessageAdded(msg(5, packet_id=7)), PacketIdAssigned(10, 8), PacketIdAssigned(11, 9)],
        [MessageReleased(11), MessageReleased(12), MessageRemoved(15), MessageAdded(msg(3))],
        [MessageRequeued(10), MessageRequeued(11), MessageRequeued(5), MessageRequeued(12)],
        [MessageAdded(msg(25)), MessageRemoved(25), MessageAdded(msg(15)), InboundReceived(4)],
        [PacketIdAssigned(3, 1), MessageReleased(3), SubscriptionSet("a/#", 1)],
    ]
    expected = replay("c", batches)
    queued = queued_of(expected)
    assert [m.seq for m in queued] == [5, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert expected.messages[3].released and expected.messages[3].packet_id == 1
    probes = [(-1, 100), (0, 3), (10, 2), (12, 100), (19, 5), (4, 0)]
    with mock.patch.multiple(file_sizes, **TINY_CHUNKS):
        async with FileStore(tmp_path / "s", fsync=False) as store:
            for batch in batches:
                await store.apply("c", batch)
            await check_queued_reads(store, "c", expected, probes)
            size = store.journal_path("c").stat().st_size
            await store.save(await store.load("c") or SessionState("c"))  # a full rewrite
            assert store.journal_path("c").stat().st_size < size
            await check_queued_reads(store, "c", expected, probes)
        async with FileStore(tmp_path / "s", fsync=False) as store:
            await check_queued_reads(store, "c", expected, probes)


async def test_set_aside_messages_stay_readable_across_compaction(tmp_path: Path) -> None:
    """A set-aside message's bytes are copied into every rewrite, however long it stays."""
    poison = StoredMessage(1, "poison", b"p" * 500, 2, properties=b"\x01\x01", expires_at=9.5)
    aside = {1: SetAsideMessage(poison, "refused", 2.0)}
    first: list[Operation] = [
        MessageAdded(poison),
        PacketIdAssigned(1, 7),
        MessageReleased(1),
        MessageSetAside(1, "refused", 2.0),
    ]
    async with FileStore(tmp_path / "s", fsync=False, compact_threshold_bytes=600) as store:
        await store.apply("c", first)
        sizes = []
        for n in range(2, 60):
            await store.apply(
                "c", [MessageAdded(msg(n, payload=bytes(100))), MessageRemoved(n - 1)]
            )
            sizes.append(store.journal_path("c").stat().st_size)
        assert min(sizes) < max(sizes)  # compacted, again and again
        state = await store.load("c")
        assert state is not None and state.set_aside == aside and list(state.messages) == [59]
        await store.save(state)
        assert await store.load("c") == state
    async with FileStore(tmp_path / "s", fsync=False) as store:
        state = await store.load("c")
        assert state is not None and state.set_aside == aside
        [info] = await store.list_sessions()
        assert info.set_aside == 1
        await store.apply("c", [SetAsideRemoved(1)])
    async with FileStore(tmp_path / "s", fsync=False, compact_threshold_bytes=1) as store:
        await store.apply("c", [MessageAdded(msg(60))])  # compacts: the discarded bytes go
        assert store.journal_path("c").stat().st_size < 500
        state = await store.load("c")
        assert state is not None and not state.set_aside


async def test_last_seq_survives_compaction_of_removed_messages(tmp_path: Path) -> None:
    async with FileStore(tmp_path / "s", fsync=False, compact_threshold_bytes=1) as store:
        await store.apply("c", [MessageAdded(msg(s)) for s in range(1, 11)])
        await store.apply("c", [MessageRemoved(s) for s in range(4, 11)])
        await store.save(await store.load("c") or SessionState("c"))
        state = await store.load("c")
        assert state is not None and list(state.messages) == [1, 2, 3]
        assert state.last_seq == 10
    async with FileStore(tmp_path / "s") as store:
        state = await store.load("c")
        assert state is not None and state.last_seq == 10
        await store.apply("c", [MessageRemoved(s) for s in (1, 2, 3)])
        await store.save(await store.load("c") or SessionState("c"))
    async with FileStore(tmp_path / "s") as store:
        state = await store.load("c")
        assert state is not None and not state.messages and state.last_seq == 10


async def test_drained_queue_gives_its_index_memory_back(tmp_path: Path) -> None:
    """A queue drained from the front (the usual case) and from the middle."""
    async with FileStore(tmp_path / "s", fsync=False) as store:
        await store.apply("c", [MessageAdded(msg(s, payload=b"p")) for s in range(1, 5001)])
        index = store._sessions["c"].index
        # From the front: into the window, then acknowledged.
        for s in range(1, 3001):
            await store.apply("c", [PacketIdAssigned(s, s % 60000 + 1), MessageRemoved(s)])
        index = store._sessions["c"].index
        assert index.q_live == 2000
        assert len(index.q_seq) <= index.q_live + max(file_sizes.INDEX_SLACK, 1000) + 1
        # From the middle: every other one dropped.
        await store.apply("c", [MessageRemoved(s) for s in range(3001, 5001, 2)])
        assert index.q_live == 1000
        page = await store.read_queued("c", 3500, 10)
        assert [m.seq for m in page] == list(range(3502, 3522, 2))
        await store.apply("c", [MessageRemoved(s) for s in range(3002, 5001, 2)])
        index = store._sessions["c"].index
        assert index.q_live == 0 and len(index.q_seq) == 0
        assert await store.read_queued("c", 0, 10) == []
        state = await store.load("c", queued_limit=5)
        assert state is not None and not state.messages and state.queued_not_loaded == 0


async def test_migrated_journal_is_read_back_from_the_new_file(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    async with FileStore(directory, fsync=False) as store:
        for start in range(1, 301, 100):
            await store.apply("c", [MessageAdded(msg(s)) for s in range(start, start + 100)])
        path = store.journal_path("c")
    current = path.read_bytes()
    path.write_bytes(current[:4] + struct.pack("<H", 0) + current[6:])
    version = struct.pack("<H", file_journal.FORMAT_VERSION)
    with mock.patch.dict(file_journal.MIGRATIONS, {0: lambda data: data[:4] + version + data[6:]}):
        async with FileStore(directory, fsync=False) as store:
            state = await store.load("c", queued_limit=10)
            assert state is not None and list(state.messages) == list(range(1, 11))
            assert struct.unpack_from("<H", path.read_bytes(), 4)[0] == file_journal.FORMAT_VERSION
            page = await store.read_queued("c", 150, 100)
            assert [m.seq for m in page] == list(range(151, 251))
            assert page == [msg(s) for s in range(151, 251)]


async def test_journal_changed_behind_the_store_is_an_error_not_wrong_data(
    tmp_path: Path,
) -> None:
    async with FileStore(tmp_path / "s", fsync=False) as store:
        await store.apply("c", [MessageAdded(msg(s)) for s in range(1, 11)])
        path = store.journal_path("c")
        # Someone else rewrote the file under the lease with different content.
        other = FileStore(tmp_path / "other", fsync=False)
        await other.apply("c", [MessageAdded(msg(s, payload=b"zz")) for s in range(1, 11)])
        await other.close()
        shutil.copyfile(other.journal_path("c"), path)
        with pytest.raises(StoreError, match="behind the store's back"):
            await store.read_queued("c", 0, 10)


# --- 100,000 queued messages ------------------------------------------------------------------

QUEUED = 100_000
PAYLOAD = 64


def big_message(seq: int) -> StoredMessage:
    return StoredMessage(seq, f"gateway/{seq % 16}", seq.to_bytes(8, "big") * 8, 1)


@pytest.fixture(scope="module")
def big_journal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session journal with 100,000 queued 64-byte messages, appended 1,000 per batch."""
    directory = tmp_path_factory.mktemp("big") / "sessions"

    async def build() -> None:
        async with FileStore(directory, fsync=False) as store:
            for start in range(1, QUEUED + 1, 1000):
                await store.apply(
                    "gw", [MessageAdded(big_message(s)) for s in range(start, start + 1000)]
                )

    asyncio.run(build())
    yield directory


@pytest.fixture
def journal_copy(big_journal: Path, tmp_path: Path) -> Path:
    target = tmp_path / "sessions"
    shutil.copytree(big_journal, target)
    return target


def traced_growth(snapshot: tracemalloc.Snapshot, baseline: tracemalloc.Snapshot) -> int:
    return sum(stat.size_diff for stat in snapshot.compare_to(baseline, "filename"))


async def test_memory_of_a_100k_queue_is_its_index_not_its_payloads(journal_copy: Path) -> None:
    """What an open session of 100,000 queued 64-byte messages keeps in memory.

    The bound: 40 bytes per queued message, in total, for everything the store allocated and
    still holds after ``load(queued_limit=1000)`` (the returned state dropped). The index is
    8 (sequence number) + 8 (offset) + 4 (length) bytes per message in arrays that over-allocate
    by about 1/16, about 21 bytes; 40 leaves room for removed entries not yet dropped (at most
    half the live ones, 10 more) and for the constant part, and is well under the 64 bytes of
    payload alone (the store held about 320 bytes per message when it kept the replayed state).
    The peak while opening (index, plus a 1 MiB read window, plus the 1,000 messages returned)
    must stay under the payload total: the journal is read in windows, never whole. How the
    peak does not grow with payload size is the next test's.
    """
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.take_snapshot()
        tracemalloc.reset_peak()
        store = FileStore(journal_copy, fsync=False)
        state = await store.load("gw", queued_limit=1000)
        assert state is not None and len(state.messages) == 1000
        assert state.queued_not_loaded == QUEUED - 1000 and state.last_seq == QUEUED
        peak = tracemalloc.get_traced_memory()[1] - sum(
            stat.size for stat in baseline.statistics("filename")
        )
        del state
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = traced_growth(after, baseline)
    only_file_py = [
        tracemalloc.Filter(True, os.path.join(os.path.dirname(file_module.__file__), "*"))
    ]
    in_file_py = traced_growth(
        after.filter_traces(only_file_py), baseline.filter_traces(only_file_py)
    )
    try:
        print(f"held {held / QUEUED:.1f} B/msg ({in_file_py / QUEUED:.1f} by stores/file/)")
        print(f"peak while opening {peak:,} B")
        assert held < 40 * QUEUED
        assert in_file_py < 40 * QUEUED
        assert peak < QUEUED * PAYLOAD
    finally:
        await store.close()


async def test_compaction_of_a_100k_queue(journal_copy: Path) -> None:
    """Compaction copies the queue from the old file into the new one; offsets follow."""
    store = FileStore(journal_copy, compact_threshold_bytes=1)  # fsync on, as in production
    try:
        assert await store.load("gw", queued_limit=0) is not None
        size = store.journal_path("gw").stat().st_size
        # A compact journal counts as freshly rewritten when opened; forget that, so the
        # threshold of 1 byte makes this apply rewrite the journal instead of appending.
        store._sessions["gw"].snapshot_size = 0
        started = time.perf_counter()
        await store.apply("gw", [MessageAdded(big_message(QUEUED + 1)), MessageRemoved(1)])
        elapsed = time.perf_counter() - started
        print(f"compaction of {QUEUED} queued: {elapsed * 1000:.0f} ms")
        assert store._sessions["gw"].snapshot_size == store.journal_path("gw").stat().st_size
        assert store.journal_path("gw").stat().st_size < size
        page = await store.read_queued("gw", 50_000, 3)
        assert page == [big_message(s) for s in (50_001, 50_002, 50_003)]
        assert [m.seq for m in await store.read_queued("gw", QUEUED - 2, 10)] == [
            QUEUED - 1,
            QUEUED,
            QUEUED + 1,
        ]
    finally:
        await store.close()
    async with FileStore(journal_copy) as store:
        state = await store.load("gw", queued_limit=2)
        assert state is not None and list(state.messages) == [2, 3]
        assert state.queued_not_loaded == QUEUED - 2


async def test_open_and_compaction_memory_does_not_follow_payload_size(tmp_path: Path) -> None:
    """5,000 queued 4 KiB messages (20 MiB of payload): opening and compacting the journal
    peak at a few MiB (the index plus one read window and one record being written)."""
    count, payload = 5000, 4096
    payload_total = count * payload
    directory = tmp_path / "s"
    async with FileStore(directory, fsync=False) as store:
        for start in range(0, count, 500):
            await store.apply(
                "c",
                [MessageAdded(msg(s, payload=bytes(payload))) for s in range(start, start + 500)],
            )
    store = FileStore(directory, fsync=False, compact_threshold_bytes=1)
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        state = await store.load("c", queued_limit=10)
        open_peak = tracemalloc.get_traced_memory()[1] - before
        assert state is not None and state.queued_not_loaded == count - 10
        del state
        gc.collect()
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        await store.apply("c", [MessageRemoved(0)])  # compacts (the threshold)
        compaction_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
        await store.close()
    print(f"peaks: opening {open_peak:,} B, compaction {compaction_peak:,} B")
    assert open_peak < payload_total // 4
    assert compaction_peak < payload_total // 4
    async with FileStore(directory) as store:
        assert await store.read_queued("c", 4990, 100) == [
            msg(s, payload=bytes(payload)) for s in range(4991, 5000)
        ]


def _largest_file(directory: Path) -> int:
    return max(entry.stat().st_size for entry in os.scandir(directory))


async def test_a_100k_queue_opens_and_pages_fast(
    journal_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening (the first load) reads the journal once; each page is a few positioned reads.

    Counted, not timed: every read of the journal goes through ``os.pread``, so the number of
    reads and the bytes they return say whether the store reads in windows and pages, whatever
    the machine's load. (The times are printed; benchmarks/store_throughput.py measures them.)
    """
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        data = real_pread(fd, length, offset)
        reads.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    size = _largest_file(journal_copy)  # the journal
    store = FileStore(journal_copy, fsync=False)
    try:
        started = time.perf_counter()
        state = await store.load("gw", queued_limit=1000)
        opened = time.perf_counter() - started
        assert state is not None
        assert list(state.messages) == list(range(1, 1001))
        assert state.messages[500] == big_message(500)
        # The journal once (in windows of about a megabyte), plus the 1,000 messages returned.
        open_reads, open_bytes = len(reads), sum(reads)
        assert open_bytes < size + 1000 * 1024, (open_bytes, size)
        assert open_reads < size // (512 * 1024) + 10, open_reads
        reads.clear()
        started = time.perf_counter()
        after, pages, seen = 1000, 0, 1000
        while page := await store.read_queued("gw", after, 1000):
            assert page[0].seq == after + 1 and len(page) == min(1000, QUEUED - after)
            after = page[-1].seq
            pages += 1
            seen += len(page)
        paging = time.perf_counter() - started
        assert seen == QUEUED and pages == 99
        assert page == [] and after == QUEUED
        # A page of 1,000 adjacent messages is one or two positioned reads, never one per message,
        # and reading the whole queue page by page reads about the journal once more.
        assert len(reads) <= 3 * pages, (len(reads), pages)
        assert sum(reads) < 2 * size, (sum(reads), size)
        assert (await store.read_queued("gw", 77_776, 1)) == [big_message(77_777)]
        print(f"first load {opened * 1000:.0f} ms ({open_reads} reads, {open_bytes:,} B), "
              f"{paging / pages * 1000:.1f} ms per page")  # fmt: skip
    finally:
        await store.close()


async def test_failed_compaction_leaves_the_store_as_the_file_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index took the batch before the rewrite failed: the store reads the file again."""
    async with FileStore(tmp_path / "s", fsync=False) as store:
        await store.apply("c", [MessageAdded(msg(s)) for s in range(1, 6)])
    async with FileStore(tmp_path / "s", fsync=False, compact_threshold_bytes=1) as store:
        before = await store.load("c")
        # Forget the baseline a compact journal gets when opened: the next apply compacts.
        store._sessions["c"].snapshot_size = 0

        def full_disk(fd: int, *args: object) -> object:
            os.write(fd, b"half a snapshot")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(file_snapshot, "write_snapshot", full_disk)
        with pytest.raises(StoreError, match="No space left"):
            await store.apply(
                "c", [PacketIdAssigned(1, 7), MessageRemoved(2), MessageAdded(msg(9))]
            )
        assert await store.load("c") == before
        assert await store.read_queued("c", 0, 10) == [msg(s) for s in range(1, 6)]
        assert not store.journal_path("c").with_suffix(".tmp").exists()
        monkeypatch.undo()
        await store.apply("c", [PacketIdAssigned(1, 7), MessageRemoved(2)])
        assert [m.seq for m in await store.read_queued("c", 0, 10)] == [3, 4, 5]
    async with FileStore(tmp_path / "s") as store:
        state = await store.load("c")
        assert state is not None and list(state.messages) == [1, 3, 4, 5]
        assert state.messages[1].packet_id == 7


async def test_reopening_a_compact_journal_does_not_rewrite_it(tmp_path: Path) -> None:
    """Regression: a reopened store forgot the journal's size after its last rewrite and
    compacted any journal over the threshold on the first append (~280 ms at 100k messages)."""
    ops = [MessageAdded(StoredMessage(i, "t", b"x" * 64, 1)) for i in range(1, 30_001)]
    store = FileStore(tmp_path, compact_threshold_bytes=64 * 1024)
    for i in range(0, len(ops), 1000):
        await store.apply("c", ops[i : i + 1000])
    path = store.journal_path("c")
    await store.close()
    for k in range(2):
        store = FileStore(tmp_path, compact_threshold_bytes=64 * 1024)
        await store.load("c", queued_limit=10)
        inode = os.stat(path).st_ino
        await store.apply("c", [PacketIdAssigned(1 + k, 1 + k)])
        assert os.stat(path).st_ino == inode, "a compact journal was rewritten on reopen"
        await store.close()
    # Mostly dead weight is still compacted by the first append after a reopen.
    store = FileStore(tmp_path, compact_threshold_bytes=64 * 1024)
    await store.apply("c", [MessageRemoved(seq) for seq in range(3, 30_001)])
    await store.close()
    store = FileStore(tmp_path, compact_threshold_bytes=64 * 1024)
    await store.load("c")
    inode = os.stat(path).st_ino
    await store.apply("c", [PacketIdAssigned(1, 1)])
    assert os.stat(path).st_ino != inode
    await store.close()
