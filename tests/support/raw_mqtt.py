"""A blocking MQTT 3.1.1 client that shows the broker's raw answers, packet by packet.

paho hides what a broker answered (a QoS 2 PUBLISH "completes" whether the broker sent PUBREC
or something else); the broker fixtures and the broker-fact tests need to see the packets
themselves: which acknowledgement came back, or whether the broker simply closed the
connection. It speaks through our codec (cross-checked against paho in tests/test_codec.py).
"""

from __future__ import annotations

import contextlib
import socket
import time
from types import TracebackType
from typing import Literal, Self

from mqtt_persist.protocol.codec import Decoder, encode
from mqtt_persist.protocol.packets import ConnAck, Connect, Disconnect, Packet, Publish, Subscribe

__all__ = ["CLOSED", "TIMEOUT", "Answer", "RawMqtt", "answers_connect"]

#: What :meth:`RawMqtt.receive` returns instead of a packet.
CLOSED: Literal["closed"] = "closed"
TIMEOUT: Literal["timeout"] = "timeout"
Answer = Packet | Literal["closed", "timeout"]


class RawMqtt:
    """One TCP connection; :meth:`connect` sends CONNECT and returns the broker's answer."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0) -> None:
        self._sock = socket.create_connection((host, port), timeout)
        self._decoder = Decoder()
        self._pending: list[Packet] = []
        self.closed = False

    def connect(
        self,
        client_id: str,
        *,
        clean_session: bool = True,
        keepalive: int = 60,
        protocol_level: int = 4,
        timeout: float = 5.0,
    ) -> Answer:
        """Send CONNECT (level 3 is MQTT 3.1, named "MQIsdp"; 4 is 3.1.1; 5 is MQTT 5)."""
        name = "MQIsdp" if protocol_level == 3 else "MQTT"
        self.send(
            Connect(
                client_id=client_id,
                clean_session=clean_session,
                keepalive=keepalive,
                protocol_level=protocol_level,
                protocol_name=name,
            )
        )
        return self.receive(timeout)

    def send(self, *packets: Packet) -> None:
        for packet in packets:
            self._sock.sendall(encode(packet))

    def publish(self, topic: str, payload: bytes, qos: int, packet_id: int = 1) -> None:
        self.send(Publish(topic, payload, qos=qos, packet_id=packet_id if qos else None))

    def subscribe(self, *filters: tuple[str, int], packet_id: int = 1) -> Answer:
        """SUBSCRIBE and return the next packet (SUBACK, unless the broker had more to say)."""
        self.send(Subscribe(packet_id, list(filters)))
        return self.receive()

    def receive(self, timeout: float = 5.0) -> Answer:
        """The next packet, ``CLOSED`` once the broker closed the connection, or ``TIMEOUT``."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            if self.closed:
                return CLOSED
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return TIMEOUT
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                return TIMEOUT
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                continue
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    def unread(self, packets: list[Answer]) -> None:
        """Put packets back, to be returned again (in order) by the next receives."""
        self._pending[:0] = [p for p in packets if not isinstance(p, str)]

    def receive_all(
        self, quiet: float = 0.3, *, at_least: int = 0, timeout: float = 10.0
    ) -> list[Answer]:
        """Every packet until the broker has been quiet for ``quiet`` seconds (or closed).

        With ``at_least=n`` it first waits (up to ``timeout``) for n packets, so a slow broker
        cannot end the collection early; ``quiet`` then catches any extra ones.
        """
        packets: list[Answer] = []
        deadline = time.monotonic() + timeout
        while True:
            wait = quiet if len(packets) >= at_least else max(0.0, deadline - time.monotonic())
            packet = self.receive(wait)
            if packet == TIMEOUT:
                return packets
            packets.append(packet)
            if packet == CLOSED:
                return packets

    def drop(self) -> None:
        """Close the socket without DISCONNECT, as a client that vanished (the will fires)."""
        self._sock.close()
        self.closed = True

    def close(self) -> None:
        """DISCONNECT (if still open) and close the socket."""
        if not self.closed:
            with contextlib.suppress(OSError):
                self.send(Disconnect())
        self._sock.close()
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def answers_connect(host: str, port: int, client_id: str, timeout: float = 2.0) -> bool:
    """True when a broker on ``port`` answers CONNECT with an accepting CONNACK.

    This is the readiness check for brokers whose listener opens before they can serve (a
    RabbitMQ node still booting plugins, a nats-server still creating its JetStream streams).
    """
    try:
        with RawMqtt(host, port, timeout=timeout) as client:
            answer = client.connect(client_id, timeout=timeout)
    except OSError:
        return False
    return isinstance(answer, ConnAck) and answer.return_code == 0
