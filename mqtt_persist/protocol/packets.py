"""MQTT control packets as plain data.

These classes carry no behaviour: the codec turns them into bytes and back, the session state
machine consumes and produces them. Field names follow the MQTT 3.1.1 specification; the
``properties`` slots are kept for MQTT 5 so that the codec and session can grow into it without
changing these shapes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class PacketType(enum.IntEnum):
    """The control packet types of MQTT 3.1.1 §2.2.1 (AUTH is MQTT 5 only)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnectReturnCode(enum.IntEnum):
    """CONNACK return codes of MQTT 3.1.1 §3.2.2.3."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


#: SUBACK return code meaning the broker refused that subscription.
SUBACK_FAILURE = 0x80

#: MQTT 3.1.1 protocol level.
MQTT_3_1_1 = 4


@dataclass(slots=True)
class Will:
    """The message the broker publishes when the client disappears without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(slots=True)
class Connect:
    client_id: str
    clean_session: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    protocol_level: int = MQTT_3_1_1
    protocol_name: str = "MQTT"


@dataclass(slots=True)
class ConnAck:
    session_present: bool
    return_code: int


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    #: None for QoS 0, 1..65535 otherwise.
    packet_id: int | None = None


@dataclass(slots=True)
class PubAck:
    packet_id: int


@dataclass(slots=True)
class PubRec:
    packet_id: int


@dataclass(slots=True)
class PubRel:
    packet_id: int


@dataclass(slots=True)
class PubComp:
    packet_id: int


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    #: (topic filter, requested QoS) pairs; never empty on the wire.
    subscriptions: list[tuple[str, int]] = field(default_factory=list)


@dataclass(slots=True)
class SubAck:
    packet_id: int
    #: One per requested filter: the granted QoS 0..2, or SUBACK_FAILURE.
    return_codes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    filters: list[str] = field(default_factory=list)


@dataclass(slots=True)
class UnsubAck:
    packet_id: int


@dataclass(slots=True)
class PingReq:
    pass


@dataclass(slots=True)
class PingResp:
    pass


@dataclass(slots=True)
class Disconnect:
    pass


Packet = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
)
