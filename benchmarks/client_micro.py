"""The client's own hot path, two implementations side by side on one private mosquitto.

    .venv/bin/python benchmarks/client_micro.py [--old DIR] [--new DIR] [--count 20000]
                                                [--repeats 3] [--stores memory commit file]
                                                [--offline]

Each implementation is a directory holding an ``mqtt_persist`` package (``--old`` for example a
read-only ``git archive`` of main, ``--new`` this checkout); each run is a child process with
that directory first on ``sys.path``, so both versions never share an interpreter. Stores:
``memory`` (``MemoryStore``: ``publish()`` does not wait for its commit), ``file`` (``FileStore``
with fsync, a temp dir) and ``commit``: a ``MemoryStore`` that claims to be durable, so every
QoS 1 ``publish()`` waits for the flusher's commit as with ``FileStore``, without the disk; it
shows the client's own cost per commit. For every store it times:

* ``sequential``: ``count`` times ``await client.publish(topic, payload, qos=1)`` (returns once
  the message is committed; for ``MemoryStore`` at once), then ``drain()``;
* ``gather/100``: ``asyncio.gather`` of 100 such publishes at a time, then ``drain()``.

``publish msg/s`` is ``count`` over the publish calls alone, ``drained msg/s`` over the publish
calls and the ``drain()`` after them (every message acknowledged by the broker); ``cpu us/msg``
is the benchmark process's CPU time (all its threads) over the same span, per message: on a
shared machine it moves less than wall-clock rates and shows the client's own cost.

``--offline`` points the clients at a port nobody listens on instead (no broker, no drain): with
the ``commit`` store that leaves exactly the hot path of a durable publish (change the session,
wake the flusher, commit, resolve the caller) and nothing else; its CPU per message is the
steadiest figure this script gives.

Runs alternate old/new, ``--repeats`` rounds; the table shows the median and the spread. No
subscriber: this measures the client, not delivery (``publish_throughput.py`` does that). The
machine is shared and noisy: only ratios within one run mean something.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _broker import HOST, Mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b"x" * 64
CHUNK = 100


async def _one_run(
    port: int, store_kind: str, mode: str, count: int, tag: str, offline: bool
) -> dict[str, float]:
    import mqtt_persist
    from mqtt_persist import Backoff, FileStore, MemoryStore, PersistentClient

    # The 3.1.1 path issue 7 follows: the client's default since issue 8 is "auto" (MQTT 5
    # against mosquitto). A --baseline tree from before it has no protocol= and speaks 3.1.1.
    version = getattr(mqtt_persist, "ProtocolVersion", None)
    protocol = {"protocol": version.V311} if version is not None else {}

    class CommitStore(MemoryStore):
        durable = True

    with tempfile.TemporaryDirectory(prefix="client-micro-") as tmp:
        store: MemoryStore | FileStore
        if store_kind == "file":
            store = FileStore(Path(tmp) / "sessions")
        else:
            store = CommitStore() if store_kind == "commit" else MemoryStore()
        client_id = f"micro-{tag}-{store_kind}-{mode}-{os.getpid()}"
        try:
            # Offline: no reconnect attempt during the run (the first one fails at once).
            backoff = Backoff(initial=600, maximum=600, minimum=600) if offline else Backoff()
            async with PersistentClient(
                HOST, port, client_id=client_id, store=store, backoff=backoff, **protocol
            ) as client:
                if not offline:
                    await client.wait_connected(10)
                topic = f"micro/{client_id}"
                started = time.perf_counter()
                cpu_started = time.process_time()
                if mode == "sequential":
                    for _ in range(count):
                        await client.publish(topic, PAYLOAD, qos=1)
                else:
                    for _ in range(0, count, CHUNK):
                        await asyncio.gather(
                            *[client.publish(topic, PAYLOAD, qos=1) for _ in range(CHUNK)]
                        )
                published = time.perf_counter()
                if not offline:
                    await client.drain(120)
                drained = time.perf_counter()
                cpu = time.process_time() - cpu_started
        finally:
            await store.close()
    result = {"publish": count / (published - started), "cpu us/msg": cpu / count * 1e6}
    if not offline:
        result["drained"] = count / (drained - started)
    return result


def child(args: argparse.Namespace) -> None:
    """Runs in the child process: one implementation, every store and mode once."""
    sys.path.insert(0, str(Path(args.impl).resolve()))
    import mqtt_persist

    results = {"module": mqtt_persist.__file__}
    for store_kind in args.stores:
        for mode in ("sequential", "gather/100"):
            results[f"{store_kind} {mode}"] = asyncio.run(  # type: ignore[assignment]
                _one_run(args.port, store_kind, mode, args.count, args.tag, args.offline)
            )
    print(json.dumps(results))


def parent(args: argparse.Namespace) -> None:
    impls = {"old": args.old, "new": args.new}
    runs: dict[str, list[dict[str, object]]] = {"old": [], "new": []}
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        port = free_port() if args.offline else stack.enter_context(Mosquitto()).port
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
                    str(port),
                    "--count",
                    str(args.count),
                    "--tag",
                    f"{name}{round_}",
                    "--stores",
                    *args.stores,
                    *(["--offline"] if args.offline else []),
                ]
                out = subprocess.run(command, capture_output=True, text=True, check=False)
                if out.returncode:
                    sys.exit(f"{name} run failed:\n{out.stdout}\n{out.stderr}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[name].append(result)
                print(f"round {round_ + 1} {name}: {result.pop('module')}", file=sys.stderr)
    load_after = os.getloadavg()[0]
    print(
        f"\n{args.count} QoS 1 messages of {len(PAYLOAD)} B{' offline' if args.offline else ''}, "
        f"median of {args.repeats} (min-max); load average {load_before:.2f} before, "
        f"{load_after:.2f} after\n"
    )
    header = f"| {'case':<20} | {'metric':<10} | {'old':>25} | {'new':>25} | new/old |"
    print("publish, drained: msg/s; cpu us/msg: CPU microseconds per message (lower is better)\n")
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for case in runs["old"][0]:
        for metric in ("publish", "drained", "cpu us/msg"):
            if metric not in runs["old"][0][case]:  # type: ignore[operator]
                continue
            digits = 1 if metric.startswith("cpu") else 0
            cells = []
            medians = []
            for name in ("old", "new"):
                values = [run[case][metric] for run in runs[name]]  # type: ignore[index]
                median = statistics.median(values)
                medians.append(median)
                cells.append(
                    f"{median:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
                )
            ratio = medians[1] / medians[0]
            print(
                f"| {case:<20} | {metric:<10} | {cells[0]:>25} | {cells[1]:>25} | {ratio:6.2f}x |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=str(ROOT), help="directory holding the old package")
    parser.add_argument("--new", default=str(ROOT), help="directory holding the new package")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--stores",
        nargs="+",
        default=["memory", "commit", "file"],
        choices=["memory", "commit", "file"],
    )
    parser.add_argument("--offline", action="store_true", help="no broker: the hot path alone")
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
