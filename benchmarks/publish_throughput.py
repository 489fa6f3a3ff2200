"""Publish throughput of mqtt_persist next to aiomqtt and gmqtt, on one private mosquitto.

    .venv/bin/python benchmarks/publish_throughput.py [--count N] [--payload 64] [--quick]

Every client publishes N messages (QoS 1/2; 2N at QoS 0) to a fresh topic on the same broker in
the same process run, one client at a time. An outside paho-mqtt subscriber (QoS 2, in a process
of its own: ``_observer.py``) counts what really arrived. A run's msg/s is the number of distinct
messages that arrived, divided by the time from the first publish until the publisher saw every
acknowledgement AND the subscriber had all N (or until a timeout, then it is what arrived). See
README.md.

Exit status: 0 when every QoS 1/2 run delivered each of its N messages exactly once and no run
errored; 1 when one of mqtt_persist's runs did not; 3 when only baseline runs did (gmqtt's
unbounded QoS 2 burst loses everything past mosquitto's 20 inbound flows); 2 when the benchmark
could not run at all (no mosquitto, or no run matched --qos/--only).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiomqtt
import gmqtt
from _broker import HOST, Mosquitto
from _observer import INDEX_DIGITS, ArrivalCounter, make_payloads
from gmqtt.mqtt.constants import MQTTv311

from mqtt_persist import DeliveryOutcome, FileStore, MemoryStore, PersistentClient

#: Seconds without a new arrival after which a run stops waiting for missing messages.
QUIET_SECONDS = 3.0
#: Upper bound for one run's publishing, and separately for waiting on the subscriber.
RUN_TIMEOUT = 60.0


@dataclass
class Context:
    """What a driver needs for one run, and the timestamps it records: ``time.monotonic()``,
    the clock of the observer's timestamps (its own process; one system-wide clock on Linux)."""

    port: int
    topic: str
    payloads: list[bytes]
    qos: int
    inflight: int
    chunk: int
    client_id: str
    workdir: Path
    observer: ArrivalCounter
    t_start: float | None = None
    t_acked: float | None = None
    note: str = ""

    def started(self) -> None:
        """Call immediately before the first publish."""
        self.t_start = time.monotonic()

    def acked(self) -> None:
        """Call as soon as the publisher knows every message was acknowledged (QoS 0: sent)."""
        self.t_acked = time.monotonic()

    async def settle(self) -> None:
        """Stay connected until the subscriber has all N, nothing new came for a while, or
        the timeout; polling only starts after the publisher is done, and the end of the run
        is the subscriber's own timestamp, not this loop's."""
        observer = self.observer
        deadline = time.monotonic() + RUN_TIMEOUT
        last_total, last_change = -1, time.monotonic()
        while not observer.complete:
            now = time.monotonic()
            total = observer.total
            if total != last_total:
                last_total, last_change = total, now
            elif now - last_change > QUIET_SECONDS or now > deadline:
                return
            await asyncio.sleep(0.01)


Driver = Callable[[Context], Awaitable[None]]


# --- drivers: one per client and mode ------------------------------------------------------


async def aiomqtt_sequential(ctx: Context) -> None:
    """aiomqtt's own way: ``await client.publish()`` returns after PUBACK/PUBCOMP (QoS>0)."""
    async with aiomqtt.Client(
        HOST,
        ctx.port,
        identifier=ctx.client_id,
        max_inflight_messages=ctx.inflight,
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
        max_inflight_messages=ctx.inflight,
        timeout=RUN_TIMEOUT,
    ) as client:
        # aiomqtt logs a warning per publish while more than 10 calls are pending; a user who
        # publishes concurrently on purpose raises the threshold (the counting stays).
        client.pending_calls_threshold = ctx.chunk + ctx.inflight
        topic, qos, payloads, chunk = ctx.topic, ctx.qos, ctx.payloads, ctx.chunk
        ctx.started()
        for start in range(0, len(payloads), chunk):
            await asyncio.gather(
                *[client.publish(topic, p, qos) for p in payloads[start : start + chunk]]
            )
        ctx.acked()
        await ctx.settle()


async def gmqtt_natural(ctx: Context) -> None:
    """gmqtt's own way: ``publish()`` is synchronous and only queues the bytes on the transport.

    gmqtt keeps every unacknowledged QoS 1/2 PUBLISH in its ``PersistentStorage`` (keyed by
    packet id) and removes it on PUBACK (QoS 1) or on PUBCOMP (QoS 2; on PUBREC the stored
    PUBLISH is swapped for the PUBREL). So "storage empty" after the last publish means every
    flow completed; ``wait_empty()`` wakes exactly then. All N publishes are issued before the
    first await, so the storage cannot become empty half way. gmqtt has no in-flight window.
    """
    client = gmqtt.Client(ctx.client_id, clean_session=True)
    await client.connect(HOST, ctx.port, version=MQTTv311)
    try:
        storage = client._persistent_storage
        topic, qos = ctx.topic, ctx.qos
        ctx.started()
        for payload in ctx.payloads:
            client.publish(topic, payload, qos=qos)
        if qos:
            await asyncio.wait_for(storage.wait_empty(), RUN_TIMEOUT)
            if not storage.is_empty:
                raise RuntimeError("gmqtt storage not empty after wait_empty()")
        ctx.acked()
        await ctx.settle()
    finally:
        await client.disconnect()


def _ours(store_kind: str, concurrent: bool) -> Driver:
    async def drive(ctx: Context) -> None:
        # FileStore with fsync on (its default), in the run's own temp directory.
        store: MemoryStore | FileStore = (
            FileStore(ctx.workdir / "sessions") if store_kind == "file" else MemoryStore()
        )
        try:
            async with PersistentClient(
                HOST, ctx.port, client_id=ctx.client_id, store=store, max_inflight=ctx.inflight
            ) as client:
                await client.wait_connected(10)
                topic, qos, payloads, chunk = ctx.topic, ctx.qos, ctx.payloads, ctx.chunk
                deliveries = []
                ctx.started()
                if concurrent:
                    for start in range(0, len(payloads), chunk):
                        deliveries += await asyncio.gather(
                            *[
                                client.publish(topic, p, qos)
                                for p in payloads[start : start + chunk]
                            ]
                        )
                else:
                    for payload in payloads:
                        deliveries.append(await client.publish(topic, payload, qos))
                await client.drain(RUN_TIMEOUT)
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

    return drive


# --- cases and results ---------------------------------------------------------------------

#: The in-flight window everyone gets by default (paho's default, and ours: mosquitto drops
#: inbound QoS 2 flows beyond 20 per MQTT 3.1.1 client).
WINDOW = 20
#: Our client runs with its defaults: a window of 100, of which at most 19 QoS 2 flows (the
#: rest of mosquitto's quota of 20 stays free for QoS 1; see PersistentClient's docstring).
OURS_WINDOW = 100
#: Loggers whose warnings are counted per run, per client family.
LOGGERS = {"aiomqtt": "mqtt", "gmqtt": "gmqtt", "ours": "mqtt_persist"}


@dataclass(frozen=True)
class Case:
    family: str  # "aiomqtt" (the baseline), "gmqtt" or "ours"
    client: str
    mode: str
    qos: int
    inflight: int  # 0: unbounded
    driver: Driver
    chunk: int = 0

    @property
    def label(self) -> str:
        return f"{self.client} {self.mode} qos{self.qos}"


@dataclass
class Result:
    case: Case
    n: int
    elapsed: float | None = None
    acked_after: float | None = None
    unique: int = 0
    duplicates: int = 0
    error: str = ""
    warnings: int = 0
    first_warning: str = ""
    #: Share of its arrivals' span the observer was running or runnable (``ArrivalCounter.busy``):
    #: near 100 % it set the pace, so ``msg/s`` is a floor for the client; see ``acked msg/s``.
    observer_busy: float | None = None

    @property
    def rate(self) -> float | None:
        """Distinct messages that arrived per second, first publish to last arrival/ack."""
        return self.unique / self.elapsed if self.elapsed else None

    @property
    def acked_rate(self) -> float | None:
        """Publisher side only: N / time until the client reported every ack (QoS 1/2)."""
        if self.case.qos == 0 or not self.acked_after:
            return None
        return self.n / self.acked_after

    @property
    def lost(self) -> int:
        return self.n - self.unique

    @property
    def failed(self) -> bool:
        """It errored, or at QoS 1/2 lost or duplicated messages.

        QoS 1 allows duplicates, but only from resending after a reconnect; a run has one
        connection, so a duplicate at QoS 1 is a client bug just as it is at QoS 2.
        """
        if self.error:
            return True
        return self.case.qos > 0 and (self.lost > 0 or self.duplicates > 0)


def build_cases(args: argparse.Namespace) -> list[Case]:
    chunk, ours_chunk = args.chunk, args.our_chunk
    cases: list[Case] = []
    for qos in args.qos:
        cases += [
            Case("aiomqtt", "aiomqtt", "sequential", qos, WINDOW, aiomqtt_sequential),
            Case(
                "aiomqtt", "aiomqtt", f"concurrent/{chunk}", qos, WINDOW, aiomqtt_concurrent, chunk
            ),
            Case("gmqtt", "gmqtt", "natural", qos, 0, gmqtt_natural),
        ]
        for store in ("memory", "file"):
            cases += [
                Case("ours", f"ours/{store}", "sequential", qos, OURS_WINDOW, _ours(store, False)),
                Case(
                    "ours",
                    f"ours/{store}",
                    f"concurrent/{ours_chunk}",
                    qos,
                    OURS_WINDOW,
                    _ours(store, True),
                    ours_chunk,
                ),
            ]
        if qos == 1 and args.wide_window:
            wide = args.wide_window
            cases.append(
                Case(
                    "aiomqtt", "aiomqtt", f"concurrent/{chunk}", 1, wide, aiomqtt_concurrent, chunk
                )
            )
    if args.only:
        cases = [c for c in cases if any(word in c.label for word in args.only)]
    return cases


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


def measure(case: Case, port: int, n: int, payload_size: int) -> Result:
    """One run: a fresh topic, subscriber, event loop and client (and store directory)."""
    run_id = uuid.uuid4().hex[:12]
    topic = f"bench/{run_id}"
    observer = ArrivalCounter(HOST, port, topic, n)
    workdir = Path(tempfile.mkdtemp(prefix="mqtt-bench-run-"))
    ctx = Context(
        port=port,
        topic=topic,
        payloads=make_payloads(n, payload_size),
        qos=case.qos,
        inflight=case.inflight,
        chunk=case.chunk,
        client_id=f"bench-{case.family}-{run_id}",
        workdir=workdir,
        observer=observer,
    )
    result = Result(case, n)
    counter = _WarningCounter()
    logger = logging.getLogger(LOGGERS[case.family])
    logger.addHandler(counter)
    logger.propagate = False
    gc.collect()
    observer.start()
    try:
        asyncio.run(asyncio.wait_for(case.driver(ctx), 3 * RUN_TIMEOUT))
    except Exception as exc:  # reported in the table; the other clients still run
        result.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
    finally:
        observer.stop()
        logger.removeHandler(counter)
        logger.propagate = True
        shutil.rmtree(workdir, ignore_errors=True)
    unique, _total, duplicates, t_complete, t_last = observer.snapshot()
    result.unique, result.duplicates = unique, duplicates
    result.observer_busy = observer.busy
    result.warnings, result.first_warning = counter.count, counter.first
    if ctx.note and not result.error:
        result.error = ctx.note
    if observer.error and not result.error:
        result.error = observer.error
    if ctx.t_start is not None:
        ends = [t for t in (ctx.t_acked, t_complete or t_last) if t is not None]
        if ends:
            result.elapsed = max(ends) - ctx.t_start
        if ctx.t_acked is not None:
            result.acked_after = ctx.t_acked - ctx.t_start
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
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{os.cpu_count()} cores ({usable} usable){model}; {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()} "
        f"({platform.python_implementation()})"
    )


def client_versions() -> str:
    parts = []
    for name in ("mqtt-persist", "aiomqtt", "gmqtt", "paho-mqtt", "anyio"):
        try:
            parts.append(f"{name} {version(name)}")
        except Exception:
            parts.append(f"{name} ?")
    return ", ".join(parts)


def _load() -> str:
    """The 1-minute load average, or '?' where the platform has none."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "?"


def _rate(rate: float | None) -> str:
    return f"{rate:,.0f}" if rate else "-"


def _busy(share: float | None) -> str:
    return f"{share:.0%}" if share is not None else "-"


def render_table(results: list[Result]) -> str:
    """A Markdown table (pasteable into README.md) plus notes for errors and warnings."""
    best: dict[int, float] = {}
    for r in results:
        if r.case.family == "aiomqtt" and r.rate and not r.failed:
            best[r.case.qos] = max(best.get(r.case.qos, 0.0), r.rate)
    header = (
        "client",
        "mode",
        "qos",
        "inflight",
        "msg/s",
        "acked msg/s",
        "arrived/N",
        "dups",
        "observer busy",
        "vs aiomqtt best",
    )
    rows = []
    for r in results:
        c = r.case
        baseline = best.get(c.qos)
        rows.append(
            (
                c.client,
                c.mode,
                str(c.qos),
                str(c.inflight) if c.inflight else "unbounded",
                _rate(r.rate),
                _rate(r.acked_rate),
                f"{r.unique}/{r.n}" + ("" if r.unique == r.n else " LOST"),
                str(r.duplicates),
                _busy(r.observer_busy),
                f"{r.rate / baseline:.2f}x" if r.rate and baseline else "-",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
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
            "-" * (width + 1) + ":" if i in numeric else "-" * (width + 2)
            for i, width in enumerate(widths)
        )
        + "|"
    )
    notes = []
    for r in results:
        where = f"{r.case.label} (inflight {r.case.inflight or 'unbounded'})"
        if r.error:
            notes.append(f"- error in {where}: {r.error}")
        if r.warnings:
            notes.append(f"- {r.warnings} warning(s) logged in {where}, first: {r.first_warning}")
    out = [line(header), rule, *(line(row) for row in rows)]
    if notes:
        out += ["", *notes]
    return "\n".join(out)


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Publish throughput of mqtt_persist, aiomqtt and gmqtt on one private "
        "mosquitto, counted at an outside subscriber."
    )
    parser.add_argument(
        "--count",
        type=int,
        default=10_000,
        help="messages per QoS 1/2 run; QoS 0 runs send twice as many (default 10000)",
    )
    parser.add_argument("--payload", type=int, default=64, help="payload bytes, >= 8 (64)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages")
    parser.add_argument(
        "--chunk", type=int, default=100, help="aiomqtt concurrent: publishes per gather (100)"
    )
    parser.add_argument(
        "--our-chunk", type=int, default=100, help="ours concurrent: publishes per gather (100)"
    )
    parser.add_argument(
        "--wide-window",
        type=int,
        default=100,
        help="an extra aiomqtt QoS 1 row with this in-flight window; 0: none (100)",
    )
    parser.add_argument(
        "--qos", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2], help="QoS levels"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="WORD",
        help="only the runs whose label 'client mode qosN' contains one of these words",
    )
    args = parser.parse_args(argv)
    if args.payload < INDEX_DIGITS:
        parser.error(f"--payload must be at least {INDEX_DIGITS} bytes (it carries the index)")
    if min(args.count, args.chunk, args.our_chunk) < 1 or args.wide_window < 0:
        parser.error("--count, --chunk and --our-chunk must be positive")
    if args.quick:
        args.count = max(1, args.count // 10)
    return args


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `with` that stops the broker


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    cases = build_cases(args)
    if not cases:
        print("no run matches --qos/--only", file=sys.stderr)
        return 2
    try:
        broker = Mosquitto()
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"cannot run the benchmark: {exc}", file=sys.stderr)
        return 2
    print(f"machine:  {machine_description()}")
    print(f"broker:   {broker.version} ({broker.binary}), private instance on 127.0.0.1")
    print(f"clients:  {client_versions()}")
    print(
        f"workload: {args.count} messages per QoS 1/2 run, {2 * args.count} per QoS 0 run, "
        f"{args.payload}-byte payloads; gather chunks: aiomqtt {args.chunk}, "
        f"ours {args.our_chunk}",
        flush=True,
    )
    results: list[Result] = []
    load_before = _load()
    began = time.perf_counter()
    with broker:
        for case in cases:
            n = 2 * args.count if case.qos == 0 else args.count
            result = measure(case, broker.port, n, args.payload)
            results.append(result)
            print(
                f"  {case.label:<34} inflight {case.inflight or 'unbounded':>9}: "
                f"{_rate(result.rate):>7} msg/s, {result.unique}/{n} arrived"
                f"{'  FAILED' if result.failed else ''}",
                flush=True,
            )
    print(
        f"\n{len(results)} runs in {time.perf_counter() - began:.0f} s; load average "
        f"{load_before} before, {_load()} after (other processes on the machine add noise)\n"
    )
    print(render_table(results))
    failed = [r for r in results if r.failed]
    if not failed:
        return 0
    print("\nFAILED (QoS 1/2 messages lost or duplicated, or an error):")
    for r in failed:
        print(
            f"  {r.case.label} (inflight {r.case.inflight or 'unbounded'}): {r.unique}/{r.n} "
            f"arrived, {r.duplicates} dups{', ' + r.error if r.error else ''}"
        )
    # 1: one of ours failed; 3: only baselines did (gmqtt's unbounded QoS 2 burst does, by design).
    return 1 if any(r.case.family == "ours" for r in failed) else 3


if __name__ == "__main__":
    sys.exit(main())
