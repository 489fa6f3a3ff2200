"""Sans-IO MQTT 3.1.1 packet codec: :func:`encode` turns a packet into bytes, :class:`Decoder`
turns a byte stream back into packets.

Design choices, and why:

* **Sans-IO.** The codec never touches a socket or an event loop. The asyncio client, the test
  proxy and the tests all drive the very same code with plain ``bytes``, so a framing bug cannot
  hide behind one transport, and the codec can be fuzzed without a network.

* **Both directions.** Every packet type encodes and decodes, including the server side (CONNACK,
  SUBACK, ...), because the test proxy and fake brokers speak the server side with this codec.

* **The encoder refuses, the decoder rejects.** ``encode`` raises :class:`ValueError` for a packet
  that must never reach the wire (a QoS 1 PUBLISH without packet id, a string over 65,535 bytes,
  ...): that is a bug in *our* caller, found before a byte is sent. ``Decoder.feed`` raises
  :class:`~mqtt_persist.errors.MalformedPacket` for bytes that are not valid MQTT 3.1.1: that is
  the *peer's* fault, and MQTT's answer is to close the connection (§4.8). Decoding is strict
  about what the specification makes a MUST (fixed-header flags, reserved bits, UTF-8 rules,
  packet id 0, trailing bytes, ...) because a lenient parser of a length-prefixed format only
  postpones the desynchronisation to a less explainable place. It stays lenient where strictness
  would only hide a more useful error (a CONNACK with a reserved return code, or with Session
  Present set on a refusal, is decoded and left for the session layer to refuse). Topic *semantics*
  (wildcards in a PUBLISH topic, empty topics) are the topic module's business, not the codec's.

* **A decoder that has raised is dead.** After a :class:`MalformedPacket` the stream position is
  unknown, so there is no honest way to resynchronise; every later ``feed`` raises again. The
  connection must be closed and a fresh :class:`Decoder` made for the next one.

* **Cheap on the hot path.** A client pushing tens of thousands of messages per second in pure
  Python spends a noticeable share of its time here, so:

  - ``feed`` parses straight out of the ``bytes`` it is given; only an incomplete tail is kept,
    in a ``bytearray``. While a large packet trickles in, ``feed`` just appends and compares the
    length with what the packet header announced, so a 10 MB PUBLISH arriving in 64 KB reads
    costs O(10 MB) in total, not O(10 MB) per read. Each byte is copied a small constant number
    of times (into and out of the tail buffer), however many packets share the read.
  - The header is validated from a 256-entry table indexed by the first byte (one lookup instead
    of a chain of comparisons), the one-byte remaining length (< 128, the common case) skips the
    varint loop, and PUBLISH and the two-byte-id acknowledgements are decoded inline in the loop,
    not through a dispatch call.
  - ``encode`` dispatches on the exact class through a dict and packs the fixed header of small
    packets with precomputed :class:`struct.Struct` objects.
  - The packet-size limit is checked as soon as the remaining length is known, before any of the
    body is buffered, so a peer cannot make us allocate a 256 MB buffer by announcing one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from mqtt_persist.errors import MalformedPacket
from mqtt_persist.protocol.packets import (
    SUBACK_FAILURE,
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
    UnsubAck,
    Unsubscribe,
    Will,
)

__all__ = ["MAX_PACKET_SIZE", "MAX_REMAINING_LENGTH", "Decoder", "encode"]

#: The largest remaining length the four-byte variable length encoding can carry (§2.2.3).
MAX_REMAINING_LENGTH: Final = 268_435_455
#: The largest possible MQTT packet: the first byte, four length bytes and the largest body.
MAX_PACKET_SIZE: Final = MAX_REMAINING_LENGTH + 5

_MAX_U16: Final = 0xFFFF

_U16 = struct.Struct("!H")
#: First byte, one-byte remaining length, and a 16-bit field (packet id or topic length).
_BBH = struct.Struct("!BBH")
#: Protocol level, connect flags, keepalive.
_CONNECT_TAIL = struct.Struct("!BBH")

#: The remaining-length encodings of 0..127, the common case, ready-made.
_RL1: Final = tuple(bytes((i,)) for i in range(128))

_PINGREQ: Final = b"\xc0\x00"
_PINGRESP: Final = b"\xd0\x00"
_DISCONNECT: Final = b"\xe0\x00"

_VALID_SUBACK_CODES: Final = frozenset((0, 1, 2, SUBACK_FAILURE))


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _remaining_length(n: int) -> bytes:
    if n < 128:
        return _RL1[n]
    if n > MAX_REMAINING_LENGTH:
        raise ValueError(
            f"packet too large: remaining length {n} exceeds the MQTT maximum "
            f"{MAX_REMAINING_LENGTH}"
        )
    out = bytearray()
    while n:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | 0x80 if n else byte)
    return bytes(out)


def _frame(first_byte: int, body: bytes) -> bytes:
    n = len(body)
    if n < 128:
        return bytes((first_byte, n)) + body
    return bytes((first_byte,)) + _remaining_length(n) + body


def _utf8(value: str, what: str) -> bytes:
    """``value`` as an MQTT UTF-8 string: length-prefixed, at most 65,535 bytes, no U+0000."""
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not encodable as UTF-8: {exc.reason}") from None
    if len(raw) > _MAX_U16:
        raise ValueError(f"{what} is {len(raw)} UTF-8 bytes; MQTT strings are at most 65535")
    if b"\x00" in raw:
        raise ValueError(f"{what} contains U+0000, which MQTT forbids in strings")
    return _U16.pack(len(raw)) + raw


def _binary(value: bytes, what: str) -> bytes:
    if len(value) > _MAX_U16:
        raise ValueError(f"{what} is {len(value)} bytes; MQTT binary fields are at most 65535")
    return _U16.pack(len(value)) + bytes(value)


def _check_packet_id(packet_id: int | None, what: str) -> int:
    if packet_id is None or not 0 < packet_id <= _MAX_U16:
        raise ValueError(f"{what} packet_id must be in 1..65535, got {packet_id!r}")
    return packet_id


def _encode_publish(p: Publish) -> bytes:
    topic = p.topic.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError
    tl = len(topic)
    if tl > _MAX_U16:
        raise ValueError(f"PUBLISH topic is {tl} UTF-8 bytes; MQTT strings are at most 65535")
    if b"\x00" in topic:
        raise ValueError("PUBLISH topic contains U+0000, which MQTT forbids in strings")
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


def _encode_puback(p: PubAck) -> bytes:
    pid = p.packet_id
    if pid is None or not 0 < pid <= _MAX_U16:
        raise ValueError(f"PUBACK packet_id must be in 1..65535, got {pid!r}")
    return _BBH.pack(0x40, 2, pid)


def _encode_pubrec(p: PubRec) -> bytes:
    return _BBH.pack(0x50, 2, _check_packet_id(p.packet_id, "PUBREC"))


def _encode_pubrel(p: PubRel) -> bytes:
    return _BBH.pack(0x62, 2, _check_packet_id(p.packet_id, "PUBREL"))


def _encode_pubcomp(p: PubComp) -> bytes:
    return _BBH.pack(0x70, 2, _check_packet_id(p.packet_id, "PUBCOMP"))


def _encode_unsuback(p: UnsubAck) -> bytes:
    return _BBH.pack(0xB0, 2, _check_packet_id(p.packet_id, "UNSUBACK"))


def _encode_connect(p: Connect) -> bytes:
    if not 0 <= p.keepalive <= _MAX_U16:
        raise ValueError(f"CONNECT keepalive must be in 0..65535, got {p.keepalive!r}")
    if not 0 <= p.protocol_level <= 0xFF:
        raise ValueError(f"CONNECT protocol_level must be in 0..255, got {p.protocol_level!r}")
    flags = 0x02 if p.clean_session else 0
    parts = [_utf8(p.protocol_name, "CONNECT protocol name"), b"", _utf8(p.client_id, "client id")]
    will = p.will
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"will qos must be 0, 1 or 2, got {will.qos!r}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        parts.append(_utf8(will.topic, "will topic"))
        parts.append(_binary(will.payload, "will payload"))
    if p.username is not None:
        flags |= 0x80
        parts.append(_utf8(p.username, "username"))
    if p.password is not None:
        if p.username is None:
            raise ValueError("MQTT 3.1.1 does not allow a password without a username")
        flags |= 0x40
        parts.append(_binary(p.password, "password"))
    parts[1] = _CONNECT_TAIL.pack(p.protocol_level, flags, p.keepalive)
    return _frame(0x10, b"".join(parts))


def _encode_connack(p: ConnAck) -> bytes:
    if not 0 <= p.return_code <= 0xFF:
        raise ValueError(f"CONNACK return_code must be in 0..255, got {p.return_code!r}")
    if p.session_present and p.return_code != 0:
        raise ValueError("a refusing CONNACK must not set session_present (MQTT-3.2.2-4)")
    return bytes((0x20, 2, 1 if p.session_present else 0, p.return_code))


def _encode_subscribe(p: Subscribe) -> bytes:
    pid = _check_packet_id(p.packet_id, "SUBSCRIBE")
    if not p.subscriptions:
        raise ValueError("a SUBSCRIBE needs at least one topic filter (MQTT-3.8.3-3)")
    parts = [_U16.pack(pid)]
    for topic_filter, qos in p.subscriptions:
        if qos not in (0, 1, 2):
            raise ValueError(f"SUBSCRIBE requested qos must be 0, 1 or 2, got {qos!r}")
        parts.append(_utf8(topic_filter, "SUBSCRIBE topic filter"))
        parts.append(_RL1[qos])
    return _frame(0x82, b"".join(parts))


def _encode_suback(p: SubAck) -> bytes:
    pid = _check_packet_id(p.packet_id, "SUBACK")
    if not p.return_codes:
        raise ValueError("a SUBACK needs at least one return code")
    for code in p.return_codes:
        if code not in _VALID_SUBACK_CODES:
            raise ValueError(f"SUBACK return code must be 0, 1, 2 or 0x80, got {code!r}")
    return _frame(0x90, _U16.pack(pid) + bytes(p.return_codes))


def _encode_unsubscribe(p: Unsubscribe) -> bytes:
    pid = _check_packet_id(p.packet_id, "UNSUBSCRIBE")
    if not p.filters:
        raise ValueError("an UNSUBSCRIBE needs at least one topic filter (MQTT-3.10.3-2)")
    parts = [_U16.pack(pid)]
    parts.extend(_utf8(f, "UNSUBSCRIBE topic filter") for f in p.filters)
    return _frame(0xA2, b"".join(parts))


def _encode_pingreq(p: PingReq) -> bytes:
    return _PINGREQ


def _encode_pingresp(p: PingResp) -> bytes:
    return _PINGRESP


def _encode_disconnect(p: Disconnect) -> bytes:
    return _DISCONNECT


_ENCODERS: Final[dict[type[Any], Callable[[Any], bytes]]] = {
    Publish: _encode_publish,
    PubAck: _encode_puback,
    PubRec: _encode_pubrec,
    PubRel: _encode_pubrel,
    PubComp: _encode_pubcomp,
    Connect: _encode_connect,
    ConnAck: _encode_connack,
    Subscribe: _encode_subscribe,
    SubAck: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    UnsubAck: _encode_unsuback,
    PingReq: _encode_pingreq,
    PingResp: _encode_pingresp,
    Disconnect: _encode_disconnect,
}


def encode(packet: Packet) -> bytes:
    """Return the wire bytes of ``packet``.

    Raises :class:`ValueError` if the packet must not be sent: a packet id outside 1..65535 (or
    missing on a QoS 1/2 PUBLISH, or present on a QoS 0 one), a QoS outside 0..2, a string over
    65,535 UTF-8 bytes or containing U+0000 or a lone surrogate, a binary field over 65,535
    bytes, a body over 268,435,455 bytes, an empty SUBSCRIBE/UNSUBSCRIBE/SUBACK, a password
    without a username, and the other combinations MQTT 3.1.1 forbids.
    """
    encoder = _ENCODERS.get(packet.__class__)
    if encoder is None:
        for cls in type(packet).__mro__:  # a subclass of a packet class
            encoder = _ENCODERS.get(cls)
            if encoder is not None:
                break
        else:
            raise TypeError(f"not an MQTT packet: {packet!r}")
    return encoder(packet)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _first_byte_error(b0: int) -> str | None:
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
_FIRST_BYTE_ERRORS: Final = tuple(_first_byte_error(b) for b in range(256))

#: Packets whose whole body is a two-byte packet id.
_ID_ONLY: Final[dict[int, Callable[[int], Packet]]] = {
    4: PubAck,
    5: PubRec,
    6: PubRel,
    7: PubComp,
    11: UnsubAck,
}


def _read_str(src: bytes, p: int, end: int, what: str) -> tuple[str, int]:
    if p + 2 > end:
        raise MalformedPacket(f"{what}: truncated length prefix")
    q = p + 2 + ((src[p] << 8) | src[p + 1])
    if q > end:
        raise MalformedPacket(f"{what}: string length runs {q - end} bytes past the packet end")
    try:
        value = src[p + 2 : q].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPacket(f"{what}: invalid UTF-8 ({exc.reason})") from None
    if "\x00" in value:
        raise MalformedPacket(f"{what}: contains U+0000 (MQTT-1.5.3-2)")
    return value, q


def _read_binary(src: bytes, p: int, end: int, what: str) -> tuple[bytes, int]:
    if p + 2 > end:
        raise MalformedPacket(f"{what}: truncated length prefix")
    q = p + 2 + ((src[p] << 8) | src[p + 1])
    if q > end:
        raise MalformedPacket(f"{what}: length runs {q - end} bytes past the packet end")
    return src[p + 2 : q], q


def _read_packet_id(src: bytes, p: int, end: int, what: str) -> int:
    if p + 2 > end:
        raise MalformedPacket(f"{what}: truncated packet identifier")
    pid = (src[p] << 8) | src[p + 1]
    if pid == 0:
        raise MalformedPacket(f"{what} with packet identifier 0 (MQTT-2.3.1-1)")
    return pid


def _decode_connect(src: bytes, p: int, end: int, b0: int) -> Connect:
    name, p = _read_str(src, p, end, "CONNECT protocol name")
    if p + 4 > end:
        raise MalformedPacket("CONNECT: truncated variable header")
    level, flags, keepalive = _CONNECT_TAIL.unpack_from(src, p)
    p += 4
    if flags & 0x01:
        raise MalformedPacket("CONNECT with the reserved connect flag (bit 0) set (MQTT-3.1.2-3)")
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("CONNECT with will QoS/retain set but no will flag (MQTT-3.1.2-11)")
    if will_qos == 3:
        raise MalformedPacket("CONNECT with will QoS 3 (MQTT-3.1.2-14)")
    if flags & 0x40 and not flags & 0x80:
        raise MalformedPacket("CONNECT with a password but no username (MQTT-3.1.2-22)")
    client_id, p = _read_str(src, p, end, "CONNECT client id")
    will = None
    if will_flag:
        topic, p = _read_str(src, p, end, "CONNECT will topic")
        payload, p = _read_binary(src, p, end, "CONNECT will payload")
        will = Will(topic, payload, will_qos, will_retain)
    username = None
    if flags & 0x80:
        username, p = _read_str(src, p, end, "CONNECT username")
    password = None
    if flags & 0x40:
        password, p = _read_binary(src, p, end, "CONNECT password")
    if p != end:
        raise MalformedPacket(f"CONNECT: {end - p} unexpected bytes after the payload")
    return Connect(
        client_id=client_id,
        clean_session=bool(flags & 0x02),
        keepalive=keepalive,
        username=username,
        password=password,
        will=will,
        protocol_level=level,
        protocol_name=name,
    )


def _decode_connack(src: bytes, p: int, end: int, b0: int) -> ConnAck:
    if end - p != 2:
        raise MalformedPacket(f"CONNACK with remaining length {end - p}, must be 2")
    ack_flags = src[p]
    if ack_flags & 0xFE:
        raise MalformedPacket(
            f"CONNACK with reserved acknowledge flag bits set (0x{ack_flags:02x}, MQTT-3.2.2-1)"
        )
    return ConnAck(bool(ack_flags), src[p + 1])


def _decode_subscribe(src: bytes, p: int, end: int, b0: int) -> Subscribe:
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


def _decode_suback(src: bytes, p: int, end: int, b0: int) -> SubAck:
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


def _decode_unsubscribe(src: bytes, p: int, end: int, b0: int) -> Unsubscribe:
    pid = _read_packet_id(src, p, end, "UNSUBSCRIBE")
    p += 2
    filters: list[str] = []
    while p < end:
        topic_filter, p = _read_str(src, p, end, "UNSUBSCRIBE topic filter")
        filters.append(topic_filter)
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE with no topic filters (MQTT-3.10.3-2)")
    return Unsubscribe(pid, filters)


def _decode_empty(src: bytes, p: int, end: int, b0: int) -> Packet:
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
    2: _decode_connack,
    8: _decode_subscribe,
    9: _decode_suback,
    10: _decode_unsubscribe,
    12: _decode_empty,
    13: _decode_empty,
    14: _decode_empty,
}


def _decode_all(src: bytes, max_size: int) -> tuple[list[Packet], int, int]:
    """Decode every complete packet of ``src``.

    Returns the packets, the offset of the first byte not consumed, and how many bytes (counted
    from that offset) the next packet needs before it is worth parsing again.
    """
    out: list[Packet] = []
    append = out.append
    first_byte_errors = _FIRST_BYTE_ERRORS
    id_only = _ID_ONLY
    n = len(src)
    pos = 0
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
            raise MalformedPacket(
                f"packet of {end - pos} bytes exceeds the maximum packet size {max_size}"
            )
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
        elif ptype in id_only:
            if rl != 2:
                raise MalformedPacket(
                    f"{PacketType(ptype).name} with remaining length {rl}, must be 2"
                )
            pid = (src[start] << 8) | src[start + 1]
            if pid == 0:
                raise MalformedPacket(
                    f"{PacketType(ptype).name} with packet identifier 0 (MQTT-2.3.1-1)"
                )
            append(id_only[ptype](pid))
        else:
            append(_BODY_DECODERS[ptype](src, start, end, b0))
        pos = end
    return out, pos, 0


class Decoder:
    """Incremental MQTT 3.1.1 decoder for one connection, in either direction.

    Feed it the bytes read from the transport, in chunks of any size; it returns every packet
    completed so far and keeps the incomplete tail for the next call.

    If a call raises :class:`~mqtt_persist.errors.MalformedPacket`, the decoder is dead: the
    packets decoded before the bad one in that same call are lost along with the stream
    position, every later :meth:`feed` raises again, and the connection must be closed
    (MQTT 3.1.1 §4.8). Use a new Decoder for the next connection.
    """

    __slots__ = ("_buf", "_error", "_max_packet_size", "_need")

    def __init__(self, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        if max_packet_size < 2:
            raise ValueError(f"max_packet_size must be at least 2, got {max_packet_size!r}")
        self._max_packet_size = max_packet_size
        self._buf = bytearray()
        #: Bytes ``_buf`` must hold before parsing it again can produce a packet.
        self._need = 0
        self._error: MalformedPacket | None = None

    @property
    def max_packet_size(self) -> int:
        """The largest packet (first byte, length bytes and body) this decoder accepts."""
        return self._max_packet_size

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete packet are waiting for the rest."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Consume ``data`` and return the packets it completes, oldest first.

        Raises :class:`~mqtt_persist.errors.MalformedPacket` if the stream is not valid MQTT
        3.1.1, or a packet announces more than ``max_packet_size`` bytes (raised as soon as its
        length is known, before its body arrives). After that the decoder is dead.
        """
        if self._error is not None:
            raise MalformedPacket(f"decoder already failed: {self._error}")
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            src = bytes(buf)
            buf.clear()
        elif isinstance(data, bytes):
            src = data
        else:
            src = bytes(data)
        try:
            packets, pos, need = _decode_all(src, self._max_packet_size)
        except MalformedPacket as exc:
            self._error = exc
            raise
        if pos < len(src):
            buf += memoryview(src)[pos:]
            self._need = need
        return packets
