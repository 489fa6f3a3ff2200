"""The MQTT 5 side of the codec: every packet's encoder and decoder, and the decode loop.

The structure mirrors the 3.1.1 code in :mod:`codec` (same fixed-header table, same inline
PUBLISH and acknowledgement fast paths, same packet-size check before any body is buffered),
with what MQTT 5 adds: property blocks, reason codes (validated per packet type, §2.4), the
AUTH packet, subscription options, and the shortest-form rule for variable byte integers
(MQTT-1.5.5-1), which 3.1.1 did not have.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from mqtt_persist.errors import MalformedPacket, PacketTooLarge
from mqtt_persist.protocol._connect import _decode_connect, _encode_connect, is_v5_level
from mqtt_persist.protocol._wire import (
    _MAX_U16,
    _RL1,
    _check_packet_id,
    _encode_pingreq,
    _encode_pingresp,
    _frame,
    _read_packet_id,
    _read_str,
    _remaining_length,
    _utf8,
)
from mqtt_persist.protocol.packets import (
    NO_PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    SubscriptionOptions,
    UnsubAck,
    Unsubscribe,
)
from mqtt_persist.protocol.properties import _read_properties, _write_properties
from mqtt_persist.protocol.reason_codes import BY_VALUE, VALID_REASON_CODES, ReasonCode

_PUBLISH: Final = PacketType.PUBLISH

# Made here rather than imported from _wire: CPython 3.11 compiles ``name.method(...)`` on an
# imported name as a module-attribute call (LOAD_ATTR, a bound method built per call), which
# measurably slows the hot path, where ``.pack`` runs once or twice per packet.
_U16 = struct.Struct("!H")
#: First byte, one-byte remaining length, and a 16-bit field (packet id or topic length).
_BBH = struct.Struct("!BBH")
#: Packet id and a one-byte property length (0, the PUBLISH without properties).
_HB = struct.Struct("!HB")
#: The property block of a packet without properties.
_EMPTY_BLOCK: Final = b"\x00"


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _check_reason_code(code: int, packet_type: PacketType) -> int:
    if code not in VALID_REASON_CODES[packet_type]:
        raise ValueError(
            f"{packet_type.name} reason code must be one of the MQTT 5 codes for it "
            f"(§2.4), got {code!r}"
        )
    return code


def _encode_publish_v5(p: Publish) -> bytes:
    topic = p.topic.encode()  # UTF-8; a lone surrogate raises UnicodeEncodeError, a ValueError
    tl = len(topic)
    if tl > _MAX_U16:
        raise ValueError(f"PUBLISH topic is {tl} UTF-8 bytes; MQTT strings are at most 65535")
    if b"\x00" in topic:
        raise ValueError("PUBLISH topic contains U+0000, which MQTT forbids in strings")
    props = p.properties
    if props is NO_PROPERTIES:
        block = _EMPTY_BLOCK
        if not tl:
            raise ValueError("an MQTT 5 PUBLISH with an empty topic needs a Topic Alias (§3.3.2.1)")
    else:
        block = _write_properties(props, _PUBLISH, "PUBLISH")
        if not tl and props.topic_alias is None:
            raise ValueError("an MQTT 5 PUBLISH with an empty topic needs a Topic Alias (§3.3.2.1)")
    payload = p.payload
    qos = p.qos
    if qos == 0:
        if p.packet_id is not None:
            raise ValueError(f"a QoS 0 PUBLISH has no packet id, got packet_id={p.packet_id!r}")
        if p.dup:
            raise ValueError("a QoS 0 PUBLISH must not have DUP set (MQTT-3.3.1-2)")
        first = 0x31 if p.retain else 0x30
        rl = 2 + tl + len(block) + len(payload)
        if rl < 128:
            return _BBH.pack(first, rl, tl) + topic + block + payload
        return bytes((first,)) + _remaining_length(rl) + _U16.pack(tl) + topic + block + payload
    if qos != 1 and qos != 2:
        raise ValueError(f"PUBLISH qos must be 0, 1 or 2, got {qos!r}")
    pid = p.packet_id
    if pid is None or not 0 < pid <= _MAX_U16:
        raise ValueError(f"a QoS {qos} PUBLISH needs a packet_id in 1..65535, got {pid!r}")
    first = 0x30 | (qos << 1) | (8 if p.dup else 0) | (1 if p.retain else 0)
    rl = 4 + tl + len(block) + len(payload)
    if block is _EMPTY_BLOCK:  # the common case: packet id and the empty block in one pack
        if rl < 128:
            return _BBH.pack(first, rl, tl) + topic + _HB.pack(pid, 0) + payload
        return (
            bytes((first,))
            + _remaining_length(rl)
            + _U16.pack(tl)
            + topic
            + _HB.pack(pid, 0)
            + payload
        )
    return (
        bytes((first,))
        + _remaining_length(rl)
        + _U16.pack(tl)
        + topic
        + _U16.pack(pid)
        + block
        + payload
    )


def _encode_ack_v5(
    p: PubAck | PubRec | PubRel | PubComp, first: int, packet_type: PacketType
) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP: packet id, reason code, properties.

    The shortest form the specification allows (§3.4.2.1): two bytes for success without
    properties, three for another code without properties, paho-mqtt's choice too.
    """
    name = packet_type.name
    pid = _check_packet_id(p.packet_id, name)
    code = _check_reason_code(p.reason_code, packet_type)
    props = p.properties
    if not props:
        if code == 0:
            return _BBH.pack(first, 2, pid)
        return _BBH.pack(first, 3, pid) + bytes((code,))
    block = _write_properties(props, packet_type, name)
    return _frame(first, _U16.pack(pid) + bytes((code,)) + block)


# One small function per acknowledgement, each with the common case (success, no properties)
# inline: PUBACK is a QoS 1 message's whole answer, the other three make up QoS 2.


def _encode_puback_v5(p: PubAck) -> bytes:
    pid = p.packet_id
    if p.reason_code == 0 and p.properties is NO_PROPERTIES and pid and 0 < pid <= _MAX_U16:
        return _BBH.pack(0x40, 2, pid)
    return _encode_ack_v5(p, 0x40, PacketType.PUBACK)


def _encode_pubrec_v5(p: PubRec) -> bytes:
    pid = p.packet_id
    if p.reason_code == 0 and p.properties is NO_PROPERTIES and pid and 0 < pid <= _MAX_U16:
        return _BBH.pack(0x50, 2, pid)
    return _encode_ack_v5(p, 0x50, PacketType.PUBREC)


def _encode_pubrel_v5(p: PubRel) -> bytes:
    pid = p.packet_id
    if p.reason_code == 0 and p.properties is NO_PROPERTIES and pid and 0 < pid <= _MAX_U16:
        return _BBH.pack(0x62, 2, pid)
    return _encode_ack_v5(p, 0x62, PacketType.PUBREL)


def _encode_pubcomp_v5(p: PubComp) -> bytes:
    pid = p.packet_id
    if p.reason_code == 0 and p.properties is NO_PROPERTIES and pid and 0 < pid <= _MAX_U16:
        return _BBH.pack(0x70, 2, pid)
    return _encode_ack_v5(p, 0x70, PacketType.PUBCOMP)


def _encode_connect_v5(p: Connect) -> bytes:
    if not is_v5_level(p.protocol_level):
        raise ValueError(
            f"an MQTT 5 CONNECT needs protocol_level 5, got {p.protocol_level!r} "
            "(encode a 3.1.1 CONNECT with protocol_version=4)"
        )
    return _encode_connect(p)


def _encode_connack_v5(p: ConnAck) -> bytes:
    code = _check_reason_code(p.return_code, PacketType.CONNACK)
    if p.session_present and code:
        raise ValueError("a refusing CONNACK must not set session_present (MQTT-3.2.2-6)")
    block = _write_properties(p.properties, PacketType.CONNACK, "CONNACK")
    return _frame(0x20, bytes((1 if p.session_present else 0, code)) + block)


def _encode_subscribe_v5(p: Subscribe) -> bytes:
    pid = _check_packet_id(p.packet_id, "SUBSCRIBE")
    if not p.subscriptions:
        raise ValueError("a SUBSCRIBE needs at least one topic filter (MQTT-3.8.3-2)")
    parts = [_U16.pack(pid), _write_properties(p.properties, PacketType.SUBSCRIBE, "SUBSCRIBE")]
    for topic_filter, options in p.subscriptions:
        if isinstance(options, SubscriptionOptions):
            byte = options.to_byte()
        elif options in (0, 1, 2):
            byte = options
        else:
            raise ValueError(f"SUBSCRIBE requested qos must be 0, 1 or 2, got {options!r}")
        parts.append(_utf8(topic_filter, "SUBSCRIBE topic filter"))
        parts.append(_RL1[byte])
    return _frame(0x82, b"".join(parts))


def _reason_code_list(codes: list[int], packet_type: PacketType) -> bytes:
    if not codes:
        raise ValueError(f"a {packet_type.name} needs at least one reason code")
    for code in codes:
        _check_reason_code(code, packet_type)
    return bytes(codes)


def _encode_suback_v5(p: SubAck) -> bytes:
    pid = _check_packet_id(p.packet_id, "SUBACK")
    block = _write_properties(p.properties, PacketType.SUBACK, "SUBACK")
    return _frame(
        0x90, _U16.pack(pid) + block + _reason_code_list(p.return_codes, PacketType.SUBACK)
    )


def _encode_unsubscribe_v5(p: Unsubscribe) -> bytes:
    pid = _check_packet_id(p.packet_id, "UNSUBSCRIBE")
    if not p.filters:
        raise ValueError("an UNSUBSCRIBE needs at least one topic filter (MQTT-3.10.3-2)")
    parts = [_U16.pack(pid), _write_properties(p.properties, PacketType.UNSUBSCRIBE, "UNSUBSCRIBE")]
    parts.extend(_utf8(f, "UNSUBSCRIBE topic filter") for f in p.filters)
    return _frame(0xA2, b"".join(parts))


def _encode_unsuback_v5(p: UnsubAck) -> bytes:
    pid = _check_packet_id(p.packet_id, "UNSUBACK")
    block = _write_properties(p.properties, PacketType.UNSUBACK, "UNSUBACK")
    codes = _reason_code_list(p.reason_codes, PacketType.UNSUBACK)
    return _frame(0xB0, _U16.pack(pid) + block + codes)


def _encode_disconnect_v5(p: Disconnect) -> bytes:
    code = _check_reason_code(p.reason_code, PacketType.DISCONNECT)
    if p.properties is NO_PROPERTIES or not p.properties:
        # The shortest forms of §3.14.2.1 and §3.14.2.2.1, as paho-mqtt writes them too.
        return b"\xe0\x00" if code == 0 else bytes((0xE0, 1, code))
    return _frame(
        0xE0, bytes((code,)) + _write_properties(p.properties, PacketType.DISCONNECT, "DISCONNECT")
    )


def _encode_auth_v5(p: Auth) -> bytes:
    code = _check_reason_code(p.reason_code, PacketType.AUTH)
    props = p.properties
    if code == 0 and (props is NO_PROPERTIES or not props):
        return b"\xf0\x00"
    if props.authentication_method is None:
        raise ValueError("an AUTH other than the bare success f0 00 needs an Authentication Method")
    return _frame(0xF0, bytes((code,)) + _write_properties(props, PacketType.AUTH, "AUTH"))


ENCODERS: Final[dict[type[Any], Callable[[Any], bytes]]] = {
    Publish: _encode_publish_v5,
    PubAck: _encode_puback_v5,
    PubRec: _encode_pubrec_v5,
    PubRel: _encode_pubrel_v5,
    PubComp: _encode_pubcomp_v5,
    Connect: _encode_connect_v5,
    ConnAck: _encode_connack_v5,
    Subscribe: _encode_subscribe_v5,
    SubAck: _encode_suback_v5,
    Unsubscribe: _encode_unsubscribe_v5,
    UnsubAck: _encode_unsuback_v5,
    PingReq: _encode_pingreq,
    PingResp: _encode_pingresp,
    Disconnect: _encode_disconnect_v5,
    Auth: _encode_auth_v5,
}


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _reason_code(code: int, packet_type: PacketType) -> ReasonCode:
    """A received reason code as a ReasonCode, or MalformedPacket if the packet may not carry it."""
    if code not in VALID_REASON_CODES[packet_type]:
        raise MalformedPacket(
            f"{packet_type.name} with reason code 0x{code:02x}, which MQTT 5 does not define "
            f"for it (§2.4)"
        )
    member = BY_VALUE[code]
    assert member is not None
    return member


def _decode_connack_v5(src: bytes, p: int, end: int, b0: int) -> ConnAck:
    if end - p < 2:
        raise MalformedPacket(f"CONNACK with remaining length {end - p}, must be at least 3")
    ack_flags, code = src[p], src[p + 1]
    if ack_flags & 0xFE:
        raise MalformedPacket(
            f"CONNACK with reserved acknowledge flag bits set (0x{ack_flags:02x}, MQTT-3.2.2-1)"
        )
    if end - p == 2:
        # No property length: not MQTT 5, but what a 3.1.1-only server must answer an MQTT 5
        # CONNECT with (return code 1, unacceptable protocol version, MQTT-3.1.2-2). Decoded
        # (with its 3.1.1 return code) so the client can fall back instead of failing on a
        # "malformed packet"; an acceptance without properties stays malformed.
        if code == 0 or code > 5 or ack_flags:
            raise MalformedPacket(
                f"CONNACK without property length (remaining length 2) and return code {code}: "
                "only a 3.1.1 refusal (codes 1..5) can be read without one"
            )
        return ConnAck(False, code)
    props, p = _read_properties(src, p + 2, end, PacketType.CONNACK, "CONNACK")
    if p != end:
        raise MalformedPacket(f"CONNACK: {end - p} unexpected bytes after the properties")
    return ConnAck(bool(ack_flags), _reason_code(code, PacketType.CONNACK), props)


_ACK_CLASSES: Final[dict[int, Callable[..., Packet]]] = {
    4: PubAck,
    5: PubRec,
    6: PubRel,
    7: PubComp,
}


def _decode_ack_v5(src: bytes, p: int, end: int, b0: int) -> Packet:
    """PUBACK, PUBREC, PUBREL, PUBCOMP longer than two bytes: reason code, maybe properties."""
    ptype = PacketType(b0 >> 4)
    pid = _read_packet_id(src, p, end, ptype.name)  # remaining length 0 or 1 fails here
    p += 2  # and 2 was decoded inline, so a reason code follows
    code = _reason_code(src[p], ptype)
    props: Properties = NO_PROPERTIES
    if p + 1 < end:  # remaining length 3: reason code without property length (§3.4.2.2.1)
        props, q = _read_properties(src, p + 1, end, ptype, ptype.name)
        if q != end:
            raise MalformedPacket(f"{ptype.name}: {end - q} unexpected bytes after the properties")
    return _ACK_CLASSES[ptype](pid, code, props)


def _decode_subscribe_v5(src: bytes, p: int, end: int, b0: int) -> Subscribe:
    pid = _read_packet_id(src, p, end, "SUBSCRIBE")
    props, p = _read_properties(src, p + 2, end, PacketType.SUBSCRIBE, "SUBSCRIBE")
    subscriptions: list[tuple[str, int | SubscriptionOptions]] = []
    while p < end:
        topic_filter, p = _read_str(src, p, end, "SUBSCRIBE topic filter")
        if p >= end:
            raise MalformedPacket("SUBSCRIBE: topic filter without subscription options byte")
        options = _OPTIONS[src[p]]
        if options is None:
            raise MalformedPacket(f"SUBSCRIBE: {_options_error(src[p])} (MQTT-3.8.3-5)")
        p += 1
        subscriptions.append((topic_filter, options))
    if not subscriptions:
        raise MalformedPacket("SUBSCRIBE with no topic filters (MQTT-3.8.3-2)")
    return Subscribe(pid, subscriptions, props)


def _options_or_none(byte: int) -> SubscriptionOptions | None:
    try:
        return SubscriptionOptions.from_byte(byte)
    except ValueError:
        return None


def _options_error(byte: int) -> str:
    """Why ``byte`` is not a subscription options byte."""
    try:
        SubscriptionOptions.from_byte(byte)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"0x{byte:02x} is a valid options byte")


#: Every options byte, parsed once (the objects are immutable and can be shared).
_OPTIONS: Final = tuple(_options_or_none(b) for b in range(256))


def _decode_codes_v5(
    src: bytes, p: int, end: int, packet_type: PacketType
) -> tuple[int, Properties, list[int]]:
    name = packet_type.name
    pid = _read_packet_id(src, p, end, name)
    props, p = _read_properties(src, p + 2, end, packet_type, name)
    if p >= end:
        raise MalformedPacket(f"{name} with no reason codes")
    codes: list[int] = [_reason_code(code, packet_type) for code in src[p:end]]
    return pid, props, codes


def _decode_suback_v5(src: bytes, p: int, end: int, b0: int) -> SubAck:
    pid, props, codes = _decode_codes_v5(src, p, end, PacketType.SUBACK)
    return SubAck(pid, codes, props)


def _decode_unsubscribe_v5(src: bytes, p: int, end: int, b0: int) -> Unsubscribe:
    pid = _read_packet_id(src, p, end, "UNSUBSCRIBE")
    props, p = _read_properties(src, p + 2, end, PacketType.UNSUBSCRIBE, "UNSUBSCRIBE")
    filters: list[str] = []
    while p < end:
        topic_filter, p = _read_str(src, p, end, "UNSUBSCRIBE topic filter")
        filters.append(topic_filter)
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE with no topic filters (MQTT-3.10.3-2)")
    return Unsubscribe(pid, filters, props)


def _decode_unsuback_v5(src: bytes, p: int, end: int, b0: int) -> UnsubAck:
    pid, props, codes = _decode_codes_v5(src, p, end, PacketType.UNSUBACK)
    return UnsubAck(pid, codes, props)


def _decode_ping_v5(src: bytes, p: int, end: int, b0: int) -> Packet:
    if end != p:
        name = PacketType(b0 >> 4).name
        raise MalformedPacket(f"{name} with remaining length {end - p}, must be 0")
    return PingReq() if b0 == 0xC0 else PingResp()


def _decode_disconnect_v5(src: bytes, p: int, end: int, b0: int) -> Disconnect:
    if p == end:  # remaining length 0: normal disconnection (§3.14.2.1)
        return Disconnect()
    code = _reason_code(src[p], PacketType.DISCONNECT)
    props: Properties = NO_PROPERTIES
    if p + 1 < end:  # remaining length 1: no property length (§3.14.2.2.1)
        props, q = _read_properties(src, p + 1, end, PacketType.DISCONNECT, "DISCONNECT")
        if q != end:
            raise MalformedPacket(f"DISCONNECT: {end - q} unexpected bytes after the properties")
    return Disconnect(code, props)


def _decode_auth_v5(src: bytes, p: int, end: int, b0: int) -> Auth:
    if p == end:  # remaining length 0: success, no properties (§3.15.2.1)
        return Auth()
    code = _reason_code(src[p], PacketType.AUTH)
    props, q = _read_properties(src, p + 1, end, PacketType.AUTH, "AUTH")
    if q != end:
        raise MalformedPacket(f"AUTH: {end - q} unexpected bytes after the properties")
    if props.authentication_method is None:
        raise MalformedPacket("AUTH without an Authentication Method (§3.15.2.2.2)")
    return Auth(code, props)


_BODY_DECODERS: Final[dict[int, Callable[[bytes, int, int, int], Packet]]] = {
    1: _decode_connect,  # in the layout its protocol level says
    2: _decode_connack_v5,
    4: _decode_ack_v5,
    5: _decode_ack_v5,
    6: _decode_ack_v5,
    7: _decode_ack_v5,
    8: _decode_subscribe_v5,
    9: _decode_suback_v5,
    10: _decode_unsubscribe_v5,
    11: _decode_unsuback_v5,
    12: _decode_ping_v5,
    13: _decode_ping_v5,
    14: _decode_disconnect_v5,
    15: _decode_auth_v5,
}


def _first_byte_error_v5(b0: int) -> str | None:
    """Why an MQTT 5 packet cannot start with ``b0``, or None if it can."""
    ptype, flags = b0 >> 4, b0 & 0x0F
    if ptype == 0:
        return f"reserved packet type 0 in first byte 0x{b0:02x}"
    name = PacketType(ptype).name
    if ptype == PacketType.PUBLISH:
        if flags & 0x06 == 0x06:
            return f"PUBLISH with QoS 3 (first byte 0x{b0:02x}, MQTT-3.3.1-4)"
        if flags & 0x08 and not flags & 0x06:
            return f"QoS 0 PUBLISH with DUP set (first byte 0x{b0:02x}, MQTT-3.3.1-2)"
        return None
    expected = 0b0010 if ptype in (PacketType.PUBREL, 8, 10) else 0
    if flags != expected:
        return f"{name} with fixed-header flags 0b{flags:04b}, must be 0b{expected:04b} (§2.1.3)"
    return None


#: Indexed by a packet's first byte: why no MQTT 5 packet can start with it, or None.
_FIRST_BYTE_ERRORS: Final = tuple(_first_byte_error_v5(b) for b in range(256))

#: Indexed by packet type: the acknowledgements decoded inline when they are two bytes long.
_ID_ONLY_CLASSES: Final[dict[int, Callable[[int], Packet]]] = {
    4: PubAck,
    5: PubRec,
    6: PubRel,
    7: PubComp,
}
_ID_ONLY: Final[tuple[Callable[[int], Packet] | None, ...]] = tuple(
    _ID_ONLY_CLASSES.get(t) for t in range(16)
)


def decode_all(src: bytes, max_size: int, pos: int = 0) -> tuple[list[Packet], int, int]:
    """Decode every complete MQTT 5 packet of ``src`` from ``pos`` on.

    Returns the packets, the offset of the first byte not consumed, and how many bytes (counted
    from that offset) the next packet needs before it is worth parsing again; -1 instead when
    it stopped after a CONNECT, which chooses the protocol version of what follows.
    """
    out: list[Packet] = []
    append = out.append
    first_byte_errors = _FIRST_BYTE_ERRORS
    id_only = _ID_ONLY
    no_properties = NO_PROPERTIES
    n = len(src)
    while pos < n:
        b0 = src[pos]
        err = first_byte_errors[b0]
        if err is not None:
            raise MalformedPacket(err)
        if pos + 1 >= n:
            return out, pos, n - pos + 1
        rl = src[pos + 1]
        if rl < 128:
            start = pos + 2
        else:
            rl &= 0x7F
            i = pos + 2
            shift = 7
            while True:
                if i >= n:
                    return out, pos, n - pos + 1
                b = src[i]
                i += 1
                rl |= (b & 0x7F) << shift
                if b < 128:
                    if b == 0:
                        raise MalformedPacket(
                            "remaining length not in its shortest form (MQTT-1.5.5-1)"
                        )
                    break
                shift += 7
                if shift == 28:
                    raise MalformedPacket("remaining length encoded in more than 4 bytes (§2.1.4)")
            start = i
        end = start + rl
        if end - pos > max_size:
            raise PacketTooLarge(end - pos, max_size)
        if end > n:
            return out, pos, end - pos
        ptype = b0 >> 4
        if ptype == 3:  # PUBLISH, inline: it is most of the traffic
            if rl < 2:
                raise MalformedPacket("PUBLISH: truncated topic length")
            t_end = start + 2 + ((src[start] << 8) | src[start + 1])
            if t_end > end:
                raise MalformedPacket(
                    f"PUBLISH topic: string length runs {t_end - end} bytes past the packet end"
                )
            try:
                topic = src[start + 2 : t_end].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MalformedPacket(f"PUBLISH topic: invalid UTF-8 ({exc.reason})") from None
            if "\x00" in topic:
                raise MalformedPacket("PUBLISH topic: contains U+0000 (MQTT-1.5.3-2)")
            qos = (b0 >> 1) & 3
            if qos:
                if t_end + 2 > end:
                    raise MalformedPacket("PUBLISH: truncated packet identifier")
                pid: int | None = (src[t_end] << 8) | src[t_end + 1]
                if pid == 0:
                    raise MalformedPacket(
                        f"QoS {qos} PUBLISH with packet identifier 0 (MQTT-2.3.1-1)"
                    )
                t_end += 2
            else:
                pid = None
            if t_end < end and src[t_end] == 0:
                props = no_properties
                t_end += 1
            else:
                props, t_end = _read_properties(src, t_end, end, 3, "PUBLISH")
            if not topic and props.topic_alias is None:
                raise MalformedPacket(
                    "PUBLISH with an empty topic and no Topic Alias (MQTT-3.3.2-1, §3.3.2.3.4)"
                )
            append(Publish(topic, src[t_end:end], qos, b0 & 1 == 1, b0 & 8 == 8, pid, props))
        elif rl == 2 and (id_only_class := id_only[ptype]) is not None:
            pid = (src[start] << 8) | src[start + 1]
            if pid == 0:
                raise MalformedPacket(
                    f"{PacketType(ptype).name} with packet identifier 0 (MQTT-2.3.1-1)"
                )
            append(id_only_class(pid))
        else:
            append(_BODY_DECODERS[ptype](src, start, end, b0))
            if ptype == 1:
                return out, end, -1
        pos = end
    return out, pos, 0
