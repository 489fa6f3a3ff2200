"""What each journal operation does to a PostgresStore schema: one SQL rule per type.

:data:`HANDLERS` is the one place that says it, keyed by operation type: the module fails to
import if a new operation type has no rule (see ``_checks.check_handlers``), and the
conformance tests compare the result of random operation sequences with
:meth:`SessionState.apply <mqtt_persist.session.state.SessionState.apply>`.

Each rule takes a run of consecutive operations of one type and runs ONE set-based statement
per table it touches, the run's values passed as arrays (``unnest``, ``= ANY``): a run of 100
added messages is one INSERT. Within a run, a later operation on the same key wins (packet IDs,
subscriptions) or the first one does (an added message, as in ``SessionState.apply``), and
executing the statements per table is the same as executing them per operation: the two tables
a run may touch (subscriptions and pending_unsubscribes) change independently per filter.
``MessageSetAside`` is the exception, run per operation: its copy into set_aside depends on the
message still being in messages.

Why no pipeline and no ``executemany`` (which psycopg pipelines): a statement sent without its
Sync leaves the server waiting for the rest in a state that ``idle_in_transaction_session_
timeout`` does not cover, so a process paused (SIGSTOP) in the middle of a pipeline would hold
its transaction's locks, the fencing row's among them, for as long as it stays paused, and a new
owner could never take over. Each statement here is one message with its Sync: a pause between
two of them leaves the transaction idle, and PostgreSQL ends it after the timeout.
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


def _last_per_key(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # Within a run, a later operation on the same key wins, as applied one by one.
    return dict(pairs)


async def _messages_added(cur: Cursor, schema: str, cid: bytes, ops: list[MessageAdded]) -> None:
    # ON CONFLICT DO NOTHING: a message already stored stays as it is (as in SessionState.apply);
    # within the run, the first of two with one seq (unnest keeps the order).
    messages = [op.message for op in ops]
    await cur.execute(
        statement(
            schema,
            "INSERT INTO {s}.messages (client_id, seq, topic, payload, qos, retain, packet_id, "
            "released, properties, expires_at) SELECT %s, * FROM unnest(%s::bigint[], "
            "%s::bytea[], %s::bytea[], %s::smallint[], %s::boolean[], %s::integer[], "
            "%s::boolean[], %s::bytea[], %s::double precision[]) ON CONFLICT DO NOTHING",
        ),
        (
            cid,
            [m.seq for m in messages],
            [text_bytes(m.topic) for m in messages],
            [m.payload for m in messages],
            [m.qos for m in messages],
            [m.retain for m in messages],
            [m.packet_id for m in messages],
            [m.released for m in messages],
            [m.properties for m in messages],
            [m.expires_at for m in messages],
        ),
    )


async def _packet_ids_assigned(
    cur: Cursor, schema: str, cid: bytes, ops: list[PacketIdAssigned]
) -> None:
    assigned = _last_per_key([(op.seq, op.packet_id) for op in ops])
    await cur.execute(
        statement(
            schema,
            "UPDATE {s}.messages m SET packet_id = v.packet_id FROM unnest(%s::bigint[], "
            "%s::integer[]) AS v(seq, packet_id) WHERE m.client_id = %s AND m.seq = v.seq",
        ),
        (list(assigned), list(assigned.values()), cid),
    )


def _seqs(ops: list[Any]) -> list[int]:
    return [op.seq for op in ops]


async def _messages_released(
    cur: Cursor, schema: str, cid: bytes, ops: list[MessageReleased]
) -> None:
    await cur.execute(
        statement(
            schema,
            "UPDATE {s}.messages SET released = true WHERE client_id = %s "
            "AND seq = ANY(%s::bigint[])",
        ),
        (cid, _seqs(ops)),
    )


async def _messages_requeued(
    cur: Cursor, schema: str, cid: bytes, ops: list[MessageRequeued]
) -> None:
    # Back to the queue as a new message: no packet ID, not released.
    await cur.execute(
        statement(
            schema,
            "UPDATE {s}.messages SET packet_id = NULL, released = false "
            "WHERE client_id = %s AND seq = ANY(%s::bigint[])",
        ),
        (cid, _seqs(ops)),
    )


async def _messages_removed(
    cur: Cursor, schema: str, cid: bytes, ops: list[MessageRemoved]
) -> None:
    await cur.execute(
        statement(
            schema, "DELETE FROM {s}.messages WHERE client_id = %s AND seq = ANY(%s::bigint[])"
        ),
        (cid, _seqs(ops)),
    )


async def _inbound_received(
    cur: Cursor, schema: str, cid: bytes, ops: list[InboundReceived]
) -> None:
    await cur.execute(
        statement(
            schema,
            "INSERT INTO {s}.inbound (client_id, packet_id) SELECT %s, * "
            "FROM unnest(%s::integer[]) ON CONFLICT DO NOTHING",
        ),
        (cid, [op.packet_id for op in ops]),
    )


async def _inbound_released(
    cur: Cursor, schema: str, cid: bytes, ops: list[InboundReleased]
) -> None:
    await cur.execute(
        statement(
            schema,
            "DELETE FROM {s}.inbound WHERE client_id = %s AND packet_id = ANY(%s::integer[])",
        ),
        (cid, [op.packet_id for op in ops]),
    )


async def _inbound_cleared(cur: Cursor, schema: str, cid: bytes, ops: list[InboundCleared]) -> None:
    await cur.execute(statement(schema, "DELETE FROM {s}.inbound WHERE client_id = %s"), (cid,))


async def _subscriptions_set(
    cur: Cursor, schema: str, cid: bytes, ops: list[SubscriptionSet]
) -> None:
    latest = _last_per_key([(text_bytes(op.topic_filter), op) for op in ops])
    subs = list(latest.values())
    await cur.execute(
        statement(
            schema,
            "INSERT INTO {s}.subscriptions (client_id, filter, qos, confirmed, options, "
            "subscription_id) SELECT %s, * FROM unnest(%s::bytea[], %s::smallint[], "
            "%s::boolean[], %s::smallint[], %s::integer[]) ON CONFLICT (client_id, filter) "
            "DO UPDATE SET qos = EXCLUDED.qos, confirmed = EXCLUDED.confirmed, "
            "options = EXCLUDED.options, subscription_id = EXCLUDED.subscription_id",
        ),
        (
            cid,
            list(latest),
            [op.qos for op in subs],
            [op.confirmed for op in subs],
            [op.options for op in subs],
            [op.subscription_id for op in subs],
        ),
    )
    await _pending_done(cur, schema, cid, list(latest))


async def _pending_done(cur: Cursor, schema: str, cid: bytes, filters: list[bytes]) -> None:
    await cur.execute(
        statement(
            schema,
            "DELETE FROM {s}.pending_unsubscribes WHERE client_id = %s "
            "AND filter = ANY(%s::bytea[])",
        ),
        (cid, filters),
    )


async def _subscriptions_removed(
    cur: Cursor, schema: str, cid: bytes, ops: list[SubscriptionRemoved]
) -> None:
    await cur.execute(
        statement(
            schema,
            "DELETE FROM {s}.subscriptions WHERE client_id = %s AND filter = ANY(%s::bytea[])",
        ),
        (cid, [text_bytes(op.topic_filter) for op in ops]),
    )
    pending = [text_bytes(op.topic_filter) for op in ops if op.unsubscribe_pending]
    if pending:
        await cur.execute(
            statement(
                schema,
                "INSERT INTO {s}.pending_unsubscribes (client_id, filter) SELECT %s, * "
                "FROM unnest(%s::bytea[]) ON CONFLICT DO NOTHING",
            ),
            (cid, pending),
        )


async def _unsubscribes_done(
    cur: Cursor, schema: str, cid: bytes, ops: list[UnsubscribeDone]
) -> None:
    await _pending_done(cur, schema, cid, [text_bytes(op.topic_filter) for op in ops])


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
    await cur.execute(
        statement(
            schema, "DELETE FROM {s}.set_aside WHERE client_id = %s AND seq = ANY(%s::bigint[])"
        ),
        (cid, _seqs(ops)),
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
