"""CONNECT, in both layouts. CONNECT is the one packet whose format does not depend on the
connection's protocol version, because it announces that version: its protocol level byte
(5 = MQTT 5, anything else the 3.1.1 layout, §3.1.2.2) chooses how the rest is read, and a
server's decoder takes the version of the rest of the stream from it."""

from __future__ import annotations

from mqtt_persist.errors import MalformedPacket
from mqtt_persist.protocol._wire import (
    _CONNECT_TAIL,
    _MAX_U16,
    _binary,
    _frame,
    _read_binary,
    _read_str,
    _utf8,
)
from mqtt_persist.protocol.packets import MQTT_5, Connect, PacketType, Will
from mqtt_persist.protocol.properties import _WILL, _read_properties, _write_properties


def is_v5_level(level: int) -> bool:
    """Whether a CONNECT protocol level means MQTT 5 (bit 7 is mosquitto's bridge marker)."""
    return level & 0x7F == MQTT_5


def _encode_connect(p: Connect) -> bytes:
    """CONNECT in the layout its ``protocol_level`` chooses."""
    v5 = is_v5_level(p.protocol_level)
    if not 0 <= p.keepalive <= _MAX_U16:
        raise ValueError(f"CONNECT keepalive must be in 0..65535, got {p.keepalive!r}")
    if not 0 <= p.protocol_level <= 0xFF:
        raise ValueError(f"CONNECT protocol_level must be in 0..255, got {p.protocol_level!r}")
    if not v5 and p.properties:
        raise ValueError("CONNECT properties need MQTT 5 (protocol_level 5)")
    flags = 0x02 if p.clean_session else 0
    parts = [_utf8(p.protocol_name, "CONNECT protocol name"), b""]
    if v5:
        parts.append(_write_properties(p.properties, PacketType.CONNECT, "CONNECT"))
    parts.append(_utf8(p.client_id, "client id"))
    will = p.will
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"will qos must be 0, 1 or 2, got {will.qos!r}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        if v5:
            parts.append(_write_properties(will.properties, _WILL, "CONNECT will"))
        elif will.properties:
            raise ValueError("will properties need MQTT 5 (protocol_level 5)")
        parts.append(_utf8(will.topic, "will topic"))
        parts.append(_binary(will.payload, "will payload"))
    if p.username is not None:
        flags |= 0x80
        parts.append(_utf8(p.username, "username"))
    if p.password is not None:
        if p.username is None and not v5:
            raise ValueError("MQTT 3.1.1 does not allow a password without a username")
        flags |= 0x40
        parts.append(_binary(p.password, "password"))
    parts[1] = _CONNECT_TAIL.pack(p.protocol_level, flags, p.keepalive)
    return _frame(0x10, b"".join(parts))


def _decode_connect(src: bytes, p: int, end: int, b0: int) -> Connect:
    name, p = _read_str(src, p, end, "CONNECT protocol name")
    if p + 4 > end:
        raise MalformedPacket("CONNECT: truncated variable header")
    level, flags, keepalive = _CONNECT_TAIL.unpack_from(src, p)
    p += 4
    v5 = is_v5_level(level)
    if flags & 0x01:
        raise MalformedPacket("CONNECT with the reserved connect flag (bit 0) set (MQTT-3.1.2-3)")
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("CONNECT with will QoS/retain set but no will flag (MQTT-3.1.2-11)")
    if will_qos == 3:
        raise MalformedPacket("CONNECT with will QoS 3 (MQTT-3.1.2-14)")
    if flags & 0x40 and not flags & 0x80 and not v5:
        raise MalformedPacket("CONNECT with a password but no username (MQTT-3.1.2-22)")
    properties = None
    if v5:
        properties, p = _read_properties(src, p, end, PacketType.CONNECT, "CONNECT")
    client_id, p = _read_str(src, p, end, "CONNECT client id")
    will = None
    if will_flag:
        will_properties = None
        if v5:
            will_properties, p = _read_properties(src, p, end, _WILL, "CONNECT will")
        topic, p = _read_str(src, p, end, "CONNECT will topic")
        payload, p = _read_binary(src, p, end, "CONNECT will payload")
        will = Will(topic, payload, will_qos, will_retain)
        if will_properties is not None:
            will.properties = will_properties
    username = None
    if flags & 0x80:
        username, p = _read_str(src, p, end, "CONNECT username")
    password = None
    if flags & 0x40:
        password, p = _read_binary(src, p, end, "CONNECT password")
    if p != end:
        raise MalformedPacket(f"CONNECT: {end - p} unexpected bytes after the payload")
    connect = Connect(
        client_id=client_id,
        clean_session=bool(flags & 0x02),
        keepalive=keepalive,
        username=username,
        password=password,
        will=will,
        protocol_level=level,
        protocol_name=name,
    )
    if properties is not None:
        connect.properties = properties
    return connect
