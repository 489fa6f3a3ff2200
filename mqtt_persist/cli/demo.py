"""The phase 1-3 reconnect demo, run by ``mqtt-persist demo`` and examples/persistent_session.py.

Phase 1: connect with clean_session=False and a fixed client id, subscribe to persistent/test at
QoS 1, publish a test message and receive it, disconnect.
Phase 2: while we are offline, a separate publisher sends three messages.
Phase 3: reconnect with the same client id and store, and receive all three.

One implementation for both callers; it needs no click, so the example runs without the CLI
extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from mqtt_persist.client import PersistentClient
from mqtt_persist.errors import InvalidInput, MqttPersistError
from mqtt_persist.message import DeliveryOutcome
from mqtt_persist.stores.base import SessionStore

__all__ = ["TOPIC", "DemoError", "parse_broker", "private_mosquitto", "run_demo"]

TOPIC = "persistent/test"

#: How the demo reports its progress, one line at a time.
Say = Callable[[str], None]


class DemoError(MqttPersistError):
    """The demo could not run (no mosquitto, a broker that did not start)."""


def parse_broker(url: str) -> tuple[str, int]:
    """``mqtt://HOST:PORT`` (port 1883 by default); InvalidInput for anything else."""
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme, parts.hostname, parts.port
    except ValueError:
        scheme, host, port = "", None, None
    if scheme != "mqtt" or not host:
        raise InvalidInput(f"--broker takes mqtt://HOST:PORT, not {url!r}")
    return host, port or 1883


@contextlib.contextmanager
def private_mosquitto(workdir: Path) -> Iterator[tuple[str, int]]:
    """Run mosquitto from PATH on a free 127.0.0.1 port for the length of the demo."""
    binary = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path="/usr/sbin:/usr/local/sbin"
    )
    if binary is None:
        raise DemoError("mosquitto is not installed; install it or pass --broker mqtt://HOST:PORT")
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
                raise DemoError(f"mosquitto did not start; see {workdir / 'mosquitto.log'}")
            time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        process.terminate()
        process.wait(5)


async def _receive(
    client: PersistentClient, count: int, nonce: str, timeout: float, say: Say
) -> list[bytes]:
    """Collect ``count`` messages of this run (a shared broker may hold older ones)."""
    got: list[bytes] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                if message.payload.startswith(nonce.encode()):
                    got.append(message.payload)
                    say(f"    received {message.payload.decode()!r} (qos {message.qos})")
                    if len(got) == count:
                        break
    return got


async def run_demo(
    host: str,
    port: int,
    client_id: str,
    store: SessionStore,
    *,
    where: str,
    timeout: float,
    say: Say = print,
) -> bool:
    """Run the three phases against ``host:port``; True when all queued messages arrived.

    ``store`` keeps the session between phases (it is closed at the end); ``where`` names it
    for the reader. ``timeout`` bounds the first connection and the wait for the queued
    messages; a broker that cannot be reached raises
    :class:`~mqtt_persist.errors.ConnectTimeout`, whose message names it, the time waited and
    the last connection error: callers print that one line.
    """
    nonce = uuid.uuid4().hex[:8]
    try:
        say(f"Phase 1: connect as {client_id!r} (clean_session=False), subscribe, round trip")
        async with PersistentClient(host, port, client_id=client_id, store=store) as client:
            await client.wait_connected(timeout=timeout)
            await client.subscribe(TOPIC, qos=1)
            delivery = await client.publish(TOPIC, f"{nonce} test message", qos=1)
            say(f"    published test message: {(await delivery).value}")
            if len(await _receive(client, 1, nonce, 10, say)) != 1:
                say("RESULT: FAILED - the test message did not come back")
                return False
        say(f"    disconnected; the session stays on the broker and in {where}")

        say("Phase 2: offline; another client publishes 3 messages")
        offline = [f"{nonce} offline message {i}".encode() for i in (1, 2, 3)]
        async with PersistentClient(
            host, port, client_id=f"demo-publisher-{nonce}", clean_session=True
        ) as publisher:
            for payload in offline:
                outcome = await (await publisher.publish(TOPIC, payload, qos=1))
                assert outcome is DeliveryOutcome.ACKNOWLEDGED
                say(f"    published {payload.decode()!r}")

        say(f"Phase 3: reconnect as {client_id!r} and receive what was queued")
        async with PersistentClient(host, port, client_id=client_id, store=store) as client:
            got = await _receive(client, len(offline), nonce, timeout, say)
    finally:
        await store.close()
    if got == offline:
        say(f"RESULT: OK - all {len(offline)} queued messages arrived, in order")
        return True
    say(f"RESULT: FAILED - {len(got)} of {len(offline)} queued messages arrived")
    return False
