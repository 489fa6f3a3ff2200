"""Poison messages: a message the broker answers by closing the connection is set aside.

Some brokers close the connection on a PUBLISH they will not take instead of answering it:
nats-server 2.9 does so for any QoS 2 PUBLISH and for a topic with ``.`` or a space. Resent
first after every reconnect (open flows resume in order), such a message would end every
connection and hold back every message behind it, across restarts too.

The rule. A connection *strikes* a message when all of this holds as it ends:

* it had reached READY (a connection lost before CONNACK says nothing about a message);
* the broker acknowledged no PUBLISH on it (no PUBACK, PUBREC or PUBCOMP): a connection that
  made progress and then ended was cut, by the network or the broker's own trouble, not ended
  over one message. A refusing broker (nats-server) hangs up on the message it is resent first;
  a flaky network cuts connections that were carrying acknowledgements;
* it ended within ``poison_window`` seconds of our last write, and nothing arrived from the
  broker after that write (no acknowledgement, no PINGRESP: the broker went silent and hung up);
* the message is the oldest (lowest sequence number) PUBLISH written on that connection that is
  still unacknowledged (a QoS 2 flow past PUBREC does not count: the broker took the message).

``poison_after`` strikes in a row on the same message (default 3) and it is set aside
(``MessageSetAside``): taken out of the flow, kept in the store, never sent again by itself, its
delivery resolved with :attr:`DeliveryOutcome.SET_ASIDE`, one warning naming its topic and packet
ID. The rest of the queue goes on in order. Any ending that strikes nothing, or strikes another
message, starts the count again; the count lives in memory, so a restart starts it again too.
The application lists set-aside messages (``client.set_aside()``), and discards
(``SetAsideRemoved``) or retries them (published again as a new message at the end of the queue).

The packet ID of a QoS 2 message set aside stays reserved for the rest of the process: the
broker may hold it (it answers a later PUBLISH under that ID with PUBREC without delivering it,
until PUBREL). A restored session no longer reserves it (the store keeps set-aside messages
without an ID); the allocator's rotation keeps it out of use for a long while anyway.
"""

from __future__ import annotations

from mqtt_persist.message import DeliveryOutcome
from mqtt_persist.session.events import Anomaly, Notice, PublishCompleted
from mqtt_persist.session.outbound import OutboundFlows
from mqtt_persist.session.outgoing_queue import OutgoingMessage, to_stored
from mqtt_persist.session.output import PendingOutput
from mqtt_persist.session.state import (
    MessageSetAside,
    SessionState,
    SetAsideMessage,
    SetAsideRemoved,
    with_flow,
)


class PoisonGuard:
    """Counts connections ended right after the same message, and sets that message aside."""

    __slots__ = ("_flows", "_out", "after", "count", "set_aside", "strikes", "suspect", "window")

    def __init__(
        self, flows: OutboundFlows, out: PendingOutput, *, after: int, window: float
    ) -> None:
        self._flows = flows
        self._out = out
        #: Strikes in a row that set a message aside (0: never).
        self.after = after
        #: Seconds after our last write within which a broker's hang-up counts as a strike.
        self.window = window
        #: The sequence number of the message the last connections struck, and how often.
        self.suspect: int | None = None
        self.strikes = 0
        #: Set-aside messages by sequence number (restored from the store, and new ones).
        self.set_aside: dict[int, SetAsideMessage] = {}
        #: Messages set aside by this session (not counting restored ones).
        self.count = 0

    def restore(self, state: SessionState) -> None:
        self.set_aside = dict(state.set_aside)

    def connection_ended(self, *, quiet_for: float | None) -> None:
        """A READY connection ended; ``quiet_for``: seconds since our last write, if the broker
        sent nothing after it (None: it did, or the time is unknown)."""
        if not self.after:
            return
        suspect = None
        if quiet_for is not None and quiet_for <= self.window:
            suspect = self._oldest_unanswered()
        if suspect is None:
            self.suspect, self.strikes = None, 0
            return
        if suspect.seq == self.suspect:
            self.strikes += 1
        else:
            self.suspect, self.strikes = suspect.seq, 1
        if self.strikes >= self.after:
            self._set_aside(suspect)
            self.suspect, self.strikes = None, 0
            return
        self._out.events.append(
            Anomaly(
                f"the broker closed the connection right after message seq {suspect.seq} "
                f"(topic {suspect.topic!r}, QoS {suspect.qos}, packet ID {suspect.packet_id}) "
                f"was sent, without answering it: {self.strikes} of {self.after} times in a "
                "row before it is set aside"
            )
        )

    def _oldest_unanswered(self) -> OutgoingMessage | None:
        """The oldest PUBLISH written on this connection and not answered, if any."""
        flows = self._flows
        held = {id(m) for m in flows.held}  # not resent on this connection
        candidates = [m for m in flows.inflight.values() if not m.released and id(m) not in held]
        return min(candidates, key=lambda m: m.seq, default=None)

    def _set_aside(self, message: OutgoingMessage) -> None:
        flows, out = self._flows, self._out
        packet_id: int = message.packet_id  # type: ignore[assignment]
        flows.end_flow(packet_id)
        if message.qos == 2:
            flows.keep_id_reserved(packet_id)
        reason = (
            f"the broker closed the connection right after this message was sent, "
            f"{self.strikes} times in a row"
        )
        at = flows.clock()
        out.ops.append(MessageSetAside(message.seq, reason, at))
        self.set_aside[message.seq] = SetAsideMessage(with_flow(to_stored(message)), reason, at)
        self.count += 1
        out.events.append(
            Notice(
                f"message seq {message.seq} (topic {message.topic!r}, QoS {message.qos}, "
                f"packet ID {packet_id}) set aside: {reason}, so it is not resent; the "
                "broker seems to refuse it (nats-server closes the connection on QoS 2 and on "
                "topics with '.' or a space). See client.set_aside()"
            )
        )
        out.events.append(PublishCompleted(message.seq, DeliveryOutcome.SET_ASIDE))

    def listing(self) -> list[SetAsideMessage]:
        """Set-aside messages in sequence order: kept, never sent by themselves."""
        return [self.set_aside[seq] for seq in sorted(self.set_aside)]

    def take(self, seq: int) -> SetAsideMessage:
        """Remove a set-aside message for good (``SetAsideRemoved``); KeyError if unknown."""
        aside = self.set_aside.pop(seq)
        self._out.ops.append(SetAsideRemoved(seq))
        return aside
