"""CPU per message of the sans-IO pipeline over MQTT 3.1.1 and over MQTT 5, side by side.

    .venv/bin/python benchmarks/protocol_micro.py                 # ~1 min
    .venv/bin/python benchmarks/protocol_micro.py --count 50000 --rounds 9

What MQTT 5 costs the client itself, without the broker, the network or the machine's other
load in the figure: one process drives ``Session`` and the codec the way the flusher and the
reader do, for each protocol in turn (rounds alternate, so both see the same load), and
reports microseconds per message, best and median round, and the ratio MQTT 5 / 3.1.1 (issue 8:
at most 1.10). Per message: ``publish()``, ``take()``, ``encode()`` of the PUBLISH in the
connection's protocol, the broker's acknowledgement(s) through a ``Decoder`` of that protocol
into ``receive()``, ``take()`` (and for QoS 2 the PUBREL encoded, PUBCOMP decoded). Windowed:
100 messages at a time, as under concurrent publishing. ``props`` publishes every message with
user properties and a message expiry (MQTT 5 only; the cost of using the features).
"""

from __future__ import annotations

import argparse
import statistics
import time

from mqtt_persist.protocol import (
    ConnAck,
    Decoder,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    encode,
)
from mqtt_persist.session.machine import Session, SessionConfig

WINDOW = 100
PAYLOAD = b"x" * 64


def run(version: int, qos: int, count: int, props: bool = False) -> float:
    """Seconds per message for ``count`` messages at ``qos`` over ``version``."""
    session = Session(SessionConfig(client_id="bench", max_inflight=WINDOW))
    session.connect(0.0, version)
    session.take(0.0)
    session.receive(ConnAck(False, 0))
    session.take(0.0)
    decoder = Decoder(protocol_version=version)
    properties = Properties(user_properties=(("k", "v"),)) if props else None
    expires_at = time.time() + 3600 if props else None
    publish, take, receive, feed = session.publish, session.take, session.receive, decoder.feed
    answer = {1: PubAck, 2: PubRec}
    start = time.perf_counter()
    for _ in range(count // WINDOW):
        for _ in range(WINDOW):
            if properties is None:
                publish("bench/t", PAYLOAD, qos)
            else:
                publish("bench/t", PAYLOAD, qos, False, properties, expires_at)
        packets = take(1.0).packets
        while packets:  # the broker's side: answer each packet, until every flow ended
            wire = b"".join([encode(p, version) for p in packets])
            assert wire
            replies = b"".join(
                [
                    encode(
                        answer[p.qos](p.packet_id)  # type: ignore[arg-type]
                        if isinstance(p, Publish)
                        else PubComp(p.packet_id),  # type: ignore[union-attr]
                        version,
                    )
                    for p in packets
                ]
            )
            for packet in feed(replies):
                receive(packet)
            packets = take(1.0).packets
    elapsed = time.perf_counter() - start
    assert session.is_idle, "every flow must have completed"
    return elapsed / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30_000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    cases = [("QoS 1", 1, False), ("QoS 2", 2, False), ("QoS 1, properties + expiry", 1, True)]
    print(f"{args.rounds} rounds of {args.count} messages, window {WINDOW}; microseconds/message")
    print(f"{'':28} {'3.1.1 best':>10} {'MQTT 5 best':>11} {'ratio best':>10} {'ratio median':>12}")
    for name, qos, props in cases:
        v311: list[float] = []
        v5: list[float] = []
        for _ in range(args.rounds):
            v311.append(run(4, qos, args.count))
            v5.append(run(5, qos, args.count, props))
        ratios = [b / a for a, b in zip(v311, v5, strict=True)]
        print(
            f"{name:28} {min(v311) * 1e6:10.2f} {min(v5) * 1e6:11.2f} "
            f"{min(v5) / min(v311):10.2f} {statistics.median(ratios):12.2f}"
        )
    print("(issue 8 target: MQTT 5 / 3.1.1 at most 1.10 for plain messages)")


if __name__ == "__main__":
    main()
