"""The MQTT 3.1.1 side of the codec: every packet's encoder and decoder, and the decode loop.

:mod:`._v5` is its MQTT 5 twin. Both expose the same two names, ``ENCODERS`` (packet class →
encoder) and ``decode_all`` (the decode loop), which :mod:`.codec` picks per connection. The two
loops are written out separately on purpose: each inlines PUBLISH and the acknowledgements,
where a shared loop would test the version on every packet of the hot path. Helpers that differ
by version carry the version in their name (``_encode_publish_v311``, ``_encode_publish_v5``);
what is the same in both lives once, in :mod:`._wire`.
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
    SUBACK_FAILURE,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    PingReq,
    PingResp,
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

_DISCONNECT: Final = b"\xe0\x00"

_VALID_SUBACK_CODES: Final = frozenset((0, 1, 2, SUBACK_FAILURE))


# Made here rather than imported from _wire: CPython 3.11 compiles ``name.method(...)`` on an
# imported name as a module-attribute call (LOAD_ATTR, a bound method built per call), which
# measurably slows the hot path, where ``.pack`` runs once or twice per packet.
_U16 = struct.Struct("!H")
#: First byte, one-byte remaining length, and a 16-bit field (packet id or topic length).
_BBH = struct.Struct("!BBH")


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _refuse_v5(what: str) -> ValueError:
    return ValueError(f"{what} need MQTT 5; encode with protocol_version=5")


def _encode_publish_v311(p: Publish) -> bytes:
    topic = p.topic.encode()  # UTF-8; a lone surrogate raises UnicodeEncodeError, a ValueError
    tl = len(topic)
    if tl > _MAX_U16:
        raise ValueError(f"PUBLISH topic is {tl} UTF-8 bytes; MQTT strings are at most 65535")
    if b"\x00" in topic:
        raise ValueError("PUBLISH topic contains U+0000, which MQTT forbids in strings")
    if p.properties is not NO_PROPERTIES and p.properties:
        raise _refuse_v5("PUBLISH properties")
    payload = p.payload
    qos = p.qos
    if qos == 0:
        if p.packet_id is not None:
            raise ValueError(f"a QoS 0 PUBLISH has no packet id, got packet_id={p.packet_id!r}")
        if p.dup:
            raise ValueError("a QoS 0 PUBLISH must not have DUP set (MQTT-3.3.1-2)")
        first = 0x31 if p.retain else 0x30
        rl = 2 + tl + len(payload)
        if rl < 128:
            return _BBH.pack(first, rl, tl) + topic + payload
        return bytes((first,)) + _remaining_length(rl) + _U16.pack(tl) + topic + payload
    if qos != 1 and qos != 2:
        raise ValueError(f"PUBLISH qos must be 0, 1 or 2, got {qos!r}")
    pid = p.packet_id
    if pid is None or not 0 < pid <= _MAX_U16:
        raise ValueError(f"a QoS {qos} PUBLISH needs a packet_id in 1..65535, got {pid!r}")
    first = 0x30 | (qos << 1) | (8 if p.dup else 0) | (1 if p.retain else 0)
    rl = 4 + tl + len(payload)
    if rl < 128:
        return _BBH.pack(first, rl, tl) + topic + _U16.pack(pid) + payload
    return (
        bytes((first,)) + _remaining_length(rl) + _U16.pack(tl) + topic + _U16.pack(pid) + payload
    )


def _encode_puback_v311(p: PubAck) -> bytes:
    pid = p.packet_id
    if pid is None or not 0 < pid <= _MAX_U16:
        raise ValueError(f"PUBACK packet_id must be in 1..65535, got {pid!r}")
    if p.reason_code or (p.properties is not NO_PROPERTIES and p.properties):
        raise _refuse_v5("PUBACK reason codes and properties")
    return _BBH.pack(0x40, 2, pid)


def _encode_pubrec_v311(p: PubRec) -> bytes:
    if p.reason_code or (p.properties is not NO_PROPERTIES and p.properties):
        raise _refuse_v5("PUBREC reason codes and properties")
    return _BBH.pack(0x50, 2, _check_packet_id(p.packet_id, "PUBREC"))


def _encode_pubrel_v311(p: PubRel) -> bytes:
    if p.reason_code or (p.properties is not NO_PROPERTIES and p.properties):
        raise _refuse_v5("PUBREL reason codes and properties")
    return _BBH.pack(0x62, 2, _check_packet_id(p.packet_id, "PUBREL"))


def _encode_pubcomp_v311(p: PubComp) -> bytes:
    if p.reason_code or (p.properties is not NO_PROPERTIES and p.properties):
        raise _refuse_v5("PUBCOMP reason codes and properties")
    return _BBH.pack(0x70, 2, _check_packet_id(p.packet_id, "PUBCOMP"))


def _encode_unsuback_v311(p: UnsubAck) -> bytes:
    if p.reason_codes or p.properties:
        raise _refuse_v5("UNSUBACK reason codes and properties")
    return _BBH.pack(0xB0, 2, _check_packet_id(p.packet_id, "UNSUBACK"))


def _encode_connect_v311(p: Connect) -> bytes:
    if is_v5_level(p.protocol_level):
        raise ValueError("a CONNECT with protocol_level 5 must be encoded with protocol_version=5")
    return _encode_connect(p)


def _encode_connack_v311(p: ConnAck) -> bytes:
    if not 0 <= p.return_code <= 0xFF:
        raise ValueError(f"CONNACK return_code must be in 0..255, got {p.return_code!r}")
    if p.session_present and p.return_code != 0:
        raise ValueError("a refusing CONNACK must not set session_present (MQTT-3.2.2-4)")
    if p.properties:
        raise _refuse_v5("CONNACK properties")
    return bytes((0x20, 2, 1 if p.session_present else 0, p.return_code))


def _encode_subscribe_v311(p: Subscribe) -> bytes:
    pid = _check_packet_id(p.packet_id, "SUBSCRIBE")
    if not p.subscriptions:
        raise ValueError("a SUBSCRIBE needs at least one topic filter (MQTT-3.8.3-3)")
    if p.properties:
        raise _refuse_v5("SUBSCRIBE properties")
    parts = [_U16.pack(pid)]
    for topic_filter, qos in p.subscriptions:
        if isinstance(qos, SubscriptionOptions):
            if qos.no_local or qos.retain_as_published or qos.retain_handling:
                raise _refuse_v5("no local, retain as published and retain handling")
            qos = qos.qos
        if qos not in (0, 1, 2):
            raise ValueError(f"SUBSCRIBE requested qos must be 0, 1 or 2, got {qos!r}")
        parts.append(_utf8(topic_filter, "SUBSCRIBE topic filter"))
        parts.append(_RL1[qos])
    return _frame(0x82, b"".join(parts))


def _encode_suback_v311(p: SubAck) -> bytes:
    pid = _check_packet_id(p.packet_id, "SUBACK")
    if not p.return_codes:
        raise ValueError("a SUBACK needs at least one return code")
    if p.properties:
        raise _refuse_v5("SUBACK properties")
    for code in p.return_codes:
        if code not in _VALID_SUBACK_CODES:
            raise ValueError(f"SUBACK return code must be 0, 1, 2 or 0x80, got {code!r}")
    return _frame(0x90, _U16.pack(pid) + bytes(p.return_codes))


def _encode_unsubscribe_v311(p: Unsubscribe) -> bytes:
    pid = _check_packet_id(p.packet_id, "UNSUBSCRIBE")
    if not p.filters:
        raise ValueError("an UNSUBSCRIBE needs at least one topic filter (MQTT-3.10.3-2)")
    if p.properties:
        raise _refuse_v5("UNSUBSCRIBE properties")
    parts = [_U16.pack(pid)]
    parts.extend(_utf8(f, "UNSUBSCRIBE topic filter") for f in p.filters)
    return _frame(0xA2, b"".join(parts))


def _encode_disconnect_v311(p: Disconnect) -> bytes:
    if p.reason_code or p.properties:
        raise _refuse_v5("DISCONNECT reason codes and properties")
    return _DISCONNECT


def _encode_auth_v311(p: Auth) -> bytes:
    raise _refuse_v5("AUTH packets")


ENCODERS: Final[dict[type[Any], Callable[[Any], bytes]]] = {
    Publish: _encode_publish_v311,
    PubAck: _encode_puback_v311,
    PubRec: _encode_pubrec_v311,
    PubRel: _encode_pubrel_v311,
    PubComp: _encode_pubcomp_v311,
    Connect: _encode_connect_v311,
    ConnAck: _encode_connack_v311,
    Subscribe: _encode_subscribe_v311,
    SubAck: _encode_suback_v311,
    Unsubscribe: _encode_unsubscribe_v311,
    UnsubAck: _encode_unsuback_v311,
    PingReq: _encode_pingreq,
    PingResp: _encode_pingresp,
    Disconnect: _encode_disconnect_v311,
    Auth: _encode_auth_v311,
}


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _first_byte_error_v311(b0: int) -> str | None:
    """Why a packet cannot start with ``b0``, or None if it can."""
    ptype, flags = b0 >> 4, b0 & 0x0F
    if ptype == 0 or ptype == 15:
        extra = " (AUTH exists only in MQTT 5)" if ptype == 15 else ""
        return f"reserved packet type {ptype} in first byte 0x{b0:02x}{extra}"
    name = PacketType(ptype).name
    if ptype == PacketType.PUBLISH:
        if flags & 0x06 == 0x06:
            return f"PUBLISH with QoS 3 (first byte 0x{b0:02x})"
        if flags & 0x08 and not flags & 0x06:
            return f"QoS 0 PUBLISH with DUP set (first byte 0x{b0:02x}, MQTT-3.3.1-2)"
        return None
    expected = 0b0010 if ptype in (PacketType.PUBREL, 8, 10) else 0
    if flags != expected:
        return f"{name} with fixed-header flags 0b{flags:04b}, must be 0b{expected:04b} (§2.2.2)"
    return None


#: Indexed by a packet's first byte: why no packet can start with it, or None.
_FIRST_BYTE_ERRORS: Final = tuple(_first_byte_error_v311(b) for b in range(256))

#: Indexed by packet type: the class of a packet whose whole body is a two-byte packet id, or
#: None (a tuple index is cheaper than a dict lookup, on the path of every PUBACK).
_ID_ONLY_CLASSES: Final[dict[int, Callable[[int], Packet]]] = {
    4: PubAck,
    5: PubRec,
    6: PubRel,
    7: PubComp,
    11: UnsubAck,
}
_ID_ONLY: Final[tuple[Callable[[int], Packet] | None, ...]] = tuple(
    _ID_ONLY_CLASSES.get(t) for t in range(16)
)


def _decode_connack_v311(src: bytes, p: int, end: int, b0: int) -> ConnAck:
    if end - p != 2:
        raise MalformedPacket(f"CONNACK with remaining length {end - p}, must be 2")
    ack_flags = src[p]
    if ack_flags & 0xFE:
        raise MalformedPacket(
            f"CONNACK with reserved acknowledge flag bits set (0x{ack_flags:02x}, MQTT-3.2.2-1)"
        )
    return ConnAck(bool(ack_flags), src[p + 1])


def _decode_subscribe_v311(src: bytes, p: int, end: int, b0: int) -> Subscribe:
    pid = _read_packet_id(src, p, end, "SUBSCRIBE")
    p += 2
    subscriptions: list[tuple[str, int]] = []
    while p < end:
        topic_filter, p = _read_str(src, p, end, "SUBSCRIBE topic filter")
        if p >= end:
            raise MalformedPacket("SUBSCRIBE: topic filter without requested QoS byte")
        qos = src[p]
        p += 1
        if qos > 2:
            if qos & 0xFC:
                raise MalformedPacket(
                    f"SUBSCRIBE requested-QoS byte 0x{qos:02x} has reserved bits set (MQTT-3.8.3-4)"
                )
            raise MalformedPacket("SUBSCRIBE with requested QoS 3 (MQTT-3.8.3-4)")
        subscriptions.append((topic_filter, qos))
    if not subscriptions:
        raise MalformedPacket("SUBSCRIBE with no topic filters (MQTT-3.8.3-3)")
    return Subscribe(pid, subscriptions)


def _decode_suback_v311(src: bytes, p: int, end: int, b0: int) -> SubAck:
    pid = _read_packet_id(src, p, end, "SUBACK")
    codes = list(src[p + 2 : end])
    if not codes:
        raise MalformedPacket("SUBACK with no return codes")
    for code in codes:
        if code not in _VALID_SUBACK_CODES:
            raise MalformedPacket(
                f"SUBACK return code 0x{code:02x}, must be 0x00, 0x01, 0x02 or 0x80 (§3.9.3)"
            )
    return SubAck(pid, codes)


def _decode_unsubscribe_v311(src: bytes, p: int, end: int, b0: int) -> Unsubscribe:
    pid = _read_packet_id(src, p, end, "UNSUBSCRIBE")
    p += 2
    filters: list[str] = []
    while p < end:
        topic_filter, p = _read_str(src, p, end, "UNSUBSCRIBE topic filter")
        filters.append(topic_filter)
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE with no topic filters (MQTT-3.10.3-2)")
    return Unsubscribe(pid, filters)


def _decode_empty_v311(src: bytes, p: int, end: int, b0: int) -> PingReq | PingResp | Disconnect:
    ptype = b0 >> 4
    if end != p:
        raise MalformedPacket(
            f"{PacketType(ptype).name} with remaining length {end - p}, must be 0"
        )
    if ptype == 12:
        return PingReq()
    if ptype == 13:
        return PingResp()
    return Disconnect()


_BODY_DECODERS: Final[dict[int, Callable[[bytes, int, int, int], Packet]]] = {
    1: _decode_connect,
    2: _decode_connack_v311,
    8: _decode_subscribe_v311,
    9: _decode_suback_v311,
    10: _decode_unsubscribe_v311,
    12: _decode_empty_v311,
    13: _decode_empty_v311,
    14: _decode_empty_v311,
}


def decode_all(src: bytes, max_size: int, pos: int = 0) -> tuple[list[Packet], int, int]:
    """Decode every complete 3.1.1 packet of ``src`` from ``pos`` on.

    Returns the packets, the offset of the first byte not consumed, and how many bytes (counted
    from that offset) the next packet needs before it is worth parsing again; -1 instead when
    it stopped after a CONNECT, which chooses the protocol version of what follows.
    """
    out: list[Packet] = []
    append = out.append
    first_byte_errors = _FIRST_BYTE_ERRORS
    id_only = _ID_ONLY
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
                    break
                shift += 7
                if shift == 28:
                    raise MalformedPacket("remaining length encoded in more than 4 bytes (§2.2.3)")
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
            append(Publish(topic, src[t_end:end], qos, b0 & 1 == 1, b0 & 8 == 8, pid))
        elif (id_only_class := id_only[ptype]) is not None:
            if rl != 2:
                raise MalformedPacket(
                    f"{PacketType(ptype).name} with remaining length {rl}, must be 2"
                )
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
