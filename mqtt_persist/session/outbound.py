"""Outgoing QoS 1/2 flows: the in-flight window, PUBACK/PUBREC/PUBCOMP, resume and session loss.

A queued message gets its packet ID when it enters the window, and that assignment is stored
(``PacketIdAssigned``) in the same batch as the PUBLISH carrying it, so a restart resends it under
the same ID; PUBREC is stored (``MessageReleased``) before PUBREL goes out, so a restart resumes
with PUBREL and never publishes the message again ("packet IDs are continuous"). The window takes
messages strictly from the head of the queue: a QoS 2 message waiting for one of the narrower QoS 2
slots holds back everything behind it ("order").
"""

from __future__ import annotations

from collections import deque

from mqtt_persist.message import DeliveryOutcome
from mqtt_persist.protocol.packets import PubAck, PubComp, Publish, PubRec, PubRel
from mqtt_persist.session.config import SessionConfig
from mqtt_persist.session.events import Anomaly, PublishCompleted
from mqtt_persist.session.outgoing_queue import OutgoingMessage, OutgoingQueue
from mqtt_persist.session.output import PendingOutput
from mqtt_persist.session.packet_ids import PacketIdAllocator
from mqtt_persist.session.state import (
    MessageReleased,
    MessageRemoved,
    MessageRequeued,
    PacketIdAssigned,
    SessionState,
)


def _by_seq(message: OutgoingMessage) -> int:
    return message.seq


class OutboundFlows:
    """Outgoing QoS 1/2 messages in flight, by packet ID, and the packets that move them on."""

    __slots__ = (
        "_config",
        "_ids",
        "_out",
        "_queue",
        "_queued",
        "in_doubt",
        "inflight",
        "qos2_inflight",
        "requeued",
        "window_open",
    )

    def __init__(
        self,
        config: SessionConfig,
        ids: PacketIdAllocator,
        out: PendingOutput,
        queue: OutgoingQueue,
    ) -> None:
        self._config = config
        self._ids = ids
        self._out = out
        self._queue = queue
        # The queue's in-memory deque, read directly: pump() runs once per message.
        self._queued: deque[OutgoingMessage] = queue.memory
        #: Open flows by packet ID. Insertion order is send order: a flow enters the window in
        #: sequence order.
        self.inflight: dict[int, OutgoingMessage] = {}
        #: How many of them are QoS 2 (bounded by ``max_inflight_qos2``).
        self.qos2_inflight = 0
        #: New flows may start: the connection is READY. Only the session's state change sets it.
        self.window_open = False
        #: QoS 2 messages past PUBREC when a broker lost the session (reported IN_DOUBT).
        self.in_doubt = 0
        #: Messages published again as new because a broker lost the session.
        self.requeued = 0

    def restore(self, state: SessionState) -> None:
        """Take the open flows (messages with a packet ID) of a stored session."""
        for m in state.messages.values():
            if m.packet_id is not None:
                self.inflight[m.packet_id] = OutgoingMessage(
                    m.seq, m.topic, m.payload, m.qos, m.retain, m.packet_id, m.released
                )
                self.qos2_inflight += m.qos == 2
                self._ids.reserve(m.packet_id)

    def pump(self) -> None:
        """Move queued messages into the window while it has room, in order."""
        queue = self._queued
        inflight = self.inflight
        config = self._config
        limit = config.max_inflight
        limit_qos2 = config.max_inflight_qos2
        out = self._out
        packets = out.packets
        while queue:
            message = queue[0]
            if message.qos == 0:
                queue.popleft()
                packets.append(
                    Publish(message.topic, message.payload, 0, message.retain, False, None)
                )
                out.events.append(PublishCompleted(message.seq, DeliveryOutcome.SENT))
                continue
            if len(inflight) >= limit:
                return
            if message.qos == 2:
                if self.qos2_inflight >= limit_qos2:
                    return  # waits at the head: nothing overtakes it ("order")
                self.qos2_inflight += 1
            queue.popleft()
            packet_id = self._ids.allocate()
            message.packet_id = packet_id
            inflight[packet_id] = message
            out.ops.append(PacketIdAssigned(message.seq, packet_id))
            packets.append(
                Publish(
                    message.topic, message.payload, message.qos, message.retain, False, packet_id
                )
            )

    def resume(self) -> None:
        """Resend every open flow in sequence order under its original packet ID, DUP set."""
        packets = self._out.packets
        for message in sorted(self.inflight.values(), key=_by_seq):
            packet_id: int = message.packet_id  # type: ignore[assignment]
            if message.released:
                packets.append(PubRel(packet_id))
            else:
                packets.append(
                    Publish(
                        message.topic, message.payload, message.qos, message.retain, True, packet_id
                    )
                )

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
            if message.released:
                in_doubt += 1
                out.ops.append(MessageRemoved(message.seq))
                out.events.append(PublishCompleted(message.seq, DeliveryOutcome.IN_DOUBT))
            else:
                message.packet_id = None
                out.ops.append(MessageRequeued(message.seq))
                requeue.append(message)
        self.inflight.clear()
        self.qos2_inflight = 0
        if requeue:
            requeue.sort(key=_by_seq)
            self._queue.put_back(requeue)
        self.in_doubt += in_doubt
        self.requeued += len(requeue)
        return len(requeue), in_doubt

    # --- acknowledgements from the broker ------------------------------------------------------

    def on_puback(self, packet: PubAck) -> None:
        """QoS 1 flow done."""
        packet_id = packet.packet_id
        message = self.inflight.get(packet_id)
        if message is None or message.qos != 1:
            self._out.events.append(Anomaly(f"PUBACK for packet ID {packet_id}, not a QoS 1 flow"))
            return
        self._finish(packet_id)

    def on_pubrec(self, packet: PubRec) -> None:
        """QoS 2, first half: stored as released, then PUBREL (also for a repeated PUBREC)."""
        packet_id = packet.packet_id
        message = self.inflight.get(packet_id)
        if message is None or message.qos != 2:
            self._out.events.append(Anomaly(f"PUBREC for packet ID {packet_id}, not a QoS 2 flow"))
            return
        if not message.released:
            message.released = True
            self._out.ops.append(MessageReleased(message.seq))
        self._out.packets.append(PubRel(packet_id))

    def on_pubcomp(self, packet: PubComp) -> None:
        """QoS 2 flow done."""
        packet_id = packet.packet_id
        message = self.inflight.get(packet_id)
        if message is None or not message.released:
            self._out.events.append(Anomaly(f"PUBCOMP for packet ID {packet_id}, not awaiting one"))
            return
        self._finish(packet_id)

    def _finish(self, packet_id: int) -> None:
        message = self.inflight.pop(packet_id)
        self.qos2_inflight -= message.qos == 2
        self._ids.release(packet_id)
        out = self._out
        out.ops.append(MessageRemoved(message.seq))
        out.events.append(PublishCompleted(message.seq, DeliveryOutcome.ACKNOWLEDGED))
        if self._queued and self.window_open:
            self.pump()
