"""Sans-IO MQTT packet codec, 3.1.1 and 5: :func:`encode` turns a packet into bytes,
:class:`Decoder` turns a byte stream back into packets.

The protocol version is chosen per connection: ``encode(packet, protocol_version=5)`` and
``Decoder(protocol_version=5)``; both default to 3.1.1, so code written for 3.1.1 is unchanged.
This module holds the public API; each version's packet code is in its own module,
:mod:`._v311` and :mod:`._v5` (the same interface: ``ENCODERS`` and ``decode_all``), CONNECT (whose
layout follows its own protocol level) in :mod:`._connect`, the primitives both share in
:mod:`._wire`, the property codec in :mod:`.properties`.

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

from collections.abc import Callable
from typing import Any, Final

from mqtt_persist.errors import MalformedPacket
from mqtt_persist.protocol import _v5, _v311
from mqtt_persist.protocol._wire import MAX_PACKET_SIZE, MAX_REMAINING_LENGTH
from mqtt_persist.protocol.packets import MQTT_3_1_1, MQTT_5, Connect, Packet

__all__ = ["MAX_PACKET_SIZE", "MAX_REMAINING_LENGTH", "Decoder", "encode"]

#: Per protocol version (3 encodes like 4: MQTT 3.1 differs only in CONNECT), the packet encoders.
_ENCODERS_BY_VERSION: Final = {3: _v311.ENCODERS, MQTT_3_1_1: _v311.ENCODERS, MQTT_5: _v5.ENCODERS}


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


_Decode = Callable[[bytes, int, int], tuple[list[Packet], int, int]]


def _decode_function(protocol_version: int) -> _Decode:
    if protocol_version == MQTT_5:
        return _v5.decode_all
    if protocol_version in (3, MQTT_3_1_1):
        return _v311.decode_all
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
