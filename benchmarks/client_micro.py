"""The client's own hot path, two implementations side by side on one private mosquitto.

    .venv/bin/python benchmarks/client_micro.py [--old DIR] [--new DIR] [--count 20000]
                                                [--repeats 3] [--stores memory file]

Each implementation is a directory holding an ``mqtt_persist`` package (``--old`` for example a
read-only ``git archive`` of main, ``--new`` this checkout); each run is a child process with
that directory first on ``sys.path``, so both versions never share an interpreter. For every
store it times:

* ``sequential``: ``count`` times ``await client.publish(topic, payload, qos=1)`` (returns once
  the message is committed; for ``MemoryStore`` at once), then ``drain()``;
* ``gather/100``: ``asyncio.gather`` of 100 such publishes at a time, then ``drain()``.

``publish msg/s`` is ``count`` over the publish calls alone, ``drained msg/s`` over the publish
calls and the ``drain()`` after them (every message acknowledged by the broker). Runs alternate
old/new, ``--repeats`` rounds; the table shows the median and the spread. No subscriber: this
measures the client, not delivery (``publish_throughput.py`` does that). The machine is shared
and noisy: only ratios within one run mean something.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _broker import HOST, Mosquitto

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b"x" * 64
CHUNK = 100


async def _one_run(port: int, store_kind: str, mode: str, count: int, tag: str) -> dict[str, float]:
    from mqtt_persist import FileStore, MemoryStore, PersistentClient

    with tempfile.TemporaryDirectory(prefix="client-micro-") as tmp:
        store: MemoryStore | FileStore = (
            FileStore(Path(tmp) / "sessions") if store_kind == "file" else MemoryStore()
        )
        client_id = f"micro-{tag}-{store_kind}-{mode}-{os.getpid()}"
        try:
            async with PersistentClient(HOST, port, client_id=client_id, store=store) as client:
                await client.wait_connected(10)
                topic = f"micro/{client_id}"
                started = time.perf_counter()
                if mode == "sequential":
                    for _ in range(count):
                        await client.publish(topic, PAYLOAD, qos=1)
                else:
                    for _ in range(0, count, CHUNK):
                        await asyncio.gather(
                            *[client.publish(topic, PAYLOAD, qos=1) for _ in range(CHUNK)]
                        )
                published = time.perf_counter()
                await client.drain(120)
                drained = time.perf_counter()
        finally:
            await store.close()
    return {
        "publish": count / (published - started),
        "drained": count / (drained - started),
    }


def child(args: argparse.Namespace) -> None:
    """Runs in the child process: one implementation, every store and mode once."""
    sys.path.insert(0, str(Path(args.impl).resolve()))
    import mqtt_persist

    results = {"module": mqtt_persist.__file__}
    for store_kind in args.stores:
        for mode in ("sequential", "gather/100"):
            results[f"{store_kind} {mode}"] = asyncio.run(  # type: ignore[assignment]
                _one_run(args.port, store_kind, mode, args.count, args.tag)
            )
    print(json.dumps(results))


def parent(args: argparse.Namespace) -> None:
    impls = {"old": args.old, "new": args.new}
    runs: dict[str, list[dict[str, object]]] = {"old": [], "new": []}
    load_before = os.getloadavg()[0]
    with Mosquitto() as broker:
        for round_ in range(args.repeats):
            order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
            for name in order:
                command = [
                    sys.executable,
                    __file__,
                    "--child",
                    "--impl",
                    impls[name],
                    "--port",
                    str(broker.port),
                    "--count",
                    str(args.count),
                    "--tag",
                    f"{name}{round_}",
                    "--stores",
                    *args.stores,
                ]
                out = subprocess.run(command, capture_output=True, text=True, check=False)
                if out.returncode:
                    sys.exit(f"{name} run failed:\n{out.stdout}\n{out.stderr}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[name].append(result)
                print(f"round {round_ + 1} {name}: {result.pop('module')}", file=sys.stderr)
    load_after = os.getloadavg()[0]
    print(
        f"\n{args.count} QoS 1 messages of {len(PAYLOAD)} B, median of {args.repeats} "
        f"(min-max); load average {load_before:.2f} before, {load_after:.2f} after\n"
    )
    header = f"| {'case':<20} | {'metric':<8} | {'old msg/s':>25} | {'new msg/s':>25} | new/old |"
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for case in runs["old"][0]:
        for metric in ("publish", "drained"):
            cells = []
            medians = []
            for name in ("old", "new"):
                values = [run[case][metric] for run in runs[name]]  # type: ignore[index]
                median = statistics.median(values)
                medians.append(median)
                cells.append(f"{median:,.0f} ({min(values):,.0f}-{max(values):,.0f})")
            ratio = medians[1] / medians[0]
            print(f"| {case:<20} | {metric:<8} | {cells[0]:>25} | {cells[1]:>25} | {ratio:6.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=str(ROOT), help="directory holding the old package")
    parser.add_argument("--new", default=str(ROOT), help="directory holding the new package")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stores", nargs="+", default=["memory", "file"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
