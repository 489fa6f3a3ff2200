"""The MQTT 5 property codec (§2.2.2): which packet may carry which property, how often, with
which values, and their encoding.

The typed form is :class:`~mqtt_persist.protocol.packets.Properties`. Inside a packet the codec
calls :func:`_write_properties` / :func:`_read_properties`; :func:`encode_properties` and
:func:`decode_properties` are the same, public, for a store that keeps a message's properties
as bytes: ``decode_properties(encode_properties(p, t), t) == p`` for every valid ``p``, and
``encode_properties(decode_properties(b, t), t) == b`` for every ``b`` the encoder produced
(properties are encoded in identifier order, repeated ones in their given order).

Decoding checks everything the specification makes a Malformed Packet or Protocol Error:
unknown identifiers, a property the packet type does not allow, a repeated property (only User
Property may repeat, and Subscription Identifier in PUBLISH), out-of-range values (0 for
Receive Maximum, Maximum Packet Size, Topic Alias or Subscription Identifier; anything but 0/1
for the one-byte flags), values that run past the property block, and Authentication Data
without an Authentication Method. Every read is bounded by the property length, itself bounded
by the packet already in memory, so a flood of properties costs at most the bytes it occupies.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final, Literal

from mqtt_persist.errors import MalformedPacket
from mqtt_persist.protocol._wire import (
    _MAX_U16,
    _MAX_U32,
    _RL1,
    MAX_REMAINING_LENGTH,
    _binary,
    _read_binary,
    _read_str,
    _read_vbi,
    _remaining_length,
    _utf8,
)
from mqtt_persist.protocol.packets import NO_PROPERTIES, PacketType, Properties

__all__ = ["PropertyContext", "decode_properties", "encode_properties"]

#: Where a property block sits: a packet type, or ``"will"`` for the will properties of CONNECT.
PropertyContext = PacketType | Literal["will"]

#: The internal number of the will-properties context (packet types are 1..15).
_WILL: Final = 0

# Value kinds; the one-byte kinds are the smallest numbers (``kind <= _BIT``).
_FLAG: Final = 0  # one byte, 0 or 1, as bool
_BIT: Final = 1  # one byte, 0 or 1, as int
_U16K: Final = 2
_U32K: Final = 3
_VBI: Final = 4
_STR: Final = 5
_BIN: Final = 6
_PAIR: Final = 7

_P = PacketType
_ACKS: Final = (_P.PUBACK, _P.PUBREC, _P.PUBREL, _P.PUBCOMP, _P.SUBACK, _P.UNSUBACK)
_MESSAGE: Final = (_P.PUBLISH, _WILL)

#: identifier -> (field, name in the specification, kind, smallest value, contexts): MQTT 5
#: table 2-4.
_TABLE: Final[dict[int, tuple[str, str, int, int, tuple[int, ...]]]] = {
    0x01: ("payload_format_indicator", "Payload Format Indicator", _BIT, 0, _MESSAGE),
    0x02: ("message_expiry_interval", "Message Expiry Interval", _U32K, 0, _MESSAGE),
    0x03: ("content_type", "Content Type", _STR, 0, _MESSAGE),
    0x08: ("response_topic", "Response Topic", _STR, 0, _MESSAGE),
    0x09: ("correlation_data", "Correlation Data", _BIN, 0, _MESSAGE),
    0x0B: (
        "subscription_identifiers",
        "Subscription Identifier",
        _VBI,
        1,
        (_P.PUBLISH, _P.SUBSCRIBE),
    ),
    0x11: (
        "session_expiry_interval",
        "Session Expiry Interval",
        _U32K,
        0,
        (_P.CONNECT, _P.CONNACK, _P.DISCONNECT),
    ),
    0x12: ("assigned_client_identifier", "Assigned Client Identifier", _STR, 0, (_P.CONNACK,)),
    0x13: ("server_keep_alive", "Server Keep Alive", _U16K, 0, (_P.CONNACK,)),
    0x15: (
        "authentication_method",
        "Authentication Method",
        _STR,
        0,
        (_P.CONNECT, _P.CONNACK, _P.AUTH),
    ),
    0x16: (
        "authentication_data",
        "Authentication Data",
        _BIN,
        0,
        (_P.CONNECT, _P.CONNACK, _P.AUTH),
    ),
    0x17: ("request_problem_information", "Request Problem Information", _FLAG, 0, (_P.CONNECT,)),
    0x18: ("will_delay_interval", "Will Delay Interval", _U32K, 0, (_WILL,)),
    0x19: (
        "request_response_information",
        "Request Response Information",
        _FLAG,
        0,
        (_P.CONNECT,),
    ),
    0x1A: ("response_information", "Response Information", _STR, 0, (_P.CONNACK,)),
    0x1C: ("server_reference", "Server Reference", _STR, 0, (_P.CONNACK, _P.DISCONNECT)),
    0x1F: (
        "reason_string",
        "Reason String",
        _STR,
        0,
        (_P.CONNACK, *_ACKS, _P.DISCONNECT, _P.AUTH),
    ),
    0x21: ("receive_maximum", "Receive Maximum", _U16K, 1, (_P.CONNECT, _P.CONNACK)),
    0x22: ("topic_alias_maximum", "Topic Alias Maximum", _U16K, 0, (_P.CONNECT, _P.CONNACK)),
    0x23: ("topic_alias", "Topic Alias", _U16K, 1, (_P.PUBLISH,)),
    0x24: ("maximum_qos", "Maximum QoS", _BIT, 0, (_P.CONNACK,)),
    0x25: ("retain_available", "Retain Available", _FLAG, 0, (_P.CONNACK,)),
    0x26: (
        "user_properties",
        "User Property",
        _PAIR,
        0,
        (
            *(_P.CONNECT, _P.CONNACK, _P.PUBLISH, _WILL, *_ACKS),
            *(_P.SUBSCRIBE, _P.UNSUBSCRIBE, _P.DISCONNECT, _P.AUTH),
        ),
    ),
    0x27: ("maximum_packet_size", "Maximum Packet Size", _U32K, 1, (_P.CONNECT, _P.CONNACK)),
    0x28: (
        "wildcard_subscription_available",
        "Wildcard Subscription Available",
        _FLAG,
        0,
        (_P.CONNACK,),
    ),
    0x29: (
        "subscription_identifier_available",
        "Subscription Identifier Available",
        _FLAG,
        0,
        (_P.CONNACK,),
    ),
    0x2A: (
        "shared_subscription_available",
        "Shared Subscription Available",
        _FLAG,
        0,
        (_P.CONNACK,),
    ),
}

_FIELDS: Final = Properties._fields
_INDEX: Final = {name: i for i, name in enumerate(_FIELDS)}
# The Properties fields are the table's properties, in identifier order.
assert [spec[0] for spec in _TABLE.values()] == list(_FIELDS)

_USER: Final = _INDEX["user_properties"]
_SUB_IDS: Final = _INDEX["subscription_identifiers"]
_AUTH_METHOD: Final = _INDEX["authentication_method"]
_AUTH_DATA: Final = _INDEX["authentication_data"]
#: The fields that hold a tuple of values: User Property and Subscription Identifier.
_REPEATABLE: Final = frozenset((_USER, _SUB_IDS))

#: One property as the coders need it: identifier, Properties field index, name, kind, minimum.
_Spec = tuple[int, int, str, int, int]

#: Indexed by a property identifier's (first) byte.
_BY_ID: Final[tuple[_Spec | None, ...]] = tuple(
    (i, _INDEX[_TABLE[i][0]], *_TABLE[i][1:4]) if i in _TABLE else None for i in range(256)
)

#: Pseudo-context of :func:`encode_properties` without a packet type: any property, any count.
_ANY: Final = -1
_CONTEXTS: Final = (_ANY, _WILL, *range(1, 16))
#: context -> identifiers it allows.
_ALLOWED: Final[dict[int, frozenset[int]]] = {
    ctx: frozenset(i for i, spec in _TABLE.items() if ctx == _ANY or ctx in spec[4])
    for ctx in _CONTEXTS
}


def _context_name(ctx: int) -> str:
    return "will properties" if ctx == _WILL else PacketType(ctx).name


def _context_number(context: PropertyContext) -> int:
    if context == "will":
        return _WILL
    return PacketType(context).value


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

_BH = struct.Struct("!BH")
_BI = struct.Struct("!BI")


def _int_value(value: Any, lo: int, hi: int) -> int:
    if not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f" must be an int in {lo}..{hi}, got {value!r}")
    return value


# One encoder per kind: (identifier, smallest value, value) -> the property's bytes. A
# ValueError's message continues the property's name, which the caller adds.


def _encode_byte(ident: int, lo: int, value: Any) -> bytes:
    return bytes((ident, _int_value(value, 0, 1)))


def _encode_u16(ident: int, lo: int, value: Any) -> bytes:
    return _BH.pack(ident, _int_value(value, lo, _MAX_U16))


def _encode_u32(ident: int, lo: int, value: Any) -> bytes:
    return _BI.pack(ident, _int_value(value, lo, _MAX_U32))


def _encode_vbi(ident: int, lo: int, value: Any) -> bytes:
    return _RL1[ident] + _remaining_length(_int_value(value, lo, MAX_REMAINING_LENGTH))


def _encode_str(ident: int, lo: int, value: Any) -> bytes:
    return _RL1[ident] + _utf8(value, "")


def _encode_bin(ident: int, lo: int, value: Any) -> bytes:
    return _RL1[ident] + _binary(value, "")


def _encode_pair(ident: int, lo: int, value: Any) -> bytes:
    try:
        if isinstance(value, _TEXT):  # a two-character string would unpack as a pair
            raise TypeError
        name, text = value
    except (TypeError, ValueError):
        raise ValueError(f" must be a (name, value) pair of str, got {value!r}") from None
    return _RL1[ident] + _utf8(name, " name") + _utf8(text, " value")


_TEXT: Final = (str, bytes)
_SEQUENCES: Final = (tuple, list)

#: Indexed by kind.
_KIND_ENCODERS: Final[tuple[Callable[[int, int, Any], bytes], ...]] = (
    _encode_byte,  # _FLAG
    _encode_byte,  # _BIT
    _encode_u16,
    _encode_u32,
    _encode_vbi,
    _encode_str,
    _encode_bin,
    _encode_pair,
)


class _Plan:
    """How to encode the properties of one context, precomputed."""

    __slots__ = ("allowed", "context")

    def __init__(self, ctx: int) -> None:
        self.context = ctx
        #: (field index, encoder, identifier, smallest value, repeatable, name) of the
        #: properties the context may carry, in encoding (identifier) order.
        self.allowed = [
            (index, _KIND_ENCODERS[kind], ident, lo, index in _REPEATABLE, name)
            for ident, index, name, kind, lo in filter(None, _BY_ID)
            if ident in _ALLOWED[ctx]
        ]

    def refuse_misplaced(self, props: Properties, what: str) -> None:
        """Raise the ValueError for the first property set that the context does not allow."""
        for ident, index, name, _kind, _lo in filter(None, _BY_ID):
            if ident not in _ALLOWED[self.context] and props[index] not in (None, ()):
                raise ValueError(
                    f"{what}: property {name} is not allowed in {_context_name(self.context)} "
                    "(MQTT 5 §2.2.2.2)"
                )


_PLANS: Final = {ctx: _Plan(ctx) for ctx in _CONTEXTS}
_FIELD_COUNT: Final = len(Properties._fields)


def _property_list(props: Properties, ctx: int, what: str) -> bytes:
    """The encoded properties, without the length prefix; ValueError for what must not be sent."""
    if not isinstance(props, Properties):
        raise ValueError(f"{what}: properties must be a Properties, got {type(props).__name__}")
    plan = _PLANS[ctx]
    parts: list[bytes] = []
    encoded = 0
    for index, encode_value, ident, lo, repeatable, name in plan.allowed:
        value = props[index]
        if value is None:
            continue
        # The encoders describe the value as "" and the name is added only on error, so that
        # a valid property costs no string formatting.
        try:
            if repeatable:
                if not value:
                    continue
                if isinstance(value, _TEXT) or not isinstance(value, _SEQUENCES):
                    raise ValueError(f" must be a tuple, got {value!r}")
                if index == _SUB_IDS and len(value) > 1 and ctx == PacketType.SUBSCRIBE:
                    raise ValueError(f": a SUBSCRIBE carries at most one, got {len(value)}")
                parts.extend([encode_value(ident, lo, v) for v in value])
            else:
                parts.append(encode_value(ident, lo, value))
        except ValueError as exc:
            raise ValueError(f"{what} property {name}{exc}") from None
        encoded += 1
    # Every property set must have been encoded: count them in C rather than looking at each
    # property the context forbids. (``encoded`` can only fall short of ``present``.)
    present = _FIELD_COUNT - props.count(None) - (props[_USER] == ()) - (props[_SUB_IDS] == ())
    if encoded != present:
        plan.refuse_misplaced(props, what)
    if props[_AUTH_DATA] is not None and props[_AUTH_METHOD] is None:
        raise ValueError(f"{what}: Authentication Data without an Authentication Method")
    return b"".join(parts)


def _write_properties(props: Properties, ctx: int, what: str) -> bytes:
    """The property block of a packet: length prefix, then the properties."""
    if props is NO_PROPERTIES:
        return b"\x00"
    body = _property_list(props, ctx, what)
    return _remaining_length(len(body)) + body


def encode_properties(props: Properties, packet_type: PropertyContext | None = None) -> bytes:
    """``props`` as the bytes of a property list, without its length prefix.

    With ``packet_type`` (a :class:`PacketType`, or ``"will"``) the properties that packet may
    not carry are refused too; without it only the values are checked. Raises
    :class:`ValueError` for anything the codec would refuse to send.
    """
    ctx = _ANY if packet_type is None else _context_number(packet_type)
    return _property_list(props, ctx, "properties")


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _read_properties(src: bytes, p: int, end: int, ctx: int, what: str) -> tuple[Properties, int]:
    """Read a property block (length prefix, properties) at ``p``; return it and the offset
    after it."""
    if p >= end:
        raise MalformedPacket(f"{what}: missing property length")
    n = src[p]
    if n < 128:
        p += 1
    else:
        n, p = _read_vbi(src, p, end, f"{what} property length")
    if n == 0:
        return NO_PROPERTIES, p
    stop = p + n
    if stop > end:
        raise MalformedPacket(
            f"{what}: property length {n} runs {stop - end} bytes past the packet end"
        )
    return _read_property_list(src, p, stop, ctx, what), stop


def _read_property_list(src: bytes, p: int, stop: int, ctx: int, what: str) -> Properties:
    """Read the properties in ``src[p:stop]``, the list of one property block."""
    allowed = _ALLOWED[ctx]
    values: list[Any] = list(NO_PROPERTIES)
    users: list[tuple[str, str]] | None = None
    sub_ids: list[int] | None = None
    while p < stop:
        spec = _BY_ID[src[p]]
        if spec is None:
            raise MalformedPacket(f"{what}: unknown property identifier 0x{src[p]:02x}")
        ident, index, name, kind, lo = spec
        p += 1
        if ident not in allowed:
            raise MalformedPacket(
                f"{what}: property {name} (0x{ident:02x}) is not allowed in "
                f"{_context_name(ctx)} (MQTT 5 §2.2.2.2)"
            )
        value: Any
        # The readers are given an empty description; the property's name is added only when
        # one raises, so that a valid property costs no string formatting.
        try:
            if kind == _STR:
                value, p = _read_str(src, p, stop, "")
            elif kind <= _BIT:
                if p >= stop:
                    raise MalformedPacket(": truncated value")
                value = src[p]
                p += 1
                if value > 1:
                    raise MalformedPacket(f": value {value}, must be 0 or 1")
                if kind == _FLAG:
                    value = value == 1
            elif kind == _U32K:
                if p + 4 > stop:
                    raise MalformedPacket(": truncated value")
                value = int.from_bytes(src[p : p + 4], "big")
                p += 4
            elif kind == _U16K:
                if p + 2 > stop:
                    raise MalformedPacket(": truncated value")
                value = (src[p] << 8) | src[p + 1]
                p += 2
            elif kind == _BIN:
                value, p = _read_binary(src, p, stop, "")
            elif kind == _VBI:
                value, p = _read_vbi(src, p, stop, "")
            else:
                key, p = _read_str(src, p, stop, " name")
                text, p = _read_str(src, p, stop, " value")
                if users is None:
                    users = []
                users.append((key, text))
                continue
            if lo and value < lo:
                raise MalformedPacket(f": value {value}, must be at least {lo}")
        except MalformedPacket as exc:
            raise MalformedPacket(f"{what} property {name}{exc}") from None
        if index == _SUB_IDS:
            if sub_ids is None:
                sub_ids = [value]
                continue
            if ctx == PacketType.PUBLISH:
                sub_ids.append(value)
                continue
        elif values[index] is None:
            values[index] = value
            continue
        raise MalformedPacket(f"{what}: property {name} appears more than once (MQTT 5 §2.2.2.2)")
    if users is not None:
        values[_USER] = tuple(users)
    if sub_ids is not None:
        values[_SUB_IDS] = tuple(sub_ids)
    if values[_AUTH_DATA] is not None and values[_AUTH_METHOD] is None:
        raise MalformedPacket(f"{what}: Authentication Data without an Authentication Method")
    return tuple.__new__(Properties, values)


def decode_properties(data: bytes, packet_type: PropertyContext) -> Properties:
    """Decode a property list (no length prefix) as :func:`encode_properties` wrote it for
    ``packet_type``; :class:`~mqtt_persist.errors.MalformedPacket` if it is not valid there."""
    data = bytes(data)
    if not data:
        return NO_PROPERTIES
    return _read_property_list(data, 0, len(data), _context_number(packet_type), "properties")
