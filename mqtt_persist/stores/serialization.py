"""A compact binary encoding of session operations, shared by every store that writes bytes.

Each operation is one type byte followed by fixed-size little-endian fields packed with
:mod:`struct`; strings are UTF-8 with a length prefix and payloads are raw bytes with a length
prefix. The encoding is self-delimiting, so a batch is simply the concatenation of its
operations and needs no framing of its own. It carries no checksum and no version: the medium
that stores it (a journal record, a database row, a Redis list entry) frames it, checks it and
records the format version, and turns :class:`DecodeError` into
:class:`~mqtt_persist.errors.SessionCorrupt`.

Layouts (``<`` little-endian; ``q`` int64, ``H`` uint16, ``I`` uint32, ``B`` uint8)::

    MessageAdded         B type, q seq, B flags, H packet_id, H topic_len, I payload_len,
                         topic, payload          flags: qos | 4 retain | 8 has packet_id
                                                        | 16 released
    PacketIdAssigned     B type, q seq, H packet_id
    MessageReleased      B type, q seq            (also MessageRequeued, MessageRemoved)
    InboundReceived      B type, H packet_id      (also InboundReleased)
    InboundCleared       B type
    SubscriptionSet      B type, B flags, H filter_len, filter   flags: qos | 4 confirmed
    SubscriptionRemoved  B type, B flags, H filter_len, filter   flags: 1 unsubscribe_pending
    UnsubscribeDone      B type, B flags (0), H filter_len, filter

Type bytes and layouts are part of the on-disk format: never renumber or change them; add new
type bytes instead and bump the version the stores record.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
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
    Operation,
    PacketIdAssigned,
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
]

#: Version of the operation encoding; stores record it (or a container version implying it).
ENCODING_VERSION = 1


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

_MSG_QOS_MASK = 0x03
_MSG_RETAIN = 0x04
_MSG_HAS_PACKET_ID = 0x08
_MSG_RELEASED = 0x10
_MSG_KNOWN_FLAGS = _MSG_QOS_MASK | _MSG_RETAIN | _MSG_HAS_PACKET_ID | _MSG_RELEASED

_SUB_QOS_MASK = 0x03
_SUB_CONFIRMED = 0x04
_UNSUB_PENDING = 0x01

_MSG = struct.Struct("<BqBHHI")
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
    return (
        _msg_pack(_T_MESSAGE_ADDED, message.seq, flags, packet_id, len(topic), len(payload))
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
    return _filter_pack(_T_SUBSCRIPTION_SET, flags, len(topic_filter)) + topic_filter


def _encode_subscription_removed(op: SubscriptionRemoved) -> bytes:
    topic_filter = op.topic_filter.encode()
    flags = _UNSUB_PENDING if op.unsubscribe_pending else 0
    return _filter_pack(_T_SUBSCRIPTION_REMOVED, flags, len(topic_filter)) + topic_filter


def _encode_unsubscribe_done(op: UnsubscribeDone) -> bytes:
    topic_filter = op.topic_filter.encode()
    return _filter_pack(_T_UNSUBSCRIBE_DONE, 0, len(topic_filter)) + topic_filter


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
    start = offset + _MSG.size
    topic = _text(buf, start, topic_len, "topic")
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


def _decode_subscription_set(buf: bytes, offset: int) -> tuple[Operation, int]:
    flags, topic_filter, end = _filter_fields(buf, offset, _SUB_QOS_MASK | _SUB_CONFIRMED)
    qos = flags & _SUB_QOS_MASK
    if qos == 3:
        raise DecodeError(f"invalid subscription QoS 3 at offset {offset}")
    return SubscriptionSet(topic_filter, qos, bool(flags & _SUB_CONFIRMED)), end


def _decode_subscription_removed(buf: bytes, offset: int) -> tuple[Operation, int]:
    flags, topic_filter, end = _filter_fields(buf, offset, _UNSUB_PENDING)
    return SubscriptionRemoved(topic_filter, bool(flags & _UNSUB_PENDING)), end


def _decode_unsubscribe_done(buf: bytes, offset: int) -> tuple[Operation, int]:
    _, topic_filter, end = _filter_fields(buf, offset, 0)
    return UnsubscribeDone(topic_filter), end


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
