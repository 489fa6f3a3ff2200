"""What each journal operation does to a SQLiteStore database: one SQL rule per type.

:data:`HANDLERS` is the one place that says it, keyed by operation type: a store module that
imports it fails at once if a new operation type has no rule (see ``_checks.check_handlers``),
and the conformance tests compare the result of random operation sequences with
:meth:`SessionState.apply <mqtt_persist.session.state.SessionState.apply>`.

Each rule takes a run of consecutive operations of one type (one ``executemany`` per run).
Within such a run, executing the statements per table in order is the same as executing them
per operation: the two tables a run may touch (subscriptions and pending_unsubscribes) are
changed independently per filter. ``MessageSetAside`` is the exception, run per operation: its
copy into set_aside depends on the message still being in messages.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from mqtt_persist.session.state import (
    InboundCleared,
    InboundReceived,
    InboundReleased,
    MessageAdded,
    MessageReleased,
    MessageRemoved,
    MessageRequeued,
    MessageSetAside,
    PacketIdAssigned,
    ProtocolVersionSet,
    SetAsideRemoved,
    SubscriptionRemoved,
    SubscriptionSet,
    UnsubscribeDone,
)
from mqtt_persist.stores._checks import check_handlers

__all__ = ["HANDLERS"]


def _messages_added(conn: sqlite3.Connection, sid: int, ops: list[MessageAdded]) -> None:
    # OR IGNORE: a message already stored stays as it is (SessionState.apply does the same).
    messages = [op.message for op in ops]
    conn.executemany(
        "INSERT OR IGNORE INTO messages (sid, seq, topic, payload, qos, retain, packet_id, "
        "released, properties, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                sid,
                m.seq,
                m.topic,
                m.payload,
                m.qos,
                1 if m.retain else 0,
                m.packet_id,
                1 if m.released else 0,
                m.properties,
                m.expires_at,
            )
            for m in messages
        ],
    )


def _packet_ids_assigned(conn: sqlite3.Connection, sid: int, ops: list[PacketIdAssigned]) -> None:
    conn.executemany(
        "UPDATE messages SET packet_id = ? WHERE sid = ? AND seq = ?",
        [(op.packet_id, sid, op.seq) for op in ops],
    )


def _messages_released(conn: sqlite3.Connection, sid: int, ops: list[MessageReleased]) -> None:
    conn.executemany(
        "UPDATE messages SET released = 1 WHERE sid = ? AND seq = ?", [(sid, op.seq) for op in ops]
    )


def _messages_requeued(conn: sqlite3.Connection, sid: int, ops: list[MessageRequeued]) -> None:
    # Back to the queue as a new message: no packet ID, not released.
    conn.executemany(
        "UPDATE messages SET packet_id = NULL, released = 0 WHERE sid = ? AND seq = ?",
        [(sid, op.seq) for op in ops],
    )


def _messages_removed(conn: sqlite3.Connection, sid: int, ops: list[MessageRemoved]) -> None:
    conn.executemany(
        "DELETE FROM messages WHERE sid = ? AND seq = ?", [(sid, op.seq) for op in ops]
    )


def _inbound_received(conn: sqlite3.Connection, sid: int, ops: list[InboundReceived]) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO inbound (sid, packet_id) VALUES (?, ?)",
        [(sid, op.packet_id) for op in ops],
    )


def _inbound_released(conn: sqlite3.Connection, sid: int, ops: list[InboundReleased]) -> None:
    conn.executemany(
        "DELETE FROM inbound WHERE sid = ? AND packet_id = ?", [(sid, op.packet_id) for op in ops]
    )


def _inbound_cleared(conn: sqlite3.Connection, sid: int, ops: list[InboundCleared]) -> None:
    conn.execute("DELETE FROM inbound WHERE sid = ?", (sid,))


def _subscriptions_set(conn: sqlite3.Connection, sid: int, ops: list[SubscriptionSet]) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO subscriptions (sid, filter, qos, confirmed, options, "
        "subscription_id) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (sid, op.topic_filter, op.qos, 1 if op.confirmed else 0, op.options, op.subscription_id)
            for op in ops
        ],
    )
    conn.executemany(
        "DELETE FROM pending_unsubscribes WHERE sid = ? AND filter = ?",
        [(sid, op.topic_filter) for op in ops],
    )


def _subscriptions_removed(
    conn: sqlite3.Connection, sid: int, ops: list[SubscriptionRemoved]
) -> None:
    conn.executemany(
        "DELETE FROM subscriptions WHERE sid = ? AND filter = ?",
        [(sid, op.topic_filter) for op in ops],
    )
    conn.executemany(
        "INSERT OR IGNORE INTO pending_unsubscribes (sid, filter) VALUES (?, ?)",
        [(sid, op.topic_filter) for op in ops if op.unsubscribe_pending],
    )


def _unsubscribes_done(conn: sqlite3.Connection, sid: int, ops: list[UnsubscribeDone]) -> None:
    conn.executemany(
        "DELETE FROM pending_unsubscribes WHERE sid = ? AND filter = ?",
        [(sid, op.topic_filter) for op in ops],
    )


def _protocol_version_set(
    conn: sqlite3.Connection, sid: int, ops: list[ProtocolVersionSet]
) -> None:
    conn.execute("UPDATE sessions SET protocol_version = ? WHERE sid = ?", (ops[-1].version, sid))


def _messages_set_aside(conn: sqlite3.Connection, sid: int, ops: list[MessageSetAside]) -> None:
    # The row moves with its stored fields; packet_id and released stay behind (set-aside
    # messages have none). Only a message still in messages moves, replacing an older one.
    for op in ops:
        conn.execute(
            "INSERT OR REPLACE INTO set_aside (sid, seq, topic, payload, qos, retain, properties, "
            "expires_at, reason, set_aside_at) SELECT sid, seq, topic, payload, qos, retain, "
            "properties, expires_at, ?, ? FROM messages WHERE sid = ? AND seq = ?",
            (op.reason, op.at, sid, op.seq),
        )
        conn.execute("DELETE FROM messages WHERE sid = ? AND seq = ?", (sid, op.seq))


def _set_aside_removed(conn: sqlite3.Connection, sid: int, ops: list[SetAsideRemoved]) -> None:
    conn.executemany(
        "DELETE FROM set_aside WHERE sid = ? AND seq = ?", [(sid, op.seq) for op in ops]
    )


#: The rule of every operation type: ``rule(connection, sid, run of operations)``.
HANDLERS: dict[type, Callable[[sqlite3.Connection, int, list[Any]], None]] = {
    MessageAdded: _messages_added,
    PacketIdAssigned: _packet_ids_assigned,
    MessageReleased: _messages_released,
    MessageRequeued: _messages_requeued,
    MessageRemoved: _messages_removed,
    InboundReceived: _inbound_received,
    InboundReleased: _inbound_released,
    InboundCleared: _inbound_cleared,
    SubscriptionSet: _subscriptions_set,
    SubscriptionRemoved: _subscriptions_removed,
    UnsubscribeDone: _unsubscribes_done,
    ProtocolVersionSet: _protocol_version_set,
    MessageSetAside: _messages_set_aside,
    SetAsideRemoved: _set_aside_removed,
}
check_handlers("SQLiteStore", HANDLERS)
