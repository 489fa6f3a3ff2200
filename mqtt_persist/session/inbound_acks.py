"""When inbound QoS 1/2 messages are acknowledged: manual acknowledgement and the unread bound.

Without either (the default) :class:`~mqtt_persist.session.inbound.InboundFlows` acknowledges a
message in the batch that hands it to the application. This part takes over when the
application acknowledges messages itself (``manual``) or when the messages waiting in
``client.messages`` are bounded (``max_unread``):

* A QoS 1/2 message is acknowledged to the broker (PUBACK, PUBREC) only once the application
  acknowledged it (``manual``) or once it was handed out (automatic). MQTT requires the
  acknowledgements in the order the PUBLISH packets arrived (3.1.1 and 5, §4.6), so an
  acknowledgement the application gives out of order waits for those before it.
* A QoS 2 message's packet ID is stored (``InboundReceived``) when the application acknowledges
  it, not when PUBREC goes out: a message the application acknowledged is never delivered to it
  again, also after a crash, even if PUBREC was still waiting for an earlier message. One not
  acknowledged before a crash is stored nowhere, so the broker's resend delivers it again.
* With ``max_unread``, at most that many messages are handed out and not yet read; a QoS 1/2
  message beyond it is *held*: received, neither handed out nor acknowledged, so the broker's
  own flow control (its in-flight limit, our Receive Maximum) stops it from sending more. QoS 0
  messages are always handed out; the shell's bounded inbox drops the oldest of them.
* At most ``max_unread`` messages are held. A broker that sends more (mosquitto 2.0.11 does,
  past both its in-flight limit and our Receive Maximum, once acknowledgements interleave) has
  the excess *shed*: forgotten unacknowledged, with everything after it on that connection (an
  acknowledgement must not overtake the shed message's). Once the held messages are read, the
  session asks for a new connection (:attr:`wants_reconnect`), and the broker resends them.
* A resend of a message held or handed out and not yet acknowledged (the broker resends open
  flows on reconnect while it keeps the session) is not handed out again: the message the
  application holds stands for it, and its acknowledgement goes out on the new connection.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from mqtt_persist.message import Message
from mqtt_persist.protocol.packets import PubAck, Publish, PubRec
from mqtt_persist.session.events import MessageReceived
from mqtt_persist.session.output import PendingOutput
from mqtt_persist.session.state import InboundReceived

if TYPE_CHECKING:
    from mqtt_persist.session.inbound import InboundFlows


class _Pending:
    """A QoS 1/2 message received and not yet acknowledged to the broker."""

    __slots__ = ("acked", "orphan", "packet_id", "publish", "qos")

    def __init__(self, publish: Publish | None, packet_id: int, qos: int, acked: bool) -> None:
        self.publish = publish
        self.packet_id = packet_id
        self.qos = qos
        #: The application (or the automatic mode) acknowledged it.
        self.acked = acked
        #: The broker lost the session: no acknowledgement of it goes to the broker any more.
        self.orphan = False


class InboundAcks:
    """Ordered, deferred acknowledgements of inbound QoS 1/2 messages; the unread bound."""

    __slots__ = (
        "_by_id",
        "_by_token",
        "_flows",
        "_held",
        "_may_shed",
        "_next_token",
        "_order",
        "_out",
        "_shedding",
        "manual",
        "max_unread",
        "shed",
        "unread",
        "unread_peak",
    )

    def __init__(
        self,
        out: PendingOutput,
        flows: InboundFlows,
        *,
        manual: bool,
        max_unread: int,
        may_shed: bool = True,
    ) -> None:
        self._out = out
        self._flows = flows
        #: The application acknowledges each message (``client.ack``).
        self.manual = manual
        #: Messages handed out and not yet read, at most (0: no bound).
        self.max_unread = max_unread
        # Shedding needs a reconnect to get the messages back (PersistentClient(reconnect=...)).
        self._may_shed = may_shed
        #: Messages handed out and not yet read (``message_read``).
        self.unread = 0
        #: The highest ``unread`` so far.
        self.unread_peak = 0
        # Open on the broker's side (no PUBACK/PUBREC sent yet), by packet ID.
        self._by_id: dict[int, _Pending] = {}
        # Handed out in manual mode and not yet acknowledged by the application, by token.
        self._by_token: dict[int, _Pending] = {}
        self._next_token = 0
        # This connection's QoS 1/2 arrivals whose acknowledgement has not gone out, in order.
        self._order: deque[_Pending] = deque()
        # Received beyond max_unread: neither handed out nor acknowledged yet (at most
        # max_unread of them).
        self._held: deque[_Pending] = deque()
        # This connection let a message go (see on_publish): it lets every QoS 1/2 go.
        self._shedding = False
        #: QoS 1/2 messages let go unacknowledged because the broker sent more than
        #: ``max_unread`` beyond the unread ones; it sends them again on the next connection.
        self.shed = 0

    @property
    def active(self) -> bool:
        """Whether acknowledgements are deferred at all (else InboundFlows answers at once)."""
        return self.manual or self.max_unread > 0

    @property
    def held(self) -> int:
        """QoS 1/2 messages received beyond ``max_unread``, not handed out nor acknowledged."""
        return len(self._held)

    @property
    def unacknowledged(self) -> int:
        """QoS 1/2 messages received whose acknowledgement has not gone to the broker."""
        return len(self._by_id)

    def on_qos0(self, message: Message) -> None:
        """A QoS 0 message: handed out at once (the shell's inbox bounds QoS 0)."""
        self._count_out()
        self._out.events.append(MessageReceived(message))

    def on_publish(self, publish: Publish) -> None:
        """A QoS 1/2 PUBLISH: hand it out, hold it, or recognise a resend."""
        packet_id: int = publish.packet_id  # type: ignore[assignment]
        flows = self._flows
        if self._shedding:
            # Its acknowledgement would have to follow a shed message's: let it go too.
            self.shed += 1
            return
        if publish.qos == 2 and packet_id in flows.qos2_received:
            # Acknowledged by the application before; PUBREC again, in its turn.
            flows.duplicates_suppressed += 1
            # Its entry from before a reconnect (acknowledged, PUBREC not yet sent) is done
            # with: left behind, it would pass the next message under this ID off as a resend.
            self._by_id.pop(packet_id, None)
            self._order.append(_Pending(None, packet_id, 2, acked=True))
            self._release()
            return
        pending = self._by_id.get(packet_id)
        if pending is not None:
            # The broker resends a flow we have not answered: what the application already
            # has (or what is held) stands for it; it is acknowledged on this connection.
            flows.duplicates_suppressed += 1
            self._order.append(pending)
            self._release()
            return
        must_wait = self._held or (self.max_unread and self.unread >= self.max_unread)
        if must_wait and self._may_shed and len(self._held) >= self.max_unread:
            # The broker sends past its flow control (measured: mosquitto 2.0.11 overshoots
            # its in-flight limit and our Receive Maximum once acknowledgements interleave).
            # Keeping it would unbound memory; acknowledging it would lose it. It is let go
            # unacknowledged, as is everything after it on this connection, and the
            # connection is renewed once the held messages are read: the broker resends.
            self._shedding = True
            self.shed += 1
            return
        pending = _Pending(publish, packet_id, publish.qos, acked=False)
        self._by_id[packet_id] = pending
        self._order.append(pending)
        if must_wait:
            self._held.append(pending)
        else:
            self._hand_out(pending)

    def ack(self, token: int) -> None:
        """The application acknowledged the message handed out with ``token``.

        Unknown tokens (acknowledged already, QoS 0, automatic mode) change nothing.
        """
        pending = self._by_token.pop(token, None)
        if pending is not None:
            self._acknowledge(pending)

    def message_read(self) -> None:
        """A handed-out message left the inbox (read, or dropped there): hand out held ones."""
        if not self.active:
            return
        if self.unread:
            self.unread -= 1
        held = self._held
        while held and self.unread < self.max_unread:
            self._hand_out(held.popleft())

    @property
    def wants_reconnect(self) -> bool:
        """Messages were let go and those held are read: a new connection brings them back."""
        return self._shedding and not self._held

    def new_connection(self) -> None:
        """A connection started or ended: acknowledgements wait for the broker's resends."""
        self._order.clear()
        self._shedding = False

    def broker_lost_session(self) -> None:
        """The broker forgot its open flows: nothing of them is acknowledged to it any more.

        Messages held or handed out are still the application's to read; their
        acknowledgements change nothing (a QoS 2 packet ID of a forgotten flow is not stored,
        or it would suppress the next message the broker sends under that ID).
        """
        for pending in self._by_id.values():
            pending.orphan = True
        self._by_id.clear()
        self._order.clear()

    def _count_out(self) -> None:
        self.unread += 1
        if self.unread > self.unread_peak:
            self.unread_peak = self.unread

    def _hand_out(self, pending: _Pending) -> None:
        self._count_out()
        publish = pending.publish
        assert publish is not None  # only acknowledged resends have none, never handed out
        pending.publish = None  # the application holds it now; no second copy here
        token = 0
        if self.manual and not pending.orphan:
            self._next_token += 1
            token = self._next_token
            self._by_token[token] = pending
        self._out.events.append(MessageReceived(received_message(publish, token)))
        if not self.manual:
            self._acknowledge(pending)

    def _acknowledge(self, pending: _Pending) -> None:
        if pending.acked:
            return
        pending.acked = True
        if pending.orphan:
            return
        if pending.qos == 2:
            packet_id = pending.packet_id
            self._flows.qos2_received.add(packet_id)
            self._out.ops.append(InboundReceived(packet_id))
        self._release()

    def _release(self) -> None:
        """Send the acknowledgements now due: those at the head of the arrival order."""
        order = self._order
        packets = self._out.packets
        by_id = self._by_id
        while order and order[0].acked:
            pending = order.popleft()
            packet_id = pending.packet_id
            if by_id.get(packet_id) is pending:
                del by_id[packet_id]
            if pending.qos == 1:
                packets.append(PubAck(packet_id))
                self._flows.flow_closed(packet_id)
            else:
                packets.append(PubRec(packet_id))


def received_message(publish: Publish, ack_token: int = 0) -> Message:
    """The application's view of a PUBLISH from the broker (``ack_token``: manual mode)."""
    return Message(
        publish.topic,
        publish.payload,
        publish.qos,
        publish.retain,
        publish.dup,
        publish.properties,
        publish.packet_id,
        _ack_token=ack_token,
    )
