"""Inbound QoS 0/1/2 flows: messages from the broker, acknowledged and handed to the application.

An inbound QoS 2 packet ID is stored (``InboundReceived``) in the same batch as the PUBREC that
answers it and the event that hands the message out, and the shell commits a batch before it
writes its packets: a PUBLISH the broker resends, also after a restart, is acknowledged but not
delivered again ("inbound QoS 2 is delivered once"). PUBREL releases the ID.

MQTT 5 adds two per-connection rules the broker must keep, checked here: our Receive Maximum
(QoS 1/2 messages it may leave unacknowledged with us: a QoS 2 flow counts until PUBREL, a QoS 1
message only until its PUBACK, which the same batch sends) and our Topic Alias Maximum (aliases
it may set up; an alias stands for a topic until the connection ends). Breaking either is a
protocol error that ends the connection with the matching DISCONNECT reason (§3.3.4, §3.3.2.3.4).

With manual acknowledgement or a bound on unread messages, ``inbound_acks.py`` decides when a
QoS 1/2 message is acknowledged (and a QoS 2 ID stored): see :class:`InboundAcks`.
"""

from __future__ import annotations

from mqtt_persist.errors import ProtocolError
from mqtt_persist.protocol.packets import (
    MQTT_5,
    NO_PROPERTIES,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
)
from mqtt_persist.protocol.reason_codes import ReasonCode
from mqtt_persist.session.events import Anomaly, MessageReceived
from mqtt_persist.session.inbound_acks import InboundAcks, received_message
from mqtt_persist.session.output import PendingOutput
from mqtt_persist.session.state import InboundCleared, InboundReceived, InboundReleased

#: MQTT 5's Receive Maximum when none is announced (§3.1.2.11.3).
DEFAULT_RECEIVE_MAXIMUM = 65_535


class InboundFlows:
    """The packet IDs of inbound QoS 2 messages delivered and not yet released by PUBREL."""

    __slots__ = (
        "_alias_maximum",
        "_aliases",
        "_open",
        "_out",
        "_receive_maximum",
        "_v5",
        "acks",
        "duplicates_suppressed",
        "qos2_received",
        "receive_maximum_overruns",
    )

    def __init__(
        self,
        out: PendingOutput,
        qos2_received: set[int] | None = None,
        *,
        manual_ack: bool = False,
        max_unread: int = 0,
        may_shed: bool = True,
    ) -> None:
        self._out = out
        #: Deferred, ordered acknowledgements (manual mode, the unread bound).
        self.acks = InboundAcks(
            out, self, manual=manual_ack, max_unread=max_unread, may_shed=may_shed
        )
        self.qos2_received: set[int] = set(qos2_received or ())
        #: Resent QoS 2 messages acknowledged without delivering them again.
        self.duplicates_suppressed = 0
        #: QoS 1/2 messages the broker sent beyond our Receive Maximum while we held
        #: acknowledgements back (tolerated then; see ``_overrun``).
        self.receive_maximum_overruns = 0
        self._v5 = False
        self._receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self._alias_maximum = 0
        # Per connection (MQTT 5): QoS 2 packet IDs received and not yet released, and the
        # topic aliases the broker set up.
        self._open: set[int] = set()
        self._aliases: dict[int, str] = {}

    def new_connection(
        self, protocol_version: int, receive_maximum: int | None, topic_alias_maximum: int
    ) -> None:
        """A connection starts: its own quota and alias table (MQTT 5 §4.9, §3.3.2.3.4)."""
        self._v5 = protocol_version == MQTT_5
        self._receive_maximum = receive_maximum or DEFAULT_RECEIVE_MAXIMUM
        self._alias_maximum = topic_alias_maximum
        self._open.clear()
        self._aliases.clear()
        self.acks.new_connection()

    def on_publish(self, publish: Publish) -> None:
        """Hand the message out and acknowledge it (PUBACK for QoS 1, PUBREC for QoS 2)."""
        if self._v5:
            self._check_v5(publish)
        out = self._out
        qos = publish.qos
        if self.acks.active:
            if qos:
                self.acks.on_publish(publish)
            else:
                self.acks.on_qos0(received_message(publish))
            return
        if qos == 0:
            out.events.append(MessageReceived(received_message(publish)))
        elif qos == 1:
            out.events.append(MessageReceived(received_message(publish)))
            out.packets.append(PubAck(publish.packet_id))  # type: ignore[arg-type]
        else:
            packet_id: int = publish.packet_id  # type: ignore[assignment]
            if packet_id in self.qos2_received:
                # Re-sent before our PUBREC reached the broker: acknowledge, never redeliver.
                self.duplicates_suppressed += 1
            else:
                self.qos2_received.add(packet_id)
                out.ops.append(InboundReceived(packet_id))
                out.events.append(MessageReceived(received_message(publish)))
            out.packets.append(PubRec(packet_id))

    def _check_v5(self, publish: Publish) -> None:
        """Receive Maximum and Topic Alias Maximum; resolves an alias into ``publish.topic``."""
        if publish.qos:
            open_flows = self._open
            # A QoS 1 message's flow stays open until PUBACK, which may wait (InboundAcks).
            deferred = self.acks.active
            if publish.qos == 2 or deferred:
                open_flows.add(publish.packet_id)  # type: ignore[arg-type]
            if len(open_flows) + (publish.qos == 1 and not deferred) > self._receive_maximum:
                if deferred:
                    self._overrun()
                    return self._check_aliases(publish)
                raise ProtocolError(
                    f"the broker sent more than our Receive Maximum ({self._receive_maximum}) "
                    "QoS 1/2 messages without waiting for our acknowledgements",
                    reason_code=ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                )
        self._check_aliases(publish)

    def _overrun(self) -> None:
        """The broker exceeded our Receive Maximum while we hold acknowledgements back.

        Measured: mosquitto 2.0.11 sends one QoS 1 message more than our Receive Maximum
        while we hold PUBACKs back (manual acknowledgement, ``max_unread``). Ending the
        connection would only make it send everything again, so it is reported, not fatal.
        """
        self.receive_maximum_overruns += 1
        if self.receive_maximum_overruns == 1:
            self._out.events.append(
                Anomaly(
                    f"the broker sent more than our Receive Maximum ({self._receive_maximum}) "
                    "unacknowledged QoS 1/2 messages; tolerated (reported once per client)"
                )
            )

    def _check_aliases(self, publish: Publish) -> None:
        """Topic Alias Maximum; resolves an alias into ``publish.topic``."""
        properties = publish.properties
        if properties is NO_PROPERTIES:
            return
        alias = properties.topic_alias
        if alias is None:
            return
        if alias > self._alias_maximum:
            raise ProtocolError(
                f"the broker used topic alias {alias}; we allow {self._alias_maximum} at most",
                reason_code=ReasonCode.TOPIC_ALIAS_INVALID,
            )
        if publish.topic:
            self._aliases[alias] = publish.topic
        else:
            topic = self._aliases.get(alias)
            if topic is None:
                raise ProtocolError(
                    f"the broker used topic alias {alias} before saying what it stands for",
                    reason_code=ReasonCode.PROTOCOL_ERROR,
                )
            publish.topic = topic
        # The alias is a detail of this connection, not of the message.
        publish.properties = properties._replace(topic_alias=None)

    def on_pubrel(self, packet: PubRel) -> None:
        """The broker released an inbound QoS 2 ID: forget it, answer PUBCOMP."""
        packet_id = packet.packet_id
        if packet_id in self.qos2_received:
            self.qos2_received.discard(packet_id)
            self._out.ops.append(InboundReleased(packet_id))
        self._open.discard(packet_id)
        # Answer even an unknown ID: the broker is finishing a flow we already closed.
        self._out.packets.append(PubComp(packet_id))

    def flow_closed(self, packet_id: int) -> None:
        """PUBACK went out for this QoS 1 packet ID: it no longer counts (Receive Maximum)."""
        self._open.discard(packet_id)

    def broker_lost_session(self) -> None:
        """The broker forgot its open flows, so a resend can no longer come: forget the IDs."""
        self.acks.broker_lost_session()
        if self.qos2_received:
            self.qos2_received.clear()
            self._out.ops.append(InboundCleared())
