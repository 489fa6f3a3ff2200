"""Sans-IO MQTT packet codec, 3.1.1 and 5: :func:`encode` turns a packet into bytes,
:class:`Decoder` turns a byte stream back into packets.

The protocol version is chosen per connection: ``encode(packet, protocol_version=5)`` and
``Decoder(protocol_version=5)``; both default to 3.1.1, so code written for 3.1.1 is unchanged.
This module holds the public API and the 3.1.1 packet code; the MQTT 5 packet code is in
:mod:`._v5`, CONNECT (whose layout follows its own protocol level) in :mod:`._connect`, the
property codec in :mod:`.properties`.

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
    body is buffered, so a peer cannot make us allocate a 256 MB buffer by announcing one. The
    buffer only ever holds bytes that really arrived, and every count inside a packet (string
    lengths, property lengths, a flood of properties) is checked against those bytes before it
    is used, so no allocation is sized by what the peer *announced*.

* **The default packet-size limit is the protocol maximum.** A smaller default would be safe in
  MQTT 5, where CONNECT announces it (Maximum Packet Size) and the broker must not send more; in
  3.1.1 nothing tells the broker, so a message over our limit would be refused again after every
  reconnect: a QoS 1 message redelivered forever, a livelock. The limit guards memory against an
  *announced* size, which it does at any value; a client that expects hostile brokers, or runs
  MQTT 5, passes a smaller one (and announces it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from mqtt_persist.errors import MalformedPacket, PacketTooLarge
from mqtt_persist.protocol import _v5
from mqtt_persist.protocol._connect import _decode_connect, _encode_connect, is_v5_level
from mqtt_persist.protocol._wire import (
    _MAX_U16,
    _RL1,
    MAX_PACKET_SIZE,
    MAX_REMAINING_LENGTH,
    _check_packet_id,
    _frame,
    _read_packet_id,
    _read_str,
    _remaining_length,
    _utf8,
)
from mqtt_persist.protocol.packets import (
    MQTT_3_1_1,
    MQTT_5,
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

__all__ = ["MAX_PACKET_SIZE", "MAX_REMAINING_LENGTH", "Decoder", "encode"]

_PINGREQ: Final = b"\xc0\x00"
_PINGRESP: Final = b"\xd0\x00"
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


def _encode_publish(p: Publish) -> bytes:
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


def _encode_puback(p: PubAck) -> bytes:
    pid = p.packet_id
    if pid is None or not 0 < pid <= _MAX_U16:
        raise ValueError(f"PUBACK packet_id must be in 1..65535, got {pid!r}")
    if p.reason_code or (p.properties is not NO_PROPERTIES and p.properties):
        raise _refuse_v5("PUBACK reason codes and properties")
    return _BBH.pack(0x40, 2, pid)


def _encode_pubrec(p: PubRec) -> bytes:
    if p.reason_code or (p.properties is not NO_PROPERTIES and p.properties):
        raise _refuse_v5("PUBREC reason codes and properties")
    return _BBH.pack(0x50, 2, _check_packet_id(p.packet_id, "PUBREC"))


def _encode_pubrel(p: PubRel) -> bytes:
    if p.reason_code or (p.properties is not NO_PROPERTIES and p.properties):
        raise _refuse_v5("PUBREL reason codes and properties")
    return _BBH.pack(0x62, 2, _check_packet_id(p.packet_id, "PUBREL"))


def _encode_pubcomp(p: PubComp) -> bytes:
    if p.reason_code or (p.properties is not NO_PROPERTIES and p.properties):
        raise _refuse_v5("PUBCOMP reason codes and properties")
    return _BBH.pack(0x70, 2, _check_packet_id(p.packet_id, "PUBCOMP"))


def _encode_unsuback(p: UnsubAck) -> bytes:
    if p.reason_codes or p.properties:
        raise _refuse_v5("UNSUBACK reason codes and properties")
    return _BBH.pack(0xB0, 2, _check_packet_id(p.packet_id, "UNSUBACK"))


def _encode_connect_v311(p: Connect) -> bytes:
    if is_v5_level(p.protocol_level):
        raise ValueError("a CONNECT with protocol_level 5 must be encoded with protocol_version=5")
    return _encode_connect(p)


def _encode_connack(p: ConnAck) -> bytes:
    if not 0 <= p.return_code <= 0xFF:
        raise ValueError(f"CONNACK return_code must be in 0..255, got {p.return_code!r}")
    if p.session_present and p.return_code != 0:
        raise ValueError("a refusing CONNACK must not set session_present (MQTT-3.2.2-4)")
    if p.properties:
        raise _refuse_v5("CONNACK properties")
    return bytes((0x20, 2, 1 if p.session_present else 0, p.return_code))


def _encode_subscribe(p: Subscribe) -> bytes:
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


def _encode_suback(p: SubAck) -> bytes:
    pid = _check_packet_id(p.packet_id, "SUBACK")
    if not p.return_codes:
        raise ValueError("a SUBACK needs at least one return code")
    if p.properties:
        raise _refuse_v5("SUBACK properties")
    for code in p.return_codes:
        if code not in _VALID_SUBACK_CODES:
            raise ValueError(f"SUBACK return code must be 0, 1, 2 or 0x80, got {code!r}")
    return _frame(0x90, _U16.pack(pid) + bytes(p.return_codes))


def _encode_unsubscribe(p: Unsubscribe) -> bytes:
    pid = _check_packet_id(p.packet_id, "UNSUBSCRIBE")
    if not p.filters:
        raise ValueError("an UNSUBSCRIBE needs at least one topic filter (MQTT-3.10.3-2)")
    if p.properties:
        raise _refuse_v5("UNSUBSCRIBE properties")
    parts = [_U16.pack(pid)]
    parts.extend(_utf8(f, "UNSUBSCRIBE topic filter") for f in p.filters)
    return _frame(0xA2, b"".join(parts))


def _encode_pingreq(p: PingReq) -> bytes:
    return _PINGREQ


def _encode_pingresp(p: PingResp) -> bytes:
    return _PINGRESP


def _encode_disconnect(p: Disconnect) -> bytes:
    if p.reason_code or p.properties:
        raise _refuse_v5("DISCONNECT reason codes and properties")
    return _DISCONNECT


def _encode_auth(p: Auth) -> bytes:
    raise _refuse_v5("AUTH packets")


_ENCODERS: Final[dict[type[Any], Callable[[Any], bytes]]] = {
    Publish: _encode_publish,
    PubAck: _encode_puback,
    PubRec: _encode_pubrec,
    PubRel: _encode_pubrel,
    PubComp: _encode_pubcomp,
    Connect: _encode_connect_v311,
    ConnAck: _encode_connack,
    Subscribe: _encode_subscribe,
    SubAck: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    UnsubAck: _encode_unsuback,
    PingReq: _encode_pingreq,
    PingResp: _encode_pingresp,
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}


_ENCODERS_BY_VERSION: Final = {3: _ENCODERS, MQTT_3_1_1: _ENCODERS, MQTT_5: _v5.ENCODERS}


def _find_encoder(packet: Packet, protocol_version: int) -> Callable[[Any], bytes]:
    encoders = _ENCODERS_BY_VERSION.get(protocol_version)
    if encoders is None:
        raise ValueError(f"protocol_version must be 3, 4 or 5, got {protocol_version!r}")
    for cls in type(packet).__mro__:  # a subclass of a packet class
        encoder = encoders.get(cls)
        if encoder is not None:
            return encoder
    raise TypeError(f"not an MQTT packet: {packet!r}")


def encode(packet: Packet, protocol_version: int = MQTT_3_1_1) -> bytes:
    """Return the wire bytes of ``packet`` in ``protocol_version`` (4 = 3.1.1, 5 = MQTT 5; 3
    encodes like 4, MQTT 3.1 differing only in CONNECT, whose ``protocol_level`` says so).

    Raises :class:`ValueError` if the packet must not be sent: a packet id outside 1..65535 (or
    missing on a QoS 1/2 PUBLISH, or present on a QoS 0 one), a QoS outside 0..2, a string over
    65,535 UTF-8 bytes or containing U+0000 or a lone surrogate, a binary field over 65,535
    bytes, a body over 268,435,455 bytes, an empty SUBSCRIBE/UNSUBSCRIBE/SUBACK, and the other
    combinations the protocol forbids: in 3.1.1 a password without a username, or any MQTT 5
    field (properties, a reason code, subscription options beyond QoS, AUTH); in MQTT 5 a reason
    code the packet type does not define, a property it may not carry or a value out of range,
    an empty topic without a Topic Alias. A CONNECT must agree with ``protocol_version``: its
    ``protocol_level`` is 5 exactly when encoding MQTT 5.
    """
    try:
        encoder = _ENCODERS_BY_VERSION[protocol_version][packet.__class__]
    except KeyError:
        encoder = _find_encoder(packet, protocol_version)
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


def _decode_empty(src: bytes, p: int, end: int, b0: int) -> PingReq | PingResp | Disconnect:
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


def _decode_all(src: bytes, max_size: int, pos: int = 0) -> tuple[list[Packet], int, int]:
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


_Decode = Callable[[bytes, int, int], tuple[list[Packet], int, int]]


def _decode_function(protocol_version: int) -> _Decode:
    if protocol_version == MQTT_5:
        return _v5.decode_all
    if protocol_version in (3, MQTT_3_1_1):
        return _decode_all
    raise ValueError(f"protocol_version must be 3, 4 or 5, got {protocol_version!r}")


class Decoder:
    """Incremental MQTT decoder for one connection, in either direction.

    Feed it the bytes read from the transport, in chunks of any size; it returns every packet
    completed so far and keeps the incomplete tail for the next call.

    ``protocol_version`` (4 = 3.1.1, the default; 5 = MQTT 5; 3 decodes like 4) is the format of
    the stream. A client knows it from the CONNECT it sent. A server learns it from the CONNECT
    it receives: a decoded CONNECT switches the decoder to the version it announces, for the
    rest of the stream (bytes after it in the same read included), so a broker-side decoder can
    start with the default.

    ``max_packet_size`` bounds a whole packet (first byte, length bytes and body, the measure of
    MQTT 5's Maximum Packet Size); a packet announcing more raises
    :class:`~mqtt_persist.errors.PacketTooLarge` as soon as its fixed header is read, before its
    body is buffered. The default is the protocol maximum (see the module docstring for why).

    If a call raises :class:`~mqtt_persist.errors.MalformedPacket`, the decoder is dead: the
    packets decoded before the bad one in that same call are lost along with the stream
    position, every later :meth:`feed` raises again, and the connection must be closed
    (MQTT 3.1.1 §4.8, MQTT 5 §4.13). Use a new Decoder for the next connection.
    """

    __slots__ = ("_buf", "_decode", "_error", "_max_packet_size", "_need", "_protocol_version")

    def __init__(
        self, max_packet_size: int = MAX_PACKET_SIZE, protocol_version: int = MQTT_3_1_1
    ) -> None:
        if max_packet_size < 2:
            raise ValueError(f"max_packet_size must be at least 2, got {max_packet_size!r}")
        self._max_packet_size = max_packet_size
        self._decode = _decode_function(protocol_version)
        self._protocol_version = protocol_version
        self._buf = bytearray()
        #: Bytes ``_buf`` must hold before parsing it again can produce a packet.
        self._need = 0
        self._error: MalformedPacket | None = None

    @property
    def max_packet_size(self) -> int:
        """The largest packet (first byte, length bytes and body) this decoder accepts."""
        return self._max_packet_size

    @property
    def protocol_version(self) -> int:
        """The version the stream is decoded as now (a decoded CONNECT may have changed it)."""
        return self._protocol_version

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete packet are waiting for the rest."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Consume ``data`` and return the packets it completes, oldest first.

        Raises :class:`~mqtt_persist.errors.MalformedPacket` if the stream is not valid MQTT of
        the decoder's version, or :class:`~mqtt_persist.errors.PacketTooLarge` if a packet
        announces more than ``max_packet_size`` bytes (raised as soon as its length is known,
        before its body arrives). After that the decoder is dead.
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
        decode = self._decode  # a local: calling a function held in a slot directly is slower
        try:
            packets, pos, need = decode(src, self._max_packet_size, 0)
            while need < 0:  # stopped after a CONNECT: it sets the version of what follows
                connect = packets[-1]
                assert isinstance(connect, Connect)
                decode = self._adopt_version(connect.protocol_level)
                more, pos, need = decode(src, self._max_packet_size, pos)
                packets += more
        except MalformedPacket as exc:
            self._error = exc
            raise
        if pos < len(src):
            buf += memoryview(src)[pos:]
            self._need = need
        return packets

    def _adopt_version(self, protocol_level: int) -> _Decode:
        level = protocol_level & 0x7F  # bit 7: mosquitto's bridge marker
        version = level if level in (3, MQTT_3_1_1, MQTT_5) else MQTT_3_1_1
        self._protocol_version = version
        self._decode = _decode_function(version)
        return self._decode
