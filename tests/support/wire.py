"""MQTT packets as the test proxy sees them on the wire: framing and a shallow parse.

Deliberately independent of ``mqtt_persist.protocol``: the fault tests judge what the client
wrote, so they must not read it with the client's own decoder. Only what the tests need is
parsed: the packet type and flags, the packet identifier of the flows, and a PUBLISH's topic
and payload (MQTT 3.1.1, and 5 once :class:`Framer` saw a CONNECT with protocol level 5, whose
PUBLISH carries properties between the packet identifier and the payload).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONNACK",
    "CONNECT",
    "PUBACK",
    "PUBCOMP",
    "PUBLISH",
    "PUBREC",
    "PUBREL",
    "Framer",
    "WirePacket",
    "packet_type",
]

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
NAMES = {
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
    15: "AUTH",
}
_BY_NAME = {name: number for number, name in NAMES.items()}
#: Packets whose variable header starts with a packet identifier.
_WITH_ID = frozenset({PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK})


def packet_type(name: str | int) -> int:
    """``"PUBREC"`` -> 5; an int is returned as it is."""
    if isinstance(name, int):
        return name
    try:
        return _BY_NAME[name.upper()]
    except KeyError:
        raise ValueError(f"unknown MQTT packet type {name!r}") from None


@dataclass(frozen=True, slots=True)
class WirePacket:
    """One whole packet that crossed the proxy, parsed only as deep as the tests need."""

    #: Which proxied connection (FaultProxy numbers them from 1) and which way it went.
    link: int
    direction: str
    #: Position among every packet the proxy saw, all connections and directions together.
    index: int
    type: int
    flags: int
    raw: bytes
    packet_id: int | None = None
    topic: str | None = None
    payload: bytes | None = None

    @property
    def name(self) -> str:
        return NAMES.get(self.type, f"type {self.type}")

    @property
    def qos(self) -> int:
        """A PUBLISH's QoS (0 for every other packet)."""
        return (self.flags >> 1) & 3 if self.type == PUBLISH else 0

    @property
    def dup(self) -> bool:
        """A PUBLISH's DUP flag."""
        return self.type == PUBLISH and bool(self.flags & 8)

    def __repr__(self) -> str:
        detail = f" id={self.packet_id}" if self.packet_id is not None else ""
        if self.type == PUBLISH:
            detail += f" qos={self.qos}{' dup' if self.dup else ''} {self.topic!r} {self.payload!r}"
        return f"<{self.direction} #{self.link} {self.name}{detail}>"


class Framer:
    """Splits one direction of one connection into whole packets.

    Feed it the bytes as they come; it yields each complete packet's bytes and keeps a partial
    one for the next call. ``broken`` turns True (and everything is passed through as one
    chunk from then on) if the stream stops looking like MQTT.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.broken = False
        #: Protocol level seen in a CONNECT on this stream or its peer (4 = 3.1.1, 5 = MQTT 5).
        self.level = 4

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self.broken:
            yield data
            return
        buffer = self._buffer
        buffer += data
        while True:
            header = _fixed_header(buffer)
            if header is None:
                return
            if header == -1:
                self.broken = True
                rest = bytes(buffer)
                buffer.clear()
                yield rest
                return
            total = header
            if len(buffer) < total:
                return
            packet = bytes(buffer[:total])
            del buffer[:total]
            yield packet


def _fixed_header(buffer: bytearray) -> int | None:
    """Total length of the packet at the start of ``buffer``, None if unknown yet, -1 if bad."""
    if len(buffer) < 2:
        return None
    multiplier, length = 1, 0
    for i in range(1, 5):
        if i >= len(buffer):
            return None
        byte = buffer[i]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return 1 + i + length
        multiplier *= 128
    return -1


def _body_start(raw: bytes) -> int:
    i = 1
    while raw[i] & 0x80:
        i += 1
    return i + 1


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def parse(raw: bytes, *, link: int, direction: str, index: int, level: int = 4) -> WirePacket:
    """A :class:`WirePacket` from one whole packet's bytes (fields it cannot read stay None)."""
    kind, flags = raw[0] >> 4, raw[0] & 0x0F
    body = raw[_body_start(raw) :]

    def packet(**fields: Any) -> WirePacket:
        return WirePacket(link, direction, index, kind, flags, raw, **fields)

    try:
        if kind == PUBLISH:
            topic_len = int.from_bytes(body[0:2], "big")
            at = 2 + topic_len
            topic = body[2:at].decode("utf-8", "replace")
            packet_id = None
            if (flags >> 1) & 3:
                packet_id = int.from_bytes(body[at : at + 2], "big")
                at += 2
            if level == 5:
                props, at = _varint(body, at)
                at += props
            return packet(packet_id=packet_id, topic=topic, payload=bytes(body[at:]))
        if kind in _WITH_ID and len(body) >= 2:
            return packet(packet_id=int.from_bytes(body[0:2], "big"))
    except (IndexError, ValueError):
        pass
    return packet()


def connect_level(raw: bytes) -> int | None:
    """The protocol level of a CONNECT packet (4 or 5), or None if it is not one."""
    if raw[0] >> 4 != CONNECT:
        return None
    body = raw[_body_start(raw) :]
    try:
        name_len = int.from_bytes(body[0:2], "big")
        return body[2 + name_len]
    except IndexError:
        return None
