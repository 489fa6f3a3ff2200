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

Format version 2 added what MQTT 5 and poison messages need: a message's PUBLISH properties and
expiry, a subscription's options and identifier, the protocol level the session was made with
(:class:`ProtocolVersionSet`), and messages *set aside* (:class:`MessageSetAside`): kept, never
sent again, until the application discards them (:class:`SetAsideRemoved`).
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
    #: MQTT 5 PUBLISH properties, wire-encoded (without their length prefix), opaque to stores.
    #: Only what is sent with every attempt: never Topic Alias (chosen per connection) nor
    #: Message Expiry Interval (sent as what is left of :attr:`expires_at`).
    properties: bytes = b""
    #: Unix time at which the message expires (MQTT 5 Message Expiry Interval, also usable on
    #: 3.1.1 as a local deadline); None: never.
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    """A subscription the client wants; ``confirmed`` once the broker granted it (SUBACK)."""

    topic_filter: str
    qos: int
    confirmed: bool = False
    #: MQTT 5 subscription option bits besides QoS, as in the SUBSCRIBE packet: no local 0x04,
    #: retain as published 0x08, retain handling 0x30 (0, 1 or 2 shifted by 4).
    options: int = 0
    #: MQTT 5 Subscription Identifier (1..268,435,455); None: none.
    subscription_id: int | None = None


@dataclass(frozen=True, slots=True)
class SetAsideMessage:
    """A message taken out of the flow (a poison message): kept, never sent again by itself.

    ``message`` has no packet ID and is not released: a restored session reserves no packet ID
    for it. Only :class:`SetAsideRemoved` (the application, a tool) discards it.
    """

    message: StoredMessage
    #: Why it was set aside, in words (for logs, the application and tools).
    reason: str
    #: Unix time at which it was set aside.
    at: float


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
    #: See :attr:`StoredSubscription.options`.
    options: int = 0
    #: See :attr:`StoredSubscription.subscription_id`.
    subscription_id: int | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionRemoved:
    """Stop wanting a filter; if the broker may still hold it, an UNSUBSCRIBE is pending."""

    topic_filter: str
    unsubscribe_pending: bool = True


@dataclass(frozen=True, slots=True)
class UnsubscribeDone:
    """UNSUBACK arrived (or the broker lost the session): nothing left to unsubscribe."""

    topic_filter: str


@dataclass(frozen=True, slots=True)
class ProtocolVersionSet:
    """The session is (now) spoken in this MQTT protocol level: 4 (3.1.1) or 5 (MQTT 5)."""

    version: int


@dataclass(frozen=True, slots=True)
class MessageSetAside:
    """Take the message out of the flow and keep it aside (see :class:`SetAsideMessage`).

    Its packet ID, if it had one, is free again in the stored session. Nothing happens when the
    message is not (or no longer) in the flow, so applying it twice changes nothing more.

    The store does not judge whether that is safe; the session must: a broker that received a
    QoS 2 PUBLISH keeps its packet ID until PUBREL and answers any later PUBLISH under that ID
    with PUBREC without delivering it, so the ID of a QoS 2 message that may have reached the
    broker (sent, or released) must not carry a new message before that flow is closed.
    """

    seq: int
    reason: str
    #: Unix time.
    at: float


@dataclass(frozen=True, slots=True)
class SetAsideRemoved:
    """Discard a set-aside message: an explicit decision of the application or a tool."""

    seq: int


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
    | ProtocolVersionSet
    | MessageSetAside
    | SetAsideRemoved
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
    #: Messages taken out of the flow (poison messages) by sequence number: always loaded in
    #: full, never sent; their sequence numbers are not in ``messages``.
    set_aside: dict[int, SetAsideMessage] = field(default_factory=dict)
    #: The MQTT protocol level the session was made with (4: 3.1.1, 5: MQTT 5); None for a
    #: session not connected yet.
    protocol_version: int | None = None

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
                    m.seq,
                    m.topic,
                    m.payload,
                    m.qos,
                    m.retain,
                    op.packet_id,
                    m.released,
                    m.properties,
                    m.expires_at,
                )
        elif type(op) is MessageReleased:
            if (m := messages.get(op.seq)) is not None:
                messages[op.seq] = with_flow(m, m.packet_id, True)
        elif type(op) is MessageRequeued:
            if (m := messages.get(op.seq)) is not None:
                messages[op.seq] = with_flow(m)
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
                op.topic_filter, op.qos, op.confirmed, op.options, op.subscription_id
            )
            self.pending_unsubscribes.discard(op.topic_filter)
        elif type(op) is SubscriptionRemoved:
            self.subscriptions.pop(op.topic_filter, None)
            if op.unsubscribe_pending:
                self.pending_unsubscribes.add(op.topic_filter)
        elif type(op) is UnsubscribeDone:
            self.pending_unsubscribes.discard(op.topic_filter)
        elif type(op) is ProtocolVersionSet:
            self.protocol_version = op.version
        elif type(op) is MessageSetAside:
            if (m := messages.pop(op.seq, None)) is not None:
                self.set_aside[op.seq] = SetAsideMessage(with_flow(m), op.reason, op.at)
        elif type(op) is SetAsideRemoved:
            self.set_aside.pop(op.seq, None)
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
            set_aside=dict(self.set_aside),
            protocol_version=self.protocol_version,
        )

    def to_operations(self) -> list[Operation]:
        """Operations that rebuild this state from empty: a compacted journal (a snapshot).

        Set-aside messages come first (each added, then set aside), so that a message of the
        same sequence number in ``messages`` (possible only after an odd replay) is added after
        its namesake left the flow.
        """
        ops: list[Operation] = []
        for aside in self.set_aside.values():
            ops.append(MessageAdded(aside.message))
            ops.append(MessageSetAside(aside.message.seq, aside.reason, aside.at))
        for message in self.messages.values():
            ops.append(MessageAdded(message))
        for packet_id in sorted(self.inbound_qos2):
            ops.append(InboundReceived(packet_id))
        for sub in self.subscriptions.values():
            ops.append(subscription_set(sub))
        for topic_filter in sorted(self.pending_unsubscribes):
            ops.append(SubscriptionRemoved(topic_filter, unsubscribe_pending=True))
        if self.protocol_version is not None:
            ops.append(ProtocolVersionSet(self.protocol_version))
        return ops

    @property
    def is_empty(self) -> bool:
        """True when nothing worth restoring is left (the protocol level alone is not)."""
        return not (
            self.messages
            or self.inbound_qos2
            or self.subscriptions
            or self.pending_unsubscribes
            or self.set_aside
        )


def with_flow(
    message: StoredMessage, packet_id: int | None = None, released: bool = False
) -> StoredMessage:
    """``message`` with this packet ID and released flag (by default none: a queued message)."""
    m = message
    return StoredMessage(
        m.seq, m.topic, m.payload, m.qos, m.retain, packet_id, released, m.properties, m.expires_at
    )


def subscription_set(sub: StoredSubscription, confirmed: bool | None = None) -> SubscriptionSet:
    """The operation that stores ``sub`` (``confirmed`` None: as it is)."""
    return SubscriptionSet(
        sub.topic_filter,
        sub.qos,
        sub.confirmed if confirmed is None else confirmed,
        sub.options,
        sub.subscription_id,
    )
