"""A child process for crash tests: publishes numbered messages and reports each accepted one.

Usage: python -m tests.support.publisher_child HOST PORT STORE CLIENT_ID START COUNT [--drain]
       [--protocol 4|5] [--websockets] [--die-after N DELAY]

STORE names a durable store: ``file:DIR``, ``sqlite:PATH``, ``redis:URL#PREFIX`` or
``postgres:DSN#SCHEMA`` (``tests.support.stores.store_from_spec``).
Message i (START <= i < COUNT) goes to ``kill/q1`` at QoS 1 when i is even and to ``kill/q2`` at
QoS 2 when odd, with payload ``str(i)``. After ``publish()`` returned, the child prints
``OK i`` and flushes, so the parent knows exactly which messages the library accepted before it
killed the child with SIGKILL. With ``--drain`` it waits for every acknowledgement, prints
``DRAINED`` and exits cleanly. ``--protocol`` chooses MQTT 3.1.1 (4) or MQTT 5 (5); without it
the client's default. ``--websockets``: ``transport="websockets"`` (HOST:PORT is then a
WebSocket server, e.g. the tests' bridge). ``--die-after N DELAY``: once it reported its Nth
accepted message, a timer thread kills the process with SIGKILL DELAY seconds later, wherever
it then is (the crash tests' kills, counted here rather than by a busy parent).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading

from mqtt_persist import Backoff, PersistentClient
from mqtt_persist.client.options import ProtocolChoice
from mqtt_persist.protocol.packets import ProtocolVersion
from tests.support.stores import store_from_spec


def topic_and_qos(i: int) -> tuple[str, int]:
    return ("kill/q1", 1) if i % 2 == 0 else ("kill/q2", 2)


async def main(argv: list[str]) -> None:
    host, port, store_spec, client_id = argv[0], int(argv[1]), argv[2], argv[3]
    start, count = int(argv[4]), int(argv[5])
    drain = "--drain" in argv
    protocol: ProtocolChoice = "auto"
    if "--protocol" in argv:
        protocol = ProtocolVersion(int(argv[argv.index("--protocol") + 1]))
    async with PersistentClient(
        host,
        port,
        client_id=client_id,
        store=store_from_spec(store_spec),
        backoff=Backoff(initial=0.05, maximum=0.5),
        protocol=protocol,
        transport="websockets" if "--websockets" in argv else "tcp",
    ) as client:
        print("STARTED", flush=True)
        die_at = None
        if "--die-after" in argv:
            at = argv.index("--die-after")
            die_at, delay = start + int(argv[at + 1]) - 1, float(argv[at + 2])
        for i in range(start, count):
            topic, qos = topic_and_qos(i)
            await client.publish(topic, str(i).encode(), qos=qos)
            sys.stdout.write(f"OK {i}\n")
            sys.stdout.flush()
            if i == die_at:
                timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
                timer.daemon = True
                timer.start()
        if drain:
            await client.drain(timeout=60)
            print("DRAINED", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
