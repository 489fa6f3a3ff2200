"""SQLiteStore's rows: the queries that read a session, and the checks that turn rows into values.

A row that cannot be a stored value (a QoS of 7, a NULL topic, a payload that is not a BLOB,
text that is not UTF-8, ...) raises :class:`BadRow`; the store then quarantines the session
(:func:`quarantine_rows`) and reports it as corrupt.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from mqtt_persist.session.state import (
    SessionState,
    SetAsideMessage,
    StoredMessage,
    StoredSubscription,
)
from mqtt_persist.stores._expiry import is_expired
from mqtt_persist.stores._quarantine import quarantine_stamp
from mqtt_persist.stores.serialization import (
    PROTOCOL_VERSIONS,
    SUBSCRIPTION_ID_MAX,
    SUBSCRIPTION_OPTION_BITS,
)

__all__ = [
    "SELECT_INFLIGHT",
    "SELECT_META",
    "SELECT_QUEUED_AFTER",
    "SELECT_QUEUED_FIRST",
    "BadRow",
    "Meta",
    "create_session",
    "delete_data",
    "delete_rows",
    "fetch",
    "list_metas",
    "message_from_row",
    "meta_from_row",
    "quarantine_rows",
    "read_state",
    "session_id",
    "set_aside_from_row",
]

logger = logging.getLogger(__name__)

#: The tables holding a session's data, keyed by ``sid`` (besides ``sessions`` itself).
DATA_TABLES = ("messages", "inbound", "subscriptions", "pending_unsubscribes", "set_aside")

MESSAGE_COLUMNS = "seq, topic, payload, qos, retain, packet_id, released, properties, expires_at"
SUBSCRIPTION_COLUMNS = "filter, qos, confirmed, options, subscription_id"
SET_ASIDE_COLUMNS = "seq, topic, payload, qos, retain, properties, expires_at, reason, set_aside_at"
SELECT_ALL_MESSAGES = f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE sid = ? ORDER BY seq"
# INDEXED BY: without statistics the planner might walk the primary key instead; with it, a
# missing index is an error rather than a silent scan of the whole queue.
SELECT_INFLIGHT = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages INDEXED BY messages_inflight "
    "WHERE sid = ? AND packet_id IS NOT NULL ORDER BY seq"
)
# Queued messages have no index of their own: the primary key already clusters a session's
# messages by seq, and walking it skips only in-flight rows, so a read of N queued messages
# touches at most N + (in-flight count) rows: the in-flight window, which the 65535 packet IDs
# bound. It saves a second B-tree on every insert (measured: inserts 27% faster, reads 25%
# faster, 10% less space than with a partial index on the queued rows).
SELECT_QUEUED_FIRST = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages "
    "WHERE sid = ? AND packet_id IS NULL ORDER BY seq LIMIT ?"
)
SELECT_QUEUED_AFTER = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages "
    "WHERE sid = ? AND packet_id IS NULL AND seq > ? ORDER BY seq LIMIT ?"
)
# The set-aside count is a range count of set_aside's primary key: no trigger needed.
META_COLUMNS = (
    "sid, created_at, last_access, ttl, last_seq, inflight, queued, protocol_version, "
    "(SELECT count(*) FROM set_aside WHERE set_aside.sid = sessions.sid)"
)
SELECT_META = f"SELECT {META_COLUMNS} FROM sessions WHERE client_id = ?"

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class BadRow(Exception):
    """A stored value that no valid session can contain."""

    def __init__(self, table: str, detail: str) -> None:
        super().__init__(f"table {table}: {detail}")
        self.reason = f"table {table}: {detail}"


def fetch(conn: sqlite3.Connection, table: str, sql: str, params: Sequence[object]) -> list[Any]:
    cursor = conn.execute(sql, params)
    try:
        return cursor.fetchall()
    except sqlite3.OperationalError as exc:
        # SQLite never checks that TEXT is UTF-8; the sqlite3 module does when it converts a
        # value to str ("Could not decode to UTF-8 column 'topic' with text ...").
        if "decode to UTF-8" not in str(exc):
            raise
        raise BadRow(table, f"text that is not UTF-8: {exc}") from None
    finally:
        cursor.close()


def _is_int(value: object) -> bool:
    return type(value) is int


def _is_number(value: object) -> bool:
    return type(value) is float or type(value) is int


def _is_time(value: object) -> bool:
    """A finite number (what the encoding accepts as a time)."""
    return (type(value) is float or type(value) is int) and math.isfinite(value)


def _flag(table: str, column: str, value: object, where: str) -> bool:
    if _is_int(value) and value in (0, 1):
        return value == 1
    raise BadRow(table, f"{column} {value!r} is not 0 or 1 ({where})")


_FLAGS = (0, 1)


def message_from_row(row: tuple[Any, ...]) -> StoredMessage:
    seq, topic, payload, qos, retain, packet_id, released, properties, expires_at = row
    # One inline test per row (restoring a long queue runs this per message; measured faster
    # than the same test in SQL); reject_message works out what exactly is wrong.
    if (
        type(seq) is int
        and type(topic) is str
        and type(payload) is bytes
        and type(qos) is int
        and 0 <= qos <= 2
        and type(retain) is int
        and retain in _FLAGS
        and type(released) is int
        and released in _FLAGS
        and (packet_id is None or (type(packet_id) is int and 0 <= packet_id <= 0xFFFF))
        and type(properties) is bytes
        and (expires_at is None or _is_time(expires_at))
    ):
        return StoredMessage(
            seq,
            topic,
            payload,
            qos,
            retain == 1,
            packet_id,
            released == 1,
            properties,
            expires_at,
        )
    reject_message(row)


def _check_stored_fields(table: str, seq: Any, topic: Any, payload: Any, qos: Any) -> str:
    """Raise :class:`BadRow` for a bad column of a stored message; else where it is (its seq)."""
    if not _is_int(seq):
        raise BadRow(table, f"seq {seq!r} is not an integer")
    where = f"seq {seq}"
    if type(topic) is not str:
        raise BadRow(table, f"topic {topic!r} is not text ({where})")
    if type(payload) is not bytes:
        raise BadRow(table, f"payload {payload!r:.40} is not a BLOB ({where})")
    if not _is_int(qos) or not 0 <= qos <= 2:
        raise BadRow(table, f"qos {qos!r} is not 0, 1 or 2 ({where})")
    return where


def _check_extras(table: str, properties: object, expires_at: object, where: str) -> None:
    if type(properties) is not bytes:
        raise BadRow(table, f"properties {properties!r:.40} is not a BLOB ({where})")
    if expires_at is not None and not _is_time(expires_at):
        raise BadRow(table, f"expires_at {expires_at!r} is not a time ({where})")


def reject_message(row: tuple[Any, ...]) -> NoReturn:
    """Raise :class:`BadRow` saying why a row failed the test in :func:`message_from_row`."""
    seq, topic, payload, qos, retain, packet_id, released, properties, expires_at = row
    where = _check_stored_fields("messages", seq, topic, payload, qos)
    if packet_id is not None and (not _is_int(packet_id) or not 0 <= packet_id <= 0xFFFF):
        raise BadRow("messages", f"packet_id {packet_id!r} is not a packet ID ({where})")
    _flag("messages", "retain", retain, where)
    _flag("messages", "released", released, where)
    _check_extras("messages", properties, expires_at, where)
    raise BadRow("messages", f"row {row!r:.200} is out of place")  # pragma: no cover


def set_aside_from_row(row: tuple[Any, ...]) -> SetAsideMessage:
    """A checked ``set_aside`` row (no packet ID, not released: see :class:`SetAsideMessage`)."""
    seq, topic, payload, qos, retain, properties, expires_at, reason, at = row
    where = _check_stored_fields("set_aside", seq, topic, payload, qos)
    retained = _flag("set_aside", "retain", retain, where)
    _check_extras("set_aside", properties, expires_at, where)
    if type(reason) is not str:
        raise BadRow("set_aside", f"reason {reason!r} is not text ({where})")
    if not _is_time(at):
        raise BadRow("set_aside", f"set_aside_at {at!r} is not a time ({where})")
    message = StoredMessage(seq, topic, payload, qos, retained, None, False, properties, expires_at)
    return SetAsideMessage(message, reason, at)


@dataclass(frozen=True, slots=True)
class Meta:
    """A checked ``sessions`` row, with the session's count of set-aside messages."""

    sid: int
    created_at: float
    last_access: float
    ttl: float | None
    last_seq: int
    inflight: int
    queued: int
    protocol_version: int | None
    set_aside: int

    def expired(self, now: float) -> bool:
        """True once the session expired (see ``_expiry.is_expired``)."""
        return is_expired(self.last_access, self.ttl, now)


def meta_from_row(row: tuple[Any, ...]) -> Meta:
    sid, created_at, last_access, ttl, last_seq, inflight, queued, protocol, set_aside = row
    for name, value in (("created_at", created_at), ("last_access", last_access)):
        if not _is_number(value):
            raise BadRow("sessions", f"{name} {value!r} is not a time")
    if ttl is not None and not _is_number(ttl):
        raise BadRow("sessions", f"ttl {ttl!r} is not a number of seconds")
    if not _is_int(last_seq):
        raise BadRow("sessions", f"last_seq {last_seq!r} is not an integer")
    for name, value in (("inflight", inflight), ("queued", queued)):
        if not _is_int(value) or value < 0:
            raise BadRow("sessions", f"{name} {value!r} is not a count")
    if protocol is not None and (not _is_int(protocol) or protocol not in PROTOCOL_VERSIONS):
        raise BadRow("sessions", f"protocol_version {protocol!r} is not 4 or 5")
    return Meta(sid, created_at, last_access, ttl, last_seq, inflight, queued, protocol, set_aside)


def read_state(
    conn: sqlite3.Connection, client_id: str, meta: Meta, queued_limit: int | None
) -> SessionState:
    """The session's rows as a state; raises :class:`BadRow` for any value out of place."""
    sid = meta.sid
    if queued_limit is None:
        # Everything: one range scan of the table in seq order.
        messages = [
            message_from_row(r) for r in fetch(conn, "messages", SELECT_ALL_MESSAGES, (sid,))
        ]
        inflight = sum(1 for m in messages if m.packet_id is not None)
        if (inflight, len(messages) - inflight) != (meta.inflight, meta.queued):
            # The rows are fine and they are what counts; only the cached counts drifted.
            logger.warning(
                "session %r: stored counts %d/%d differ from the rows (%d/%d); repaired",
                client_id,
                meta.inflight,
                meta.queued,
                inflight,
                len(messages) - inflight,
            )
            conn.execute(
                "UPDATE sessions SET inflight = ?, queued = ? WHERE sid = ?",
                (inflight, len(messages) - inflight, sid),
            )
        not_loaded = 0
    else:
        inflight_rows = fetch(conn, "messages", SELECT_INFLIGHT, (sid,))
        queued_rows = fetch(conn, "messages", SELECT_QUEUED_FIRST, (sid, queued_limit))
        queued_part = [message_from_row(r) for r in queued_rows]
        # Two ascending runs: sorting them is a linear merge.
        messages = sorted([message_from_row(r) for r in inflight_rows] + queued_part, key=_seq_of)
        not_loaded = max(0, meta.queued - len(queued_part))
    state = SessionState(client_id)
    state.messages = {m.seq: m for m in messages}
    for (packet_id,) in _rows(conn, "inbound", "packet_id", sid):
        if not _is_int(packet_id) or not 0 <= packet_id <= 0xFFFF:
            raise BadRow("inbound", f"packet_id {packet_id!r} is not a packet ID")
        state.inbound_qos2.add(packet_id)
    for row in _rows(conn, "subscriptions", SUBSCRIPTION_COLUMNS, sid):
        subscription = _subscription_from_row(row)
        state.subscriptions[subscription.topic_filter] = subscription
    for (topic_filter,) in _rows(conn, "pending_unsubscribes", "filter", sid):
        state.pending_unsubscribes.add(_filter(topic_filter, "pending_unsubscribes"))
    for row in _rows(conn, "set_aside", SET_ASIDE_COLUMNS, sid):
        aside = set_aside_from_row(row)
        state.set_aside[aside.message.seq] = aside
    state.last_seq = max(0, meta.last_seq, messages[-1].seq if messages else 0)
    state.queued_not_loaded = not_loaded
    state.protocol_version = meta.protocol_version
    return state


def _subscription_from_row(row: tuple[Any, ...]) -> StoredSubscription:
    topic_filter, qos, confirmed, options, subscription_id = row
    where = f"filter {_filter(topic_filter, 'subscriptions')!r}"
    if not _is_int(qos) or not 0 <= qos <= 2:
        raise BadRow("subscriptions", f"qos {qos!r} is not 0, 1 or 2 ({where})")
    if (
        not _is_int(options)
        or options & ~SUBSCRIPTION_OPTION_BITS
        or options & 0x30 == 0x30  # retain handling 3
    ):
        raise BadRow("subscriptions", f"options {options!r} are not subscription options ({where})")
    if subscription_id is not None and (
        not _is_int(subscription_id) or not 1 <= subscription_id <= SUBSCRIPTION_ID_MAX
    ):
        raise BadRow("subscriptions", f"subscription_id {subscription_id!r} out of range ({where})")
    confirmed_flag = _flag("subscriptions", "confirmed", confirmed, where)
    return StoredSubscription(topic_filter, qos, confirmed_flag, options, subscription_id)


def _rows(conn: sqlite3.Connection, table: str, columns: str, sid: int) -> list[Any]:
    """The given columns of every row of ``table`` that belongs to the session."""
    return fetch(conn, table, f"SELECT {columns} FROM {table} WHERE sid = ?", (sid,))


def _filter(value: object, table: str) -> str:
    if type(value) is not str:
        raise BadRow(table, f"filter {value!r} is not text")
    return value


def _seq_of(message: StoredMessage) -> int:
    return message.seq


def quarantine_rows(conn: sqlite3.Connection, sid: int, reason: str) -> int:
    """Inside the caller's transaction: move every row of the session to ``quarantine*``.

    The rows keep their exact values (the quarantine columns have no type affinity). Returns
    the quarantine id (``qid``) they are filed under.
    """
    cursor = conn.execute(
        "INSERT INTO quarantine (quarantined_at, reason, sid, client_id, created_at, "
        "last_access, ttl, last_seq, inflight, queued, protocol_version) SELECT ?, ?, sid, "
        "client_id, created_at, last_access, ttl, last_seq, inflight, queued, protocol_version "
        "FROM sessions WHERE sid = ?",
        (quarantine_stamp(), reason, sid),
    )
    qid = cursor.lastrowid
    assert qid is not None
    conn.execute(
        f"INSERT INTO quarantine_messages SELECT ?, {MESSAGE_COLUMNS} FROM messages WHERE sid = ?",
        (qid, sid),
    )
    conn.execute(
        "INSERT INTO quarantine_inbound SELECT ?, packet_id FROM inbound WHERE sid = ?",
        (qid, sid),
    )
    conn.execute(
        f"INSERT INTO quarantine_subscriptions SELECT ?, {SUBSCRIPTION_COLUMNS} "
        "FROM subscriptions WHERE sid = ?",
        (qid, sid),
    )
    conn.execute(
        f"INSERT INTO quarantine_set_aside SELECT ?, {SET_ASIDE_COLUMNS} "
        "FROM set_aside WHERE sid = ?",
        (qid, sid),
    )
    conn.execute(
        "INSERT INTO quarantine_pending_unsubscribes SELECT ?, filter "
        "FROM pending_unsubscribes WHERE sid = ?",
        (qid, sid),
    )
    delete_rows(conn, sid)
    return qid


def delete_rows(conn: sqlite3.Connection, sid: int) -> None:
    """Delete every row of the session (its data, not what quarantine holds)."""
    # The sessions row first: the messages trigger then has no counts left to maintain.
    conn.execute("DELETE FROM sessions WHERE sid = ?", (sid,))
    delete_data(conn, sid)


def delete_data(conn: sqlite3.Connection, sid: int) -> None:
    """Delete the session's data but keep its ``sessions`` row (created_at, TTL, last_seq);
    the protocol level goes with the data."""
    for table in DATA_TABLES:
        conn.execute(f"DELETE FROM {table} WHERE sid = ?", (sid,))
    conn.execute("UPDATE sessions SET protocol_version = NULL WHERE sid = ?", (sid,))


def session_id(conn: sqlite3.Connection, client_id: str) -> int | None:
    """The ``sid`` of ``client_id``'s session, or None when there is none."""
    row = conn.execute("SELECT sid FROM sessions WHERE client_id = ?", (client_id,)).fetchone()
    return None if row is None else int(row[0])


def create_session(conn: sqlite3.Connection, client_id: str, now: float) -> int:
    """Insert an empty session (no TTL) and return its ``sid``."""
    cursor = conn.execute(
        "INSERT INTO sessions (client_id, created_at, last_access, ttl, last_seq, inflight, "
        "queued) VALUES (?, ?, ?, NULL, 0, 0, 0)",
        (client_id, now, now),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def list_metas(conn: sqlite3.Connection, path: str) -> list[tuple[str, Meta]]:
    """Every session with readable metadata; damaged rows are logged and skipped."""
    rows = conn.execute(
        f"SELECT CAST(client_id AS BLOB), {META_COLUMNS} FROM sessions ORDER BY sid"
    )
    found: list[tuple[str, Meta]] = []
    for raw_id, *rest in rows.fetchall():
        try:
            if type(raw_id) is not bytes:
                raise BadRow("sessions", f"client_id {raw_id!r} is not text")
            try:
                client_id = raw_id.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRow("sessions", f"client_id {raw_id!r} is not UTF-8") from None
            meta = meta_from_row(tuple(rest))
        except BadRow as bad:
            logger.warning("skipping damaged session row in %s: %s", path, bad.reason)
            continue
        found.append((client_id, meta))
    return found
