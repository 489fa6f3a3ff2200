"""Inbound QoS 0/1/2 flows: messages from the broker, acknowledged and handed to the application.

An inbound QoS 2 packet ID is stored (``InboundReceived``) in the same batch as the PUBREC that
answers it and the event that hands the message out, and the shell commits a batch before it
writes its packets: a PUBLISH the broker resends, also after a restart, is acknowledged but not
delivered again ("inbound QoS 2 is delivered once"). PUBREL releases the ID.
"""

from __future__ import annotations

from mqtt_persist.message import Message
from mqtt_persist.protocol.packets import PubAck, PubComp, Publish, PubRec, PubRel
from mqtt_persist.session.events import MessageReceived
from mqtt_persist.session.output import PendingOutput
from mqtt_persist.session.state import InboundCleared, InboundReceived, InboundReleased


class InboundFlows:
    """The packet IDs of inbound QoS 2 messages delivered and not yet released by PUBREL."""

    __slots__ = ("_out", "duplicates_suppressed", "qos2_received")

    def __init__(self, out: PendingOutput, qos2_received: set[int] | None = None) -> None:
        self._out = out
        self.qos2_received: set[int] = set(qos2_received or ())
        #: Resent QoS 2 messages acknowledged without delivering them again.
        self.duplicates_suppressed = 0

    def on_publish(self, publish: Publish) -> None:
        """Hand the message out and acknowledge it (PUBACK for QoS 1, PUBREC for QoS 2)."""
        out = self._out
        qos = publish.qos
        if qos == 0:
            out.events.append(MessageReceived(_message(publish)))
        elif qos == 1:
            out.events.append(MessageReceived(_message(publish)))
            out.packets.append(PubAck(publish.packet_id))  # type: ignore[arg-type]
        else:
            packet_id: int = publish.packet_id  # type: ignore[assignment]
            if packet_id in self.qos2_received:
                # Re-sent before our PUBREC reached the broker: acknowledge, never redeliver.
                self.duplicates_suppressed += 1
            else:
                self.qos2_received.add(packet_id)
                out.ops.append(InboundReceived(packet_id))
                out.events.append(MessageReceived(_message(publish)))
            out.packets.append(PubRec(packet_id))

    def on_pubrel(self, packet: PubRel) -> None:
        """The broker released an inbound QoS 2 ID: forget it, answer PUBCOMP."""
        packet_id = packet.packet_id
        if packet_id in self.qos2_received:
            self.qos2_received.discard(packet_id)
            self._out.ops.append(InboundReleased(packet_id))
        # Answer even an unknown ID: the broker is finishing a flow we already closed.
        self._out.packets.append(PubComp(packet_id))

    def broker_lost_session(self) -> None:
        """The broker forgot its open flows, so a resend can no longer come: forget the IDs."""
        if self.qos2_received:
            self.qos2_received.clear()
            self._out.ops.append(InboundCleared())


def _message(publish: Publish) -> Message:
    return Message(publish.topic, publish.payload, publish.qos, publish.retain, publish.dup)
