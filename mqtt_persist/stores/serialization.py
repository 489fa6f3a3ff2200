"""A compact binary encoding of session operations, shared by every store that writes bytes.

Each operation is one type byte followed by fixed-size little-endian fields packed with
:mod:`struct`; strings are UTF-8 with a length prefix and payloads are raw bytes with a length
prefix. The encoding is self-delimiting, so a batch is simply the concatenation of its
operations and needs no framing of its own. It carries no checksum and no version: the medium
that stores it (a journal record, a database row, a Redis list entry) frames it, checks it and
records the format version, and turns :class:`DecodeError` into
:class:`~mqtt_persist.errors.SessionCorrupt`.

Layouts (``<`` little-endian; ``q`` int64, ``d`` float64, ``I`` uint32, ``H`` uint16, ``B``
uint8; ``[...]`` only when its flag is set)::

    MessageAdded         B type 1, q seq, B flags, H packet_id, H topic_len, I payload_len,
                         [d expires_at], [I properties_len, properties], topic, payload
                             flags: qos | 4 retain | 8 has packet_id | 16 released
                                    | 32 expires_at (v2) | 64 properties, never empty (v2)
    PacketIdAssigned     B type 2, q seq, H packet_id
    MessageReleased      B type 3, q seq      (also 4 MessageRequeued, 5 MessageRemoved,
                                               14 SetAsideRemoved)
    InboundReceived      B type 6, H packet_id  (also 7 InboundReleased)
    InboundCleared       B type 8
    SubscriptionSet      B type 9, B flags, H filter_len, filter, [B options],
                         [I subscription_id]
                             flags: qos | 4 confirmed | 8 options, never 0 (v2)
                                    | 16 subscription_id, 1..268,435,455 (v2)
    SubscriptionRemoved  B type 10, B flags, H filter_len, filter  flags: 1 unsubscribe_pending
    UnsubscribeDone      B type 11, B flags (0), H filter_len, filter
    ProtocolVersionSet   B type 12, B version (4 or 5)                                     (v2)
    MessageSetAside      B type 13, q seq, d at, H reason_len, reason                      (v2)

Type bytes and layouts are part of the on-disk format: never renumber or change them. A new
field is either a new type byte or an optional field behind a flag bit that every earlier
version refused (so earlier data decodes exactly as before); either way the version the stores
record goes up. Version 2 added the fields and types marked (v2). The encoding is canonical
(whatever decodes re-encodes to the same bytes): a flag is set exactly when its field is not
the default, and floats are finite.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mqtt_persist.errors import StoreError
from mqtt_persist.session.state import (
    InboundCleared,
    InboundReceived,
    InboundReleased,
    MessageAdded,
    MessageReleased,
    MessageRemoved,
    MessageRequeued,
    MessageSetAside,
    Operation,
    PacketIdAssigned,
    ProtocolVersionSet,
    SetAsideRemoved,
    StoredMessage,
    SubscriptionRemoved,
    SubscriptionSet,
    UnsubscribeDone,
)

__all__ = [
    "ENCODING_VERSION",
    "DecodeError",
    "EncodeError",
    "SerializationError",
    "decode_operation",
    "decode_operation_from",
    "decode_operations",
    "encode_operation",
    "encode_operations",
    "message_layout",
]

#: Version of the operation encoding; stores record it (or a container version implying it).
ENCODING_VERSION = 2


class SerializationError(StoreError, ValueError):
    """An operation could not be converted to or from bytes."""


class EncodeError(SerializationError):
    """The operation cannot be represented (a field out of range, a string that is not UTF-8)."""


class DecodeError(SerializationError):
    """The bytes are not a valid encoded operation (unknown type, truncated, bad field)."""


# Type bytes (on-disk format: append only).
_T_MESSAGE_ADDED = 1
_T_PACKET_ID_ASSIGNED = 2
_T_MESSAGE_RELEASED = 3
_T_MESSAGE_REQUEUED = 4
_T_MESSAGE_REMOVED = 5
_T_INBOUND_RECEIVED = 6
_T_INBOUND_RELEASED = 7
_T_INBOUND_CLEARED = 8
_T_SUBSCRIPTION_SET = 9
_T_SUBSCRIPTION_REMOVED = 10
_T_UNSUBSCRIBE_DONE = 11
_T_PROTOCOL_VERSION_SET = 12
_T_MESSAGE_SET_ASIDE = 13
_T_SET_ASIDE_REMOVED = 14

_MSG_QOS_MASK = 0x03
_MSG_RETAIN = 0x04
_MSG_HAS_PACKET_ID = 0x08
_MSG_RELEASED = 0x10
_MSG_EXPIRES = 0x20
_MSG_PROPERTIES = 0x40
#: The flags of the optional fields: a MessageAdded without them has the version-1 layout.
_MSG_EXTRAS = _MSG_EXPIRES | _MSG_PROPERTIES
_MSG_KNOWN_FLAGS = _MSG_QOS_MASK | _MSG_RETAIN | _MSG_HAS_PACKET_ID | _MSG_RELEASED | _MSG_EXTRAS

_SUB_QOS_MASK = 0x03
_SUB_CONFIRMED = 0x04
_SUB_HAS_OPTIONS = 0x08
_SUB_HAS_ID = 0x10
_UNSUB_PENDING = 0x01

#: MQTT 5 subscription option bits besides QoS: no local, retain as published, retain handling.
SUBSCRIPTION_OPTION_BITS = 0x3C
_RETAIN_HANDLING = 0x30
#: The largest MQTT 5 Subscription Identifier (a variable byte integer of up to four bytes).
SUBSCRIPTION_ID_MAX = 268_435_455
#: The MQTT protocol levels a session can be made with: 3.1.1 and 5.
PROTOCOL_VERSIONS = frozenset({4, 5})

_MSG = struct.Struct("<BqBHHI")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
_ASIDE = struct.Struct("<BqdH")
_U8 = struct.Struct("<B")
_SEQ_PID = struct.Struct("<BqH")
_SEQ = struct.Struct("<Bq")
_PID = struct.Struct("<BH")
_FILTER = struct.Struct("<BBH")

# Bound methods looked up once: encoding a message is on the client's publish path.
_msg_pack = _MSG.pack
_seq_pid_pack = _SEQ_PID.pack
_seq_pack = _SEQ.pack
_pid_pack = _PID.pack
_filter_pack = _FILTER.pack
_msg_unpack_from = _MSG.unpack_from
_seq_pid_unpack_from = _SEQ_PID.unpack_from
_seq_unpack_from = _SEQ.unpack_from
_pid_unpack_from = _PID.unpack_from
_filter_unpack_from = _FILTER.unpack_from
_f64_unpack_from = _F64.unpack_from
_u32_unpack_from = _U32.unpack_from


# --- encoding ---------------------------------------------------------------------------------


def _encode_message_added(op: MessageAdded) -> bytes:
    message = op.message
    qos = message.qos
    if not 0 <= qos <= 2:
        raise EncodeError(f"QoS {qos!r} out of range in {op!r}")
    flags = qos
    if message.retain:
        flags |= _MSG_RETAIN
    packet_id = message.packet_id
    if packet_id is None:
        packet_id = 0
    else:
        flags |= _MSG_HAS_PACKET_ID
    if message.released:
        flags |= _MSG_RELEASED
    topic = message.topic.encode()
    payload = message.payload
    properties = message.properties
    expires_at = message.expires_at
    if not properties and expires_at is None:
        # The usual message: the version-1 layout.
        return (
            _msg_pack(_T_MESSAGE_ADDED, message.seq, flags, packet_id, len(topic), len(payload))
            + topic
            + payload
        )
    extras = b""
    if expires_at is not None:
        if not math.isfinite(expires_at):
            raise EncodeError(f"expires_at {expires_at!r} is not a finite time in {op!r}")
        flags |= _MSG_EXPIRES
        extras = _F64.pack(expires_at)
    if properties:
        flags |= _MSG_PROPERTIES
        extras += _U32.pack(len(properties)) + properties
    return (
        _msg_pack(_T_MESSAGE_ADDED, message.seq, flags, packet_id, len(topic), len(payload))
        + extras
        + topic
        + payload
    )


def _encode_packet_id_assigned(op: PacketIdAssigned) -> bytes:
    return _seq_pid_pack(_T_PACKET_ID_ASSIGNED, op.seq, op.packet_id)


def _encode_message_released(op: MessageReleased) -> bytes:
    return _seq_pack(_T_MESSAGE_RELEASED, op.seq)


def _encode_message_requeued(op: MessageRequeued) -> bytes:
    return _seq_pack(_T_MESSAGE_REQUEUED, op.seq)


def _encode_message_removed(op: MessageRemoved) -> bytes:
    return _seq_pack(_T_MESSAGE_REMOVED, op.seq)


def _encode_inbound_received(op: InboundReceived) -> bytes:
    return _pid_pack(_T_INBOUND_RECEIVED, op.packet_id)


def _encode_inbound_released(op: InboundReleased) -> bytes:
    return _pid_pack(_T_INBOUND_RELEASED, op.packet_id)


_INBOUND_CLEARED_BYTES = bytes((_T_INBOUND_CLEARED,))


def _encode_inbound_cleared(op: InboundCleared) -> bytes:
    return _INBOUND_CLEARED_BYTES


def _encode_subscription_set(op: SubscriptionSet) -> bytes:
    qos = op.qos
    if not 0 <= qos <= 2:
        raise EncodeError(f"QoS {qos!r} out of range in {op!r}")
    topic_filter = op.topic_filter.encode()
    flags = qos | (_SUB_CONFIRMED if op.confirmed else 0)
    options, subscription_id = op.options, op.subscription_id
    extras = b""
    if options:
        if options & ~SUBSCRIPTION_OPTION_BITS or options & _RETAIN_HANDLING == _RETAIN_HANDLING:
            raise EncodeError(f"subscription options {options!r} are not valid in {op!r}")
        flags |= _SUB_HAS_OPTIONS
        extras = _U8.pack(options)
    if subscription_id is not None:
        if not 1 <= subscription_id <= SUBSCRIPTION_ID_MAX:
            raise EncodeError(f"subscription identifier {subscription_id!r} out of range in {op!r}")
        flags |= _SUB_HAS_ID
        extras += _U32.pack(subscription_id)
    return _filter_pack(_T_SUBSCRIPTION_SET, flags, len(topic_filter)) + topic_filter + extras


def _encode_subscription_removed(op: SubscriptionRemoved) -> bytes:
    topic_filter = op.topic_filter.encode()
    flags = _UNSUB_PENDING if op.unsubscribe_pending else 0
    return _filter_pack(_T_SUBSCRIPTION_REMOVED, flags, len(topic_filter)) + topic_filter


def _encode_unsubscribe_done(op: UnsubscribeDone) -> bytes:
    topic_filter = op.topic_filter.encode()
    return _filter_pack(_T_UNSUBSCRIBE_DONE, 0, len(topic_filter)) + topic_filter


def _encode_protocol_version_set(op: ProtocolVersionSet) -> bytes:
    if op.version not in PROTOCOL_VERSIONS:
        raise EncodeError(f"protocol version {op.version!r} is not 4 (3.1.1) or 5 in {op!r}")
    return bytes((_T_PROTOCOL_VERSION_SET, op.version))


def _encode_message_set_aside(op: MessageSetAside) -> bytes:
    if not math.isfinite(op.at):
        raise EncodeError(f"time {op.at!r} is not finite in {op!r}")
    reason = op.reason.encode()
    return _ASIDE.pack(_T_MESSAGE_SET_ASIDE, op.seq, op.at, len(reason)) + reason


def _encode_set_aside_removed(op: SetAsideRemoved) -> bytes:
    return _seq_pack(_T_SET_ASIDE_REMOVED, op.seq)


# Keyed by exact type: operations are final dataclasses, and a dict hit beats isinstance chains.
_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    MessageAdded: _encode_message_added,
    PacketIdAssigned: _encode_packet_id_assigned,
    MessageReleased: _encode_message_released,
    MessageRequeued: _encode_message_requeued,
    MessageRemoved: _encode_message_removed,
    InboundReceived: _encode_inbound_received,
    InboundReleased: _encode_inbound_released,
    InboundCleared: _encode_inbound_cleared,
    SubscriptionSet: _encode_subscription_set,
    SubscriptionRemoved: _encode_subscription_removed,
    UnsubscribeDone: _encode_unsubscribe_done,
    ProtocolVersionSet: _encode_protocol_version_set,
    MessageSetAside: _encode_message_set_aside,
    SetAsideRemoved: _encode_set_aside_removed,
}


def encode_operation(op: Operation) -> bytes:
    """Encode one operation. Raises :class:`EncodeError` when a field cannot be represented."""
    try:
        encoder = _ENCODERS[type(op)]
    except KeyError:
        raise EncodeError(f"not a session operation: {op!r}") from None
    try:
        return encoder(op)
    except (struct.error, UnicodeEncodeError, TypeError, OverflowError) as exc:
        # Out-of-range integers (struct.error), lone surrogates, a str payload...
        raise EncodeError(f"cannot encode {op!r}: {exc}") from exc


def encode_each(ops: Sequence[Operation]) -> list[bytes]:
    """Each operation's encoding, in order; :class:`EncodeError` for the first that has none.

    :func:`encode_operation` per operation, without its call and ``try`` per operation: every
    store runs this on every batch (``_checks.check_operations``).
    """
    encoders = _ENCODERS
    try:
        return [encoders[type(op)](op) for op in ops]
    except (KeyError, struct.error, UnicodeEncodeError, TypeError, OverflowError):
        # The fast path cannot say which operation failed; this pass raises for the culprit.
        for op in ops:
            encode_operation(op)
        raise


def encode_operations(ops: Iterable[Operation]) -> bytes:
    """Encode a batch: the concatenation of its encoded operations (self-delimiting)."""
    ops = ops if isinstance(ops, list | tuple) else list(ops)
    encoders = _ENCODERS
    try:
        return b"".join([encoders[type(op)](op) for op in ops])
    except (KeyError, struct.error, UnicodeEncodeError, TypeError, OverflowError):
        # The fast path cannot say which operation failed; this pass raises for the culprit.
        for op in ops:
            encode_operation(op)
        raise


# --- decoding ---------------------------------------------------------------------------------


def _text(buf: bytes, start: int, length: int, what: str) -> str:
    end = start + length
    if end > len(buf):
        raise DecodeError(f"{what} runs past the end of the data (at offset {start})")
    try:
        return buf[start:end].decode()
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} at offset {start} is not valid UTF-8") from exc


def message_layout(buf: bytes, at: int, flags: int, end: int) -> tuple[int, float | None, int]:
    """The optional fields of the ``MessageAdded`` at ``buf[at:]`` whose ``flags`` are given:
    where its topic starts, its ``expires_at`` and the length of its properties (which end
    where the topic starts).

    For the stores that read a stored message in place. ``end`` bounds the operation's bytes;
    raises :class:`DecodeError` when the optional fields run past it or are not canonical.
    """
    position = at + _MSG.size
    if not flags & _MSG_EXTRAS:
        return position, None, 0
    expires_at: float | None = None
    properties_length = 0
    if flags & _MSG_EXPIRES:
        if position + _F64.size > end:
            raise DecodeError(f"message expiry runs past the end of the data (at offset {at})")
        expires_at = _f64_unpack_from(buf, position)[0]
        if not math.isfinite(expires_at):
            raise DecodeError(f"message expiry is not a finite time at offset {at}")
        position += _F64.size
    if flags & _MSG_PROPERTIES:
        if position + _U32.size > end:
            raise DecodeError(f"message properties run past the end of the data (at offset {at})")
        properties_length = _u32_unpack_from(buf, position)[0]
        if not properties_length:
            raise DecodeError(f"empty message properties with their flag at offset {at}")
        position += _U32.size + properties_length
    return position, expires_at, properties_length


def _decode_message_added(buf: bytes, offset: int) -> tuple[Operation, int]:
    _, seq, flags, packet_id, topic_len, payload_len = _msg_unpack_from(buf, offset)
    if flags & ~_MSG_KNOWN_FLAGS or flags & _MSG_QOS_MASK == 3:
        raise DecodeError(f"invalid message flags 0x{flags:02x} at offset {offset}")
    if not flags & _MSG_HAS_PACKET_ID:
        if packet_id:
            raise DecodeError(f"packet id without its flag at offset {offset}")
        pid: int | None = None
    else:
        pid = packet_id
    start, expires_at, properties_length = message_layout(buf, offset, flags, len(buf))
    if start > len(buf):
        raise DecodeError(f"message properties run past the end of the data (at offset {offset})")
    topic = _text(buf, start, topic_len, "topic")
    properties = buf[start - properties_length : start] if properties_length else b""
    start += topic_len
    end = start + payload_len
    if end > len(buf):
        raise DecodeError(f"payload runs past the end of the data (at offset {start})")
    message = StoredMessage(
        seq,
        topic,
        buf[start:end],
        flags & _MSG_QOS_MASK,
        bool(flags & _MSG_RETAIN),
        pid,
        bool(flags & _MSG_RELEASED),
        properties,
        expires_at,
    )
    return MessageAdded(message), end


def _decode_packet_id_assigned(buf: bytes, offset: int) -> tuple[Operation, int]:
    _, seq, packet_id = _seq_pid_unpack_from(buf, offset)
    return PacketIdAssigned(seq, packet_id), offset + _SEQ_PID.size


def _decode_message_released(buf: bytes, offset: int) -> tuple[Operation, int]:
    return MessageReleased(_seq_unpack_from(buf, offset)[1]), offset + _SEQ.size


def _decode_message_requeued(buf: bytes, offset: int) -> tuple[Operation, int]:
    return MessageRequeued(_seq_unpack_from(buf, offset)[1]), offset + _SEQ.size


def _decode_message_removed(buf: bytes, offset: int) -> tuple[Operation, int]:
    return MessageRemoved(_seq_unpack_from(buf, offset)[1]), offset + _SEQ.size


def _decode_inbound_received(buf: bytes, offset: int) -> tuple[Operation, int]:
    return InboundReceived(_pid_unpack_from(buf, offset)[1]), offset + _PID.size


def _decode_inbound_released(buf: bytes, offset: int) -> tuple[Operation, int]:
    return InboundReleased(_pid_unpack_from(buf, offset)[1]), offset + _PID.size


def _decode_inbound_cleared(buf: bytes, offset: int) -> tuple[Operation, int]:
    return InboundCleared(), offset + 1


def _filter_fields(buf: bytes, offset: int, known_flags: int) -> tuple[int, str, int]:
    _, flags, length = _filter_unpack_from(buf, offset)
    if flags & ~known_flags:
        raise DecodeError(f"invalid subscription flags 0x{flags:02x} at offset {offset}")
    start = offset + _FILTER.size
    return flags, _text(buf, start, length, "topic filter"), start + length


_SUB_KNOWN_FLAGS = _SUB_QOS_MASK | _SUB_CONFIRMED | _SUB_HAS_OPTIONS | _SUB_HAS_ID


def _decode_subscription_set(buf: bytes, offset: int) -> tuple[Operation, int]:
    flags, topic_filter, end = _filter_fields(buf, offset, _SUB_KNOWN_FLAGS)
    qos = flags & _SUB_QOS_MASK
    if qos == 3:
        raise DecodeError(f"invalid subscription QoS 3 at offset {offset}")
    options = 0
    subscription_id: int | None = None
    if flags & _SUB_HAS_OPTIONS:
        options = buf[end] if end < len(buf) else -1
        if (
            options <= 0
            or options & ~SUBSCRIPTION_OPTION_BITS
            or options & _RETAIN_HANDLING == _RETAIN_HANDLING
        ):
            raise DecodeError(f"invalid subscription options at offset {end}")
        end += 1
    if flags & _SUB_HAS_ID:
        subscription_id = _u32_unpack_from(buf, end)[0]
        if not 1 <= subscription_id <= SUBSCRIPTION_ID_MAX:
            raise DecodeError(f"subscription identifier out of range at offset {end}")
        end += _U32.size
    op = SubscriptionSet(topic_filter, qos, bool(flags & _SUB_CONFIRMED), options, subscription_id)
    return op, end


def _decode_subscription_removed(buf: bytes, offset: int) -> tuple[Operation, int]:
    flags, topic_filter, end = _filter_fields(buf, offset, _UNSUB_PENDING)
    return SubscriptionRemoved(topic_filter, bool(flags & _UNSUB_PENDING)), end


def _decode_unsubscribe_done(buf: bytes, offset: int) -> tuple[Operation, int]:
    _, topic_filter, end = _filter_fields(buf, offset, 0)
    return UnsubscribeDone(topic_filter), end


def _decode_protocol_version_set(buf: bytes, offset: int) -> tuple[Operation, int]:
    version = buf[offset + 1] if offset + 1 < len(buf) else -1
    if version not in PROTOCOL_VERSIONS:
        raise DecodeError(f"invalid protocol version at offset {offset}")
    return ProtocolVersionSet(version), offset + 2


def _decode_message_set_aside(buf: bytes, offset: int) -> tuple[Operation, int]:
    _, seq, at, reason_length = _ASIDE.unpack_from(buf, offset)
    if not math.isfinite(at):
        raise DecodeError(f"time of a set-aside message is not finite at offset {offset}")
    start = offset + _ASIDE.size
    reason = _text(buf, start, reason_length, "reason")
    return MessageSetAside(seq, reason, at), start + reason_length


def _decode_set_aside_removed(buf: bytes, offset: int) -> tuple[Operation, int]:
    return SetAsideRemoved(_seq_unpack_from(buf, offset)[1]), offset + _SEQ.size


_Decoder = Callable[[bytes, int], tuple[Operation, int]]

_DECODER_BY_TYPE: dict[int, _Decoder] = {
    _T_MESSAGE_ADDED: _decode_message_added,
    _T_PACKET_ID_ASSIGNED: _decode_packet_id_assigned,
    _T_MESSAGE_RELEASED: _decode_message_released,
    _T_MESSAGE_REQUEUED: _decode_message_requeued,
    _T_MESSAGE_REMOVED: _decode_message_removed,
    _T_INBOUND_RECEIVED: _decode_inbound_received,
    _T_INBOUND_RELEASED: _decode_inbound_released,
    _T_INBOUND_CLEARED: _decode_inbound_cleared,
    _T_SUBSCRIPTION_SET: _decode_subscription_set,
    _T_SUBSCRIPTION_REMOVED: _decode_subscription_removed,
    _T_UNSUBSCRIBE_DONE: _decode_unsubscribe_done,
    _T_PROTOCOL_VERSION_SET: _decode_protocol_version_set,
    _T_MESSAGE_SET_ASIDE: _decode_message_set_aside,
    _T_SET_ASIDE_REMOVED: _decode_set_aside_removed,
}
# Indexed by the type byte itself (None: not an operation type), so a lookup cannot raise.
_DECODERS: list[_Decoder | None] = [_DECODER_BY_TYPE.get(byte) for byte in range(256)]


def decode_operation_from(buf: bytes, offset: int = 0) -> tuple[Operation, int]:
    """Decode the operation starting at ``offset``; returns it and the offset just past it.

    Raises :class:`DecodeError` for an unknown type byte, truncated data or an invalid field.
    """
    if offset >= len(buf):
        raise DecodeError(f"no operation at offset {offset}: the data ends there")
    decoder = _DECODERS[buf[offset]]
    if decoder is None:
        raise DecodeError(f"unknown operation type {buf[offset]} at offset {offset}")
    try:
        return decoder(buf, offset)
    except struct.error as exc:
        raise DecodeError(f"operation at offset {offset} is truncated") from exc


def decode_operation(buf: bytes) -> Operation:
    """Decode exactly one operation; trailing bytes are an error."""
    op, end = decode_operation_from(buf)
    if end != len(buf):
        raise DecodeError(f"{len(buf) - end} unexpected bytes after the operation")
    return op


def decode_operations(buf: bytes) -> list[Operation]:
    """Decode a batch written by :func:`encode_operations` (empty bytes: no operations)."""
    ops: list[Operation] = []
    append = ops.append
    offset = 0
    end = len(buf)
    decoders = _DECODERS
    try:
        while offset < end:
            decoder = decoders[buf[offset]]
            if decoder is None:
                raise DecodeError(f"unknown operation type {buf[offset]} at offset {offset}")
            op, offset = decoder(buf, offset)
            append(op)
    except struct.error as exc:
        raise DecodeError(f"operation at offset {offset} is truncated") from exc
    return ops
