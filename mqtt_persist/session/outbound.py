"""Outgoing QoS 1/2 flows: the in-flight window, PUBACK/PUBREC/PUBCOMP, resume and session loss.

A queued message gets its packet ID when it enters the window, and that assignment is stored
(``PacketIdAssigned``) in the same batch as the PUBLISH carrying it, so a restart resends it under
the same ID; PUBREC is stored (``MessageReleased``) before PUBREL goes out, so a restart resumes
with PUBREL and never publishes the message again ("packet IDs are continuous"). The window takes
messages strictly from the head of the queue: a QoS 2 message waiting for one of the narrower QoS 2
slots holds back everything behind it ("order").

The window's size is the connection's (``ConnectionTerms``): on MQTT 5 the broker's Receive
Maximum bounds QoS 1 and 2 together, also when flows restored from the store are resumed (those
past it wait, in order, for a slot); on MQTT 3.1.1 ``max_inflight`` and ``max_inflight_qos2``.

MQTT 5 adds what the broker may answer and what a message may carry:

* a PUBACK or PUBREC with a failure reason code ends the flow (``PublishRefused``): the broker
  answered, so the message is neither retried nor kept;
* a message the broker announced it cannot take (larger than its Maximum Packet Size, a QoS or
  a retain flag it does not support) is discarded unsent and reported the same way (§3.1.2.11);
  a QoS 2 flow already sent when new terms refuse it is released instead (the broker may hold
  it): refused if PUBCOMP says the broker never had it (0x92), else in doubt;
* a message with a Message Expiry Interval carries what is left of it on every send; one that
  expired before it reached the wire is discarded and reported ``EXPIRED``; so is a QoS 1
  message that expired in flight (the broker keeps no state for it). A QoS 2 message that
  expired in flight is *released* instead of resent: the broker may hold its packet ID, and
  only PUBREL frees it; PUBCOMP 0x92 says the broker never had it, another one leaves it in
  doubt (mosquitto answers PUBCOMP 0 for an ID it never saw).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from mqtt_persist.message import DeliveryOutcome
from mqtt_persist.protocol.codec import encode
from mqtt_persist.protocol.packets import (
    MQTT_5,
    NO_PROPERTIES,
    PacketType,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
)
from mqtt_persist.protocol.reason_codes import ReasonCode, describe_reason_code
from mqtt_persist.session.config import SessionConfig
from mqtt_persist.session.events import Anomaly, Notice, PublishCompleted, PublishRefused
from mqtt_persist.session.outgoing_queue import OutgoingMessage, OutgoingQueue, from_stored
from mqtt_persist.session.output import PendingOutput
from mqtt_persist.session.packet_ids import PacketIdAllocator
from mqtt_persist.session.state import (
    MessageReleased,
    MessageRemoved,
    MessageRequeued,
    PacketIdAssigned,
    SessionState,
)
from mqtt_persist.session.terms import ConnectionTerms, initial_terms


def _by_seq(message: OutgoingMessage) -> int:
    return message.seq


class OutboundFlows:
    """Outgoing QoS 1/2 messages in flight, by packet ID, and the packets that move them on."""

    __slots__ = (
        "_clock",
        "_config",
        "_ids",
        "_out",
        "_queue",
        "_queued",
        "_stray_releases",
        "_stripped",
        "_told",
        "downgraded",
        "expired",
        "held",
        "in_doubt",
        "inflight",
        "qos2_inflight",
        "refused",
        "requeued",
        "terms",
        "window_open",
    )

    def __init__(
        self,
        config: SessionConfig,
        ids: PacketIdAllocator,
        out: PendingOutput,
        queue: OutgoingQueue,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._ids = ids
        self._out = out
        self._queue = queue
        self._clock = clock
        # The queue's in-memory deque, read directly: pump() runs once per message.
        self._queued: deque[OutgoingMessage] = queue.memory
        #: Open flows by packet ID. Insertion order is send order: a flow enters the window in
        #: sequence order.
        self.inflight: dict[int, OutgoingMessage] = {}
        #: How many of them are QoS 2 (bounded by ``terms.qos2_window``).
        self.qos2_inflight = 0
        #: Open flows restored from the store that did not fit the window on resume: they are
        #: resent, in order, before any new flow starts.
        self.held: deque[OutgoingMessage] = deque()
        #: New flows may start: the connection is READY. Only the session's state change sets it.
        self.window_open = False
        #: What the current connection allows (the session sets it on CONNECT and CONNACK).
        self.terms: ConnectionTerms = initial_terms(config, config.protocol_version)
        #: QoS 2 messages past PUBREC when a broker lost the session (reported IN_DOUBT).
        self.in_doubt = 0
        #: Messages published again as new because a broker lost the session.
        self.requeued = 0
        #: Messages whose Message Expiry Interval passed before the broker took them.
        self.expired = 0
        #: Messages the broker refused, or that it announced it cannot take.
        self.refused = 0
        #: QoS 2 messages the broker completed with PUBACK (it downgraded them to QoS 1).
        self.downgraded = 0
        # Messages sent over MQTT 3.1.1 without their MQTT 5 properties, on this connection.
        self._stripped = 0
        # The kinds of broker anomaly already reported on this connection: each is logged
        # once per connection, not once per packet (a downgrading broker does it to every
        # QoS 2 message).
        self._told: set[str] = set()
        # IDs of unknown PUBRECs answered with PUBREL on this connection: their PUBCOMP is
        # expected, not an anomaly.
        self._stray_releases: set[int] = set()

    def restore(self, state: SessionState) -> None:
        """Take the open flows (messages with a packet ID) of a stored session."""
        for m in state.messages.values():
            if m.packet_id is not None:
                self.inflight[m.packet_id] = from_stored(m, in_flight=True)
                self.qos2_inflight += m.qos == 2
                self._ids.reserve(m.packet_id)

    def new_connection(self, terms: ConnectionTerms) -> None:
        """A connection starts (or its CONNACK set new terms)."""
        self.terms = terms
        self._stripped = 0
        self._told.clear()
        self._stray_releases.clear()

    def pump(self) -> None:
        """Move queued messages into the window while it has room, in order."""
        if self.held and not self._resend_held():
            return
        queue = self._queued
        inflight = self.inflight
        terms = self.terms
        limit = terms.send_window
        limit_qos2 = terms.qos2_window
        restricted = terms.restricted
        out = self._out
        packets = out.packets
        while queue:
            message = queue[0]
            if restricted and self._unsendable(message):
                continue
            special = message.special
            if message.qos == 0:
                queue.popleft()
                if special:
                    publish = self._publish(message, None, False)
                    if publish is None:
                        continue
                    packets.append(publish)
                else:
                    packets.append(
                        Publish(message.topic, message.payload, 0, message.retain, False, None)
                    )
                out.events.append(PublishCompleted(message.seq, DeliveryOutcome.SENT))
                continue
            if len(inflight) >= limit:
                return
            if special and self._expired(message):
                queue.popleft()
                self._drop_expired(message)
                continue
            if message.qos == 2:
                if self.qos2_inflight >= limit_qos2:
                    return  # waits at the head: nothing overtakes it ("order")
                self.qos2_inflight += 1
            queue.popleft()
            packet_id = self._ids.allocate()
            message.packet_id = packet_id
            inflight[packet_id] = message
            out.ops.append(PacketIdAssigned(message.seq, packet_id))
            if special:
                publish = self._publish(message, packet_id, False)
                assert publish is not None  # not expired: checked above
                packets.append(publish)
            else:
                packets.append(
                    Publish(
                        message.topic,
                        message.payload,
                        message.qos,
                        message.retain,
                        False,
                        packet_id,
                    )
                )

    def resume(self) -> None:
        """Resend every open flow in sequence order under its original packet ID, DUP set.

        Only as many as the window takes go out now (a stored session may hold more flows than
        the broker's Receive Maximum allows); the rest wait in ``held``, in order, and go out
        as slots free up, before any new flow.
        """
        self.held.clear()
        self.held.extend(sorted(self.inflight.values(), key=_by_seq))
        self._resend_held()

    def _resend_held(self) -> bool:
        """Resend held flows while the window has room; True once none is held."""
        held = self.held
        terms = self.terms
        packets = self._out.packets
        while held:
            on_wire = len(self.inflight) - len(held)
            if on_wire >= terms.send_window:
                return False
            message = held[0]
            if message.qos == 2 and not message.released:
                qos2_held = sum(1 for m in held if m.qos == 2)
                if self.qos2_inflight - qos2_held >= terms.qos2_window:
                    return False
            held.popleft()
            packet_id: int = message.packet_id  # type: ignore[assignment]
            if message.released:
                packets.append(PubRel(packet_id))
                continue
            if terms.restricted and self._unsendable_in_flight(message):
                continue
            if message.expires_at is not None and self._expired(message):
                self._expired_in_flight(message)
                continue
            publish = self._publish(message, packet_id, True)
            assert publish is not None
            packets.append(publish)
        return True

    def broker_lost_session(self) -> tuple[int, int]:
        """The broker forgot every open flow: requeue what it never acknowledged, keep nothing.

        Messages it never acknowledged go back to the head of the queue as new messages (MQTT 5
        §4.1 wants the client to discard session state it shared with the broker); QoS 2
        messages past PUBREC are in doubt, because only the broker knew whether it forwarded
        them. Returns ``(requeued, in_doubt)``.
        """
        out = self._out
        requeue: list[OutgoingMessage] = []
        in_doubt = 0
        for message in self.inflight.values():
            self._ids.release(message.packet_id)  # type: ignore[arg-type]
            if message.released and message.qos == 1:
                # PUBREC for a QoS 1 message (a broker that upgraded it): it had the message,
                # and at least once is all QoS 1 promises.
                out.ops.append(MessageRemoved(message.seq))
                out.events.append(PublishCompleted(message.seq, DeliveryOutcome.ACKNOWLEDGED))
            elif message.released:
                in_doubt += 1
                out.ops.append(MessageRemoved(message.seq))
                out.events.append(PublishCompleted(message.seq, DeliveryOutcome.IN_DOUBT))
            else:
                message.packet_id = None
                out.ops.append(MessageRequeued(message.seq))
                requeue.append(message)
        self.inflight.clear()
        self.held.clear()
        self.qos2_inflight = 0
        if requeue:
            requeue.sort(key=_by_seq)
            self._queue.put_back(requeue)
        self.in_doubt += in_doubt
        self.requeued += len(requeue)
        return len(requeue), in_doubt

    # --- MQTT 5: properties, expiry, what the broker cannot take ------------------------------

    def _publish(
        self, message: OutgoingMessage, packet_id: int | None, dup: bool
    ) -> Publish | None:
        """The PUBLISH of a message with properties or an expiry; None if it expired first."""
        properties = message.properties
        if message.expires_at is not None:
            remaining = message.expires_at - self._clock()
            if remaining <= 0:
                self._drop_expired(message)
                return None
            properties = properties._replace(message_expiry_interval=math.ceil(remaining))
        if self.terms.protocol_version != MQTT_5:
            if message.properties is not NO_PROPERTIES:
                self._stripped += 1
                if self._stripped == 1:
                    self._out.events.append(
                        Notice(
                            "this connection speaks MQTT 3.1.1: messages published with MQTT 5 "
                            "properties are sent without them (the first: seq "
                            f"{message.seq}, topic {message.topic!r})"
                        )
                    )
            properties = NO_PROPERTIES
        return Publish(
            message.topic, message.payload, message.qos, message.retain, dup, packet_id, properties
        )

    def _expired(self, message: OutgoingMessage) -> bool:
        expires_at = message.expires_at
        return expires_at is not None and expires_at <= self._clock()

    def _drop_expired(self, message: OutgoingMessage) -> None:
        """Discard a message that expired before it reached the wire."""
        out = self._out
        if message.qos:
            out.ops.append(MessageRemoved(message.seq))
        self.expired += 1
        out.events.append(PublishCompleted(message.seq, DeliveryOutcome.EXPIRED))

    def _expired_in_flight(self, message: OutgoingMessage) -> None:
        """A message sent under a packet ID expired before it was acknowledged."""
        packet_id: int = message.packet_id  # type: ignore[assignment]
        if message.qos == 1:
            # The broker keeps nothing of a QoS 1 flow it did not answer: just forget it.
            self.end_flow(packet_id)
            self._drop_expired(message)
            return
        # QoS 2: the broker may hold this packet ID from the first send, and a new message
        # under the same ID would then be taken for a resend of this one. PUBREL frees it;
        # PUBCOMP says whether the broker had the message (its own expiry clock then runs).
        message.released = True
        message.expired_release = True
        self._out.ops.append(MessageReleased(message.seq))
        self._out.packets.append(PubRel(packet_id))

    def _unsendable_reason(self, message: OutgoingMessage) -> tuple[int, str] | None:
        """Why the broker cannot take this message (reason code, text), or None."""
        terms = self.terms
        if message.qos > terms.maximum_qos:
            return ReasonCode.QOS_NOT_SUPPORTED, (
                f"the broker takes QoS {terms.maximum_qos} at most (CONNACK Maximum QoS)"
            )
        if message.retain and not terms.retain_available:
            return ReasonCode.RETAIN_NOT_SUPPORTED, "the broker does not take retained messages"
        limit = terms.max_packet_size
        if limit is not None:
            size = len(self._encoded(message))
            if size > limit:
                return ReasonCode.PACKET_TOO_LARGE, (
                    f"the PUBLISH is {size} bytes; the broker takes {limit} at most "
                    "(CONNACK Maximum Packet Size)"
                )
        return None

    def _encoded(self, message: OutgoingMessage) -> bytes:
        """The message's PUBLISH as it would leave now (the largest form: with a packet ID)."""
        properties = message.properties
        if message.expires_at is not None:
            properties = properties._replace(message_expiry_interval=0xFFFFFFFF)
        if self.terms.protocol_version != MQTT_5:
            properties = NO_PROPERTIES
        publish = Publish(
            message.topic,
            message.payload,
            message.qos,
            message.retain,
            False,
            1 if message.qos else None,
            properties,
        )
        return encode(publish, self.terms.protocol_version)

    def _unsendable(self, message: OutgoingMessage) -> bool:
        """Discard the queue's head if the broker cannot take it; True if it did."""
        reason = self._unsendable_reason(message)
        if reason is None:
            return False
        self._queued.popleft()
        self._refuse(message, *reason)
        return True

    def _unsendable_in_flight(self, message: OutgoingMessage) -> bool:
        """End a held flow the broker can no longer take (its CONNACK terms changed).

        A QoS 2 PUBLISH already went out once: the broker (it kept the session) may have
        taken it and hold its packet ID, its PUBREC lost. So it is released, as an expired
        one is: PUBCOMP 0x92 says the broker never had it (refused); a successful PUBCOMP
        leaves it in doubt (mosquitto answers one for an ID it never saw).
        """
        reason = self._unsendable_reason(message)
        if reason is None:
            return False
        if message.qos == 2:
            message.released = True
            message.refused_release = reason
            self._out.ops.append(MessageReleased(message.seq))
            self._out.packets.append(PubRel(message.packet_id))  # type: ignore[arg-type]
            return True
        self.end_flow(message.packet_id)  # type: ignore[arg-type]
        self._refuse(message, *reason)
        return True

    def _refuse(self, message: OutgoingMessage, code: int, text: str | None) -> None:
        out = self._out
        if message.qos:
            out.ops.append(MessageRemoved(message.seq))
        self.refused += 1
        out.events.append(PublishRefused(message.seq, code, text))

    # --- acknowledgements from the broker ------------------------------------------------------

    def on_puback(self, packet: PubAck) -> None:
        """QoS 1 flow done (MQTT 5: a failure reason code means the broker refused it).

        A PUBACK for a QoS 2 flow still waiting for PUBREC is a broker that downgrades QoS 2
        to QoS 1 (RabbitMQ 3.10 does): the broker took the message and keeps no QoS 2 state
        for it, so the flow ends with :attr:`DeliveryOutcome.DOWNGRADED` (counted in
        ``downgraded``, reported once per connection) and its packet ID and QoS 2 slot are
        free again. A PUBACK for a QoS 2 flow past PUBREC, or for an ID with no open flow,
        is ignored and reported: PUBCOMP, or nothing, is what ends those.
        """
        packet_id = packet.packet_id
        message = self.inflight.get(packet_id)
        if message is None or (message.qos == 2 and message.released):
            self._unexpected_ack("PUBACK", packet_id, message)
            return
        if packet.reason_code >= 0x80:
            self._refused_by_broker(packet_id, packet.reason_code, packet.properties.reason_string)
            return
        if message.qos == 2:
            self._downgraded(packet_id)
            return
        self._finish(packet_id)

    def _downgraded(self, packet_id: int) -> None:
        message = self.inflight[packet_id]
        self.downgraded += 1
        self._tell(
            "downgrade",
            f"the broker answered a QoS 2 PUBLISH (packet ID {packet_id}, topic "
            f"{message.topic!r}) with PUBACK: it downgrades QoS 2 to QoS 1 (RabbitMQ does). "
            "Such messages complete as delivered at QoS 1 (DOWNGRADED), counted in "
            "stats.downgraded; not logged again on this connection",
        )
        self._finish(packet_id, DeliveryOutcome.DOWNGRADED)

    def on_pubrec(self, packet: PubRec) -> None:
        """QoS 2, first half: stored as released, then PUBREL (also for a repeated PUBREC).

        MQTT 5: a failure reason code ends the flow here, without PUBREL (§4.3.3).

        A PUBREC for a QoS 1 flow is a broker that upgraded the flow to QoS 2: it holds the
        packet ID until PUBREL, so the flow continues as a QoS 2 one (released, PUBREL, and
        PUBCOMP completes it as ACKNOWLEDGED) rather than freeing an ID the broker still
        holds. A PUBREC for an ID with no open flow is answered with PUBREL (MQTT 5: reason
        0x92, packet identifier not found), so that the broker frees the ID too.
        """
        packet_id = packet.packet_id
        message = self.inflight.get(packet_id)
        if message is None:
            self._unexpected_ack("PUBREC", packet_id, None)
            if packet.reason_code < 0x80:
                code = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if self.terms.v5 else 0
                self._out.packets.append(PubRel(packet_id, code))
                self._stray_releases.add(packet_id)
            return
        if packet.reason_code >= 0x80 and not message.released:
            self._refused_by_broker(packet_id, packet.reason_code, packet.properties.reason_string)
            return
        if message.qos == 1 and not message.released:
            self._tell(
                "upgrade",
                f"the broker answered a QoS 1 PUBLISH (packet ID {packet_id}, topic "
                f"{message.topic!r}) with PUBREC, as if it were QoS 2; the flow continues as "
                "QoS 2 (PUBREL, then PUBCOMP) so that the broker frees the packet ID; not "
                "logged again on this connection",
            )
        if not message.released:
            message.released = True
            self._out.ops.append(MessageReleased(message.seq))
        self._out.packets.append(PubRel(packet_id))

    def _unexpected_ack(self, kind: str, packet_id: int, message: OutgoingMessage | None) -> None:
        if message is None:
            what = "no message is in flight under that ID (a late duplicate, or a broker bug)"
        else:
            what = f"its QoS {message.qos} flow does not expect one now"
        self._tell(
            f"unexpected {kind}",
            f"the broker sent {kind} for packet ID {packet_id}, but {what}; ignored"
            + (", answered with PUBREL" if kind == "PUBREC" and message is None else "")
            + f" (further unexpected {kind}s on this connection are not logged)",
        )

    def _tell(self, kind: str, text: str) -> None:
        """Report a broker anomaly of this kind, once per connection."""
        if kind not in self._told:
            self._told.add(kind)
            self._out.events.append(Anomaly(text))

    def on_pubcomp(self, packet: PubComp) -> None:
        """QoS 2 flow done."""
        packet_id = packet.packet_id
        message = self.inflight.get(packet_id)
        if message is None and packet_id in self._stray_releases:
            self._stray_releases.discard(packet_id)  # the answer to our PUBREL for it
            return
        if message is None or not message.released:
            self._unexpected_ack("PUBCOMP", packet_id, message)
            return
        if message.expired_release:
            self._finish_expired_release(packet_id, packet.reason_code)
            return
        refusal = message.refused_release
        if refusal is not None:
            if packet.reason_code == ReasonCode.PACKET_IDENTIFIER_NOT_FOUND:
                self.end_flow(packet_id)
                self._refuse(message, *refusal)
                self._window_freed()
                return
            # Not proof that the broker had it: mosquitto 2.0 answers a PUBREL for an ID it
            # never saw with PUBCOMP 0 too (measured), so it may or may not be delivered.
            self.in_doubt += 1
            self._finish(packet_id, DeliveryOutcome.IN_DOUBT)
            return
        self._finish(packet_id)

    def _finish_expired_release(self, packet_id: int, reason_code: int) -> None:
        message = self.end_flow(packet_id)
        if reason_code == ReasonCode.PACKET_IDENTIFIER_NOT_FOUND:
            outcome = DeliveryOutcome.EXPIRED  # the broker never had it: nothing was delivered
            self.expired += 1
        else:
            # 3.1.1's PUBCOMP cannot say which, and MQTT 5's success does not either:
            # mosquitto 2.0 answers PUBREL for an ID it never saw with PUBCOMP 0 (measured).
            outcome = DeliveryOutcome.IN_DOUBT
            self.in_doubt += 1
        self._out.ops.append(MessageRemoved(message.seq))
        self._out.events.append(PublishCompleted(message.seq, outcome))
        self._window_freed()

    def _refused_by_broker(self, packet_id: int, code: int, reason_string: str | None) -> None:
        message = self.end_flow(packet_id)
        kind = PacketType.PUBACK if message.qos == 1 else PacketType.PUBREC
        self._refuse(message, code, reason_string or describe_reason_code(code, kind))
        self._window_freed()

    def keep_id_reserved(self, packet_id: int) -> None:
        """Keep ``packet_id`` out of use for this process (the broker may still hold it)."""
        self._ids.reserve(packet_id)

    def clock(self) -> float:
        """The Unix time, from the session's clock."""
        return self._clock()

    def end_flow(self, packet_id: int) -> OutgoingMessage:
        """Take a flow out of the window and free its packet ID."""
        message = self.inflight.pop(packet_id)
        self.qos2_inflight -= message.qos == 2
        self._ids.release(packet_id)
        return message

    def _finish(
        self, packet_id: int, outcome: DeliveryOutcome = DeliveryOutcome.ACKNOWLEDGED
    ) -> None:
        message = self.inflight.pop(packet_id)
        self.qos2_inflight -= message.qos == 2
        self._ids.release(packet_id)
        out = self._out
        out.ops.append(MessageRemoved(message.seq))
        out.events.append(PublishCompleted(message.seq, outcome))
        if (self._queued or self.held) and self.window_open:
            self.pump()

    def _window_freed(self) -> None:
        if (self._queued or self.held) and self.window_open:
            self.pump()
