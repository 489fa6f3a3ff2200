"""The MQTT 5 encoders: one per packet type, gathered in :data:`ENCODERS`.

What MQTT 5 adds over 3.1.1 on the way out: property blocks, reason codes validated per
packet type (§2.4), the AUTH packet and subscription options. The decoders are in
:mod:`._v5_decode`; :mod:`._v5` is the MQTT 5 side of the codec that :mod:`codec` uses.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from mqtt_persist.protocol._connect import _encode_connect, is_v5_level
from mqtt_persist.protocol._wire import (
    _MAX_U16,
    _RL1,
    _check_packet_id,
    _encode_pingreq,
    _encode_pingresp,
    _frame,
    _remaining_length,
    _utf8,
)
from mqtt_persist.protocol.packets import (
    NO_PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
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
from mqtt_persist.protocol.properties import _write_properties
from mqtt_persist.protocol.reason_codes import VALID_REASON_CODES

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
