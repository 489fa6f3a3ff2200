"""The fault matrix: every fault scenario against every store it applies to, from a real run.

    .venv/bin/python benchmarks/fault_matrix.py                 # ~7 min on 2 cores
    .venv/bin/python benchmarks/fault_matrix.py --quick         # shorter soak and fewer kills
    .venv/bin/python benchmarks/fault_matrix.py --only soak redis
    .venv/bin/python benchmarks/fault_matrix.py --write docs/reliability.md

Each row runs one scenario of tests/support/scenarios/ (or tests/support/crash.py) on its own
private mosquitto (and redis-server where needed), counted by an independent paho subscriber,
and reports: faults injected, messages accepted (``publish()`` returned; for the receiving
client: published by paho), arrived (distinct), lost, QoS 2 duplicates, deliveries in doubt,
messages re-published. ``--write`` replaces the table between the markers in the given file
(docs/reliability.md). Needs root for the disk rows (they mount a tmpfs); elsewhere those rows
say why they were skipped.

Exit status: 0 when every row held its guarantee (rows marked as expected to lose, which show a
documented limit, excepted); 1 otherwise; 2 if it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Our tests package, not gmqtt's top-level "tests" that site-packages may also hold.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.broker import MosquittoBroker  # noqa: E402
from tests.support.crash import run_kill_cycles  # noqa: E402
from tests.support.redis_server import RedisServer, find_redis_server  # noqa: E402
from tests.support.scenarios.broker import run_broker_killed, run_broker_lost_session  # noqa: E402
from tests.support.scenarios.disk import run_disk_full, run_read_only  # noqa: E402
from tests.support.scenarios.network import run_network_faults  # noqa: E402
from tests.support.scenarios.receiver import run_receiver_kills  # noqa: E402
from tests.support.scenarios.redis_outage import run_redis_outage  # noqa: E402
from tests.support.stores import (  # noqa: E402
    MATRIX_DURABLE_KINDS,
    MATRIX_KINDS,
    make_store,
    store_spec,
)
from tests.support.tally import FaultFigures  # noqa: E402
from tests.support.tmpfs import MountNotPermitted, Tmpfs  # noqa: E402

BEGIN = "<!-- fault-matrix:begin (benchmarks/fault_matrix.py --write writes between these) -->"
END = "<!-- fault-matrix:end -->"


@dataclass
class Row:
    scenario: str
    store: str
    figures: FaultFigures | None = None
    skipped: str | None = None
    error: str | None = None
    #: A documented limit: losses here are the point of the row, not a failure.
    expected_loss: str | None = None

    @property
    def ok(self) -> bool:
        if self.skipped:
            return True
        if self.error or self.figures is None:
            return False
        if self.expected_loss:
            return True
        f = self.figures
        # The receiving client's unprinted messages are issue 11's (counted, not failed), as
        # long as a killed child had acknowledged each of them (the scenario checks that).
        lost_counts = self.scenario != "receiver SIGKILL, its acks dropped"
        explained = not f.notes.get("lost_unexplained")
        in_order = not f.notes.get("wire_order")  # per connection, where the scenario checks it
        return not f.qos2_duplicates and not (lost_counts and f.lost) and explained and in_order


@dataclass
class Context:
    workdir: Path
    quick: bool
    soak_seconds: float
    redis: RedisServer | None


Scenario = Callable[[Context, str, Path], Coroutine[Any, Any, FaultFigures]]


@contextlib.contextmanager
def _broker(workdir: Path, *, persistence: bool = False) -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(workdir / "broker", persistence=persistence)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _redis_url(ctx: Context, kind: str) -> str | None:
    if kind != "redis":
        return None
    if ctx.redis is None:
        raise RuntimeError("redis-server not found")
    return ctx.redis.url


async def network(ctx: Context, kind: str, workdir: Path) -> FaultFigures:
    with _broker(workdir) as broker:
        store = make_store(kind, workdir, redis_url=_redis_url(ctx, kind))
        return await run_network_faults(
            broker, store, store_name=kind, duration=ctx.soak_seconds, interval=0.2,
            timeout=300, prefix=f"soak-{kind}",
        )  # fmt: skip


async def publisher_kills(ctx: Context, kind: str, workdir: Path) -> FaultFigures:
    with _broker(workdir) as broker:
        spec = store_spec(kind, workdir, redis_url=_redis_url(ctx, kind))
        started = time.monotonic()
        crash = await asyncio.to_thread(
            run_kill_cycles, broker.host, broker.port, spec, cycles=10 if ctx.quick else 20,
            client_id=f"kill-{kind}-{os.getpid()}",
        )  # fmt: skip
    figures = FaultFigures("publisher SIGKILL", kind, accepted=crash.accepted,
                           arrived=crash.arrived, lost=crash.lost,
                           qos2_duplicates=crash.qos2_duplicates, faults=crash.kills)  # fmt: skip
    figures.seconds = time.monotonic() - started
    figures.notes.update(
        wire_order=crash.wire_out_of_order,
        subscriber_out_of_order=crash.out_of_order,
        kill_boundary_repeats=crash.boundary_repeats,
        accepted_per_kill=crash.accepted_per_kill,
    )
    return figures


async def receiver_kills(ctx: Context, kind: str, workdir: Path) -> FaultFigures:
    with _broker(workdir) as broker:
        spec = (
            "memory:" if kind == "memory"
            else store_spec(kind, workdir, redis_url=_redis_url(ctx, kind))
        )  # fmt: skip
        return await run_receiver_kills(
            broker, spec, store_name=kind, kills=4 if ctx.quick else 10, prefix=f"recv-{kind}"
        )


async def broker_lost_session(ctx: Context, kind: str, workdir: Path) -> FaultFigures:
    with _broker(workdir) as broker:
        store = make_store(kind, workdir, redis_url=_redis_url(ctx, kind))
        return await run_broker_lost_session(broker, store, store_name=kind, prefix=f"lost-{kind}")


async def broker_killed(ctx: Context, kind: str, workdir: Path) -> FaultFigures:
    with _broker(workdir, persistence=True) as broker:
        store = make_store(kind, workdir, redis_url=_redis_url(ctx, kind))
        return await run_broker_killed(broker, store, store_name=kind, prefix=f"killed-{kind}")


async def disk_full(ctx: Context, kind: str, workdir: Path) -> FaultFigures:
    with _broker(workdir) as broker, Tmpfs(workdir / "tmpfs", 4 << 20) as fs:
        return await run_disk_full(broker, fs, kind)


async def read_only(ctx: Context, kind: str, workdir: Path) -> FaultFigures:
    with _broker(workdir) as broker, Tmpfs(workdir / "tmpfs", 4 << 20) as fs:
        return await run_read_only(broker, fs, kind)


def _redis_restart(*, hard: bool, appendonly: bool) -> Scenario:
    async def run(ctx: Context, kind: str, workdir: Path) -> FaultFigures:
        server = RedisServer(workdir / "redis", appendonly=appendonly).start()
        try:
            with _broker(workdir) as broker:
                figures = await run_redis_outage(
                    broker, server, hard=hard, timeout=60 if appendonly else 5
                )
        finally:
            server.stop()
        return figures

    return run


#: (scenario label, stores, function, expected loss per store (a documented limit) or None)
MATRIX: list[tuple[str, tuple[str, ...], Scenario, dict[str, str]]] = [
    ("network soak", MATRIX_KINDS, network, {}),
    ("publisher SIGKILL", MATRIX_DURABLE_KINDS, publisher_kills, {}),
    ("receiver SIGKILL, its acks dropped", (*MATRIX_DURABLE_KINDS, "memory"), receiver_kills,
     {"memory": "control: a MemoryStore dies with the process, and with it the inbound IDs"}),
    ("broker restart, persistence off", MATRIX_KINDS, broker_lost_session, {}),
    ("broker SIGKILL, persistence on", MATRIX_KINDS, broker_killed, {}),
    ("disk full", ("file", "sqlite"), disk_full, {}),
    ("read-only store", ("file", "sqlite"), read_only, {}),
    ("Redis restart", ("redis",), _redis_restart(hard=False, appendonly=True), {}),
    ("Redis SIGKILL", ("redis",), _redis_restart(hard=True, appendonly=True), {}),
    ("Redis SIGKILL, no AOF", ("redis",), _redis_restart(hard=True, appendonly=False),
     {"redis": "limit: a Redis without persistence loses every session when it dies"}),
]  # fmt: skip


def _wanted(label: str, store: str, only: list[str]) -> bool:
    text = f"{label} {store}".lower()
    return all(word.lower() in text for word in only)


def run_matrix(ctx: Context, only: list[str]) -> list[Row]:
    rows: list[Row] = []
    for label, stores, scenario, expected in MATRIX:
        for store in stores:
            if only and not _wanted(label, store, only):
                continue
            row = Row(label, store, expected_loss=expected.get(store))
            workdir = Path(tempfile.mkdtemp(prefix="fault-", dir=ctx.workdir))
            print(f"-- {label} / {store} ...", end=" ", flush=True)
            started = time.monotonic()
            try:
                row.figures = asyncio.run(scenario(ctx, store, workdir))
            except MountNotPermitted as exc:
                row.skipped = str(exc)
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            print(
                f"{time.monotonic() - started:.1f}s",
                "ok" if row.ok else "FAILED",
                row.skipped or row.error or "",
                flush=True,
            )
            rows.append(row)
    return rows


def _cell(values: list[int]) -> str:
    return str(len(values))


def table(rows: list[Row]) -> str:
    lines = [
        "| fault | store | injected | accepted | arrived | lost | QoS 2 duplicates | in doubt "
        "| re-published | seconds | |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    notes: list[str] = []
    for row in rows:
        f = row.figures
        if f is None:
            why = f"skipped: {row.skipped}" if row.skipped else f"ERROR: {row.error}"
            lines.append(f"| {row.scenario} | {row.store} | | | | | | | | | {why} |")
            continue
        remark = ""
        if row.expected_loss:
            notes.append(f"{row.scenario} / {row.store}: {row.expected_loss}.")
            remark = f"expected ({len(notes)})"
        elif row.scenario == "receiver SIGKILL, its acks dropped" and f.lost:
            remark = "lost = received, not yet processed (issue 11)"
        elif not row.ok:
            remark = "**FAILED**"
        lines.append(
            f"| {row.scenario} | {row.store} | {f.faults} | {f.accepted} | {f.arrived} "
            f"| {_cell(f.lost)} | {_cell(f.qos2_duplicates)} | {f.in_doubt} | {f.requeued} "
            f"| {f.seconds:.1f} | {remark} |"
        )
    if notes:
        lines.append("")
        lines += [f"({i}) {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(lines)


def describe_run(args: argparse.Namespace, seconds: float) -> str:
    import mqtt_persist

    load = os.getloadavg()
    mode = "--quick" if args.quick else "default"
    return (
        f"Run {datetime.date.today().isoformat()}, {mode} ({args.soak_seconds:g} s soak), "
        f"{seconds / 60:.1f} min; {os.cpu_count()} cores, Linux {platform.release()}, "
        f"CPython {platform.python_version()}, mqtt-persist {mqtt_persist.__version__}; "
        f"1-minute load average at the end {load[0]:.2f}."
    )


def write_between_markers(path: Path, text: str) -> None:
    document = path.read_text()
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: markers not found ({BEGIN} ... {END})")
    path.write_text(document[: start + len(BEGIN)] + "\n" + text + "\n" + document[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 s soak, fewer kills")
    parser.add_argument("--soak-seconds", type=float, default=None)
    parser.add_argument("--only", nargs="+", default=[], metavar="WORD",
                        help="rows whose 'fault store' contains every word")  # fmt: skip
    parser.add_argument("--write", type=Path, default=None, metavar="FILE",
                        help="put the table between the fault-matrix markers of FILE")  # fmt: skip
    args = parser.parse_args()
    if args.soak_seconds is None:
        args.soak_seconds = 10.0 if args.quick else 60.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as tmp:
        redis: RedisServer | None = None
        if find_redis_server() is not None:
            redis = RedisServer(Path(tmp) / "shared-redis").start()
        try:
            ctx = Context(Path(tmp), args.quick, args.soak_seconds, redis)
            rows = run_matrix(ctx, args.only)
        finally:
            if redis is not None:
                redis.stop()
    if not rows:
        print("no row matches", args.only)
        return 2
    text = table(rows) + "\n\n" + describe_run(args, time.monotonic() - started)
    print()
    print(text)
    if args.write is not None:
        write_between_markers(args.write, text)
        print(f"\nwritten to {args.write}")
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
