"""RedisStore's values: operations as the apply script reads them, and states from replies.

:data:`RULES` is the one place on the Python side that says what each journal operation type
becomes for Redis: the code of its branch in ``scripts/apply.lua`` (which says what it does to
the keys), the session keys it touches (so the script checks their types before its first
write) and its fields. The module refuses to import if an operation type has no rule; a test
checks that ``apply.lua`` has exactly one branch per code, naming the same operation type, and
the conformance tests compare the result with ``SessionState.apply``.
"""

from __future__ import annotations

import struct
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
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
    SessionState,
    StoredMessage,
    StoredSubscription,
    SubscriptionRemoved,
    SubscriptionSet,
    UnsubscribeDone,
)
from mqtt_persist.stores._checks import check_handlers
from mqtt_persist.stores._expiry import session_info
from mqtt_persist.stores.base import SessionInfo
from mqtt_persist.stores.redis.keys import (
    PID_MAX,
    SEQ_OFFSET,
    SUB_CONFIRMED,
    Damage,
    Keys,
    filter_bytes,
    parse_float,
    parse_int,
    parse_seq_key,
    parse_text,
    pid_bytes,
    seq_key,
    sub_flags,
    text,
)
from mqtt_persist.stores.serialization import DecodeError, decode_operation, encode_operation

__all__ = [
    "RULES",
    "Rule",
    "build_state",
    "decode_message",
    "encode_ops",
    "info_from",
    "message_args",
    "snapshot_args",
]


def message_args(message: StoredMessage) -> list[bytes]:
    """SEQ, stored value, packet id (or b''), released flag: one message as scripts take it."""
    if message.packet_id is None and not message.released:
        value = encode_operation(MessageAdded(message))
        packet_id = b""
    else:
        # The stored value never carries the mutable part; it lives in inflight/released.
        base = StoredMessage(
            message.seq, message.topic, message.payload, message.qos, message.retain
        )
        value = encode_operation(MessageAdded(base))
        packet_id = b"" if message.packet_id is None else pid_bytes(message.packet_id)
    return [seq_key(message.seq), value, packet_id, b"1" if message.released else b"0"]


@dataclass(frozen=True, slots=True)
class Rule:
    """What one operation type becomes for ``apply.lua``."""

    #: The code of its branch in apply.lua.
    code: bytes
    #: The session keys it writes, as digits of KEYS (1 meta ... 8 unsub).
    keys: bytes
    #: Its fields, given the operation and its encoding (``_checks.check_operations``).
    fields: Callable[[Any, bytes], Sequence[bytes]]


def _added(op: MessageAdded, encoded: bytes) -> list[bytes]:
    message = op.message
    if message.packet_id is None and not message.released:
        # The usual case: stored as encoded by the check.
        return [seq_key(message.seq), encoded, b"", b"0"]
    return message_args(message)


def _seq(op: MessageReleased | MessageRequeued | MessageRemoved, encoded: bytes) -> list[bytes]:
    return [seq_key(op.seq)]


def _packet_id(op: InboundReceived | InboundReleased, encoded: bytes) -> list[bytes]:
    return [pid_bytes(op.packet_id)]


_MESSAGES = b"2345"
_INBOUND = b"6"
_SUBSCRIPTIONS = b"78"

#: Every operation type: its apply.lua branch, the keys it writes, its fields.
RULES: dict[type, Rule] = {
    MessageAdded: Rule(b"A", _MESSAGES, _added),
    PacketIdAssigned: Rule(
        b"P", _MESSAGES, lambda op, _: [seq_key(op.seq), pid_bytes(op.packet_id)]
    ),
    MessageReleased: Rule(b"L", _MESSAGES, _seq),
    MessageRequeued: Rule(b"Q", _MESSAGES, _seq),
    MessageRemoved: Rule(b"R", _MESSAGES, _seq),
    InboundReceived: Rule(b"I", _INBOUND, _packet_id),
    InboundReleased: Rule(b"i", _INBOUND, _packet_id),
    InboundCleared: Rule(b"C", _INBOUND, lambda op, _: []),
    SubscriptionSet: Rule(
        b"S",
        _SUBSCRIPTIONS,
        lambda op, _: [filter_bytes(op.topic_filter), sub_flags(op.qos, op.confirmed)],
    ),
    SubscriptionRemoved: Rule(
        b"U",
        _SUBSCRIPTIONS,
        lambda op, _: [filter_bytes(op.topic_filter), b"1" if op.unsubscribe_pending else b"0"],
    ),
    UnsubscribeDone: Rule(b"D", _SUBSCRIPTIONS, lambda op, _: [filter_bytes(op.topic_filter)]),
}
check_handlers("RedisStore", RULES)

_U32 = struct.Struct(">I")


def encode_ops(ops: Sequence[Operation], encoded: Sequence[bytes]) -> tuple[bytes, bytes, bytes]:
    """The highest added sequence number (b'' if none), the mask of session keys the batch
    touches (digits, KEYS order) and the operations as the script reads them: each a code
    and its fields, every one of them headed by its length (4 bytes, big endian).

    ``encoded`` is what ``_checks.check_operations`` returned for ``ops``: the batch is valid,
    and the script must not fail half way.
    """
    args: list[bytes] = []
    top: int | None = None
    # Key types are checked only where the batch writes: each check is a Redis call.
    touched = {b"1"}
    for op, data in zip(ops, encoded, strict=True):
        rule = RULES[type(op)]
        args.append(rule.code)
        args += rule.fields(op, data)
        touched.add(rule.keys)
        if type(op) is MessageAdded and (top is None or op.message.seq > top):
            top = op.message.seq
    mask = b"".join(part for part in (b"1", _MESSAGES, _INBOUND, _SUBSCRIPTIONS) if part in touched)
    pack = _U32.pack
    blob = b"".join([pack(len(field)) + field for field in args])
    return (b"" if top is None else b"%d" % top), mask, blob


def snapshot_args(state: SessionState) -> list[Any]:
    """The arguments of ``save.lua`` after the common four: ``state`` as counted sections."""
    messages = list(state.messages.values())
    tail: list[Any] = []
    top = max([state.last_seq, *(m.seq for m in messages)])
    seq_key(top)
    tail.append(b"%d" % top)
    tail.append(len(messages))
    for message in messages:
        tail += message_args(message)
    inbound = sorted(state.inbound_qos2)
    tail.append(len(inbound))
    tail += [pid_bytes(packet_id) for packet_id in inbound]
    subs = list(state.subscriptions.values())
    tail.append(len(subs))
    for sub in subs:
        tail += (filter_bytes(sub.topic_filter), sub_flags(sub.qos, sub.confirmed))
    pending = sorted(state.pending_unsubscribes)
    tail.append(len(pending))
    tail += [filter_bytes(topic_filter) for topic_filter in pending]
    return tail


def info_from(
    client_id: str, keys: Keys, meta: object, inflight: object, queued: object
) -> SessionInfo | None:
    """A session's info from its meta fields (created_at, last_access, ttl) and counts, as a
    pipeline returned them; None when Redis expired it; Damage for anything unreadable."""
    if any(isinstance(r, Exception) for r in (meta, inflight, queued)):
        raise Damage(keys.meta, "a key of the wrong type")
    assert isinstance(meta, list)
    if meta == [None, None, None]:
        return None  # expired by Redis: only the index entry is left
    return session_info(
        client_id,
        created_at=parse_float(meta[0], keys.meta, "created_at"),
        last_access=parse_float(meta[1], keys.meta, "last_access"),
        ttl=parse_float(meta[2], keys.meta, "ttl") or None,  # Redis writes "never" as 0
        inflight=int(typing.cast(int, inflight)),
        queued=int(typing.cast(int, queued)),
    )


_PAIR_HEAD = struct.Struct(">HI")


def unpack_pairs(packed: bytes) -> list[tuple[bytes, bytes]]:
    """The (SEQ, value) pairs a script packed into one string (see ``pack_pairs``)."""
    pairs = []
    offset, end = 0, len(packed)
    head = _PAIR_HEAD.unpack_from
    try:
        while offset < end:
            seq_length, value_length = head(packed, offset)
            start = offset + 6
            value_start = start + seq_length
            offset = value_start + value_length
            pairs.append((packed[start:value_start], packed[value_start:offset]))
    except struct.error as exc:
        raise StoreError(f"malformed reply from the store's script: {exc}") from None
    if offset != end:
        raise StoreError("malformed reply from the store's script: truncated")
    return pairs


def decode_message(
    keys: Keys,
    where: bytes,
    seq_raw: object,
    value: object,
    packet_id: int | None,
    released: bool,
) -> StoredMessage:
    """One stored message; ``where`` is the key that listed ``seq_raw``."""
    seq = parse_seq_key(seq_raw, where)
    if not isinstance(value, bytes):
        raise Damage(where, f"{seq_raw!r} has no message in {text(keys.msg)}")
    try:
        op = decode_operation(value)
    except DecodeError as exc:
        raise Damage(keys.msg, f"field {text(typing.cast(bytes, seq_raw))}: {exc}") from None
    if type(op) is not MessageAdded:
        raise Damage(keys.msg, f"field {seq_raw!r} holds {type(op).__name__}, not a message")
    m = op.message
    if m.seq != seq or m.packet_id is not None or m.released:
        raise Damage(keys.msg, f"field {seq_raw!r} holds a different message: {m!r}")
    if packet_id is None and not released:
        return m
    return StoredMessage(m.seq, m.topic, m.payload, m.qos, m.retain, packet_id, released)


def build_state(client_id: str, keys: Keys, reply: list[Any], *, full: bool) -> SessionState:
    """The state from the load script's reply; raises :class:`Damage` for anything unreadable.

    ``full``: the reply holds every message (HGETALL), else the in-flight ones and the lowest
    queued ones, in that order.
    """
    (
        _,
        meta,
        inflight_flat,
        packed,
        queue_total,
        msg_total,
        released_raw,
        inbound_raw,
        subs_flat,
        unsub_raw,
    ) = reply
    last_seq = parse_int(meta[3], keys.meta, "field last_seq", -SEQ_OFFSET, SEQ_OFFSET - 1)
    inflight = {
        inflight_flat[n]: parse_int(
            inflight_flat[n + 1], keys.inflight, f"packet id of {inflight_flat[n]!r}", 0, PID_MAX
        )
        for n in range(0, len(inflight_flat), 2)
    }
    released = set(released_raw)
    messages: list[StoredMessage] = []
    seen: set[bytes] = set()
    pairs = unpack_pairs(packed)
    count = len(pairs)
    for n, (seq_raw, value) in enumerate(pairs):
        if seq_raw in seen:
            raise Damage(keys.queue, f"{seq_raw!r} is both queued and in flight")
        seen.add(seq_raw)
        packet_id = inflight.get(seq_raw)
        if full:
            where = keys.msg
        else:
            where = keys.inflight if n < len(inflight) else keys.queue
            if (packet_id is None) != (n >= len(inflight)):
                raise Damage(keys.queue, f"{seq_raw!r} is both queued and in flight")
        messages.append(decode_message(keys, where, seq_raw, value, packet_id, seq_raw in released))
    if missing := inflight.keys() - seen:
        raise Damage(keys.inflight, f"{min(missing)!r} has no message in {text(keys.msg)}")
    not_in_flight = msg_total - len(inflight)
    if not_in_flight > queue_total:
        reason = f"{not_in_flight - queue_total} messages are neither queued nor in flight"
        raise Damage(keys.msg, reason)
    if not_in_flight < queue_total:
        reason = f"{queue_total} queued, but only {not_in_flight} messages are not in flight"
        raise Damage(keys.queue, reason)
    messages.sort(key=attrgetter("seq"))
    state = SessionState(client_id)
    state.messages = {m.seq: m for m in messages}
    if messages:
        last_seq = max(last_seq, messages[-1].seq)
    state.last_seq = last_seq
    state.queued_not_loaded = queue_total - (count - len(inflight))
    state.inbound_qos2 = {
        parse_int(raw, keys.inbound, "packet id", 0, PID_MAX) for raw in inbound_raw
    }
    for n in range(0, len(subs_flat), 2):
        topic_filter = parse_text(subs_flat[n], keys.subs)
        flags = parse_int(subs_flat[n + 1], keys.subs, f"flags of {topic_filter!r}", 0, 6)
        if flags & 3 == 3:
            raise Damage(keys.subs, f"flags of {topic_filter!r}: QoS 3")
        state.subscriptions[topic_filter] = StoredSubscription(
            topic_filter, flags & 3, bool(flags & SUB_CONFIRMED)
        )
    state.pending_unsubscribes = {parse_text(raw, keys.unsub) for raw in unsub_raw}
    return state
