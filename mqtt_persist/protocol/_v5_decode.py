"""The MQTT 5 decoders: one per packet body, and the decode loop :func:`decode_all`.

The loop mirrors the 3.1.1 one (same fixed-header table, same inline PUBLISH and
acknowledgement fast paths, same packet-size check before any body is buffered), with what
MQTT 5 adds: property blocks, reason codes (validated per packet type, §2.4), the AUTH packet,
subscription options, and the shortest-form rule for variable byte integers (MQTT-1.5.5-1).
The encoders are in :mod:`._v5_encode`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from mqtt_persist.errors import MalformedPacket, PacketTooLarge
from mqtt_persist.protocol._connect import _decode_connect
from mqtt_persist.protocol._wire import (
    _read_packet_id,
    _read_str,
)
from mqtt_persist.protocol.packets import (
    NO_PROPERTIES,
    Auth,
    ConnAck,
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
from mqtt_persist.protocol.properties import _read_properties
from mqtt_persist.protocol.reason_codes import BY_VALUE, VALID_REASON_CODES, ReasonCode


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
