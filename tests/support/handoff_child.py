"""A child process for the handoff tests: owns a session in a shared store and streams QoS 1/2.

Usage: python -m tests.support.handoff_child HOST PORT STORE CLIENT_ID TAG START COUNT
       [--lease-ttl SECONDS] [--drain]

STORE is ``redis:URL#PREFIX`` or ``postgres:DSN#SCHEMA``. Message i (START <= i < COUNT) goes
to ``handoff/q1`` at QoS 1 when i is even and to ``handoff/q2`` at QoS 2 when odd, with payload
``TAG:i``. The child prints, flushing each line:

- ``STARTED`` once the client is entered (it holds the session's lease);
- ``OK i`` after ``publish()`` returned for message i;
- ``W+ n`` before its n-th ``store.apply`` call, ``W= n`` after the store accepted it and
  ``W! n ErrorType`` when the store refused it: the parent counts the writes of a fenced owner;
- ``FATAL ErrorType: message`` when the client stopped (exit status 3);
- ``DRAINED`` with ``--drain``, after COUNT messages were published and acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from mqtt_persist import Backoff, PersistentClient
from mqtt_persist.errors import MqttPersistError
from mqtt_persist.session.state import Operation


def topic_and_qos(i: int) -> tuple[str, int]:
    return ("handoff/q1", 1) if i % 2 == 0 else ("handoff/q2", 2)


def make_store(spec: str, lease_ttl: float) -> Any:
    kind, _, where = spec.partition(":")
    location, _, namespace = where.rpartition("#")
    if kind == "redis":
        from mqtt_persist.stores.redis import RedisStore

        return RedisStore(location, prefix=namespace, lease_ttl=lease_ttl)
    if kind == "postgres":
        from mqtt_persist.stores.postgres import PostgresStore

        return PostgresStore(location, schema=namespace, lease_ttl=lease_ttl)
    raise SystemExit(f"unknown store spec {spec!r}")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def log_writes(store: Any) -> None:
    """Report every ``apply`` the client makes: started, accepted or refused."""
    apply = store.apply
    count = 0

    async def logged(client_id: str, ops: Sequence[Operation]) -> None:
        nonlocal count
        count += 1
        n = count
        say(f"W+ {n}")
        try:
            await apply(client_id, ops)
        except BaseException as exc:
            say(f"W! {n} {type(exc).__name__}")
            raise
        say(f"W= {n}")

    store.apply = logged


def dump_tasks() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


async def main(argv: list[str]) -> int:
    host, port, spec, client_id, tag = argv[0], int(argv[1]), argv[2], argv[3], argv[4]
    start, count = int(argv[5]), int(argv[6])
    lease_ttl = float(argv[argv.index("--lease-ttl") + 1]) if "--lease-ttl" in argv else 15.0
    # On stderr, which the tests show when they fail.
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {tag} %(name)s: %(message)s")
    store = make_store(spec, lease_ttl)
    log_writes(store)
    # SIGUSR1: every task's stack on stderr (a test that finds the child hanging asks for it).
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
    try:
        async with PersistentClient(
            host,
            port,
            client_id=client_id,
            store=store,
            backoff=Backoff(initial=0.05, maximum=0.5),
        ) as client:
            say("STARTED")
            for i in range(start, count):
                topic, qos = topic_and_qos(i)
                await client.publish(topic, f"{tag}:{i}".encode(), qos=qos)
                say(f"OK {i}")
            if "--drain" in argv:
                await client.drain(timeout=60)
                say("DRAINED")
    except MqttPersistError as exc:
        say(f"FATAL {type(exc).__name__}: {exc}")
        return 3
    finally:
        await store.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
