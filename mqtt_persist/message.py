"""What the application sees: received messages and the outcome of a publish."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mqtt_persist.protocol.packets import NO_PROPERTIES, Properties


@dataclass(frozen=True, slots=True)
class Message:
    """A message received from the broker on one of the client's subscriptions."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    #: The broker flagged it as a possible re-delivery of an earlier PUBLISH.
    dup: bool = False
    #: MQTT 5: the message's properties (user properties, content type, payload format
    #: indicator, response topic, correlation data, the remaining message expiry interval, and
    #: the identifiers of the subscriptions it matched); empty on MQTT 3.1.1.
    properties: Properties = NO_PROPERTIES


class DeliveryOutcome(enum.Enum):
    """How the flow of a published message ended."""

    #: QoS 1/2: the broker acknowledged it (PUBACK, or PUBCOMP for QoS 2).
    ACKNOWLEDGED = "acknowledged"
    #: QoS 0: written to the connection; MQTT gives no acknowledgement.
    SENT = "sent"
    #: QoS 2: the broker had answered PUBREC, then lost its session before PUBCOMP. Only the
    #: broker knew whether it forwarded the message, so it is neither resent nor claimed done.
    IN_DOUBT = "in_doubt"
    #: Discarded from a full queue (``queue_full="drop_oldest"``); never reached the broker.
    DROPPED = "dropped"
    #: MQTT 5 Message Expiry Interval: the message expired before it could be sent (queued
    #: while offline, say), so it was discarded; or, for a QoS 2 message that had been sent
    #: but not acknowledged, the broker said it never got it (PUBCOMP 0x92).
    EXPIRED = "expired"
    #: The broker did not take the message: a PUBACK or PUBREC with a failure reason code
    #: (MQTT 5), or the message exceeds what the broker announced it accepts (Maximum Packet
    #: Size, Maximum QoS, Retain Available). ``Delivery.reason_code`` says which.
    REFUSED = "refused"
    #: QoS 2 only: the broker answered the PUBLISH with PUBACK instead of PUBREC, i.e. it
    #: downgraded the message to QoS 1 (RabbitMQ does this). It has the message, at least
    #: once; the exactly-once of QoS 2 is the broker's to keep no more. Counted in
    #: ``client.stats.downgraded``.
    DOWNGRADED = "downgraded"
    #: The broker closed the connection right after this message was sent, several times in
    #: a row (``poison_after``): the message is kept in the store, aside, and not sent again
    #: unless the application retries it (``client.set_aside()``, ``retry_set_aside()``).
    SET_ASIDE = "set_aside"
