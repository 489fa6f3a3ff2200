"""What the application sees: received messages and the outcome of a publish."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from mqtt_persist.protocol.packets import NO_PROPERTIES, Properties


class Acknowledger(Protocol):
    """What acknowledges a received message: the client that received it."""

    async def ack(self, message: Message, /) -> None:
        """Acknowledge ``message`` (see :meth:`PersistentClient.ack`)."""


@dataclass(frozen=True, slots=True)
class Message:
    """A message received from the broker on one of the client's subscriptions.

    With ``PersistentClient(..., ack="manual")`` the application acknowledges each one when it
    is done with it: ``await message.ack()``, ``await client.ack(message)``, or ``async with
    message.processing():`` (acknowledges when the block ends without an exception). Otherwise
    acknowledging is a no-op: the client acknowledged the message itself.
    """

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
    #: QoS 1/2: the packet ID the broker sent it under. It names the flow until the message is
    #: acknowledged (a resend carries the same ID); the broker may reuse it afterwards.
    packet_id: int | None = field(default=None, compare=False)
    # Manual acknowledgement: the session's token for this message (0: nothing to acknowledge)
    # and the client to acknowledge it through; neither is part of the message's value.
    _ack_token: int = field(default=0, repr=False, compare=False)
    _acker: Acknowledger | None = field(default=None, repr=False, compare=False)

    @property
    def needs_ack(self) -> bool:
        """Whether the application still has to acknowledge it (manual mode, QoS 1/2)."""
        return self._ack_token != 0 and self._acker is not None

    async def ack(self) -> None:
        """Acknowledge the message: the broker may consider it delivered (manual mode).

        See :meth:`PersistentClient.ack`. A no-op for QoS 0 and in the automatic mode.
        """
        if self._acker is not None and self._ack_token:
            await self._acker.ack(self)

    @asynccontextmanager
    async def processing(self) -> AsyncIterator[Message]:
        """``async with message.processing():`` acknowledges the message if the block succeeds.

        If the block raises, the message is not acknowledged: after a restart the broker
        delivers it again. Until then it holds back the acknowledgements of every message that
        arrived after it (MQTT sends them in order).
        """
        yield self
        await self.ack()


class DeliveryOutcome(enum.Enum):
    """How the flow of a published message ended."""

    #: QoS 1/2: the broker acknowledged it (PUBACK, or PUBCOMP for QoS 2).
    ACKNOWLEDGED = "acknowledged"
    #: QoS 0: written to the connection; MQTT gives no acknowledgement.
    SENT = "sent"
    #: QoS 2: the broker had answered PUBREC, then lost its session before PUBCOMP. Only the
    #: broker knew whether it forwarded the message, so it is neither resent nor claimed done.
    #: Also a QoS 2 message sent once and then released unacknowledged because the broker's new
    #: terms (MQTT 5 CONNACK, e.g. Maximum QoS 1) no longer take it, or because it expired,
    #: when PUBCOMP was not 0x92 (mosquitto answers PUBCOMP 0 for an ID it never saw).
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
