"""Microseconds per message through the sans-IO session machine, two source trees side by side.

    .venv/bin/python benchmarks/session_micro.py --baseline /work/main
    .venv/bin/python benchmarks/session_micro.py --baseline /work/main \\
        --baseline-python /work/main/.venv/bin/python --count 200000 --rounds 5

No broker, no store, no event loop: each scenario drives ``Session`` by hand, playing the broker,
the way the client's flusher and reader do (publish, ``take``, acknowledgement, ``take``):

* ``qos1``: publish, take, PUBACK, take, one message at a time;
* ``qos2``: publish, take, PUBREC, take, PUBCOMP, take, one message at a time;
* ``qos1-window``: 100 publishes, take, 100 PUBACKs, take (a full in-flight window, as under
  concurrent publishing).

Every measurement runs in a fresh child process that puts one tree first on ``sys.path`` (and
checks that ``mqtt_persist`` really came from there). Children of the two trees alternate round by
round, so both see the same load on a shared machine; the table gives each tree's median and best
round and the ratios (candidate / baseline: below 1 is faster). Timings on a busy 2-core machine
move by several per cent between rounds, far more under load: the best round is the steadiest
figure then, and a ratio within a few per cent of 1 means "no difference".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve()
SCENARIOS = ("qos1", "qos2", "qos1-window")
WINDOW = 100


def _run_scenario(name: str, count: int) -> float:
    """Seconds per message for one scenario, measured in this process."""
    from mqtt_persist.protocol.packets import ConnAck, PubAck, PubComp, PubRec
    from mqtt_persist.session.machine import Session, SessionConfig

    session = Session(SessionConfig(client_id="bench", max_inflight=WINDOW))
    session.connect(0.0)
    session.take(0.0)
    session.receive(ConnAck(False, 0))
    session.take(0.0)
    publish = session.publish
    take = session.take
    receive = session.receive
    payload = b"x" * 64
    now = 1.0

    def qos1() -> None:
        for _ in range(count):
            publish("bench/t", payload, 1)
            packet_id = take(now).packets[0].packet_id  # type: ignore[union-attr]
            receive(PubAck(packet_id))
            take(now)

    def qos2() -> None:
        for _ in range(count):
            publish("bench/t", payload, 2)
            packet_id = take(now).packets[0].packet_id  # type: ignore[union-attr]
            receive(PubRec(packet_id))
            take(now)
            receive(PubComp(packet_id))
            take(now)

    def qos1_window() -> None:
        for _ in range(count // WINDOW):
            for _ in range(WINDOW):
                publish("bench/t", payload, 1)
            packets = take(now).packets
            for packet in packets:
                receive(PubAck(packet.packet_id))  # type: ignore[union-attr]
            take(now)

    runs: dict[str, Callable[[], None]] = {
        "qos1": qos1,
        "qos2": qos2,
        "qos1-window": qos1_window,
    }
    started = time.perf_counter()
    runs[name]()
    elapsed = time.perf_counter() - started
    if not session.is_idle or session.inflight:
        raise RuntimeError(f"{name}: the session did not finish every message")
    return elapsed / (count // WINDOW * WINDOW if name == "qos1-window" else count)


def _worker(root: str, count: int, scenarios: list[str]) -> None:
    sys.path.insert(0, root)
    import mqtt_persist

    origin = Path(mqtt_persist.__file__).resolve()
    if not origin.is_relative_to(Path(root).resolve()):
        raise SystemExit(f"mqtt_persist came from {origin}, not from {root}")
    result = {name: _run_scenario(name, count) for name in scenarios}
    print(json.dumps(result))


def _measure(python: str, root: str, count: int, scenarios: list[str]) -> dict[str, float]:
    command = [python, str(HERE), "--worker", root, "--count", str(count), "--only", *scenarios]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker for {root} failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=False, help="the tree to compare against")
    parser.add_argument("--baseline-python", default=sys.executable)
    parser.add_argument("--candidate", default=str(HERE.parent.parent), help="default: this tree")
    parser.add_argument("--candidate-python", default=sys.executable)
    parser.add_argument("--count", type=int, default=200_000, help="messages per scenario")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.count, args.only)
        return

    trees: list[tuple[str, str, str]] = [("candidate", args.candidate_python, args.candidate)]
    if args.baseline:
        trees.insert(0, ("baseline", args.baseline_python, args.baseline))
    samples: dict[str, dict[str, list[float]]] = {label: {} for label, _, _ in trees}
    for round_no in range(args.rounds):
        # Alternate which tree goes first, so neither always runs on a warmer machine.
        order = trees if round_no % 2 == 0 else list(reversed(trees))
        for label, python, root in order:
            for name, seconds in _measure(python, root, args.count, args.only).items():
                samples[label].setdefault(name, []).append(seconds * 1e6)
        print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)

    print(f"{args.count} messages per scenario, {args.rounds} rounds, µs/message")
    for label, python, root in trees:
        print(f"  {label}: {root} ({python})")
    columns = [f"{label} {stat}" for label, _, _ in trees for stat in ("median", "best")]
    if args.baseline:
        columns += ["ratio median", "ratio best"]
    print(f"{'scenario':<12}" + "".join(f"{c:>18}" for c in columns))
    for name in args.only:
        values: list[float] = []
        for label, _, _ in trees:
            values += [statistics.median(samples[label][name]), min(samples[label][name])]
        if args.baseline:
            values += [values[2] / values[0], values[3] / values[1]]
        print(f"{name:<12}" + "".join(f"{v:>18.3f}" for v in values))


if __name__ == "__main__":
    main()
