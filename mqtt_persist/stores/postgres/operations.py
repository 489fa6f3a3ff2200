"""What each journal operation does to a PostgresStore schema: one SQL rule per type.

:data:`HANDLERS` is the one place that says it, keyed by operation type: the module fails to
import if a new operation type has no rule (see ``_checks.check_handlers``), and the
conformance tests compare the result of random operation sequences with
:meth:`SessionState.apply <mqtt_persist.session.state.SessionState.apply>`.

Each rule takes a run of operations of one type (:func:`plan_runs` makes as few runs as the
order allows) and returns ONE set-based statement per table it touches, the run's values passed
as arrays (``unnest``, ``= ANY``): a run of 100 added messages is one INSERT. Within a run, a
later operation on the same key wins (packet IDs, subscriptions) or the first one does (an added
message, as in ``SessionState.apply``), and executing the statements per table is the same as
executing them per operation: the two tables a run may touch (subscriptions and
pending_unsubscribes) change independently per filter. ``MessageSetAside`` is the exception,
one statement per operation: its copy into set_aside depends on the message still being in
messages.

How the store sends them: the statements of a whole ``apply`` (the fencing check and the
session's access first) go to the server as ONE simple-protocol query, the values bound on the
client side by psycopg's own quoting: PostgreSQL runs a query of several statements as one
transaction, so a batch is one round trip and all or nothing. It also means a process paused
(SIGSTOP) while sending it can hold no lock: the server starts nothing before it has the whole
message. A pipeline of prepared statements (psycopg's pipeline mode, which ``executemany`` uses
as well) was the first design and had to go: between its statements and the final Sync the
server sits in a state that ``idle_in_transaction_session_timeout`` does not cover, so a paused
owner held its transaction's locks, the fencing row's among them, for as long as it stayed
paused, and a new owner could never take over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from psycopg import sql

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

__all__ = ["HANDLERS", "Rule", "Statement", "plan_runs", "statement", "statements_of"]

#: A statement and its parameters (``%s`` placeholders).
Statement = tuple[bytes, tuple[Any, ...]]


@cache
def statement(schema: str, text: str) -> bytes:
    """``text`` with ``{s}`` standing for the quoted schema name (built once per schema)."""
    return sql.SQL(text).format(s=sql.Identifier(schema)).as_bytes(None)


def _last_per_key(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # Within a run, a later operation on the same key wins, as applied one by one.
    return dict(pairs)


def _messages_added(schema: str, cid: bytes, ops: list[MessageAdded]) -> list[Statement]:
    out: list[Statement] = []
    # ON CONFLICT DO NOTHING: a message already stored stays as it is (as in SessionState.apply);
    # within the run, the first of two with one seq (unnest keeps the order).
    messages = [op.message for op in ops]
    out.append(
        (
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
    )
    return out


def _packet_ids_assigned(schema: str, cid: bytes, ops: list[PacketIdAssigned]) -> list[Statement]:
    out: list[Statement] = []
    assigned = _last_per_key([(op.seq, op.packet_id) for op in ops])
    out.append(
        (
            statement(
                schema,
                "UPDATE {s}.messages m SET packet_id = v.packet_id FROM unnest(%s::bigint[], "
                "%s::integer[]) AS v(seq, packet_id) WHERE m.client_id = %s AND m.seq = v.seq",
            ),
            (list(assigned), list(assigned.values()), cid),
        )
    )
    return out


def _seqs(ops: list[Any]) -> list[int]:
    return [op.seq for op in ops]


def _messages_released(schema: str, cid: bytes, ops: list[MessageReleased]) -> list[Statement]:
    out: list[Statement] = []
    out.append(
        (
            statement(
                schema,
                "UPDATE {s}.messages SET released = true WHERE client_id = %s "
                "AND seq = ANY(%s::bigint[])",
            ),
            (cid, _seqs(ops)),
        )
    )
    return out


def _messages_requeued(schema: str, cid: bytes, ops: list[MessageRequeued]) -> list[Statement]:
    out: list[Statement] = []
    # Back to the queue as a new message: no packet ID, not released.
    out.append(
        (
            statement(
                schema,
                "UPDATE {s}.messages SET packet_id = NULL, released = false "
                "WHERE client_id = %s AND seq = ANY(%s::bigint[])",
            ),
            (cid, _seqs(ops)),
        )
    )
    return out


def _messages_removed(schema: str, cid: bytes, ops: list[MessageRemoved]) -> list[Statement]:
    out: list[Statement] = []
    out.append(
        (
            statement(
                schema, "DELETE FROM {s}.messages WHERE client_id = %s AND seq = ANY(%s::bigint[])"
            ),
            (cid, _seqs(ops)),
        )
    )
    return out


def _inbound_received(schema: str, cid: bytes, ops: list[InboundReceived]) -> list[Statement]:
    out: list[Statement] = []
    out.append(
        (
            statement(
                schema,
                "INSERT INTO {s}.inbound (client_id, packet_id) SELECT %s, * "
                "FROM unnest(%s::integer[]) ON CONFLICT DO NOTHING",
            ),
            (cid, [op.packet_id for op in ops]),
        )
    )
    return out


def _inbound_released(schema: str, cid: bytes, ops: list[InboundReleased]) -> list[Statement]:
    out: list[Statement] = []
    out.append(
        (
            statement(
                schema,
                "DELETE FROM {s}.inbound WHERE client_id = %s AND packet_id = ANY(%s::integer[])",
            ),
            (cid, [op.packet_id for op in ops]),
        )
    )
    return out


def _inbound_cleared(schema: str, cid: bytes, ops: list[InboundCleared]) -> list[Statement]:
    out: list[Statement] = []
    out.append((statement(schema, "DELETE FROM {s}.inbound WHERE client_id = %s"), (cid,)))
    return out


def _subscriptions_set(schema: str, cid: bytes, ops: list[SubscriptionSet]) -> list[Statement]:
    out: list[Statement] = []
    latest = _last_per_key([(text_bytes(op.topic_filter), op) for op in ops])
    subs = list(latest.values())
    out.append(
        (
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
    )
    out.append(_pending_done(schema, cid, list(latest)))
    return out


def _pending_done(schema: str, cid: bytes, filters: list[bytes]) -> Statement:
    return (
        statement(
            schema,
            "DELETE FROM {s}.pending_unsubscribes WHERE client_id = %s "
            "AND filter = ANY(%s::bytea[])",
        ),
        (cid, filters),
    )


def _subscriptions_removed(
    schema: str, cid: bytes, ops: list[SubscriptionRemoved]
) -> list[Statement]:
    out: list[Statement] = []
    out.append(
        (
            statement(
                schema,
                "DELETE FROM {s}.subscriptions WHERE client_id = %s AND filter = ANY(%s::bytea[])",
            ),
            (cid, [text_bytes(op.topic_filter) for op in ops]),
        )
    )
    pending = [text_bytes(op.topic_filter) for op in ops if op.unsubscribe_pending]
    if pending:
        out.append(
            (
                statement(
                    schema,
                    "INSERT INTO {s}.pending_unsubscribes (client_id, filter) SELECT %s, * "
                    "FROM unnest(%s::bytea[]) ON CONFLICT DO NOTHING",
                ),
                (cid, pending),
            )
        )
    return out


def _unsubscribes_done(schema: str, cid: bytes, ops: list[UnsubscribeDone]) -> list[Statement]:
    return [_pending_done(schema, cid, [text_bytes(op.topic_filter) for op in ops])]


def _protocol_version_set(
    schema: str, cid: bytes, ops: list[ProtocolVersionSet]
) -> list[Statement]:
    out: list[Statement] = []
    out.append(
        (
            statement(schema, "UPDATE {s}.sessions SET protocol_version = %s WHERE client_id = %s"),
            (ops[-1].version, cid),
        )
    )
    return out


def _messages_set_aside(schema: str, cid: bytes, ops: list[MessageSetAside]) -> list[Statement]:
    out: list[Statement] = []
    # The row moves with its stored fields; packet_id and released stay behind (set-aside
    # messages have none). Only a message still in messages moves, replacing an older one.
    for op in ops:
        out.append(
            (
                statement(
                    schema,
                    "WITH moved AS (DELETE FROM {s}.messages WHERE client_id = %s AND seq = %s "
                    "RETURNING client_id, seq, topic, payload, qos, retain, properties, "
                    "expires_at) "
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
        )
    return out


def _set_aside_removed(schema: str, cid: bytes, ops: list[SetAsideRemoved]) -> list[Statement]:
    out: list[Statement] = []
    out.append(
        (
            statement(
                schema, "DELETE FROM {s}.set_aside WHERE client_id = %s AND seq = ANY(%s::bigint[])"
            ),
            (cid, _seqs(ops)),
        )
    )
    return out


#: A rule: ``rule(schema, client id as stored, run of operations)`` -> its statements.
Rule = Callable[[str, bytes, list[Any]], list[Statement]]

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


# --- runs --------------------------------------------------------------------------------------

#: The types keyed by a message's seq besides MessageAdded (whose seq is its message's).
_SEQ_TYPES = (
    PacketIdAssigned,
    MessageReleased,
    MessageRequeued,
    MessageRemoved,
    MessageSetAside,
    SetAsideRemoved,
)
_SUBSCRIPTION_TYPES = (SubscriptionSet, SubscriptionRemoved, UnsubscribeDone)
#: The key of InboundCleared: every inbound packet ID at once.
_ALL_INBOUND = ("inbound", None)


def _key(op: Any) -> tuple[str, object]:
    """What an operation touches: two operations with different keys commute."""
    if type(op) is MessageAdded:
        return ("message", op.message.seq)
    if isinstance(op, _SEQ_TYPES):
        return ("message", op.seq)
    if isinstance(op, InboundReceived | InboundReleased):
        return ("inbound", op.packet_id)
    if type(op) is InboundCleared:
        return _ALL_INBOUND
    if isinstance(op, _SUBSCRIPTION_TYPES):
        return ("subscription", op.topic_filter)
    return ("protocol", None)


def _conflict(a: tuple[str, object], keys: set[tuple[str, object]]) -> bool:
    if a in keys:
        return True
    if a[0] == "inbound":
        return _ALL_INBOUND in keys or (a == _ALL_INBOUND and any(k[0] == "inbound" for k in keys))
    return False


def plan_runs(ops: Sequence[Any]) -> list[tuple[type, list[Any]]]:
    """The batch as runs of one operation type each, as few as the order allows.

    Each rule costs a statement (a round trip) per run, and a client's burst interleaves its
    types (MessageAdded, PacketIdAssigned, MessageAdded, ...): taken as they come, 100
    publishes would cost 200 statements. An operation may move ahead of earlier ones that
    touch other keys (they commute): it joins the last run of its type unless an operation of
    another type on its key (a message's seq, an inbound packet ID, a filter) lies in that run
    or a later one; then it starts a new run. Operations of one type and key keep their order
    in one run, which every rule handles (see the module documentation).
    """
    runs: list[tuple[type, list[Any], set[tuple[str, object]]]] = []
    last_of_type: dict[type, int] = {}
    for op in ops:
        op_type, key = type(op), _key(op)
        # After the last run holding an operation of another type on this key.
        floor = 0
        for index in range(len(runs) - 1, -1, -1):
            run_type, _, keys = runs[index]
            if run_type is not op_type and _conflict(key, keys):
                floor = index + 1
                break
        target = last_of_type.get(op_type)
        if target is None or target < floor:
            runs.append((op_type, [op], {key}))
            last_of_type[op_type] = len(runs) - 1
        else:
            runs[target][1].append(op)
            runs[target][2].add(key)
    return [(run_type, run_ops) for run_type, run_ops, _ in runs]


def statements_of(schema: str, cid: bytes, ops: Sequence[Any]) -> list[Statement]:
    """Every statement of a batch, in order: each run's rule (:func:`plan_runs`)."""
    out: list[Statement] = []
    for op_type, run in plan_runs(ops):
        out += HANDLERS[op_type](schema, cid, run)
    return out
