"""What a :class:`~mqtt_persist.session.machine.Session` reports about itself: counters and
read-only views of its parts, for ``client.stats``, the shell's decisions and the tests.

Each is a property that reads one of the parts the session delegates to; none changes anything.
"""

from __future__ import annotations

from mqtt_persist.session.inbound import InboundFlows
from mqtt_persist.session.outbound import OutboundFlows
from mqtt_persist.session.outgoing_queue import OutgoingQueue
from mqtt_persist.session.state import StoredSubscription
from mqtt_persist.session.subscriptions import Subscriptions
from mqtt_persist.session.terms import ConnectionTerms


class SessionQueries:
    """The read-only side of :class:`Session`: its counters, queue and subscription views."""

    terms: ConnectionTerms
    _queue: OutgoingQueue
    _outbound: OutboundFlows
    _inbound: InboundFlows
    _subscriptions: Subscriptions

    @property
    def queued(self) -> int:
        """Messages waiting for the in-flight window (or for a connection)."""
        return self._queue.queued

    @property
    def queued_in_memory(self) -> int:
        """Queued messages held in memory (the rest are read back from the store when due)."""
        return self._queue.in_memory

    @property
    def inflight(self) -> int:
        """QoS 1/2 messages sent (or to be resent) and not yet acknowledged."""
        return len(self._outbound.inflight)

    @property
    def queue_is_full(self) -> bool:
        """``max_queued`` messages are waiting (never, when it is 0)."""
        return self._queue.is_full

    @property
    def subscriptions(self) -> dict[str, int]:
        """Filters the session wants, with their requested QoS."""
        return {f: s.qos for f, s in self._subscriptions.wanted.items()}

    @property
    def stored_subscriptions(self) -> dict[str, StoredSubscription]:
        """Filters the session wants, with their options and subscription identifiers."""
        return dict(self._subscriptions.wanted)

    @property
    def is_idle(self) -> bool:
        """Nothing left to deliver: no queued or in-flight messages."""
        return not self._outbound.inflight and not self._queue.queued

    @property
    def dropped(self) -> int:
        """Messages dropped because the queue was full."""
        return self._queue.dropped

    @property
    def in_doubt(self) -> int:
        """QoS 2 messages past PUBREC when a broker lost the session (reported IN_DOUBT)."""
        return self._outbound.in_doubt

    @property
    def downgraded(self) -> int:
        """QoS 2 messages the broker completed with PUBACK (it downgraded them to QoS 1)."""
        return self._outbound.downgraded

    @property
    def requeued(self) -> int:
        """Messages published again as new because a broker lost the session."""
        return self._outbound.requeued

    @property
    def expired(self) -> int:
        """Messages whose MQTT 5 Message Expiry Interval passed before the broker took them."""
        return self._outbound.expired

    @property
    def refused(self) -> int:
        """Messages the broker refused (MQTT 5 reason codes) or announced it cannot take."""
        return self._outbound.refused

    @property
    def protocol_version(self) -> int:
        """The protocol of the current (or last) connection: 4 (3.1.1) or 5."""
        return self.terms.protocol_version

    @property
    def duplicates_suppressed(self) -> int:
        """Resent inbound QoS 2 messages acknowledged without delivering them again."""
        return self._inbound.duplicates_suppressed

    @property
    def unread(self) -> int:
        """Messages handed to the application and not yet read (counted with manual
        acknowledgement or ``max_unread`` only)."""
        return self._inbound.acks.unread

    @property
    def unread_peak(self) -> int:
        """The highest :attr:`unread` so far."""
        return self._inbound.acks.unread_peak

    @property
    def held_back(self) -> int:
        """QoS 1/2 messages received beyond ``max_unread``: not handed out, not acknowledged."""
        return self._inbound.acks.held

    @property
    def shed(self) -> int:
        """QoS 1/2 messages let go unacknowledged past the held bound (sent again later)."""
        return self._inbound.acks.shed

    @property
    def wants_reconnect(self) -> bool:
        """The shell should renew the connection so that the broker resends shed messages."""
        return self._inbound.acks.wants_reconnect

    @property
    def unacknowledged(self) -> int:
        """Inbound QoS 1/2 messages whose PUBACK/PUBREC has not gone out yet (deferred)."""
        return self._inbound.acks.unacknowledged
