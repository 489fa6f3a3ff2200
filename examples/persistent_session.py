"""The phase 1-3 reconnect demo: messages published while you were offline arrive when you return.

    python examples/persistent_session.py                       # starts a private mosquitto
    python examples/persistent_session.py --broker mqtt://127.0.0.1:1883

Phase 1: connect with clean_session=False and a fixed client id, subscribe to persistent/test at
QoS 1, publish a test message and receive it, disconnect.
Phase 2: while we are offline, a separate publisher sends three messages.
Phase 3: reconnect with the same client id and store, and receive all three.

Exits 0 when all queued messages arrived, 1 otherwise. The phases themselves are
``mqtt_persist.cli.demo.run_demo`` (read it: it is the client's whole API in forty lines), which
``mqtt-persist demo`` runs too; this script only reads its arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from mqtt_persist import FileStore, InvalidInput, MqttPersistError
from mqtt_persist.cli.demo import parse_broker, private_mosquitto, run_demo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", help="mqtt://HOST:PORT (default: start a private mosquitto)")
    parser.add_argument("--client-id", default="persistent-demo")
    parser.add_argument("--store", type=Path, help="session directory (default: a temp dir)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the connection and for the queued messages",
    )
    args = parser.parse_args()
    try:
        broker = parse_broker(args.broker) if args.broker else None
    except InvalidInput as exc:
        parser.error(str(exc))
    with tempfile.TemporaryDirectory(prefix="mqtt-persist-demo-") as tmp:
        workdir = Path(tmp)
        store_dir = args.store or workdir / "sessions"

        def demo(host: str, port: int) -> bool:
            store = FileStore(store_dir)
            where, timeout = str(store_dir), args.timeout
            return asyncio.run(
                run_demo(host, port, args.client_id, store, where=where, timeout=timeout)
            )

        try:
            if broker is not None:
                ok = demo(*broker)
            else:
                with private_mosquitto(workdir) as (host, port):
                    print(f"Started a private mosquitto on {host}:{port}")
                    ok = demo(host, port)
        except MqttPersistError as exc:  # DemoError, ConnectTimeout: one line, no traceback
            sys.exit(f"error: {exc}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
