"""Session stores under load: empty-queue rate, a queued backlog, restore time, bytes, memory.

    .venv/bin/python benchmarks/store_throughput.py [--quick] [--stores memory file ...]
    .venv/bin/python benchmarks/store_throughput.py --profile     # + cProfile of ours/file

One private mosquitto (``_broker.Mosquitto`` with ``max_queued_messages 0``, i.e. unlimited, and
``max_inflight_messages 20``) and, for RedisStore, one private redis-server
(``tests.support.redis_server``) serve the whole run; the system broker (1883) and the system
redis (6379) are never used. Every arrival is counted by an outside C subscriber
(``_observer.ArrivalCounter``: ``observer.c``, or ``mosquitto_sub`` where no C compiler is
found) that subscribed before the publisher connected; its timestamps are converted to
``time.monotonic()``, which everything compared to them uses.
Per store:

1. **Empty queue**: N QoS 1 messages, ``gather`` of 100 ``publish()`` at a time, then
   ``drain()``; msg/s from the first publish until every delivery is acknowledged AND the
   subscriber has all N. aiomqtt's sequential and concurrent/100 runs (the drivers of
   ``publish_throughput.py``) on the same broker give the baseline.
2. **Backlog**: a client OFFLINE (its broker port is a free port nobody listens on) publishes
   B messages (``gather`` of 1000) into a fresh store and closes. A new client on the same store
   then connects to the broker, restores the session (3), and once the first backlog message
   arrived publishes N more (``gather`` of 100). Reported: publish() calls/s of those N while
   the backlog is queued, and the drain rate of all B + N (connected to all acknowledged).
3. **Restore**: from the start of ``PersistentClient.__aenter__`` (store not opened yet) until
   ``__aenter__`` returned, and until the subscriber received the first backlog message.
4. **Bytes per queued message** right after the offline preparation.
5. **Client memory while holding the backlog**: a child process restores the prepared session
   offline with ``queue_memory_limit`` 1000 (default) and 0 (all in memory) and reports
   tracemalloc and RSS growth; for the file store also with a tenth of the backlog.

Exit status: 0 when every QoS 1 message of our runs arrived (exactly once) and nothing errored;
1 when one of our runs lost or duplicated a message or errored; 3 when only an aiomqtt baseline
did; 2 when the benchmark could not run. See README.md, "Stores: backlog, restore, bytes".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import logging
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Our tests package (the private redis-server), not gmqtt's top-level "tests" in site-packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _broker
from _broker import HOST, Mosquitto, free_port
from _observer import ArrivalCounter, build_observer, make_payloads
from publish_throughput import (
    WINDOW,
    Case,
    Context,
    Driver,
    Run,
    Tools,
    _in_loop,
    _load,
    _on_sigterm,
    _rate,
    _WarningCounter,
    aiomqtt_concurrent,
    aiomqtt_sequential,
    machine_description,
    measure,
    versions,
)

from mqtt_persist import DeliveryOutcome, FileStore, MemoryStore, PersistentClient, ProtocolVersion
from mqtt_persist.stores import SessionStore, SQLiteStore

#: The stores are measured through the 3.1.1 path (its window of 100; issue 7's figures). The
#: client's default since issue 8 is "auto": MQTT 5 against mosquitto, whose Receive Maximum
#: (20) would narrow the window and with it every durable figure.
V311 = ProtocolVersion.V311

STORES = ("memory", "file", "sqlite", "redis", "postgres")
#: The benchmark's own PostgreSQL database (the server's defaults: synchronous_commit on),
#: created by main() when "postgres" is among the stores.
POSTGRES_DSN: str | None = None
#: Our client's default window, which every row of ours uses.
OURS_WINDOW = WINDOW
#: aiomqtt's default window (paho's): its first baseline rows.
AIOMQTT_DEFAULT_WINDOW = 20
#: Upper bound for one waiting step (first arrival, drain, the deliveries) of the backlog run.
STEP_TIMEOUT = 300.0


# --- stores ----------------------------------------------------------------------------------


@dataclass
class StoreSpec:
    """Where one store's data lives, so that a later client (or a child process) reopens it."""

    kind: str
    location: str = ""  # file: directory; sqlite: database file; redis: URL; postgres: DSN
    prefix: str = ""  # redis: key prefix; postgres: schema

    def open(self, memory: dict[str, MemoryStore] | None = None) -> SessionStore:
        """A new, unopened store object on this medium (memory: the one shared object)."""
        if self.kind == "memory":
            assert memory is not None, "a MemoryStore cannot be reopened by another process"
            return memory.setdefault(self.location, MemoryStore())
        if self.kind == "file":
            return FileStore(self.location)  # fsync on, the default
        if self.kind == "sqlite":
            return SQLiteStore(self.location)  # synchronous FULL, the default
        if self.kind == "postgres":
            from mqtt_persist.stores.postgres import PostgresStore

            return PostgresStore(self.location, schema=self.prefix)
        from mqtt_persist.stores import RedisStore

        return RedisStore(self.location, prefix=self.prefix)


def make_spec(kind: str, workdir: Path, name: str, redis_url: str | None) -> StoreSpec:
    if kind == "file":
        return StoreSpec(kind, str(workdir / f"{name}-sessions"))
    if kind == "sqlite":
        return StoreSpec(kind, str(workdir / f"{name}.db"))
    if kind == "redis":
        assert redis_url is not None
        return StoreSpec(kind, redis_url, prefix=f"bench-{name}")
    if kind == "postgres":
        assert POSTGRES_DSN is not None
        return StoreSpec(kind, POSTGRES_DSN, prefix="bench_" + name.replace("-", "_"))
    return StoreSpec(kind, name)


def _postgres_schema_bytes(spec: StoreSpec) -> int:
    """Everything the schema's tables, indexes and TOAST take on disk (pg_total_relation_size)."""
    import psycopg

    with psycopg.connect(spec.location, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
            "AND c.relkind = 'r'",
            (spec.prefix,),
        ).fetchone()
    return int(row[0]) if row else 0


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _tree_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _redis_used_memory(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


# --- 1. empty queue --------------------------------------------------------------------------


@dataclass
class EmptyRun:
    result: Run
    #: publish() calls/s: N / (first publish until the last gather returned).
    accept_rate: float | None = None


def ours_concurrent(kind: str, redis_url: str | None, timings: dict[str, float]) -> Driver:
    """Like ``publish_throughput``'s concurrent driver for us, on any store, and it also times
    the publish() calls (``timings["accepted"]``, seconds from the first publish)."""

    async def drive(ctx: Context) -> None:
        memory: dict[str, MemoryStore] = {}
        store = make_spec(kind, ctx.workdir, ctx.client_id, redis_url).open(memory)
        try:
            async with PersistentClient(
                HOST,
                ctx.port,
                client_id=ctx.client_id,
                store=store,
                max_inflight=ctx.window,
                protocol=V311,
            ) as client:
                await client.wait_connected(10)
                topic, payloads, chunk = ctx.topic, ctx.payloads, ctx.chunk
                deliveries = []
                ctx.started()
                for start in range(0, len(payloads), chunk):
                    deliveries += await asyncio.gather(
                        *[client.publish(topic, p, 1) for p in payloads[start : start + chunk]]
                    )
                assert ctx.t_start is not None
                timings["accepted"] = time.monotonic() - ctx.t_start
                await client.drain(STEP_TIMEOUT)
                async with asyncio.timeout(STEP_TIMEOUT):
                    for delivery in deliveries:
                        if not delivery.done():
                            await delivery
                ctx.acked()
                await ctx.settle()
                wrong = sum(1 for d in deliveries if d.outcome is not DeliveryOutcome.ACKNOWLEDGED)
                if wrong:
                    ctx.note = f"{wrong} deliveries not acknowledged"
        finally:
            await store.close()

    return _in_loop(drive)


def run_empty(
    kind: str, tools: Tools, n: int, size: int, chunk: int, redis_url: str | None
) -> EmptyRun:
    timings: dict[str, float] = {}
    driver = ours_concurrent(kind, redis_url, timings)
    # A gather of one publish() at a time is a sequential publisher.
    key, mode = (
        (f"ours-{kind}-seq", "sequential")
        if chunk == 1
        else (f"ours-{kind}", f"concurrent/{chunk}")
    )
    case = Case(
        key, "ours", f"ours/{kind}", mode, 1, OURS_WINDOW, driver,
        chunk=chunk,
    )  # fmt: skip
    result = measure(case, make_payloads(n, size), tools)
    accepted = timings.get("accepted")
    return EmptyRun(result, n / accepted if accepted else None)


# --- 2./3./4. backlog ------------------------------------------------------------------------


@dataclass
class BacklogRun:
    kind: str
    backlog: int
    n: int
    # preparation (offline)
    prep_seconds: float | None = None
    prep_first_rate: float | None = None  # publish() calls/s over the first tenth
    prep_last_rate: float | None = None  # ... and over the last tenth
    prep_queued: int = 0
    bytes_per_msg: float | None = None
    bytes_note: str = ""
    # restore
    entered_after: float | None = None
    first_after: float | None = None
    connected_after: float | None = None
    # the N new messages while the backlog is queued, and the drain of all of them
    queued_at_publish: int | None = None
    accept_rate: float | None = None
    drain_rate: float | None = None  # (B + N) / (connected .. all acknowledged)
    e2e_rate: float | None = None  # arrived / (connected .. acknowledged and all arrived)
    unique: int = 0
    duplicates: int = 0
    error: str = ""
    warnings: int = 0
    first_warning: str = ""
    observer_busy: float | None = None  # see _observer.ArrivalCounter.busy
    memory: list[MemoryRun] = field(default_factory=list)

    @property
    def expected(self) -> int:
        return self.backlog + self.n

    @property
    def failed(self) -> bool:
        return bool(self.error) or self.unique != self.expected or self.duplicates > 0


@contextlib.contextmanager
def counting_warnings(run: BacklogRun) -> Iterator[None]:
    """Counts mqtt_persist's warnings into ``run`` instead of printing each one."""
    counter = _WarningCounter()
    logger = logging.getLogger("mqtt_persist")
    logger.addHandler(counter)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(counter)
        logger.propagate = True
        run.warnings += counter.count
        run.first_warning = run.first_warning or counter.first


async def prepare_offline(
    store: SessionStore,
    client_id: str,
    topic: str,
    count: int,
    size: int,
    chunk: int,
    run: BacklogRun,
) -> None:
    """Publish ``count`` QoS 1 messages with no broker reachable, then close the client."""
    payloads = make_payloads(count, size)
    dead_port = free_port()  # free a moment ago; nobody listens on it
    async with PersistentClient(HOST, dead_port, client_id=client_id, store=store) as client:
        marks = [time.perf_counter()]
        for start in range(0, count, chunk):
            await asyncio.gather(
                *[client.publish(topic, p, 1) for p in payloads[start : start + chunk]]
            )
            marks.append(time.perf_counter())
        run.prep_seconds = marks[-1] - marks[0]
        run.prep_queued = client.stats.queued
        tenth = max(1, len(marks) // 10)
        per_chunk = count / (len(marks) - 1)
        run.prep_first_rate = tenth * per_chunk / (marks[tenth] - marks[0])
        run.prep_last_rate = tenth * per_chunk / (marks[-1] - marks[-1 - tenth])
    del payloads


async def restore_and_drain(
    store: SessionStore,
    client_id: str,
    ctx: Context,
    observer: ArrivalCounter,
    run: BacklogRun,
) -> None:
    try:
        await _restore_and_drain(store, client_id, ctx, observer, run)
    finally:
        await store.close()


async def _restore_and_drain(
    store: SessionStore,
    client_id: str,
    ctx: Context,
    observer: ArrivalCounter,
    run: BacklogRun,
) -> None:
    client = PersistentClient(HOST, ctx.port, client_id=client_id, store=store, protocol=V311)
    connected: list[float] = []

    async def note_connected() -> None:
        await client.wait_connected(STEP_TIMEOUT)
        connected.append(time.monotonic())

    t0 = time.monotonic()
    async with client:
        run.entered_after = time.monotonic() - t0
        watcher = asyncio.create_task(note_connected())
        async with asyncio.timeout(STEP_TIMEOUT):
            # The subscriber's process timestamps the arrival; this loop only notices it.
            while observer.t_first is None:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        run.first_after = observer.t_first - t0
        run.queued_at_publish = client.stats.queued
        topic, chunk, payloads = ctx.topic, ctx.chunk, ctx.payloads
        deliveries = []
        started = time.monotonic()
        for start in range(0, len(payloads), chunk):
            deliveries += await asyncio.gather(
                *[client.publish(topic, p, 1) for p in payloads[start : start + chunk]]
            )
        run.accept_rate = len(payloads) / (time.monotonic() - started)
        await client.drain(STEP_TIMEOUT)
        async with asyncio.timeout(STEP_TIMEOUT):
            for delivery in deliveries:
                if not delivery.done():
                    await delivery
        t_acked = time.monotonic()
        await watcher
        run.connected_after = connected[0] - t0
        run.drain_rate = run.expected / (t_acked - connected[0])
        await ctx.settle()
        wrong = sum(1 for d in deliveries if d.outcome is not DeliveryOutcome.ACKNOWLEDGED)
        if wrong:
            run.error = f"{wrong} deliveries not acknowledged"
        unique, _total, _dups, t_complete, t_last = observer.snapshot()
        end = max(t for t in (t_acked, t_complete or t_last) if t is not None)
        run.e2e_rate = unique / (end - connected[0])


async def prepare_and_measure(
    spec: StoreSpec,
    store: SessionStore,
    client_id: str,
    topic: str,
    run: BacklogRun,
    size: int,
    prep_chunk: int,
) -> None:
    """2a + 4: the offline preparation, then the bytes it left per queued message (but see
    :func:`memory_store_bytes`); closes the store (in this event loop: a RedisStore's
    connections belong to it)."""
    try:
        redis_before = _redis_used_memory(spec.location) if spec.kind == "redis" else 0
        await prepare_offline(store, client_id, topic, run.backlog, size, prep_chunk, run)
        queued = run.prep_queued
        if spec.kind == "file":
            run.bytes_per_msg = _tree_size(Path(spec.location)) / queued
            run.bytes_note = "all files in the session directory"
        elif spec.kind == "sqlite":
            db, wal = Path(spec.location), Path(spec.location + "-wal")
            before = _size(db) + _size(wal)
            await store.close()  # the last connection to close checkpoints the WAL
            after = _size(db) + _size(wal)
            run.bytes_per_msg = after / queued
            run.bytes_note = (
                f"db + wal after the checkpoint SQLite does when the store closes "
                f"({before / queued:.0f} B/msg before it, WAL not yet checkpointed)"
            )
        elif spec.kind == "redis":
            await store.close()
            run.bytes_per_msg = (_redis_used_memory(spec.location) - redis_before) / queued
            run.bytes_note = "INFO memory used_memory delta (server-side)"
        elif spec.kind == "postgres":
            await store.close()
            run.bytes_per_msg = _postgres_schema_bytes(spec) / queued
            run.bytes_note = "pg_total_relation_size of the schema's tables (heap, indexes, TOAST)"
    finally:
        await store.close()


def memory_store_bytes(count: int, size: int, prep_chunk: int) -> float:
    """MemoryStore bytes per queued message: tracemalloc growth over an offline preparation into
    a scratch store, measured once the client is gone. A separate run, because tracing slows
    publishing about five times; the real preparation is timed untraced."""
    store = MemoryStore()
    scratch = BacklogRun("memory", count, 0)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        asyncio.run(
            prepare_offline(store, "bench-bytes", "bench/bytes", count, size, prep_chunk, scratch)
        )
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return grown / scratch.prep_queued


def run_backlog(
    spec: StoreSpec,
    tools: Tools,
    backlog: int,
    n: int,
    size: int,
    chunk: int,
    prep_chunk: int,
    memory_runs: list[MemoryRun] | None,
) -> BacklogRun:
    """Prepare ``backlog`` offline, measure its bytes (and the client's memory in child
    processes), then restore it against the broker, publish N more and drain everything."""
    run = BacklogRun(spec.kind, backlog, n)
    run_id = uuid.uuid4().hex[:12]
    client_id = f"bench-backlog-{spec.kind}-{run_id}"
    topic = f"bench/{run_id}"
    memory: dict[str, MemoryStore] = {}
    observer: ArrivalCounter | None = None
    workdir = Path(tempfile.mkdtemp(prefix="mqtt-bench-backlog-"))
    with counting_warnings(run):
        try:
            # 2a + 4: the offline preparation and the bytes it left in the store.
            store = spec.open(memory)
            asyncio.run(prepare_and_measure(spec, store, client_id, topic, run, size, prep_chunk))
            if spec.kind == "memory":
                run.bytes_per_msg = memory_store_bytes(backlog, size, prep_chunk)
                run.bytes_note = (
                    "tracemalloc growth over a second, traced preparation of as many messages "
                    "into a scratch MemoryStore (payload objects included)"
                )
            if run.prep_queued != backlog:
                raise RuntimeError(f"{run.prep_queued} queued after preparing {backlog}")
            # 5: the client's memory while it holds the backlog, in child processes.
            if memory_runs is not None:
                for limit in (1000, 0):
                    memory_runs.append(measure_memory(spec, client_id, limit, backlog))
            # 3 + 2b: restore against the broker, publish N more, drain all.
            payloads = make_payloads(backlog + n, size)[backlog:]
            observer = ArrivalCounter(HOST, tools.port, topic, backlog + n, size, tools.observer)
            ctx = Context(
                port=tools.port,
                topic=topic,
                payloads=payloads,
                qos=1,
                client_id=client_id,
                workdir=workdir,
                observer=observer,
                window=OURS_WINDOW,
                chunk=chunk,
            )
            observer.start()
            asyncio.run(restore_and_drain(spec.open(memory), client_id, ctx, observer, run))
        except Exception as exc:  # reported in the table; the other stores still run
            run.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        finally:
            if observer is not None:
                observer.stop()
                run.unique, _total, run.duplicates, _c, _l = observer.snapshot()
                run.observer_busy = observer.busy
                if observer.error and not run.error:
                    run.error = observer.error
            shutil.rmtree(workdir, ignore_errors=True)
    return run


# --- 5. client memory (child processes) -------------------------------------------------------


@dataclass
class MemoryRun:
    kind: str
    backlog: int
    limit: int
    queued: int = 0
    in_memory: int = 0
    traced: int = 0  # tracemalloc: bytes allocated since before __aenter__, still held
    traced_peak: int = 0
    rss: int = 0  # VmRSS growth since before __aenter__ (separate child, no tracemalloc)
    rss_peak: int = 0  # VmHWM growth
    error: str = ""


def _proc_kib(name: str) -> int:
    """A ``/proc/self/status`` value in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0; elsewhere the peak stays)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def memory_child(spec_json: str) -> int:
    """Child process: restore the session offline, report memory as one JSON line."""
    args = json.loads(spec_json)
    spec = StoreSpec(**args["store"])
    traced = args["mode"] == "tracemalloc"

    async def hold() -> dict[str, int]:
        store = spec.open()
        client = PersistentClient(
            HOST,
            free_port(),
            client_id=args["client_id"],
            store=store,
            queue_memory_limit=args["limit"],
            cleanup_interval=None,
        )
        gc.collect()
        _reset_peak_rss()
        rss0, hwm0 = _proc_kib("VmRSS"), _proc_kib("VmHWM")
        if traced:
            tracemalloc.start()
        try:
            async with client:
                await asyncio.sleep(0.3)  # restored; a failed connection attempt or two
                session = client._session
                out = {
                    "queued": client.stats.queued,
                    "in_memory": session.queued_in_memory if session else -1,
                    "rss": _proc_kib("VmRSS") - rss0,
                    "rss_peak": _proc_kib("VmHWM") - min(hwm0, rss0),
                }
                if traced:
                    out["traced"], out["traced_peak"] = tracemalloc.get_traced_memory()
            return out
        finally:
            tracemalloc.stop()
            await store.close()

    print(json.dumps(asyncio.run(hold())))
    return 0


def measure_memory(spec: StoreSpec, client_id: str, limit: int, backlog: int) -> MemoryRun:
    """Two children (RSS without tracemalloc, then tracemalloc) restoring the same session."""
    run = MemoryRun(spec.kind, backlog, limit)
    for mode in ("rss", "tracemalloc"):
        request = {
            "store": {"kind": spec.kind, "location": spec.location, "prefix": spec.prefix},
            "client_id": client_id,
            "limit": limit,
            "mode": mode,
        }
        child = subprocess.run(
            [sys.executable, __file__, "--memory-child", json.dumps(request)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if child.returncode:
            run.error = (child.stderr.strip().splitlines() or ["?"])[-1]
            return run
        report = json.loads(child.stdout.strip().splitlines()[-1])
        run.queued, run.in_memory = report["queued"], report["in_memory"]
        if mode == "rss":
            run.rss, run.rss_peak = report["rss"], report["rss_peak"]
        else:
            run.traced, run.traced_peak = report["traced"], report["traced_peak"]
    return run


def memory_small_backlog(
    workdir: Path, backlog: int, size: int, prep_chunk: int, out: list[MemoryRun]
) -> None:
    """File store only: the same memory figures with a tenth of the backlog."""
    spec = make_spec("file", workdir, "small", None)
    client_id = f"bench-small-{uuid.uuid4().hex[:12]}"
    scratch = BacklogRun("file", backlog, 0)
    asyncio.run(
        prepare_and_measure(spec, spec.open(), client_id, "bench/small", scratch, size, prep_chunk)
    )
    for limit in (1000, 0):
        out.append(measure_memory(spec, client_id, limit, backlog))


# --- report ----------------------------------------------------------------------------------


def _busy(share: float | None) -> str:
    return f"{share:.0%}" if share is not None else "-"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 1) -> str:
    """A Markdown table; the first ``left`` columns are left-aligned, the rest right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i < left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = "|" + "|".join(
        "-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths)
    )
    return "\n".join([line(header), rule + "|", *(line(r) for r in rows)])


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000:,.0f}" if seconds is not None else "-"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def memory_slopes(memory: list[MemoryRun]) -> list[str]:
    """What one more queued message held in memory costs: (limit 0 - limit 1000) / (B - 1000)."""
    notes = []
    by_key = {(m.kind, m.backlog, m.limit): m for m in memory if not m.error}
    for (kind, backlog, limit), everything in by_key.items():
        bounded = by_key.get((kind, backlog, 1000))
        if limit != 0 or bounded is None or backlog <= bounded.in_memory:
            continue
        extra = everything.in_memory - bounded.in_memory
        notes.append(
            f"- memory, {kind}, backlog {backlog:,}: each queued message held in memory "
            f"(limit 0 vs 1000) costs {(everything.traced - bounded.traced) / extra:,.0f} B "
            f"(tracemalloc), {(everything.rss_peak - bounded.rss_peak) / extra:,.0f} B of peak RSS"
        )
    return notes


def render(
    baselines: list[Run], empties: list[EmptyRun], backlogs: list[BacklogRun], n: int
) -> str:
    best = max((r.rate or 0.0 for r in baselines if not r.failed), default=0.0)
    rows = []
    for r in baselines:
        rows.append(
            (
                r.case.client,
                r.case.mode,
                str(r.case.window),
                _rate(r.rate),
                _rate(r.acked_rate),
                "-",
                f"{r.unique}/{r.n}",
                str(r.duplicates),
                _busy(r.observer_busy),
                f"{r.rate / best:.2f}x" if r.rate and best else "-",
            )
        )
    for e in empties:
        r = e.result
        rows.append(
            (
                r.case.client,
                r.case.mode,
                str(r.case.window),
                _rate(r.rate),
                _rate(r.acked_rate),
                _rate(e.accept_rate),
                f"{r.unique}/{r.n}" + ("" if r.unique == r.n else " LOST"),
                str(r.duplicates),
                _busy(r.observer_busy),
                f"{r.rate / best:.2f}x" if r.rate and best else "-",
            )
        )
    out = [
        f"**1. Empty queue**: {n:,} QoS 1 messages",
        "",
        table(
            (
                "client",
                "mode",
                "inflight",
                "msg/s",
                "acked msg/s",
                "publish() calls/s",
                "arrived/N",
                "dups",
                "observer busy",
                "vs aiomqtt best",
            ),
            rows,
            left=2,
        ),
    ]
    if backlogs:
        empty_accept = {e.result.case.client.split("/")[1]: e.accept_rate for e in empties}
        rows = []
        for b in backlogs:
            base = empty_accept.get(b.kind)
            rows.append(
                (
                    b.kind,
                    f"{b.bytes_per_msg:,.0f}" if b.bytes_per_msg else "-",
                    _rate(b.prep_first_rate),
                    _rate(b.prep_last_rate),
                    _ms(b.entered_after),
                    _ms(b.first_after),
                    _rate(b.accept_rate),
                    f"{b.accept_rate / base:.2f}x" if b.accept_rate and base else "-",
                    _rate(b.drain_rate),
                    _rate(b.e2e_rate),
                    f"{b.unique}/{b.expected}" + ("" if b.unique == b.expected else " LOST"),
                    str(b.duplicates),
                    _busy(b.observer_busy),
                )
            )
        b0 = backlogs[0]
        out += [
            "",
            f"**2-4. Backlog**: {b0.backlog:,} queued offline, then {b0.n:,} more published "
            f"while they drain, window {OURS_WINDOW}, queue_memory_limit 1000 (the defaults)",
            "",
            table(
                (
                    "store",
                    "bytes/msg",
                    "offline publish/s, first 10%",
                    "last 10%",
                    "__aenter__ ms",
                    "first arrival ms",
                    "publish() calls/s with backlog",
                    "vs empty queue",
                    "drain msg/s (acked)",
                    "drain msg/s (arrived)",
                    "arrived",
                    "dups",
                    "observer busy",
                ),
                rows,
            ),
        ]
        notes = [f"- bytes/msg, {b.kind}: {b.bytes_note}" for b in backlogs if b.bytes_note]
        memory = [m for b in backlogs for m in b.memory]
        if memory:
            rows = [
                (
                    m.kind,
                    f"{m.backlog:,}",
                    str(m.limit) + (" (all)" if m.limit == 0 else ""),
                    f"{m.in_memory:,}",
                    _mib(m.traced),
                    _mib(m.traced_peak),
                    _mib(m.rss),
                    _mib(m.rss_peak),
                )
                for m in memory
                if not m.error
            ]
            out += [
                "",
                "**5. Client memory while restored offline with the backlog** (MiB, growth "
                "since just before `__aenter__`)",
                "",
                table(
                    (
                        "store",
                        "backlog",
                        "queue_memory_limit",
                        "queued in memory",
                        "tracemalloc held",
                        "tracemalloc peak",
                        "RSS",
                        "peak RSS",
                    ),
                    rows,
                ),
            ]
            notes += memory_slopes(memory)
            notes += [f"- memory {m.kind} limit {m.limit}: {m.error}" for m in memory if m.error]
        for b in backlogs:
            if b.error:
                notes.append(f"- error in the {b.kind} backlog run: {b.error}")
            if b.warnings:
                notes.append(
                    f"- {b.warnings} warning(s) in the {b.kind} backlog run, first: "
                    f"{b.first_warning}"
                )
        for e in empties:
            r = e.result
            if r.error:
                notes.append(f"- error in {r.case.label}: {r.error}")
            if r.warnings:
                notes.append(
                    f"- {r.warnings} warning(s) in {r.case.label}, first: {r.first_warning}"
                )
        if notes:
            out += ["", *notes]
    return "\n".join(out)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Session stores under load: empty-queue rate, a queued backlog, restore "
        "time, bytes and memory per message, on one private mosquitto and redis-server."
    )
    parser.add_argument("--count", type=int, default=10_000, help="N new messages (10000)")
    parser.add_argument("--backlog", type=int, default=100_000, help="queued offline (100000)")
    parser.add_argument("--payload", type=int, default=64, help="payload bytes, >= 8 (64)")
    parser.add_argument(
        "--quick", action="store_true", help="a 10,000 backlog and 2,000 messages (~1 min)"
    )
    parser.add_argument("--chunk", type=int, default=100, help="publishes per gather (100)")
    parser.add_argument(
        "--sequential",
        type=int,
        default=2_000,
        help="messages of the sequential durable runs, one publish() at a time (2000; 0: none)",
    )
    parser.add_argument(
        "--prep-chunk", type=int, default=1000, help="offline publishes per gather (1000)"
    )
    parser.add_argument("--stores", nargs="+", default=list(STORES), choices=STORES)
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the child-process memory figures (5)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="finally, one more ours/file empty-queue run under cProfile (top 15 by own time)",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.backlog = 2_000, 10_000
    if args.payload < 8 or min(args.count, args.backlog, args.chunk, args.prep_chunk) < 1:
        parser.error("--payload must be >= 8, the counts and chunks positive")
    return args


def start_broker() -> Mosquitto:
    """``_broker.Mosquitto`` with an unlimited outgoing queue per client instead of 1,000,000
    (the backlog run holds everything not yet delivered to the subscriber there)."""
    original = _broker.CONFIG_TEMPLATE
    template = re.sub(r"(?m)^max_queued_messages .*$", "max_queued_messages 0", original)
    if "max_queued_messages 0" not in template:
        template += "max_queued_messages 0\n"
    if not re.search(r"(?m)^max_inflight_messages 20$", template):
        template = re.sub(r"(?m)^max_inflight_messages .*\n", "", template)
        template += "max_inflight_messages 20\n"
    _broker.CONFIG_TEMPLATE = template
    broker = Mosquitto()
    try:
        broker.start()
    finally:
        _broker.CONFIG_TEMPLATE = original
    return broker


def broker_limits(broker: Mosquitto) -> str:
    assert broker.workdir is not None
    lines = (broker.workdir / "mosquitto.conf").read_text().splitlines()
    return ", ".join(line for line in lines if line.startswith("max_"))


def profile_file_run(tools: Tools, n: int, size: int, chunk: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    run = run_empty("file", tools, n, size, chunk, None)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_stats(15)
    r = run.result
    head = (
        f"cProfile of ours/file concurrent/{chunk} (empty queue, {n:,} messages; profiled: "
        f"{_rate(r.rate)} msg/s, {_rate(r.acked_rate)} acked msg/s, {r.unique}/{r.n} arrived)"
    )
    body = text.getvalue()
    start = body.find("   ncalls")
    return head + "\n" + (body[start:] if start >= 0 else body).rstrip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child)
    signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="mqtt-bench-stores-"))
    redis_server: Any = None
    broker: Mosquitto | None = None
    stack = contextlib.ExitStack()
    try:
        try:
            broker = start_broker()
            redis_url = None
            if "redis" in args.stores:
                from tests.support.redis_server import RedisServer

                redis_server = RedisServer(workdir / "redis").start()
                redis_url = redis_server.url
            if "postgres" in args.stores:
                global POSTGRES_DSN
                from tests.support.postgres import private_database

                # A database of our own with the server's defaults (synchronous_commit on).
                POSTGRES_DSN = stack.enter_context(private_database(server_defaults=True))
        except (OSError, subprocess.SubprocessError, RuntimeError, BaseException) as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            print(f"cannot run the benchmark: {exc}", file=sys.stderr)
            return 2
        print(f"machine:  {machine_description()}")
        print(f"broker:   {broker.version}, private on 127.0.0.1 ({broker_limits(broker)})")
        if redis_server is not None:
            version = subprocess.run(
                [redis_server.binary or "redis-server", "--version"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
            print(f"redis:    {' '.join(version[:3])}, private on 127.0.0.1")
        if POSTGRES_DSN is not None:
            import psycopg

            with psycopg.connect(POSTGRES_DSN) as conn:
                row = conn.execute("SELECT version(), current_setting('synchronous_commit')")
                pg_version, sync = row.fetchone() or ("?", "?")
            print(f"postgres: {' '.join(pg_version.split()[:2])}, synchronous_commit {sync}, "
                  "a database of our own on 127.0.0.1:5432")  # fmt: skip
        clients = versions(None)
        del clients["paho-c"]
        print("clients:  " + ", ".join(f"{k} {v}" for k, v in clients.items()))
        observer, why = build_observer(workdir)
        print(f"observer: {'observer.c (ours)' if observer else 'mosquitto_sub (' + why + ')'}")
        print(
            f"workload: {args.count:,} QoS 1 messages of {args.payload} bytes; backlog "
            f"{args.backlog:,}; stores {', '.join(args.stores)}",
            flush=True,
        )
        load_before, began = _load(), time.perf_counter()
        n, size, chunk = args.count, args.payload, args.chunk
        tools = Tools(broker.port, Path(tempfile.gettempdir()), observer, None)
        sequential, concurrent = _in_loop(aiomqtt_sequential), _in_loop(aiomqtt_concurrent)
        conc, default = f"concurrent/{chunk}", AIOMQTT_DEFAULT_WINDOW

        baselines: list[Run] = []
        for case in (
            Case("aiomqtt-seq", "aiomqtt", "aiomqtt", "sequential", 1, default, sequential),
            Case("aiomqtt-conc", "aiomqtt", "aiomqtt", conc, 1, default, concurrent, chunk=chunk),
            # The same window as ours, so the baseline is aiomqtt at its best, not at 20.
            Case("aiomqtt-conc-wide", "aiomqtt", "aiomqtt", conc, 1, OURS_WINDOW, concurrent,
                 chunk=chunk),
        ):  # fmt: skip
            result = measure(case, make_payloads(n, size), tools)
            baselines.append(result)
            print(f"  1. {case.label:<30} {_rate(result.rate):>7} msg/s", flush=True)
        empties: list[EmptyRun] = []
        for kind in args.stores:
            run = run_empty(kind, tools, n, size, chunk, redis_url)
            empties.append(run)
            print(
                f"  1. ours/{kind:<25} {_rate(run.result.rate):>7} msg/s, "
                f"{run.result.unique}/{n} arrived, {_rate(run.accept_rate)} publish()/s",
                flush=True,
            )
        for kind in args.stores if args.sequential else ():
            run = run_empty(kind, tools, args.sequential, size, 1, redis_url)
            empties.append(run)
            print(
                f"  1. ours/{kind:<25} {_rate(run.result.rate):>7} msg/s sequential, "
                f"{run.result.unique}/{args.sequential} arrived",
                flush=True,
            )
        backlogs: list[BacklogRun] = []
        for kind in args.stores:
            spec = make_spec(kind, workdir, f"{kind}-{uuid.uuid4().hex[:8]}", redis_url)
            runs_memory = None if args.no_memory or kind == "memory" else []
            backlog = run_backlog(
                spec, tools, args.backlog, n, size, chunk, args.prep_chunk, runs_memory
            )
            backlog.memory = runs_memory or []
            if kind == "file" and runs_memory is not None:
                memory_small_backlog(
                    workdir, args.backlog // 10, size, args.prep_chunk, backlog.memory
                )
            backlogs.append(backlog)
            print(
                f"  2. {kind:<8} backlog: prepared in {backlog.prep_seconds or 0:.1f} s, "
                f"first arrival after {_ms(backlog.first_after)} ms, drain "
                f"{_rate(backlog.drain_rate)} msg/s, {backlog.unique}/{backlog.expected} "
                f"arrived{'  FAILED: ' + backlog.error if backlog.failed else ''}",
                flush=True,
            )
        elapsed = time.perf_counter() - began
        profile = profile_file_run(tools, n, size, chunk) if args.profile else ""
    finally:
        if redis_server is not None:
            redis_server.stop()
        if broker is not None:
            broker.stop()
        stack.close()  # drops the benchmark's PostgreSQL database
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\n{elapsed:.0f} s; 1-minute load average {load_before} before, {_load()} after "
        "(other processes on the machine add noise)\n"
    )
    print(render(baselines, empties, backlogs, n))
    if profile:
        print("\n" + profile)
    ours_failed = [e.result for e in empties if e.result.failed] + [b for b in backlogs if b.failed]
    if ours_failed:
        print("\nFAILED: a QoS 1 message of ours did not arrive exactly once, or a run errored")
        return 1
    return 3 if any(r.failed for r in baselines) else 0


if __name__ == "__main__":
    sys.exit(main())
