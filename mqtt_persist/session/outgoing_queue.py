"""The outgoing queue: messages ``publish()`` accepted that have not entered the in-flight window.

Messages keep the order ``publish()`` gave them ("order"): each gets the next sequence number,
and everything leaves through the head of :attr:`OutgoingQueue.memory`. The queue is bounded in
memory: past ``queue_memory_limit`` a QoS 1/2 message lives only in the store (its
``MessageAdded`` operation) and is *spilled*; the shell reads spilled messages back with
``want_refill``/``refill`` when the window is about to need them. QoS 0 messages are never stored,
so one published while messages are spilled waits in a side queue and is merged back by sequence
number. A full queue raises or drops the oldest message, and every drop is reported ("nothing is
lost silently").
"""

from __future__ import annotations

from collections import deque

from mqtt_persist.errors import QueueFull
from mqtt_persist.message import DeliveryOutcome
from mqtt_persist.protocol.packets import NO_PROPERTIES, PacketType, Properties
from mqtt_persist.protocol.properties import decode_properties, encode_properties
from mqtt_persist.session.config import SessionConfig
from mqtt_persist.session.events import PublishCompleted
from mqtt_persist.session.output import PendingOutput
from mqtt_persist.session.state import MessageAdded, MessageRemoved, SessionState, StoredMessage


class OutgoingMessage:
    """An outgoing message the session is responsible for (QoS 0 ones are never stored).

    The same object moves from the queue into the in-flight window, where it gets its packet ID.
    """

    __slots__ = (
        "expired_release",
        "expires_at",
        "packet_id",
        "payload",
        "properties",
        "qos",
        "refused_release",
        "released",
        "retain",
        "seq",
        "special",
        "topic",
    )

    def __init__(
        self,
        seq: int,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        packet_id: int | None = None,
        released: bool = False,
        properties: Properties = NO_PROPERTIES,
        expires_at: float | None = None,
    ) -> None:
        self.seq = seq
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        #: Set when the message enters the in-flight window.
        self.packet_id = packet_id
        #: QoS 2: PUBREC arrived, the flow continues with PUBREL.
        self.released = released
        #: MQTT 5 PUBLISH properties, without the Message Expiry Interval (``expires_at``
        #: holds it, so that every send carries what is left of it).
        self.properties = properties
        #: Unix time at which the message expires (MQTT 5 Message Expiry Interval), or None.
        self.expires_at = expires_at
        #: QoS 2: it expired in flight and was released instead of resent (outbound.py).
        self.expired_release = False
        #: QoS 2: released instead of resent because the broker's new terms refuse it (the
        #: reason code and text to report if PUBCOMP says the broker never had it).
        self.refused_release: tuple[int, str] | None = None
        #: It has MQTT 5 properties or an expiry: its PUBLISH is built the slow way.
        self.special = properties is not NO_PROPERTIES or expires_at is not None


def from_stored(m: StoredMessage, *, in_flight: bool = False) -> OutgoingMessage:
    """The in-memory form of a stored message (``in_flight``: with its packet ID and flow)."""
    properties = (
        decode_properties(m.properties, PacketType.PUBLISH) if m.properties else NO_PROPERTIES
    )
    packet_id, released = (m.packet_id, m.released) if in_flight else (None, False)
    return OutgoingMessage(
        m.seq, m.topic, m.payload, m.qos, m.retain, packet_id, released, properties, m.expires_at
    )


def to_stored(o: OutgoingMessage) -> StoredMessage:
    """The stored form of an in-memory message, as the journal describes it."""
    properties = (
        encode_properties(o.properties, PacketType.PUBLISH)
        if o.properties is not NO_PROPERTIES
        else b""
    )
    return StoredMessage(
        o.seq,
        o.topic,
        o.payload,
        o.qos,
        o.retain,
        o.packet_id,
        o.released,
        properties,
        o.expires_at,
    )


class OutgoingQueue:
    """Accepted messages waiting for the in-flight window, in memory up to a limit, then spilled."""

    __slots__ = (
        "_config",
        "_out",
        "_refill_pending",
        "dropped",
        "memory",
        "next_seq",
        "overflow_qos0",
        "pending_drops",
        "spill_after",
        "spilled",
    )

    def __init__(self, config: SessionConfig, out: PendingOutput) -> None:
        self._config = config
        self._out = out
        #: The in-memory part, ascending by seq. The window takes from its head; the deque is
        #: never replaced, so the window may keep a reference to it.
        self.memory: deque[OutgoingMessage] = deque()
        self.next_seq = 1
        #: QoS 1/2 messages with seq > spill_after that are queued in the store only.
        self.spilled = 0
        self.spill_after = 0
        self._refill_pending = False
        #: QoS 0 messages published while spilled: never stored, merged back in by seq.
        self.overflow_qos0: deque[OutgoingMessage] = deque()
        #: drop_oldest found only spilled messages to drop: dropped when they are read back.
        self.pending_drops = 0
        #: Messages dropped because the queue was full (a counter the client exposes).
        self.dropped = 0

    def restore(self, state: SessionState) -> None:
        """Take the queued (packet-ID-less) messages of a stored session, and its seq counter."""
        next_seq = self.next_seq
        for m in state.messages.values():
            if m.packet_id is None:
                self.memory.append(from_stored(m))
                self.spill_after = m.seq
            next_seq = max(next_seq, m.seq + 1)
        self.next_seq = max(next_seq, state.last_seq + 1)
        self.spilled = state.queued_not_loaded

    @property
    def queued(self) -> int:
        """Messages waiting, in memory or in the store only."""
        return len(self.memory) + self.spilled + len(self.overflow_qos0) - self.pending_drops

    @property
    def in_memory(self) -> int:
        """Queued messages held in memory."""
        return len(self.memory) + len(self.overflow_qos0)

    @property
    def is_full(self) -> bool:
        """``max_queued`` messages are waiting (never, when it is 0)."""
        limit = self._config.max_queued
        return bool(limit) and self.queued >= limit

    def add(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties = NO_PROPERTIES,
        expires_at: float | None = None,
    ) -> int:
        """Queue an accepted message (QoS 1/2: write-ahead ``MessageAdded``); returns its seq.

        Raises :class:`QueueFull` when the queue is full and the policy is not drop_oldest.
        """
        config = self._config
        if config.max_queued and self.queued >= config.max_queued:
            if config.queue_full != "drop_oldest":
                raise QueueFull(f"outgoing queue is full ({config.max_queued} messages waiting)")
            self._drop_oldest()
        seq = self.next_seq
        self.next_seq = seq + 1
        if qos:
            if properties is NO_PROPERTIES and expires_at is None:
                stored = StoredMessage(seq, topic, payload, qos, retain)
            else:
                encoded = encode_properties(properties, PacketType.PUBLISH) if properties else b""
                stored = StoredMessage(
                    seq, topic, payload, qos, retain, None, False, encoded, expires_at
                )
            self._out.ops.append(MessageAdded(stored))
            memory_limit = config.queue_memory_limit
            if self.spilled or (memory_limit and len(self.memory) >= memory_limit):
                # Lives in the store only until the window needs it (want_refill). Every
                # message before it is in memory, in flight or done: the store's queue
                # beyond seq - 1 is exactly what is spilled.
                if not self.spilled:
                    self.spill_after = seq - 1
                self.spilled += 1
                return seq
        message = OutgoingMessage(
            seq, topic, payload, qos, retain, None, False, properties, expires_at
        )
        if self.spilled:
            self.overflow_qos0.append(message)  # must not overtake the spilled messages
        else:
            self.memory.append(message)
        return seq

    def put_back(self, messages: list[OutgoingMessage]) -> None:
        """Messages taken out of the window (ascending seq) go back to the head of the queue.

        They are older than any queued message, so they go first, in their order.
        """
        self.memory.extendleft(reversed(messages))

    def _drop_oldest(self) -> None:
        if not self.memory:
            # Every queued message is in the store only; drop the oldest once it is read back.
            self.pending_drops += 1
            return
        self._drop(self.memory.popleft())

    def _drop(self, victim: OutgoingMessage) -> None:
        if victim.qos:
            self._out.ops.append(MessageRemoved(victim.seq))
        self.dropped += 1
        self._out.events.append(PublishCompleted(victim.seq, DeliveryOutcome.DROPPED))

    # --- queued messages that live in the store only ------------------------------------------

    def want_refill(self) -> tuple[int, int] | None:
        """``(after_seq, limit)`` to read from the store's queue, or None (see Session)."""
        if not self.spilled or self._refill_pending:
            return None
        limit = self._config.queue_memory_limit or 1000
        if len(self.memory) > limit // 2 and not self.pending_drops:
            return None
        self._refill_pending = True
        return self.spill_after, max(1, limit - len(self.memory))

    def refill(self, messages: list[StoredMessage]) -> None:
        """Queued messages read back from the store (ascending seq, all > the after_seq asked)."""
        self._refill_pending = False
        memory = self.memory
        overflow = self.overflow_qos0
        for m in messages:
            if m.seq <= self.spill_after or m.packet_id is not None:
                continue  # a stale read; never queue a message twice
            while overflow and overflow[0].seq < m.seq:
                memory.append(overflow.popleft())
            message = from_stored(m)
            self.spill_after = m.seq
            self.spilled -= 1
            if self.pending_drops:
                self.pending_drops -= 1
                self._drop(message)
            else:
                memory.append(message)
        if self.spilled <= 0:
            self.spilled = 0
            memory.extend(overflow)
            overflow.clear()
