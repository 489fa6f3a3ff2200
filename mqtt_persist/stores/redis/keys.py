"""RedisStore's key layout, and the conversions between Python values and Redis strings.

Key layout (``P`` is the prefix, ``ID`` the client id in UTF-8, ``SEQ`` a *sequence key*: the
sequence number plus 2**63 as 16 lowercase hex digits, so byte order is numeric order for every
int64 and range reads are exact; Redis scores are doubles, exact only to 2**53)::

    P:format              string  newest format version written under this prefix
    P:sessions            set     client ids of stored sessions (the index; also the marker
                                  that tells "expired by Redis" from "never existed")
    P:expiry              zset    client id -> expires_at (the store clock's seconds)
    P:lease:ID            string  the owner's JSON (host, pid, ...), PX lease_ttl
    P:fence:ID            string  the fencing token of the session's current (or last) owner;
                                  no TTL: it outlives a lapsed lease (see ``lease``)
    P:fencing             string  the counter every new owner's token is taken from (INCR)
    P:s:ID:meta           hash    v (format), created_at, last_access, ttl (0 = never), last_seq,
                                  protocol (4 or 5; missing while not set)
    P:s:ID:msg            hash    SEQ -> the message as added, without packet id and released
                                  flag (a MessageAdded in :mod:`~mqtt_persist.stores.serialization`)
    P:s:ID:queue          zset    SEQ of every queued message (no packet id), all scores 0:
                                  ZRANGEBYLEX reads the lowest ones without a scan
    P:s:ID:inflight       hash    SEQ -> packet id (decimal) of every in-flight message
    P:s:ID:released       set     SEQ of messages whose PUBREC arrived (QoS 2)
    P:s:ID:inbound        set     packet ids of open inbound QoS 2 flows
    P:s:ID:subs           hash    topic filter -> qos | 4 if confirmed | options << 8
                                  | subscription id << 16 (decimal; options and identifier 0
                                  when none)
    P:s:ID:unsub          set     topic filters with an UNSUBSCRIBE pending
    P:s:ID:aside          hash    SEQ -> a set-aside message: its MessageAdded (as in msg)
                                  followed by its MessageSetAside
    P:quarantine:STAMP:ID:NAME    a damaged session's keys, moved aside

Format version 2 added ``meta.protocol``, the ``aside`` key and the option and identifier bits
of ``subs`` values; version-1 values read the same (a stored message's encoding gained only
optional fields), so the migration from version 1 (``scripts/migrate_1.lua``) only sets
``meta.v`` 2 and ``meta.protocol`` 4 (version 1 spoke MQTT 3.1.1 only).

A message's stored bytes never change after it was added: a packet id, a release or a requeue
writes one small field, never rewrites the payload. Empty collections vanish (Redis deletes
them); ``meta`` exists exactly as long as the session does. "Never expires" is ``ttl`` 0 in
``meta`` (Redis hashes hold no null) and None everywhere in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mqtt_persist.session.state import StoredSubscription
from mqtt_persist.stores.serialization import (
    SUBSCRIPTION_ID_MAX,
    SUBSCRIPTION_OPTION_BITS,
    EncodeError,
)

__all__ = [
    "NAMES",
    "PID_MAX",
    "SEQ_OFFSET",
    "SUB_CONFIRMED",
    "SUB_VALUE_MAX",
    "Damage",
    "KeyLayout",
    "Keys",
    "filter_bytes",
    "id_bytes",
    "parse_float",
    "parse_int",
    "parse_seq_key",
    "parse_text",
    "pid_bytes",
    "seq_key",
    "sub_value",
    "subscription_from_value",
    "text",
]

SEQ_OFFSET = 1 << 63
PID_MAX = 0xFFFF
#: Session key names, in the order of KEYS[1..9] in every script.
NAMES = ("meta", "msg", "queue", "inflight", "released", "inbound", "subs", "unsub", "aside")
SUB_CONFIRMED = 4
#: The largest value of a ``subs`` field.
SUB_VALUE_MAX = (SUBSCRIPTION_ID_MAX << 16) | (SUBSCRIPTION_OPTION_BITS << 8) | 7


class KeyLayout:
    """The keys under one prefix."""

    def __init__(self, prefix: str) -> None:
        """Keys under ``prefix`` (UTF-8)."""
        self._prefix = id_bytes(prefix)

    def key(self, *parts: bytes) -> bytes:
        """``P:part:part...``"""
        return b":".join((self._prefix, *parts))

    def session(self, client_id: str) -> Keys:
        """Every key a session script of ``client_id`` touches."""
        ident = id_bytes(client_id)
        base = self.key(b"s", ident)
        meta, msg, queue, inflight, released, inbound, subs, unsub, aside = (
            base + b":" + name.encode() for name in NAMES
        )
        return Keys(
            meta,
            msg,
            queue,
            inflight,
            released,
            inbound,
            subs,
            unsub,
            aside,
            lease=self.key(b"lease", ident),
            sessions=self.key(b"sessions"),
            expiry=self.key(b"expiry"),
            fence=self.key(b"fence", ident),
        )

    @property
    def fencing(self) -> bytes:
        """The counter of fencing tokens under this prefix."""
        return self.key(b"fencing")

    def quarantine(self, stamp: bytes, client_id: str) -> tuple[bytes, list[bytes]]:
        """Where a damaged session's keys go: the base name, and the key of each of NAMES."""
        base = self.key(b"quarantine", stamp, id_bytes(client_id))
        return base, [base + b":" + name.encode() for name in NAMES]


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis keys of one session: the KEYS of every session script, migrations included."""

    meta: bytes
    msg: bytes
    queue: bytes
    inflight: bytes
    released: bytes
    inbound: bytes
    subs: bytes
    unsub: bytes
    aside: bytes
    lease: bytes
    sessions: bytes
    expiry: bytes
    fence: bytes

    @property
    def session(self) -> tuple[bytes, ...]:
        """The nine keys holding the session's data, in script order."""
        return (
            self.meta,
            self.msg,
            self.queue,
            self.inflight,
            self.released,
            self.inbound,
            self.subs,
            self.unsub,
            self.aside,
        )

    @property
    def script(self) -> tuple[bytes, ...]:
        """KEYS of every session script."""
        return (*self.session, self.lease, self.sessions, self.expiry, self.fence)


class Damage(Exception):
    """Stored data that cannot be read: which key, and why."""

    def __init__(self, key: bytes, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


def text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def id_bytes(client_id: str) -> bytes:
    # surrogatepass: any str the client accepts as an id maps to distinct key bytes.
    return client_id.encode("utf-8", "surrogatepass")


def seq_key(seq: int) -> bytes:
    if type(seq) is not int or not -SEQ_OFFSET <= seq < SEQ_OFFSET:
        raise EncodeError(f"sequence number {seq!r} is not an int64")
    return b"%016x" % (seq + SEQ_OFFSET)


def parse_seq_key(raw: object, key: bytes) -> int:
    if not isinstance(raw, bytes) or len(raw) != 16:
        raise Damage(key, f"{raw!r} is not a sequence key")
    try:
        return int(raw, 16) - SEQ_OFFSET
    except ValueError:
        raise Damage(key, f"{raw!r} is not a sequence key") from None


def parse_int(raw: object, key: bytes, what: str, low: int, high: int) -> int:
    try:
        if not isinstance(raw, bytes) or not raw.lstrip(b"-").isdigit():
            raise ValueError
        value = int(raw)
    except ValueError:
        raise Damage(key, f"{what} {raw!r} is not an integer") from None
    if not low <= value <= high:
        raise Damage(key, f"{what} {value} is out of range")
    return value


def parse_float(raw: object, key: bytes, what: str) -> float:
    try:
        if not isinstance(raw, bytes):
            raise ValueError
        value = float(raw)
    except ValueError:
        raise Damage(key, f"field {what} {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise Damage(key, f"field {what} {raw!r} is not a finite number")
    return value


def parse_text(raw: object, key: bytes) -> str:
    if not isinstance(raw, bytes):
        raise Damage(key, f"{raw!r} is not text")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise Damage(key, f"{raw!r} is not UTF-8") from None


def pid_bytes(packet_id: object) -> bytes:
    if type(packet_id) is not int or not 0 <= packet_id <= PID_MAX:
        raise EncodeError(f"packet id {packet_id!r} out of range")
    return b"%d" % packet_id


def filter_bytes(topic_filter: object) -> bytes:
    if not isinstance(topic_filter, str):
        raise EncodeError(f"topic filter {topic_filter!r} is not a str")
    try:
        return topic_filter.encode()
    except UnicodeEncodeError as exc:
        raise EncodeError(f"topic filter {topic_filter!r} is not valid Unicode") from exc


def sub_value(qos: object, confirmed: bool, options: int, subscription_id: int | None) -> bytes:
    """A ``subs`` field (the operation was checked by the encoding: options are valid)."""
    if type(qos) is not int or not 0 <= qos <= 2:
        raise EncodeError(f"subscription QoS {qos!r} out of range")
    value = qos | (SUB_CONFIRMED if confirmed else 0) | options << 8
    if subscription_id is not None:
        value |= subscription_id << 16
    return b"%d" % value


def subscription_from_value(topic_filter: str, raw: object, key: bytes) -> StoredSubscription:
    """The subscription a ``subs`` field holds; :class:`Damage` for a value no rule writes."""
    value = parse_int(raw, key, f"value of {topic_filter!r}", 0, SUB_VALUE_MAX)
    options = value >> 8 & 0xFF
    if (
        value & 3 == 3
        or value & 0xF8
        or options & ~SUBSCRIPTION_OPTION_BITS
        or options & 0x30 == 0x30  # retain handling 3
    ):
        raise Damage(key, f"value of {topic_filter!r} is not a subscription: {value}")
    subscription_id = value >> 16 or None
    return StoredSubscription(
        topic_filter, value & 3, bool(value & SUB_CONFIRMED), options, subscription_id
    )
