"""The session state machine: the MQTT client's behaviour with no I/O in it.

It consumes events — a publish or subscribe requested by the application, a packet decoded from
the broker, the connection opened or lost, the clock moving on — and produces three things,
collected in an :class:`Outbox` that the I/O shell drains with :meth:`Session.take`:

* store operations (the write-ahead journal), which the shell commits first,
* packets, which the shell writes to the connection only after those operations committed,
* events for the application (messages received, deliveries completed, connection ready).

Committing all of a batch's operations before writing any of its packets is always safe: every
operation describes the state *after* the packets of the same batch, and each flow tolerates the
broker not having seen a packet the store already counts as sent (it is resent on reconnect).

The machine never awaits and never reads a clock of its own; the caller passes ``now``. That is
what makes it exhaustively testable (tests/test_session.py drives it packet by packet) and cheap.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from mqtt_persist.errors import KeepaliveTimeout, ProtocolError, QueueFull
from mqtt_persist.message import DeliveryOutcome, Message
from mqtt_persist.protocol.packets import (
    SUBACK_FAILURE,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
)
from mqtt_persist.session.events import (
    Anomaly,
    ConnectionReady,
    ConnectRefused,
    Event,
    MessageReceived,
    PublishCompleted,
    SubscribeCompleted,
    UnsubscribeCompleted,
)
from mqtt_persist.session.packet_ids import PacketIdAllocator
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

QueueFullPolicy = Literal["block", "drop_oldest", "error"]

#: Filters per SUBSCRIBE when re-subscribing a large stored set; keeps packets modest.
_RESUBSCRIBE_CHUNK = 64


class ConnectionState(enum.Enum):
    """Where the current connection stands, as far as the session knows."""

    DISCONNECTED = "disconnected"
    #: CONNECT handed to the shell; waiting for CONNACK.
    CONNECTING = "connecting"
    #: The broker lost the session; stored subscriptions are being restored before READY.
    RESUBSCRIBING = "resubscribing"
    READY = "ready"


@dataclass(slots=True)
class SessionConfig:
    """Connection and flow-control settings the state machine needs."""

    client_id: str
    clean_session: bool = False
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    #: QoS 1/2 messages in flight at once. A durable store commits once per window refill, so
    #: a wider window is what makes durable QoS 1 fast (measured: 100 doubles it over 20).
    max_inflight: int = 100
    #: QoS 2 flows in flight at once (within max_inflight). mosquitto gives each client a quota
    #: of 20 unacknowledged inbound flows on MQTT 3.1.1 and silently drops whatever arrives past
    #: it, while still answering PUBREC or PUBACK. A QoS 2 flow holds a slot until PUBREL; a
    #: QoS 1 message needs a free slot only as it arrives. Measured: 20 open QoS 2 flows made
    #: mosquitto drop every QoS 1 message sent meanwhile; 19 leave it the slot it needs.
    max_inflight_qos2: int = 19
    #: Messages waiting for the in-flight window (0: unbounded).
    max_queued: int = 0
    #: Queued messages kept in memory (0: all). Beyond it, QoS 1/2 messages live only in the
    #: store and are read back (``want_refill``/``refill``) when the window is about to need
    #: them, so memory grows with this bound and the in-flight window, not with the queue.
    queue_memory_limit: int = 0
    queue_full: QueueFullPolicy = "block"
    #: How long to wait for PINGRESP (and CONNACK is the shell's business).
    ping_timeout: float | None = None


@dataclass(slots=True)
class Outbox:
    """Everything the machine produced since the last :meth:`Session.take`."""

    ops: list[Operation] = field(default_factory=list)
    packets: list[Packet] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    #: The connection the packets belong to; the shell drops them if that connection is gone.
    generation: int = 0


class _Outgoing:
    """An outgoing message the machine is responsible for (QoS 0 ones are never stored)."""

    __slots__ = ("packet_id", "payload", "qos", "released", "retain", "seq", "topic")

    def __init__(
        self,
        seq: int,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        packet_id: int | None = None,
        released: bool = False,
    ) -> None:
        self.seq = seq
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.packet_id = packet_id
        self.released = released


class _Request:
    """A subscribe/unsubscribe call waiting for the broker to answer each of its filters."""

    __slots__ = ("codes", "remaining", "token", "unsubscribe")

    def __init__(self, token: int, filters: list[str], unsubscribe: bool) -> None:
        self.token = token
        self.codes: dict[str, int] = dict.fromkeys(filters, -1)
        self.remaining = len(self.codes)
        self.unsubscribe = unsubscribe


class Session:
    """A client session: flows, packet IDs, queue, subscriptions, keepalive. No I/O."""

    def __init__(self, config: SessionConfig, state: SessionState | None = None) -> None:
        self.config = config
        self.state = ConnectionState.DISCONNECTED
        self.generation = 0
        self._ops: list[Operation] = []
        self._packets: list[Packet] = []
        self._events: list[Event] = []
        self._queue: deque[_Outgoing] = deque()
        # Spilled: QoS 1/2 messages with seq > _spill_after that are queued in the store only.
        self._spilled = 0
        self._spill_after = 0
        self._refill_pending = False
        # QoS 0 messages published while spilled: never stored, merged back in by seq.
        self._overflow_qos0: deque[_Outgoing] = deque()
        # drop_oldest found only spilled messages to drop: dropped when they are read back.
        self._pending_drops = 0
        # Insertion order is send order: a flow enters the window in sequence order.
        self._inflight: dict[int, _Outgoing] = {}
        self._inflight_qos2 = 0
        self._inbound_qos2: set[int] = set()
        self._subs: dict[str, StoredSubscription] = {}
        self._pending_unsubs: set[str] = set()
        self._ids = PacketIdAllocator()
        self._next_seq = 1
        self._next_token = 1
        # Per connection: which SUBSCRIBE/UNSUBSCRIBE packet IDs carry which filters.
        self._sub_packets: dict[int, list[tuple[str, int]]] = {}
        self._unsub_packets: dict[int, list[str]] = {}
        self._filters_in_flight: set[str] = set()
        self._waiters: dict[str, list[_Request]] = {}
        self._resubscribe_ids: set[int] = set()
        self._lost_requeued = 0
        self._lost_in_doubt = 0
        self._last_sent = 0.0
        self._ping_sent_at: float | None = None
        #: Counters the client exposes as statistics.
        self.dropped = 0
        self.in_doubt = 0
        self.requeued = 0
        self.duplicates_suppressed = 0
        if state is not None:
            self._restore(state)

    # --- restore / snapshot ------------------------------------------------------------------

    def _restore(self, state: SessionState) -> None:
        if state.client_id != self.config.client_id:
            raise ValueError(
                f"stored session belongs to {state.client_id!r}, not {self.config.client_id!r}"
            )
        for m in state.messages.values():
            out = _Outgoing(m.seq, m.topic, m.payload, m.qos, m.retain, m.packet_id, m.released)
            if m.packet_id is None:
                self._queue.append(out)
                self._spill_after = m.seq
            else:
                self._inflight[m.packet_id] = out
                self._inflight_qos2 += m.qos == 2
                self._ids.reserve(m.packet_id)
            self._next_seq = max(self._next_seq, m.seq + 1)
        self._next_seq = max(self._next_seq, state.last_seq + 1)
        self._spilled = state.queued_not_loaded
        self._inbound_qos2 = set(state.inbound_qos2)
        self._subs = dict(state.subscriptions)
        self._pending_unsubs = set(state.pending_unsubscribes)

    def snapshot(self) -> SessionState:
        """The durable state this session implies; what a store must give back after replay."""
        messages: dict[int, StoredMessage] = {}
        stored = [o for o in (*self._inflight.values(), *self._queue) if o.qos]
        for o in sorted(stored, key=lambda o: o.seq):
            messages[o.seq] = StoredMessage(
                o.seq, o.topic, o.payload, o.qos, o.retain, o.packet_id, o.released
            )
        return SessionState(
            client_id=self.config.client_id,
            messages=messages,
            inbound_qos2=set(self._inbound_qos2),
            subscriptions=dict(self._subs),
            pending_unsubscribes=set(self._pending_unsubs),
        )

    # --- queries -----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Messages waiting for the in-flight window (or for a connection)."""
        return len(self._queue) + self._spilled + len(self._overflow_qos0) - self._pending_drops

    @property
    def queued_in_memory(self) -> int:
        """Queued messages held in memory (the rest are read back from the store when due)."""
        return len(self._queue) + len(self._overflow_qos0)

    @property
    def inflight(self) -> int:
        """QoS 1/2 messages sent (or to be resent) and not yet acknowledged."""
        return len(self._inflight)

    @property
    def queue_is_full(self) -> bool:
        limit = self.config.max_queued
        return bool(limit) and self.queued >= limit

    @property
    def subscriptions(self) -> dict[str, int]:
        """Filters the session wants, with their requested QoS."""
        return {f: s.qos for f, s in self._subs.items()}

    @property
    def is_idle(self) -> bool:
        """Nothing left to deliver: no queued or in-flight messages."""
        return not self._inflight and not self.queued

    def has_output(self) -> bool:
        return bool(self._ops or self._packets or self._events)

    def take(self, now: float) -> Outbox:
        """Drain what was produced. Packets are assumed written at ``now`` (keepalive timing)."""
        outbox = Outbox(self._ops, self._packets, self._events, self.generation)
        if self._packets:
            self._last_sent = now
        # Always fresh lists: the outbox must not share one with what comes after it, or a
        # packet produced while the shell awaits the commit would ride out with this batch.
        self._ops = []
        self._packets = []
        self._events = []
        return outbox

    # --- application requests ----------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> int:
        """Accept a message (already validated); returns its sequence number.

        Raises :class:`QueueFull` when the queue is full and the policy is not drop_oldest;
        with ``"block"`` the shell is expected to wait for room before calling.
        """
        if self.queue_is_full:
            if self.config.queue_full != "drop_oldest":
                raise QueueFull(
                    f"outgoing queue is full ({self.config.max_queued} messages waiting)"
                )
            self._drop_oldest()
        seq = self._next_seq
        self._next_seq = seq + 1
        if qos:
            self._ops.append(MessageAdded(StoredMessage(seq, topic, payload, qos, retain)))
            memory_limit = self.config.queue_memory_limit
            if self._spilled or (memory_limit and len(self._queue) >= memory_limit):
                # Lives in the store only until the window needs it (want_refill). Every
                # message before it is in memory, in flight or done: the store's queue
                # beyond seq - 1 is exactly what is spilled.
                if not self._spilled:
                    self._spill_after = seq - 1
                self._spilled += 1
                return seq
        out = _Outgoing(seq, topic, payload, qos, retain)
        if self._spilled:
            self._overflow_qos0.append(out)  # must not overtake the spilled messages
            return seq
        self._queue.append(out)
        if self.state is ConnectionState.READY:
            self._pump()
        return seq

    def _drop_oldest(self) -> None:
        if not self._queue:
            # Every queued message is in the store only; drop the oldest once it is read back.
            self._pending_drops += 1
            return
        self._drop(self._queue.popleft())

    def _drop(self, victim: _Outgoing) -> None:
        if victim.qos:
            self._ops.append(MessageRemoved(victim.seq))
        self.dropped += 1
        self._events.append(PublishCompleted(victim.seq, DeliveryOutcome.DROPPED))

    # --- queued messages that live in the store only ------------------------------------------

    def want_refill(self) -> tuple[int, int] | None:
        """``(after_seq, limit)`` to read from the store's queue, or None.

        Call it only after every operation taken so far has been committed, then pass what
        ``store.read_queued(client_id, after_seq, limit)`` returned to :meth:`refill`.
        """
        if not self._spilled or self._refill_pending:
            return None
        limit = self.config.queue_memory_limit or 1000
        if len(self._queue) > limit // 2 and not self._pending_drops:
            return None
        self._refill_pending = True
        return self._spill_after, max(1, limit - len(self._queue))

    def refill(self, messages: list[StoredMessage]) -> None:
        """Queued messages read back from the store (ascending seq, all > the after_seq asked)."""
        self._refill_pending = False
        for m in messages:
            if m.seq <= self._spill_after or m.packet_id is not None:
                continue  # a stale read; never queue a message twice
            while self._overflow_qos0 and self._overflow_qos0[0].seq < m.seq:
                self._queue.append(self._overflow_qos0.popleft())
            out = _Outgoing(m.seq, m.topic, m.payload, m.qos, m.retain)
            self._spill_after = m.seq
            self._spilled -= 1
            if self._pending_drops:
                self._pending_drops -= 1
                self._drop(out)
            else:
                self._queue.append(out)
        if self._spilled <= 0:
            self._spilled = 0
            self._queue.extend(self._overflow_qos0)
            self._overflow_qos0.clear()
        if self.state is ConnectionState.READY:
            self._pump()

    def subscribe(self, subscriptions: list[tuple[str, int]]) -> int:
        """Record subscriptions (already validated); returns a token for SubscribeCompleted."""
        token = self._new_token()
        request = _Request(token, [f for f, _ in subscriptions], unsubscribe=False)
        for topic_filter, qos in subscriptions:
            self._subs[topic_filter] = StoredSubscription(topic_filter, qos, False)
            self._pending_unsubs.discard(topic_filter)
            self._ops.append(SubscriptionSet(topic_filter, qos, False))
            self._waiters.setdefault(topic_filter, []).append(request)
        if self.state is ConnectionState.READY:
            self._send_subscribe(list(dict(subscriptions).items()))
        return token

    def unsubscribe(self, filters: list[str]) -> int:
        """Forget filters (already validated); returns a token for UnsubscribeCompleted."""
        token = self._new_token()
        request = _Request(token, filters, unsubscribe=True)
        for topic_filter in dict.fromkeys(filters):
            # A subscribe still waiting for this filter will never be granted now.
            self._answer(topic_filter, SUBACK_FAILURE, unsubscribe=False)
            self._subs.pop(topic_filter, None)
            self._pending_unsubs.add(topic_filter)
            self._ops.append(SubscriptionRemoved(topic_filter, unsubscribe_pending=True))
            self._waiters.setdefault(topic_filter, []).append(request)
        if self.state is ConnectionState.READY:
            self._send_unsubscribe(list(dict.fromkeys(filters)))
        return token

    def _new_token(self) -> int:
        token = self._next_token
        self._next_token += 1
        return token

    # --- connection lifecycle ----------------------------------------------------------------

    def connect(self, now: float) -> int:
        """A transport is open: emit CONNECT. Returns the new connection generation."""
        if self.state is not ConnectionState.DISCONNECTED:
            raise RuntimeError(f"connect() while {self.state.value}")
        self.generation += 1
        self.state = ConnectionState.CONNECTING
        cfg = self.config
        self._packets.append(
            Connect(
                client_id=cfg.client_id,
                clean_session=cfg.clean_session,
                keepalive=cfg.keepalive,
                username=cfg.username,
                password=cfg.password,
                will=cfg.will,
            )
        )
        self._ping_sent_at = None
        self._last_sent = now
        return self.generation

    def disconnect(self) -> None:
        """Graceful close: emit DISCONNECT; the session stays stored for the next connect."""
        if self.state is not ConnectionState.DISCONNECTED:
            self._packets.append(Disconnect())

    def connection_lost(self) -> None:
        """The transport closed. Everything not acknowledged is resent on the next connect."""
        self.state = ConnectionState.DISCONNECTED
        # Packets produced for the dead connection are dropped by generation in the shell.
        self._packets = []
        for packet_id in (*self._sub_packets, *self._unsub_packets):
            self._ids.release(packet_id)
        self._sub_packets.clear()
        self._unsub_packets.clear()
        self._filters_in_flight.clear()
        self._resubscribe_ids.clear()
        self._ping_sent_at = None
        # QoS 0 messages already written are gone; those still queued wait for the next connect.

    # --- keepalive ---------------------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Advance the clock; returns when to call again (None: no timer needed).

        Raises :class:`KeepaliveTimeout` when the broker left a PINGREQ unanswered too long.
        """
        keepalive = self.config.keepalive
        if self.state is ConnectionState.DISCONNECTED or not keepalive:
            return None
        timeout = self.config.ping_timeout or float(keepalive)
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= timeout:
                raise KeepaliveTimeout(
                    f"no answer from the broker {timeout:g}s after PINGREQ; "
                    "treating the connection as dead"
                )
            return self._ping_sent_at + timeout
        if self.state is ConnectionState.CONNECTING:
            return None
        due = self._last_sent + keepalive
        if now >= due:
            self._packets.append(PingReq())
            self._ping_sent_at = now
            return now + timeout
        return due

    # --- packets from the broker -------------------------------------------------------------

    def receive(self, packet: Packet) -> None:
        """Consume one decoded packet."""
        # Any packet proves the link alive; a PINGRESP is not required specifically.
        self._ping_sent_at = None
        kind = type(packet)
        if self.state is ConnectionState.CONNECTING:
            if kind is ConnAck:
                assert isinstance(packet, ConnAck)
                self._on_connack(packet)
                return
            raise ProtocolError(f"expected CONNACK, got {kind.__name__.upper()}")
        if self.state is ConnectionState.DISCONNECTED:
            raise ProtocolError(f"{kind.__name__.upper()} received while disconnected")
        handler = _HANDLERS.get(kind)
        if handler is None:
            raise ProtocolError(f"a broker must not send {kind.__name__.upper()} to a client")
        handler(self, packet)

    def _on_connack(self, connack: ConnAck) -> None:
        if connack.return_code != 0:
            self._events.append(ConnectRefused(connack.return_code))
            self.state = ConnectionState.DISCONNECTED
            return
        if connack.session_present:
            self._lost_requeued = self._lost_in_doubt = 0
            self._become_ready(session_present=True)
            return
        self._session_lost()
        if self._subs:
            self.state = ConnectionState.RESUBSCRIBING
            pairs = [(f, s.qos) for f, s in self._subs.items()]
            for start in range(0, len(pairs), _RESUBSCRIBE_CHUNK):
                packet_id = self._send_subscribe(pairs[start : start + _RESUBSCRIBE_CHUNK])
                self._resubscribe_ids.add(packet_id)
        else:
            self._become_ready(session_present=False)

    def _session_lost(self) -> None:
        """CONNACK said the broker holds no session: discard its flows, keep every message.

        Messages it never acknowledged go back to the queue as new messages (MQTT 5 §4.1 wants
        the client to discard session state it shared with the broker); QoS 2 messages past
        PUBREC are in doubt, because only the broker knew whether it forwarded them.
        """
        requeue: list[_Outgoing] = []
        in_doubt = 0
        for out in self._inflight.values():
            self._ids.release(out.packet_id)  # type: ignore[arg-type]
            if out.released:
                in_doubt += 1
                self._ops.append(MessageRemoved(out.seq))
                self._events.append(PublishCompleted(out.seq, DeliveryOutcome.IN_DOUBT))
            else:
                out.packet_id = None
                self._ops.append(MessageRequeued(out.seq))
                requeue.append(out)
        self._inflight.clear()
        self._inflight_qos2 = 0
        if requeue:
            # In-flight messages are older than any queued one: they go first, in order.
            requeue.sort(key=lambda o: o.seq)
            self._queue.extendleft(reversed(requeue))
        if self._inbound_qos2:
            self._inbound_qos2.clear()
            self._ops.append(InboundCleared())
        for topic_filter in sorted(self._pending_unsubs):
            self._ops.append(UnsubscribeDone(topic_filter))
            self._answer(topic_filter, 0, unsubscribe=True)
        self._pending_unsubs.clear()
        self.in_doubt += in_doubt
        self.requeued += len(requeue)
        self._lost_requeued = len(requeue)
        self._lost_in_doubt = in_doubt

    def _become_ready(self, *, session_present: bool) -> None:
        self.state = ConnectionState.READY
        # Subscriptions the broker may not have yet (made offline, or SUBACK never came).
        missing = [
            (f, s.qos)
            for f, s in self._subs.items()
            if not s.confirmed and f not in self._filters_in_flight
        ]
        if missing:
            self._send_subscribe(missing)
        if self._pending_unsubs:
            self._send_unsubscribe(sorted(self._pending_unsubs))
        # Resume every open flow in sequence order with its original packet ID (G2, G5).
        for out in sorted(self._inflight.values(), key=lambda o: o.seq):
            if out.released:
                self._packets.append(PubRel(out.packet_id))  # type: ignore[arg-type]
            else:
                self._packets.append(
                    Publish(out.topic, out.payload, out.qos, out.retain, True, out.packet_id)
                )
        self._events.append(
            ConnectionReady(session_present, self._lost_requeued, self._lost_in_doubt)
        )
        self._pump()

    def _pump(self) -> None:
        """Move queued messages into the window while it has room, in order."""
        queue = self._queue
        inflight = self._inflight
        limit = self.config.max_inflight
        limit_qos2 = self.config.max_inflight_qos2
        packets = self._packets
        while queue:
            out = queue[0]
            if out.qos == 0:
                queue.popleft()
                packets.append(Publish(out.topic, out.payload, 0, out.retain, False, None))
                self._events.append(PublishCompleted(out.seq, DeliveryOutcome.SENT))
                continue
            if len(inflight) >= limit:
                return
            if out.qos == 2:
                if self._inflight_qos2 >= limit_qos2:
                    return  # waits at the head: nothing overtakes it (order, G5)
                self._inflight_qos2 += 1
            queue.popleft()
            packet_id = self._ids.allocate()
            out.packet_id = packet_id
            inflight[packet_id] = out
            self._ops.append(PacketIdAssigned(out.seq, packet_id))
            packets.append(Publish(out.topic, out.payload, out.qos, out.retain, False, packet_id))

    def _on_pingresp(self, packet: PingResp) -> None:
        pass  # receive() already cleared the outstanding ping

    def _finish(self, packet_id: int) -> None:
        out = self._inflight.pop(packet_id)
        self._inflight_qos2 -= out.qos == 2
        self._ids.release(packet_id)
        self._ops.append(MessageRemoved(out.seq))
        self._events.append(PublishCompleted(out.seq, DeliveryOutcome.ACKNOWLEDGED))
        if self._queue and self.state is ConnectionState.READY:
            self._pump()

    def _on_puback(self, packet: PubAck) -> None:
        packet_id = packet.packet_id
        out = self._inflight.get(packet_id)
        if out is None or out.qos != 1:
            self._events.append(Anomaly(f"PUBACK for packet ID {packet_id}, not a QoS 1 flow"))
            return
        self._finish(packet_id)

    def _on_pubrec(self, packet: PubRec) -> None:
        packet_id = packet.packet_id
        out = self._inflight.get(packet_id)
        if out is None or out.qos != 2:
            self._events.append(Anomaly(f"PUBREC for packet ID {packet_id}, not a QoS 2 flow"))
            return
        if not out.released:
            out.released = True
            self._ops.append(MessageReleased(out.seq))
        self._packets.append(PubRel(packet_id))

    def _on_pubcomp(self, packet: PubComp) -> None:
        packet_id = packet.packet_id
        out = self._inflight.get(packet_id)
        if out is None or not out.released:
            self._events.append(Anomaly(f"PUBCOMP for packet ID {packet_id}, not awaiting one"))
            return
        self._finish(packet_id)

    def _on_publish(self, publish: Publish) -> None:
        qos = publish.qos
        if qos == 0:
            self._events.append(MessageReceived(_message(publish)))
        elif qos == 1:
            self._events.append(MessageReceived(_message(publish)))
            self._packets.append(PubAck(publish.packet_id))  # type: ignore[arg-type]
        else:
            packet_id: int = publish.packet_id  # type: ignore[assignment]
            if packet_id in self._inbound_qos2:
                # Re-sent before our PUBREC reached the broker: acknowledge, never redeliver.
                self.duplicates_suppressed += 1
            else:
                self._inbound_qos2.add(packet_id)
                self._ops.append(InboundReceived(packet_id))
                self._events.append(MessageReceived(_message(publish)))
            self._packets.append(PubRec(packet_id))

    def _on_pubrel(self, packet: PubRel) -> None:
        packet_id = packet.packet_id
        if packet_id in self._inbound_qos2:
            self._inbound_qos2.discard(packet_id)
            self._ops.append(InboundReleased(packet_id))
        # Answer even an unknown ID: the broker is finishing a flow we already closed.
        self._packets.append(PubComp(packet_id))

    # --- subscriptions -----------------------------------------------------------------------

    def _send_subscribe(self, pairs: list[tuple[str, int]]) -> int:
        packet_id = self._ids.allocate()
        self._sub_packets[packet_id] = pairs
        self._filters_in_flight.update(f for f, _ in pairs)
        self._packets.append(Subscribe(packet_id, pairs))
        return packet_id

    def _send_unsubscribe(self, filters: list[str]) -> None:
        packet_id = self._ids.allocate()
        self._unsub_packets[packet_id] = filters
        self._packets.append(Unsubscribe(packet_id, filters))

    def _on_suback(self, suback: SubAck) -> None:
        pairs = self._sub_packets.pop(suback.packet_id, None)
        if pairs is None:
            self._events.append(Anomaly(f"SUBACK for unknown packet ID {suback.packet_id}"))
            return
        self._ids.release(suback.packet_id)
        if len(suback.return_codes) != len(pairs):
            raise ProtocolError(
                f"SUBACK carries {len(suback.return_codes)} return codes for {len(pairs)} filters"
            )
        for (topic_filter, qos), code in zip(pairs, suback.return_codes, strict=True):
            self._filters_in_flight.discard(topic_filter)
            current = self._subs.get(topic_filter)
            if current is not None and current.qos == qos:
                if code == SUBACK_FAILURE:
                    del self._subs[topic_filter]
                    self._ops.append(SubscriptionRemoved(topic_filter, unsubscribe_pending=False))
                elif not current.confirmed:
                    self._subs[topic_filter] = StoredSubscription(topic_filter, qos, True)
                    self._ops.append(SubscriptionSet(topic_filter, qos, True))
            self._answer(topic_filter, code, unsubscribe=False)
        if suback.packet_id in self._resubscribe_ids:
            self._resubscribe_ids.discard(suback.packet_id)
            if not self._resubscribe_ids and self.state is ConnectionState.RESUBSCRIBING:
                self._become_ready(session_present=False)

    def _on_unsuback(self, packet: UnsubAck) -> None:
        packet_id = packet.packet_id
        filters = self._unsub_packets.pop(packet_id, None)
        if filters is None:
            self._events.append(Anomaly(f"UNSUBACK for unknown packet ID {packet_id}"))
            return
        self._ids.release(packet_id)
        for topic_filter in filters:
            if topic_filter in self._pending_unsubs:
                self._pending_unsubs.discard(topic_filter)
                self._ops.append(UnsubscribeDone(topic_filter))
            self._answer(topic_filter, 0, unsubscribe=True)

    def _answer(self, topic_filter: str, code: int, *, unsubscribe: bool) -> None:
        """Record the broker's answer for every waiting request of this kind on this filter."""
        waiting = self._waiters.get(topic_filter)
        if not waiting:
            return
        keep: list[_Request] = []
        for request in waiting:
            if request.unsubscribe is not unsubscribe:
                keep.append(request)
                continue
            if request.codes[topic_filter] != -1:
                continue  # already answered by an earlier packet naming the same filter
            request.codes[topic_filter] = code
            request.remaining -= 1
            if request.remaining == 0:
                if unsubscribe:
                    self._events.append(UnsubscribeCompleted(request.token))
                else:
                    self._events.append(
                        SubscribeCompleted(request.token, tuple(request.codes.values()))
                    )
        if keep:
            self._waiters[topic_filter] = keep
        else:
            del self._waiters[topic_filter]


_HANDLERS: dict[type, Callable[[Session, Any], None]] = {
    PubAck: Session._on_puback,
    Publish: Session._on_publish,
    PubRec: Session._on_pubrec,
    PubComp: Session._on_pubcomp,
    PubRel: Session._on_pubrel,
    SubAck: Session._on_suback,
    UnsubAck: Session._on_unsuback,
    PingResp: Session._on_pingresp,
}


def _message(publish: Publish) -> Message:
    return Message(publish.topic, publish.payload, publish.qos, publish.retain, publish.dup)
