"""A store-and-forward gateway: messages from a local broker, forwarded to an upstream one.

    python examples/edge_gateway.py --local mqtt://127.0.0.1:1883 \\
        --upstream mqtt://broker.example:1883 --store /var/lib/gateway --topic 'sensors/#'

The local side acknowledges manually (``ack="manual"``): a message is acknowledged to the local
broker only once ``publish()`` on the upstream side returned, i.e. once it is in the upstream
client's durable store (write-ahead). The upstream client then delivers it whenever the uplink
is up, across outages and restarts. So a crash at any moment loses nothing: an unacknowledged
local message is sent again by the local broker.

What is left is the moment between the two commits: forwarded (stored upstream) but not yet
acknowledged locally. A crash there makes the local broker resend a message the upstream side
already has. For QoS 2 that would be a duplicate end to end, so the gateway keeps a one-entry
*forward log* (``forward.json``, replaced atomically) around each message:

1. ``pending``: about to forward the local message with packet ID P, under forward number N
   (carried upstream as the MQTT 5 user property ``gateway-forward``);
2. ``forwarded``: ``publish()`` returned;
3. ``idle``: the local acknowledgement is durable.

After a restart, a ``pending`` entry counts as forwarded if the upstream store holds a message
with forward number N (nothing can have left that store between its commit and step 2: the
process was dead). A forwarded message is then *awaited*: the log keeps its packet ID P and a
digest of its topic and payload, and when the local broker delivers it again (packet ID P, the
DUP flag, the same digest) it is acknowledged without forwarding it a second time. It is
awaited whenever it comes, not only first: a broker may resend other messages ahead of it
(mosquitto 2.0.11 reorders), and one that already had our PUBREC never resends it, so the wait
ends after ``AWAIT_LIMIT`` more messages (a packet ID comes back only after 65,535 others).

Both brokers need to keep this gateway's sessions (mosquitto does by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mqtt_persist import Backoff, FileStore, Message, PersistentClient, Properties
from mqtt_persist.cli.demo import parse_broker
from mqtt_persist.protocol.packets import PacketType
from mqtt_persist.protocol.properties import decode_properties

LOCAL_ID = "gateway-local"
UPSTREAM_ID = "gateway-upstream"
FORWARD_PROPERTY = "gateway-forward"
#: Messages after which an awaited redelivery is given up (see the module docstring).
AWAIT_LIMIT = 1000


class ForwardLog:
    """The gateway's one-entry log, replaced atomically (write, fsync, rename).

    Written synchronously on purpose: no other task runs between ``publish()`` returning and
    the ``forwarded`` entry being durable, so the upstream client cannot complete (and remove)
    the message in between; that is what makes ``recover`` right.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entry: dict[str, Any] = {"state": "idle", "next": 1}
        if path.exists():
            self.entry = json.loads(path.read_text())

    def write(self, **entry: Any) -> None:
        """Replace the entry; ``next`` (the next forward number) and ``awaiting`` (a forwarded
        message its local broker may deliver again) carry over unless given."""
        carried = {"next": self.entry["next"], "awaiting": self.entry.get("awaiting", [])}
        self.entry = {**carried, **entry}
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self.entry, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def digest(message: Message) -> str:
    return hashlib.sha256(message.topic.encode() + b"\0" + message.payload).hexdigest()


def forward_number(properties: bytes) -> int | None:
    """The ``gateway-forward`` user property of a stored upstream message, if any."""
    if not properties:
        return None
    for key, value in decode_properties(properties, PacketType.PUBLISH).user_properties:
        if key == FORWARD_PROPERTY:
            return int(value)
    return None


async def recover(log: ForwardLog, upstream_store: Path) -> None:
    """Settle a ``pending`` entry left by a crash: was that forward committed upstream?"""
    entry = log.entry
    if entry["state"] != "pending":
        return
    async with FileStore(upstream_store) as store:
        state = await store.load(UPSTREAM_ID)
    stored = state.messages.values() if state is not None else ()
    committed = any(forward_number(m.properties) == entry["n"] for m in stored)
    if committed:
        log.write(state="forwarded", packet_id=entry["packet_id"], digest=entry["digest"])
    else:
        log.write(state="idle")


def await_redelivery(log: ForwardLog) -> None:
    """After a restart: a message that was forwarded but maybe not acknowledged locally is
    awaited (its redelivery acknowledged, not forwarded), however late it comes."""
    entry = log.entry
    if entry["state"] == "forwarded":
        awaited = {"packet_id": entry["packet_id"], "digest": entry["digest"], "left": AWAIT_LIMIT}
        log.write(state="idle", awaiting=[*entry.get("awaiting", []), awaited])


async def run(local: tuple[str, int], upstream: tuple[str, int], store: Path, topic: str) -> None:
    log = ForwardLog(store / "forward.json")
    await recover(log, store / "upstream")
    await_redelivery(log)
    backoff = Backoff(initial=0.05, maximum=1.0)
    async with (
        PersistentClient(
            *upstream, client_id=UPSTREAM_ID, store=FileStore(store / "upstream"), backoff=backoff
        ) as up,
        PersistentClient(
            *local,
            client_id=LOCAL_ID,
            store=FileStore(store / "local"),
            ack="manual",
            max_unread_messages=100,
            backoff=backoff,
        ) as down,
    ):
        # Stored at once (and restored by every later run); waiting for the SUBACK only tells
        # whoever started us that the local broker now keeps messages for the gateway.
        await (await down.subscribe(topic, qos=2))
        print("READY", flush=True)
        async for message in down.messages:
            entry = log.entry
            awaiting = entry.get("awaiting", [])
            match = None
            if message.qos and message.dup:
                match = next(
                    (
                        a
                        for a in awaiting
                        if a["packet_id"] == message.packet_id and a["digest"] == digest(message)
                    ),
                    None,
                )
            if awaiting and message.qos:
                # Each awaited redelivery is given up after AWAIT_LIMIT other messages.
                rest = [{**a, "left": a["left"] - 1} for a in awaiting if a is not match]
                log.write(state=entry["state"], awaiting=[a for a in rest if a["left"] > 0])
            if match is not None:
                print(f"ALREADY {message.payload.decode(errors='replace')}", flush=True)
            elif message.qos == 0:
                await up.publish(message.topic, message.payload, 0, message.retain)
            else:
                n = entry["next"]
                # A forward number is never used twice, also across crashes: stored with it.
                log.write(
                    state="pending",
                    next=n + 1,
                    n=n,
                    packet_id=message.packet_id,
                    digest=digest(message),
                )
                await up.publish(
                    message.topic,
                    message.payload,
                    message.qos,
                    message.retain,
                    properties=Properties(user_properties=((FORWARD_PROPERTY, str(n)),)),
                )
                log.write(state="forwarded", packet_id=message.packet_id, digest=digest(message))
            await message.ack()
            if log.entry["state"] != "idle":
                log.write(state="idle")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local", required=True, help="mqtt://HOST:PORT of the local broker")
    parser.add_argument("--upstream", required=True, help="mqtt://HOST:PORT upstream")
    parser.add_argument("--store", type=Path, required=True, help="the gateway's directory")
    parser.add_argument("--topic", default="sensors/#", help="what to forward")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.store.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(parse_broker(args.local), parse_broker(args.upstream), args.store,
                        args.topic))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
