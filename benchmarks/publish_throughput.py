"""Publish throughput of mqtt_persist next to aiomqtt, gmqtt, Paho C and the disk, on one
private mosquitto, counted by an outside subscriber faster than every client under test.

    .venv/bin/python benchmarks/publish_throughput.py            # the figures (~3 min)
    .venv/bin/python benchmarks/publish_throughput.py --quick    # for iteration (~20 s)
    .venv/bin/python benchmarks/publish_throughput.py --chart docs/benchmarks.png

Every row publishes N messages (64-byte payloads by default, each starting with its index) to a
fresh topic; an outside C subscriber (``observer.c``, or ``mosquitto_sub``; see ``_observer.py``)
counts what arrived, which messages were lost and which came twice. The rows run one after the
other against the same broker, and the whole set is repeated (5 times by default, interleaved,
so that a noisy minute on the shared machine hits every row alike); the table gives each row's
median. Three reference rows bound the others: the observer alone (fed by a stand-in broker),
mosquitto's own ceiling (fed by a raw-socket blast), and a plain ``write + fdatasync`` loop on
the stores' disk. After the table come the ratios that issue 7's "Done when" names, each with
its target and PASS/MISS, the ceiling checks, and the path of a JSON file with every run
(``chart.py`` draws ``docs/benchmarks.png`` from it). See README.md.

Exit status: 0 when every run delivered each of its N messages exactly once and nothing errored
(ratio targets missed do not change it: they are goals for the library, printed as MISS);
1 when one of mqtt_persist's runs did not; 3 when only another row did; 2 when the benchmark
could not run at all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiomqtt
import gmqtt
from _broker import HOST, Mosquitto
from _observer import (
    INDEX_DIGITS,
    ArrivalCounter,
    build_observer,
    find_mosquitto_sub,
    make_payloads,
)
from _wire import BLAST_WINDOW, StandInBroker, blast, encode_publish
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from mqtt_persist import DeliveryOutcome, FileStore, MemoryStore, PersistentClient, ProtocolVersion
from mqtt_persist.stores import SessionStore, SQLiteStore

#: Seconds without a new arrival after which a run stops waiting for missing messages.
QUIET_SECONDS = 3.0
#: Upper bound for one run's publishing, and separately for waiting on the observer.
RUN_TIMEOUT = 60.0
#: Our client's default in-flight window, and the window gmqtt, aiomqtt (its better one: 100
#: beat paho's default 20 by 15-25 % in the earlier README runs) and Paho C get in theirs.
WINDOW = 100
#: Publishes per ``asyncio.gather`` in the concurrent rows of ours and aiomqtt.
CHUNK = 100
#: The Receive Maximum the benchmark's mosquitto announces to MQTT 5 clients (its
#: ``max_inflight_messages``, _broker.py): the in-flight window of every MQTT 5 row.
RECEIVE_MAXIMUM = 20
#: Bytes per record of the raw write + fdatasync loop: about what FileStore appends for one
#: 64-byte message (its records measured ~100 B per queued message).
RAW_RECORD = 100
#: Loggers whose warnings are counted per run, per client family.
LOGGERS = {"aiomqtt": "mqtt", "gmqtt": "gmqtt", "ours": "mqtt_persist"}
SCHEMA = 1

_BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class Context:
    """What a driver needs for one run, and the timestamps it records (``time.monotonic()``;
    the observer's times are converted to it)."""

    port: int
    topic: str
    payloads: list[bytes]
    qos: int
    client_id: str
    workdir: Path
    observer: ArrivalCounter | None
    window: int = WINDOW  # in-flight window for the clients that take one
    chunk: int = CHUNK  # publishes per gather in the concurrent drivers
    paho_binary: Path | None = None
    stand_in: StandInBroker | None = None
    t_start: float | None = None
    t_acked: float | None = None
    note: str = ""

    def started(self) -> None:
        """Call immediately before the first publish."""
        self.t_start = time.monotonic()

    def acked(self) -> None:
        """Call as soon as the publisher knows every message was acknowledged (QoS 0: sent)."""
        self.t_acked = time.monotonic()

    def _settled(self, state: list[float]) -> bool:
        """One look at the observer: True when it has all N, nothing came for QUIET_SECONDS,
        or the deadline passed. ``state`` = [deadline, last total, time of last change]."""
        observer = self.observer
        if observer is None or observer.complete:
            return True
        now = time.monotonic()
        if observer.total != state[1]:
            state[1], state[2] = observer.total, now
            return False
        return now - state[2] > QUIET_SECONDS or now > state[0]

    async def settle(self) -> None:
        """Stay connected until the observer has all N (or nothing new came for a while). The
        end of the run is the observer's own timestamp, not this loop's."""
        state = [time.monotonic() + RUN_TIMEOUT, -1.0, time.monotonic()]
        while not self._settled(state):  # noqa: ASYNC110 - polls another process's file
            await asyncio.sleep(0.02)

    def settle_blocking(self) -> None:
        """:meth:`settle` for drivers without an event loop."""
        state = [time.monotonic() + RUN_TIMEOUT, -1.0, time.monotonic()]
        while not self._settled(state):
            time.sleep(0.02)


Driver = Callable[[Context], None]


def _in_loop(driver: Callable[[Context], Awaitable[None]]) -> Driver:
    """A driver that runs ``driver`` in a fresh event loop of its own."""

    def run(ctx: Context) -> None:
        asyncio.run(asyncio.wait_for(driver(ctx), 3 * RUN_TIMEOUT))

    return run


# --- drivers: the references -------------------------------------------------------------


def raw_fdatasync(ctx: Context) -> None:
    """The limit for a sequential durable publisher: ``os.write`` of RAW_RECORD bytes and
    ``os.fdatasync``, N times, in plain Python, on the disk the stores use."""
    record = b"r" * (RAW_RECORD - 1) + b"\n"
    fd = os.open(ctx.workdir / "raw.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        ctx.started()
        for _ in range(len(ctx.payloads)):
            os.write(fd, record)
            os.fdatasync(fd)
        ctx.acked()
    finally:
        os.close(fd)


def broker_ceiling(ctx: Context) -> None:
    """The fastest publisher we have (``_wire.blast``: pre-encoded PUBLISHes in large writes)
    drives mosquitto and the observer: the most they carry together. A client row near it
    measures mosquitto (one thread, ~3 reads per inbound packet) more than the client."""
    ctx.t_start, ctx.t_acked = blast(
        HOST, ctx.port, ctx.topic, ctx.payloads, ctx.qos, ctx.client_id
    )
    ctx.settle_blocking()


def observer_alone(ctx: Context) -> None:
    """The observer's own ceiling: a stand-in broker (``_wire.StandInBroker``, no mosquitto)
    writes the N PUBLISHes, encoded beforehand, to the observer as fast as its socket takes
    them."""
    assert ctx.stand_in is not None
    packets = b"".join(encode_publish(ctx.topic, p, 0, 0) for p in ctx.payloads)
    ctx.t_start, ctx.t_acked = ctx.stand_in.stream(packets)
    ctx.settle_blocking()


# --- drivers: ours -------------------------------------------------------------------------

StoreKind = str  # "file", "file-nofsync", "sqlite", "postgres", "memory"

#: The PostgreSQL database of the postgres rows: one of the run's own on the local server
#: (``tests.support.postgres.private_database``, the server's default synchronous_commit),
#: made by main() when a postgres row runs; each run gets a schema of its own in it.
_postgres_dsn: str | None = None


def _make_store(kind: StoreKind, workdir: Path) -> SessionStore:
    if kind == "postgres":
        from mqtt_persist.stores import PostgresStore

        assert _postgres_dsn is not None
        return PostgresStore(_postgres_dsn, schema=f"bench_{uuid.uuid4().hex[:12]}")
    if kind == "file":
        return FileStore(workdir / "sessions")  # fsync on: its default
    if kind == "file-nofsync":
        return FileStore(workdir / "sessions", fsync=False)
    if kind == "sqlite":
        return SQLiteStore(workdir / "sessions.db")  # synchronous="FULL": its default
    return MemoryStore()


def ours(
    store_kind: StoreKind,
    concurrent: bool,
    protocol: ProtocolVersion = ProtocolVersion.V311,
    *,
    many: bool = False,
) -> Driver:
    """``PersistentClient`` with its defaults (``max_inflight`` = the case's window, 100 = the
    default) over ``protocol``: MQTT 3.1.1 for the rows issue 7 follows (the client's default
    is ``"auto"``, which speaks MQTT 5 to mosquitto: the ``-v5`` rows). Sequential: ``await
    publish()`` one message at a time; concurrent: ``gather`` ``chunk`` publishes at a time;
    ``many``: ``publish_many()`` of ``chunk`` messages at a time (one commit per call).
    Then ``drain()`` and wait for every ``Delivery``: "acked" is when the application knows all
    were acknowledged. Over MQTT 5 the broker's Receive Maximum (20 here) narrows the window."""

    async def drive(ctx: Context) -> None:
        store = _make_store(store_kind, ctx.workdir)
        try:
            async with PersistentClient(
                HOST,
                ctx.port,
                client_id=ctx.client_id,
                store=store,
                max_inflight=ctx.window,
                protocol=protocol,
            ) as c:
                await c.wait_connected(10)
                topic, qos, payloads, chunk = ctx.topic, ctx.qos, ctx.payloads, ctx.chunk
                deliveries = []
                ctx.started()
                if many:
                    for start in range(0, len(payloads), chunk):
                        batch = [(topic, p) for p in payloads[start : start + chunk]]
                        deliveries += await c.publish_many(batch, qos)
                elif concurrent:
                    for start in range(0, len(payloads), chunk):
                        deliveries += await asyncio.gather(
                            *[c.publish(topic, p, qos) for p in payloads[start : start + chunk]]
                        )
                else:
                    for payload in payloads:
                        deliveries.append(await c.publish(topic, payload, qos))
                await c.drain(RUN_TIMEOUT)
                # drain() returns once the session is idle, which can be a flush before the
                # last deliveries are resolved; "acknowledged" means the application saw it.
                async with asyncio.timeout(RUN_TIMEOUT):
                    for delivery in deliveries:
                        if not delivery.done():
                            await delivery
                ctx.acked()
                await ctx.settle()
                expected = DeliveryOutcome.ACKNOWLEDGED if qos else DeliveryOutcome.SENT
                wrong = sum(1 for d in deliveries if d.outcome is not expected)
                if wrong:
                    ctx.note = f"{wrong} deliveries not {expected.value}"
        finally:
            await store.close()

    return _in_loop(drive)


# --- drivers: the other clients ------------------------------------------------------------


async def aiomqtt_sequential(ctx: Context) -> None:
    """aiomqtt's own way: ``await client.publish()`` returns after PUBACK/PUBCOMP (QoS>0)."""
    async with aiomqtt.Client(
        HOST,
        ctx.port,
        identifier=ctx.client_id,
        max_inflight_messages=ctx.window,
        timeout=RUN_TIMEOUT,
    ) as client:
        topic, qos = ctx.topic, ctx.qos
        ctx.started()
        for payload in ctx.payloads:
            await client.publish(topic, payload, qos)
        ctx.acked()
        await ctx.settle()


async def aiomqtt_concurrent(ctx: Context) -> None:
    """``asyncio.gather`` of ``chunk`` publishes at a time; each returns after its ack."""
    async with aiomqtt.Client(
        HOST,
        ctx.port,
        identifier=ctx.client_id,
        max_inflight_messages=ctx.window,
        timeout=RUN_TIMEOUT,
    ) as client:
        # aiomqtt logs a warning per publish while more than 10 calls are pending; a user who
        # publishes concurrently on purpose raises the threshold (the counting stays).
        client.pending_calls_threshold = ctx.chunk + ctx.window
        topic, qos, payloads, chunk = ctx.topic, ctx.qos, ctx.payloads, ctx.chunk
        ctx.started()
        for start in range(0, len(payloads), chunk):
            await asyncio.gather(
                *[client.publish(topic, p, qos) for p in payloads[start : start + chunk]]
            )
        ctx.acked()
        await ctx.settle()


class _CountingGmqtt(gmqtt.Client):  # type: ignore[misc]
    """gmqtt that wakes the driver whenever a QoS 1/2 flow completes.

    gmqtt calls ``_remove_message_from_queue`` exactly when a flow ends (PUBACK, PUBCOMP, or a
    refusing PUBREC; a PUBREC that moves on swaps the stored PUBLISH for the PUBREL through
    another method), so publishes minus those calls is the number of open flows.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.completed = 0
        self.room = asyncio.Event()

    def _remove_message_from_queue(self, mid: int) -> None:
        super()._remove_message_from_queue(mid)
        self.completed += 1
        self.room.set()


def _gmqtt(version: int = MQTTv311) -> Driver:
    """gmqtt 0.8 (MQTT 3.1.1, or its MQTT 5 mode). Its ``publish()`` is synchronous and only
    queues the bytes, and gmqtt has no window of its own: a case's window 0 issues all N at once
    (its natural use), a positive one keeps at most that many flows open, as our client does.
    "Acked" is when gmqtt's store of unacknowledged messages is empty, i.e. every flow
    completed. Over MQTT 5 gmqtt's packet-ID pool is the broker's Receive Maximum less one,
    and publishing past it raises, so the window is capped there."""

    async def drive(ctx: Context) -> None:
        client = _CountingGmqtt(ctx.client_id, clean_session=True)
        await client.connect(HOST, ctx.port, version=version)
        try:
            storage = client._persistent_storage
            topic, qos = ctx.topic, ctx.qos
            limit = ctx.window if ctx.window and qos else len(ctx.payloads) + 1
            if version == MQTTv50 and qos:
                # gmqtt sizes its packet-ID pool by the broker's Receive Maximum and raises
                # OverflowError past Receive Maximum - 1 IDs in use: its own cap.
                limit = min(limit, RECEIVE_MAXIMUM - 1)
            ctx.started()
            for sent, payload in enumerate(ctx.payloads):
                while sent - client.completed >= limit:
                    client.room.clear()
                    await client.room.wait()
                client.publish(topic, payload, qos=qos)
            if qos:
                await asyncio.wait_for(storage.wait_empty(), RUN_TIMEOUT)
                if not storage.is_empty:
                    raise RuntimeError("gmqtt storage not empty after wait_empty()")
            ctx.acked()
            await ctx.settle()
        finally:
            await client.disconnect()

    return _in_loop(drive)


def _paho_c() -> Driver:
    """Paho C's synchronous MQTTClient with file persistence (``paho_c_publisher.c``)."""

    def drive(ctx: Context) -> None:
        if ctx.paho_binary is None:
            raise RuntimeError("the Paho C publisher was not built")
        persist = ctx.workdir / "paho-persistence"
        persist.mkdir()
        proc = subprocess.run(
            [
                str(ctx.paho_binary),
                *(HOST, str(ctx.port), ctx.topic, str(len(ctx.payloads))),
                *(str(len(ctx.payloads[0])), str(ctx.qos), str(ctx.window), str(persist)),
                ctx.client_id,
            ],
            capture_output=True,
            text=True,
            timeout=3 * RUN_TIMEOUT,
            check=False,
        )
        times = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
        if proc.returncode != 0 or "acked" not in times:
            raise RuntimeError(
                f"paho_c_publisher exit status {proc.returncode}: "
                f"{times.get('error', proc.stderr.strip() or 'no output')}"
            )
        ctx.t_start, ctx.t_acked = float(times["start"]), float(times["acked"])
        ctx.settle_blocking()

    return drive


# --- cases, runs and rows ------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str  # stable name: JSON, ratios, --only
    family: str  # "reference", "ours" or a client library ("aiomqtt", "gmqtt", "paho-c")
    client: str
    mode: str
    qos: int
    window: int  # 0: unbounded; 1: one at a time
    driver: Driver
    observed: bool = True
    stand_in: bool = False  # the observer subscribes to a StandInBroker, not to mosquitto
    scale: int = 1  # messages per run: --count times this
    chunk: int = CHUNK

    @property
    def label(self) -> str:
        return f"{self.client} {self.mode} qos{self.qos}"


V5 = ProtocolVersion.V5


def build_cases(args: argparse.Namespace) -> list[Case]:
    seq, conc = "sequential", f"concurrent/{CHUNK}"
    cases = [
        # 20x the messages: at millions per second N alone would last a few ms.
        Case("observer-alone", "reference", "observer alone", "stand-in broker", 0, 0,
             observer_alone, stand_in=True, scale=20),
        Case("broker-ceiling-qos0", "reference", "broker ceiling", "raw-socket blast", 0, 0,
             broker_ceiling),
        Case("broker-ceiling-qos1", "reference", "broker ceiling", "raw-socket blast", 1,
             BLAST_WINDOW, broker_ceiling),
        Case("raw-fdatasync", "reference", f"os.write {RAW_RECORD} B + os.fdatasync", seq, 1, 1,
             raw_fdatasync, observed=False),
        Case("ours-file-seq", "ours", "ours FileStore", seq, 1, WINDOW, ours("file", False)),
        Case("ours-file-nofsync-seq", "ours", "ours FileStore(fsync=False)", seq, 1, WINDOW,
             ours("file-nofsync", False)),
        Case("ours-sqlite-seq", "ours", "ours SQLiteStore", seq, 1, WINDOW, ours("sqlite", False)),
        Case("ours-memory-seq", "ours", "ours MemoryStore", seq, 1, WINDOW, ours("memory", False)),
        Case("ours-postgres-seq", "ours", "ours PostgresStore", seq, 1, WINDOW,
             ours("postgres", False)),
        Case("ours-postgres-conc", "ours", "ours PostgresStore", conc, 1, WINDOW,
             ours("postgres", True)),
        Case("ours-file-conc", "ours", "ours FileStore", conc, 1, WINDOW, ours("file", True)),
        Case("ours-sqlite-conc", "ours", "ours SQLiteStore", conc, 1, WINDOW, ours("sqlite", True)),
        Case("ours-memory-conc", "ours", "ours MemoryStore", conc, 1, WINDOW, ours("memory", True)),
        Case("ours-file-many", "ours", "ours FileStore", f"publish_many/{CHUNK}", 1, WINDOW,
             ours("file", False, many=True)),
        Case("ours-file-conc-qos2", "ours", "ours FileStore", conc, 2, WINDOW, ours("file", True)),
        Case("ours-memory-conc-qos2", "ours", "ours MemoryStore", conc, 2, WINDOW,
             ours("memory", True)),
        Case("ours-memory-conc-qos0", "ours", "ours MemoryStore", conc, 0, WINDOW,
             ours("memory", True)),
        Case("ours-memory-many", "ours", "ours MemoryStore", f"publish_many/{CHUNK}", 1, WINDOW,
             ours("memory", False, many=True)),
        Case("ours-memory-many-qos0", "ours", "ours MemoryStore", f"publish_many/{CHUNK}", 0,
             WINDOW, ours("memory", False, many=True)),
        # MQTT 5 (issue 8): the same rows over MQTT 5, and a 3.1.1 row with the window MQTT 5
        # gets from this broker, so that the ratio measures the protocol, not the quota.
        Case("ours-memory-conc-v5", "ours", "ours MemoryStore, MQTT 5", conc, 1, WINDOW,
             ours("memory", True, V5)),
        Case("ours-memory-conc-qos2-v5", "ours", "ours MemoryStore, MQTT 5", conc, 2, WINDOW,
             ours("memory", True, V5)),
        Case("ours-file-conc-v5", "ours", "ours FileStore, MQTT 5", conc, 1, WINDOW,
             ours("file", True, V5)),
        Case("ours-file-conc-qos2-v5", "ours", "ours FileStore, MQTT 5", conc, 2, WINDOW,
             ours("file", True, V5)),
        Case("ours-memory-conc-w20", "ours", "ours MemoryStore, window 20", conc, 1,
             RECEIVE_MAXIMUM, ours("memory", True)),
        Case("ours-file-conc-w20", "ours", "ours FileStore, window 20", conc, 1,
             RECEIVE_MAXIMUM, ours("file", True)),
        Case("aiomqtt-seq", "aiomqtt", "aiomqtt", seq, 1, WINDOW, _in_loop(aiomqtt_sequential)),
        Case("aiomqtt-conc", "aiomqtt", "aiomqtt", conc, 1, WINDOW, _in_loop(aiomqtt_concurrent)),
        Case("gmqtt-window", "gmqtt", "gmqtt", "windowed", 1, WINDOW, _gmqtt()),
        Case("gmqtt-unbounded", "gmqtt", "gmqtt", "all at once", 1, 0, _gmqtt()),
        Case("gmqtt-qos0", "gmqtt", "gmqtt", "all at once", 0, 0, _gmqtt()),
        Case("gmqtt-window-v5", "gmqtt", "gmqtt, MQTT 5", "windowed", 1, RECEIVE_MAXIMUM - 1,
             _gmqtt(MQTTv50)),
        Case("gmqtt-window-qos2-v5", "gmqtt", "gmqtt, MQTT 5", "windowed", 2,
             RECEIVE_MAXIMUM - 1, _gmqtt(MQTTv50)),
        Case("paho-c-seq", "paho-c", "Paho C, file persistence", "one at a time", 1, 1,
             _paho_c()),
        Case("paho-c-window", "paho-c", "Paho C, file persistence", "windowed", 1, WINDOW,
             _paho_c()),
    ]  # fmt: skip
    if args.only:
        cases = [c for c in cases if any(word in c.key for word in args.only)]
    return cases


@dataclass
class Run:
    """One run of one case."""

    case: Case
    n: int
    elapsed: float | None = None
    acked_after: float | None = None
    unique: int = 0
    total: int = 0
    duplicates: int = 0
    foreign: int = 0
    error: str = ""
    warnings: int = 0
    first_warning: str = ""
    observer_busy: float | None = None
    observed: bool = True

    @property
    def rate(self) -> float | None:
        """Distinct messages that arrived per second, from the first publish until the
        publisher had every ack AND the observer every message (unobserved: writes/s)."""
        if not self.elapsed:
            return None
        return (self.unique if self.observed else self.n) / self.elapsed

    @property
    def acked_rate(self) -> float | None:
        """The publisher's own view: N / time until it knew every message acknowledged."""
        return self.n / self.acked_after if self.acked_after else None

    @property
    def lost(self) -> int:
        return self.n - self.unique if self.observed else 0

    @property
    def failed(self) -> bool:
        """It errored, lost or duplicated a message, or something foreign arrived. A run has
        one connection and no reconnect, so a duplicate is a client bug at QoS 1 too."""
        return bool(self.error) or self.lost > 0 or self.duplicates > 0 or self.foreign > 0


@dataclass
class Row:
    case: Case
    runs: list[Run] = field(default_factory=list)
    skipped: str = ""

    def _median(self, values: list[float | None]) -> float | None:
        present = [v for v in values if v]
        return statistics.median(present) if present else None

    @property
    def rate(self) -> float | None:
        return self._median([r.rate for r in self.runs])

    @property
    def acked_rate(self) -> float | None:
        if self.case.qos == 0 and self.case.observed:
            return None  # nothing is acknowledged at QoS 0
        return self._median([r.acked_rate for r in self.runs])

    @property
    def observer_busy(self) -> float | None:
        return self._median([r.observer_busy for r in self.runs])

    @property
    def failed(self) -> bool:
        return any(r.failed for r in self.runs)


class _WarningCounter(logging.Handler):
    """Counts a client library's warnings during a run instead of printing each one."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if not self.first:
            self.first = record.getMessage()


@dataclass(frozen=True)
class Tools:
    """What a run needs besides its case: the broker's port, the directory the stores and the
    raw loop write to, and the C programs built for this benchmark (None: not available)."""

    port: int
    base_dir: Path
    observer: Path | None
    paho: Path | None


def measure(case: Case, payloads: list[bytes], tools: Tools) -> Run:
    """One run: a fresh topic, observer, event loop, client and store directory."""
    n = len(payloads)
    run_id = uuid.uuid4().hex[:12]
    topic = f"bench/{run_id}"
    stand_in = StandInBroker(HOST) if case.stand_in else None
    port = stand_in.port if stand_in else tools.port
    observer = (
        ArrivalCounter(HOST, port, topic, n, len(payloads[0]), tools.observer)
        if case.observed
        else None
    )
    workdir = Path(tempfile.mkdtemp(prefix="mqtt-bench-run-", dir=tools.base_dir))
    ctx = Context(
        port=tools.port,
        topic=topic,
        payloads=payloads,
        qos=case.qos,
        client_id=f"bench-{case.key}-{run_id}",
        workdir=workdir,
        observer=observer,
        window=case.window,
        chunk=case.chunk,
        paho_binary=tools.paho,
        stand_in=stand_in,
    )
    run = Run(case, n, observed=case.observed)
    counter = _WarningCounter()
    logger = logging.getLogger(LOGGERS.get(case.family, "bench.none"))
    logger.addHandler(counter)
    logger.propagate = False
    gc.collect()
    try:
        if observer is not None:
            observer.start()
        case.driver(ctx)
    except Exception as exc:  # reported in the table; the other rows still run
        run.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
    finally:
        if observer is not None:
            observer.stop()
        if stand_in is not None:
            stand_in.close()
        logger.removeHandler(counter)
        logger.propagate = True
        shutil.rmtree(workdir, ignore_errors=True)
    run.warnings, run.first_warning = counter.count, counter.first
    if ctx.note and not run.error:
        run.error = ctx.note
    end: float | None = ctx.t_acked
    if observer is not None:
        run.unique, run.total, run.duplicates = observer.unique, observer.total, observer.duplicates
        run.foreign, run.observer_busy = observer.foreign, observer.busy
        if observer.error and not run.error:
            run.error = observer.error
        arrived = observer.t_complete or observer.t_last
        end = max((t for t in (ctx.t_acked, arrived) if t is not None), default=None)
    if ctx.t_start is not None:
        if end is not None:
            run.elapsed = end - ctx.t_start
        if ctx.t_acked is not None:
            run.acked_after = ctx.t_acked - ctx.t_start
    return run


# --- the Paho C publisher ------------------------------------------------------------------


def build_paho_c(out_dir: Path) -> tuple[Path | None, str]:
    """Compile ``paho_c_publisher.c`` with cc against libpaho-mqtt3c: (binary, "") or
    (None, why not)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc) found"
    binary = out_dir / "paho_c_publisher"
    source = _BENCH_DIR / "paho_c_publisher.c"
    result = subprocess.run(
        [compiler, "-O2", "-o", str(binary), str(source), "-lpaho-mqtt3c"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["?"])[0]
        return (
            None,
            f"cannot build against libpaho-mqtt3c (apt-get install libpaho-mqtt-dev): {first}",
        )
    return binary, ""


def paho_c_version(binary: Path | None) -> str:
    if binary is None:
        return "-"
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or "?"


# --- ratios --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of two rows' figures ("rate": msg/s at the observer,
    "acked": the publisher's own acked msg/s), with the target issue 7 sets."""

    name: str
    numerator: str
    denominator: str
    target: float
    measure: str = "rate"


RATIOS = [
    Ratio("FileStore seq / raw write+fdatasync", "ours-file-seq", "raw-fdatasync", 0.6),
    Ratio("SQLiteStore seq / raw write+fdatasync", "ours-sqlite-seq", "raw-fdatasync", 0.4),
    Ratio("FileStore seq / aiomqtt seq", "ours-file-seq", "aiomqtt-seq", 1.5),
    Ratio("SQLiteStore seq / aiomqtt seq", "ours-sqlite-seq", "aiomqtt-seq", 1.5),
    Ratio("FileStore(fsync=False) seq / MemoryStore seq", "ours-file-nofsync-seq",
          "ours-memory-seq", 0.5),
    Ratio("FileStore(fsync=False) seq / Paho C one at a time", "ours-file-nofsync-seq",
          "paho-c-seq", 1.0),
    Ratio("FileStore concurrent / gmqtt, window 100 (acked)", "ours-file-conc", "gmqtt-window",
          1.0, "acked"),
    Ratio("QoS 2 / QoS 1, FileStore concurrent", "ours-file-conc-qos2", "ours-file-conc", 0.7),
    Ratio("MemoryStore concurrent / gmqtt, window 100 (acked)", "ours-memory-conc",
          "gmqtt-window", 1.5, "acked"),
    Ratio("QoS 0: MemoryStore concurrent / gmqtt", "ours-memory-conc-qos0", "gmqtt-qos0", 1.0),
    # Issue 8: MQTT 5 costs at most 10 % against the 3.1.1 path. Over MQTT 5 this broker's
    # Receive Maximum (20) is the window; the "window 20" rows give 3.1.1 the same window,
    # so these measure the protocol. The quota's own cost shows in the plain 3.1.1 rows.
    Ratio("MQTT 5 / 3.1.1, MemoryStore concurrent QoS 1, window 20", "ours-memory-conc-v5",
          "ours-memory-conc-w20", 0.9),
    Ratio("MQTT 5 / 3.1.1, MemoryStore concurrent QoS 2", "ours-memory-conc-qos2-v5",
          "ours-memory-conc-qos2", 0.9),
    Ratio("MQTT 5 / 3.1.1, FileStore concurrent QoS 1, window 20", "ours-file-conc-v5",
          "ours-file-conc-w20", 0.9),
    Ratio("MQTT 5 / 3.1.1, FileStore concurrent QoS 2", "ours-file-conc-qos2-v5",
          "ours-file-conc-qos2", 0.9),
    Ratio("MQTT 5: MemoryStore concurrent QoS 1 / gmqtt MQTT 5 (acked)", "ours-memory-conc-v5",
          "gmqtt-window-v5", 1.0, "acked"),
    Ratio("MQTT 5: MemoryStore concurrent QoS 2 / gmqtt MQTT 5 (acked)",
          "ours-memory-conc-qos2-v5", "gmqtt-window-qos2-v5", 1.0, "acked"),
]  # fmt: skip


def _figure(row: Row, measure: str, run: Run | None = None) -> float | None:
    if run is not None:
        return run.acked_rate if measure == "acked" else run.rate
    return row.acked_rate if measure == "acked" else row.rate


def evaluate_ratios(rows: dict[str, Row]) -> list[dict[str, Any]]:
    """Every ratio: median figures, the per-repeat ratios (runs of one repeat are minutes
    apart at most), and PASS/MISS against its target; None where a row is missing."""
    out = []
    for ratio in RATIOS:
        num, den = rows.get(ratio.numerator), rows.get(ratio.denominator)
        entry: dict[str, Any] = {
            "name": ratio.name,
            "numerator": ratio.numerator,
            "denominator": ratio.denominator,
            "measure": ratio.measure,
            "target": ratio.target,
            "value": None,
            "per_repeat": [],
            "passed": None,
        }
        if num and den and not num.skipped and not den.skipped:
            a, b = _figure(num, ratio.measure), _figure(den, ratio.measure)
            if a and b:
                entry["value"] = a / b
                entry["passed"] = a / b >= ratio.target
            for run_a, run_b in zip(num.runs, den.runs, strict=False):
                fa, fb = _figure(num, ratio.measure, run_a), _figure(den, ratio.measure, run_b)
                entry["per_repeat"].append(fa / fb if fa and fb else None)
        elif num is None or den is None:
            entry["missing"] = "not run (--only)"
        else:
            entry["missing"] = num.skipped or den.skipped
        out.append(entry)
    return out


def evaluate_ceiling(rows: dict[str, Row]) -> dict[str, Any]:
    """The observer alone must be above every client row's msg/s (PASS/MISS); and how close the
    closest client row came to mosquitto's own ceiling at its QoS (QoS 2 rows against QoS 1):
    near 100 % a row measures the broker, whatever the client."""
    result: dict[str, Any] = {"observer_alone": None, "passed": None, "fastest": None}
    clients = [r for r in rows.values() if r.case.family != "reference" and r.rate]
    alone = rows.get("observer-alone")
    if alone and alone.rate:
        result["observer_alone"] = alone.rate
        if clients:
            fastest = max(clients, key=lambda r: r.rate or 0.0)
            result["fastest"] = fastest.case.key
            result["fastest_share"] = (fastest.rate or 0.0) / alone.rate
            result["passed"] = result["fastest_share"] < 1.0
    brokers = (
        {q: rows[f"broker-ceiling-qos{q}"].rate for q in (0, 1)}
        if all(f"broker-ceiling-qos{q}" in rows for q in (0, 1))
        else {}
    )
    result["broker_qos0"], result["broker_qos1"] = brokers.get(0), brokers.get(1)
    shares = [
        ((r.rate or 0.0) / ceiling, r.case.key)
        for r in clients
        if (ceiling := brokers.get(min(r.case.qos, 1)))
    ]
    if shares:
        share, key = max(shares)
        result["closest_to_broker"], result["closest_share"] = key, share
    return result


# --- report --------------------------------------------------------------------------------


def machine_description() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = ", " + line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores{model}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()} ({platform.python_implementation()})"
    )


def describe_disk(path: Path) -> str:
    """``<path> on <device> (<fs type>)`` from /proc/mounts; the path alone elsewhere."""
    best = ("", "", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if str(path).startswith(mount) and len(mount) > len(best[1]):
                best = (device, mount, fstype)
    except OSError:
        return str(path)
    return f"{path} on {best[0]} ({best[2]})" if best[0] else str(path)


def versions(paho: Path | None) -> dict[str, str]:
    out = {}
    for name in ("mqtt-persist", "aiomqtt", "gmqtt", "anyio"):
        try:
            out[name] = version(name)
        except Exception:
            out[name] = "?"
    out["paho-c"] = paho_c_version(paho)
    try:
        result = subprocess.run(
            [find_mosquitto_sub(), "--help"], capture_output=True, text=True, check=False
        )
        lines = (result.stdout + result.stderr).splitlines()
        out["mosquitto_sub"] = next(
            (ln.split(" running")[0] for ln in lines if "version" in ln), "?"
        )
    except FileNotFoundError:
        out["mosquitto_sub"] = "-"
    return out


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def _rate(rate: float | None) -> str:
    return f"{rate:,.0f}" if rate else "-"


def _spread(rates: list[float | None]) -> str:
    present = [r for r in rates if r]
    if len(present) < 2:
        return "-"
    return f"{min(present):,.0f}-{max(present):,.0f}"


def render_table(rows: list[Row]) -> str:
    """A Markdown table (pasteable into README.md) plus notes for errors and warnings."""
    header = (
        "row",
        "mode",
        "qos",
        "window",
        "msg/s",
        "acked msg/s",
        "msg/s min-max",
        "arrived",
        "lost",
        "dups",
        "observer busy",
    )
    body = []
    for row in rows:
        c = row.case
        n = sum(r.n for r in row.runs)
        if row.skipped:
            cells = ["skipped"] + ["-"] * 6
        else:
            cells = [
                _rate(row.rate),
                _rate(row.acked_rate),
                _spread([r.rate for r in row.runs]),
                f"{sum(r.unique for r in row.runs)}/{n}" if c.observed else "-",
                str(sum(r.lost for r in row.runs)) if c.observed else "-",
                str(sum(r.duplicates for r in row.runs)) if c.observed else "-",
                f"{row.observer_busy:.0%}" if row.observer_busy is not None else "-",
            ]
        window = {0: "unbounded", 1: "1"}.get(c.window, str(c.window))
        body.append((c.client, c.mode, str(c.qos), window, *cells))
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    numeric = range(2, len(header))

    def line(cells: tuple[str, ...]) -> str:
        padded = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    notes = []
    for row in rows:
        if row.skipped:
            notes.append(f"- {row.case.key}: skipped, {row.skipped}")
        errors = sorted({r.error for r in row.runs if r.error})
        for error in errors:
            notes.append(f"- error in {row.case.key}: {error}")
        foreign = sum(r.foreign for r in row.runs)
        if foreign:
            notes.append(f"- {row.case.key}: {foreign} arrivals that were not its payloads")
        warned = [r for r in row.runs if r.warnings]
        if warned:
            total = sum(r.warnings for r in warned)
            notes.append(
                f"- {total} warning(s) logged in {row.case.key}: {warned[0].first_warning}"
            )
    out = [line(header), rule, *(line(r) for r in body)]
    if notes:
        out += ["", *notes]
    return "\n".join(out)


def render_checks(ratios: list[dict[str, Any]], ceiling: dict[str, Any], rows: list[Row]) -> str:
    lines = ["Issue 7 targets (medians; per-repeat ratios in brackets):"]
    width = max(len(r["name"]) for r in ratios) if ratios else 0
    for r in ratios:
        if r["value"] is None:
            lines.append(
                f"  {r['name']:<{width}}     -  target >= {r['target']:.1f}  "
                f"({r.get('missing') or 'no figure'})"
            )
            continue
        repeats = ", ".join(f"{x:.2f}" if x else "-" for x in r["per_repeat"])
        verdict = "PASS" if r["passed"] else "MISS"
        lines.append(
            f"  {r['name']:<{width}} {r['value']:5.2f}  target >= {r['target']:.1f}  {verdict}"
            f"  [{repeats}]"
        )
    failed = [row.case.key for row in rows if row.failed]
    clean = "PASS" if not failed else "MISS (" + ", ".join(failed) + ")"
    lines.append(f"  {'every row: 0 lost, 0 duplicates, no error':<{width}}        {clean}")
    if ceiling["passed"] is not None:
        verdict = "PASS" if ceiling["passed"] else "MISS"
        lines.append(
            f"\nObserver alone: {_rate(ceiling['observer_alone'])} msg/s; the fastest client "
            f"row, {ceiling['fastest']}, reached {ceiling['fastest_share']:.0%} of it: {verdict}"
        )
    if ceiling.get("closest_to_broker"):
        lines.append(
            f"Broker ceiling: {_rate(ceiling['broker_qos0'])} msg/s at QoS 0, "
            f"{_rate(ceiling['broker_qos1'])} at QoS 1; the closest client row, "
            f"{ceiling['closest_to_broker']}, reached {ceiling['closest_share']:.0%} of its "
            "QoS's (near 100 %: that row measures mosquitto)"
        )
    return "\n".join(lines)  # fmt: skip


def to_json(
    rows: list[Row],
    ratios: list[dict[str, Any]],
    ceiling: dict[str, Any],
    meta: dict[str, Any],
) -> dict[str, Any]:
    def run_dict(run: Run) -> dict[str, Any]:
        return {
            "n": run.n,
            "rate": run.rate,
            "acked_rate": run.acked_rate,
            "elapsed": run.elapsed,
            "acked_after": run.acked_after,
            "unique": run.unique,
            "total": run.total,
            "lost": run.lost,
            "duplicates": run.duplicates,
            "foreign": run.foreign,
            "observer_busy": run.observer_busy,
            "error": run.error,
            "warnings": run.warnings,
        }

    return {
        **meta,
        "rows": [
            {
                "key": row.case.key,
                "family": row.case.family,
                "client": row.case.client,
                "mode": row.case.mode,
                "qos": row.case.qos,
                "window": row.case.window,
                "observed": row.case.observed,
                "skipped": row.skipped,
                "rate": row.rate,
                "acked_rate": row.acked_rate,
                "observer_busy": row.observer_busy,
                "lost": sum(r.lost for r in row.runs),
                "duplicates": sum(r.duplicates for r in row.runs),
                "failed": row.failed,
                "runs": [run_dict(r) for r in row.runs],
            }
            for row in rows
        ],
        "ratios": ratios,
        "ceiling": ceiling,
    }


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Publish throughput of mqtt_persist, aiomqtt, gmqtt, Paho C and the disk "
        "on one private mosquitto, counted by an outside C subscriber."
    )
    parser.add_argument("--count", type=int, help="messages per run (10000; --quick: 2000)")
    parser.add_argument("--repeats", type=int, help="times every row runs (5; --quick: 1)")
    parser.add_argument("--payload", type=int, default=64, help="payload bytes, >= 8 (64)")
    parser.add_argument("--quick", action="store_true", help="fewer messages and repeats")
    parser.add_argument(
        "--only", nargs="+", metavar="WORD", help="only the rows whose key contains a word"
    )
    parser.add_argument(
        "--observer",
        choices=["ours", "mosquitto_sub"],
        default="ours",
        help="observer.c built with cc (default; mosquitto_sub where no compiler), or "
        "mosquitto_sub",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the stores, Paho's persistence and the raw loop write (the system temp dir)",
    )
    parser.add_argument("--json", type=Path, help="write the run here (default: a temp file)")
    parser.add_argument("--chart", type=Path, help="also draw a bar chart (PNG) of the run")
    args = parser.parse_args(argv)
    args.count = args.count or (2_000 if args.quick else 10_000)
    args.repeats = args.repeats or (1 if args.quick else 5)
    if args.payload < INDEX_DIGITS:
        parser.error(f"--payload must be at least {INDEX_DIGITS} bytes (it carries the index)")
    if args.count < 1 or args.repeats < 1:
        parser.error("--count and --repeats must be positive")
    return args


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `with` that stops the broker


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    cases = build_cases(args)
    if not cases:
        print("no row matches --only", file=sys.stderr)
        return 2
    try:
        broker = Mosquitto()
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"cannot run the benchmark: {exc}", file=sys.stderr)
        return 2
    args.dir.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix="mqtt-bench-build-"))
    try:
        notes = []
        observer: Path | None = None
        if args.observer == "ours":
            observer, why = build_observer(build_dir)
            if why:
                notes.append(f"observer: mosquitto_sub instead of observer.c ({why})")
        if observer is None:
            try:
                find_mosquitto_sub()
            except FileNotFoundError as exc:
                print(f"cannot run the benchmark: {exc}", file=sys.stderr)
                return 2
        paho, why = build_paho_c(build_dir)
        if why:
            notes.append(f"Paho C rows skipped: {why}")
        with contextlib.ExitStack() as stack:
            if any(c.key.startswith("ours-postgres") for c in cases):
                why = _open_postgres(stack)
                if why:
                    notes.append(f"PostgreSQL rows skipped: {why}")
            return _run(args, cases, broker, Tools(0, args.dir, observer, paho), notes)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def _open_postgres(stack: contextlib.ExitStack) -> str | None:
    """Create the postgres rows' database (dropped when ``stack`` closes); why not, or None."""
    global _postgres_dsn
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our tests package
    try:
        from tests.support.postgres import private_database

        _postgres_dsn = stack.enter_context(private_database(server_defaults=True))
    except BaseException as exc:  # pytest.skip's exception, too, when no server answers
        if isinstance(exc, KeyboardInterrupt):
            raise
        return f"no PostgreSQL database could be made ({type(exc).__name__}: {exc})"
    return None


def _run(
    args: argparse.Namespace, cases: list[Case], broker: Mosquitto, tools: Tools, notes: list[str]
) -> int:
    clients = versions(tools.paho)
    disk = describe_disk(args.dir.resolve())
    observer_name = (
        "observer.c (ours), QoS 0" if tools.observer else f"{clients['mosquitto_sub']}, QoS 0"
    )
    print(f"machine:  {machine_description()}")
    print(
        f"broker:   {broker.version} ({broker.binary}), private, set_tcp_nodelay, "
        "max_queued_messages 1000000"
    )
    print("clients:  " + ", ".join(f"{k} {v}" for k, v in clients.items()))
    print(f"observer: {observer_name}")
    print(f"disk:     {disk}")
    print(f"workload: {args.count} messages per run, {args.payload}-byte payloads, "
          f"{args.repeats} repeat(s); windows {WINDOW}, gather chunks {CHUNK}")  # fmt: skip
    for note in notes:
        print(f"note:     {note}")
    print(flush=True)
    payloads = {c.scale: make_payloads(args.count * c.scale, args.payload) for c in cases}
    rows = {c.key: Row(c) for c in cases}
    for row in rows.values():
        if row.case.family == "paho-c" and tools.paho is None:
            row.skipped = next(n for n in notes if n.startswith("Paho C"))
        if row.case.key.startswith("ours-postgres") and _postgres_dsn is None:
            row.skipped = next(n for n in notes if n.startswith("PostgreSQL"))
    load_before = _load()
    started_at = datetime.datetime.now(datetime.UTC)
    began = time.perf_counter()
    with broker:
        tools = dataclasses.replace(tools, port=broker.port)
        for repeat in range(args.repeats):
            for row in rows.values():
                if row.skipped:
                    continue
                run = measure(row.case, payloads[row.case.scale], tools)
                row.runs.append(run)
                print(
                    f"  [{repeat + 1}/{args.repeats}] {row.case.key:<22} "
                    f"{_rate(run.rate):>8} msg/s  acked {_rate(run.acked_rate):>8}"
                    + (f"  {run.unique}/{run.n} arrived" if run.observed else "")
                    + ("  FAILED" if run.failed else ""),
                    flush=True,
                )
    duration = time.perf_counter() - began
    load_after = _load()
    ordered = list(rows.values())
    ratios = evaluate_ratios(rows)
    ceiling = evaluate_ceiling(rows)
    print(
        f"\n{sum(len(r.runs) for r in ordered)} runs in {duration:.0f} s; load average (1, 5, "
        f"15 min) {load_before} before, {load_after} after\n"
    )
    print(render_table(ordered))
    print()
    print(render_checks(ratios, ceiling, ordered))
    failed = [r for r in ordered if r.failed]
    status = 0 if not failed else 1 if any(r.case.family == "ours" for r in failed) else 3
    meta = {
        "schema": SCHEMA,
        "benchmark": "publish_throughput",
        "started": started_at.isoformat(timespec="seconds"),
        "duration_s": round(duration, 1),
        "machine": machine_description(),
        "disk": disk,
        "broker": broker.version,
        "versions": clients,
        "load_before": load_before,
        "load_after": load_after,
        "settings": {
            "count": args.count,
            "payload": args.payload,
            "repeats": args.repeats,
            "window": WINDOW,
            "chunk": CHUNK,
            "quick": args.quick,
            "observer": observer_name,
        },
        "notes": notes,
        "exit_status": status,
    }
    document = to_json(ordered, ratios, ceiling, meta)
    path = args.json or Path(tempfile.gettempdir()) / (
        f"mqtt_persist-publish_throughput-{started_at:%Y%m%d-%H%M%S}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nJSON: {path}")
    if args.chart:
        from chart import draw  # matplotlib: only when a chart is asked for

        draw(document, args.chart)
        print(f"chart: {args.chart}")
    return status


if __name__ == "__main__":
    sys.exit(main())
