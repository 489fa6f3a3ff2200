"""PostgresStore's rows: the queries that read a session, and the checks that turn rows into values.

PostgreSQL enforces the column types, so what can go wrong in a row is narrower than in SQLite,
but not empty: a NULL where a value belongs, a QoS of 7, a packet ID out of range, text that is
not UTF-8 (strings are ``bytea``), a NaN time. Such a row raises :class:`BadRow`; the store then
quarantines the session (:func:`quarantine_statements`) and reports it as corrupt.

Every query is built once per schema by :class:`Queries`, as the bytes psycopg sends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from psycopg import sql

from mqtt_persist.session.state import (
    SessionState,
    SetAsideMessage,
    StoredMessage,
    StoredSubscription,
)
from mqtt_persist.stores._expiry import is_expired
from mqtt_persist.stores.serialization import (
    PROTOCOL_VERSIONS,
    SUBSCRIPTION_ID_MAX,
    SUBSCRIPTION_OPTION_BITS,
)

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "BadRow",
    "Meta",
    "Queries",
    "build_state",
    "id_bytes",
    "message_from_row",
    "meta_from_row",
    "set_aside_from_row",
    "text_bytes",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

#: The tables holding a session's data (besides ``sessions`` itself).
DATA_TABLES = ("messages", "inbound", "subscriptions", "pending_unsubscribes", "set_aside")
MESSAGE_COLUMNS = "seq, topic, payload, qos, retain, packet_id, released, properties, expires_at"
SUBSCRIPTION_COLUMNS = "filter, qos, confirmed, options, subscription_id"
SET_ASIDE_COLUMNS = "seq, topic, payload, qos, retain, properties, expires_at, reason, set_aside_at"
SESSION_COLUMNS = "created_at, last_access, ttl, last_seq, protocol_version"


class BadRow(Exception):
    """A stored value that no valid session can contain."""

    def __init__(self, table: str, detail: str) -> None:
        super().__init__(f"table {table}: {detail}")
        self.reason = f"table {table}: {detail}"


def id_bytes(client_id: str) -> bytes:
    """A client id as stored (UTF-8; the store refused ids that have none)."""
    return client_id.encode("utf-8")


def text_bytes(value: str) -> bytes:
    """A topic, filter or reason as stored (the operation check made sure it encodes)."""
    return value.encode("utf-8")


class Queries:
    """Every statement that reads or moves a session, for one schema."""

    def __init__(self, schema: str) -> None:
        s = sql.Identifier(schema)

        def q(text: str) -> bytes:
            return sql.SQL(text).format(s=s).as_bytes(None)

        self.check_owner = q("SELECT {s}.check_owner(%s, %s)")
        self.meta = q(
            f"SELECT {SESSION_COLUMNS} FROM {{s}}.sessions WHERE client_id = %s FOR UPDATE"
        )
        self.meta_read = q(f"SELECT {SESSION_COLUMNS} FROM {{s}}.sessions WHERE client_id = %s")
        self.exists = q("SELECT 1 FROM {s}.sessions WHERE client_id = %s")
        self.counts = q(
            "SELECT count(*) FILTER (WHERE packet_id IS NOT NULL), "
            "count(*) FILTER (WHERE packet_id IS NULL) FROM {s}.messages WHERE client_id = %s"
        )
        self.all_messages = q(
            f"SELECT {MESSAGE_COLUMNS} FROM {{s}}.messages WHERE client_id = %s ORDER BY seq"
        )
        self.inflight = q(
            f"SELECT {MESSAGE_COLUMNS} FROM {{s}}.messages "
            "WHERE client_id = %s AND packet_id IS NOT NULL ORDER BY seq"
        )
        # Queued messages have no index of their own: the primary key keeps a session's
        # messages in seq order, and walking it skips only in-flight rows (the window).
        self.queued_first = q(
            f"SELECT {MESSAGE_COLUMNS} FROM {{s}}.messages "
            "WHERE client_id = %s AND packet_id IS NULL ORDER BY seq LIMIT %s"
        )
        self.queued_after = q(
            f"SELECT {MESSAGE_COLUMNS} FROM {{s}}.messages "
            "WHERE client_id = %s AND packet_id IS NULL AND seq > %s ORDER BY seq LIMIT %s"
        )
        #: The rest of a load, in SessionRows' order: inbound, subscriptions, pending, aside.
        self.session_reads = [
            q("SELECT packet_id FROM {s}.inbound WHERE client_id = %s"),
            q(f"SELECT {SUBSCRIPTION_COLUMNS} FROM {{s}}.subscriptions WHERE client_id = %s"),
            q("SELECT filter FROM {s}.pending_unsubscribes WHERE client_id = %s"),
            q(f"SELECT {SET_ASIDE_COLUMNS} FROM {{s}}.set_aside WHERE client_id = %s ORDER BY seq"),
        ]
        self.list = q(
            f"SELECT s.client_id, {', '.join('s.' + c for c in SESSION_COLUMNS.split(', '))}, "
            "coalesce(m.inflight, 0), coalesce(m.queued, 0), coalesce(a.n, 0) "
            "FROM {s}.sessions s "
            "LEFT JOIN (SELECT client_id, count(*) FILTER (WHERE packet_id IS NOT NULL) inflight,"
            " count(*) FILTER (WHERE packet_id IS NULL) queued FROM {s}.messages "
            "GROUP BY client_id) m ON m.client_id = s.client_id "
            "LEFT JOIN (SELECT client_id, count(*) n FROM {s}.set_aside GROUP BY client_id) a "
            "ON a.client_id = s.client_id ORDER BY s.client_id"
        )
        self.set_aside_count = q("SELECT count(*) FROM {s}.set_aside WHERE client_id = %s")
        self.create_session = q(
            "INSERT INTO {s}.sessions (client_id, created_at, last_access, ttl, last_seq) "
            "VALUES (%s, %s, %s, NULL, 0)"
        )
        # The apply's access: creates the session if needed; last_seq never goes down.
        self.touch_or_create = q(
            "INSERT INTO {s}.sessions AS t (client_id, created_at, last_access, ttl, last_seq) "
            "VALUES (%s, %s, %s, NULL, coalesce(%s::bigint, 0)) ON CONFLICT (client_id) DO UPDATE "
            "SET last_access = EXCLUDED.last_access, "
            "last_seq = greatest(t.last_seq, %s::bigint)"
        )
        self.clear_protocol = q(
            "UPDATE {s}.sessions SET protocol_version = NULL WHERE client_id = %s"
        )
        # After a snapshot: last_seq never goes down, so no number is handed out twice.
        self.saved = q(
            "UPDATE {s}.sessions SET last_access = %s, last_seq = greatest(last_seq, %s::bigint) "
            "WHERE client_id = %s"
        )
        self.set_ttl = q("UPDATE {s}.sessions SET ttl = %s, last_access = %s WHERE client_id = %s")
        # Expired sessions nobody holds a live lease on; those another transaction holds are
        # skipped (SKIP LOCKED): their owner is at work on them.
        self.expired = q(
            f"SELECT s.client_id, {', '.join('s.' + c for c in SESSION_COLUMNS.split(', '))} "
            "FROM {s}.sessions s WHERE s.ttl > 0 AND s.last_access + s.ttl <= %s "
            "AND NOT EXISTS (SELECT 1 FROM {s}.leases l WHERE l.client_id = s.client_id "
            "AND l.expires_at > clock_timestamp()) FOR UPDATE OF s SKIP LOCKED"
        )
        self.drop_lapsed_lease = q(
            "DELETE FROM {s}.leases WHERE client_id = %s AND expires_at <= clock_timestamp()"
        )
        self.touch = q("UPDATE {s}.sessions SET last_access = %s WHERE client_id = %s")
        self.delete_session = q("DELETE FROM {s}.sessions WHERE client_id = %s")
        self.delete_data = [
            q(f"DELETE FROM {{s}}.{table} WHERE client_id = %s") for table in DATA_TABLES
        ]
        self.quarantine = q(
            "INSERT INTO {s}.quarantine (quarantined_at, reason, client_id, "
            f"{SESSION_COLUMNS}) SELECT %s, %s, client_id, {SESSION_COLUMNS} "
            "FROM {s}.sessions WHERE client_id = %s RETURNING qid"
        )
        self.quarantine_data = [
            q(
                f"INSERT INTO {{s}}.quarantine_messages SELECT %s, {MESSAGE_COLUMNS} "
                "FROM {s}.messages WHERE client_id = %s"
            ),
            q(
                "INSERT INTO {s}.quarantine_inbound SELECT %s, packet_id "
                "FROM {s}.inbound WHERE client_id = %s"
            ),
            q(
                f"INSERT INTO {{s}}.quarantine_subscriptions SELECT %s, {SUBSCRIPTION_COLUMNS} "
                "FROM {s}.subscriptions WHERE client_id = %s"
            ),
            q(
                "INSERT INTO {s}.quarantine_pending_unsubscribes SELECT %s, filter "
                "FROM {s}.pending_unsubscribes WHERE client_id = %s"
            ),
            q(
                f"INSERT INTO {{s}}.quarantine_set_aside SELECT %s, {SET_ASIDE_COLUMNS} "
                "FROM {s}.set_aside WHERE client_id = %s"
            ),
        ]
        self.quarantine_bare = q(
            "INSERT INTO {s}.quarantine (quarantined_at, reason, client_id) "
            "VALUES (%s, %s, %s) RETURNING qid"
        )


def _is_time(value: object) -> bool:
    return type(value) is float and math.isfinite(value)


def _text(table: str, column: str, value: object, where: str) -> str:
    if type(value) is not bytes:
        raise BadRow(table, f"{column} {value!r} is not text ({where})")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRow(table, f"{column} {value!r:.60} is not UTF-8 ({where})") from None


def _flag(table: str, column: str, value: object, where: str) -> bool:
    if type(value) is not bool:
        raise BadRow(table, f"{column} {value!r} is not a boolean ({where})")
    return value


def message_from_row(row: Sequence[Any]) -> StoredMessage:
    """A checked ``messages`` row (:class:`BadRow` for a value out of place)."""
    seq, topic, payload, qos, retain, packet_id, released, properties, expires_at = row
    # One inline test per row (restoring a long queue runs this per message); reject_message
    # works out what exactly is wrong.
    if (
        type(seq) is int
        and type(topic) is bytes
        and type(payload) is bytes
        and type(qos) is int
        and 0 <= qos <= 2
        and type(retain) is bool
        and type(released) is bool
        and (packet_id is None or (type(packet_id) is int and 0 <= packet_id <= 0xFFFF))
        and type(properties) is bytes
        and (expires_at is None or _is_time(expires_at))
    ):
        try:
            topic_text = topic.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return StoredMessage(
                seq, topic_text, payload, qos, retain, packet_id, released, properties, expires_at
            )
    reject_message(row)


def _check_stored_fields(
    table: str, seq: object, topic: object, payload: object, qos: object
) -> tuple[str, str]:
    """Raise :class:`BadRow` for a bad column of a stored message; else (where, topic)."""
    if type(seq) is not int:
        raise BadRow(table, f"seq {seq!r} is not an integer")
    where = f"seq {seq}"
    topic_text = _text(table, "topic", topic, where)
    if type(payload) is not bytes:
        raise BadRow(table, f"payload {payload!r:.40} is not bytes ({where})")
    if type(qos) is not int or not 0 <= qos <= 2:
        raise BadRow(table, f"qos {qos!r} is not 0, 1 or 2 ({where})")
    return where, topic_text


def _check_extras(table: str, properties: object, expires_at: object, where: str) -> None:
    if type(properties) is not bytes:
        raise BadRow(table, f"properties {properties!r:.40} is not bytes ({where})")
    if expires_at is not None and not _is_time(expires_at):
        raise BadRow(table, f"expires_at {expires_at!r} is not a time ({where})")


def reject_message(row: Sequence[Any]) -> NoReturn:
    """Raise :class:`BadRow` saying why a row failed the test in :func:`message_from_row`."""
    seq, topic, payload, qos, retain, packet_id, released, properties, expires_at = row
    where, _ = _check_stored_fields("messages", seq, topic, payload, qos)
    if packet_id is not None and (type(packet_id) is not int or not 0 <= packet_id <= 0xFFFF):
        raise BadRow("messages", f"packet_id {packet_id!r} is not a packet ID ({where})")
    _flag("messages", "retain", retain, where)
    _flag("messages", "released", released, where)
    _check_extras("messages", properties, expires_at, where)
    raise BadRow("messages", f"row {row!r:.80} is not a message")  # pragma: no cover


def set_aside_from_row(row: Sequence[Any]) -> SetAsideMessage:
    """A checked ``set_aside`` row (no packet ID, not released: see :class:`SetAsideMessage`)."""
    seq, topic, payload, qos, retain, properties, expires_at, reason, at = row
    where, topic_text = _check_stored_fields("set_aside", seq, topic, payload, qos)
    retained = _flag("set_aside", "retain", retain, where)
    _check_extras("set_aside", properties, expires_at, where)
    reason_text = _text("set_aside", "reason", reason, where)
    if not _is_time(at):
        raise BadRow("set_aside", f"set_aside_at {at!r} is not a time ({where})")
    message = StoredMessage(
        seq, topic_text, payload, qos, retained, None, False, properties, expires_at
    )
    return SetAsideMessage(message, reason_text, at)


@dataclass(frozen=True, slots=True)
class Meta:
    """A checked ``sessions`` row."""

    created_at: float
    last_access: float
    ttl: float | None
    last_seq: int
    protocol_version: int | None

    def expired(self, now: float) -> bool:
        """True once the session expired (see ``_expiry.is_expired``)."""
        return is_expired(self.last_access, self.ttl, now)


def meta_from_row(row: Sequence[Any]) -> Meta:
    """A checked ``sessions`` row (its columns from ``created_at`` on)."""
    created_at, last_access, ttl, last_seq, protocol = row
    for name, value in (("created_at", created_at), ("last_access", last_access)):
        if not _is_time(value):
            raise BadRow("sessions", f"{name} {value!r} is not a time")
    if ttl is not None and (not _is_time(ttl) or ttl < 0):
        raise BadRow("sessions", f"ttl {ttl!r} is not a number of seconds")
    if type(last_seq) is not int:
        raise BadRow("sessions", f"last_seq {last_seq!r} is not an integer")
    if protocol is not None and protocol not in PROTOCOL_VERSIONS:
        raise BadRow("sessions", f"protocol_version {protocol!r} is not 4 or 5")
    return Meta(created_at, last_access, ttl or None, last_seq, protocol)


def subscription_from_row(row: Sequence[Any]) -> StoredSubscription:
    """A checked ``subscriptions`` row."""
    raw_filter, qos, confirmed, options, subscription_id = row
    topic_filter = _text("subscriptions", "filter", raw_filter, "a subscription")
    where = f"filter {topic_filter!r}"
    if type(qos) is not int or not 0 <= qos <= 2:
        raise BadRow("subscriptions", f"qos {qos!r} is not 0, 1 or 2 ({where})")
    if (
        type(options) is not int
        or options & ~SUBSCRIPTION_OPTION_BITS
        or options & 0x30 == 0x30  # retain handling 3
    ):
        raise BadRow("subscriptions", f"options {options!r} are not subscription options ({where})")
    if subscription_id is not None and not 1 <= subscription_id <= SUBSCRIPTION_ID_MAX:
        raise BadRow("subscriptions", f"subscription_id {subscription_id!r} out of range ({where})")
    confirmed_flag = _flag("subscriptions", "confirmed", confirmed, where)
    return StoredSubscription(topic_filter, qos, confirmed_flag, options, subscription_id)


def inbound_from_row(row: Sequence[Any]) -> int:
    """A checked ``inbound`` row: a packet ID."""
    (packet_id,) = row
    if type(packet_id) is not int or not 0 <= packet_id <= 0xFFFF:
        raise BadRow("inbound", f"packet_id {packet_id!r} is not a packet ID")
    return packet_id


@dataclass(slots=True)
class SessionRows:
    """What a load read, before it was checked."""

    messages: list[Any]
    queued_total: int
    inbound: list[Any]
    subscriptions: list[Any]
    pending: list[Any]
    set_aside: list[Any]


def build_state(client_id: str, meta: Meta, rows: SessionRows, *, full: bool) -> SessionState:
    """The state from a load's rows; :class:`BadRow` for any value out of place.

    ``full``: ``rows.messages`` holds every message, else the in-flight ones followed by the
    lowest queued ones (two ascending runs).
    """
    messages = [message_from_row(r) for r in rows.messages]
    if not full:
        messages.sort(key=_seq_of)
    queued_read = sum(1 for m in messages if m.packet_id is None)
    state = SessionState(client_id)
    state.messages = {m.seq: m for m in messages}
    state.queued_not_loaded = 0 if full else max(0, rows.queued_total - queued_read)
    state.inbound_qos2 = {inbound_from_row(r) for r in rows.inbound}
    for row in rows.subscriptions:
        subscription = subscription_from_row(row)
        state.subscriptions[subscription.topic_filter] = subscription
    state.pending_unsubscribes = {
        _text("pending_unsubscribes", "filter", f, "a pending unsubscribe") for (f,) in rows.pending
    }
    for row in rows.set_aside:
        aside = set_aside_from_row(row)
        state.set_aside[aside.message.seq] = aside
    state.last_seq = max(0, meta.last_seq, messages[-1].seq if messages else 0)
    state.protocol_version = meta.protocol_version
    return state


def _seq_of(message: StoredMessage) -> int:
    return message.seq
