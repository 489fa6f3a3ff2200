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
    MessageSetAside,
    Operation,
    PacketIdAssigned,
    ProtocolVersionSet,
    SessionState,
    SetAsideMessage,
    SetAsideRemoved,
    StoredMessage,
    SubscriptionRemoved,
    SubscriptionSet,
    UnsubscribeDone,
    with_flow,
)
from mqtt_persist.stores._checks import check_handlers
from mqtt_persist.stores._expiry import session_info
from mqtt_persist.stores.base import SessionInfo
from mqtt_persist.stores.redis.keys import (
    PID_MAX,
    SEQ_OFFSET,
    Damage,
    Keys,
    filter_bytes,
    parse_float,
    parse_int,
    parse_seq_key,
    parse_text,
    pid_bytes,
    seq_key,
    sub_value,
    subscription_from_value,
    text,
)
from mqtt_persist.stores.serialization import (
    PROTOCOL_VERSIONS,
    DecodeError,
    decode_operation,
    decode_operations,
    encode_operation,
)

__all__ = [
    "RULES",
    "Rule",
    "aside_value",
    "build_state",
    "decode_aside",
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
        value = encode_operation(MessageAdded(with_flow(message)))
        packet_id = b"" if message.packet_id is None else pid_bytes(message.packet_id)
    return [seq_key(message.seq), value, packet_id, b"1" if message.released else b"0"]


@dataclass(frozen=True, slots=True)
class Rule:
    """What one operation type becomes for ``apply.lua``."""

    #: The code of its branch in apply.lua.
    code: bytes
    #: The session keys it writes, as digits of KEYS (1 meta ... 8 unsub, 9 aside).
    keys: bytes
    #: Its fields, given the operation and its encoding (``_checks.check_operations``).
    fields: Callable[[Any, bytes], Sequence[bytes]]


def _added(op: MessageAdded, encoded: bytes) -> list[bytes]:
    message = op.message
    if message.packet_id is None and not message.released:
        # The usual case: stored as encoded by the check.
        return [seq_key(message.seq), encoded, b"", b"0"]
    return message_args(message)


def _seq(
    op: MessageReleased | MessageRequeued | MessageRemoved | SetAsideRemoved, encoded: bytes
) -> list[bytes]:
    return [seq_key(op.seq)]


def _packet_id(op: InboundReceived | InboundReleased, encoded: bytes) -> list[bytes]:
    return [pid_bytes(op.packet_id)]


def _subscription_set(op: SubscriptionSet, encoded: bytes) -> list[bytes]:
    value = sub_value(op.qos, op.confirmed, op.options, op.subscription_id)
    return [filter_bytes(op.topic_filter), value]


_MESSAGES = b"2345"
_INBOUND = b"6"
_SUBSCRIPTIONS = b"78"
_SET_ASIDE = b"9"

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
    SubscriptionSet: Rule(b"S", _SUBSCRIPTIONS, _subscription_set),
    SubscriptionRemoved: Rule(
        b"U",
        _SUBSCRIPTIONS,
        lambda op, _: [filter_bytes(op.topic_filter), b"1" if op.unsubscribe_pending else b"0"],
    ),
    UnsubscribeDone: Rule(b"D", _SUBSCRIPTIONS, lambda op, _: [filter_bytes(op.topic_filter)]),
    ProtocolVersionSet: Rule(b"V", b"1", lambda op, _: [b"%d" % op.version]),
    # The script appends the operation's encoding to the stored MessageAdded: the aside value.
    MessageSetAside: Rule(b"X", _MESSAGES + _SET_ASIDE, lambda op, data: [seq_key(op.seq), data]),
    SetAsideRemoved: Rule(b"x", _SET_ASIDE, _seq),
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
    mask = bytes(sorted(set(b"".join(touched))))
    pack = _U32.pack
    blob = b"".join([pack(len(field)) + field for field in args])
    return (b"" if top is None else b"%d" % top), mask, blob


def snapshot_args(state: SessionState) -> list[Any]:
    """The arguments of ``save.lua`` after the common four: ``state`` as counted sections."""
    messages = list(state.messages.values())
    tail: list[Any] = []
    aside = sorted(state.set_aside.values(), key=lambda a: a.message.seq)
    top = max([state.last_seq, *(m.seq for m in messages), *(a.message.seq for a in aside)])
    seq_key(top)
    tail.append(b"%d" % top)
    protocol = state.protocol_version
    tail.append(b"" if protocol is None else b"%d" % protocol)
    tail.append(len(messages))
    for message in messages:
        tail += message_args(message)
    inbound = sorted(state.inbound_qos2)
    tail.append(len(inbound))
    tail += [pid_bytes(packet_id) for packet_id in inbound]
    subs = list(state.subscriptions.values())
    tail.append(len(subs))
    for sub in subs:
        value = sub_value(sub.qos, sub.confirmed, sub.options, sub.subscription_id)
        tail += (filter_bytes(sub.topic_filter), value)
    pending = sorted(state.pending_unsubscribes)
    tail.append(len(pending))
    tail += [filter_bytes(topic_filter) for topic_filter in pending]
    tail.append(len(aside))
    for a in aside:
        tail += (seq_key(a.message.seq), aside_value(a))
    return tail


def aside_value(aside: SetAsideMessage) -> bytes:
    """A set-aside message as the ``aside`` key stores it (see ``keys``)."""
    m = with_flow(aside.message)
    added = encode_operation(MessageAdded(m))
    return added + encode_operation(MessageSetAside(m.seq, aside.reason, aside.at))


def decode_aside(keys: Keys, seq_raw: object, value: object) -> SetAsideMessage:
    """One field of the ``aside`` key; :class:`Damage` unless it is what ``apply.lua`` writes."""
    seq = parse_seq_key(seq_raw, keys.aside)
    where = f"field {text(typing.cast(bytes, seq_raw))}"
    if not isinstance(value, bytes):
        raise Damage(keys.aside, f"{where} is not a string")
    try:
        ops = decode_operations(value)
    except DecodeError as exc:
        raise Damage(keys.aside, f"{where}: {exc}") from None
    match ops:
        case [MessageAdded(message=m), MessageSetAside(seq=aside_seq, reason=reason, at=at)] if (
            m.seq == seq == aside_seq and m.packet_id is None and not m.released
        ):
            return SetAsideMessage(m, reason, at)
    raise Damage(keys.aside, f"{where} holds no set-aside message of its sequence number")


def info_from(
    client_id: str, keys: Keys, meta: object, inflight: object, queued: object, aside: object
) -> SessionInfo | None:
    """A session's info from its meta fields (created_at, last_access, ttl) and counts, as a
    pipeline returned them; None when Redis expired it; Damage for anything unreadable."""
    if any(isinstance(r, Exception) for r in (meta, inflight, queued, aside)):
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
        set_aside=int(typing.cast(int, aside)),
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
    return with_flow(m, packet_id, released)


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
        aside_flat,
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
        state.subscriptions[topic_filter] = subscription_from_value(
            topic_filter, subs_flat[n + 1], keys.subs
        )
    state.pending_unsubscribes = {parse_text(raw, keys.unsub) for raw in unsub_raw}
    for n in range(0, len(aside_flat), 2):
        aside = decode_aside(keys, aside_flat[n], aside_flat[n + 1])
        state.set_aside[aside.message.seq] = aside
    if meta[4] is not None:
        protocol = parse_int(meta[4], keys.meta, "field protocol", 0, 255)
        if protocol not in PROTOCOL_VERSIONS:
            raise Damage(keys.meta, f"field protocol {protocol} is not 4 or 5")
        state.protocol_version = protocol
    return state
