"""A child process for the manual-acknowledgement crash test (issue 11).

Usage: python -m tests.support.ack_child HOST PORT STORE CLIENT_ID FILTER MODE

Runs a ``PersistentClient(..., ack="manual")`` with a persistent session on the durable STORE
(a :mod:`tests.support.stores` spec), subscribes to FILTER at QoS 2 and prints ``READY`` once
connected. For every message it prints ``GOT <payload> <qos> <dup>``; it acknowledges a
message whose payload starts with ``ack`` (MODE ``some``) or every message (MODE ``all``), and
prints ``ACKED <payload>`` once ``message.ack()`` returned (for QoS 2: stored). Each line is
flushed at once, so the parent knows exactly what the application got and acknowledged before
it sends SIGKILL. When its stdin closes it leaves the client cleanly and exits.
"""

from __future__ import annotations

import asyncio
import sys

from mqtt_persist import Backoff, PersistentClient
from tests.support.stores import store_from_spec


async def main(argv: list[str]) -> None:
    host, port, spec, client_id, topic_filter, mode = argv[:6]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with PersistentClient(
        host,
        int(port),
        client_id=client_id,
        store=store_from_spec(spec),
        ack="manual",
        backoff=Backoff(initial=0.05, maximum=0.5, minimum=0.01),
    ) as client:
        await client.subscribe(topic_filter, qos=2)
        await client.wait_connected(30)
        print("READY", flush=True)

        async def receive() -> None:
            async for message in client.messages:
                text = message.payload.decode()
                print(f"GOT {text} {message.qos} {int(message.dup)}", flush=True)
                if mode == "all" or text.startswith("ack"):
                    await message.ack()
                    print(f"ACKED {text}", flush=True)

        task = asyncio.create_task(receive())
        await reader.read()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    print("CLOSED", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
