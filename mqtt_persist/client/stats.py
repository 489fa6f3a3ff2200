"""``ClientStats``: the client's counters, and how they are read from its running parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mqtt_persist.client.base import Running


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Counters for monitoring: every message the client gave up on is counted here.

    (What "nothing is lost silently" promises.)
    """

    queued: int
    inflight: int
    #: Dropped from a full queue (``queue_full="drop_oldest"``).
    dropped: int
    #: QoS 2 messages past PUBREC when the broker lost its session.
    in_doubt: int
    #: Messages published again as new because the broker lost its session.
    requeued: int
    #: Inbound QoS 2 re-sends acknowledged but not delivered a second time.
    duplicates_suppressed: int
    #: Successful connections (the first one included).
    connections: int
    #: Messages whose MQTT 5 Message Expiry Interval passed before the broker took them.
    expired: int = 0
    #: Messages the broker refused (MQTT 5 PUBACK/PUBREC reason codes) or announced it cannot
    #: take (Maximum Packet Size, Maximum QoS, Retain Available).
    refused: int = 0
    #: QoS 2 messages the broker acknowledged with PUBACK, i.e. took at QoS 1 (RabbitMQ
    #: downgrades QoS 2 this way); their deliveries resolve as ``DOWNGRADED``.
    downgraded: int = 0
    #: Messages set aside as poison by this client (``poison_after``); see ``set_aside()``.
    set_aside: int = 0
    #: Received messages waiting in ``client.messages`` now, and the most that ever waited
    #: (never more than ``max_unread_messages``).
    unread: int = 0
    unread_peak: int = 0
    #: QoS 1/2 messages received beyond ``max_unread_messages``: held, not yet acknowledged.
    held_back: int = 0
    #: QoS 0 messages dropped (oldest first) because ``max_unread_messages`` were waiting.
    unread_dropped: int = 0
    #: Inbound QoS 1/2 messages whose acknowledgement has not gone to the broker yet
    #: (``ack="manual"`` or held back).
    unacknowledged: int = 0
    #: QoS 1/2 messages the broker sent past its flow control beyond ``max_unread_messages``
    #: held ones: let go unacknowledged, and sent again by the broker after a reconnect.
    shed: int = 0


def build_stats(parts: Running | None) -> ClientStats:
    """The counters of a client now (all zero outside ``async with``)."""
    if parts is None:
        return ClientStats(0, 0, 0, 0, 0, 0, 0)
    session = parts.session
    return ClientStats(
        queued=session.queued,
        inflight=session.inflight,
        dropped=session.dropped,
        in_doubt=session.in_doubt,
        requeued=session.requeued,
        duplicates_suppressed=session.duplicates_suppressed,
        connections=parts.dispatcher.connections,
        expired=session.expired,
        refused=session.refused,
        downgraded=session.downgraded,
        set_aside=session.poison.count,
        unread=len(parts.dispatcher.inbox),
        unread_peak=parts.dispatcher.inbox.peak,
        held_back=session.held_back,
        unread_dropped=parts.dispatcher.inbox.dropped,
        unacknowledged=session.unacknowledged,
        shed=session.shed,
    )
