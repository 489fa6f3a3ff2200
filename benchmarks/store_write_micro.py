"""Microseconds per ``store.apply``: the durable stores' write path, two source trees side by side.

    .venv/bin/python benchmarks/store_write_micro.py --baseline /work/main
    .venv/bin/python benchmarks/store_write_micro.py --baseline /work/main --rounds 7 --seconds 2
    .venv/bin/python benchmarks/store_write_micro.py --only raw file-seq file-seq-nofsync

No broker, no client: each scenario drives a store the way the client's flusher does for a
one-at-a-time publisher, and compares it with the cheapest durable loop Python can write.

* ``raw``: ``os.write`` of 100 bytes + ``os.fdatasync``, in a loop, on one file: the ceiling of
  a sequential durable writer on this disk. It runs right before every other scenario, every
  round, because this disk's sync latency wanders by 2-5x within minutes on a shared machine.
* ``handoff``: the least any write path that keeps the sync off the event loop can cost: the
  loop writes 170 bytes (a record's size here), a thread ``fdatasync``s and resolves the
  loop's future with ``call_soon_threadsafe``; 10 lines, no store (the same for both trees).
* ``*-seq``: ``await store.apply(cid, [MessageRemoved(n - 1), MessageAdded(n),
  PacketIdAssigned(n)])`` in a loop: one message per apply, its predecessor's removal deferred
  into it, as the client defers a PUBACK's ``MessageRemoved`` into the next commit.
  ``file-seq`` FileStore (fsync on), ``file-seq-nofsync`` FileStore(fsync=False),
  ``sqlite-seq-full`` / ``sqlite-seq-normal`` SQLiteStore with synchronous FULL / NORMAL.
* ``*-100``: ``asyncio.gather`` of 100 such applies at a time on one session (group commit).
* ``*-10s``: 10 sessions of one store, each a sequential publisher as in ``*-seq``, at once.
* ``sqlite-seq-b`` / ``sqlite-100-b`` (this tree only): the write path SQLiteStore did NOT
  take, as a prototype (:class:`_LoopSQLite`): the statements and COMMIT on the event loop with
  ``synchronous=NORMAL`` (no fsync in COMMIT), then our own ``fdatasync`` of the ``-wal`` file
  on a syncer thread, one per round of commits. Kept to re-measure the choice (docs/stores.md).

64-byte payloads, an 18-character topic. Each scenario runs for ``--seconds`` (after a short
warm-up) in a fresh child process that puts its tree first on ``sys.path`` (and checks that
``mqtt_persist`` came from there), in a fresh directory under ``--dir`` (default: the system's
temp directory; give one on the disk you care about). Scenario by scenario, the trees alternate
which goes first; the table gives each tree's median µs over the rounds, and the medians of the
per-round ratios: new/old, and each one's share of the raw loop run next to it (raw µs ÷ µs per
apply: 0.6 means 60 % of the raw loop's rate). ``syncs/apply`` counts ``os.fsync`` +
``os.fdatasync`` calls made from Python and the ``fdatasync``s FileStore submits to Linux AIO
(FileStore; SQLite syncs inside its C library and shows
``-``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SCENARIOS = (
    "raw",
    "handoff",
    "file-seq",
    "file-seq-nofsync",
    "sqlite-seq-full",
    "sqlite-seq-normal",
    "file-100",
    "sqlite-100",
    "file-10s",
    "sqlite-10s",
    "sqlite-seq-b",
    "sqlite-100-b",
)
#: Prototypes that exist only here, run with the candidate tree.
CANDIDATE_ONLY = ("sqlite-seq-b", "sqlite-100-b")
#: No store: the tree does not matter, measured once per round (raw: before every scenario).
TREELESS = ("raw", "handoff")
CONCURRENT = 100
SESSIONS = 10
WARMUP_APPLIES = 50
TOPIC = "bench/sensor/0001/t"
PAYLOAD = bytes(range(64))


class _SyncCounter:
    """Counts os.fsync and os.fdatasync calls made from Python code in this process.

    :func:`_timed` zeroes it when the timed part starts, so warm-ups do not count.
    """

    #: The counter of this process, once the worker made one.
    current: _SyncCounter | None = None

    def __init__(self) -> None:
        self.calls = 0
        _SyncCounter.current = self
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name, None)
            if real is not None:
                setattr(os, name, self._counting(real))
        try:  # FileStore's syncs through Linux AIO (trees that have it): one per submit
            from mqtt_persist.stores.file.aio import AioContext
        except ImportError:
            return
        submit = AioContext.submit_fdatasync

        def counted_submit(context: AioContext, fd: int, token: int) -> None:
            submit(context, fd, token)
            self.calls += 1

        AioContext.submit_fdatasync = counted_submit  # type: ignore[method-assign]

    def _counting(self, real: Callable[[int], None]) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            self.calls += 1
            real(fd)

        return sync


def _raw(directory: Path, seconds: float) -> tuple[int, float]:
    fd = os.open(directory / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    data = bytes(100)
    try:
        for _ in range(WARMUP_APPLIES):
            os.write(fd, data)
            os.fdatasync(fd)
        done = 0
        started = time.perf_counter()
        while True:
            for _ in range(50):
                os.write(fd, data)
                os.fdatasync(fd)
            done += 50
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return done, elapsed
    finally:
        os.close(fd)


class _LoopSQLite:
    """Alternative (b), a prototype: SQL and COMMIT on the loop, the WAL synced by a thread.

    ``synchronous=NORMAL`` keeps the database consistent (SQLite syncs the WAL before every
    checkpoint) but COMMIT does not fsync; a thread then ``fdatasync``s the ``-wal`` file once
    for every commit made before that sync started, and only then are their callers resolved.
    Not production code: no leases, no error handling, checkpoints run inside COMMIT on the
    loop, and a busy database would block the loop for ``busy_timeout``.
    """

    def __init__(self, path: Path) -> None:
        self._path = str(path)
        self._conn: Any = None
        self._wal_fd = -1
        self._pending: Any = None
        self._thread: Any = None

    async def open(self) -> None:
        import queue
        import sqlite3
        import threading

        from mqtt_persist.stores import SQLiteStore
        from mqtt_persist.stores.sqlite.schema import configure

        async with SQLiteStore(self._path):  # creates the file and the schema
            pass
        self._conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        configure(self._conn, self._path, "NORMAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS bench_touch (x)")  # the -wal exists now
        self._wal_fd = os.open(self._path + "-wal", os.O_RDONLY)
        self._pending = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import queue

        while (first := self._pending.get()) is not None:
            waiters = [first]
            with_stop = False
            while True:
                try:
                    more = self._pending.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    with_stop = True
                    break
                waiters.append(more)
            os.fdatasync(self._wal_fd)
            loop = waiters[0].get_loop()
            loop.call_soon_threadsafe(_resolve_all, waiters)
            if with_stop:
                return

    async def apply(self, client_id: str, ops: list[Any]) -> None:
        from mqtt_persist.stores._checks import check_operations
        from mqtt_persist.stores.sqlite.schema import transaction
        from mqtt_persist.stores.sqlite.writes import _apply_batch

        check_operations(ops)
        with transaction(self._conn):
            _apply_batch(self._conn, client_id, ops, time.time())
        future = asyncio.get_running_loop().create_future()
        self._pending.put(future)
        await future

    async def close(self) -> None:
        self._pending.put(None)
        await asyncio.to_thread(self._thread.join)
        os.close(self._wal_fd)
        self._conn.close()


def _resolve_all(futures: list[Any]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


async def _handoff(directory: Path, seconds: float) -> tuple[int, float]:
    import queue
    import threading

    fd = os.open(directory / "handoff.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    loop = asyncio.get_running_loop()
    futures: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def syncer() -> None:
        while (future := futures.get()) is not None:
            os.fdatasync(fd)
            loop.call_soon_threadsafe(future.set_result, None)

    thread = threading.Thread(target=syncer, daemon=True)
    thread.start()
    data = bytes(170)

    async def step() -> int:
        for _ in range(50):
            os.write(fd, data)
            future = loop.create_future()
            futures.put(future)
            await future
        return 50

    try:
        await step()
        return await _timed(step, seconds)
    finally:
        futures.put(None)
        await asyncio.to_thread(thread.join)
        os.close(fd)


def _open_store(scenario: str, directory: Path) -> Any:
    from mqtt_persist.stores import FileStore, SQLiteStore

    if scenario.endswith("-b"):
        return _LoopSQLite(directory / "sessions.db")
    if scenario.startswith("file"):
        return FileStore(directory / "sessions", fsync=not scenario.endswith("nofsync"))
    synchronous = "NORMAL" if scenario.endswith("normal") else "FULL"
    return SQLiteStore(directory / "sessions.db", synchronous=synchronous)


class _Publisher:
    """One session's batches: message n with its predecessor's removal deferred into it."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.seq = 0

    def batch(self, seq: int, previous: int | None) -> list[Any]:
        from mqtt_persist.session.state import (
            MessageAdded,
            MessageRemoved,
            PacketIdAssigned,
            StoredMessage,
        )

        ops: list[Any] = [] if previous is None else [MessageRemoved(previous)]
        ops.append(MessageAdded(StoredMessage(seq, TOPIC, PAYLOAD, 1)))
        ops.append(PacketIdAssigned(seq, seq % 65535 + 1))
        return ops

    async def sequential(self, store: Any, count: int) -> None:
        for _ in range(count):
            self.seq += 1
            seq = self.seq
            await store.apply(self.client_id, self.batch(seq, seq - 1 if seq > 1 else None))

    async def concurrent(self, store: Any, rounds: int) -> None:
        for _ in range(rounds):
            base = self.seq
            await asyncio.gather(
                *(
                    store.apply(
                        self.client_id,
                        self.batch(base + k, base + k - CONCURRENT if base else None),
                    )
                    for k in range(1, CONCURRENT + 1)
                )
            )
            self.seq = base + CONCURRENT


async def _timed(step: Callable[[], Awaitable[int]], seconds: float) -> tuple[int, float]:
    """Run ``step`` (returns applies done) until ``seconds`` passed; (applies, seconds)."""
    done = 0
    if _SyncCounter.current is not None:
        _SyncCounter.current.calls = 0
    started = time.perf_counter()
    while True:
        done += await step()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done, elapsed


async def _store_scenario(scenario: str, directory: Path, seconds: float) -> tuple[int, float]:
    store = _open_store(scenario, directory)
    await store.open()
    try:
        if scenario.endswith("-100"):
            publisher = _Publisher("bench")
            await publisher.concurrent(store, 1)

            async def step() -> int:
                await publisher.concurrent(store, 1)
                return CONCURRENT

        elif scenario.endswith("-10s"):
            publishers = [_Publisher(f"bench-{i}") for i in range(SESSIONS)]
            await asyncio.gather(*(p.sequential(store, WARMUP_APPLIES) for p in publishers))

            async def step() -> int:
                await asyncio.gather(*(p.sequential(store, 20) for p in publishers))
                return 20 * SESSIONS

        else:
            publisher = _Publisher("bench")
            await publisher.sequential(store, WARMUP_APPLIES)

            async def step() -> int:
                await publisher.sequential(store, 50)
                return 50

        return await _timed(step, seconds)
    finally:
        await store.close()


def _worker(root: str, scenario: str, seconds: float, directory: str) -> None:
    sys.path.insert(0, root)
    import mqtt_persist

    origin = Path(mqtt_persist.__file__).resolve()
    if not origin.is_relative_to(Path(root).resolve()):
        raise SystemExit(f"mqtt_persist came from {origin}, not from {root}")
    where = Path(tempfile.mkdtemp(prefix=f"{scenario}-", dir=directory))
    try:
        counter = _SyncCounter()
        if scenario == "raw":
            applies, elapsed = _raw(where, seconds)
        elif scenario == "handoff":
            applies, elapsed = asyncio.run(_handoff(where, seconds))
        else:
            applies, elapsed = asyncio.run(_store_scenario(scenario, where, seconds))
        syncs = counter.calls if scenario.startswith("file") else None
    finally:
        shutil.rmtree(where, ignore_errors=True)
    print(json.dumps({"us": elapsed / applies * 1e6, "applies": applies, "syncs": syncs}))


def _measure(python: str, root: str, scenario: str, seconds: float, directory: str) -> Any:
    command = [python, str(HERE), "--worker", root, "--scenario", scenario]
    command += ["--seconds", str(seconds), "--dir", directory]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker for {root} ({scenario}) failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="the tree to compare against (e.g. /work/main)")
    parser.add_argument("--baseline-python", default=sys.executable)
    parser.add_argument("--candidate", default=str(HERE.parent.parent), help="default: this tree")
    parser.add_argument("--candidate-python", default=sys.executable)
    parser.add_argument("--seconds", type=float, default=1.0, help="per scenario and child")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.scenario, args.seconds, args.dir)
        return

    trees: list[tuple[str, str, str]] = [("new", args.candidate_python, args.candidate)]
    if args.baseline:
        trees.insert(0, ("old", args.baseline_python, args.baseline))
    labels = [label for label, _, _ in trees]
    scenarios = [scenario for scenario in args.only if scenario != "raw"]
    # Per (tree label or scenario for a store-less row, scenario): one value per round.
    us: dict[tuple[str, str], list[float]] = {}
    share: dict[tuple[str, str], list[float]] = {}
    syncs: dict[tuple[str, str], list[float]] = {}
    ratio: dict[str, list[float]] = {}
    raws: list[float] = []
    candidate = trees[-1]
    for round_no in range(args.rounds):
        for number, scenario in enumerate(scenarios):
            # The raw loop right before each scenario: a share compares neighbours in time.
            raw = _measure(candidate[1], candidate[2], "raw", args.seconds, args.dir)["us"]
            raws.append(raw)
            # Alternate which tree goes first, so neither always runs on a warmer machine.
            order = trees if (round_no + number) % 2 == 0 else list(reversed(trees))
            if scenario in TREELESS or scenario in CANDIDATE_ONLY:
                order = [candidate]  # no store, or only here: one run
            measured: dict[str, float] = {}
            for label, python, root in order:
                key = (scenario if scenario in TREELESS else label, scenario)
                result = _measure(python, root, scenario, args.seconds, args.dir)
                measured[label] = result["us"]
                us.setdefault(key, []).append(result["us"])
                share.setdefault(key, []).append(raw / result["us"])
                if result["syncs"] is not None:
                    syncs.setdefault(key, []).append(result["syncs"] / result["applies"])
            if len(measured) == 2:
                ratio.setdefault(scenario, []).append(measured["new"] / measured["old"])
        print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)

    print(
        f"µs per apply, median of {args.rounds} rounds of {args.seconds:g} s each; the raw "
        f"write+fdatasync loop ran before every scenario: median {statistics.median(raws):.0f} "
        f"µs, {min(raws):.0f}-{max(raws):.0f}; files in {args.dir}"
    )
    for label, python, root in trees:
        print(f"  {label}: {root} ({python})")
    print(
        "  new/old and share (raw µs / row µs, from the raw run next to it) are medians of "
        "the per-round ratios"
    )
    header = f"{'scenario':<18}" + "".join(f"{label + ' µs':>10}" for label in labels)
    if args.baseline:
        header += f"{'new/old':>9}"
    header += "".join(f"{label + ' share':>11}" for label in labels)
    header += "".join(f"{label + ' syncs/apply':>18}" for label in labels)
    print(header)
    for scenario in scenarios:
        # A row without a store is shown once, in the last column.
        names = [*labels[:-1], scenario] if scenario in TREELESS else labels
        keys = [(name, scenario) for name in names]
        line = f"{scenario:<18}" + "".join(_cell(_median(us.get(key)), 10, 1) for key in keys)
        if args.baseline:
            line += _cell(_median(ratio.get(scenario)), 9, 2)
        line += "".join(_cell(_median(share.get(key)), 11, 2) for key in keys)
        line += "".join(_cell(_median(syncs.get(key)), 18, 3) for key in keys)
        print(line)


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _cell(value: float | None, width: int, decimals: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{decimals}f}"


if __name__ == "__main__":
    main()
