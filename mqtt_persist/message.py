"""What the application sees: received messages and the outcome of a publish."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Message:
    """A message received from the broker on one of the client's subscriptions."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    #: The broker flagged it as a possible re-delivery of an earlier PUBLISH.
    dup: bool = False


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
