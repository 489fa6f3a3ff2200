"""The session state machine: the MQTT client's behaviour with no I/O in it.

It consumes events — a publish or subscribe requested by the application, a packet decoded from
the broker, the connection opened or lost, the clock moving on — and produces three things,
collected in an :class:`Outbox` that the I/O shell drains with :meth:`Session.take`:

* store operations (the write-ahead journal), which the shell commits first,
* packets, which the shell writes to the connection only after those operations committed,
* events for the application (messages received, deliveries completed, connection ready).

Committing all of a batch's operations before writing any of its packets is always safe: every
operation describes the state *after* the packets of the same batch, and each flow tolerates the
broker not having seen a packet the store already counts as sent (it is resent on reconnect).

The machine never awaits and never reads a clock of its own; the caller passes ``now``. That is
what makes it exhaustively testable (tests/test_session.py drives it packet by packet) and cheap.

:class:`Session` owns the connection: its state (changed only through the table in
``transitions.py``), which packets each state accepts (:meth:`Session._packet_table`), CONNACK,
keepalive, and the output; its counters and read-only views are in ``queries.py``. The rest
is delegated to one part per job: ``outgoing_queue.py`` (accepted messages waiting for the
window), ``outbound.py`` (the in-flight window and outgoing QoS 1/2 flows), ``inbound.py``
(messages from the broker) and ``subscriptions.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from mqtt_persist.errors import (
    ClientIdAssigned,
    KeepaliveTimeout,
    ProtocolError,
    ServerDisconnected,
)
from mqtt_persist.protocol.packets import (
    MQTT_5,
    NO_PROPERTIES,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    UnsubAck,
)
from mqtt_persist.protocol.reason_codes import describe_reason_code
from mqtt_persist.session.config import NEVER_EXPIRES, QueueFullPolicy, SessionConfig
from mqtt_persist.session.events import ConnectionReady, ConnectRefused, Notice
from mqtt_persist.session.inbound import InboundFlows
from mqtt_persist.session.outbound import OutboundFlows
from mqtt_persist.session.outgoing_queue import OutgoingQueue, from_stored, to_stored
from mqtt_persist.session.output import Outbox, PendingOutput
from mqtt_persist.session.packet_ids import PacketIdAllocator
from mqtt_persist.session.poison import PoisonGuard
from mqtt_persist.session.queries import SessionQueries
from mqtt_persist.session.state import (
    ProtocolVersionSet,
    SessionState,
    StoredMessage,
    StoredSubscription,
)
from mqtt_persist.session.subscriptions import Subscriptions
from mqtt_persist.session.terms import ConnectionTerms, accepted_terms, initial_terms
from mqtt_persist.session.transitions import (
    AWAITING_CONNACK,
    CONNECTED,
    INITIAL_STATE,
    REFUSALS,
    ConnectionState,
    Trigger,
    next_state,
)

__all__ = [
    "ConnectionState",
    "Outbox",
    "QueueFullPolicy",
    "Session",
    "SessionConfig",
]

#: Handles one packet type; ``Any`` because each handler takes its own packet class.
PacketHandler = Callable[[Any], None]


#: Acknowledgements of our PUBLISHes: one on a connection shows it made progress.
_PUBLISH_ACKS = frozenset({PubAck, PubRec, PubComp})


class Session(SessionQueries):
    """A client session: connection state, keepalive, and the parts that do the rest. No I/O."""

    def __init__(
        self,
        config: SessionConfig,
        state: SessionState | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` gives the Unix time (only messages with an MQTT 5 expiry read it)."""
        self.config = config
        #: Counts connections; the shell drops packets produced for an older one.
        self.generation = 0
        self._out = PendingOutput()
        # One packet-ID space for PUBLISH, SUBSCRIBE and UNSUBSCRIBE alike.
        self._ids = PacketIdAllocator()
        self._queue = OutgoingQueue(config, self._out)
        self._outbound = OutboundFlows(config, self._ids, self._out, self._queue, clock)
        #: Poison messages: the set-aside ones (``listing()``, ``take(seq)`` discards one).
        self.poison = PoisonGuard(
            self._outbound, self._out, after=config.poison_after, window=config.poison_window
        )
        #: What the current (or last) connection allows.
        self.terms = initial_terms(config, config.protocol_version)
        self._inbound = InboundFlows(
            self._out,
            manual_ack=config.manual_ack,
            max_unread=config.max_unread,
            may_shed=config.reconnects,
        )
        self._subscriptions = Subscriptions(self._ids, self._out)
        # Per state, the handler of every packet type it accepts: _packet_table read by state,
        # so that receive() finds a packet's handler, or learns it is refused, in one lookup.
        table = self._packet_table()
        self._routes: dict[ConnectionState, dict[type, PacketHandler]] = {
            s: {kind: handler for kind, (handler, states) in table.items() if s in states}
            for s in ConnectionState
        }
        self._connection_state = INITIAL_STATE
        self._accepts = self._routes[INITIAL_STATE]
        # What the last CONNACK without the session did to the open flows (ConnectionReady).
        self._lost_requeued = 0
        self._lost_in_doubt = 0
        self._last_sent = 0.0
        # Whether the broker sent anything after our last write, and whether it acknowledged
        # any PUBLISH on this connection (poison messages: a connection that made progress
        # was cut, not refused).
        self._heard_since_sent = False
        self._acked_on_connection = False
        self._ping_sent_at: float | None = None
        #: The protocol level the stored session was made with (None: never connected).
        self._stored_protocol: int | None = None
        if state is not None:
            self._restore(state)

    def _packet_table(self) -> dict[type, tuple[PacketHandler, frozenset[ConnectionState]]]:
        """Every packet a broker may send, who handles it, and in which connection states.

        A packet of another type, or in another state, is a ProtocolError (``REFUSALS``).
        """
        outbound = self._outbound
        inbound = self._inbound
        return {
            ConnAck: (self._on_connack, AWAITING_CONNACK),
            Publish: (inbound.on_publish, CONNECTED),
            PubRel: (inbound.on_pubrel, CONNECTED),
            PubAck: (outbound.on_puback, CONNECTED),
            PubRec: (outbound.on_pubrec, CONNECTED),
            PubComp: (outbound.on_pubcomp, CONNECTED),
            SubAck: (self._on_suback, CONNECTED),
            UnsubAck: (self._subscriptions.on_unsuback, CONNECTED),
            PingResp: (self._on_pingresp, CONNECTED),
            # MQTT 5 only: the 3.1.1 decoder yields a DISCONNECT too, refused below.
            Disconnect: (self._on_disconnect, CONNECTED),
        }

    def _fire(self, trigger: Trigger) -> None:
        """The one place the connection state changes: the move ``TRANSITIONS`` gives."""
        state = next_state(self._connection_state, trigger)
        self._connection_state = state
        self._accepts = self._routes[state]
        self._outbound.window_open = state is ConnectionState.READY

    # --- restore / snapshot ------------------------------------------------------------------

    def _restore(self, state: SessionState) -> None:
        if state.client_id != self.config.client_id:
            raise ValueError(
                f"stored session belongs to {state.client_id!r}, not {self.config.client_id!r}"
            )
        self._queue.restore(state)
        self._outbound.restore(state)
        self.poison.restore(state)
        self._inbound.qos2_received = set(state.inbound_qos2)
        self._subscriptions.restore(state)
        self._stored_protocol = state.protocol_version

    def snapshot(self) -> SessionState:
        """The durable state this session implies; what a store must give back after replay."""
        messages: dict[int, StoredMessage] = {}
        stored = [o for o in (*self._outbound.inflight.values(), *self._queue.memory) if o.qos]
        for o in sorted(stored, key=lambda o: o.seq):
            messages[o.seq] = to_stored(o)
        return SessionState(
            client_id=self.config.client_id,
            messages=messages,
            inbound_qos2=set(self._inbound.qos2_received),
            subscriptions=dict(self._subscriptions.wanted),
            pending_unsubscribes=set(self._subscriptions.pending_unsubscribes),
            set_aside=dict(self.poison.set_aside),
            protocol_version=self._stored_protocol,
        )

    # --- queries -----------------------------------------------------------------------------

    @property
    def connection_state(self) -> ConnectionState:
        """Where the current connection stands (the durable state is :class:`SessionState`)."""
        return self._connection_state

    def retry_set_aside(self, seq: int) -> int:
        """Publish a set-aside message again, as a new message at the end of the queue.

        Returns its new sequence number; KeyError if ``seq`` is not set aside. The new
        message is added before the old one is removed, in the same batch.
        """
        aside = self.poison.set_aside[seq]
        m = from_stored(aside.message)
        new_seq = self.publish(m.topic, m.payload, m.qos, m.retain, m.properties, m.expires_at)
        self.poison.take(seq)
        return new_seq

    def has_output(self) -> bool:
        """Something is waiting to be taken."""
        out = self._out
        return bool(out.ops or out.packets or out.events)

    def take(self, now: float) -> Outbox:
        """Drain what was produced. Packets are assumed written at ``now`` (keepalive timing)."""
        out = self._out
        outbox = Outbox(out.ops, out.packets, out.events, self.generation)
        if out.packets:
            self._last_sent = now
            self._heard_since_sent = False
        # Always fresh lists: the outbox must not share one with what comes after it, or a
        # packet produced while the shell awaits the commit would ride out with this batch.
        out.ops = []
        out.packets = []
        out.events = []
        return outbox

    # --- application requests ----------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool = False,
        properties: Properties = NO_PROPERTIES,
        expires_at: float | None = None,
    ) -> int:
        """Accept a message (already validated); returns its sequence number.

        ``properties`` are its MQTT 5 PUBLISH properties without the Message Expiry Interval;
        ``expires_at`` (Unix time) is when that interval ends. Raises :class:`QueueFull` when
        the queue is full and the policy is not drop_oldest; with ``"block"`` the shell is
        expected to wait for room before calling.
        """
        queue = self._queue
        seq = queue.add(topic, payload, qos, retain, properties, expires_at)
        # Nothing spilled: the message joined the in-memory queue and may leave at once. (A
        # spilled one waits for refill(), which pumps.)
        if not queue.spilled and self._connection_state is ConnectionState.READY:
            self._outbound.pump()
        return seq

    def want_refill(self) -> tuple[int, int] | None:
        """``(after_seq, limit)`` to read from the store's queue, or None.

        Call it only after every operation taken so far has been committed, then pass what
        ``store.read_queued(client_id, after_seq, limit)`` returned to :meth:`refill`.
        """
        return self._queue.want_refill()

    def refill(self, messages: list[StoredMessage]) -> None:
        """Queued messages read back from the store (ascending seq, all > the after_seq asked)."""
        self._queue.refill(messages)
        if self._connection_state is ConnectionState.READY:
            self._outbound.pump()

    def subscribe(self, subscriptions: Sequence[tuple[str, int] | StoredSubscription]) -> int:
        """Record subscriptions (already validated); returns a token for SubscribeCompleted.

        Each is a ``(filter, qos)`` pair, or a :class:`StoredSubscription` with MQTT 5 options
        and a subscription identifier (its ``confirmed`` is ignored: the broker confirms).
        """
        ready = self._connection_state is ConnectionState.READY
        subs = [
            StoredSubscription(s.topic_filter, s.qos, False, s.options, s.subscription_id)
            if isinstance(s, StoredSubscription)
            else StoredSubscription(s[0], s[1])
            for s in subscriptions
        ]
        return self._subscriptions.subscribe(subs, send=ready)

    def unsubscribe(self, filters: list[str]) -> int:
        """Forget filters (already validated); returns a token for UnsubscribeCompleted."""
        ready = self._connection_state is ConnectionState.READY
        return self._subscriptions.unsubscribe(filters, send=ready)

    def ack(self, token: int) -> None:
        """The application acknowledged the message handed out with this token (manual mode).

        A QoS 2 message's packet ID is stored in this batch, so it is never delivered again;
        its PUBREC, or a QoS 1 message's PUBACK, goes out once every message that arrived
        before it was acknowledged too (MQTT §4.6).
        """
        self._inbound.acks.ack(token)

    def message_read(self) -> None:
        """The application took a handed-out message (or the inbox dropped it): with
        ``max_unread``, held messages may follow (and, automatic mode, be acknowledged)."""
        self._inbound.acks.message_read()

    # --- connection lifecycle ----------------------------------------------------------------

    def connect(self, now: float, protocol_version: int | None = None) -> int:
        """A transport is open: emit CONNECT. Returns the new connection generation.

        ``protocol_version`` (4: MQTT 3.1.1, 5: MQTT 5) is what this connection speaks;
        default ``config.protocol_version``.
        """
        self._fire(Trigger.CONNECT)  # RuntimeError unless disconnected
        self.generation += 1
        self._acked_on_connection = False
        cfg = self.config
        version = cfg.protocol_version if protocol_version is None else protocol_version
        self._set_terms(initial_terms(cfg, version))
        self._inbound.new_connection(version, cfg.receive_maximum, cfg.topic_alias_maximum)
        will = cfg.will
        if will is not None and version != MQTT_5 and will.properties:
            # The will's MQTT 5 properties (will delay, expiry, ...) cannot travel in 3.1.1.
            will = type(will)(will.topic, will.payload, will.qos, will.retain)
        self._out.packets.append(
            Connect(
                client_id=cfg.client_id,
                clean_session=cfg.clean_session,
                keepalive=cfg.keepalive,
                username=cfg.username,
                password=cfg.password,
                will=will,
                protocol_level=version,
                properties=self._connect_properties() if version == MQTT_5 else NO_PROPERTIES,
            )
        )
        self._ping_sent_at = None
        self._last_sent = now
        return self.generation

    def _connect_properties(self) -> Properties:
        """MQTT 5 CONNECT properties: the session's lifetime and the limits we announce."""
        cfg = self.config
        expiry = cfg.session_expiry_interval
        if expiry is None:
            # Clean Start with expiry 0 is 3.1.1's clean session; a persistent one never ends.
            expiry = 0 if cfg.clean_session else NEVER_EXPIRES
        return Properties(
            session_expiry_interval=expiry or None,  # absent means 0 (§3.1.2.11.2)
            receive_maximum=cfg.receive_maximum,
            maximum_packet_size=cfg.max_packet_size,
            topic_alias_maximum=cfg.topic_alias_maximum or None,
        )

    def _set_terms(self, terms: ConnectionTerms) -> None:
        self.terms = terms
        self._outbound.new_connection(terms)
        self._subscriptions.terms = terms

    def disconnect(self) -> None:
        """Graceful close: emit DISCONNECT; the session stays stored for the next connect."""
        if self._connection_state is not ConnectionState.DISCONNECTED:
            self._out.packets.append(Disconnect())

    def connection_lost(self, closed_by_broker_at: float | None = None) -> None:
        """The transport closed. Everything not acknowledged is resent on the next connect.

        ``closed_by_broker_at``: the time (the clock of :meth:`take`) at which the broker
        closed the connection, if it did (not a keepalive timeout, a protocol error or our own
        close): a broker hanging up right after a message counts against it (poison.py).
        """
        if (
            self._connection_state is ConnectionState.READY
            and closed_by_broker_at is not None
            and not self._acked_on_connection
        ):
            quiet = None if self._heard_since_sent else closed_by_broker_at - self._last_sent
            self.poison.connection_ended(quiet_for=quiet)
        elif self._connection_state is ConnectionState.READY:
            self.poison.connection_ended(quiet_for=None)
        self._fire(Trigger.CONNECTION_LOST)
        # Packets produced for the dead connection are dropped by generation in the shell.
        self._out.packets = []
        self._subscriptions.connection_lost()
        self._outbound.held.clear()
        self._inbound.acks.new_connection()
        self._ping_sent_at = None
        # QoS 0 messages already written are gone; those still queued wait for the next connect.

    # --- keepalive ---------------------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Advance the clock; returns when to call again (None: no timer needed).

        Raises :class:`KeepaliveTimeout` when the broker left a PINGREQ unanswered too long.
        """
        keepalive = self.terms.keepalive
        if self._connection_state is ConnectionState.DISCONNECTED or not keepalive:
            return None
        timeout = self.config.ping_timeout or float(keepalive)
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= timeout:
                raise KeepaliveTimeout(
                    f"no answer from the broker {timeout:g}s after PINGREQ; "
                    "treating the connection as dead"
                )
            return self._ping_sent_at + timeout
        if self._connection_state is ConnectionState.CONNECTING:
            return None
        due = self._last_sent + keepalive
        if now >= due:
            self._out.packets.append(PingReq())
            self._ping_sent_at = now
            return now + timeout
        return due

    # --- packets from the broker -------------------------------------------------------------

    def receive(self, packet: Packet) -> None:
        """Consume one decoded packet; ProtocolError if the connection state does not accept it."""
        # Any packet proves the link alive; a PINGRESP is not required specifically.
        self._ping_sent_at = None
        self._heard_since_sent = True
        if type(packet) in _PUBLISH_ACKS:
            self._acked_on_connection = True
        handler = self._accepts.get(type(packet))
        if handler is None:
            name = type(packet).__name__.upper()
            raise ProtocolError(REFUSALS[self._connection_state].format(name))
        handler(packet)

    def _on_pingresp(self, packet: PingResp) -> None:
        pass  # receive() already cleared the outstanding ping

    def _on_disconnect(self, packet: Disconnect) -> None:
        """MQTT 5: the broker ends the connection and says why."""
        if self.terms.protocol_version != MQTT_5:
            # MQTT 3.1.1 has no DISCONNECT from the broker: refused like any other stray packet.
            raise ProtocolError(REFUSALS[self._connection_state].format("DISCONNECT"))
        props = packet.properties
        raise ServerDisconnected(
            packet.reason_code,
            describe_reason_code(packet.reason_code, PacketType.DISCONNECT),
            reason_string=props.reason_string,
            server_reference=props.server_reference,
        )

    def _on_connack(self, connack: ConnAck) -> None:
        if connack.return_code != 0:
            self._out.events.append(
                ConnectRefused(connack.return_code, connack.properties.reason_string)
            )
            self._fire(Trigger.CONNACK_REFUSED)
            return
        cfg = self.config
        terms = accepted_terms(cfg, self.terms.protocol_version, connack)
        if terms.assigned_client_id is not None and not cfg.clean_session:
            # Raised before the session changes: the shell ends the connection.
            raise ClientIdAssigned(cfg.client_id, terms.assigned_client_id)
        self._set_terms(terms)
        if terms.v5:
            self._note_granted_expiry(terms.session_expiry_interval)
        self._record_protocol(terms.protocol_version, connack.session_present)
        if connack.session_present:
            self._lost_requeued = self._lost_in_doubt = 0
            self._become_ready(session_present=True)
            return
        self._broker_lost_session()
        if self._subscriptions.wanted:
            self._fire(Trigger.SESSION_LOST)
            self._subscriptions.resubscribe_all()
        else:
            self._become_ready(session_present=False)

    def _record_protocol(self, version: int, session_present: bool) -> None:
        """The stored session remembers the protocol it is spoken in (``ProtocolVersionSet``).

        A session made under one protocol and continued under the other is deliberately
        allowed: the broker decides. If it kept the session (brokers keep a client's session
        across protocol levels, mosquitto does), its open flows resume as usual; if it did
        not, CONNACK says so and the session-lost rules apply (every message kept, sent again).
        """
        previous = self._stored_protocol
        if previous == version:
            return
        self._stored_protocol = version
        self._out.ops.append(ProtocolVersionSet(version))
        if previous is not None:
            names = {MQTT_5: "MQTT 5"}
            self._out.events.append(
                Notice(
                    f"the stored session was made with {names.get(previous, 'MQTT 3.1.1')} and "
                    f"now continues with {names.get(version, 'MQTT 3.1.1')}; the broker "
                    f"{'kept' if session_present else 'did not keep'} its side of it"
                )
            )

    def _note_granted_expiry(self, granted: int | None) -> None:
        asked = self._connect_properties().session_expiry_interval or 0
        if granted is not None and granted != asked:
            shown = "never" if granted == NEVER_EXPIRES else f"{granted} s"
            self._out.events.append(
                Notice(
                    f"the broker keeps the session for {shown} after a disconnect, not the "
                    f"{'never' if asked == NEVER_EXPIRES else f'{asked} s'} asked for"
                )
            )

    def _broker_lost_session(self) -> None:
        """CONNACK said the broker holds no session: discard its flows, keep every message."""
        requeued, in_doubt = self._outbound.broker_lost_session()
        self._inbound.broker_lost_session()
        self._subscriptions.broker_lost_session()
        self._lost_requeued = requeued
        self._lost_in_doubt = in_doubt

    def _on_suback(self, suback: SubAck) -> None:
        restored = self._subscriptions.on_suback(suback)
        if restored and self._connection_state is ConnectionState.RESUBSCRIBING:
            self._become_ready(session_present=False)

    def _become_ready(self, *, session_present: bool) -> None:
        self._fire(Trigger.SESSION_READY)
        self._subscriptions.send_missing()
        # Resume every open flow in sequence order with its original packet ID ("packet IDs
        # are continuous", "order"), before anything new enters the window.
        self._outbound.resume()
        self._out.events.append(
            ConnectionReady(
                session_present,
                self._lost_requeued,
                self._lost_in_doubt,
                clean_start=self.config.clean_session,
            )
        )
        self._outbound.pump()
