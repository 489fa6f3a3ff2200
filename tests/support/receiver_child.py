"""A child process for the receiving-side crash test: subscribes and prints what it receives.

Usage: python -m tests.support.receiver_child HOST PORT STORE CLIENT_ID FILTER

STORE is a spec from :mod:`tests.support.stores` (``file:DIR``, ``sqlite:PATH``,
``redis:URL#PREFIX``, or ``memory:`` for a store that dies with the process). The child keeps a
persistent session (clean_session=False), subscribes to FILTER at QoS 2, prints ``READY`` once
connected, then for every message the application gets ``GOT <payload> <dup>``, and
``SUPPRESSED <n>`` whenever ``client.stats.duplicates_suppressed`` changed. Each line is
flushed at once, so the parent knows exactly what reached the application before it sends
SIGKILL. When its stdin closes it leaves the client cleanly and exits.
"""

from __future__ import annotations

import asyncio
import sys

from mqtt_persist import Backoff, MemoryStore, PersistentClient, SessionStore
from tests.support.stores import store_from_spec


def _store(spec: str) -> SessionStore:
    return MemoryStore() if spec.startswith("memory") else store_from_spec(spec)


async def main(argv: list[str]) -> None:
    host, port, spec, client_id, topic_filter = argv[0], int(argv[1]), argv[2], argv[3], argv[4]
    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def watch_stdin() -> None:
        await reader.read()
        stdin_closed.set()

    async with PersistentClient(
        host,
        port,
        client_id=client_id,
        store=_store(spec),
        backoff=Backoff(initial=0.05, maximum=0.5, minimum=0.01),
    ) as client:
        await client.subscribe(topic_filter, qos=2)
        await client.wait_connected(30)
        print("READY", flush=True)
        suppressed = 0

        async def report() -> None:
            nonlocal suppressed
            while True:
                now = client.stats.duplicates_suppressed
                if now != suppressed:
                    suppressed = now
                    print(f"SUPPRESSED {now}", flush=True)
                await asyncio.sleep(0.02)

        async def receive() -> None:
            async for message in client.messages:
                sys.stdout.write(f"GOT {message.payload.decode()} {int(message.dup)}\n")
                sys.stdout.flush()

        tasks = [asyncio.create_task(t) for t in (report(), receive(), watch_stdin())]
        await stdin_closed.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(f"SUPPRESSED {client.stats.duplicates_suppressed}", flush=True)
    print("CLOSED", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
