"""Crash figures: SIGKILL cycles of a publishing child process on every durable store.

    .venv/bin/python benchmarks/crash_figures.py [--cycles N] [--seed N] [--stores file ...]

For each store a private mosquitto is started; a child process publishes 500 QoS 1 and 500 QoS 2
messages through mqtt_persist and reports each message ``publish()`` accepted; it is killed with
SIGKILL at random moments ``--cycles`` times and restarted on the same store; an independent paho
subscriber counts what arrived. Lost, QoS 2 duplicates and out-of-order must all be 0; the exit
status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

# Our tests package, not gmqtt's top-level "tests" that site-packages may also hold.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.broker import MosquittoBroker
from tests.support.crash import CrashFigures, run_kill_cycles


def store_spec(kind: str, workdir: Path, redis_url: str | None, pg_dsn: str | None) -> str:
    if kind == "file":
        return f"file:{workdir / 'sessions'}"
    if kind == "sqlite":
        return f"sqlite:{workdir / 'sessions.db'}"
    if kind == "postgres":
        assert pg_dsn is not None
        return f"postgres:{pg_dsn}#crash_figures_{int(time.time() * 1000)}"
    assert redis_url is not None
    return f"redis:{redis_url}#crash-figures-{int(time.time() * 1000)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stores", nargs="+", default=["file", "sqlite", "redis", "postgres"])
    args = parser.parse_args()
    redis_url = None
    if "redis" in args.stores:
        from tests.support.redis_server import shared_redis_url

        redis_url = shared_redis_url()
    with contextlib.ExitStack() as stack:
        pg_dsn = None
        if "postgres" in args.stores:
            from tests.support.postgres import private_database

            # The server's defaults (synchronous_commit on), in a database of our own.
            pg_dsn = stack.enter_context(private_database(server_defaults=True))
        return run(args, redis_url, pg_dsn)


def run(args: argparse.Namespace, redis_url: str | None, pg_dsn: str | None) -> int:
    rows: list[tuple[CrashFigures, float]] = []
    for kind in args.stores:
        with tempfile.TemporaryDirectory(prefix=f"crash-{kind}-") as tmp:
            workdir = Path(tmp)
            broker = MosquittoBroker(workdir / "broker")
            broker.start()
            try:
                started = time.monotonic()
                figures = run_kill_cycles(
                    broker.host,
                    broker.port,
                    store_spec(kind, workdir, redis_url, pg_dsn),
                    cycles=args.cycles,
                    seed=args.seed,
                )
                rows.append((figures, time.monotonic() - started))
            finally:
                broker.stop()
    print()
    print("| store | SIGKILLs | accepted | arrived | lost | QoS 2 duplicates | out of order "
          "| kill-boundary repeats | seconds |")  # fmt: skip
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for f, seconds in rows:
        print(
            f"| {f.store} | {f.kills} | {f.accepted} | {f.arrived} | {len(f.lost)} "
            f"| {len(f.qos2_duplicates)} | {f.out_of_order} | {f.boundary_repeats} "
            f"| {seconds:.1f} |"
        )
    print(
        "\nkill-boundary repeats: the message whose publish() was cut off by the kill is "
        "published again by the restarted child (the test's own resend), so it may arrive twice."
    )
    return 0 if all(f.ok for f, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
