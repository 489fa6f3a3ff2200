"""MQTT control packets as plain data, for MQTT 3.1.1 and MQTT 5.

These classes carry no behaviour: the codec turns them into bytes and back, the session state
machine consumes and produces them. One class per packet type serves both protocol versions:
the fields MQTT 5 adds (``properties``, reason codes) come last and default to "absent", so code
written for 3.1.1 constructs and reads the packets exactly as before, and the codec refuses to
encode an MQTT 5 field into a 3.1.1 packet rather than drop it silently.

Field names follow MQTT 3.1.1 where the field already existed there: ``Connect.clean_session``
is MQTT 5's Clean Start flag (alias ``clean_start``), ``ConnAck.return_code`` and
``SubAck.return_codes`` hold MQTT 5 reason codes (aliases ``reason_code``, ``reason_codes``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple


class PacketType(enum.IntEnum):
    """The control packet types of MQTT 5 §2.1.2 (AUTH exists only in MQTT 5)."""

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
    AUTH = 15


class ProtocolVersion(enum.IntEnum):
    """The protocol level a CONNECT announces; the codec takes it to choose the wire format."""

    V31 = 3
    V311 = 4
    V5 = 5


class ConnectReturnCode(enum.IntEnum):
    """CONNACK return codes of MQTT 3.1.1 §3.2.2.3 (MQTT 5 uses :class:`ReasonCode` instead)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


#: SUBACK return code meaning the broker refused that subscription (any code >= 0x80 in MQTT 5).
SUBACK_FAILURE = 0x80

#: MQTT 3.1.1 protocol level.
MQTT_3_1_1 = 4
#: MQTT 5 protocol level.
MQTT_5 = 5


class Properties(NamedTuple):
    """The MQTT 5 properties of one packet (§2.2.2), typed; absent ones are None or ``()``.

    One class serves every packet type; the codec refuses a property the packet type does not
    allow (§2.2.2.2) when encoding, and rejects it as malformed when decoding. Fields appear in
    property-identifier order, which is also the order they are encoded in. Immutable (build a
    changed copy with ``_replace``) and cheap, so that the shared empty value
    :data:`NO_PROPERTIES` can be every packet's default. ``bool(props)`` is False when no
    property is set. Compare Properties with Properties: being a tuple, it also equals a plain
    tuple of the same values.
    """

    #: 0x01 PUBLISH, will: 0 = unspecified bytes, 1 = UTF-8 text.
    payload_format_indicator: int | None = None
    #: 0x02 PUBLISH, will: seconds the message lives (0..2**32-1).
    message_expiry_interval: int | None = None
    #: 0x03 PUBLISH, will: a MIME type, by convention.
    content_type: str | None = None
    #: 0x08 PUBLISH, will: the topic a request's answer is to be published to.
    response_topic: str | None = None
    #: 0x09 PUBLISH, will: opaque data that ties an answer to its request.
    correlation_data: bytes | None = None
    #: 0x0B PUBLISH (several), SUBSCRIBE (at most one): 1..268,435,455.
    subscription_identifiers: tuple[int, ...] = ()
    #: 0x11 CONNECT, CONNACK, DISCONNECT: seconds the session outlives the connection.
    session_expiry_interval: int | None = None
    #: 0x12 CONNACK: the client id the server made up for an empty one.
    assigned_client_identifier: str | None = None
    #: 0x13 CONNACK: the keepalive the server imposes, in seconds.
    server_keep_alive: int | None = None
    #: 0x15 CONNECT, CONNACK, AUTH: the extended authentication method.
    authentication_method: str | None = None
    #: 0x16 CONNECT, CONNACK, AUTH: data of the authentication method.
    authentication_data: bytes | None = None
    #: 0x17 CONNECT: may the server send reason strings and user properties on failures.
    request_problem_information: bool | None = None
    #: 0x18 will: seconds the server waits before publishing the will.
    will_delay_interval: int | None = None
    #: 0x19 CONNECT: ask the server for response information in CONNACK.
    request_response_information: bool | None = None
    #: 0x1A CONNACK: basis for response topics.
    response_information: str | None = None
    #: 0x1C CONNACK, DISCONNECT: another server to use.
    server_reference: str | None = None
    #: 0x1F every acknowledgement, DISCONNECT, AUTH: human-readable diagnostics.
    reason_string: str | None = None
    #: 0x21 CONNECT, CONNACK: how many QoS 1/2 PUBLISHes the sender accepts unacknowledged.
    receive_maximum: int | None = None
    #: 0x22 CONNECT, CONNACK: the highest topic alias the sender accepts (0 = none).
    topic_alias_maximum: int | None = None
    #: 0x23 PUBLISH: 1..65535, stands for the topic on this connection.
    topic_alias: int | None = None
    #: 0x24 CONNACK: the highest QoS the server supports, 0 or 1 (absent = 2).
    maximum_qos: int | None = None
    #: 0x25 CONNACK: whether the server supports retained messages.
    retain_available: bool | None = None
    #: 0x26 every packet with properties but PINGs: (name, value) pairs, in order, repeatable.
    user_properties: tuple[tuple[str, str], ...] = ()
    #: 0x27 CONNECT, CONNACK: the largest packet, in bytes, the sender accepts.
    maximum_packet_size: int | None = None
    #: 0x28 CONNACK: whether the server supports wildcard subscriptions.
    wildcard_subscription_available: bool | None = None
    #: 0x29 CONNACK: whether the server supports subscription identifiers.
    subscription_identifier_available: bool | None = None
    #: 0x2A CONNACK: whether the server supports shared subscriptions.
    shared_subscription_available: bool | None = None

    def __bool__(self) -> bool:
        return self != NO_PROPERTIES

    def __repr__(self) -> str:
        shown = (
            f"{name}={value!r}"
            for name, value, default in zip(self._fields, self, NO_PROPERTIES, strict=True)
            if value != default
        )
        return f"Properties({', '.join(shown)})"


#: No property at all: the default of every packet's ``properties``.
NO_PROPERTIES: Final = Properties()


class RetainHandling(enum.IntEnum):
    """When the server sends retained messages for a new subscription (MQTT 5 §3.8.3.1)."""

    SEND_ON_SUBSCRIBE = 0
    SEND_IF_NEW_SUBSCRIPTION = 1
    DO_NOT_SEND = 2


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """One filter's subscription options (MQTT 5 §3.8.3.1); only ``qos`` exists in 3.1.1."""

    qos: int = 0
    #: Do not send this client's own publications back to it.
    no_local: bool = False
    #: Keep the RETAIN flag of forwarded messages as the publisher set it.
    retain_as_published: bool = False
    retain_handling: int = RetainHandling.SEND_ON_SUBSCRIBE

    def to_byte(self) -> int:
        """The options byte; :class:`ValueError` if a value is out of range."""
        if self.qos not in (0, 1, 2):
            raise ValueError(f"subscription qos must be 0, 1 or 2, got {self.qos!r}")
        if self.retain_handling not in (0, 1, 2):
            raise ValueError(f"retain_handling must be 0, 1 or 2, got {self.retain_handling!r}")
        return (
            self.qos
            | (4 if self.no_local else 0)
            | (8 if self.retain_as_published else 0)
            | (self.retain_handling << 4)
        )

    @classmethod
    def from_byte(cls, value: int) -> SubscriptionOptions:
        """Parse an options byte; ValueError for reserved bits, QoS 3 or retain handling 3."""
        if value & 0xC0 or not 0 <= value <= 0xFF:
            raise ValueError(f"subscription options byte 0x{value:02x} has reserved bits set")
        if value & 3 == 3:
            raise ValueError(f"subscription options byte 0x{value:02x} requests QoS 3")
        if value >> 4 == 3:
            raise ValueError(f"subscription options byte 0x{value:02x} has retain handling 3")
        return cls(value & 3, bool(value & 4), bool(value & 8), RetainHandling(value >> 4))


@dataclass(slots=True)
class Will:
    """The message the broker publishes when the client disappears without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    #: MQTT 5 will properties (will delay, message expiry, content type, ...).
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Connect:
    """CONNECT. Its ``protocol_level`` chooses the wire format: 5 is MQTT 5, else 3.1.1."""

    client_id: str
    #: Clean Session in 3.1.1, Clean Start in MQTT 5 (the session's lifetime is then the
    #: Session Expiry Interval property).
    clean_session: bool = True
    keepalive: int = 60
    username: str | None = None
    #: Never in repr(): a repr ends up in tracebacks and debug lines.
    password: bytes | None = field(default=None, repr=False)
    will: Will | None = None
    protocol_level: int = MQTT_3_1_1
    protocol_name: str = "MQTT"
    properties: Properties = NO_PROPERTIES

    @property
    def clean_start(self) -> bool:
        """MQTT 5's name for ``clean_session``."""
        return self.clean_session


@dataclass(slots=True)
class ConnAck:
    """CONNACK. ``return_code`` is the 3.1.1 return code or the MQTT 5 reason code."""

    session_present: bool
    return_code: int
    properties: Properties = NO_PROPERTIES

    @property
    def reason_code(self) -> int:
        """MQTT 5's name for ``return_code``."""
        return self.return_code


@dataclass(slots=True)
class Publish:
    """PUBLISH. In MQTT 5 the topic may be empty when a Topic Alias property stands for it."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    #: None for QoS 0, 1..65535 otherwise.
    packet_id: int | None = None
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class PubAck:
    """PUBACK; the reason code (MQTT 5) says whether the server took the message."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class PubRec:
    """PUBREC; a reason code >= 0x80 (MQTT 5) ends the QoS 2 flow there."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class PubRel:
    """PUBREL; reason code 0x92 (MQTT 5) means the packet id was not found."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class PubComp:
    """PUBCOMP; reason code 0x92 (MQTT 5) means the packet id was not found."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Subscribe:
    """SUBSCRIBE. A plain int in a pair is the requested QoS with default options."""

    packet_id: int
    #: (topic filter, requested QoS or MQTT 5 options) pairs; never empty on the wire. The
    #: 3.1.1 decoder yields ints, the MQTT 5 decoder :class:`SubscriptionOptions`.
    subscriptions: Sequence[tuple[str, int | SubscriptionOptions]] = field(default_factory=list)
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class SubAck:
    """SUBACK: one return code (3.1.1) or reason code (MQTT 5) per requested filter."""

    packet_id: int
    #: One per requested filter: the granted QoS 0..2, or a failure (>= 0x80).
    return_codes: list[int] = field(default_factory=list)
    properties: Properties = NO_PROPERTIES

    @property
    def reason_codes(self) -> list[int]:
        """MQTT 5's name for ``return_codes``."""
        return self.return_codes


@dataclass(slots=True)
class Unsubscribe:
    """UNSUBSCRIBE."""

    packet_id: int
    filters: list[str] = field(default_factory=list)
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class UnsubAck:
    """UNSUBACK; MQTT 5 adds one reason code per filter (3.1.1 has none: leave it empty)."""

    packet_id: int
    reason_codes: list[int] = field(default_factory=list)
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class PingReq:
    """PINGREQ."""


@dataclass(slots=True)
class PingResp:
    """PINGRESP."""


@dataclass(slots=True)
class Disconnect:
    """DISCONNECT; MQTT 5 lets either side give a reason code and properties."""

    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Auth:
    """AUTH (MQTT 5 only): a step of extended authentication."""

    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


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
    | Auth
)
