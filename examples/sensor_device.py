"""A sensor device: it publishes a reading every interval, whether the broker is reachable or not.

    python examples/sensor_device.py --broker mqtt://127.0.0.1:1883 --store /var/lib/sensor

Each reading is published at QoS 1 into a durable session store (a FileStore directory):
``publish()`` returns once the reading is on disk, never because the network is down, so the
loop keeps its pace through outages. Readings taken while the broker is unreachable wait in the
store and go out, in order, when the connection comes back; a reading whose ``publish()``
returned survives a crash or power cut of the device too (the next run sends it).

The loop does not wait for the broker's acknowledgement of each reading (that would stall it
during an outage); ``client.stats`` says how many are queued. With ``--count`` it stops after
that many readings and waits (``drain``) until the broker acknowledged all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from mqtt_persist import Backoff, FileStore, PersistentClient
from mqtt_persist.cli.demo import parse_broker


def read_sensor() -> float:
    """Stands in for the real sensor."""
    return round(20.0 + random.uniform(-0.5, 0.5), 2)


async def run(
    host: str, port: int, store: Path, device: str, interval: float, count: int | None
) -> None:
    topic = f"sensors/{device}/temperature"
    async with PersistentClient(
        host,
        port,
        client_id=device,
        store=FileStore(store),
        # Device loops are long-lived: reconnect forever, but do not hammer a broker that
        # is down (full jitter spreads a fleet's reconnects).
        backoff=Backoff(initial=0.2, maximum=5.0),
        # A bounded queue: an outage longer than this many readings drops the oldest ones,
        # counted in client.stats.dropped, rather than filling the disk.
        max_queued=100_000,
        queue_full="drop_oldest",
    ) as client:
        n = 0
        while count is None or n < count:
            reading = {"device": device, "n": n, "t": time.time(), "celsius": read_sensor()}
            await client.publish(topic, json.dumps(reading), qos=1)
            print(f"STORED {n}", flush=True)
            n += 1
            await asyncio.sleep(interval)
        await client.drain()
        stats = client.stats
        print(f"DONE {n} connections={stats.connections} dropped={stats.dropped}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://HOST:PORT")
    parser.add_argument("--store", type=Path, required=True, help="session directory")
    parser.add_argument("--device", default="sensor-1", help="client id and topic segment")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between readings")
    parser.add_argument("--count", type=int, help="stop after this many readings")
    args = parser.parse_args()
    host, port = parse_broker(args.broker)
    asyncio.run(run(host, port, args.store, args.device, args.interval, args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
