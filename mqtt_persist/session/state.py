"""What a session store persists, and the one function that replays it.

A session is persisted as a sequence of *operations* (the journal). Every store, whatever its
medium, keeps the same promise: applying the operations it accepted, in order, to an empty
:class:`SessionState` gives the state the client had when the last of them was committed.
:meth:`SessionState.apply` is that replay, shared by the session state machine's tests and every
store, so there is exactly one definition of what an operation means.

Outgoing QoS 1/2 messages are keyed by a sequence number that orders them ("order"); a packet
ID is only assigned when a message enters the in-flight window, and that transition is itself an
operation ("packet IDs are continuous"), so a restore knows which messages reached the wire under
which ID.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """An outgoing QoS 1/2 message accepted by ``publish()`` and not yet acknowledged."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    #: Assigned when the message entered the in-flight window; None while queued.
    packet_id: int | None = None
    #: QoS 2 only: PUBREC was received, so the next packet of the flow is PUBREL.
    released: bool = False


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    """A subscription the client wants; ``confirmed`` once the broker granted it (SUBACK)."""

    topic_filter: str
    qos: int
    confirmed: bool = False


# --- operations -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageAdded:
    """``publish()`` accepted a QoS 1/2 message (write-ahead: committed before it is sent)."""

    message: StoredMessage


@dataclass(frozen=True, slots=True)
class PacketIdAssigned:
    """The message entered the in-flight window under this packet ID (committed before sent)."""

    seq: int
    packet_id: int


@dataclass(frozen=True, slots=True)
class MessageReleased:
    """QoS 2: PUBREC arrived; from now on the flow resumes with PUBREL, never PUBLISH."""

    seq: int


@dataclass(frozen=True, slots=True)
class MessageRequeued:
    """The broker lost the session: the message goes back to the queue as a new message."""

    seq: int


@dataclass(frozen=True, slots=True)
class MessageRemoved:
    """The flow ended: acknowledged, dropped (queue full) or reported in doubt."""

    seq: int


@dataclass(frozen=True, slots=True)
class InboundReceived:
    """Inbound QoS 2 PUBLISH with this ID was delivered; committed before PUBREC goes out."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class InboundReleased:
    """Inbound QoS 2 flow ended with PUBREL; the ID may be used by the broker again."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class InboundCleared:
    """The broker lost the session, and with it every open inbound QoS 2 flow."""


@dataclass(frozen=True, slots=True)
class SubscriptionSet:
    """Subscribe to a filter (or change its QoS); ``confirmed`` once SUBACK granted it."""

    topic_filter: str
    qos: int
    confirmed: bool = False


@dataclass(frozen=True, slots=True)
class SubscriptionRemoved:
    """Stop wanting a filter; if the broker may still hold it, an UNSUBSCRIBE is pending."""

    topic_filter: str
    unsubscribe_pending: bool = True


@dataclass(frozen=True, slots=True)
class UnsubscribeDone:
    """UNSUBACK arrived (or the broker lost the session): nothing left to unsubscribe."""

    topic_filter: str


Operation = (
    MessageAdded
    | PacketIdAssigned
    | MessageReleased
    | MessageRequeued
    | MessageRemoved
    | InboundReceived
    | InboundReleased
    | InboundCleared
    | SubscriptionSet
    | SubscriptionRemoved
    | UnsubscribeDone
)


@dataclass(slots=True)
class SessionState:
    """The durable part of a client session: what survives a restart."""

    client_id: str
    #: Outgoing QoS 1/2 messages by sequence number, in ascending order.
    messages: dict[int, StoredMessage] = field(default_factory=dict)
    #: Packet IDs of inbound QoS 2 messages delivered but not yet released by PUBREL.
    inbound_qos2: set[int] = field(default_factory=set)
    subscriptions: dict[str, StoredSubscription] = field(default_factory=dict)
    #: Filters removed locally whose UNSUBSCRIBE the broker has not yet acknowledged.
    pending_unsubscribes: set[str] = field(default_factory=set)
    #: Highest sequence number the store has seen for this session (0: none). New messages get
    #: higher ones, also when the queued messages holding it were not loaded.
    last_seq: int = field(default=0, compare=False)
    #: Queued messages the store holds beyond those in ``messages``: a load with
    #: ``queued_limit`` leaves them in the store, to be read with ``read_queued`` when due.
    queued_not_loaded: int = field(default=0, compare=False)

    def apply(self, op: Operation) -> None:
        """Replay one operation. Idempotent: applying an operation twice changes nothing more."""
        messages = self.messages
        if type(op) is MessageAdded:
            message = op.message
            if message.seq > self.last_seq:
                self.last_seq = message.seq
            if message.seq not in messages:
                if messages and message.seq < next(reversed(messages)):
                    # Keep ascending order even if a store hands operations back out of order.
                    messages[message.seq] = message
                    self.messages = dict(sorted(messages.items()))
                else:
                    messages[message.seq] = message
        elif type(op) is PacketIdAssigned:
            if (m := messages.get(op.seq)) is not None:
                # The constructor, not dataclasses.replace: this runs once per message sent.
                messages[op.seq] = StoredMessage(
                    m.seq, m.topic, m.payload, m.qos, m.retain, op.packet_id, m.released
                )
        elif type(op) is MessageReleased:
            if (m := messages.get(op.seq)) is not None:
                messages[op.seq] = StoredMessage(
                    m.seq, m.topic, m.payload, m.qos, m.retain, m.packet_id, True
                )
        elif type(op) is MessageRequeued:
            if (m := messages.get(op.seq)) is not None:
                messages[op.seq] = StoredMessage(m.seq, m.topic, m.payload, m.qos, m.retain)
        elif type(op) is MessageRemoved:
            messages.pop(op.seq, None)
        elif type(op) is InboundReceived:
            self.inbound_qos2.add(op.packet_id)
        elif type(op) is InboundReleased:
            self.inbound_qos2.discard(op.packet_id)
        elif type(op) is InboundCleared:
            self.inbound_qos2.clear()
        elif type(op) is SubscriptionSet:
            self.subscriptions[op.topic_filter] = StoredSubscription(
                op.topic_filter, op.qos, op.confirmed
            )
            self.pending_unsubscribes.discard(op.topic_filter)
        elif type(op) is SubscriptionRemoved:
            self.subscriptions.pop(op.topic_filter, None)
            if op.unsubscribe_pending:
                self.pending_unsubscribes.add(op.topic_filter)
        elif type(op) is UnsubscribeDone:
            self.pending_unsubscribes.discard(op.topic_filter)
        else:  # pragma: no cover - exhaustiveness guard
            raise TypeError(f"unknown session operation {op!r}")

    def apply_all(self, ops: list[Operation] | tuple[Operation, ...]) -> None:
        """Replay operations in order."""
        for op in ops:
            self.apply(op)

    def copy(self) -> SessionState:
        """An independent copy (stored messages are immutable, so sharing them is safe)."""
        return SessionState(
            client_id=self.client_id,
            messages=dict(self.messages),
            inbound_qos2=set(self.inbound_qos2),
            subscriptions=dict(self.subscriptions),
            pending_unsubscribes=set(self.pending_unsubscribes),
            last_seq=self.last_seq,
            queued_not_loaded=self.queued_not_loaded,
        )

    def to_operations(self) -> list[Operation]:
        """Operations that rebuild this state from empty: a compacted journal (a snapshot)."""
        ops: list[Operation] = []
        for message in self.messages.values():
            ops.append(MessageAdded(message))
        for packet_id in sorted(self.inbound_qos2):
            ops.append(InboundReceived(packet_id))
        for sub in self.subscriptions.values():
            ops.append(SubscriptionSet(sub.topic_filter, sub.qos, sub.confirmed))
        for topic_filter in sorted(self.pending_unsubscribes):
            ops.append(SubscriptionRemoved(topic_filter, unsubscribe_pending=True))
        return ops

    @property
    def is_empty(self) -> bool:
        """True when nothing worth restoring is left."""
        return not (
            self.messages or self.inbound_qos2 or self.subscriptions or self.pending_unsubscribes
        )
