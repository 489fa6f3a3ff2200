"""The settings the session state machine needs: connection parameters and flow control."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mqtt_persist.protocol.packets import MQTT_3_1_1, Will

QueueFullPolicy = Literal["block", "drop_oldest", "error"]

#: MQTT 5's Session Expiry Interval for "the session never expires" (§3.1.2.11.2).
NEVER_EXPIRES = 0xFFFFFFFF


@dataclass(slots=True)
class SessionConfig:
    """Connection and flow-control settings the state machine needs."""

    client_id: str
    clean_session: bool = False
    keepalive: int = 60
    username: str | None = None
    #: Never in repr(): a repr ends up in tracebacks and debug lines.
    password: bytes | None = field(default=None, repr=False)
    will: Will | None = None
    #: QoS 1/2 messages in flight at once. A durable store commits once per window refill, so
    #: a wider window is what makes durable QoS 1 fast (measured: 100 doubles it over 20). On
    #: MQTT 5 the broker's Receive Maximum narrows it further.
    max_inflight: int = 100
    #: QoS 2 flows in flight at once (within max_inflight), on MQTT 3.1.1 only. mosquitto gives
    #: each client a quota of 20 unacknowledged inbound flows on MQTT 3.1.1 and silently drops
    #: whatever arrives past it, while still answering PUBREC or PUBACK. A QoS 2 flow holds a
    #: slot until PUBREL; a QoS 1 message needs a free slot only as it arrives. Measured: 20
    #: open QoS 2 flows made mosquitto drop every QoS 1 message sent meanwhile; 19 leave it the
    #: slot it needs. MQTT 5 replaces this guess with the quota the broker announces.
    max_inflight_qos2: int = 19
    #: Messages waiting for the in-flight window (0: unbounded).
    max_queued: int = 0
    #: Queued messages kept in memory (0: all). Beyond it, QoS 1/2 messages live only in the
    #: store and are read back (``want_refill``/``refill``) when the window is about to need
    #: them, so memory grows with this bound and the in-flight window, not with the queue.
    queue_memory_limit: int = 0
    queue_full: QueueFullPolicy = "block"
    #: How long to wait for PINGRESP (and CONNACK is the shell's business).
    ping_timeout: float | None = None
    #: The protocol the next CONNECT speaks unless ``Session.connect`` is told otherwise.
    protocol_version: int = MQTT_3_1_1
    #: MQTT 5: the Session Expiry Interval CONNECT asks for (seconds; NEVER_EXPIRES: never).
    #: None: derived from ``clean_session`` (0 for a clean session, else never).
    session_expiry_interval: int | None = None
    #: MQTT 5: our Receive Maximum, the QoS 1/2 messages the broker may leave unacknowledged
    #: with us (None: not announced, i.e. 65,535); a broker exceeding it is a protocol error.
    receive_maximum: int | None = None
    #: MQTT 5: the largest packet we accept, announced in CONNECT (None: the protocol's).
    max_packet_size: int | None = None
    #: MQTT 5: how many topic aliases the broker may set up on a connection to us (0: none).
    topic_alias_maximum: int = 0
    #: Poison messages (session/poison.py): set a message aside once the broker closed the
    #: connection right after it this many times in a row (0: never).
    poison_after: int = 3
    #: Seconds after our last write within which a broker's hang-up counts against a message.
    poison_window: float = 2.0
    #: The application acknowledges each inbound QoS 1/2 message (``Session.ack``); PUBACK and
    #: PUBREC go out only then, in arrival order (``inbound_acks.py``).
    manual_ack: bool = False
    #: Messages handed to the application and not yet read, at most (0: no bound); QoS 1/2
    #: beyond it are held unacknowledged (``Session.message_read`` makes room).
    max_unread: int = 0
    #: The shell reconnects after a connection ends. Without that, QoS 1/2 messages a broker
    #: sends past ``max_unread`` held ones are kept (held) rather than shed, since nothing
    #: could bring shed ones back (``inbound_acks.py``).
    reconnects: bool = True
