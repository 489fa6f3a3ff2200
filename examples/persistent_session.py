"""The phase 1-3 reconnect demo: messages published while you were offline arrive when you return.

    python examples/persistent_session.py                       # starts a private mosquitto
    python examples/persistent_session.py --broker mqtt://127.0.0.1:1883

Phase 1: connect with clean_session=False and a fixed client id, subscribe to persistent/test at
QoS 1, publish a test message and receive it, disconnect.
Phase 2: while we are offline, a separate publisher sends three messages.
Phase 3: reconnect with the same client id and store, and receive all three.

Exits 0 when all queued messages arrived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from mqtt_persist import DeliveryOutcome, FileStore, PersistentClient

TOPIC = "persistent/test"


@contextlib.contextmanager
def private_mosquitto(workdir: Path) -> Iterator[tuple[str, int]]:
    """Run mosquitto from PATH on a free 127.0.0.1 port for the length of the demo."""
    binary = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path="/usr/sbin:/usr/local/sbin"
    )
    if binary is None:
        sys.exit("mosquitto is not installed; install it or pass --broker mqtt://HOST:PORT")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"
        f"persistence false\nlog_dest file {workdir / 'mosquitto.log'}\n"
    )
    process = subprocess.Popen(
        [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"mosquitto did not start; see {workdir / 'mosquitto.log'}")
            time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        process.terminate()
        process.wait(5)


async def receive(client: PersistentClient, count: int, nonce: str, timeout: float) -> list[bytes]:
    """Collect ``count`` messages of this run (a shared broker may hold older ones)."""
    got: list[bytes] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                if message.payload.startswith(nonce.encode()):
                    got.append(message.payload)
                    print(f"    received {message.payload.decode()!r} (qos {message.qos})")
                    if len(got) == count:
                        break
    return got


async def demo(host: str, port: int, client_id: str, store_dir: Path, timeout: float) -> bool:
    nonce = uuid.uuid4().hex[:8]
    store = FileStore(store_dir)

    print(f"Phase 1: connect as {client_id!r} (clean_session=False), subscribe, round trip")
    async with PersistentClient(host, port, client_id=client_id, store=store) as client:
        await client.wait_connected(timeout=10)
        await client.subscribe(TOPIC, qos=1)
        delivery = await client.publish(TOPIC, f"{nonce} test message", qos=1)
        print(f"    published test message: {(await delivery).value}")
        if len(await receive(client, 1, nonce, timeout=10)) != 1:
            print("RESULT: FAILED - the test message did not come back")
            return False
    print("    disconnected; the session stays on the broker and in", store_dir)

    print("Phase 2: offline; another client publishes 3 messages")
    offline = [f"{nonce} offline message {i}".encode() for i in (1, 2, 3)]
    async with PersistentClient(
        host, port, client_id=f"demo-publisher-{nonce}", clean_session=True
    ) as publisher:
        for payload in offline:
            outcome = await (await publisher.publish(TOPIC, payload, qos=1))
            assert outcome is DeliveryOutcome.ACKNOWLEDGED
            print(f"    published {payload.decode()!r}")

    print(f"Phase 3: reconnect as {client_id!r} and receive what was queued")
    async with PersistentClient(host, port, client_id=client_id, store=store) as client:
        got = await receive(client, len(offline), nonce, timeout=timeout)
    if got == offline:
        print(f"RESULT: OK - all {len(offline)} queued messages arrived, in order")
        return True
    print(f"RESULT: FAILED - {len(got)} of {len(offline)} queued messages arrived")
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", help="mqtt://HOST:PORT (default: start a private mosquitto)")
    parser.add_argument("--client-id", default="persistent-demo")
    parser.add_argument("--store", type=Path, help="session directory (default: a temp dir)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the queued messages"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mqtt-persist-demo-") as tmp:
        workdir = Path(tmp)
        store_dir = args.store or workdir / "sessions"
        if args.broker:
            url = urlparse(args.broker)
            if url.scheme != "mqtt" or not url.hostname:
                parser.error("--broker takes mqtt://HOST:PORT")
            ok = asyncio.run(
                demo(url.hostname, url.port or 1883, args.client_id, store_dir, args.timeout)
            )
        else:
            with private_mosquitto(workdir) as (host, port):
                print(f"Started a private mosquitto on {host}:{port}")
                ok = asyncio.run(demo(host, port, args.client_id, store_dir, args.timeout))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
