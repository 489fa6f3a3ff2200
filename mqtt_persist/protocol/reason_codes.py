"""MQTT 5 reason codes (§2.4) and which packet may carry which."""

from __future__ import annotations

import enum
from typing import Final

from mqtt_persist.protocol.packets import PacketType


class ReasonCode(enum.IntEnum):
    """Every MQTT 5 reason code, named as in the specification's table 2-6.

    Values below 0x80 report success (or a successful special case), values from 0x80 report a
    failure. Several names share a value (0x00 is Success, Normal disconnection and Granted
    QoS 0); the enum keeps the first as the canonical member and the others as aliases.
    """

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2

    @property
    def is_failure(self) -> bool:
        """True for 0x80 and above: the operation the packet answers did not succeed."""
        return self >= 0x80


def is_failure(code: int) -> bool:
    """Whether a reason code (any int, e.g. a decoded SUBACK entry) reports a failure."""
    return code >= 0x80


def _codes(hex_values: str) -> frozenset[int]:
    return frozenset(int(x, 16) for x in hex_values.split())


_ACK_CODES: Final = _codes("00 10 80 83 87 90 91 97 99")
_RELEASE_CODES: Final = _codes("00 92")

#: The reason codes each packet type may carry (MQTT 5 §3.x.2.1 and table 2-6; where the two
#: disagree, 0x99 in CONNACK and 0x8C in DISCONNECT, the union is taken, so that we never refuse
#: a code one of them allows).
VALID_REASON_CODES: Final[dict[PacketType, frozenset[int]]] = {
    PacketType.CONNACK: _codes("00 80 81 82 83 84 85 86 87 88 89 8A 8C 90 95 97 99 9A 9B 9C 9D 9F"),
    PacketType.PUBACK: _ACK_CODES,
    PacketType.PUBREC: _ACK_CODES,
    PacketType.PUBREL: _RELEASE_CODES,
    PacketType.PUBCOMP: _RELEASE_CODES,
    PacketType.SUBACK: _codes("00 01 02 80 83 87 8F 91 97 9E A1 A2"),
    PacketType.UNSUBACK: _codes("00 11 80 83 87 8F 91"),
    PacketType.DISCONNECT: _codes(
        "00 04 80 81 82 83 87 89 8B 8C 8D 8E 8F 90 93 94 95 96 97 98 99 9A 9B 9C 9D 9E 9F A0 A1 A2"
    ),
    PacketType.AUTH: _codes("00 18 19"),
}

#: ``ReasonCode`` members by value, for the decoder (a tuple index instead of an enum lookup).
BY_VALUE: Final[tuple[ReasonCode | None, ...]] = tuple(
    ReasonCode(v) if v in ReasonCode._value2member_map_ else None for v in range(256)
)

#: Names whose spelling the enum member's name does not give.
_SPEC_SPELLING: Final = {
    0x01: "Granted QoS 1",
    0x02: "Granted QoS 2",
    0x19: "Re-authenticate",
    0x9B: "QoS not supported",
}

_NAMES_BY_PACKET: Final = {
    (PacketType.DISCONNECT, 0x00): "Normal disconnection",
    (PacketType.SUBACK, 0x00): "Granted QoS 0",
}


def describe_reason_code(code: int, packet_type: PacketType) -> str:
    """The specification's name of ``code`` in ``packet_type``, e.g. ``"Quota exceeded (0x97)"``.

    Meant for error messages and logs; a code the packet may not carry is described as such.
    """
    name = _NAMES_BY_PACKET.get((packet_type, code))
    if name is None:
        member = BY_VALUE[code] if 0 <= code <= 0xFF else None
        if member is None or code not in VALID_REASON_CODES.get(packet_type, ()):
            return f"reason code 0x{code:02x} (not valid in {packet_type.name})"
        name = _SPEC_SPELLING.get(code) or member.name.replace("_", " ").capitalize()
    return f"{name} (0x{code:02x})"
