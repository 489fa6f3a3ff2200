"""What each journal operation does to a PostgresStore schema: one SQL rule per type.

:data:`HANDLERS` is the one place that says it, keyed by operation type: the module fails to
import if a new operation type has no rule (see ``_checks.check_handlers``), and the
conformance tests compare the result of random operation sequences with
:meth:`SessionState.apply <mqtt_persist.session.state.SessionState.apply>`.

Each rule takes a run of consecutive operations of one type and queues its statements on the
apply's cursor (one ``executemany`` per statement and run). The store runs the whole batch in
pipeline mode, so the statements of every run, the fencing check before them and the COMMIT
after them reach the server in one round trip. Within a run, executing the statements per
table in order is the same as executing them per operation: the two tables a run may touch
(subscriptions and pending_unsubscribes) change independently per filter. ``MessageSetAside``
is the exception, run per operation: its copy into set_aside depends on the message still
being in messages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

from psycopg import AsyncCursor, sql

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
from mqtt_persist.stores.postgres.rows import text_bytes

__all__ = ["HANDLERS", "Rule", "statement"]

Cursor = AsyncCursor[Any]


@cache
def statement(schema: str, text: str) -> bytes:
    """``text`` with ``{s}`` standing for the quoted schema name (built once per schema)."""
    return sql.SQL(text).format(s=sql.Identifier(schema)).as_bytes(None)


async def _messages_added(cur: Cursor, schema: str, cid: bytes, ops: list[MessageAdded]) -> None:
    # ON CONFLICT DO NOTHING: a message already stored stays as it is (as in SessionState.apply).
    await cur.executemany(
        statement(
            schema,
            "INSERT INTO {s}.messages (client_id, seq, topic, payload, qos, retain, packet_id, "
            "released, properties, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
        ),
        [
            (
                cid,
                m.seq,
                text_bytes(m.topic),
                m.payload,
                m.qos,
                m.retain,
                m.packet_id,
                m.released,
                m.properties,
                m.expires_at,
            )
            for m in (op.message for op in ops)
        ],
    )


async def _packet_ids_assigned(
    cur: Cursor, schema: str, cid: bytes, ops: list[PacketIdAssigned]
) -> None:
    await cur.executemany(
        statement(
            schema, "UPDATE {s}.messages SET packet_id = %s WHERE client_id = %s AND seq = %s"
        ),
        [(op.packet_id, cid, op.seq) for op in ops],
    )


async def _messages_released(
    cur: Cursor, schema: str, cid: bytes, ops: list[MessageReleased]
) -> None:
    await cur.executemany(
        statement(
            schema, "UPDATE {s}.messages SET released = true WHERE client_id = %s AND seq = %s"
        ),
        [(cid, op.seq) for op in ops],
    )


async def _messages_requeued(
    cur: Cursor, schema: str, cid: bytes, ops: list[MessageRequeued]
) -> None:
    # Back to the queue as a new message: no packet ID, not released.
    await cur.executemany(
        statement(
            schema,
            "UPDATE {s}.messages SET packet_id = NULL, released = false "
            "WHERE client_id = %s AND seq = %s",
        ),
        [(cid, op.seq) for op in ops],
    )


async def _messages_removed(
    cur: Cursor, schema: str, cid: bytes, ops: list[MessageRemoved]
) -> None:
    await cur.executemany(
        statement(schema, "DELETE FROM {s}.messages WHERE client_id = %s AND seq = %s"),
        [(cid, op.seq) for op in ops],
    )


async def _inbound_received(
    cur: Cursor, schema: str, cid: bytes, ops: list[InboundReceived]
) -> None:
    await cur.executemany(
        statement(
            schema,
            "INSERT INTO {s}.inbound (client_id, packet_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        ),
        [(cid, op.packet_id) for op in ops],
    )


async def _inbound_released(
    cur: Cursor, schema: str, cid: bytes, ops: list[InboundReleased]
) -> None:
    await cur.executemany(
        statement(schema, "DELETE FROM {s}.inbound WHERE client_id = %s AND packet_id = %s"),
        [(cid, op.packet_id) for op in ops],
    )


async def _inbound_cleared(cur: Cursor, schema: str, cid: bytes, ops: list[InboundCleared]) -> None:
    await cur.execute(statement(schema, "DELETE FROM {s}.inbound WHERE client_id = %s"), (cid,))


async def _subscriptions_set(
    cur: Cursor, schema: str, cid: bytes, ops: list[SubscriptionSet]
) -> None:
    await cur.executemany(
        statement(
            schema,
            "INSERT INTO {s}.subscriptions (client_id, filter, qos, confirmed, options, "
            "subscription_id) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (client_id, filter) "
            "DO UPDATE SET qos = EXCLUDED.qos, confirmed = EXCLUDED.confirmed, "
            "options = EXCLUDED.options, subscription_id = EXCLUDED.subscription_id",
        ),
        [
            (cid, text_bytes(op.topic_filter), op.qos, op.confirmed, op.options, op.subscription_id)
            for op in ops
        ],
    )
    await cur.executemany(
        statement(
            schema, "DELETE FROM {s}.pending_unsubscribes WHERE client_id = %s AND filter = %s"
        ),
        [(cid, text_bytes(op.topic_filter)) for op in ops],
    )


async def _subscriptions_removed(
    cur: Cursor, schema: str, cid: bytes, ops: list[SubscriptionRemoved]
) -> None:
    await cur.executemany(
        statement(schema, "DELETE FROM {s}.subscriptions WHERE client_id = %s AND filter = %s"),
        [(cid, text_bytes(op.topic_filter)) for op in ops],
    )
    pending = [(cid, text_bytes(op.topic_filter)) for op in ops if op.unsubscribe_pending]
    if pending:
        await cur.executemany(
            statement(
                schema,
                "INSERT INTO {s}.pending_unsubscribes (client_id, filter) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING",
            ),
            pending,
        )


async def _unsubscribes_done(
    cur: Cursor, schema: str, cid: bytes, ops: list[UnsubscribeDone]
) -> None:
    await cur.executemany(
        statement(
            schema, "DELETE FROM {s}.pending_unsubscribes WHERE client_id = %s AND filter = %s"
        ),
        [(cid, text_bytes(op.topic_filter)) for op in ops],
    )


async def _protocol_version_set(
    cur: Cursor, schema: str, cid: bytes, ops: list[ProtocolVersionSet]
) -> None:
    await cur.execute(
        statement(schema, "UPDATE {s}.sessions SET protocol_version = %s WHERE client_id = %s"),
        (ops[-1].version, cid),
    )


async def _messages_set_aside(
    cur: Cursor, schema: str, cid: bytes, ops: list[MessageSetAside]
) -> None:
    # The row moves with its stored fields; packet_id and released stay behind (set-aside
    # messages have none). Only a message still in messages moves, replacing an older one.
    for op in ops:
        await cur.execute(
            statement(
                schema,
                "WITH moved AS (DELETE FROM {s}.messages WHERE client_id = %s AND seq = %s "
                "RETURNING client_id, seq, topic, payload, qos, retain, properties, expires_at) "
                "INSERT INTO {s}.set_aside (client_id, seq, topic, payload, qos, retain, "
                "properties, expires_at, reason, set_aside_at) SELECT client_id, seq, topic, "
                "payload, qos, retain, properties, expires_at, %s, %s FROM moved "
                "ON CONFLICT (client_id, seq) DO UPDATE SET topic = EXCLUDED.topic, "
                "payload = EXCLUDED.payload, qos = EXCLUDED.qos, retain = EXCLUDED.retain, "
                "properties = EXCLUDED.properties, expires_at = EXCLUDED.expires_at, "
                "reason = EXCLUDED.reason, set_aside_at = EXCLUDED.set_aside_at",
            ),
            (cid, op.seq, text_bytes(op.reason), op.at),
        )


async def _set_aside_removed(
    cur: Cursor, schema: str, cid: bytes, ops: list[SetAsideRemoved]
) -> None:
    await cur.executemany(
        statement(schema, "DELETE FROM {s}.set_aside WHERE client_id = %s AND seq = %s"),
        [(cid, op.seq) for op in ops],
    )


#: A rule: ``await rule(cursor, schema, client id as stored, run of operations)``.
Rule = Callable[[Cursor, str, bytes, list[Any]], Awaitable[None]]

#: The rule of every operation type.
HANDLERS: dict[type, Rule] = {
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
check_handlers("PostgresStore", HANDLERS)
