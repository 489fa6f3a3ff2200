"""The wire primitives both protocol versions share: integers, strings, binary data, framing.

Writers raise :class:`ValueError` (a bug in our caller, found before a byte is sent); readers
raise :class:`~mqtt_persist.errors.MalformedPacket` (the peer's fault) and never read past the
``end`` they are given, so every length the peer chose is checked against bytes that already
arrived before anything is allocated for it.
"""

from __future__ import annotations

import struct
from typing import Final

from mqtt_persist.errors import MalformedPacket

#: The largest remaining length the four-byte variable length encoding can carry (§2.2.3).
MAX_REMAINING_LENGTH: Final = 268_435_455
#: The largest possible MQTT packet: the first byte, four length bytes and the largest body.
MAX_PACKET_SIZE: Final = MAX_REMAINING_LENGTH + 5

_MAX_U16: Final = 0xFFFF
_MAX_U32: Final = 0xFFFF_FFFF

_U16 = struct.Struct("!H")
#: First byte, one-byte remaining length, and a 16-bit field (packet id or topic length).
_BBH = struct.Struct("!BBH")
#: Protocol level, connect flags, keepalive.
_CONNECT_TAIL = struct.Struct("!BBH")

#: The one-byte encodings of 0..127 (remaining lengths, property lengths), ready-made.
_RL1: Final = tuple(bytes((i,)) for i in range(128))


def _remaining_length(n: int) -> bytes:
    """``n`` as a variable byte integer (§1.5.5), at most 268,435,455."""
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


def _encode_pingreq(p: object) -> bytes:
    """PINGREQ: the same two bytes in every protocol version."""
    return b"\xc0\x00"


def _encode_pingresp(p: object) -> bytes:
    """PINGRESP: the same two bytes in every protocol version."""
    return b"\xd0\x00"


def _frame(first_byte: int, body: bytes) -> bytes:
    n = len(body)
    if n < 128:
        return bytes((first_byte, n)) + body
    return bytes((first_byte,)) + _remaining_length(n) + body


def _utf8(value: str, what: str) -> bytes:
    """``value`` as an MQTT UTF-8 string: length-prefixed, at most 65,535 bytes, no U+0000."""
    try:
        raw = value.encode()  # UTF-8
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not encodable as UTF-8: {exc.reason}") from None
    except AttributeError:
        raise ValueError(f"{what} must be a str, got {type(value).__name__}") from None
    if len(raw) > _MAX_U16:
        raise ValueError(f"{what} is {len(raw)} UTF-8 bytes; MQTT strings are at most 65535")
    if b"\x00" in raw:
        raise ValueError(f"{what} contains U+0000, which MQTT forbids in strings")
    return _U16.pack(len(raw)) + raw


#: A tuple, not ``bytes | bytearray | memoryview``: isinstance() takes it faster, and the union
#: would be rebuilt on every call.
_BYTES_LIKE: Final = (bytes, bytearray, memoryview)


def _binary(value: bytes, what: str) -> bytes:
    if not isinstance(value, _BYTES_LIKE):
        raise ValueError(f"{what} must be bytes, got {type(value).__name__}")
    if len(value) > _MAX_U16:
        raise ValueError(f"{what} is {len(value)} bytes; MQTT binary fields are at most 65535")
    return _U16.pack(len(value)) + bytes(value)


def _check_packet_id(packet_id: int | None, what: str) -> int:
    if packet_id is None or not 0 < packet_id <= _MAX_U16:
        raise ValueError(f"{what} packet_id must be in 1..65535, got {packet_id!r}")
    return packet_id


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


def _read_vbi(src: bytes, p: int, end: int, what: str) -> tuple[int, int]:
    """A variable byte integer in its shortest form, as MQTT 5 requires (MQTT-1.5.5-1)."""
    value = 0
    for shift in (0, 7, 14, 21):
        if p >= end:
            raise MalformedPacket(f"{what}: truncated variable byte integer")
        b = src[p]
        p += 1
        value |= (b & 0x7F) << shift
        if b < 128:
            if b == 0 and shift:
                raise MalformedPacket(
                    f"{what}: variable byte integer not in its shortest form (MQTT-1.5.5-1)"
                )
            return value, p
    raise MalformedPacket(f"{what}: variable byte integer longer than 4 bytes (§1.5.5)")
